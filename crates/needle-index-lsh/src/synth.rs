//! Seeded synthetic keys and queries shaped like attention's: keys in clusters around a
//! shared offset, a few large-norm outliers, and queries from a shifted distribution (their
//! own offset, tighter around the cluster centres), the out-of-distribution gap that
//! RetrievalAttention points out between prefill keys and decode queries.
//! Shared by the tests and `examples/lsh_report.rs` (through `#[path]`).

use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

/// `n` keys and `m` queries of dimension `dim`, row-major, from `seed`.
pub fn keys_and_queries(n: usize, m: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let gauss =
        |rng: &mut StdRng, s: f32| -> Vec<f32> { (0..dim).map(|_| s * rng.sample::<f32, _>(StandardNormal)).collect() };
    let clusters: Vec<Vec<f32>> = (0..16).map(|_| gauss(&mut rng, 1.0)).collect();
    let key_offset = gauss(&mut rng, 0.7);
    let query_offset = gauss(&mut rng, 0.7);
    let mut keys = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = &clusters[rng.random_range(0..clusters.len())];
        let noise = gauss(&mut rng, 0.6);
        let scale = if rng.random_bool(0.02) { 4.0 } else { 1.0 };
        keys.extend((0..dim).map(|d| scale * (c[d] + key_offset[d] + noise[d])));
    }
    let mut queries = Vec::with_capacity(m * dim);
    for _ in 0..m {
        let c = &clusters[rng.random_range(0..clusters.len())];
        let noise = gauss(&mut rng, 0.5);
        queries.extend((0..dim).map(|d| c[d] + query_offset[d] + noise[d]));
    }
    (keys, queries)
}

/// Recall of `got` against the exact `truth`, over all query rows (order ignored).
pub fn recall(truth: &needle_core::SearchResult, got: &needle_core::SearchResult) -> f64 {
    let (mut hit, mut total) = (0usize, 0usize);
    for i in 0..truth.n_queries() {
        let t = truth.labels_of(i);
        hit += got.labels_of(i).iter().filter(|l| t.contains(l)).count();
        total += t.len();
    }
    hit as f64 / total.max(1) as f64
}
