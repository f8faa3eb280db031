//! Seeded synthetic data for tests, examples and benchmarks (feature `synth`): attention-like
//! keys and queries, and plain Gaussian and uniform samples. Every number is a pure function
//! of the arguments.
//!
//! [`AttentionLike`] mimics post-RoPE attention vectors: keys share a large offset and two
//! outlier channels (as real K projections do) and fall in clusters; queries have their own
//! mean direction and clusters. So decode-like queries are out of the keys' distribution (the
//! gap RetrievalAttention points out): their top keys are the keys most extreme along the query
//! direction, scattered across the key clusters rather than neighbours of each other.
//!
//! ```
//! use needle_core::synth::AttentionLike;
//! let data = AttentionLike::new(16, 7);
//! let keys = data.keys(100, 1);
//! let queries = data.queries(4, 2);
//! assert_eq!((keys.len(), queries.len()), (100 * 16, 4 * 16));
//! assert_eq!(keys, AttentionLike::new(16, 7).keys(100, 1));
//! ```

use rand::distr::Uniform;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StandardNormal};

/// Generator of attention-like keys and queries of one head.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLike {
    dim: usize,
    key_offset: Vec<f32>,
    key_centers: Vec<Vec<f32>>,
    query_offset: Vec<f32>,
    query_centers: Vec<Vec<f32>>,
}

fn normal_vec(rng: &mut StdRng, dim: usize, sigma: f32) -> Vec<f32> {
    (0..dim).map(|_| sigma * rng.sample::<f32, _>(StandardNormal)).collect()
}

fn scaled_unit(rng: &mut StdRng, dim: usize, norm: f32) -> Vec<f32> {
    let v = normal_vec(rng, dim, 1.0);
    let len = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.into_iter().map(|x| x * norm / len).collect()
}

impl AttentionLike {
    /// Key clusters.
    pub const KEY_CLUSTERS: usize = 24;
    /// Query clusters.
    pub const QUERY_CLUSTERS: usize = 16;
    /// Per-coordinate noise of a key around its cluster.
    pub const KEY_NOISE: f32 = 0.6;
    /// Per-coordinate noise of a query around its cluster.
    pub const QUERY_NOISE: f32 = 0.25;

    /// A generator for vectors of `dim` floats (`dim >= 2`; smaller is raised to 2).
    pub fn new(dim: usize, seed: u64) -> Self {
        let dim = dim.max(2);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut key_offset = scaled_unit(&mut rng, dim, 4.0);
        // Outlier channels: large and the same sign in every key.
        key_offset[0] = 8.0;
        key_offset[1] = -6.0;
        let key_centers = (0..Self::KEY_CLUSTERS).map(|_| normal_vec(&mut rng, dim, 0.6)).collect();
        let mut query_offset = scaled_unit(&mut rng, dim, 3.0);
        query_offset[0] = 0.5;
        query_offset[1] = 0.3;
        let query_centers = (0..Self::QUERY_CLUSTERS).map(|_| normal_vec(&mut rng, dim, 0.5)).collect();
        Self { dim, key_offset, key_centers, query_offset, query_centers }
    }

    /// Floats per vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `n` rows, each `group` vectors that share one cluster of `centers` (row-major).
    fn draw(&self, n: usize, group: usize, seed: u64, offset: &[f32], centers: &[Vec<f32>], noise: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let nz = Normal::new(0.0f32, noise).unwrap_or_else(|_| unreachable!("noise is positive"));
        let pick = Uniform::new(0, centers.len()).unwrap_or_else(|_| unreachable!("centers exist"));
        let mut out = Vec::with_capacity(n * group * self.dim);
        for _ in 0..n {
            let c = &centers[pick.sample(&mut rng)];
            for _ in 0..group {
                out.extend((0..self.dim).map(|d| offset[d] + c[d] + nz.sample(&mut rng)));
            }
        }
        out
    }

    /// `n` keys, row-major.
    pub fn keys(&self, n: usize, seed: u64) -> Vec<f32> {
        self.draw(n, 1, seed, &self.key_offset, &self.key_centers, Self::KEY_NOISE)
    }

    /// `n` queries, row-major (prefill and decode queries come from the same law).
    pub fn queries(&self, n: usize, seed: u64) -> Vec<f32> {
        self.draw(n, 1, seed, &self.query_offset, &self.query_centers, Self::QUERY_NOISE)
    }

    /// Queries of a GQA group at `positions` positions: `positions × group` rows, row-major; the
    /// `group` query heads of one position share a query cluster (as heads reading one KV head
    /// look for related keys) and differ by their own noise.
    pub fn group_queries(&self, positions: usize, group: usize, seed: u64) -> Vec<f32> {
        self.draw(positions, group.max(1), seed, &self.query_offset, &self.query_centers, Self::QUERY_NOISE)
    }
}

/// `n` samples of N(0, `std`²).
pub fn gaussian(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| std * rng.sample::<f32, _>(StandardNormal)).collect()
}

/// `n` samples uniform in `[lo, hi)` (`lo < hi`).
pub fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::dot;

    #[test]
    fn seeded_and_shaped() {
        let g = AttentionLike::new(8, 1);
        assert_eq!(g.keys(10, 3), g.keys(10, 3));
        assert_ne!(g.keys(10, 3), g.keys(10, 4));
        assert_eq!(g.group_queries(5, 3, 1).len(), 5 * 3 * 8);
        assert_eq!(gaussian(4, 1.0, 9), gaussian(4, 1.0, 9));
        assert!(uniform(100, -1.0, 1.0, 2).iter().all(|x| (-1.0..1.0).contains(x)));
        let s = gaussian(20_000, 2.0, 5);
        let var = s.iter().map(|x| f64::from(x * x)).sum::<f64>() / s.len() as f64;
        assert!((var - 4.0).abs() < 0.2, "{var}");
    }

    #[test]
    fn queries_are_out_of_the_keys_distribution() {
        // The mean key and the mean query point in different directions, and a group's heads
        // are closer to each other than to another position's.
        let g = AttentionLike::new(64, 7);
        let mean = |xs: &[f32]| -> Vec<f32> {
            let n = (xs.len() / 64) as f32;
            (0..64).map(|d| xs.iter().skip(d).step_by(64).sum::<f32>() / n).collect()
        };
        let (k, q) = (mean(&g.keys(2000, 1)), mean(&g.queries(2000, 2)));
        let cos = dot(&k, &q) / (dot(&k, &k).sqrt() * dot(&q, &q).sqrt());
        assert!(cos < 0.6, "cos(mean key, mean query) = {cos}");
        let gq = g.group_queries(200, 2, 3);
        let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
        let (mut same, mut other) = (0.0, 0.0);
        for p in 0..199 {
            let (a, b, c) = (&gq[p * 128..][..64], &gq[p * 128 + 64..][..64], &gq[(p + 1) * 128..][..64]);
            same += dist(a, b);
            other += dist(a, c);
        }
        assert!(same < 0.5 * other, "{same} vs {other}");
    }
}
