//! The vectorized prefill tile loop, written once over [`Lanes`] and compiled for AVX2 (head dims
//! a multiple of 8) and NEON (a multiple of 4).
//!
//! A (query tile, KV head) job keeps its query rows as vector lanes: `Qᵀ` (dim × rows, scaled) is
//! built once, scores are `Sᵀ` (keys × rows) so the online softmax is plain vertical
//! max/exp/sum over `N` rows at a time, and key and value rows are read in place. Both products
//! are register blocked: 6 keys × 16 rows for `Sᵀ = K·Qᵀ`, 6 rows × 16 dims for `O += P·V`
//! (`16 = N·BLOCK` on AVX2 and NEON).

use std::ops::Range;

use super::lanes::Lanes;
use super::{Job, KvElem, TILE_K, key_tiles};

/// Keys (of `Sᵀ`) resp. query rows (of `O`) per register block.
const R: usize = 6;

/// The most lanes of a [`Lanes`] type.
const MAX_N: usize = 8;

/// [`Job::run`] for `dim` a multiple of `L::N`, on `L`'s instruction set.
///
/// # Safety
/// `L`'s instruction set is enabled in the caller (this fn is inlined into it); `job.dim` is a
/// multiple of `L::N` and the shapes checked by `flash_prefill_with` hold (query rows `i0..i0 +
/// nq` exist, KV head `g` has `len ≥ pos0 + i0 + nq` rows in pages of `dim`-element rows).
#[inline(always)]
pub(super) unsafe fn run<L: Lanes, T: KvElem>(
    job: &Job<'_, '_, '_, T>,
    i0: usize,
    nq: usize,
    g: usize,
    spans: &[Range<usize>],
) -> Vec<f32> {
    let (dim, group) = (job.dim, job.group);
    let rows = nq * group;
    // Rows padded to whole vectors; padding rows have zero queries and see every key, so they
    // stay finite and are dropped at the end.
    let rp = rows.next_multiple_of(L::N);
    let mut qt_buf = Vec::new();
    let qt = aligned(&mut qt_buf, dim * rp);
    for r0 in (0..rp).step_by(L::N) {
        let src: [Option<&[f32]>; MAX_N] = std::array::from_fn(|u| {
            let (r, h) = (r0 + u, g * group + (r0 + u) % group);
            (u < L::N && r < rows).then(|| &job.q[((i0 + r / group) * job.n_q_heads + h) * dim..][..dim])
        });
        // SAFETY: `src[..N]` are rows of `dim` (or none), `qt` is `dim × rp`, `r0 + N ≤ rp`.
        unsafe { L::put_qt(&src[..L::N], job.scale, qt, rp, r0, dim) };
    }
    // Row `r` sees keys at positions `< pos1[r]`.
    let pos1: Vec<usize> = (0..rp).map(|r| if r < rows { job.pos0 + i0 + r / group + 1 } else { usize::MAX }).collect();
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
        // SAFETY: the instruction set per this fn's contract.
        let (kt, vt) = unsafe { (L::tile_f32(kp.rows(k0, n), &mut ks), L::tile_f32(vp.rows(k0, n), &mut vs)) };
        for (lr, p) in lim.iter_mut().zip(&pos1) {
            // At most TILE_K + 1, so it fits an i32.
            *lr = p.saturating_sub(k0).min(TILE_K + 1) as i32;
        }
        // SAFETY: `kt` and `vt` hold `n` rows of `dim`; `qt` is `dim × rp`, `st` `TILE_K × rp`
        // with `n ≤ TILE_K`, `o` is `rows × dim`, `lim`, `m`, `l`, `c` have `rp` entries; the
        // instruction set per this fn's contract.
        unsafe {
            scores::<L>(qt, kt, st, n, rp, dim);
            softmax::<L>(st, &lim, &mut m, &mut l, &mut c, n, rp);
            accumulate::<L>(st, vt, &mut o, &c, n, rp, rows, dim);
        }
    }
    for (orow, lr) in o.chunks_exact_mut(dim).zip(&l) {
        let inv = 1.0 / lr;
        orow.iter_mut().for_each(|x| *x *= inv);
    }
    o
}

/// A zeroed `n`-float slice of `buf` starting on a 64-byte boundary (whole vectors of it then
/// never straddle cache lines).
fn aligned(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.clear();
    buf.resize(n + 15, 0.0);
    let off = buf.as_ptr().align_offset(64).min(15);
    &mut buf[off..off + n]
}

/// `Sᵀ[j][r] = Σ_d K[j][d] · Qᵀ[d][r]` for keys `j < n`, all `rp` rows.
///
/// # Safety
/// `L`'s instruction set; `k` has `n` rows of `dim`, `qt` is `dim × rp`, `st` has `n × rp`
/// entries, `rp` is a multiple of `L::N`.
#[inline(always)]
unsafe fn scores<L: Lanes>(qt: &[f32], k: &[f32], st: &mut [f32], n: usize, rp: usize, dim: usize) {
    debug_assert!(k.len() >= n * dim && qt.len() >= dim * rp && st.len() >= n * rp && rp.is_multiple_of(L::N));
    let (qt, k, st) = (qt.as_ptr(), k.as_ptr(), st.as_mut_ptr());
    let mut r0 = 0;
    // SAFETY (the block): every block reads keys `j0..j0 + KR ≤ n` and rows `r0..r0 + N·C ≤ rp`.
    unsafe {
        while r0 + L::N * L::BLOCK <= rp {
            match L::BLOCK {
                4 => score_keys::<L, 4>(qt, k, st, n, rp, dim, r0),
                _ => score_keys::<L, 2>(qt, k, st, n, rp, dim, r0),
            }
            r0 += L::N * L::BLOCK;
        }
        // At most BLOCK − 1 vectors remain; the guards keep the widths a lane type never reaches
        // out of its code (compiled in, they cost the AVX2 prefill ~7 %).
        match (rp - r0) / L::N {
            1 => score_keys::<L, 1>(qt, k, st, n, rp, dim, r0),
            2 if L::BLOCK > 2 => score_keys::<L, 2>(qt, k, st, n, rp, dim, r0),
            3 if L::BLOCK > 3 => score_keys::<L, 3>(qt, k, st, n, rp, dim, r0),
            _ => {}
        }
    }
}

/// [`scores`] for rows `r0..r0 + N·C`.
///
/// # Safety
/// As [`scores`], with `r0 + N·C ≤ rp`.
#[inline(always)]
unsafe fn score_keys<L: Lanes, const C: usize>(
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
            score_block::<L, R, C>(qt, k, st, rp, dim, r0, j0);
            j0 += R;
        }
        match n - j0 {
            1 => score_block::<L, 1, C>(qt, k, st, rp, dim, r0, j0),
            2 => score_block::<L, 2, C>(qt, k, st, rp, dim, r0, j0),
            3 => score_block::<L, 3, C>(qt, k, st, rp, dim, r0, j0),
            4 => score_block::<L, 4, C>(qt, k, st, rp, dim, r0, j0),
            5 => score_block::<L, 5, C>(qt, k, st, rp, dim, r0, j0),
            _ => {}
        }
    }
}

/// Scores of keys `j0..j0 + KR` against rows `r0..r0 + N·C`: `KR·C` accumulators, each key
/// element broadcast once per `C` FMAs and each query vector loaded once per `KR` FMAs.
///
/// # Safety
/// As [`scores`], with `j0 + KR ≤ n` and `r0 + N·C ≤ rp`.
#[inline(always)]
unsafe fn score_block<L: Lanes, const KR: usize, const C: usize>(
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
        let mut acc = [[L::zero(); C]; KR];
        for d in 0..dim {
            let q: [L; C] = std::array::from_fn(|v| L::load(qt.add(d * rp + r0 + L::N * v)));
            for (u, a) in acc.iter_mut().enumerate() {
                let kb = L::splat(*k.add((j0 + u) * dim + d));
                for (av, qv) in a.iter_mut().zip(q) {
                    *av = kb.mul_add(qv, *av);
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                av.store(st.add((j0 + u) * rp + r0 + L::N * v));
            }
        }
    }
}

/// Online softmax step over `Sᵀ` (`n × rp`), `N` rows per vector: updates the running max `m`
/// and sum `l`, sets `c` to the factor the old accumulators are scaled by, and turns `Sᵀ` into
/// `Pᵀ` with keys `j ≥ lim[r]` zeroed.
///
/// # Safety
/// `L`'s instruction set; `st` has `n × rp` entries, `lim`, `m`, `l`, `c` have `rp`, `rp` is a
/// multiple of `L::N`, every row has `lim ≥ 1` on the first tile.
#[inline(always)]
unsafe fn softmax<L: Lanes>(
    st: &mut [f32],
    lim: &[i32],
    m: &mut [f32],
    l: &mut [f32],
    c: &mut [f32],
    n: usize,
    rp: usize,
) {
    debug_assert!(st.len() >= n * rp && lim.len() >= rp && m.len() >= rp && l.len() >= rp && c.len() >= rp);
    let st = st.as_mut_ptr();
    for r0 in (0..rp).step_by(L::N) {
        // SAFETY: `r0 + N ≤ rp`; the rest as this fn's contract.
        unsafe {
            if lim[r0..r0 + L::N].iter().all(|&x| x as usize >= n) {
                softmax_rows::<L, false>(st, lim, m, l, c, n, rp, r0);
            } else {
                softmax_rows::<L, true>(st, lim, m, l, c, n, rp, r0);
            }
        }
    }
}

/// [`softmax`] for rows `r0..r0 + N`; `MASK` false when they all see every key of the tile.
///
/// # Safety
/// As [`softmax`], with `r0 + N ≤ rp`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn softmax_rows<L: Lanes, const MASK: bool>(
    st: *mut f32,
    lim: &[i32],
    m: &mut [f32],
    l: &mut [f32],
    c: &mut [f32],
    n: usize,
    rp: usize,
    r0: usize,
) {
    // SAFETY (the block): `r0 + N ≤ rp` and `j < n` for every access (see `softmax`).
    unsafe {
        let lv = L::load_lim(lim.as_ptr().add(r0));
        let ninf = L::splat(f32::NEG_INFINITY);
        let mut mt = ninf;
        for j in 0..n {
            let s = L::load(st.add(j * rp + r0));
            mt = mt.max(if MASK { s.select(L::keep(lv, j), ninf) } else { s });
        }
        let mo = L::load(m.as_ptr().add(r0));
        let mn = mo.max(mt);
        // `mo` is −∞ before the first tile: the exponential clamps that to a tiny factor of zeros.
        let cv = mo.sub(mn).exp();
        let mut sum = L::zero();
        for j in 0..n {
            let p = st.add(j * rp + r0);
            let mut e = L::load(p).sub(mn).exp();
            if MASK {
                e = e.and(L::keep(lv, j));
            }
            e.store(p);
            sum = sum.add(e);
        }
        L::load(l.as_ptr().add(r0)).mul_add(cv, sum).store(l.as_mut_ptr().add(r0));
        mn.store(m.as_mut_ptr().add(r0));
        cv.store(c.as_mut_ptr().add(r0));
    }
}

/// `O[r] = c[r]·O[r] + Σ_j Pᵀ[j][r] · V[j]` for rows `r < rows`.
///
/// # Safety
/// `L`'s instruction set; `v` has `n` rows of `dim` (a multiple of `L::N`), `pt` `n × rp`
/// entries, `o` `rows × dim`, `c` `rows`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate<L: Lanes>(
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
    // `d0..d0 + N·C ≤ dim`.
    unsafe {
        while d0 + L::N * L::BLOCK <= dim {
            match L::BLOCK {
                4 => accumulate_rows::<L, 4>(pt, v, o, c, n, rp, rows, dim, d0),
                _ => accumulate_rows::<L, 2>(pt, v, o, c, n, rp, rows, dim, d0),
            }
            d0 += L::N * L::BLOCK;
        }
        // As in `scores`: at most BLOCK − 1 vectors remain.
        match (dim - d0) / L::N {
            1 => accumulate_rows::<L, 1>(pt, v, o, c, n, rp, rows, dim, d0),
            2 if L::BLOCK > 2 => accumulate_rows::<L, 2>(pt, v, o, c, n, rp, rows, dim, d0),
            3 if L::BLOCK > 3 => accumulate_rows::<L, 3>(pt, v, o, c, n, rp, rows, dim, d0),
            _ => {}
        }
    }
}

/// [`accumulate`] for dims `d0..d0 + N·C`.
///
/// # Safety
/// As [`accumulate`], with `d0 + N·C ≤ dim`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate_rows<L: Lanes, const C: usize>(
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
            accumulate_block::<L, R, C>(pt, v, o, c, n, rp, dim, r0, d0);
            r0 += R;
        }
        match rows - r0 {
            1 => accumulate_block::<L, 1, C>(pt, v, o, c, n, rp, dim, r0, d0),
            2 => accumulate_block::<L, 2, C>(pt, v, o, c, n, rp, dim, r0, d0),
            3 => accumulate_block::<L, 3, C>(pt, v, o, c, n, rp, dim, r0, d0),
            4 => accumulate_block::<L, 4, C>(pt, v, o, c, n, rp, dim, r0, d0),
            5 => accumulate_block::<L, 5, C>(pt, v, o, c, n, rp, dim, r0, d0),
            _ => {}
        }
    }
}

/// Rows `r0..r0 + RR` × dims `d0..d0 + N·C` of `O`, held in `RR·C` registers over all `n`
/// keys: each value vector is loaded once per `RR` FMAs, each probability broadcast once per `C`.
///
/// # Safety
/// As [`accumulate`], with `r0 + RR ≤ rows` and `d0 + N·C ≤ dim`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate_block<L: Lanes, const RR: usize, const C: usize>(
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
        let mut acc: [[L; C]; RR] = std::array::from_fn(|u| {
            let cu = L::splat(*c.add(r0 + u));
            std::array::from_fn(|w| cu.mul(L::load(o.add((r0 + u) * dim + d0 + L::N * w))))
        });
        for j in 0..n {
            let vv: [L; C] = std::array::from_fn(|w| L::load(v.add(j * dim + d0 + L::N * w)));
            for (u, a) in acc.iter_mut().enumerate() {
                let p = L::splat(*pt.add(j * rp + r0 + u));
                for (aw, x) in a.iter_mut().zip(vv) {
                    *aw = p.mul_add(x, *aw);
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            for (w, aw) in a.iter().enumerate() {
                aw.store(o.add((r0 + u) * dim + d0 + L::N * w));
            }
        }
    }
}

/// [`run`] on AVX2 `f32x8` lanes.
///
/// # Safety
/// Needs avx2, fma and f16c; `job.dim` is a multiple of 8 and the shapes hold (see [`run`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn avx2<T: KvElem>(
    job: &Job<'_, '_, '_, T>,
    i0: usize,
    nq: usize,
    g: usize,
    spans: &[Range<usize>],
) -> Vec<f32> {
    // SAFETY: the features and shapes per this fn's contract.
    unsafe { run::<std::arch::x86_64::__m256, T>(job, i0, nq, g, spans) }
}

/// [`run`] on NEON `f32x4` lanes.
///
/// # Safety
/// Needs neon; `job.dim` is a multiple of 4 and the shapes hold (see [`run`]).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
pub(super) unsafe fn neon<T: KvElem>(
    job: &Job<'_, '_, '_, T>,
    i0: usize,
    nq: usize,
    g: usize,
    spans: &[Range<usize>],
) -> Vec<f32> {
    // SAFETY: the features and shapes per this fn's contract.
    unsafe { run::<std::arch::aarch64::float32x4_t, T>(job, i0, nq, g, spans) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use half::f16;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::super::{Job, KvElem, Pages};

    /// The shared tile loop on one-lane `f32` "vectors" (any head dim) against the plain loop:
    /// checks the algorithm every ISA compiles, on any machine.
    fn check<T: KvElem>(conv: fn(f32) -> T) {
        let mut r = StdRng::seed_from_u64(3);
        for (hq, hkv) in [(4, 2), (3, 3), (7, 1)] {
            for dim in [5, 16, 24] {
                for (t, pos0, page_rows) in [(1, 0, 16), (9, 3, 7), (16, 70, 64)] {
                    let len = pos0 + t;
                    let q: Vec<f32> = (0..t * hq * dim).map(|_| r.random_range(-1.0..1.0)).collect();
                    let mut kv = || -> Vec<Vec<T>> {
                        let rows: Vec<T> = (0..len * dim).map(|_| conv(r.random_range(-1.0..1.0))).collect();
                        rows.chunks(page_rows * dim).map(<[T]>::to_vec).collect()
                    };
                    let kp: Vec<Vec<Vec<T>>> = (0..hkv).map(|_| kv()).collect();
                    let vp: Vec<Vec<Vec<T>>> = (0..hkv).map(|_| kv()).collect();
                    let kr: Vec<Vec<&[T]>> = kp.iter().map(|h| h.iter().map(Vec::as_slice).collect()).collect();
                    let vr: Vec<Vec<&[T]>> = vp.iter().map(|h| h.iter().map(Vec::as_slice).collect()).collect();
                    let keys: Vec<Pages<'_, T>> = kr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                    let values: Vec<Pages<'_, T>> =
                        vr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                    let job = Job {
                        q: &q,
                        keys: &keys,
                        values: &values,
                        pos0,
                        n_q_heads: hq,
                        group: hq / hkv,
                        dim,
                        scale: 0.3,
                    };
                    // Two spans (a gap, as block-sparse prefill has) where there are keys enough.
                    let spans: Vec<_> = if len > 4 { vec![0..2, 3..len] } else { std::iter::once(0..len).collect() };
                    for g in 0..hkv {
                        let want = job.run_dims(0, t, g, &spans);
                        // SAFETY: `f32` lanes need no instruction set; the shapes are built above.
                        let got = unsafe { super::run::<f32, T>(&job, 0, t, g, &spans) };
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5,
                                "hq {hq}/{hkv} dim {dim} t {t} pos0 {pos0} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_lanes_match_the_plain_loop() {
        check::<f32>(|x| x);
        check::<f16>(f16::from_f32);
    }
}
