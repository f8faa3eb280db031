//! Attention over KV rows in place: causal, GQA-aware flash prefill over pages
//! ([`flash_prefill`]) and decode attention of a query group over gathered rows
//! ([`attend_rows`], [`attend_rows_lse`]).
//!
//! Split by job and instruction set:
//! * this module: the page view ([`Pages`]), the shape checks, the prefill entry points and the
//!   dispatch of one (query tile, KV head) piece of a prefill (`Job`, which the block-sparse
//!   prefill of [`crate::sparse`] runs too);
//! * `lanes`: the `Lanes` trait, the few vector operations both vector bodies are written in,
//!   for AVX2 (`__m256`), NEON (`float32x4_t`) and plain `f32` (one lane, which tests the shared
//!   bodies on any machine);
//! * `prefill`: the vectorized prefill tile loop, once over `Lanes`;
//! * `scalar`: the plain prefill tile loop (the reference, and the path for head dims that are
//!   not a whole number of vectors);
//! * `decode`: [`attend_rows`]'s checks, its plain body, its vector body once over `Lanes`, and
//!   an AVX-512 body register-blocked for the head dims that are multiples of 64.

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::ops::Range;

use rayon::prelude::*;

use crate::{Error, Isa, Result, check_len};

mod decode;
mod lanes;
mod prefill;
mod scalar;

pub use decode::{attend_rows, attend_rows_lse, attend_rows_lse_with, attend_rows_with};

/// Query positions per tile (times the GQA group size gives the query rows sharing a key tile).
pub(crate) const TILE_Q: usize = 16;
/// Keys per tile (at most; tiles never straddle a page).
const TILE_K: usize = 64;

/// An element type of KV pages: `f32` (read in place) or `f16` (converted one key tile at a time).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `src` as f32: `src` itself for f32, else converted into `scratch`.
    fn as_f32<'b>(src: &'b [Self], scratch: &'b mut Vec<f32>) -> &'b [f32];
}

impl KvElem for f32 {
    fn as_f32<'b>(src: &'b [f32], _scratch: &'b mut Vec<f32>) -> &'b [f32] {
        src
    }
}

impl KvElem for f16 {
    fn as_f32<'b>(src: &'b [f16], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        scratch.resize(src.len(), 0.0);
        src.convert_to_f32_slice(scratch);
        scratch
    }
}

/// The keys (or values) of one KV head of one layer, as pages of `page_rows × dim` elements; the
/// last page may be partly filled (and shorter). Rows are positions `0..len`.
#[derive(Clone, Copy, Debug)]
pub struct Pages<'a, T = f32> {
    /// The pages, in position order.
    pub pages: &'a [&'a [T]],
    /// Rows per page.
    pub page_rows: usize,
    /// Rows in all.
    pub len: usize,
    /// Elements per row.
    pub dim: usize,
}

impl<T> Pages<'_, T> {
    fn check(&self, param: &'static str, dim: usize) -> Result<()> {
        let bad = |why: String| Err(Error::Invalid { param, why });
        if self.dim != dim {
            return bad(format!("dim {} differs from the first key head's {dim}", self.dim));
        }
        if self.page_rows == 0 {
            return bad("page_rows is 0".into());
        }
        let need = self.len.div_ceil(self.page_rows);
        if self.pages.len() < need {
            return bad(format!("{} pages hold fewer than len = {} rows", self.pages.len(), self.len));
        }
        for (p, page) in self.pages[..need].iter().enumerate() {
            let rows = (self.len - p * self.page_rows).min(self.page_rows);
            if page.len() < rows * dim {
                return bad(format!("page {p} has {} elements, needs {}", page.len(), rows * dim));
            }
        }
        Ok(())
    }

    /// Rows `r..r + n` (within one page) as a slice.
    fn rows(&self, r: usize, n: usize) -> &[T] {
        let (p, o) = (r / self.page_rows, r % self.page_rows);
        &self.pages[p][o * self.dim..(o + n) * self.dim]
    }
}

/// Causal attention of `t` query positions `pos0..pos0 + t` over one layer's paged KV cache.
///
/// `q` and `out` are `t × n_q_heads × dim`; `keys[g]` / `values[g]` are KV head `g`'s pages
/// (`len ≥ pos0 + t` rows each, all with the same `dim`); query head `h` reads KV head
/// `h / (n_q_heads / n_kv_heads)`. The query at position `p` sees keys `0..=p`. Scores are
/// `scale · q·k`, softmax'd online per (query tile × key tile); parallel over query tiles and KV
/// heads; each key tile is read once for the whole GQA group. Nothing of the cache is copied
/// (f16 pages are converted one key tile at a time).
pub fn flash_prefill<T: KvElem>(
    q: &[f32],
    keys: &[Pages<'_, T>],
    values: &[Pages<'_, T>],
    out: &mut [f32],
    pos0: usize,
    n_q_heads: usize,
    scale: f32,
) -> Result<()> {
    flash_prefill_with(Isa::detect(), q, keys, values, out, pos0, n_q_heads, scale)
}

/// [`flash_prefill`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn flash_prefill_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[Pages<'_, T>],
    values: &[Pages<'_, T>],
    out: &mut [f32],
    pos0: usize,
    n_q_heads: usize,
    scale: f32,
) -> Result<()> {
    let Shape { dim, n_kv, row, .. } = check_shapes(q, keys, values, out, pos0, n_q_heads)?;
    let job = Job { q, keys, values, pos0, n_q_heads, group: n_q_heads / n_kv, dim, scale };
    let isa = isa.effective();
    out.par_chunks_mut(TILE_Q * row).enumerate().for_each(|(qt, out_tile)| {
        let i0 = qt * TILE_Q;
        let nq = out_tile.len() / row;
        let all = 0..pos0 + i0 + nq;
        let spans = std::slice::from_ref(&all);
        let heads: Vec<Vec<f32>> = (0..n_kv).into_par_iter().map(|g| job.run(isa, i0, nq, g, spans)).collect();
        for (g, res) in heads.iter().enumerate() {
            job.scatter(g, res, out_tile);
        }
    });
    Ok(())
}

/// What [`check_shapes`] derives from the arguments of a prefill.
pub(crate) struct Shape {
    /// Query positions.
    pub t: usize,
    /// Head dim.
    pub dim: usize,
    /// KV heads.
    pub n_kv: usize,
    /// Floats per query position (`n_q_heads × dim`).
    pub row: usize,
}

/// The argument checks of a causal prefill over pages ([`flash_prefill_with`] and the
/// block-sparse one share them).
pub(crate) fn check_shapes<T>(
    q: &[f32],
    keys: &[Pages<'_, T>],
    values: &[Pages<'_, T>],
    out: &[f32],
    pos0: usize,
    n_q_heads: usize,
) -> Result<Shape> {
    let n_kv = keys.len();
    if n_kv == 0 {
        return Err(Error::Invalid { param: "keys", why: "no KV heads".into() });
    }
    check_len("values", values.len(), n_kv)?;
    if n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv) {
        return Err(Error::Invalid {
            param: "n_q_heads",
            why: format!("{n_q_heads} is not a positive multiple of {n_kv} KV heads"),
        });
    }
    let dim = keys[0].dim;
    if dim == 0 {
        return Err(Error::Invalid { param: "keys", why: "dim is 0".into() });
    }
    let row = n_q_heads * dim;
    if !q.len().is_multiple_of(row) {
        return Err(Error::Invalid {
            param: "q",
            why: format!("length {} is not a multiple of n_q_heads × dim = {row}", q.len()),
        });
    }
    let t = q.len() / row;
    check_len("out", out.len(), q.len())?;
    for (k, v) in keys.iter().zip(values) {
        k.check("keys", dim)?;
        v.check("values", dim)?;
        for (param, len) in [("keys", k.len), ("values", v.len)] {
            if len < pos0 + t {
                return Err(Error::Invalid { param, why: format!("len {len} < pos0 + t = {}", pos0 + t) });
            }
        }
    }
    Ok(Shape { t, dim, n_kv, row })
}

/// One prefill: the query rows (`t × n_q_heads × dim`, positions `pos0..`) and the pages; a
/// (query tile, KV head, key spans) piece of it runs with [`Job::run`].
pub(crate) struct Job<'q, 'k, 'p, T> {
    pub q: &'q [f32],
    pub keys: &'k [Pages<'p, T>],
    pub values: &'k [Pages<'p, T>],
    pub pos0: usize,
    pub n_q_heads: usize,
    pub group: usize,
    pub dim: usize,
    pub scale: f32,
}

impl<T: KvElem> Job<'_, '_, '_, T> {
    /// Writes `res` (KV head `g`'s `nq × group × dim` outputs from [`Job::run`]) into its heads'
    /// places in `out_tile` (`nq × n_q_heads × dim`).
    pub(crate) fn scatter(&self, g: usize, res: &[f32], out_tile: &mut [f32]) {
        let (dim, group, n_q_heads) = (self.dim, self.group, self.n_q_heads);
        for (i, out_row) in out_tile.chunks_exact_mut(n_q_heads * dim).enumerate() {
            let src = &res[i * group * dim..(i + 1) * group * dim];
            out_row[g * group * dim..(g + 1) * group * dim].copy_from_slice(src);
        }
    }

    /// Query positions `i0..i0 + nq`, KV head `g`, over the keys in `spans` (ascending, disjoint,
    /// each ending at most at `pos0 + i0 + nq`): `nq × group × dim` outputs. The first key of the
    /// first span must be visible to every query row (at most its position): the online softmax
    /// starts from there. Keys after a row's position are masked, as in dense prefill.
    pub(crate) fn run(&self, isa: Isa, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            if self.dim.is_multiple_of(8) {
                // SAFETY: `has_avx2()` means avx2, fma and f16c were detected on this CPU; `dim`
                // is a multiple of 8 and `flash_prefill_with` checked the shapes.
                return unsafe { prefill::avx2(self, i0, nq, g, spans) };
            }
            // SAFETY: as above.
            return unsafe { self.run_avx2(i0, nq, g, spans) };
        }
        #[cfg(target_arch = "aarch64")]
        if isa.has_neon() && self.dim.is_multiple_of(4) {
            // SAFETY: `has_neon()` means neon was detected on this CPU; `dim` is a multiple of 4
            // and `flash_prefill_with` checked the shapes.
            return unsafe { prefill::neon(self, i0, nq, g, spans) };
        }
        // (On aarch64 NEON is a baseline feature, so this generic code is compiled for it too.)
        let _ = isa;
        self.run_dims(i0, nq, g, spans)
    }
}

/// The key tiles `(first position, rows)` of `spans`: at most [`TILE_K`] rows, never straddling a
/// key or value page.
fn key_tiles(spans: &[Range<usize>], k_page: usize, v_page: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    spans.iter().flat_map(move |s| {
        let mut k0 = s.start;
        std::iter::from_fn(move || {
            (k0 < s.end).then(|| {
                let n = TILE_K.min(s.end - k0).min(k_page - k0 % k_page).min(v_page - k0 % v_page);
                k0 += n;
                (k0 - n, n)
            })
        })
    })
}

/// Inner product with eight independent lanes (vectorizes without reassociation).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `e^x` for `x ≤ 88` (softmax arguments, which are ≤ 0, and SiLU's), relative error about
/// 2e-7, branch-free so it vectorizes: `x = n·ln2 + r`, `|r| ≤ ln2/2`, degree-6 polynomial for
/// `e^r`, `2^n` from the exponent bits. Arguments below −87 give a tiny positive number instead
/// of 0, above 88 `e^88`.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Adding and subtracting 1.5·2²³ rounds to nearest even in plain arithmetic (|x·log2e| < 2²²),
    // which vectorizes where `round_ties_even` may become a library call.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `y += a · x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_approx_is_accurate_on_its_range() {
        let mut x = 88f32;
        while x > -90.0 {
            let (a, e) = (super::exp_approx(x), x.exp());
            assert!((a - e).abs() <= 4e-7 * e + 1e-37, "exp({x}): {a} vs {e}");
            x -= 0.0137;
        }
    }
}
