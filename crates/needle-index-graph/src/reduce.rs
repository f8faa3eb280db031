//! Query-aware dimension reduction for the graph walk (after LeanVec, Tepper et al. 2024).
//!
//! A beam search mostly scores keys it will not return, so those scores need only rank keys
//! roughly. [`Projection`] maps queries with `A` and keys with `B` (both `r × d`) so that
//! `⟨A·q, B·(k − μ)⟩` is the best rank-`r` approximation of `⟨q, k − μ⟩` in the mean squared
//! error over the training queries and the keys, and the walk scores these `r`-float vectors;
//! the candidates it ends with are re-ranked with the full vectors.
//!
//! Subtracting the key mean `μ` changes every score of one query by the same `⟨q, μ⟩`, so
//! rankings are untouched. With `L = Σ_k^{1/2}` (key covariance) and `Σ_q` the second moment of
//! the training queries, the error `E‖L_q (I − AᵀB) L‖²` is minimal for `A = Vᵀ L`,
//! `B = Vᵀ L⁻¹` with `V` the top-`r` eigenvectors of `L Σ_q L` (Eckart–Young on `Σ_q^{1/2} L`).
//! With `r = d`, `AᵀB = I`: the projected score is the exact centred score, so the maps are
//! the identity there (nothing to multiply; the keys are only centred, which also keeps their
//! shared offset out of the 8-bit codes' range).

use needle_core::{Error, Result};

/// Relative ridge added to the key covariance so that `L⁻¹` exists for degenerate keys.
const RIDGE: f64 = 1e-6;

/// The learned maps of a reduction to `r` dimensions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Projection {
    pub r: usize,
    dim: usize,
    /// Query map, row-major `r × dim`.
    a: Vec<f32>,
    /// Key map, row-major `r × dim`.
    b: Vec<f32>,
    /// Key mean.
    mu: Vec<f32>,
}

fn identity(dim: usize) -> Vec<f32> {
    (0..dim * dim).map(|i| if i % (dim + 1) == 0 { 1.0 } else { 0.0 }).collect()
}

impl Projection {
    /// Fits the maps to `keys` and `queries` (row-major, `dim` wide; neither empty).
    pub fn fit(keys: &[f32], queries: &[f32], dim: usize, r: usize) -> Result<Self> {
        if r == 0 || r > dim {
            return Err(Error::invalid("reduce", format!("{r} dimensions for vectors of {dim}: give 1..={dim}")));
        }
        let (n, t) = (keys.len() / dim, queries.len() / dim);
        if n == 0 || t == 0 {
            return Err(Error::invalid("reduce", "fitting a projection needs keys and queries"));
        }
        let mut mu = vec![0.0f64; dim];
        for k in keys.chunks_exact(dim) {
            mu.iter_mut().zip(k).for_each(|(m, &x)| *m += x as f64);
        }
        mu.iter_mut().for_each(|m| *m /= n as f64);
        let centred = keys.chunks_exact(dim).map(|k| k.iter().zip(&mu).map(|(&x, m)| x as f64 - m).collect::<Vec<_>>());
        if r == dim {
            return Ok(Self { r, dim, a: identity(dim), b: identity(dim), mu: mu.iter().map(|&m| m as f32).collect() });
        }
        let mut sk = second_moment(centred, dim, n);
        let sq = second_moment(queries.chunks_exact(dim).map(|q| q.iter().map(|&x| x as f64).collect()), dim, t);
        let ridge = RIDGE * (0..dim).map(|i| sk[i * dim + i]).sum::<f64>().max(f64::MIN_POSITIVE) / dim as f64;
        (0..dim).for_each(|i| sk[i * dim + i] += ridge);
        let (lam, w) = sym_eig(&sk, dim);
        // L = W √Λ Wᵀ and L⁻¹ = W Λ^{-1/2} Wᵀ.
        let root = |p: f64| -> Vec<f64> {
            let mut m = vec![0.0; dim * dim];
            for (e, &l) in lam.iter().enumerate() {
                let s = l.max(ridge).powf(p);
                for i in 0..dim {
                    let wi = w[i * dim + e] * s;
                    for j in 0..dim {
                        m[i * dim + j] += wi * w[j * dim + e];
                    }
                }
            }
            m
        };
        let (l, linv) = (root(0.5), root(-0.5));
        let m = matmul(&matmul(&l, &sq, dim), &l, dim);
        let (_, v) = sym_eig(&m, dim);
        // Rows of A and B: the top-r eigenvectors (columns of v, descending) times L and L⁻¹.
        let map = |x: &[f64]| -> Vec<f32> {
            let mut out = Vec::with_capacity(r * dim);
            for e in 0..r {
                for j in 0..dim {
                    out.push((0..dim).map(|i| v[i * dim + e] * x[i * dim + j]).sum::<f64>() as f32);
                }
            }
            out
        };
        Ok(Self { r, dim, a: map(&l), b: map(&linv), mu: mu.iter().map(|&m| m as f32).collect() })
    }

    /// True when the maps are the identity (`r = d`): queries are used as they are.
    pub fn is_identity(&self) -> bool {
        self.r == self.dim
    }

    /// Appends the projected query `A·q` (`r` floats) to `out`.
    pub fn query_into(&self, q: &[f32], out: &mut Vec<f32>) {
        if self.is_identity() {
            out.extend_from_slice(q);
            return;
        }
        out.extend(self.a.chunks_exact(self.dim).map(|a| needle_core::kit::dot(a, q)));
    }

    /// Appends the projected keys `B·(k − μ)` of `keys` (row-major) to `out`.
    pub fn keys_into(&self, keys: &[f32], out: &mut Vec<f32>) {
        let mut c = vec![0.0f32; self.dim];
        for k in keys.chunks_exact(self.dim) {
            c.iter_mut().zip(k.iter().zip(&self.mu)).for_each(|(c, (&x, &m))| *c = x - m);
            if self.is_identity() {
                out.extend_from_slice(&c);
            } else {
                out.extend(self.b.chunks_exact(self.dim).map(|b| needle_core::kit::dot(b, &c)));
            }
        }
    }

    /// Floats held.
    pub fn floats(&self) -> usize {
        self.a.len() + self.b.len() + self.mu.len()
    }

    pub fn save(&self, w: &mut needle_core::state::Writer<'_>) {
        w.len(self.r);
        w.f32s(&self.a);
        w.f32s(&self.b);
        w.f32s(&self.mu);
    }

    pub fn load(r: &mut needle_core::state::Reader<'_>, dim: usize) -> Result<Self> {
        let rr = r.len("reduce", dim)?;
        if rr == 0 {
            return Err(r.fail("reduce", "0 dimensions"));
        }
        let a = r.f32s("reduce.a", rr * dim)?;
        let b = r.f32s("reduce.b", rr * dim)?;
        let mu = r.f32s("reduce.mu", dim)?;
        if a.len() != rr * dim || b.len() != rr * dim || mu.len() != dim {
            return Err(
                r.fail("reduce", format!("maps of {} and {} floats and a mean of {}", a.len(), b.len(), mu.len()))
            );
        }
        if a.iter().chain(&b).chain(&mu).any(|x| !x.is_finite()) {
            return Err(r.fail("reduce", "non-finite values in the maps"));
        }
        if rr == dim && (a != identity(dim) || b != identity(dim)) {
            return Err(r.fail("reduce", "full-rank maps that are not the identity"));
        }
        Ok(Self { r: rr, dim, a, b, mu })
    }
}

/// Keys of the walk as 8-bit codes (LeanVec's LVQ-8, symmetric): each row `x` of `r` floats is
/// stored as `c = round(x / s)` with its own scale `s = max|x| / 127`, and scored as
/// `s · Σ q_i c_i`. A quarter of the bytes of `f32`, and a relative error of about 1/254 of
/// the row's largest entry per coordinate.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Codes8 {
    pub r: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl Codes8 {
    pub fn new(r: usize) -> Self {
        Self { r, codes: Vec::new(), scales: Vec::new() }
    }

    /// Appends the codes of `rows` (row-major, `r` wide).
    pub fn push(&mut self, rows: &[f32]) {
        for x in rows.chunks_exact(self.r) {
            let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if m > 0.0 { m / 127.0 } else { 1.0 };
            self.codes.extend(x.iter().map(|v| (v / s).round().clamp(-127.0, 127.0) as i8));
            self.scales.push(s);
        }
    }

    /// The approximate inner product of `q` (`r` floats) with row `i`.
    #[inline]
    pub fn score(&self, q: &[f32], i: u32) -> f32 {
        let c = &self.codes[i as usize * self.r..(i as usize + 1) * self.r];
        // Eight partial sums, so the loop vectorises.
        let mut acc = [0.0f32; 8];
        let (cc, qc) = (c.chunks_exact(8), q.chunks_exact(8));
        let (cr, qr) = (cc.remainder(), qc.remainder());
        for (c8, q8) in cc.zip(qc) {
            for l in 0..8 {
                acc[l] += c8[l] as f32 * q8[l];
            }
        }
        let tail: f32 = cr.iter().zip(qr).map(|(&c, &q)| c as f32 * q).sum();
        (acc.iter().sum::<f32>() + tail) * self.scales[i as usize]
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * 4
    }
}

/// `(1/count) Σ x xᵀ` of the rows `xs`, row-major `dim × dim`.
fn second_moment(xs: impl Iterator<Item = Vec<f64>>, dim: usize, count: usize) -> Vec<f64> {
    let mut s = vec![0.0f64; dim * dim];
    for x in xs {
        for i in 0..dim {
            let xi = x[i];
            for j in i..dim {
                s[i * dim + j] += xi * x[j];
            }
        }
    }
    for i in 0..dim {
        for j in i..dim {
            let v = s[i * dim + j] / count as f64;
            s[i * dim + j] = v;
            s[j * dim + i] = v;
        }
    }
    s
}

fn matmul(x: &[f64], y: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let a = x[i * n + k];
            for j in 0..n {
                out[i * n + j] += a * y[k * n + j];
            }
        }
    }
    out
}

/// Eigen-decomposition of a symmetric `n × n` matrix by cyclic Jacobi rotations: eigenvalues in
/// descending order and the eigenvectors as the columns of a row-major `n × n` matrix.
pub(crate) fn sym_eig(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let scale = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off.sqrt() <= 1e-14 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let vals = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (c, &src) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + c] = v[k * n + src];
        }
    }
    (vals, vecs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gauss(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) + rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn jacobi_reconstructs_random_symmetric_matrices() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [1, 2, 5, 17] {
            let x: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let m: Vec<f64> = (0..n * n).map(|i| x[i] + x[(i % n) * n + i / n]).collect();
            let (lam, v) = sym_eig(&m, n);
            assert!(lam.windows(2).all(|w| w[0] >= w[1]), "{lam:?}");
            for i in 0..n {
                for j in 0..n {
                    let back: f64 = (0..n).map(|e| v[i * n + e] * lam[e] * v[j * n + e]).sum();
                    assert!((back - m[i * n + j]).abs() < 1e-9, "n {n} ({i},{j}): {back} vs {}", m[i * n + j]);
                    let vtv: f64 = (0..n).map(|k| v[k * n + i] * v[k * n + j]).sum();
                    assert!((vtv - f64::from(u8::from(i == j))).abs() < 1e-9);
                }
            }
        }
    }

    /// The plain reference: `⟨q, k − μ⟩`.
    fn centred_score(q: &[f32], k: &[f32], mu: &[f32]) -> f32 {
        q.iter().zip(k.iter().zip(mu)).map(|(a, (b, m))| a * (b - m)).sum()
    }

    #[test]
    fn full_rank_projection_keeps_centred_scores() {
        let mut rng = StdRng::seed_from_u64(3);
        let dim = 12;
        let mut keys = gauss(&mut rng, 300 * dim);
        keys.iter_mut().step_by(dim).for_each(|x| *x += 3.0); // a common offset, as real keys have
        let queries = gauss(&mut rng, 80 * dim);
        let p = Projection::fit(&keys, &queries, dim, dim).unwrap();
        let (mut pk, mut pq) = (Vec::new(), Vec::new());
        p.keys_into(&keys, &mut pk);
        for q in gauss(&mut rng, 10 * dim).chunks_exact(dim) {
            pq.clear();
            p.query_into(q, &mut pq);
            for (k, kp) in keys.chunks_exact(dim).zip(pk.chunks_exact(dim)) {
                let approx: f32 = pq.iter().zip(kp).map(|(a, b)| a * b).sum();
                let exact = centred_score(q, k, &p.mu);
                assert!((approx - exact).abs() < 1e-3 * (1.0 + exact.abs()), "{approx} vs {exact}");
            }
        }
    }

    #[test]
    fn queries_in_a_subspace_lose_nothing_at_its_rank() {
        // Queries live in 3 of 16 dimensions: a 3-dimensional projection scores exactly.
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 16;
        let keys = gauss(&mut rng, 400 * dim);
        let basis = gauss(&mut rng, 3 * dim);
        let sub = |rng: &mut StdRng| -> Vec<f32> {
            let c = gauss(rng, 3);
            (0..dim).map(|j| (0..3).map(|e| c[e] * basis[e * dim + j]).sum()).collect()
        };
        let train: Vec<f32> = (0..100).flat_map(|_| sub(&mut rng)).collect();
        let p = Projection::fit(&keys, &train, dim, 3).unwrap();
        let mut pk = Vec::new();
        p.keys_into(&keys, &mut pk);
        for _ in 0..10 {
            let q = sub(&mut rng);
            let mut pq = Vec::new();
            p.query_into(&q, &mut pq);
            for (k, kp) in keys.chunks_exact(dim).zip(pk.chunks_exact(3)) {
                let approx: f32 = pq.iter().zip(kp).map(|(a, b)| a * b).sum();
                let exact = centred_score(&q, k, &p.mu);
                assert!((approx - exact).abs() < 2e-3 * (1.0 + exact.abs()), "{approx} vs {exact}");
            }
        }
        // A query outside the subspace is not scored exactly: the test above could fail.
        let q = gauss(&mut rng, dim);
        let mut pq = Vec::new();
        p.query_into(&q, &mut pq);
        let worst = keys
            .chunks_exact(dim)
            .zip(pk.chunks_exact(3))
            .map(|(k, kp)| (pq.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() - centred_score(&q, k, &p.mu)).abs())
            .fold(0.0f32, f32::max);
        assert!(worst > 0.1, "{worst}");
    }

    #[test]
    fn codes_score_close_to_the_floats() {
        let mut rng = StdRng::seed_from_u64(5);
        for r in [1, 7, 8, 16, 61] {
            let rows = gauss(&mut rng, 50 * r);
            let mut c = Codes8::new(r);
            c.push(&rows);
            let q = gauss(&mut rng, r);
            for (i, x) in rows.chunks_exact(r).enumerate() {
                let exact: f32 = q.iter().zip(x).map(|(a, b)| a * b).sum();
                let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let bound = q.iter().map(|v| v.abs()).sum::<f32>() * m / 254.0 + 1e-5;
                let got = c.score(&q, i as u32);
                assert!((got - exact).abs() <= bound, "r {r} row {i}: {got} vs {exact} (bound {bound})");
            }
        }
        // A zero row codes as zeros.
        let mut c = Codes8::new(4);
        c.push(&[0.0; 4]);
        assert_eq!(c.score(&[1.0, 2.0, 3.0, 4.0], 0), 0.0);
    }

    #[test]
    fn bad_ranks_are_named() {
        let e = Projection::fit(&[1.0; 8], &[1.0; 8], 4, 5).unwrap_err().to_string();
        assert!(e.contains("reduce"), "{e}");
        assert!(Projection::fit(&[1.0; 8], &[1.0; 8], 4, 0).is_err());
        assert!(Projection::fit(&[], &[1.0; 8], 4, 2).is_err());
    }
}
