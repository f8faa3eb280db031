//! SimHash (Charikar 2002): bit `j` of a signature is the sign of `h_j · x` for a Gaussian
//! random hyperplane normal `h_j`. `K` bits make one table's signature; `L` tables draw
//! independent hyperplanes, so their collisions are independent Bernoulli trials.

use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;

/// Largest `K`: a signature is packed in a `u32`. Beyond ~20 bits the per-table collision
/// probability of anything but near-duplicates is negligible, so 32 is no real limit.
pub const MAX_K_BITS: usize = 32;

/// `L × K` hyperplane normals, table-major, each a row of `dim` floats.
#[derive(Debug, Clone)]
pub(crate) struct SimHash {
    dim: usize,
    k_bits: usize,
    l_tables: usize,
    planes: Vec<f32>,
}

impl SimHash {
    /// Draws the hyperplanes from `N(0, I)` with a seeded generator: same seed, same tables.
    pub(crate) fn new(dim: usize, k_bits: usize, l_tables: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let planes = (0..l_tables * k_bits * dim).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
        Self { dim, k_bits, l_tables, planes }
    }

    /// Signatures of `x` in the first `out.len()` tables. A tie `h·x = 0` (a zero vector,
    /// in practice) sets the bit, which is what the zero-vector convention of
    /// [`crate::angle`] relies on.
    /// Hyperplanes drawn elsewhere (`l_tables × k_bits × dim`, checked by the caller).
    pub(crate) fn from_planes(dim: usize, k_bits: usize, l_tables: usize, planes: Vec<f32>) -> Self {
        Self { dim, k_bits, l_tables, planes }
    }

    pub(crate) fn planes(&self) -> &[f32] {
        &self.planes
    }

    pub(crate) fn sign_into(&self, x: &[f32], out: &mut [u32]) {
        let row = self.k_bits * self.dim;
        for (t, sig) in out.iter_mut().enumerate().take(self.l_tables) {
            let table = &self.planes[t * row..(t + 1) * row];
            *sig = table
                .chunks_exact(self.dim)
                .enumerate()
                .fold(0u32, |s, (j, h)| if dot(h, x) >= 0.0 { s | (1 << j) } else { s });
        }
    }

    /// Signatures of a row-major batch, `n × L` row-major, hashed in parallel.
    pub(crate) fn sign_batch(&self, xs: &[f32]) -> Vec<u32> {
        let mut out = vec![0u32; xs.len() / self.dim * self.l_tables];
        out.par_chunks_exact_mut(self.l_tables.max(1))
            .zip(xs.par_chunks_exact(self.dim))
            .for_each(|(sigs, x)| self.sign_into(x, sigs));
        out
    }

    /// Bytes read to hash one vector in `tables` tables.
    pub(crate) fn bytes_per_hash(&self, tables: usize) -> u64 {
        (tables * self.k_bits * self.dim * 4) as u64
    }

    /// Bytes held.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.planes.len() * 4
    }
}

pub(crate) use needle_core::kit::dot;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_signatures_and_batch_matches_single() {
        let xs: Vec<f32> = (0..5 * 9).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let (a, b) = (SimHash::new(9, 6, 7, 42), SimHash::new(9, 6, 7, 42));
        let batch = a.sign_batch(&xs);
        assert_eq!(batch, b.sign_batch(&xs));
        assert_ne!(batch, SimHash::new(9, 6, 7, 43).sign_batch(&xs));
        for (i, x) in xs.chunks_exact(9).enumerate() {
            let mut one = vec![0u32; 7];
            a.sign_into(x, &mut one);
            assert_eq!(&batch[i * 7..(i + 1) * 7], &one[..]);
            assert!(one.iter().all(|&s| s < 1 << 6));
        }
        // A zero vector lies on every hyperplane: all bits set.
        let mut z = vec![0u32; 7];
        a.sign_into(&[0.0; 9], &mut z);
        assert!(z.iter().all(|&s| s == 0b111111));
        // Scaling by a positive factor never changes a signature.
        let scaled: Vec<f32> = xs.iter().map(|x| x * 3.5).collect();
        assert_eq!(a.sign_batch(&scaled), batch);
    }
}
