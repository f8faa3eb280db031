//! Exact top-n keys for each training query: the bipartite query→key graph of RoarGraph.
//!
//! Scores are computed as a tiled matrix product: keys are transposed into panels of `lanes`
//! keys (`panel[d][lane]`), and a block of [`QB`] queries is multiplied against each panel with
//! `QB` independent `lanes`-wide accumulators, so no horizontal sums are needed and each key
//! value loaded feeds `QB` multiply-adds. Panels are 16 keys wide where AVX-512 F is present
//! (one 512-bit register), else 8 (AVX2 + FMA, one 256-bit register); both checked at run time,
//! with the same kernel as plain Rust elsewhere.

use needle_core::Result;
use rayon::prelude::*;

/// Queries multiplied against a panel at once (independent accumulators).
const QB: usize = 8;
/// Queries handled by one rayon task (a few blocks, so scores stay in L2).
const TASK_QUERIES: usize = 32;

/// Keys transposed into panels of `lanes` keys, zero-padded to a whole panel.
pub(crate) struct Panels {
    dim: usize,
    n: usize,
    lanes: usize,
    data: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

impl Panels {
    /// Panels as wide as this CPU's widest `f32` register (16 with AVX-512 F, else 8).
    pub fn new(keys: &[f32], dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let lanes = if has_avx512() { 16 } else { 8 };
        #[cfg(not(target_arch = "x86_64"))]
        let lanes = 8;
        Self::with_lanes(keys, dim, lanes)
    }

    /// Panels of `lanes` keys (8 or 16).
    pub fn with_lanes(keys: &[f32], dim: usize, lanes: usize) -> Self {
        let n = keys.len() / dim;
        let n_panels = n.div_ceil(lanes);
        let mut data = vec![0.0f32; n_panels * dim * lanes];
        for (i, k) in keys.chunks_exact(dim).enumerate() {
            let (p, lane) = (i / lanes, i % lanes);
            let base = p * dim * lanes;
            for (d, &x) in k.iter().enumerate() {
                data[base + d * lanes + lane] = x;
            }
        }
        Self { dim, n, lanes, data }
    }

    /// Scores of up to [`QB`] queries (`qs`, row-major) against every key: `out[q * stride + key]`.
    /// `stride` must be at least the panel-padded key count.
    fn scores(&self, qs: &[f32], out: &mut [f32], stride: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if self.lanes == 16 && has_avx512() {
                // SAFETY: the CPU supports AVX-512 F (checked just above).
                unsafe { scores_avx512(self, qs, out, stride) };
                return;
            }
            if self.lanes == 8 && has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { scores_avx2(self, qs, out, stride) };
                return;
            }
        }
        match self.lanes {
            16 => scores_kernel::<16>(self, qs, out, stride),
            _ => scores_kernel::<8>(self, qs, out, stride),
        }
    }

    fn padded(&self) -> usize {
        self.n.div_ceil(self.lanes) * self.lanes
    }
}

/// Query values transposed to `[d][q]`, padded to [`QB`] queries, so the inner loops are
/// fixed-size; and how many of the `QB` are real.
fn transposed(qs: &[f32], dim: usize) -> (Vec<f32>, usize) {
    let nq = (qs.len() / dim).min(QB);
    let mut qt = vec![0.0f32; dim * QB];
    for (qi, q) in qs.chunks_exact(dim).take(nq).enumerate() {
        for (d, &x) in q.iter().enumerate() {
            qt[d * QB + qi] = x;
        }
    }
    (qt, nq)
}

// The vector kernels are written with intrinsics: left to the autovectorizer, the plain kernel
// was vectorized across the queries, with the accumulators gathered and scattered through
// memory at every step.

/// One vector kernel per register width: `QB` accumulators of `$lanes` keys, one panel row
/// loaded per dimension and multiplied by each query's value.
macro_rules! vector_scores {
    ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $set1:ident, $fma:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(p: &Panels, qs: &[f32], out: &mut [f32], stride: usize) {
            use std::arch::x86_64::*;
            let dim = p.dim;
            let (qt, nq) = transposed(qs, dim);
            for (pi, panel) in p.data.chunks_exact(dim * $lanes).enumerate() {
                let mut acc = [$zero(); QB];
                for d in 0..dim {
                    // SAFETY: `panel` holds `dim` rows of `$lanes` floats.
                    let kv = unsafe { $load(panel.as_ptr().add(d * $lanes)) };
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a = $fma(kv, $set1(qt[d * QB + q]), *a);
                    }
                }
                for (q, a) in acc.iter().enumerate().take(nq) {
                    let o = &mut out[q * stride + pi * $lanes..q * stride + (pi + 1) * $lanes];
                    // SAFETY: `o` holds `$lanes` floats.
                    unsafe { $store(o.as_mut_ptr(), *a) };
                }
            }
        }
    };
}

vector_scores!(
    scores_avx2,
    "avx2,fma",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);
vector_scores!(
    scores_avx512,
    "avx512f,avx2,fma",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);

/// The plain kernel (the vector ones' reference, and the code off x86-64).
fn scores_kernel<const L: usize>(p: &Panels, qs: &[f32], out: &mut [f32], stride: usize) {
    debug_assert_eq!(p.lanes, L);
    let dim = p.dim;
    let (qt, nq) = transposed(qs, dim);
    for (pi, panel) in p.data.chunks_exact(dim * L).enumerate() {
        let mut acc = [[0.0f32; L]; QB];
        for (kv, qv) in panel.chunks_exact(L).zip(qt.chunks_exact(QB)) {
            for q in 0..QB {
                let b = qv[q];
                for l in 0..L {
                    acc[q][l] = kv[l].mul_add(b, acc[q][l]);
                }
            }
        }
        for (q, a) in acc.iter().enumerate().take(nq) {
            out[q * stride + pi * L..q * stride + (pi + 1) * L].copy_from_slice(a);
        }
    }
}

/// Best `n` of `scores` (score descending, then id ascending), as ids. `buf` is scratch.
fn top_ids(scores: &[f32], n: usize, buf: &mut Vec<(f32, u32)>, out: &mut Vec<u32>) {
    buf.clear();
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut thr = f32::NEG_INFINITY;
    let cap = 2 * n + 16;
    for (i, &s) in scores.iter().enumerate() {
        // Keys arrive in id order, so a later key tying the threshold never beats a kept one.
        if s > thr || (buf.len() < n && s == thr) {
            buf.push((s, i as u32));
            if buf.len() >= cap {
                buf.select_nth_unstable_by(n - 1, better);
                buf.truncate(n);
                thr = buf[n - 1].0;
            }
        }
    }
    if buf.len() > n {
        buf.select_nth_unstable_by(n - 1, better);
        buf.truncate(n);
    }
    buf.sort_unstable_by(better);
    out.extend(buf.iter().map(|x| x.1));
}

/// Row-major `n_queries × n` lists of key ids, best first, `n = min(n_q, keys)`.
pub(crate) fn exact_knn(keys: &[f32], queries: &[f32], dim: usize, n_q: usize) -> Result<(Vec<u32>, usize)> {
    let panels = Panels::new(keys, dim);
    let n_keys = panels.n;
    let n = n_q.min(n_keys);
    if n == 0 {
        return Ok((Vec::new(), 0));
    }
    let stride = panels.padded();
    let blocks: Vec<Vec<u32>> = queries
        .par_chunks(TASK_QUERIES * dim)
        .map(|task| {
            let mut scores = vec![0.0f32; QB * stride];
            let mut buf = Vec::with_capacity(2 * n + 16);
            let mut out = Vec::with_capacity(task.len() / dim * n);
            for block in task.chunks(QB * dim) {
                panels.scores(block, &mut scores, stride);
                for qi in 0..block.len() / dim {
                    top_ids(&scores[qi * stride..qi * stride + n_keys], n, &mut buf, &mut out);
                }
            }
            out
        })
        .collect();
    Ok((blocks.concat(), n))
}

/// Scores of every query against every key, row-major `n_queries × n_keys` (for small sets,
/// such as cluster centroids).
pub(crate) fn all_scores(keys: &[f32], queries: &[f32], dim: usize) -> Vec<f32> {
    let panels = Panels::new(keys, dim);
    let stride = panels.padded();
    let n_keys = panels.n;
    let mut out = vec![0.0f32; queries.len() / dim * n_keys];
    let mut scores = vec![0.0f32; QB * stride];
    for (bi, block) in queries.chunks(QB * dim).enumerate() {
        panels.scores(block, &mut scores, stride);
        for qi in 0..block.len() / dim {
            let row = bi * QB + qi;
            out[row * n_keys..(row + 1) * n_keys].copy_from_slice(&scores[qi * stride..qi * stride + n_keys]);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dist::dot;
    use needle_core::attention::top_k;

    #[test]
    fn knn_lists_are_exact() {
        let keys = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, -1.0, 0.0];
        let queries: Vec<f32> = (0..40).flat_map(|i| [(i as f32).cos(), (i as f32).sin()]).collect();
        let (lists, n) = exact_knn(&keys, &queries, 2, 2).unwrap();
        assert_eq!(n, 2);
        for (qi, q) in queries.chunks_exact(2).enumerate() {
            let s: Vec<f32> = keys.chunks_exact(2).map(|k| dot(q, k)).collect();
            let want: Vec<u32> = top_k(&s, 2).unwrap().into_iter().map(|x| x.0).collect();
            assert_eq!(&lists[qi * 2..qi * 2 + 2], &want[..]);
        }
    }

    #[test]
    fn both_panel_widths_score_like_dot() {
        let dim = 13;
        let keys: Vec<f32> = (0..45 * dim).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.125).collect();
        let queries: Vec<f32> = (0..11 * dim).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.5).collect();
        for lanes in [8, 16] {
            let p = Panels::with_lanes(&keys, dim, lanes);
            let stride = p.padded();
            let mut out = vec![0.0f32; QB * stride];
            for (bi, block) in queries.chunks(QB * dim).enumerate() {
                p.scores(block, &mut out, stride);
                for (qi, q) in block.chunks_exact(dim).enumerate() {
                    for (ki, k) in keys.chunks_exact(dim).enumerate() {
                        let want = dot(q, k);
                        let got = out[qi * stride + ki];
                        assert!((got - want).abs() < 1e-4, "lanes {lanes}, query {}, key {ki}", bi * QB + qi);
                    }
                }
            }
        }
    }

    /// The vector kernels this CPU has against the plain kernel, on fresh random input.
    #[test]
    fn vector_kernels_match_the_plain_kernel() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut r = StdRng::seed_from_u64(rand::random());
        for (dim, n) in [(64, 100), (24, 33), (128, 17)] {
            let keys: Vec<f32> = (0..n * dim).map(|_| r.random_range(-2.0..2.0)).collect();
            let queries: Vec<f32> = (0..5 * dim).map(|_| r.random_range(-2.0..2.0)).collect();
            for lanes in [8, 16] {
                let p = Panels::with_lanes(&keys, dim, lanes);
                let stride = p.padded();
                let (mut got, mut want) = (vec![0.0f32; QB * stride], vec![0.0f32; QB * stride]);
                p.scores(&queries, &mut got, stride);
                match lanes {
                    16 => scores_kernel::<16>(&p, &queries, &mut want, stride),
                    _ => scores_kernel::<8>(&p, &queries, &mut want, stride),
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "dim {dim}, lanes {lanes}, [{i}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn tiled_scores_match_dot_with_ragged_sizes() {
        // Key and query counts off the panel and block sizes, an odd dimension, many ties.
        let dim = 7;
        let keys: Vec<f32> = (0..37 * dim).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.25).collect();
        let queries: Vec<f32> = (0..13 * dim).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.5).collect();
        let s = all_scores(&keys, &queries, dim);
        for (qi, q) in queries.chunks_exact(dim).enumerate() {
            for (ki, k) in keys.chunks_exact(dim).enumerate() {
                assert!((s[qi * 37 + ki] - dot(q, k)).abs() < 1e-4);
            }
            let (lists, n) = exact_knn(&keys, q, dim, 9).unwrap();
            let want: Vec<u32> = top_k(&s[qi * 37..(qi + 1) * 37], n).unwrap().into_iter().map(|x| x.0).collect();
            assert_eq!(lists, want, "query {qi}");
        }
    }
}
