//! Seeded synthetic data and checks shared by the selector tests.

use needle_core::attention::{Partial, dense};
use needle_core::synth::{self, AttentionLike};
use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, Rows, Selection, SelectorFactory, attend_selected};

pub const HEAD: HeadId = HeadId { layer: 0, kv_head: 0 };

/// Keys, values and queries of one KV head, from needle-core's one synthetic generator.
pub struct Data {
    pub dim: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// Prefill queries (training sample).
    pub train: Vec<f32>,
    /// Decode queries: groups of 3 rows (a GQA group's heads) in order.
    pub queries: Vec<f32>,
}

/// Attention-like data (`needle_core::synth::AttentionLike`): clustered keys with a shared
/// offset and outlier channels, queries out of the keys' distribution; `n_queries` rows of
/// decode queries in GQA groups of 3 sharing a cluster.
pub fn attention_like(n: usize, n_train: usize, n_queries: usize, dim: usize, seed: u64) -> Data {
    let g = AttentionLike::new(dim, seed);
    Data {
        dim,
        keys: g.keys(n, seed ^ 1),
        values: synth::gaussian(n * dim, 1.0, seed ^ 2),
        train: g.queries(n_train, seed ^ 3),
        queries: g.group_queries(n_queries.div_ceil(3), 3, seed ^ 4)[..n_queries * dim].to_vec(),
    }
}

/// Uniformly random data in `[-1, 1)`.
pub fn uniform(n: usize, n_queries: usize, dim: usize, seed: u64) -> Data {
    let v = |m: usize, s: u64| synth::uniform(m * dim, -1.0, 1.0, seed ^ s);
    Data { dim, keys: v(n, 1), values: v(n, 2), train: v(n_queries.max(8), 3), queries: v(n_queries, 4) }
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
