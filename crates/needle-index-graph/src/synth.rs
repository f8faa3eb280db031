//! Seeded synthetic data that mimics attention keys and queries (tests and the example).
//!
//! Keys share a large offset and two outlier channels (as real K projections do) and fall
//! in clusters; queries have their own mean direction and clusters. So decode-like queries
//! are out of the keys' distribution: their top keys are the keys most extreme along the
//! query direction, which are scattered across the key clusters, not neighbours of each other.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// Generator of attention-like keys and queries.
pub struct AttentionLike {
    dim: usize,
    key_offset: Vec<f32>,
    key_centers: Vec<Vec<f32>>,
    query_offset: Vec<f32>,
    query_centers: Vec<Vec<f32>>,
}

fn gaussian(rng: &mut StdRng, dim: usize, sigma: f32) -> Vec<f32> {
    let n = Normal::new(0.0f32, sigma).unwrap_or_else(|_| unreachable!("sigma is positive"));
    (0..dim).map(|_| n.sample(rng)).collect()
}

fn scaled_unit(rng: &mut StdRng, dim: usize, norm: f32) -> Vec<f32> {
    let v = gaussian(rng, dim, 1.0);
    let len = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.into_iter().map(|x| x * norm / len).collect()
}

impl AttentionLike {
    /// A generator for vectors of `dim >= 4` floats.
    pub fn new(dim: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut key_offset = scaled_unit(&mut rng, dim, 4.0);
        // Outlier channels: large and the same sign in every key.
        key_offset[0] = 8.0;
        key_offset[1] = -6.0;
        let key_centers = (0..24).map(|_| gaussian(&mut rng, dim, 0.6)).collect();
        let mut query_offset = scaled_unit(&mut rng, dim, 3.0);
        query_offset[0] = 0.5;
        query_offset[1] = 0.3;
        let query_centers = (0..16).map(|_| gaussian(&mut rng, dim, 0.5)).collect();
        Self { dim, key_offset, key_centers, query_offset, query_centers }
    }

    fn draw(&self, n: usize, seed: u64, offset: &[f32], centers: &[Vec<f32>], noise: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let pick = rand::distr::Uniform::new(0, centers.len()).unwrap_or_else(|_| unreachable!("centers exist"));
        let nz = Normal::new(0.0f32, noise).unwrap_or_else(|_| unreachable!("noise is positive"));
        let mut out = Vec::with_capacity(n * self.dim);
        for _ in 0..n {
            let c = &centers[pick.sample(&mut rng)];
            out.extend((0..self.dim).map(|d| offset[d] + c[d] + nz.sample(&mut rng)));
        }
        out
    }

    /// `n` keys, row-major.
    pub fn keys(&self, n: usize, seed: u64) -> Vec<f32> {
        self.draw(n, seed, &self.key_offset, &self.key_centers, 0.6)
    }

    /// `n` queries, row-major (prefill and decode queries come from the same law).
    pub fn queries(&self, n: usize, seed: u64) -> Vec<f32> {
        self.draw(n, seed, &self.query_offset, &self.query_centers, 0.25)
    }
}
