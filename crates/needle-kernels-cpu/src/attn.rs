//! Causal prefill flash attention, GQA-aware, reading KV pages in place.

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::ops::Range;

use rayon::prelude::*;

use crate::{Error, Isa, Result, check_len};

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
                return unsafe { x86_prefill::run(self, i0, nq, g, spans) };
            }
            // SAFETY: as above.
            return unsafe { self.run_avx2(i0, nq, g, spans) };
        }
        #[cfg(target_arch = "aarch64")]
        if isa.has_neon() && self.dim.is_multiple_of(4) {
            // SAFETY: `has_neon()` means neon was detected on this CPU; `dim` is a multiple of 4
            // and `flash_prefill_with` checked the shapes.
            return unsafe { arm_prefill::run(self, i0, nq, g, spans) };
        }
        // (On aarch64 NEON is a baseline feature, so this generic code is compiled for it too.)
        let _ = isa;
        self.run_dims(i0, nq, g, spans)
    }

    /// # Safety
    /// Needs avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        self.run_dims(i0, nq, g, spans)
    }

    /// Head dims 64 and 128 get loops of constant length; any other dim runs the general code.
    #[inline(always)]
    fn run_dims(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        match self.dim {
            64 => self.body::<64>(i0, nq, g, spans),
            128 => self.body::<128>(i0, nq, g, spans),
            _ => self.body::<0>(i0, nq, g, spans),
        }
    }

    /// `D` is the head dim, or 0 for "read it from `self.dim`".
    #[inline(always)]
    fn body<const D: usize>(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        let dim = if D == 0 { self.dim } else { D };
        let group = self.group;
        let nrows = nq * group;
        let mut m = vec![f32::NEG_INFINITY; nrows];
        let mut l = vec![0f32; nrows];
        let mut acc = vec![0f32; nrows * dim];
        // The key tile transposed (dim × TILE_K): scores of a query row against the whole tile
        // are then plain vector FMAs, no horizontal sums.
        let mut kt = vec![0f32; dim * TILE_K];
        let mut s = [0f32; TILE_K];
        let (kp, vp) = (&self.keys[g], &self.values[g]);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k0, n) in key_tiles(spans, kp.page_rows, vp.page_rows) {
            let ktile = T::as_f32(kp.rows(k0, n), &mut ks);
            let vt = T::as_f32(vp.rows(k0, n), &mut vs);
            for (j, kr) in ktile.chunks_exact(dim).enumerate() {
                for (d, v) in kr.iter().enumerate() {
                    kt[d * TILE_K + j] = *v;
                }
            }
            for i in 0..nq {
                let pos = self.pos0 + i0 + i;
                if k0 > pos {
                    continue;
                }
                let nv = n.min(pos + 1 - k0);
                for j in 0..group {
                    let h = g * group + j;
                    let qr = &self.q[((i0 + i) * self.n_q_heads + h) * dim..][..dim];
                    let r = i * group + j;
                    s.fill(0.0);
                    for (qd, ktd) in qr.iter().zip(kt.chunks_exact(TILE_K)) {
                        let qd = qd * self.scale;
                        for (sv, kv) in s.iter_mut().zip(ktd) {
                            *sv += qd * kv;
                        }
                    }
                    let mt = s[..nv].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let ar = &mut acc[r * dim..(r + 1) * dim];
                    if mt > m[r] {
                        let c = (m[r] - mt).exp();
                        l[r] *= c;
                        ar.iter_mut().for_each(|a| *a *= c);
                        m[r] = mt;
                    }
                    let mr = m[r];
                    for sv in s.iter_mut() {
                        *sv = exp_approx(*sv - mr);
                    }
                    l[r] += s[..nv].iter().sum::<f32>();
                    for (p, vr) in s[..nv].iter().zip(vt.chunks_exact(dim)) {
                        axpy(*p, vr, ar);
                    }
                }
            }
        }
        for (ar, &lr) in acc.chunks_exact_mut(dim).zip(&l) {
            let inv = 1.0 / lr;
            ar.iter_mut().for_each(|a| *a *= inv);
        }
        acc
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

/// AVX2 prefill for head dims that are a multiple of 8. A (query tile, KV head) job keeps its
/// query rows as vector lanes: `Qᵀ` (dim × rows, scaled) is built once, scores are `Sᵀ` (keys ×
/// rows) so the online softmax is plain vertical max/exp/sum over eight rows at a time, and key
/// and value rows are read in place (broadcast keys, loaded values). Both products are register
/// blocked: 6 keys × 16 rows for `Sᵀ = K·Qᵀ`, 6 rows × 16 dims for `O += P·V`.
#[cfg(target_arch = "x86_64")]
mod x86_prefill {
    use std::any::TypeId;
    use std::arch::x86_64::*;

    use half::f16;
    use half::slice::HalfFloatSliceExt;

    use super::x86::exp8;
    use super::{Job, KvElem, Range, TILE_K, key_tiles};

    /// Keys (of `Sᵀ`) resp. query rows (of `O`) per register block.
    const R: usize = 6;

    /// [`Job::run`] for `dim` a multiple of 8.
    ///
    /// # Safety
    /// Needs avx2, fma and f16c; `job.dim` is a multiple of 8 and the shapes checked by
    /// `flash_prefill_with` hold (query rows `i0..i0 + nq` exist, KV head `g` has `len ≥ pos0 +
    /// i0 + nq` rows in pages of `dim`-element rows).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run<T: KvElem>(
        job: &Job<'_, '_, '_, T>,
        i0: usize,
        nq: usize,
        g: usize,
        spans: &[Range<usize>],
    ) -> Vec<f32> {
        let (dim, group) = (job.dim, job.group);
        let rows = nq * group;
        // Rows padded to whole vectors; padding rows have zero queries and see every key, so
        // they stay finite and are dropped at the end.
        let rp = rows.next_multiple_of(8);
        let mut qt_buf = Vec::new();
        let qt = aligned(&mut qt_buf, dim * rp);
        let sv = _mm256_set1_ps(job.scale);
        for r0 in (0..rp).step_by(8) {
            let src: [Option<&[f32]>; 8] = std::array::from_fn(|u| {
                let r = r0 + u;
                let h = g * group + r % group;
                (r < rows).then(|| &job.q[((i0 + r / group) * job.n_q_heads + h) * dim..][..dim])
            });
            for d0 in (0..dim).step_by(8) {
                // SAFETY: each row has `dim` elements, `d0 + 8 ≤ dim`; column `d0 + k` of the
                // block lands in `qt[(d0 + k)·rp + r0..][..8]`, inside `dim × rp`.
                unsafe {
                    let blk = std::array::from_fn(|u| {
                        src[u].map_or(_mm256_setzero_ps(), |qr| _mm256_mul_ps(sv, _mm256_loadu_ps(qr.as_ptr().add(d0))))
                    });
                    for (k, col) in transpose8(blk).into_iter().enumerate() {
                        _mm256_storeu_ps(qt.as_mut_ptr().add((d0 + k) * rp + r0), col);
                    }
                }
            }
        }
        // Row `r` sees keys at positions `< pos1[r]`.
        let pos1: Vec<usize> =
            (0..rp).map(|r| if r < rows { job.pos0 + i0 + r / group + 1 } else { usize::MAX }).collect();
        let mut lim = vec![0i32; rp];
        let mut st_buf = Vec::new();
        let st = aligned(&mut st_buf, TILE_K * rp);
        let mut o = vec![0f32; rows * dim];
        let mut m = vec![f32::NEG_INFINITY; rp];
        let mut l = vec![0f32; rp];
        let mut c = vec![0f32; rp];
        let (kp, vp) = (&job.keys[g], &job.values[g]);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k0, n) in key_tiles(spans, kp.page_rows, vp.page_rows) {
            // SAFETY: f16c is enabled in this fn.
            let (kt, vt) = unsafe { (tile_f32(kp.rows(k0, n), &mut ks), tile_f32(vp.rows(k0, n), &mut vs)) };
            for (lr, p) in lim.iter_mut().zip(&pos1) {
                // At most TILE_K + 1, so it fits an i32.
                *lr = p.saturating_sub(k0).min(TILE_K + 1) as i32;
            }
            // SAFETY: `kt` and `vt` hold `n` rows of `dim`; `qt` is `dim × rp`, `st` `TILE_K × rp`
            // with `n ≤ TILE_K`, `o` is `rows × dim`, `lim`, `m`, `l`, `c` have `rp` entries; the
            // features are this fn's.
            unsafe {
                scores(qt, kt, st, n, rp, dim);
                softmax(st, &lim, &mut m, &mut l, &mut c, n, rp);
                accumulate(st, vt, &mut o, &c, n, rp, rows, dim);
            }
        }
        for (orow, lr) in o.chunks_exact_mut(dim).zip(&l) {
            let inv = 1.0 / lr;
            orow.iter_mut().for_each(|x| *x *= inv);
        }
        o
    }

    /// `src` as f32 ([`KvElem::as_f32`], with F16C for f16 pages).
    ///
    /// # Safety
    /// Needs avx and f16c.
    #[inline(always)]
    unsafe fn tile_f32<'b, T: KvElem>(src: &'b [T], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        if TypeId::of::<T>() != TypeId::of::<f16>() {
            return T::as_f32(src, scratch);
        }
        // SAFETY: `T` is `f16` (equal type ids), so the slice is reinterpreted as itself.
        let src = unsafe { &*(src as *const [T] as *const [f16]) };
        scratch.resize(src.len(), 0.0);
        let (mut ch, out) = (src.chunks_exact(8), scratch.chunks_exact_mut(8));
        for (h, o) in (&mut ch).zip(out) {
            // SAFETY: 8 halves in, 8 floats out; f16c per this fn's contract.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))) };
        }
        let done = src.len() - ch.remainder().len();
        ch.remainder().convert_to_f32_slice(&mut scratch[done..]);
        scratch
    }

    /// A zeroed `n`-float slice of `buf` starting on a 64-byte boundary (whole vectors of it
    /// then never straddle cache lines).
    fn aligned(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
        buf.clear();
        buf.resize(n + 15, 0.0);
        let off = buf.as_ptr().align_offset(64).min(15);
        &mut buf[off..off + n]
    }

    /// The 8×8 transpose: lane `u` of output `k` is lane `k` of input `u`.
    #[inline(always)]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: only called from `run` (avx enabled there).
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    /// `Sᵀ[j][r] = Σ_d K[j][d] · Qᵀ[d][r]` for keys `j < n`, all `rp` rows.
    ///
    /// # Safety
    /// Needs avx2 and fma; `k` has `n` rows of `dim`, `qt` is `dim × rp`, `st` has `n × rp`
    /// entries, `rp` is a multiple of 8.
    #[inline(always)]
    unsafe fn scores(qt: &[f32], k: &[f32], st: &mut [f32], n: usize, rp: usize, dim: usize) {
        debug_assert!(k.len() >= n * dim && qt.len() >= dim * rp && st.len() >= n * rp && rp.is_multiple_of(8));
        let (qt, k, st) = (qt.as_ptr(), k.as_ptr(), st.as_mut_ptr());
        let mut r0 = 0;
        // SAFETY (the block): every block reads keys `j0..j0 + KR ≤ n` and rows `r0..r0 + 8·C ≤ rp`.
        unsafe {
            while r0 + 16 <= rp {
                score_keys::<2>(qt, k, st, n, rp, dim, r0);
                r0 += 16;
            }
            if r0 < rp {
                score_keys::<1>(qt, k, st, n, rp, dim, r0);
            }
        }
    }

    /// [`scores`] for rows `r0..r0 + 8·C`.
    ///
    /// # Safety
    /// As [`scores`], with `r0 + 8·C ≤ rp`.
    #[inline(always)]
    unsafe fn score_keys<const C: usize>(
        qt: *const f32,
        k: *const f32,
        st: *mut f32,
        n: usize,
        rp: usize,
        dim: usize,
        r0: usize,
    ) {
        let mut j0 = 0;
        // SAFETY (the block): as in `scores`, `j0 + KR ≤ n` for each call.
        unsafe {
            while j0 + R <= n {
                score_block::<R, C>(qt, k, st, rp, dim, r0, j0);
                j0 += R;
            }
            match n - j0 {
                1 => score_block::<1, C>(qt, k, st, rp, dim, r0, j0),
                2 => score_block::<2, C>(qt, k, st, rp, dim, r0, j0),
                3 => score_block::<3, C>(qt, k, st, rp, dim, r0, j0),
                4 => score_block::<4, C>(qt, k, st, rp, dim, r0, j0),
                5 => score_block::<5, C>(qt, k, st, rp, dim, r0, j0),
                _ => {}
            }
        }
    }

    /// Scores of keys `j0..j0 + KR` against rows `r0..r0 + 8·C`: `KR·C` accumulators, each key
    /// element broadcast once per `C` FMAs and each query vector loaded once per `KR` FMAs.
    ///
    /// # Safety
    /// As [`scores`], with `j0 + KR ≤ n` and `r0 + 8·C ≤ rp`.
    #[inline(always)]
    unsafe fn score_block<const KR: usize, const C: usize>(
        qt: *const f32,
        k: *const f32,
        st: *mut f32,
        rp: usize,
        dim: usize,
        r0: usize,
        j0: usize,
    ) {
        // SAFETY (the block): the caller keeps keys and rows in range (see `scores`).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; KR];
            for d in 0..dim {
                let q: [__m256; C] = std::array::from_fn(|v| _mm256_loadu_ps(qt.add(d * rp + r0 + 8 * v)));
                for (u, a) in acc.iter_mut().enumerate() {
                    let kb = _mm256_broadcast_ss(&*k.add((j0 + u) * dim + d));
                    for (av, qv) in a.iter_mut().zip(q) {
                        *av = _mm256_fmadd_ps(kb, qv, *av);
                    }
                }
            }
            for (u, a) in acc.iter().enumerate() {
                for (v, av) in a.iter().enumerate() {
                    _mm256_storeu_ps(st.add((j0 + u) * rp + r0 + 8 * v), *av);
                }
            }
        }
    }

    /// Online softmax step over `Sᵀ` (`n × rp`), eight rows per vector: updates the running max
    /// `m` and sum `l`, sets `c` to the factor the old accumulators are scaled by, and turns `Sᵀ`
    /// into `Pᵀ` with keys `j ≥ lim[r]` zeroed.
    ///
    /// # Safety
    /// Needs avx2 and fma; `st` has `n × rp` entries, `lim`, `m`, `l`, `c` have `rp`, `rp` is a
    /// multiple of 8, every row has `lim ≥ 1` on the first tile.
    #[inline(always)]
    unsafe fn softmax(st: &mut [f32], lim: &[i32], m: &mut [f32], l: &mut [f32], c: &mut [f32], n: usize, rp: usize) {
        debug_assert!(st.len() >= n * rp && lim.len() >= rp && m.len() >= rp && l.len() >= rp && c.len() >= rp);
        let st = st.as_mut_ptr();
        for r0 in (0..rp).step_by(8) {
            // SAFETY: `r0 + 8 ≤ rp`; the rest as this fn's contract.
            unsafe {
                if lim[r0..r0 + 8].iter().all(|&x| x as usize >= n) {
                    softmax_rows::<false>(st, lim, m, l, c, n, rp, r0);
                } else {
                    softmax_rows::<true>(st, lim, m, l, c, n, rp, r0);
                }
            }
        }
    }

    /// [`softmax`] for rows `r0..r0 + 8`; `MASK` false when they all see every key of the tile.
    ///
    /// # Safety
    /// As [`softmax`], with `r0 + 8 ≤ rp`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn softmax_rows<const MASK: bool>(
        st: *mut f32,
        lim: &[i32],
        m: &mut [f32],
        l: &mut [f32],
        c: &mut [f32],
        n: usize,
        rp: usize,
        r0: usize,
    ) {
        // SAFETY (the block): `r0 + 8 ≤ rp` and `j < n` for every access (see `softmax`).
        unsafe {
            let lv = _mm256_loadu_si256(lim.as_ptr().add(r0).cast());
            let keep = |j: usize| _mm256_castsi256_ps(_mm256_cmpgt_epi32(lv, _mm256_set1_epi32(j as i32)));
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut mt = ninf;
            for j in 0..n {
                let s = _mm256_loadu_ps(st.add(j * rp + r0));
                mt = _mm256_max_ps(mt, if MASK { _mm256_blendv_ps(ninf, s, keep(j)) } else { s });
            }
            let mo = _mm256_loadu_ps(m.as_ptr().add(r0));
            let mn = _mm256_max_ps(mo, mt);
            // `mo` is −∞ before the first tile: exp8 clamps that to a tiny factor of zeros.
            let cv = exp8(_mm256_sub_ps(mo, mn));
            let mut sum = _mm256_setzero_ps();
            for j in 0..n {
                let p = st.add(j * rp + r0);
                let mut e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mn));
                if MASK {
                    e = _mm256_and_ps(e, keep(j));
                }
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            let lv = _mm256_fmadd_ps(_mm256_loadu_ps(l.as_ptr().add(r0)), cv, sum);
            _mm256_storeu_ps(l.as_mut_ptr().add(r0), lv);
            _mm256_storeu_ps(m.as_mut_ptr().add(r0), mn);
            _mm256_storeu_ps(c.as_mut_ptr().add(r0), cv);
        }
    }

    /// `O[r] = c[r]·O[r] + Σ_j Pᵀ[j][r] · V[j]` for rows `r < rows`.
    ///
    /// # Safety
    /// Needs avx2 and fma; `v` has `n` rows of `dim` (a multiple of 8), `pt` `n × rp` entries,
    /// `o` `rows × dim`, `c` `rows`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate(
        pt: &[f32],
        v: &[f32],
        o: &mut [f32],
        c: &[f32],
        n: usize,
        rp: usize,
        rows: usize,
        dim: usize,
    ) {
        debug_assert!(v.len() >= n * dim && pt.len() >= n * rp && o.len() >= rows * dim && c.len() >= rows);
        let (pt, v, o, c) = (pt.as_ptr(), v.as_ptr(), o.as_mut_ptr(), c.as_ptr());
        let mut d0 = 0;
        // SAFETY (the block): every block touches rows `r0..r0 + RR ≤ rows` and dims
        // `d0..d0 + 8·C ≤ dim`.
        unsafe {
            while d0 + 16 <= dim {
                accumulate_rows::<2>(pt, v, o, c, n, rp, rows, dim, d0);
                d0 += 16;
            }
            if d0 < dim {
                accumulate_rows::<1>(pt, v, o, c, n, rp, rows, dim, d0);
            }
        }
    }

    /// [`accumulate`] for dims `d0..d0 + 8·C`.
    ///
    /// # Safety
    /// As [`accumulate`], with `d0 + 8·C ≤ dim`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate_rows<const C: usize>(
        pt: *const f32,
        v: *const f32,
        o: *mut f32,
        c: *const f32,
        n: usize,
        rp: usize,
        rows: usize,
        dim: usize,
        d0: usize,
    ) {
        let mut r0 = 0;
        // SAFETY (the block): as in `accumulate`, `r0 + RR ≤ rows` for each call.
        unsafe {
            while r0 + R <= rows {
                accumulate_block::<R, C>(pt, v, o, c, n, rp, dim, r0, d0);
                r0 += R;
            }
            match rows - r0 {
                1 => accumulate_block::<1, C>(pt, v, o, c, n, rp, dim, r0, d0),
                2 => accumulate_block::<2, C>(pt, v, o, c, n, rp, dim, r0, d0),
                3 => accumulate_block::<3, C>(pt, v, o, c, n, rp, dim, r0, d0),
                4 => accumulate_block::<4, C>(pt, v, o, c, n, rp, dim, r0, d0),
                5 => accumulate_block::<5, C>(pt, v, o, c, n, rp, dim, r0, d0),
                _ => {}
            }
        }
    }

    /// Rows `r0..r0 + RR` × dims `d0..d0 + 8·C` of `O`, held in `RR·C` registers over all `n`
    /// keys: each value vector is loaded once per `RR` FMAs, each probability broadcast once per
    /// `C`.
    ///
    /// # Safety
    /// As [`accumulate`], with `r0 + RR ≤ rows` and `d0 + 8·C ≤ dim`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate_block<const RR: usize, const C: usize>(
        pt: *const f32,
        v: *const f32,
        o: *mut f32,
        c: *const f32,
        n: usize,
        rp: usize,
        dim: usize,
        r0: usize,
        d0: usize,
    ) {
        // SAFETY (the block): the caller keeps rows, dims and keys in range (see `accumulate`).
        unsafe {
            let mut acc: [[__m256; C]; RR] = std::array::from_fn(|u| {
                let cu = _mm256_broadcast_ss(&*c.add(r0 + u));
                std::array::from_fn(|w| _mm256_mul_ps(cu, _mm256_loadu_ps(o.add((r0 + u) * dim + d0 + 8 * w))))
            });
            for j in 0..n {
                let vv: [__m256; C] = std::array::from_fn(|w| _mm256_loadu_ps(v.add(j * dim + d0 + 8 * w)));
                for (u, a) in acc.iter_mut().enumerate() {
                    let p = _mm256_broadcast_ss(&*pt.add(j * rp + r0 + u));
                    for (aw, x) in a.iter_mut().zip(vv) {
                        *aw = _mm256_fmadd_ps(p, x, *aw);
                    }
                }
            }
            for (u, a) in acc.iter().enumerate() {
                for (w, aw) in a.iter().enumerate() {
                    _mm256_storeu_ps(o.add((r0 + u) * dim + d0 + 8 * w), *aw);
                }
            }
        }
    }
}

/// Decode attention of `g` query heads sharing one KV head over gathered rows: `q` is `g × dim`
/// (row-major), `keys[j]` / `values[j]` are the rows attended (any positions, each `dim`
/// elements), `bias[j]` (when given) is added to row `j`'s scores after scaling (log-weights of a
/// sampled selection). `out` (`g × dim`) receives `softmax(scale · q·kᵀ + bias) · V` per head;
/// with no rows it is zero. `scores` is reusable scratch. Each key and value row is read once for
/// the whole group; the softmax is two-pass (exact max, then exponentials).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows<T: KvElem>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<()> {
    attend_rows_with(Isa::detect(), q, keys, values, bias, scale, scores, out)
}

/// [`attend_rows`] that also writes each query head's log-sum-exp of its scaled, biased scores
/// (natural log; `-inf` and a zero output when there are no rows) into `lse` (`g` entries), so
/// partial attentions over disjoint row sets can be merged exactly.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_lse<T: KvElem>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    attend_rows_lse_with(Isa::detect(), q, keys, values, bias, scale, scores, out, lse)
}

/// [`attend_rows_lse`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_lse_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    // With no rows there is no `dim` to derive `g` from: `lse` must still split `q` evenly.
    if keys.is_empty() && !q.is_empty() && (lse.is_empty() || !q.len().is_multiple_of(lse.len())) {
        return Err(Error::Invalid {
            param: "lse",
            why: format!("length {} does not divide the query length {}", lse.len(), q.len()),
        });
    }
    attend(isa, q, keys, values, bias, scale, scores, out, Some(lse))
}

/// [`attend_rows`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<()> {
    attend(isa, q, keys, values, bias, scale, scores, out, None)
}

/// The checks and dispatch of [`attend_rows_with`] and [`attend_rows_lse_with`] (`lse` given:
/// one entry per head, checked here once `dim` is known).
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_len("out", out.len(), q.len())?;
    check_len("values", values.len(), keys.len())?;
    if let Some(b) = bias {
        check_len("bias", b.len(), keys.len())?;
    }
    out.fill(0.0);
    let Some(dim) = keys.first().map(|k| k.len()) else {
        if let Some(l) = lse {
            l.fill(f32::NEG_INFINITY);
        }
        return Ok(());
    };
    if dim == 0 || !q.len().is_multiple_of(dim) {
        return Err(Error::Invalid { param: "q", why: format!("length {} is not a multiple of dim {dim}", q.len()) });
    }
    if let Some(r) = keys.iter().chain(values).find(|r| r.len() != dim) {
        return Err(Error::Invalid {
            param: "keys/values",
            why: format!("a row has {} elements, expected {dim}", r.len()),
        });
    }
    if let Some(l) = lse.as_deref() {
        check_len("lse", l.len(), q.len() / dim)?;
    }
    let rows = Rows { q, keys, values, bias, scale, dim };
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2()` means avx2 and fma were detected on this CPU.
        unsafe { rows.run_avx2(scores, out, lse) };
        return Ok(());
    }
    #[cfg(target_arch = "aarch64")]
    if isa.has_neon() {
        // SAFETY: `has_neon()` means neon was detected on this CPU.
        unsafe { rows.run_neon(scores, out, lse) };
        return Ok(());
    }
    let _ = isa;
    rows.run_dims(scores, out, lse);
    Ok(())
}

struct Rows<'a, T> {
    q: &'a [f32],
    keys: &'a [&'a [T]],
    values: &'a [&'a [T]],
    bias: Option<&'a [f32]>,
    scale: f32,
    dim: usize,
}

impl<T: KvElem> Rows<'_, T> {
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        use std::any::TypeId;
        if self.dim.is_multiple_of(8) {
            let (k, v) = (self.keys as *const [&[T]], self.values as *const [&[T]]);
            // SAFETY (both casts): `T` is exactly the type cast to (equal type ids), so the slices
            // are reinterpreted as themselves; the features are those of this fn.
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                let (k, v) = unsafe { (&*(k as *const [&[f32]]), &*(v as *const [&[f32]])) };
                return unsafe { x86::attend_rows(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
            if TypeId::of::<T>() == TypeId::of::<f16>() {
                let (k, v) = unsafe { (&*(k as *const [&[f16]]), &*(v as *const [&[f16]])) };
                return unsafe { x86::attend_rows(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
        }
        self.run_dims(scores, out, lse)
    }

    /// # Safety
    /// Needs neon.
    #[cfg(target_arch = "aarch64")]
    unsafe fn run_neon(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        use std::any::TypeId;
        if self.dim.is_multiple_of(4) {
            let (k, v) = (self.keys as *const [&[T]], self.values as *const [&[T]]);
            // SAFETY (both casts): `T` is exactly the type cast to (equal type ids), so the slices
            // are reinterpreted as themselves; neon per this fn's contract.
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                let (k, v) = unsafe { (&*(k as *const [&[f32]]), &*(v as *const [&[f32]])) };
                return unsafe { arm::attend_rows(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
            if TypeId::of::<T>() == TypeId::of::<f16>() {
                let (k, v) = unsafe { (&*(k as *const [&[f16]]), &*(v as *const [&[f16]])) };
                return unsafe { arm::attend_rows(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
        }
        self.run_dims(scores, out, lse)
    }

    #[inline(always)]
    fn run_dims(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        match self.dim {
            64 => self.body::<64>(scores, out, lse),
            128 => self.body::<128>(scores, out, lse),
            _ => self.body::<0>(scores, out, lse),
        }
    }

    /// `D` is the head dim, or 0 for "read it from `self.dim`".
    #[inline(always)]
    fn body<const D: usize>(&self, scores: &mut Vec<f32>, out: &mut [f32], mut lse: Option<&mut [f32]>) {
        let dim = if D == 0 { self.dim } else { D };
        let (m, g) = (self.keys.len(), self.q.len() / dim);
        // Head-major scores (`g × m`), so the softmax runs over contiguous rows.
        scores.clear();
        scores.resize(g * m, 0.0);
        let mut conv = Vec::new();
        for (j, k) in self.keys.iter().enumerate() {
            let k = T::as_f32(k, &mut conv);
            let b = self.bias.map_or(0.0, |b| b[j]);
            for h in 0..g {
                scores[h * m + j] = dot8(&self.q[h * dim..(h + 1) * dim], &k[..dim]) * self.scale + b;
            }
        }
        for (h, s) in scores.chunks_exact_mut(m).enumerate() {
            let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            s.iter_mut().for_each(|x| *x = exp_approx(*x - mx));
            let sum = s.iter().sum::<f32>();
            let inv = 1.0 / sum;
            s.iter_mut().for_each(|x| *x *= inv);
            if let Some(l) = lse.as_deref_mut() {
                l[h] = mx + sum.ln();
            }
        }
        for (j, v) in self.values.iter().enumerate() {
            let v = T::as_f32(v, &mut conv);
            for h in 0..g {
                axpy(scores[h * m + j], &v[..dim], &mut out[h * dim..(h + 1) * dim]);
            }
        }
    }
}

/// AVX2 decode attention over gathered rows (head dims that are a multiple of 8).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Eight row elements as f32.
    pub(super) trait Load8: Copy {
        /// # Safety
        /// `p` must have 8 readable elements; needs avx2 and f16c.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable halves (16 bytes) and f16c.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    /// [`super::attend_rows`] after its checks: every row has `dim` elements, `dim` a multiple of
    /// 8, `q` and `out` are `g × dim` (`out` zeroed), `bias` has one entry per row.
    ///
    /// # Safety
    /// Needs avx2, fma and f16c; the shapes above hold.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_rows<T: Load8>(
        q: &[f32],
        keys: &[&[T]],
        values: &[&[T]],
        bias: Option<&[f32]>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        mut lse: Option<&mut [f32]>,
    ) {
        let m = keys.len();
        let dim = keys[0].len();
        let (g, c8) = (q.len() / dim, dim / 8);
        scores.clear();
        scores.resize(g * m, 0.0);
        let sv = _mm256_set1_ps(scale);
        // Eight keys at a time for every head (the 8 rows stay in L1 across heads): eight
        // accumulators, then one transpose-sum into 8 scores.
        let mut j = 0;
        while j + 8 <= m {
            for h in 0..g {
                let qh = &q[h * dim..(h + 1) * dim];
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in 0..c8 {
                    // SAFETY: rows and `qh` have `dim` = 8·c8 elements.
                    let qv = unsafe { _mm256_loadu_ps(qh.as_ptr().add(8 * c)) };
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, unsafe { T::load8(keys[j + u].as_ptr().add(8 * c)) }, *a);
                    }
                }
                let mut s = _mm256_mul_ps(sum8(acc), sv);
                if let Some(b) = bias {
                    // SAFETY: `b` has `m ≥ j + 8` entries.
                    s = _mm256_add_ps(s, unsafe { _mm256_loadu_ps(b.as_ptr().add(j)) });
                }
                // SAFETY: row `h` of `scores` has `m ≥ j + 8` entries.
                unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(h * m + j), s) };
            }
            j += 8;
        }
        for jj in j..m {
            for h in 0..g {
                let qh = &q[h * dim..(h + 1) * dim];
                let mut a = _mm256_setzero_ps();
                for c in 0..c8 {
                    // SAFETY: as above.
                    let (qv, kv) =
                        unsafe { (_mm256_loadu_ps(qh.as_ptr().add(8 * c)), T::load8(keys[jj].as_ptr().add(8 * c))) };
                    a = _mm256_fmadd_ps(qv, kv, a);
                }
                scores[h * m + jj] = hsum(a) * scale + bias.map_or(0.0, |b| b[jj]);
            }
        }
        for (h, srow) in scores.chunks_exact_mut(m).enumerate() {
            let (mx, sum) = softmax(srow);
            if let Some(l) = lse.as_deref_mut() {
                l[h] = mx + sum.ln();
            }
        }
        // One pass over the value rows: each row is added into every head's output (in L1,
        // zeroed by the caller); the dim/8 chunks of a row are independent FMAs.
        for (j, v) in values.iter().enumerate() {
            for h in 0..g {
                let p = _mm256_set1_ps(scores[h * m + j]);
                let o = out[h * dim..(h + 1) * dim].as_mut_ptr();
                for c in 0..c8 {
                    // SAFETY: value rows and each head's output have `dim` elements.
                    unsafe {
                        let acc = _mm256_fmadd_ps(p, T::load8(v.as_ptr().add(8 * c)), _mm256_loadu_ps(o.add(8 * c)));
                        _mm256_storeu_ps(o.add(8 * c), acc);
                    }
                }
            }
        }
    }

    /// The eight horizontal sums of `a[0..8]`, in order.
    #[inline(always)]
    fn sum8(a: [__m256; 8]) -> __m256 {
        // SAFETY: only called inside `attend_rows` (avx2 enabled there).
        unsafe {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))
        }
    }

    #[inline(always)]
    fn hsum(a: __m256) -> f32 {
        let mut l = [0f32; 8];
        // SAFETY: `l` holds 8 floats; avx as above.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    }

    /// In-place softmax of `s` with [`super::exp_approx`] eight lanes at a time; returns the max
    /// and the sum of the exponentials (for the log-sum-exp).
    #[inline(always)]
    fn softmax(s: &mut [f32]) -> (f32, f32) {
        let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let (mut sum, mut i) = (0f32, 0);
        // SAFETY (the block): `i + 8 ≤ s.len()` for every access; avx2 and fma as above.
        unsafe {
            let (mv, mut acc) = (_mm256_set1_ps(mx), _mm256_setzero_ps());
            while i + 8 <= s.len() {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(i)), mv));
                _mm256_storeu_ps(s.as_mut_ptr().add(i), e);
                acc = _mm256_add_ps(acc, e);
                i += 8;
            }
            sum += hsum(acc);
        }
        for x in &mut s[i..] {
            *x = super::exp_approx(*x - mx);
            sum += *x;
        }
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
        (mx, sum)
    }

    /// [`super::exp_approx`] on eight lanes.
    #[inline(always)]
    pub(super) fn exp8(x: __m256) -> __m256 {
        // SAFETY: only called (inlined) from fns with avx2 and fma enabled.
        unsafe {
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_setzero_ps());
            let round = _mm256_set1_ps(12_582_912.0);
            let n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round), round);
            let r =
                _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x));
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
            let pow = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            ));
            _mm256_mul_ps(e, pow)
        }
    }
}

/// NEON decode attention over gathered rows (head dims that are a multiple of 4).
#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use half::f16;

    use crate::neon::{exp4, f16x4_to_f32};

    /// Four row elements as f32.
    pub(super) trait Load4: Copy {
        /// # Safety
        /// `p` must have 4 readable elements; needs neon.
        unsafe fn load4(p: *const Self) -> float32x4_t;
    }

    impl Load4 for f32 {
        #[inline(always)]
        unsafe fn load4(p: *const f32) -> float32x4_t {
            // SAFETY: the caller guarantees 4 readable floats and neon.
            unsafe { vld1q_f32(p) }
        }
    }

    impl Load4 for f16 {
        #[inline(always)]
        unsafe fn load4(p: *const f16) -> float32x4_t {
            // SAFETY: the caller guarantees 4 readable halves (an `f16` is its `u16` bits) and neon.
            unsafe { f16x4_to_f32(vld1_u16(p.cast())) }
        }
    }

    /// [`super::attend_rows`] after its checks: every row has `dim` elements, `dim` a multiple of
    /// 4, `q` and `out` are `g × dim` (`out` zeroed), `bias` has one entry per row.
    ///
    /// # Safety
    /// Needs neon; the shapes above hold.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn attend_rows<T: Load4>(
        q: &[f32],
        keys: &[&[T]],
        values: &[&[T]],
        bias: Option<&[f32]>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        mut lse: Option<&mut [f32]>,
    ) {
        let m = keys.len();
        let dim = keys[0].len();
        let (g, c4) = (q.len() / dim, dim / 4);
        scores.clear();
        scores.resize(g * m, 0.0);
        // Eight keys at a time for every head (the 8 rows stay in L1 across heads): eight
        // accumulators, then pairwise adds into 8 scores.
        let mut j = 0;
        while j + 8 <= m {
            for h in 0..g {
                let qh = &q[h * dim..(h + 1) * dim];
                let mut acc = [vdupq_n_f32(0.0); 8];
                for c in 0..c4 {
                    // SAFETY: rows and `qh` have `dim` = 4·c4 elements.
                    let qv = unsafe { vld1q_f32(qh.as_ptr().add(4 * c)) };
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = vfmaq_f32(*a, qv, unsafe { T::load4(keys[j + u].as_ptr().add(4 * c)) });
                    }
                }
                let s = [sum4(&acc[..4]), sum4(&acc[4..])];
                for (k, sv) in s.into_iter().enumerate() {
                    let mut sv = vmulq_n_f32(sv, scale);
                    if let Some(b) = bias {
                        // SAFETY: `b` has `m ≥ j + 8` entries.
                        sv = vaddq_f32(sv, unsafe { vld1q_f32(b.as_ptr().add(j + 4 * k)) });
                    }
                    // SAFETY: row `h` of `scores` has `m ≥ j + 8` entries.
                    unsafe { vst1q_f32(scores.as_mut_ptr().add(h * m + j + 4 * k), sv) };
                }
            }
            j += 8;
        }
        for jj in j..m {
            for h in 0..g {
                let qh = &q[h * dim..(h + 1) * dim];
                let mut a = vdupq_n_f32(0.0);
                for c in 0..c4 {
                    // SAFETY: as above.
                    let (qv, kv) =
                        unsafe { (vld1q_f32(qh.as_ptr().add(4 * c)), T::load4(keys[jj].as_ptr().add(4 * c))) };
                    a = vfmaq_f32(a, qv, kv);
                }
                scores[h * m + jj] = vaddvq_f32(a) * scale + bias.map_or(0.0, |b| b[jj]);
            }
        }
        for (h, srow) in scores.chunks_exact_mut(m).enumerate() {
            let (mx, sum) = softmax(srow);
            if let Some(l) = lse.as_deref_mut() {
                l[h] = mx + sum.ln();
            }
        }
        // One pass over the value rows: each row is added into every head's output (in L1,
        // zeroed by the caller); the dim/4 chunks of a row are independent FMAs.
        for (j, v) in values.iter().enumerate() {
            for h in 0..g {
                let p = scores[h * m + j];
                let o = out[h * dim..(h + 1) * dim].as_mut_ptr();
                for c in 0..c4 {
                    // SAFETY: value rows and each head's output have `dim` elements.
                    unsafe {
                        let acc = vfmaq_n_f32(vld1q_f32(o.add(4 * c)), T::load4(v.as_ptr().add(4 * c)), p);
                        vst1q_f32(o.add(4 * c), acc);
                    }
                }
            }
        }
    }

    /// The four horizontal sums of `a[0..4]`, in order.
    #[inline]
    #[target_feature(enable = "neon")]
    fn sum4(a: &[float32x4_t]) -> float32x4_t {
        vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]))
    }

    /// In-place softmax of `s` with [`exp4`] four lanes at a time; returns the max and the sum
    /// of the exponentials (for the log-sum-exp).
    #[inline]
    #[target_feature(enable = "neon")]
    fn softmax(s: &mut [f32]) -> (f32, f32) {
        let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let (mv, mut acc, mut i) = (vdupq_n_f32(mx), vdupq_n_f32(0.0), 0);
        while i + 4 <= s.len() {
            // SAFETY: `i + 4 ≤ s.len()`.
            unsafe {
                let e = exp4(vsubq_f32(vld1q_f32(s.as_ptr().add(i)), mv));
                vst1q_f32(s.as_mut_ptr().add(i), e);
                acc = vaddq_f32(acc, e);
            }
            i += 4;
        }
        let mut sum = vaddvq_f32(acc);
        for x in &mut s[i..] {
            *x = super::exp_approx(*x - mx);
            sum += *x;
        }
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
        (mx, sum)
    }
}

/// NEON prefill for head dims that are a multiple of 4, the layout of the AVX2 one: a (query
/// tile, KV head) job keeps its query rows as vector lanes (`Qᵀ`, dim × rows, scaled, built once),
/// scores are `Sᵀ` (keys × rows) so the online softmax is vertical over four rows at a time, and
/// key and value rows are read in place. Both products are register blocked: 6 keys × 16 rows for
/// `Sᵀ = K·Qᵀ`, 6 rows × 16 dims for `O += P·V` (24 of the 32 vector registers).
#[cfg(target_arch = "aarch64")]
mod arm_prefill {
    use std::any::TypeId;
    use std::arch::aarch64::*;

    use half::f16;
    use half::slice::HalfFloatSliceExt;

    use super::{Job, KvElem, Range, TILE_K, key_tiles};
    use crate::neon::{exp4, f16x8_to_f32};

    /// Keys (of `Sᵀ`) resp. query rows (of `O`) per register block.
    const R: usize = 6;

    /// [`Job::run`] for `dim` a multiple of 4.
    ///
    /// # Safety
    /// Needs neon; `job.dim` is a multiple of 4 and the shapes checked by `flash_prefill_with`
    /// hold (query rows `i0..i0 + nq` exist, KV head `g` has `len ≥ pos0 + i0 + nq` rows in pages
    /// of `dim`-element rows).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn run<T: KvElem>(
        job: &Job<'_, '_, '_, T>,
        i0: usize,
        nq: usize,
        g: usize,
        spans: &[Range<usize>],
    ) -> Vec<f32> {
        let (dim, group) = (job.dim, job.group);
        let rows = nq * group;
        // Rows padded to whole vectors; padding rows have zero queries and see every key, so
        // they stay finite and are dropped at the end.
        let rp = rows.next_multiple_of(4);
        let mut qt = vec![0f32; dim * rp];
        for r in 0..rows {
            let h = g * group + r % group;
            let qr = &job.q[((i0 + r / group) * job.n_q_heads + h) * dim..][..dim];
            for (d, v) in qr.iter().enumerate() {
                qt[d * rp + r] = v * job.scale;
            }
        }
        // Row `r` sees keys at positions `< pos1[r]`.
        let pos1: Vec<usize> =
            (0..rp).map(|r| if r < rows { job.pos0 + i0 + r / group + 1 } else { usize::MAX }).collect();
        let mut lim = vec![0i32; rp];
        let mut st = vec![0f32; TILE_K * rp];
        let mut o = vec![0f32; rows * dim];
        let mut m = vec![f32::NEG_INFINITY; rp];
        let mut l = vec![0f32; rp];
        let mut c = vec![0f32; rp];
        let (kp, vp) = (&job.keys[g], &job.values[g]);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k0, n) in key_tiles(spans, kp.page_rows, vp.page_rows) {
            let (kt, vt) = (tile_f32(kp.rows(k0, n), &mut ks), tile_f32(vp.rows(k0, n), &mut vs));
            for (lr, p) in lim.iter_mut().zip(&pos1) {
                // At most TILE_K + 1, so it fits an i32.
                *lr = p.saturating_sub(k0).min(TILE_K + 1) as i32;
            }
            // SAFETY: `kt` and `vt` hold `n` rows of `dim`; `qt` is `dim × rp`, `st` `TILE_K × rp`
            // with `n ≤ TILE_K`, `o` is `rows × dim`, `lim`, `m`, `l`, `c` have `rp` entries; the
            // features are this fn's.
            unsafe {
                scores(&qt, kt, &mut st, n, rp, dim);
                softmax(&mut st, &lim, &mut m, &mut l, &mut c, n, rp);
                accumulate(&st, vt, &mut o, &c, n, rp, rows, dim);
            }
        }
        for (orow, lr) in o.chunks_exact_mut(dim).zip(&l) {
            let inv = 1.0 / lr;
            orow.iter_mut().for_each(|x| *x *= inv);
        }
        o
    }

    /// `src` as f32 ([`KvElem::as_f32`], converting f16 pages with `fcvtl`).
    #[inline]
    #[target_feature(enable = "neon")]
    fn tile_f32<'b, T: KvElem>(src: &'b [T], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        if TypeId::of::<T>() != TypeId::of::<f16>() {
            return T::as_f32(src, scratch);
        }
        // SAFETY: `T` is `f16` (equal type ids), so the slice is reinterpreted as itself.
        let src = unsafe { &*(src as *const [T] as *const [f16]) };
        scratch.resize(src.len(), 0.0);
        let (mut ch, out) = (src.chunks_exact(8), scratch.chunks_exact_mut(8));
        for (h, o) in (&mut ch).zip(out) {
            // SAFETY: 8 halves in (an `f16` is its `u16` bits), 8 floats out.
            unsafe {
                let (a, b) = f16x8_to_f32(vld1q_u16(h.as_ptr().cast()));
                vst1q_f32(o.as_mut_ptr(), a);
                vst1q_f32(o.as_mut_ptr().add(4), b);
            }
        }
        let done = src.len() - ch.remainder().len();
        ch.remainder().convert_to_f32_slice(&mut scratch[done..]);
        scratch
    }

    /// `Sᵀ[j][r] = Σ_d K[j][d] · Qᵀ[d][r]` for keys `j < n`, all `rp` rows.
    ///
    /// # Safety
    /// Needs neon; `k` has `n` rows of `dim`, `qt` is `dim × rp`, `st` has `n × rp` entries, `rp`
    /// is a multiple of 4.
    #[inline(always)]
    unsafe fn scores(qt: &[f32], k: &[f32], st: &mut [f32], n: usize, rp: usize, dim: usize) {
        debug_assert!(k.len() >= n * dim && qt.len() >= dim * rp && st.len() >= n * rp && rp.is_multiple_of(4));
        let (qt, k, st) = (qt.as_ptr(), k.as_ptr(), st.as_mut_ptr());
        let mut r0 = 0;
        // SAFETY (the block): every block reads keys `j0..j0 + KR ≤ n` and rows `r0..r0 + 4·C ≤ rp`.
        unsafe {
            while r0 + 16 <= rp {
                score_keys::<4>(qt, k, st, n, rp, dim, r0);
                r0 += 16;
            }
            match (rp - r0) / 4 {
                1 => score_keys::<1>(qt, k, st, n, rp, dim, r0),
                2 => score_keys::<2>(qt, k, st, n, rp, dim, r0),
                3 => score_keys::<3>(qt, k, st, n, rp, dim, r0),
                _ => {}
            }
        }
    }

    /// [`scores`] for rows `r0..r0 + 4·C`.
    ///
    /// # Safety
    /// As [`scores`], with `r0 + 4·C ≤ rp`.
    #[inline(always)]
    unsafe fn score_keys<const C: usize>(
        qt: *const f32,
        k: *const f32,
        st: *mut f32,
        n: usize,
        rp: usize,
        dim: usize,
        r0: usize,
    ) {
        let mut j0 = 0;
        // SAFETY (the block): as in `scores`, `j0 + KR ≤ n` for each call.
        unsafe {
            while j0 + R <= n {
                score_block::<R, C>(qt, k, st, rp, dim, r0, j0);
                j0 += R;
            }
            match n - j0 {
                1 => score_block::<1, C>(qt, k, st, rp, dim, r0, j0),
                2 => score_block::<2, C>(qt, k, st, rp, dim, r0, j0),
                3 => score_block::<3, C>(qt, k, st, rp, dim, r0, j0),
                4 => score_block::<4, C>(qt, k, st, rp, dim, r0, j0),
                5 => score_block::<5, C>(qt, k, st, rp, dim, r0, j0),
                _ => {}
            }
        }
    }

    /// Scores of keys `j0..j0 + KR` against rows `r0..r0 + 4·C`: `KR·C` accumulators, each key
    /// element used by `C` FMAs (by lane) and each query vector loaded once per `KR` FMAs.
    ///
    /// # Safety
    /// As [`scores`], with `j0 + KR ≤ n` and `r0 + 4·C ≤ rp`.
    #[inline(always)]
    unsafe fn score_block<const KR: usize, const C: usize>(
        qt: *const f32,
        k: *const f32,
        st: *mut f32,
        rp: usize,
        dim: usize,
        r0: usize,
        j0: usize,
    ) {
        // SAFETY (the block): the caller keeps keys and rows in range (see `scores`).
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); C]; KR];
            for d in 0..dim {
                let q: [float32x4_t; C] = std::array::from_fn(|v| vld1q_f32(qt.add(d * rp + r0 + 4 * v)));
                for (u, a) in acc.iter_mut().enumerate() {
                    let kd = *k.add((j0 + u) * dim + d);
                    for (av, qv) in a.iter_mut().zip(q) {
                        *av = vfmaq_n_f32(*av, qv, kd);
                    }
                }
            }
            for (u, a) in acc.iter().enumerate() {
                for (v, av) in a.iter().enumerate() {
                    vst1q_f32(st.add((j0 + u) * rp + r0 + 4 * v), *av);
                }
            }
        }
    }

    /// Online softmax step over `Sᵀ` (`n × rp`), four rows per vector: updates the running max
    /// `m` and sum `l`, sets `c` to the factor the old accumulators are scaled by, and turns `Sᵀ`
    /// into `Pᵀ` with keys `j ≥ lim[r]` zeroed.
    ///
    /// # Safety
    /// Needs neon; `st` has `n × rp` entries, `lim`, `m`, `l`, `c` have `rp`, `rp` is a multiple
    /// of 4, every row has `lim ≥ 1` on the first tile.
    #[inline(always)]
    unsafe fn softmax(st: &mut [f32], lim: &[i32], m: &mut [f32], l: &mut [f32], c: &mut [f32], n: usize, rp: usize) {
        debug_assert!(st.len() >= n * rp && lim.len() >= rp && m.len() >= rp && l.len() >= rp && c.len() >= rp);
        let st = st.as_mut_ptr();
        for r0 in (0..rp).step_by(4) {
            // SAFETY: `r0 + 4 ≤ rp`; the rest as this fn's contract.
            unsafe {
                if lim[r0..r0 + 4].iter().all(|&x| x as usize >= n) {
                    softmax_rows::<false>(st, lim, m, l, c, n, rp, r0);
                } else {
                    softmax_rows::<true>(st, lim, m, l, c, n, rp, r0);
                }
            }
        }
    }

    /// [`softmax`] for rows `r0..r0 + 4`; `MASK` false when they all see every key of the tile.
    ///
    /// # Safety
    /// As [`softmax`], with `r0 + 4 ≤ rp`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn softmax_rows<const MASK: bool>(
        st: *mut f32,
        lim: &[i32],
        m: &mut [f32],
        l: &mut [f32],
        c: &mut [f32],
        n: usize,
        rp: usize,
        r0: usize,
    ) {
        // SAFETY (the block): `r0 + 4 ≤ rp` and `j < n` for every access (see `softmax`).
        unsafe {
            let lv = vld1q_s32(lim.as_ptr().add(r0));
            let keep = |j: usize| vcgtq_s32(lv, vdupq_n_s32(j as i32));
            let ninf = vdupq_n_f32(f32::NEG_INFINITY);
            let mut mt = ninf;
            for j in 0..n {
                let s = vld1q_f32(st.add(j * rp + r0));
                mt = vmaxq_f32(mt, if MASK { vbslq_f32(keep(j), s, ninf) } else { s });
            }
            let mo = vld1q_f32(m.as_ptr().add(r0));
            let mn = vmaxq_f32(mo, mt);
            // `mo` is −∞ before the first tile: exp4 clamps that to a tiny factor of zeros.
            let cv = exp4(vsubq_f32(mo, mn));
            let mut sum = vdupq_n_f32(0.0);
            for j in 0..n {
                let p = st.add(j * rp + r0);
                let mut e = exp4(vsubq_f32(vld1q_f32(p), mn));
                if MASK {
                    e = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(e), keep(j)));
                }
                vst1q_f32(p, e);
                sum = vaddq_f32(sum, e);
            }
            let lv = vfmaq_f32(sum, vld1q_f32(l.as_ptr().add(r0)), cv);
            vst1q_f32(l.as_mut_ptr().add(r0), lv);
            vst1q_f32(m.as_mut_ptr().add(r0), mn);
            vst1q_f32(c.as_mut_ptr().add(r0), cv);
        }
    }

    /// `O[r] = c[r]·O[r] + Σ_j Pᵀ[j][r] · V[j]` for rows `r < rows`.
    ///
    /// # Safety
    /// Needs neon; `v` has `n` rows of `dim` (a multiple of 4), `pt` `n × rp` entries, `o`
    /// `rows × dim`, `c` `rows`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate(
        pt: &[f32],
        v: &[f32],
        o: &mut [f32],
        c: &[f32],
        n: usize,
        rp: usize,
        rows: usize,
        dim: usize,
    ) {
        debug_assert!(v.len() >= n * dim && pt.len() >= n * rp && o.len() >= rows * dim && c.len() >= rows);
        let (pt, v, o, c) = (pt.as_ptr(), v.as_ptr(), o.as_mut_ptr(), c.as_ptr());
        let mut d0 = 0;
        // SAFETY (the block): every block touches rows `r0..r0 + RR ≤ rows` and dims
        // `d0..d0 + 4·C ≤ dim`.
        unsafe {
            while d0 + 16 <= dim {
                accumulate_rows::<4>(pt, v, o, c, n, rp, rows, dim, d0);
                d0 += 16;
            }
            match (dim - d0) / 4 {
                1 => accumulate_rows::<1>(pt, v, o, c, n, rp, rows, dim, d0),
                2 => accumulate_rows::<2>(pt, v, o, c, n, rp, rows, dim, d0),
                3 => accumulate_rows::<3>(pt, v, o, c, n, rp, rows, dim, d0),
                _ => {}
            }
        }
    }

    /// [`accumulate`] for dims `d0..d0 + 4·C`.
    ///
    /// # Safety
    /// As [`accumulate`], with `d0 + 4·C ≤ dim`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate_rows<const C: usize>(
        pt: *const f32,
        v: *const f32,
        o: *mut f32,
        c: *const f32,
        n: usize,
        rp: usize,
        rows: usize,
        dim: usize,
        d0: usize,
    ) {
        let mut r0 = 0;
        // SAFETY (the block): as in `accumulate`, `r0 + RR ≤ rows` for each call.
        unsafe {
            while r0 + R <= rows {
                accumulate_block::<R, C>(pt, v, o, c, n, rp, dim, r0, d0);
                r0 += R;
            }
            match rows - r0 {
                1 => accumulate_block::<1, C>(pt, v, o, c, n, rp, dim, r0, d0),
                2 => accumulate_block::<2, C>(pt, v, o, c, n, rp, dim, r0, d0),
                3 => accumulate_block::<3, C>(pt, v, o, c, n, rp, dim, r0, d0),
                4 => accumulate_block::<4, C>(pt, v, o, c, n, rp, dim, r0, d0),
                5 => accumulate_block::<5, C>(pt, v, o, c, n, rp, dim, r0, d0),
                _ => {}
            }
        }
    }

    /// Rows `r0..r0 + RR` × dims `d0..d0 + 4·C` of `O`, held in `RR·C` registers over all `n`
    /// keys: each value vector is loaded once per `RR` FMAs.
    ///
    /// # Safety
    /// As [`accumulate`], with `r0 + RR ≤ rows` and `d0 + 4·C ≤ dim`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate_block<const RR: usize, const C: usize>(
        pt: *const f32,
        v: *const f32,
        o: *mut f32,
        c: *const f32,
        n: usize,
        rp: usize,
        dim: usize,
        r0: usize,
        d0: usize,
    ) {
        // SAFETY (the block): the caller keeps rows, dims and keys in range (see `accumulate`).
        unsafe {
            let mut acc: [[float32x4_t; C]; RR] = std::array::from_fn(|u| {
                let cu = *c.add(r0 + u);
                std::array::from_fn(|w| vmulq_n_f32(vld1q_f32(o.add((r0 + u) * dim + d0 + 4 * w)), cu))
            });
            for j in 0..n {
                let vv: [float32x4_t; C] = std::array::from_fn(|w| vld1q_f32(v.add(j * dim + d0 + 4 * w)));
                for (u, a) in acc.iter_mut().enumerate() {
                    let p = *pt.add(j * rp + r0 + u);
                    for (aw, x) in a.iter_mut().zip(vv) {
                        *aw = vfmaq_n_f32(*aw, x, p);
                    }
                }
            }
            for (u, a) in acc.iter().enumerate() {
                for (w, aw) in a.iter().enumerate() {
                    vst1q_f32(o.add((r0 + u) * dim + d0 + 4 * w), *aw);
                }
            }
        }
    }
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

/// `e^x` for `x ≤ 0` (softmax arguments), relative error about 2e-7, branch-free so it
/// vectorizes: `x = n·ln2 + r`, `|r| ≤ ln2/2`, degree-6 polynomial for `e^r`, `2^n` from the
/// exponent bits. Arguments below −87 give a tiny positive number instead of 0.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
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
    fn exp_approx_is_accurate_on_softmax_range() {
        let mut x = 0f32;
        while x > -90.0 {
            let (a, e) = (super::exp_approx(x), x.exp());
            assert!((a - e).abs() <= 4e-7 * e + 1e-37, "exp({x}): {a} vs {e}");
            x -= 0.0137;
        }
    }
}
