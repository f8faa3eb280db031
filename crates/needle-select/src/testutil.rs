//! Seeded synthetic data and checks shared by the selector tests.

use needle_core::attention::{Partial, dense};
use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, Rows, Selection, SelectorFactory, attend_selected};
use rand::{Rng, SeedableRng, rngs::StdRng};

pub const HEAD: HeadId = HeadId { layer: 0, kv_head: 0 };

/// Standard normal samples (Box–Muller), seeded.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// Attention-like data: keys share an offset and a few outlier dimensions; queries come from a
/// shifted distribution (mostly opposite the key offset), as post-RoPE keys and queries do.
pub struct Data {
    pub dim: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// Prefill queries (training sample).
    pub train: Vec<f32>,
    /// Decode queries.
    pub queries: Vec<f32>,
}

pub fn attention_like(n: usize, n_train: usize, n_queries: usize, dim: usize, seed: u64) -> Data {
    let offset: Vec<f32> = normal(dim, seed ^ 1).iter().map(|x| x * 0.8).collect();
    let outliers = [1usize, dim / 3, dim / 2];
    let mut keys = normal(n * dim, seed ^ 2);
    for (i, k) in keys.chunks_exact_mut(dim).enumerate() {
        k.iter_mut().zip(&offset).for_each(|(x, o)| *x = 0.5 * *x + o);
        for &d in &outliers {
            k[d] += 4.0 * (((i * 7919) % 13) as f32 / 13.0);
        }
    }
    // Queries: a shared direction (opposite of the offset), with per-query variation.
    let dir: Vec<f32> = normal(dim, seed ^ 3);
    let make = |m: usize, s: u64| -> Vec<f32> {
        let mut q = normal(m * dim, s);
        for r in q.chunks_exact_mut(dim) {
            r.iter_mut().zip(dir.iter().zip(&offset)).for_each(|(x, (d, o))| *x = 1.5 * *x + d - 0.5 * o);
            for &d in &outliers {
                r[d] += 1.0;
            }
        }
        q
    };
    Data {
        dim,
        values: normal(n * dim, seed ^ 4),
        train: make(n_train, seed ^ 5),
        queries: make(n_queries, seed ^ 6),
        keys,
    }
}

/// Uniformly random data in `[-1, 1)`.
pub fn uniform(n: usize, n_queries: usize, dim: usize, seed: u64) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = |m: usize| -> Vec<f32> { (0..m * dim).map(|_| rng.random_range(-1.0..1.0)).collect() };
    Data { dim, keys: v(n), values: v(n), train: v(n_queries.max(8)), queries: v(n_queries) }
}

/// Builds a selector from `factory` over `data` (all keys), with the data's training queries.
pub fn built(factory: &dyn SelectorFactory, data: &Data) -> Box<dyn AttentionSelector> {
    let mut sel = factory.create(HEAD, data.dim).unwrap();
    let keys = Rows::new("keys", &data.keys, data.dim).unwrap();
    let scale = 1.0 / (data.dim as f32).sqrt();
    sel.build(&BuildContext { head: HEAD, keys: &keys, train_queries: &data.train, scale }).unwrap();
    sel
}

/// Selects for the query group `group` (rows of `data.queries`).
pub fn select(sel: &mut dyn AttentionSelector, data: &Data, group: &[f32], budget: Budget) -> Selection {
    let keys = Rows::new("keys", &data.keys, data.dim).unwrap();
    let mut out = Selection::default();
    sel.select(group, &keys, &budget, &mut out).unwrap();
    out
}

/// Every query of the group: static part + selection, merged, equals dense attention.
pub fn assert_dense(sel: &dyn AttentionSelector, data: &Data, group: &[f32], selection: &Selection, tol: f64) {
    let keys = Rows::new("keys", &data.keys, data.dim).unwrap();
    let values = Rows::new("values", &data.values, data.dim).unwrap();
    let scale = 1.0 / (data.dim as f32).sqrt();
    for q in group.chunks_exact(data.dim) {
        let full: Partial<f64> = dense(q, &keys, &values, scale).unwrap();
        let got: Partial<f64> = attend_selected(q, &keys, &values, sel.static_part(), selection, scale).unwrap();
        assert!((full.lse - got.lse).abs() < tol, "{}: lse {} vs {}", sel.describe(), got.lse, full.lse);
        for (a, b) in got.out.iter().zip(&full.out) {
            assert!((a - b).abs() < tol, "{}: out {a} vs {b}", sel.describe());
        }
    }
}

/// Exact top-k positions by the group score `max_h q_h·k` over `range`.
pub fn true_topk(data: &Data, group: &[f32], range: std::ops::Range<u32>, k: usize) -> Vec<u32> {
    let d = data.dim;
    let mut s: Vec<(u32, f32)> = range
        .map(|p| {
            let key = &data.keys[p as usize * d..(p as usize + 1) * d];
            let m = group
                .chunks_exact(d)
                .map(|q| q.iter().zip(key).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max);
            (p, m)
        })
        .collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    s.truncate(k);
    s.into_iter().map(|x| x.0).collect()
}
