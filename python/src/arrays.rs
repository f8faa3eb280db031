//! Indexes and selectors on numpy arrays.
//!
//! An input array is read in place: [`rows`] borrows the buffer of a C-contiguous `float32`
//! array of shape `(n, dim)` as a slice (no copy; anything else is an error saying how to
//! convert it, never a silent copy). Every call that computes runs with the GIL released, so
//! threads that search or select run in parallel.

use std::sync::{Mutex, PoisonError, RwLock};

use needle_core::{
    AttentionSelector, BuildContext, BuildStats, HeadId, NO_LABEL, Rows, SearchParams, SearchStats, Selection,
    SelectorSpec, VectorIndex,
};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{err, to_py};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Index>()?;
    m.add_class::<Selector>()?;
    m.add_function(wrap_pyfunction!(index_names, m)?)?;
    m.add_function(wrap_pyfunction!(selector_names, m)?)?;
    m.add_function(wrap_pyfunction!(view_address, m)?)?;
    Ok(())
}

/// The buffer of `a` (argument `what`) as a row-major slice with its row count and width:
/// the numpy buffer itself. A non-contiguous array is an error, not a copy.
fn rows<'a>(what: &str, a: &'a PyReadonlyArray2<'_, f32>) -> PyResult<(&'a [f32], usize, usize)> {
    let [n, dim] = [a.shape()[0], a.shape()[1]];
    // `as_slice` also takes a Fortran-ordered array, whose buffer is not row-major.
    let data = a.as_slice().ok().filter(|_| a.is_c_contiguous()).ok_or_else(|| {
        err(anyhow::anyhow!(
            "{what}: the array is not C-contiguous; pass np.ascontiguousarray({what}) (needle reads arrays in place)"
        ))
    })?;
    if dim == 0 {
        return Err(err(anyhow::anyhow!("{what}: rows have no columns (shape ({n}, 0))")));
    }
    Ok((data, n, dim))
}

/// Checks that `what` has rows of `dim` floats.
fn same_width(what: &str, got: usize, dim: usize) -> PyResult<()> {
    if got != dim {
        return Err(err(anyhow::anyhow!("{what}: rows of {got} floats, the keys have {dim}")));
    }
    Ok(())
}

/// The address of the buffer needle reads for `array` (what every array call borrows): equal
/// to `array.ctypes.data` when the call reads the array in place. For tests and the curious.
#[pyfunction]
#[pyo3(name = "_view_address")]
fn view_address(array: PyReadonlyArray2<'_, f32>) -> PyResult<usize> {
    Ok(rows("array", &array)?.0.as_ptr() as usize)
}

/// The registered index names with their descriptions: `[(name, help), …]`.
#[pyfunction]
fn index_names() -> Vec<(String, String)> {
    needle_select::index_names()
}

/// The registered selector names with their descriptions: `[(name, help), …]`.
#[pyfunction]
fn selector_names() -> Vec<(String, String)> {
    needle_select::selector_names()
}

/// `(ids, scores)` of a search.
type Found<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);
/// `(ids, log_weights)` of a selection.
type Picked<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<f32>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn build_dict<'py>(py: Python<'py>, s: &BuildStats) -> PyResult<Bound<'py, PyAny>> {
    to_py(py, &serde_json::to_value(s).map_err(err)?)
}

fn search_dict<'py>(py: Python<'py>, s: &SearchStats) -> PyResult<Bound<'py, PyAny>> {
    to_py(py, &serde_json::to_value(s).map_err(err)?)
}

/// A maximum-inner-product vector index over float32 rows (RoarGraph, HNSW, IVF-PQ, LSH, flat).
///
/// `Index.build(keys, train_queries, "RoarGraph32")` builds one; `index.search(queries, k)`
/// returns `(ids, scores)`, both of shape `(len(queries), k)`, best first, ids as int64 with -1
/// (and score -inf) padding a row when fewer than `k` vectors were found. Arrays are read in
/// place and the GIL is released while the index builds, inserts and searches.
#[pyclass(frozen, module = "needle")]
pub struct Index {
    inner: RwLock<Box<dyn VectorIndex>>,
    build: BuildStats,
    last: Mutex<SearchStats>,
}

#[pymethods]
impl Index {
    /// Builds an index named by `spec` (`"RoarGraph32"`, `"HNSW16"`, `"IVF256,PQ16"`,
    /// `"LSH8x64"`, `"Flat"`, or a registered name such as `"graph"`) over `keys` (n × dim),
    /// trained on `train_queries` (m × dim, a sample of the queries to come) where the index
    /// is query-aware.
    #[staticmethod]
    #[pyo3(signature = (keys, train_queries=None, spec="RoarGraph32"))]
    fn build(
        py: Python<'_>,
        keys: PyReadonlyArray2<'_, f32>,
        train_queries: Option<PyReadonlyArray2<'_, f32>>,
        spec: &str,
    ) -> PyResult<Self> {
        let (keys, _, dim) = rows("keys", &keys)?;
        let train = match &train_queries {
            Some(t) => {
                let (t, _, d) = rows("train_queries", t)?;
                same_width("train_queries", d, dim)?;
                Some(t)
            }
            None => None,
        };
        let mut index = needle_select::index_factory(dim, spec).map_err(err)?;
        let build = py.detach(|| index.build(keys, train)).map_err(err)?;
        Ok(Index { inner: RwLock::new(index), build, last: Mutex::new(SearchStats::default()) })
    }

    /// The `k` rows with the largest inner product for each query row: `(ids, scores)`, int64
    /// and float32 arrays of shape `(len(queries), k)`. `effort` is the index's own knob
    /// (`ef_search` for graphs, `nprobe` for IVF, tables probed for LSH).
    #[pyo3(signature = (queries, k, effort=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        effort: Option<usize>,
    ) -> PyResult<Found<'py>> {
        let (q, n, dim) = rows("queries", &queries)?;
        let params = SearchParams { effort };
        let result = py.detach(|| {
            let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            if dim != index.dim() {
                return Err(anyhow::anyhow!("queries: rows of {dim} floats, the index holds {}", index.dim()));
            }
            Ok(index.search(q, k, &params)?)
        });
        let result = result.map_err(err)?;
        *lock(&self.last) = result.stats;
        let ids: Vec<i64> = result.labels.iter().map(|&l| if l == NO_LABEL { -1 } else { i64::from(l) }).collect();
        Ok((ids.into_pyarray(py).reshape([n, k])?, result.scores.into_pyarray(py).reshape([n, k])?))
    }

    /// Adds `keys` (n × dim) after the build without rebuilding; returns their ids as
    /// `(start, end)`.
    fn insert(&self, py: Python<'_>, keys: PyReadonlyArray2<'_, f32>) -> PyResult<(u32, u32)> {
        let (keys, _, dim) = rows("keys", &keys)?;
        let ids = py.detach(|| {
            let mut index = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            if dim != index.dim() {
                return Err(anyhow::anyhow!("keys: rows of {dim} floats, the index holds {}", index.dim()));
            }
            Ok(index.insert(keys)?)
        });
        let ids = ids.map_err(err)?;
        Ok((ids.start, ids.end))
    }

    /// Row width.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).dim()
    }

    /// Bytes the index holds, its copy of the vectors included.
    #[getter]
    fn memory_bytes(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).memory_bytes()
    }

    /// What the build cost: `{"vectors", "train_queries", "seconds", "bytes"}`.
    #[getter]
    fn build_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        build_dict(py, &self.build)
    }

    /// What the last search touched: `{"full_scored", "codes_scored", "bytes_read"}`.
    #[getter]
    fn search_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        search_dict(py, &lock(&self.last))
    }

    fn __len__(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn __repr__(&self) -> String {
        let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        format!("Index({}, {} × {})", index.describe(), index.len(), index.dim())
    }
}

/// An attention selector for one KV head: which keys of the dynamic part (between the
/// attention sinks and the recent window) a query group attends to.
///
/// `Selector.from_spec("quest:k=256")`, then `sel.build(keys, train_queries)` once over the
/// prefill's keys, `sel.select(queries, keys)` per decode step (returns `(ids, log_weights)`),
/// and `sel.insert(keys, start, end)` for the rows that left the window. The static part
/// (`sel.static_ids(n)`) is attended densely by the caller; the two merge exactly by
/// log-sum-exp. Arrays are read in place and the GIL is released while it computes.
#[pyclass(frozen, module = "needle")]
pub struct Selector {
    spec: SelectorSpec,
    describe: String,
    built: Mutex<Option<(Box<dyn AttentionSelector>, usize)>>,
}

impl Selector {
    fn check_keys(&self, what: &str, n: usize, dim: usize) -> PyResult<()> {
        if let Some((_, d)) = &*lock(&self.built) {
            same_width(what, dim, *d)?;
        }
        if n == 0 {
            return Err(err(anyhow::anyhow!("{what}: no rows")));
        }
        Ok(())
    }
}

#[pymethods]
impl Selector {
    /// A selector from its spec (`"quest:k=256"`, `"retrieval:index=graph,k=100"`,
    /// `"oracle:k=64,sinks=4,window=64"`, …; see `needle.selector_names()`).
    #[staticmethod]
    fn from_spec(spec: &str) -> PyResult<Self> {
        if spec.trim().eq_ignore_ascii_case("auto") {
            return Err(err(anyhow::anyhow!(
                "selector `auto` depends on the context length; name one (`retrieval`, `quest:k=256`, …)"
            )));
        }
        let parsed = needle_select::parse(spec).map_err(err)?;
        Ok(Selector { describe: parsed.factory.describe(), spec: parsed, built: Mutex::new(None) })
    }

    /// Builds over `keys` (n × dim, the head's keys by position, post-RoPE) with a sample of
    /// prefill queries `train_queries` (m × dim); `scale` is the attention scale (1/√dim by
    /// default). Returns the build stats as a dict.
    #[pyo3(signature = (keys, train_queries=None, scale=None, layer=0, kv_head=0))]
    fn build<'py>(
        &self,
        py: Python<'py>,
        keys: PyReadonlyArray2<'py, f32>,
        train_queries: Option<PyReadonlyArray2<'py, f32>>,
        scale: Option<f32>,
        layer: usize,
        kv_head: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (keys, n, dim) = rows("keys", &keys)?;
        if n == 0 {
            return Err(err(anyhow::anyhow!("keys: no rows")));
        }
        let train: &[f32] = match &train_queries {
            Some(t) => {
                let (t, _, d) = rows("train_queries", t)?;
                same_width("train_queries", d, dim)?;
                t
            }
            None => &[],
        };
        let head = HeadId { layer, kv_head };
        let scale = scale.unwrap_or(1.0 / (dim as f32).sqrt());
        let factory = &self.spec.factory;
        let (sel, stats) = py
            .detach(|| -> anyhow::Result<_> {
                let rows = Rows::new("keys", keys, dim)?;
                let mut sel = factory.create(head, dim)?;
                let stats = sel.build(&BuildContext { head, keys: &rows, train_queries: train, scale })?;
                Ok((sel, stats))
            })
            .map_err(err)?;
        *lock(&self.built) = Some((sel, dim));
        build_dict(py, &stats)
    }

    /// Rows `start..end` of `keys` (all keys so far, n × dim) have left the window and joined
    /// the dynamic part.
    fn insert(&self, py: Python<'_>, keys: PyReadonlyArray2<'_, f32>, start: u32, end: u32) -> PyResult<()> {
        let (keys, n, dim) = rows("keys", &keys)?;
        self.check_keys("keys", n, dim)?;
        py.detach(|| -> anyhow::Result<()> {
            let mut built = lock(&self.built);
            let (sel, _) = built.as_mut().ok_or_else(|| anyhow::anyhow!("insert before build: call build first"))?;
            sel.insert(&Rows::new("keys", keys, dim)?, start..end)?;
            Ok(())
        })
        .map_err(err)
    }

    /// Picks ids of the dynamic part for `queries` (the group's query heads, g × dim) over
    /// `keys` (all keys so far, n × dim) within the spec's budget: `(ids, log_weights)`, an
    /// int64 array and a float32 array (empty, or one additive log-weight per id for sampling
    /// selectors).
    fn select<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        keys: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Picked<'py>> {
        let (keys, n, dim) = rows("keys", &keys)?;
        let (q, _, qd) = rows("queries", &queries)?;
        self.check_keys("keys", n, dim)?;
        same_width("queries", qd, dim)?;
        let budget = self.spec.budget;
        let out = py
            .detach(|| -> anyhow::Result<Selection> {
                let mut built = lock(&self.built);
                let (sel, _) =
                    built.as_mut().ok_or_else(|| anyhow::anyhow!("select before build: call build first"))?;
                let mut out = Selection::default();
                sel.select(q, &Rows::new("keys", keys, dim)?, &budget, &mut out)?;
                Ok(out)
            })
            .map_err(err)?;
        let ids: Vec<i64> = out.ids.iter().map(|&i| i64::from(i)).collect();
        Ok((ids.into_pyarray(py), out.log_weights.into_pyarray(py)))
    }

    /// The positions attended densely when the context holds `n` tokens (sinks, then window).
    fn static_ids<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let part = self.static_part_of()?;
        Ok(part.static_ids(n).map(i64::from).collect::<Vec<_>>().into_pyarray(py))
    }

    /// `(start, end)`: the dynamic part when the context holds `n` tokens.
    fn dynamic_range(&self, n: usize) -> PyResult<(u32, u32)> {
        let r = self.static_part_of()?.dynamic_range(n);
        Ok((r.start, r.end))
    }

    /// The spec as the selector describes itself.
    #[getter]
    fn spec(&self) -> String {
        self.describe.clone()
    }

    /// The most ids one selection may hold (the spec's `k`).
    #[getter]
    fn budget(&self) -> usize {
        self.spec.budget.max_ids()
    }

    /// Bytes held by the built selector's own structures (0 before the build).
    #[getter]
    fn memory_bytes(&self) -> usize {
        lock(&self.built).as_ref().map_or(0, |(s, _)| s.memory_bytes())
    }

    fn __repr__(&self) -> String {
        format!("Selector({})", self.describe)
    }
}

impl Selector {
    /// The static part: the built selector's, or a fresh one's (a factory needs a width; the
    /// static part does not depend on it).
    fn static_part_of(&self) -> PyResult<needle_core::StaticPart> {
        if let Some((s, _)) = &*lock(&self.built) {
            return Ok(s.static_part());
        }
        Ok(self.spec.factory.create(HeadId { layer: 0, kv_head: 0 }, 1).map_err(err)?.static_part())
    }
}
