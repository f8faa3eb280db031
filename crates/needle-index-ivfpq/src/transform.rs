//! Query-aware metric (A²ATS / PQCache idea). With `Σ = E[q qᵀ]` over training queries, the
//! expected squared inner-product error of a reconstruction `k̂` is
//! `E_q[(q·k − q·k̂)²] = (k − k̂)ᵀ Σ (k − k̂)`. Factor `Σ + λI = L Lᵀ`; then
//! `(k − k̂)ᵀ (Σ + λI) (k − k̂) = ‖Lᵀk − Lᵀk̂‖²`, so plain L2 quantization of `k' = Lᵀk` minimises the
//! query-weighted error, and queries mapped by `q' = L⁻¹q` keep inner products: `q'·k' = q·k`.
//! `λ = qa_reg · tr(Σ)/dim` keeps directions unseen in the training queries from collapsing.

use needle_core::{Error, Result, check_batch};

use crate::linalg::{cholesky, dot, lower_inverse};

/// The pair of linear maps `k ↦ Lᵀk`, `q ↦ L⁻¹q` fitted to a query sample.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryTransform {
    dim: usize,
    /// `Lᵀ`, row-major.
    key_map: Vec<f32>,
    /// `L⁻¹`, row-major.
    query_map: Vec<f32>,
}

impl QueryTransform {
    /// Fits the transform to `queries` (row-major `n × dim`, `n >= 1`) with relative ridge `reg > 0`.
    pub fn fit(queries: &[f32], dim: usize, reg: f32) -> Result<Self> {
        let n = check_batch("train_queries", queries, dim)?;
        if n == 0 {
            return Err(Error::EmptyKeys { what: "query-aware training (train_queries)".into() });
        }
        if !(reg.is_finite() && reg > 0.0) {
            return Err(Error::invalid("qa_reg", format!("must be finite and > 0, got {reg}")));
        }
        let mut sigma = vec![0.0f64; dim * dim];
        for q in queries.chunks_exact(dim) {
            for i in 0..dim {
                let qi = q[i] as f64;
                for (s, &qj) in sigma[i * dim..i * dim + i + 1].iter_mut().zip(q) {
                    *s += qi * qj as f64;
                }
            }
        }
        let trace: f64 = (0..dim).map(|i| sigma[i * dim + i]).sum();
        // Scale Σ to unit mean eigenvalue: inner products are unchanged, magnitudes stay near the input's.
        let scale = if trace > 0.0 && trace.is_finite() { dim as f64 / trace } else { 1.0 };
        for i in 0..dim {
            for j in 0..=i {
                let v = sigma[i * dim + j] * scale;
                sigma[i * dim + j] = v;
                sigma[j * dim + i] = v;
            }
            sigma[i * dim + i] += reg as f64;
        }
        let l = cholesky(&sigma, dim)?;
        let inv = lower_inverse(&l, dim);
        let mut key_map = vec![0.0f32; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                key_map[i * dim + j] = l[j * dim + i] as f32;
            }
        }
        Ok(Self { dim, key_map, query_map: inv.iter().map(|&v| v as f32).collect() })
    }

    /// `(Lᵀ, L⁻¹)`, row-major.
    pub(crate) fn maps(&self) -> (&[f32], &[f32]) {
        (&self.key_map, &self.query_map)
    }

    /// A transform from its two maps (each `dim × dim`, checked by the caller).
    pub(crate) fn from_maps(dim: usize, key_map: Vec<f32>, query_map: Vec<f32>) -> Self {
        Self { dim, key_map, query_map }
    }

    /// `Lᵀ k` into `out`.
    #[inline]
    pub fn map_key(&self, k: &[f32], out: &mut [f32]) {
        for (o, row) in out.iter_mut().zip(self.key_map.chunks_exact(self.dim)) {
            *o = dot(row, k);
        }
    }

    /// `L⁻¹ q` into `out`.
    #[inline]
    pub fn map_query(&self, q: &[f32], out: &mut [f32]) {
        for (o, row) in out.iter_mut().zip(self.query_map.chunks_exact(self.dim)) {
            *o = dot(row, q);
        }
    }

    /// `L⁻ᵀ k'` into `out`: back from the transformed key space.
    pub fn unmap_key(&self, kt: &[f32], out: &mut [f32]) {
        out.iter_mut().for_each(|o| *o = 0.0);
        for (row, &v) in self.query_map.chunks_exact(self.dim).zip(kt) {
            for (o, &r) in out.iter_mut().zip(row) {
                *o += r * v;
            }
        }
    }

    /// Bytes held by the two maps.
    pub fn memory_bytes(&self) -> usize {
        (self.key_map.len() + self.query_map.len()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserves_inner_products_and_round_trips() {
        let dim = 5;
        let qs: Vec<f32> = (0..40).map(|i| ((i * 7 % 11) as f32 - 5.0) * if i % 5 == 0 { 4.0 } else { 0.3 }).collect();
        let t = QueryTransform::fit(&qs, dim, 0.05).unwrap();
        let q = [0.3, -1.0, 2.0, 0.5, -0.7];
        let k = [1.5, 0.2, -0.4, 3.0, 0.9];
        let (mut qt, mut kt, mut back) = ([0.0; 5], [0.0; 5], [0.0; 5]);
        t.map_query(&q, &mut qt);
        t.map_key(&k, &mut kt);
        let (a, b) = (dot(&q, &k), dot(&qt, &kt));
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        t.unmap_key(&kt, &mut back);
        for (x, y) in back.iter().zip(&k) {
            assert!((x - y).abs() < 1e-4);
        }
        assert!(QueryTransform::fit(&qs, dim, 0.0).is_err());
        assert!(QueryTransform::fit(&[], dim, 0.1).is_err());
    }
}
