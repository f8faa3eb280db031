//! SimHash collision probabilities (Charikar 2002) and the MagicPIG inclusion probabilities
//! built on them (arXiv 2410.16179): for vectors at angle θ one random hyperplane separates
//! them with probability θ/π, so a `K`-bit signature matches with `p = (1 − θ/π)^K`, and
//! among `L` independent tables the number of matches is `Binomial(L, p)`.
//!
//! Everything is computed in `f64` and, where probabilities get tiny, in log space: the
//! importance weight of a sampled key is `1/u`, so a relative error in a small `u` is a
//! relative error in the estimate.

use std::f64::consts::{FRAC_PI_2, PI};

/// Angle between `q` and `k` in radians, in `[0, π]`, computed in `f64`.
///
/// The angle to a zero vector is undefined; it is defined here the way the hash behaves.
/// A zero vector lies on every hyperplane and hashes to the all-ones signature (a sign
/// test `h·x >= 0`), so: two zero vectors always collide (angle 0), and a zero vector
/// collides with a non-zero one on each bit with probability 1/2 (angle π/2).
///
/// # Panics
/// If `q.len() != k.len()` (a caller bug, as with slice indexing).
pub fn angle(q: &[f32], k: &[f32]) -> f64 {
    assert_eq!(q.len(), k.len(), "angle: q and k must have the same dimension");
    let (mut dot, mut qq, mut kk) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in q.iter().zip(k) {
        let (a, b) = (f64::from(a), f64::from(b));
        dot += a * b;
        qq += a * a;
        kk += b * b;
    }
    angle_from_parts(dot, qq.sqrt(), kk.sqrt())
}

/// Angle from a dot product and the two norms, with the zero-vector convention of [`angle`].
pub(crate) fn angle_from_parts(dot: f64, norm_q: f64, norm_k: f64) -> f64 {
    match (norm_q == 0.0, norm_k == 0.0) {
        (true, true) => 0.0,
        (true, false) | (false, true) => FRAC_PI_2,
        // Clamp: rounding can push |cos| a hair above 1.
        (false, false) => (dot / (norm_q * norm_k)).clamp(-1.0, 1.0).acos(),
    }
}

/// `ln p` for a `k_bits`-bit signature at angle `theta`: `K · ln(1 − θ/π)`.
pub(crate) fn ln_collision_at(theta: f64, k_bits: usize) -> f64 {
    k_bits as f64 * (-theta / PI).ln_1p()
}

/// Probability that `q` and `k` get the same `k_bits`-bit SimHash signature in one table:
/// `p = (1 − θ/π)^K`. See [`angle`] for zero vectors.
///
/// # Panics
/// If `q.len() != k.len()`.
pub fn collision_probability(q: &[f32], k: &[f32], k_bits: usize) -> f64 {
    ln_collision_at(angle(q, k), k_bits).exp()
}

/// Probability that `k` is retrieved for `q`, i.e. collides in at least one of `l_tables`
/// independent tables: `u = 1 − (1 − p)^L`, computed as `−expm1(L · ln1p(−p))` so that it
/// keeps full relative precision when `p` is tiny.
///
/// # Panics
/// If `q.len() != k.len()`.
pub fn retrieval_probability(q: &[f32], k: &[f32], k_bits: usize, l_tables: usize) -> f64 {
    let p = collision_probability(q, k, k_bits);
    -(l_tables as f64 * (-p).ln_1p()).exp_m1()
}

/// `P[Binomial(n, p) >= t]`, the probability that a key collides in at least `t` of `n`
/// tables when it collides in each with probability `p`. `t = 0` gives 1, `t > n` gives 0;
/// `p` is clamped to `[0, 1]` (NaN gives NaN).
pub fn binomial_tail(n: usize, p: f64, t: usize) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    ln_binomial_tail(n, p.clamp(0.0, 1.0).ln(), t).exp()
}

/// `ln P[Binomial(n, p) >= t]` from `ln p`, stable for tiny `p`.
///
/// The pmf terms are summed in log space. Whichever tail is the small one is summed directly:
/// above the mean the upper tail itself, below it the lower tail `P[X < t]`, returned as
/// `ln1p(−lower)`, which loses nothing because `lower` is then at most about one half.
pub(crate) fn ln_binomial_tail(n: usize, ln_p: f64, t: usize) -> f64 {
    if t == 0 || ln_p >= 0.0 {
        return if t <= n { 0.0 } else { f64::NEG_INFINITY };
    }
    if t > n || ln_p == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let p = ln_p.exp();
    let ln_q = (-p).ln_1p();
    let nf = n as f64;
    // ln pmf(j) = ln C(n, j) + j ln p + (n − j) ln q, with ln C built up term by term.
    let mut ln_choose = 0.0f64;
    let mut terms_upper = Vec::new();
    let mut terms_lower = Vec::new();
    let upper_direct = t as f64 > nf * p;
    for j in 0..=n {
        let ln_pmf = ln_choose + j as f64 * ln_p + (nf - j as f64) * ln_q;
        if j >= t {
            if !upper_direct {
                break;
            }
            terms_upper.push(ln_pmf);
        } else if !upper_direct {
            terms_lower.push(ln_pmf);
        }
        ln_choose += ((nf - j as f64) / (j as f64 + 1.0)).ln();
    }
    if upper_direct { log_sum_exp(&terms_upper) } else { (-log_sum_exp(&terms_lower).exp().min(1.0)).ln_1p() }
}

/// `ln Σ e^x_i`; `-inf` for an empty slice.
fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit vector at angle `theta` from `e0`, in dimension `dim >= 2`.
    fn at_angle(theta: f64, dim: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; dim];
        v[0] = theta.cos() as f32;
        v[1] = theta.sin() as f32;
        v
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs()) || a == b
    }

    #[test]
    fn angles_and_zero_vector_convention() {
        let e0 = at_angle(0.0, 4);
        assert!(angle(&e0, &e0).abs() < 1e-6);
        assert!((angle(&e0, &at_angle(FRAC_PI_2, 4)) - FRAC_PI_2).abs() < 1e-7);
        let minus: Vec<f32> = e0.iter().map(|x| -x).collect();
        assert!((angle(&e0, &minus) - PI).abs() < 1e-7);
        let z = vec![0.0f32; 4];
        assert_eq!(angle(&z, &z), 0.0);
        assert_eq!(angle(&z, &e0), FRAC_PI_2);
        assert_eq!(angle(&e0, &z), FRAC_PI_2);
        // Scale does not matter.
        let big: Vec<f32> = at_angle(1.0, 4).iter().map(|x| x * 1e3).collect();
        assert!((angle(&e0, &big) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn probabilities_at_their_bounds() {
        let (e0, orth) = (at_angle(0.0, 3), at_angle(FRAC_PI_2, 3));
        let minus: Vec<f32> = e0.iter().map(|x| -x).collect();
        for k in [1, 4, 8, 16, 32] {
            assert!(close(collision_probability(&e0, &e0, k), 1.0, 1e-9));
            assert!(close(collision_probability(&e0, &orth, k), 0.5f64.powi(k as i32), 1e-6));
            assert_eq!(collision_probability(&e0, &minus, k), 0.0);
            for l in [1, 8, 64, 512] {
                assert!(close(retrieval_probability(&e0, &e0, k, l), 1.0, 1e-9));
                assert_eq!(retrieval_probability(&e0, &minus, k, l), 0.0);
                let p = 0.5f64.powi(k as i32);
                assert!(close(retrieval_probability(&e0, &orth, k, l), 1.0 - (1.0 - p).powi(l as i32), 1e-6));
            }
        }
        // Zero vectors follow the hash: collide with each other always, with others as if orthogonal.
        let z = [0.0f32; 3];
        assert_eq!(collision_probability(&z, &z, 8), 1.0);
        assert!(close(collision_probability(&z, &e0, 8), 1.0 / 256.0, 1e-12));
    }

    #[test]
    fn retrieval_is_monotone_in_k_and_l() {
        let (q, k) = (at_angle(0.0, 2), at_angle(1.1, 2));
        for kb in 1..20 {
            for l in 1..40 {
                let u = retrieval_probability(&q, &k, kb, l);
                assert!(u > 0.0 && u <= 1.0);
                let (more_bits, more_tables) =
                    (retrieval_probability(&q, &k, kb + 1, l), retrieval_probability(&q, &k, kb, l + 1));
                assert!(more_bits <= u && more_tables >= u);
                // Strictly, unless u has rounded to 1.
                if u < 1.0 - 1e-9 {
                    assert!(more_bits < u && more_tables > u, "K={kb} L={l}");
                }
            }
        }
        // Monotone in the angle too.
        let mut last = 1.0;
        for i in 1..=20 {
            let u = retrieval_probability(&q, &at_angle(PI * i as f64 / 20.0, 2), 8, 16);
            assert!(u < last);
            last = u;
        }
    }

    #[test]
    fn binomial_tail_bounds_and_exact_values() {
        for n in [1, 5, 64] {
            for p in [0.0, 1e-9, 0.01, 0.3, 0.5, 0.99, 1.0] {
                assert_eq!(binomial_tail(n, p, 0), 1.0);
                assert_eq!(binomial_tail(n, p, n + 1), 0.0);
                // t = 1 is the retrieval probability.
                let u = -(n as f64 * (-p).ln_1p()).exp_m1();
                assert!(close(binomial_tail(n, p, 1), u, 1e-12), "n={n} p={p}");
                // t = n is p^n.
                assert!(close(binomial_tail(n, p, n), p.powi(n as i32), 1e-12));
                // Non-increasing in t.
                for t in 1..=n {
                    assert!(binomial_tail(n, p, t + 1) <= binomial_tail(n, p, t) * (1.0 + 1e-12));
                }
            }
        }
        assert_eq!(binomial_tail(8, 1.0, 8), 1.0);
        assert_eq!(binomial_tail(8, 0.0, 1), 0.0);
        // Exact small case: n = 4, p = 0.5, P[X >= 2] = 11/16.
        assert!(close(binomial_tail(4, 0.5, 2), 11.0 / 16.0, 1e-14));
        // Tiny p keeps relative precision: P[X >= 2] ~ C(64,2) p^2.
        let p = 1e-12;
        assert!(close(binomial_tail(64, p, 2), 2016.0 * p * p, 1e-9));
        // Monotone in n and p.
        assert!(binomial_tail(64, 0.1, 2) > binomial_tail(32, 0.1, 2));
        assert!(binomial_tail(64, 0.2, 2) > binomial_tail(64, 0.1, 2));
        assert!(binomial_tail(4, f64::NAN, 2).is_nan());
    }

    #[test]
    fn binomial_tail_matches_direct_sum() {
        for n in [3usize, 10, 40] {
            for p in [0.02f64, 0.2, 0.7] {
                let pmf = |j: usize| {
                    let mut c = 1.0f64;
                    for i in 0..j {
                        c = c * (n - i) as f64 / (i + 1) as f64;
                    }
                    c * p.powi(j as i32) * (1.0 - p).powi((n - j) as i32)
                };
                for t in 0..=n {
                    let direct: f64 = (t..=n).map(pmf).sum();
                    assert!(close(binomial_tail(n, p, t), direct, 1e-10), "n={n} p={p} t={t}");
                }
            }
        }
    }
}
