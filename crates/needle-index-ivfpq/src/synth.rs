//! Seeded synthetic data shaped like attention keys and queries, for tests and benches.
//!
//! Keys: a shared offset with two large outlier dimensions, clustered around a few dozen
//! centres, with per-dimension spread that varies tenfold. Queries come from a different
//! distribution (out of distribution for the keys, as in RetrievalAttention): their own offset,
//! and energy concentrated in a low-rank subspace that leans on the dimensions where keys vary
//! least, so an index fitted to the keys alone spends its bits in the wrong places.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Keys, held-out queries and a separate sample of training queries, all row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLike {
    /// Vector dimension.
    pub dim: usize,
    /// `n_keys × dim`.
    pub keys: Vec<f32>,
    /// Evaluation queries, `n_queries × dim`.
    pub queries: Vec<f32>,
    /// Training queries from the same distribution as `queries`, `n_train × dim`.
    pub train_queries: Vec<f32>,
}

fn normal(rng: &mut StdRng) -> f32 {
    // Box–Muller; avoids a dependency for a test-data generator.
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Generates the data set; every number is a pure function of the arguments.
pub fn attention_like(n_keys: usize, n_queries: usize, n_train: usize, dim: usize, seed: u64) -> AttentionLike {
    let mut rng = StdRng::seed_from_u64(seed);
    let dim = dim.max(1);
    // Per-dimension key spread from 2.8 down to 0.3, in a random order.
    let mut spread: Vec<f32> = (0..dim).map(|i| 0.3 + 2.5 * (-3.0 * i as f32 / dim as f32).exp()).collect();
    for i in (1..dim).rev() {
        spread.swap(i, rng.random_range(0..=i));
    }
    let outliers = [0, dim / 2];
    let mut key_offset: Vec<f32> = (0..dim).map(|_| 0.5 * normal(&mut rng)).collect();
    let mut query_offset: Vec<f32> = (0..dim).map(|_| 0.3 * normal(&mut rng)).collect();
    for &o in &outliers {
        key_offset[o] = 8.0;
        query_offset[o] = 3.0;
    }
    let n_centres = 32;
    let centres: Vec<f32> = (0..n_centres * dim).map(|i| spread[i % dim] * normal(&mut rng)).collect();
    let mut keys = Vec::with_capacity(n_keys * dim);
    for _ in 0..n_keys {
        let c = rng.random_range(0..n_centres);
        for d in 0..dim {
            keys.push(key_offset[d] + centres[c * dim + d] + 0.6 * spread[d] * normal(&mut rng));
        }
    }
    // Low-rank query mixing, weighted towards the quiet key dimensions.
    let rank = 6;
    let mix: Vec<f32> = (0..dim * rank).map(|i| normal(&mut rng) * 1.2 / spread[i / rank]).collect();
    let query = |rng: &mut StdRng| -> Vec<f32> {
        let z: Vec<f32> = (0..rank).map(|_| normal(rng)).collect();
        (0..dim)
            .map(|d| query_offset[d] + (0..rank).map(|r| mix[d * rank + r] * z[r]).sum::<f32>() + 0.2 * normal(rng))
            .collect()
    };
    let queries = (0..n_queries).flat_map(|_| query(&mut rng)).collect();
    let train_queries = (0..n_train).flat_map(|_| query(&mut rng)).collect();
    AttentionLike { dim, keys, queries, train_queries }
}
