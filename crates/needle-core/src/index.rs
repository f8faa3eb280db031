//! Maximum-inner-product search: the small interface every index backend implements,
//! and [`FlatIndex`], the exact scan that is both ground truth and cost baseline.
//!
//! Shaped on faiss's `Index`: batches of queries are row-major `n × dim`; results are
//! row-major `n × k`, padded with [`NO_LABEL`] and `-inf` when fewer than `k` vectors exist.
//! Indexes know nothing of attention; selectors adapt them.

use std::ops::Range;

use rayon::prelude::*;

use crate::attention::{score, top_k};
use crate::error::{Error, Result, check_finite};

/// Label that pads a result row when fewer than `k` vectors were found.
pub const NO_LABEL: u32 = u32::MAX;

/// Per-call search settings. `effort` is the index's own knob (`ef_search` for graphs,
/// `nprobe` for IVF, tables probed for LSH); `None` keeps the index's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SearchParams {
    /// Index-specific effort knob; larger means more recall and more work.
    pub effort: Option<usize>,
}

impl SearchParams {
    /// Params with the given effort.
    pub fn effort(effort: usize) -> Self {
        Self { effort: Some(effort) }
    }
}

/// What a search (or a selection) touched, so that cost is reported, not guessed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SearchStats {
    /// Full-precision vectors whose inner product was computed.
    pub full_scored: u64,
    /// Compressed codes (PQ codes, hash signatures, page bounds) evaluated.
    pub codes_scored: u64,
    /// Bytes read from vector and code storage.
    pub bytes_read: u64,
}

impl std::ops::AddAssign for SearchStats {
    fn add_assign(&mut self, o: Self) {
        self.full_scored += o.full_scored;
        self.codes_scored += o.codes_scored;
        self.bytes_read += o.bytes_read;
    }
}

/// Results of a batch search: `labels` and `scores` are row-major `n_queries × k`.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// Results per query.
    pub k: usize,
    /// Ids, best first, padded with [`NO_LABEL`].
    pub labels: Vec<u32>,
    /// Inner products (as the index estimates them), padded with `-inf`.
    pub scores: Vec<f32>,
    /// Work done, summed over all queries.
    pub stats: SearchStats,
}

impl SearchResult {
    /// The labels of query `i`, without padding.
    pub fn labels_of(&self, i: usize) -> &[u32] {
        let row = &self.labels[i * self.k..(i + 1) * self.k];
        let n = row.iter().position(|&l| l == NO_LABEL).unwrap_or(self.k);
        &row[..n]
    }

    /// Number of query rows.
    pub fn n_queries(&self) -> usize {
        self.labels.len().checked_div(self.k).unwrap_or(0)
    }

    /// Assembles a result from per-query hit lists, padding each to `k`.
    pub fn from_rows(k: usize, rows: Vec<(Vec<(u32, f32)>, SearchStats)>) -> Self {
        let mut out = SearchResult {
            k,
            labels: Vec::with_capacity(rows.len() * k),
            scores: Vec::with_capacity(rows.len() * k),
            stats: SearchStats::default(),
        };
        for (hits, stats) in rows {
            out.stats += stats;
            for j in 0..k {
                let (l, s) = hits.get(j).copied().unwrap_or((NO_LABEL, f32::NEG_INFINITY));
                out.labels.push(l);
                out.scores.push(s);
            }
        }
        out
    }
}

/// Cost of a build, reported by every index.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildStats {
    /// Vectors indexed.
    pub vectors: usize,
    /// Training queries used (0 when the index ignores them or none were given).
    pub train_queries: usize,
    /// Wall time of the build in seconds.
    pub seconds: f64,
    /// Bytes held by the index, vectors included.
    pub bytes: usize,
}

impl std::ops::AddAssign for BuildStats {
    fn add_assign(&mut self, o: Self) {
        self.vectors += o.vectors;
        self.train_queries += o.train_queries;
        self.seconds += o.seconds;
        self.bytes += o.bytes;
    }
}

/// A maximum-inner-product index over vectors of a fixed dimension.
///
/// Ids are dense: the `i`-th vector ever added has id `i`.
pub trait VectorIndex: Send + Sync {
    /// A short description in index-factory syntax, e.g. `"Flat"`, `"HNSW32"`.
    fn describe(&self) -> String;
    /// Vector dimension.
    fn dim(&self) -> usize;
    /// Number of vectors held.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Replaces the content with `keys` (row-major `n × dim`). `train_queries` (row-major,
    /// may be absent) is a sample of the query distribution; query-aware indexes use it.
    fn build(&mut self, keys: &[f32], train_queries: Option<&[f32]>) -> Result<BuildStats>;
    /// Adds vectors after a build without rebuilding; returns their ids.
    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>>;
    /// The `k` vectors with the largest inner product for each query row.
    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult>;
    /// One search for a group of query rows (the query heads of a GQA group) ranked by the
    /// group's best inner product, `max_h q_h·x`; one result row of `k`. `seeds` are ids the
    /// search may start from besides its own entry points (e.g. the previous decode step's hits;
    /// ids not held are ignored).
    ///
    /// The default searches each query for `k` and merges the rows by each id's best score,
    /// ignoring `seeds`; indexes that can walk once for the whole group override it.
    fn search_group(&self, queries: &[f32], k: usize, params: &SearchParams, seeds: &[u32]) -> Result<SearchResult> {
        let _ = seeds;
        let r = self.search(queries, k, params)?;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(r.labels.len());
        for (&l, &s) in r.labels.iter().zip(&r.scores) {
            if l != NO_LABEL {
                best.push((l, s));
            }
        }
        best.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        best.dedup_by_key(|c| c.0);
        best.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        best.truncate(k);
        Ok(SearchResult::from_rows(k, vec![(best, r.stats)]))
    }
    /// Bytes held by the index, vectors included.
    fn memory_bytes(&self) -> usize;
    /// Appends the index's built state (what `build` and every `insert` since made) to `out`,
    /// without the vectors themselves: [`VectorIndex::load_state`] gets those back.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let _ = out;
        Err(Error::Unsupported { operation: "save_state".into(), implementation: self.describe() })
    }
    /// Restores state written by `save_state` into an index made with the same parameters,
    /// over `keys` (row-major, the vectors it held, in id order). Bad or foreign bytes are an
    /// [`Error::Corrupt`]; on any error the index is left as it was.
    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let _ = (state, keys);
        Err(Error::Unsupported { operation: "load_state".into(), implementation: self.describe() })
    }
}

/// Checks a row-major batch: non-empty rows of `dim` finite floats. Returns the row count.
pub fn check_batch(what: &str, xs: &[f32], dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::invalid("dim", "must be at least 1"));
    }
    if !xs.len().is_multiple_of(dim) {
        return Err(Error::DimensionMismatch {
            what: format!("{what} (rows of {dim})"),
            expected: xs.len().div_ceil(dim) * dim,
            got: xs.len(),
        });
    }
    check_finite(what, xs)?;
    Ok(xs.len() / dim)
}

/// Checks a search call: finite queries of the right width and `1 <= k <= len`.
pub fn check_search(queries: &[f32], dim: usize, k: usize, len: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::EmptyKeys { what: "search".into() });
    }
    if k == 0 || k > len {
        return Err(Error::BudgetTooLarge { what: "search k (must be 1..=len)".into(), budget: k, available: len });
    }
    check_batch("queries", queries, dim)
}

/// Exact maximum-inner-product search by scanning every vector.
#[derive(Debug, Clone)]
pub struct FlatIndex {
    dim: usize,
    data: Vec<f32>,
}

impl FlatIndex {
    /// An empty flat index for vectors of `dim` floats.
    pub fn new(dim: usize) -> Self {
        Self { dim, data: Vec::new() }
    }

    /// Row `i`.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Exact top-k for one query (no validation; callers validate the batch).
    fn search_one(&self, q: &[f32], k: usize) -> Result<(Vec<(u32, f32)>, SearchStats)> {
        let scores: Vec<f32> = self.data.chunks_exact(self.dim).map(|v| score::<f32>(q, v, 1.0)).collect();
        let n = scores.len() as u64;
        Ok((top_k(&scores, k)?, SearchStats { full_scored: n, codes_scored: 0, bytes_read: n * (self.dim * 4) as u64 }))
    }
}

impl VectorIndex for FlatIndex {
    fn describe(&self) -> String {
        "Flat".into()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }
    fn build(&mut self, keys: &[f32], train_queries: Option<&[f32]>) -> Result<BuildStats> {
        let t = std::time::Instant::now();
        check_batch("keys", keys, self.dim)?;
        if let Some(q) = train_queries {
            check_batch("train_queries", q, self.dim)?;
        }
        self.data = keys.to_vec();
        Ok(BuildStats {
            vectors: self.len(),
            train_queries: 0,
            seconds: t.elapsed().as_secs_f64(),
            bytes: self.memory_bytes(),
        })
    }
    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>> {
        let n = check_batch("keys", keys, self.dim)?;
        let start = self.len() as u32;
        self.data.extend_from_slice(keys);
        Ok(start..start + n as u32)
    }
    fn search(&self, queries: &[f32], k: usize, _params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.len())?;
        let rows = queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k)).collect::<Result<Vec<_>>>()?;
        Ok(SearchResult::from_rows(k, rows))
    }
    fn memory_bytes(&self) -> usize {
        self.data.len() * 4
    }
    // The state is the vector count alone: the vectors come back from `keys`.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(FLAT_TAG);
        out.extend_from_slice(&FLAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let bad = |reason: String| Error::Corrupt { what: "Flat index state".into(), reason };
        if state.len() != 20 {
            return Err(bad(format!("{} bytes where 20 are required", state.len())));
        }
        if &state[..8] != FLAT_TAG {
            let tag: String = state[..8].iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect();
            return Err(bad(format!("found tag `{tag}`, expected `ndl.flat`: the state of another index")));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&state[8..12]);
        let version = u32::from_le_bytes(v);
        if version != FLAT_VERSION {
            return Err(bad(format!("format version {version}, this build reads {FLAT_VERSION}")));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&state[12..20]);
        let n = u64::from_le_bytes(n);
        let rows = check_batch("keys", keys, self.dim)?;
        if n != rows as u64 {
            return Err(bad(format!("{n} vectors saved, {rows} key rows given")));
        }
        self.data = keys.to_vec();
        Ok(())
    }
}

const FLAT_TAG: &[u8; 8] = b"ndl.flat";
const FLAT_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_finds_known_maxima_and_pads_nothing() {
        let mut f = FlatIndex::new(2);
        f.build(&[1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.7, 0.7], None).unwrap();
        let r = f.search(&[1.0, 0.1, 0.0, -1.0], 2, &SearchParams::default()).unwrap();
        assert_eq!(r.labels_of(0), &[0, 3]);
        assert_eq!(r.labels_of(1), &[0, 2]); // tie at 0.0 broken by lower id
        assert_eq!(r.stats.full_scored, 8);
        assert_eq!(f.insert(&[5.0, 5.0]).unwrap(), 4..5);
        let r = f.search(&[1.0, 1.0], 1, &SearchParams::default()).unwrap();
        assert_eq!(r.labels_of(0), &[4]);
    }

    #[test]
    fn flat_rejects_bad_input() {
        let mut f = FlatIndex::new(2);
        assert!(matches!(f.search(&[1.0, 0.0], 1, &SearchParams::default()), Err(Error::EmptyKeys { .. })));
        assert!(f.build(&[1.0, 0.0, 2.0], None).is_err());
        assert!(matches!(f.build(&[1.0, f32::INFINITY], None), Err(Error::NonFinite { .. })));
        f.build(&[1.0, 0.0], None).unwrap();
        assert!(matches!(f.search(&[1.0, 0.0], 2, &SearchParams::default()), Err(Error::BudgetTooLarge { .. })));
        assert!(matches!(f.search(&[f32::NAN, 0.0], 1, &SearchParams::default()), Err(Error::NonFinite { .. })));
    }

    #[test]
    fn flat_state_round_trips_and_rejects_bad_bytes() {
        let keys = [1.0, 0.0, 0.0, 1.0, -1.0, 0.5];
        let mut f = FlatIndex::new(2);
        f.build(&keys, None).unwrap();
        let mut state = Vec::new();
        f.save_state(&mut state).unwrap();
        let mut g = FlatIndex::new(2);
        g.load_state(&state, &keys).unwrap();
        assert_eq!(g.data, f.data);
        for n in 0..state.len() {
            assert!(matches!(FlatIndex::new(2).load_state(&state[..n], &keys), Err(Error::Corrupt { .. })));
        }
        assert!(matches!(g.load_state(&state, &keys[..4]), Err(Error::Corrupt { .. })));
        let mut other = state.clone();
        other[4] = b'x';
        assert!(g.load_state(&other, &keys).unwrap_err().to_string().contains("another index"));
        let mut newer = state.clone();
        newer[8] = 2;
        assert!(matches!(g.load_state(&newer, &keys), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn default_group_search_merges_rows_by_best_score() {
        let mut f = FlatIndex::new(2);
        f.build(&[1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.6, 0.6], None).unwrap();
        // Query 0 ranks 0 then 3; query 1 ranks 1 then 3: the group's best two by max score.
        let r = f.search_group(&[2.0, 0.0, 0.0, 1.5], 2, &SearchParams::default(), &[9]).unwrap();
        assert_eq!(r.labels_of(0), &[0, 1]);
        assert_eq!(r.scores[..2], [2.0, 1.5]);
        assert_eq!(r.n_queries(), 1);
        assert_eq!(r.stats.full_scored, 8);
    }

    #[test]
    fn padded_results() {
        let r = SearchResult::from_rows(3, vec![(vec![(7, 1.0)], SearchStats::default())]);
        assert_eq!(r.labels, vec![7, NO_LABEL, NO_LABEL]);
        assert_eq!(r.labels_of(0), &[7]);
        assert_eq!(r.n_queries(), 1);
    }
}
