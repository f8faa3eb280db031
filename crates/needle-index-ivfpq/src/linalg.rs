//! Small dense kernels: squared distances (inner products are needle-core's one `dot`), and a Cholesky factorisation in `f64`.

use needle_core::{Error, Result};

pub(crate) use needle_core::kit::dot;

/// Squared L2 norm.
#[inline]
pub(crate) fn norm2(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Index and squared L2 distance of the centroid nearest to `x`, using precomputed centroid norms:
/// `‖x − c‖² = ‖x‖² + ‖c‖² − 2 x·c`, so the scan is one dot product per centroid.
#[inline]
pub(crate) fn nearest(x: &[f32], centroids: &[f32], norms: &[f32], dim: usize) -> (u32, f32) {
    let mut best = (0u32, f32::INFINITY);
    for (j, (c, &cn)) in centroids.chunks_exact(dim).zip(norms).enumerate() {
        let d = cn - 2.0 * dot(x, c);
        if d < best.1 {
            best = (j as u32, d);
        }
    }
    (best.0, (best.1 + norm2(x)).max(0.0))
}

/// Squared norms of the rows of a row-major matrix.
pub(crate) fn row_norms(rows: &[f32], dim: usize) -> Vec<f32> {
    rows.chunks_exact(dim).map(norm2).collect()
}

/// Lower-triangular `L` with `a = L Lᵀ` for a symmetric positive-definite `n × n` row-major `a`.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    if a.len() != n * n {
        return Err(Error::DimensionMismatch { what: "cholesky matrix".into(), expected: n * n, got: a.len() });
    }
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|p| l[i * n + p] * l[j * n + p]).sum();
            let v = a[i * n + j] - s;
            if i == j {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::invalid(
                        "qa_reg",
                        format!("query covariance is not positive definite at pivot {i} ({v:e}); raise qa_reg"),
                    ));
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// Inverse of a lower-triangular `n × n` matrix by forward substitution (the result is lower-triangular).
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0f64; n * n];
    for col in 0..n {
        // Solve L x = e_col; x is zero above `col`.
        for i in col..n {
            let rhs = if i == col { 1.0 } else { 0.0 };
            let s: f64 = (col..i).map(|p| l[i * n + p] * inv[p * n + col]).sum();
            inv[i * n + col] = (rhs - s) / l[i * n + i];
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_reconstructs_and_inverts() {
        let a = [4.0, 2.0, 0.4, 2.0, 5.0, 1.0, 0.4, 1.0, 3.0];
        let l = cholesky(&a, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f64 = (0..3).map(|p| l[i * 3 + p] * l[j * 3 + p]).sum();
                assert!((v - a[i * 3 + j]).abs() < 1e-12);
            }
        }
        let inv = lower_inverse(&l, 3);
        for i in 0..3 {
            for j in 0..3 {
                let v: f64 = (0..3).map(|p| l[i * 3 + p] * inv[p * 3 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
