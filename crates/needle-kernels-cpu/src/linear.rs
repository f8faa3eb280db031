//! Quantized linear layers over borrowed (memory-mapped) weight bytes.

use std::ops::Range;

use crate::act::{BlockQ8, QActs, kind_for};
use crate::dot::{Kernel, Kernel4, Lanes, RowsPlan, TOKENS, kernel, kernel4, lanes_for};
use crate::packed::{PACK, PackedRows};
use crate::pool::Pool;
use crate::{Error, Isa, Result, check_len};
use needle_quant::QuantType;

/// Below this many weights a matrix-vector product runs on the calling thread.
const PAR_MIN_WEIGHTS: usize = 1 << 17;
/// Weight rows × token rows of one cache tile of [`QMatrix::gemm`].
const TILE_ROWS: usize = 16;
const TILE_TOKENS: usize = 8;

/// A `rows × cols` weight matrix (`rows` = out features, `cols` = in features) of one ggml type,
/// row-major, each row `cols / block_elems` whole blocks, borrowed as bytes (no copy).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    ty: QuantType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
    /// The same rows repacked for decode, where the caller keeps them ([`Self::with_packed`]).
    packed: Option<&'a PackedRows>,
}

impl<'a> QMatrix<'a> {
    /// A view of `data` as `rows × cols` weights of `ty`.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: &'a [u8]) -> Result<QMatrix<'a>> {
        let row_bytes = ty.bytes_for("cols", cols)?;
        let total =
            rows.checked_mul(row_bytes).ok_or_else(|| Error::Invalid { param: "rows", why: "too large".into() })?;
        check_len("data", data.len(), total)?;
        Ok(QMatrix { ty, rows, cols, row_bytes, data, packed: None })
    }

    /// This matrix with `packed`, its rows repacked ([`PackedRows::new`] of it): decode's
    /// products ([`gemv_rows_with`], hence [`gemv_many_with`] and one-token [`Self::gemv_with`])
    /// then run the packed kernel on every ISA that has it ([`PackedRows::wanted`]), for one row
    /// and for a batch alike.
    pub fn with_packed(self, packed: &'a PackedRows) -> Result<QMatrix<'a>> {
        if (packed.ty(), packed.rows(), packed.cols()) != (self.ty, self.rows, self.cols) {
            return Err(Error::Invalid {
                param: "packed",
                why: format!(
                    "{:?} {}×{} repacked, for a {:?} {}×{} matrix",
                    packed.ty(),
                    packed.rows(),
                    packed.cols(),
                    self.ty,
                    self.rows,
                    self.cols
                ),
            });
        }
        Ok(QMatrix { packed: Some(packed), ..self })
    }

    /// Element type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Out features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// In features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes of row `r` (panics when out of range, like slice indexing).
    pub fn row_bytes(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// `y = W x` for one token (`x`: `cols`, `y`: `rows`), on the best ISA.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.gemv_with(Isa::detect(), x, y)
    }

    /// [`gemv`](Self::gemv) on a given ISA (scalar when `isa` is not available here).
    pub fn gemv_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        gemv_many_with(isa, &[*self], x, &mut [y])
    }

    /// `Y = X Wᵀ` for `t` tokens (`x`: `t × cols`, `y`: `t × rows`), on the best ISA.
    pub fn gemm(&self, x: &[f32], t: usize, y: &mut [f32]) -> Result<()> {
        self.gemm_with(Isa::detect(), x, t, y)
    }

    /// [`gemm`](Self::gemm) on a given ISA (scalar when `isa` is not available here). A matrix
    /// with its rows repacked ([`Self::with_packed`]) runs [`gemv_rows_with`] where `isa` has
    /// the packed kernel: each token row the bits of a one-token product.
    ///
    /// Each token row of `x` is quantized once; the work is cut into tiles of 16 weight rows ×
    /// 8 tokens so a weight row is read from L1 for all tokens of the tile; row blocks run in
    /// parallel on the [`Pool`]. For Q8_0, Q4_0 and Q4_1 on AVX2 and NEON, and Q5_0, Q5_1 and
    /// IQ4_NL on AVX2, a micro-kernel takes 1 weight row × 4 tokens, unpacking each weight block
    /// once for the 4 tokens.
    pub fn gemm_with(&self, isa: Isa, x: &[f32], t: usize, y: &mut [f32]) -> Result<()> {
        check_len("x", x.len(), t.saturating_mul(self.cols))?;
        check_len("y", y.len(), t.saturating_mul(self.rows))?;
        if t == 0 || self.rows == 0 {
            return Ok(());
        }
        if t == 1 || self.packed.is_some_and(|_| PackedRows::wanted(self.ty, isa)) {
            return gemv_rows_with(isa, &[*self], x, t, &mut [y]);
        }
        let acts = QActs::quantize_with(isa, self.ty, x, t, self.cols)?;
        let (k, k4) = (kernel(self.ty, isa), kernel4(self.ty, isa));
        let pool = Pool::global();
        let block = TILE_ROWS.max(self.rows.div_ceil(4 * pool.threads()) / TILE_ROWS * TILE_ROWS);
        let out = SharedOut(y.as_mut_ptr());
        pool.run(self.rows.div_ceil(block), &|b| {
            let rows = b * block..((b + 1) * block).min(self.rows);
            // SAFETY: tasks own disjoint row ranges, and every index written is
            // `tok · self.rows + r` with `tok < t`, `r < self.rows`: inside `y` (checked above).
            unsafe { self.tile(k, k4, &acts, rows, t, &out) };
        });
        Ok(())
    }

    /// Rows `rows` of `Y = X Wᵀ` for all `t` tokens, written into `out` (token-major, `t × rows`).
    ///
    /// # Safety
    /// `out` must point at `t · self.rows` floats that no other thread writes in these rows.
    unsafe fn tile(&self, k: Kernel, k4: Option<Kernel4>, acts: &QActs, rows: Range<usize>, t: usize, out: &SharedOut) {
        let n = self.rows;
        // SAFETY: the caller guarantees the index is inside `out` and these rows are ours.
        let put = |tok: usize, r: usize, v: f32| unsafe { *out.0.add(tok * n + r) = v };
        for rb in rows.clone().step_by(TILE_ROWS) {
            let re = (rb + TILE_ROWS).min(rows.end);
            for tb in (0..t).step_by(TILE_TOKENS) {
                let te = (tb + TILE_TOKENS).min(t);
                for r in rb..re {
                    let w = self.row_bytes(r);
                    let mut tok = tb;
                    if let Some(k4) = k4 {
                        while tok + TOKENS <= te {
                            let xs: [_; TOKENS] = std::array::from_fn(|j| acts.row(tok + j));
                            for (j, v) in k4(w, &xs).into_iter().enumerate() {
                                put(tok + j, r, v);
                            }
                            tok += TOKENS;
                        }
                    }
                    for tok in tok..te {
                        put(tok, r, k(w, acts.row(tok)));
                    }
                }
            }
        }
    }
}

/// The output of one GEMM, shared by its tasks; each writes only its own weight rows.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `QMatrix::tile`), and `gemm_with` outlives them.
unsafe impl Sync for SharedOut {}

/// `ys[i] = mats[i] · x` for matrices sharing one input (e.g. a layer's q, k and v
/// projections), on the best ISA: the input is quantized once per activation kind and the rows
/// of all matrices run as one parallel loop on the [`Pool`].
pub fn gemv_many(mats: &[QMatrix<'_>], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
    gemv_many_with(Isa::detect(), mats, x, ys)
}

/// [`gemv_many`] on a given ISA (scalar when `isa` is not available here): [`gemv_rows_with`]
/// of one row, so a lone decode row and a batched one run the same code.
pub fn gemv_many_with(isa: Isa, mats: &[QMatrix<'_>], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
    gemv_rows_with(isa, mats, x, 1, ys)
}

/// `ys[i] = X · mats[i]ᵀ` for `t` rows of `x` (`t × cols`) that are decode rows of different
/// sequences, on the best ISA; `ys[i]` is `t × rows`, token-major. Each output row is bit for bit
/// what [`gemv_many`] gives for that row alone (the same activation quantization and row kernel),
/// while each weight row is read once for all `t` rows, its blocks decoded once per
/// [`ROWS`](crate::dot::ROWS) rows where the type has such a kernel
/// ([`vec_dot_rows_with`](crate::dot::vec_dot_rows_with)). The rows of all matrices run as one
/// parallel loop on the [`Pool`].
pub fn gemv_rows(mats: &[QMatrix<'_>], x: &[f32], t: usize, ys: &mut [&mut [f32]]) -> Result<()> {
    gemv_rows_with(Isa::detect(), mats, x, t, ys)
}

/// [`gemv_rows`] on a given ISA (scalar when `isa` is not available here).
pub fn gemv_rows_with<'a>(isa: Isa, mats: &[QMatrix<'a>], x: &[f32], t: usize, ys: &mut [&mut [f32]]) -> Result<()> {
    check_len("ys", ys.len(), mats.len())?;
    // The repacked rows a matrix brings, where this ISA has their kernel.
    let packed = |m: &QMatrix<'a>| m.packed.and_then(|p| Some((p, p.kernel(isa)?)));
    // Per activation kind: the quantized rows, and their lanes where a matrix's kernel takes
    // them (one layout for all Q8 weight types).
    let mut acts: Vec<(&'static str, QActs, Vec<Lanes>)> = Vec::new();
    for (m, y) in mats.iter().zip(ys.iter()) {
        check_len("x", x.len(), t.saturating_mul(m.cols))?;
        check_len("y", y.len(), t.saturating_mul(m.rows))?;
        let kind = kind_for(m.ty);
        if !acts.iter().any(|(k, ..)| *k == kind) {
            acts.push((kind, QActs::quantize_with(isa, m.ty, x, t, m.cols)?, Vec::new()));
        }
    }
    if t == 0 {
        return Ok(());
    }
    for (kind, a, lanes) in &mut acts {
        if let Some(m) =
            mats.iter().find(|m| kind_for(m.ty) == *kind && packed(m).is_none() && RowsPlan::wants_lanes(m.ty, isa))
        {
            let rows: Vec<_> = (0..t).map(|tok| a.row(tok)).collect();
            *lanes = lanes_for(&rows, m.cols / m.ty.block_elems());
        }
    }
    // Per matrix: its kernels and its activation rows, prepared once for all its weight rows.
    let plans: Vec<RowsPlan<'_>> = mats
        .iter()
        .map(|m| match acts.iter().find(|(k, ..)| *k == kind_for(m.ty)) {
            Some((_, a, lanes)) => RowsPlan::new(m.ty, isa, (0..t).map(|tok| a.row(tok)).collect(), lanes),
            None => RowsPlan::new(m.ty, isa, Vec::new(), &[]),
        })
        .collect();
    // Per matrix: its repacked rows with their kernel, and its activation rows as Q8 blocks.
    let packs: Vec<_> = mats.iter().map(packed).collect();
    let q8s: Vec<Vec<&[BlockQ8]>> =
        plans.iter().zip(&packs).map(|(plan, p)| if p.is_some() { plan.q8_rows() } else { Vec::new() }).collect();
    let pool = Pool::global();
    let weights: usize = mats.iter().map(|m| m.rows * m.cols).sum::<usize>().saturating_mul(t);
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let chunk = if weights < PAR_MIN_WEIGHTS { usize::MAX } else { total.div_ceil(4 * pool.threads()).max(8) };
    // (matrix, weight rows) per task.
    let tasks: Vec<(usize, Range<usize>)> = mats
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            let mut per = chunk.min(m.rows.max(1));
            if packs[i].is_some() {
                per = per.next_multiple_of(PACK);
            }
            (0..m.rows).step_by(per).map(move |r| (i, r..(r + per).min(m.rows)))
        })
        .collect();
    let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
    let run = |k: usize| {
        let (i, ref rows) = tasks[k];
        let (m, plan) = (&mats[i], &plans[i]);
        if plan.len() != t {
            return;
        }
        if let Some((p, k)) = packs[i] {
            let mut v = vec![[0f32; PACK]; t];
            for g in rows.start / PACK..rows.end.div_ceil(PACK) {
                // SAFETY: `k` is `p`'s kernel on this machine, and every row of `q8s[i]` holds
                // `cols` values (checked above).
                unsafe { p.dot_group_with(k, g, &q8s[i], &mut v) };
                for (tok, vals) in v.iter().enumerate() {
                    for (r, &val) in (g * PACK..(g * PACK + PACK).min(m.rows)).zip(vals) {
                        // SAFETY: as below; a task's rows are whole groups (`per` is a multiple
                        // of PACK), so no other task writes them.
                        unsafe { *outs[i].0.add(tok * m.rows + r) = val };
                    }
                }
            }
            return;
        }
        let mut v = vec![0f32; t];
        for r in rows.clone() {
            plan.dot(m.row_bytes(r), &mut v);
            for (tok, &val) in v.iter().enumerate() {
                // SAFETY: tasks own disjoint weight rows of each matrix, and `tok · m.rows + r`
                // with `tok < t`, `r < m.rows` is inside `ys[i]` (checked above), which outlives
                // the loop.
                unsafe { *outs[i].0.add(tok * m.rows + r) = val };
            }
        }
    };
    if weights < PAR_MIN_WEIGHTS {
        (0..tasks.len()).for_each(run)
    } else {
        pool.run(tasks.len(), &run)
    }
    Ok(())
}
