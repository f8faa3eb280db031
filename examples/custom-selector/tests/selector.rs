//! The selector against exact references on random keys: whole-budget selections equal dense
//! attention, stride 1 is exact top-k, sampling finds most of the top-k while scanning less,
//! insertion matches a fresh build, and bad settings are named errors.
#![allow(clippy::unwrap_used)]

use std::ops::Range;

use custom_selector::{StridedRerank, StridedRerankConfig};
use needle_core::Rows;
use needle_core::attend_selected;
use needle_core::attention::top_k;
use needle_core::attention::{Partial, dense};
use needle_core::kit::group_max;
use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, RowSource, Selection, SelectorFactory};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DIM: usize = 16;

/// Keys in slowly drifting clusters (neighbouring tokens resemble each other, as in real
/// attention), values uniform, and a few query groups of 3 heads.
fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut centre: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut keys = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        for c in &mut centre {
            *c += rng.random_range(-0.15..0.15);
        }
        keys.extend(centre.iter().map(|&c| c + rng.random_range(-0.1..0.1)));
    }
    let values = (0..n * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let queries = (0..5).map(|_| (0..3 * DIM).map(|_| rng.random_range(-2.0..2.0)).collect()).collect();
    (keys, values, queries)
}

fn built(cfg: StridedRerankConfig, keys: &Rows<'_>) -> StridedRerank {
    let mut s = StridedRerank::new(cfg, DIM);
    let ctx = BuildContext {
        head: HeadId { layer: 0, kv_head: 0 },
        keys,
        train_queries: &[],
        scale: 1.0 / (DIM as f32).sqrt(),
    };
    s.build(&ctx).unwrap();
    s
}

/// The true top-k of the dynamic part by best group score, as a sorted id list.
fn oracle(queries: &[f32], keys: &Rows<'_>, dynamic: Range<u32>, k: usize) -> Vec<u32> {
    let scores: Vec<f32> = dynamic.clone().map(|p| group_max(queries, DIM, keys.row(p as usize))).collect();
    let mut ids: Vec<u32> = top_k(&scores, k).unwrap().iter().map(|&(i, _)| dynamic.start + i).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_budget_covering_the_dynamic_part_gives_dense_attention() {
    let (k, v, qs) = data(300, 1);
    let (keys, values) = (Rows::new("k", &k, DIM).unwrap(), Rows::new("v", &v, DIM).unwrap());
    let cfg = StridedRerankConfig { sinks: 4, window: 32, stride: 8, oversample: 2 };
    let mut s = built(cfg, &keys);
    let dynamic = s.static_part().dynamic_range(keys.len());
    let scale = 1.0 / (DIM as f32).sqrt();
    for q in &qs {
        let mut sel = Selection::default();
        s.select(q, &keys, &Budget::TopK(dynamic.len()), &mut sel).unwrap();
        assert_eq!(sel.ids, dynamic.clone().collect::<Vec<_>>());
        for head in q.chunks_exact(DIM) {
            let got: Partial<f64> = attend_selected(head, &keys, &values, s.static_part(), &sel, scale).unwrap();
            let want: Partial<f64> = dense(head, &keys, &values, scale).unwrap();
            assert!((got.lse - want.lse).abs() < 1e-9);
            for (a, b) in got.out.iter().zip(&want.out) {
                assert!((a - b).abs() < 1e-9, "{a} vs {b}");
            }
        }
    }
}

#[test]
fn stride_one_is_exact_top_k() {
    let (k, _, qs) = data(500, 2);
    let keys = Rows::new("k", &k, DIM).unwrap();
    let mut s = built(StridedRerankConfig { sinks: 2, window: 16, stride: 1, oversample: 1 }, &keys);
    let dynamic = s.static_part().dynamic_range(keys.len());
    for q in &qs {
        let mut sel = Selection::default();
        s.select(q, &keys, &Budget::TopK(20), &mut sel).unwrap();
        let mut got = sel.ids.clone();
        got.sort_unstable();
        assert_eq!(got, oracle(q, &keys, dynamic.clone(), 20));
    }
}

#[test]
fn sampling_finds_most_of_the_true_top_k_while_scanning_less() {
    let (k, _, qs) = data(4000, 3);
    let keys = Rows::new("k", &k, DIM).unwrap();
    let mut s = built(StridedRerankConfig { sinks: 4, window: 64, stride: 8, oversample: 4 }, &keys);
    let dynamic = s.static_part().dynamic_range(keys.len());
    let (mut hits, mut total, mut scanned) = (0, 0, 0);
    for q in &qs {
        let mut sel = Selection::default();
        s.select(q, &keys, &Budget::TopK(32), &mut sel).unwrap();
        assert_eq!(sel.ids.len(), 32);
        assert!(sel.ids.iter().all(|i| dynamic.contains(i)));
        let truth = oracle(q, &keys, dynamic.clone(), 32);
        hits += sel.ids.iter().filter(|i| truth.contains(i)).count();
        total += truth.len();
        scanned += sel.stats.full_scored as usize;
    }
    let recall = hits as f64 / total as f64;
    let share = scanned as f64 / (qs.len() * dynamic.len()) as f64;
    assert!(recall >= 0.8, "recall {recall:.3}");
    assert!(share < 0.25, "scanned {share:.3} of the dynamic keys");
}

#[test]
fn inserted_tokens_become_probes_and_candidates() {
    let (k, _, qs) = data(400, 4);
    let all = Rows::new("k", &k, DIM).unwrap();
    let cfg = StridedRerankConfig { sinks: 4, window: 32, stride: 4, oversample: 2 };
    // Build on the first 200 tokens, then let the rest leave the window one by one.
    let first = Rows::new("k", &k[..200 * DIM], DIM).unwrap();
    let mut s = built(cfg, &first);
    let before = s.probes();
    let sp = s.static_part();
    for n in 201..=400 {
        let (old, new) = (sp.dynamic_range(n - 1), sp.dynamic_range(n));
        s.insert(&all, old.end.max(new.start)..new.end).unwrap();
    }
    assert_eq!(s.probes(), before + 50);
    // Incremental insertion ends where a fresh build on all tokens starts.
    let mut fresh = built(cfg, &all);
    assert_eq!(s.probes(), fresh.probes());
    let dynamic = sp.dynamic_range(400);
    for q in &qs {
        let (mut a, mut b) = (Selection::default(), Selection::default());
        s.select(q, &all, &Budget::TopK(10), &mut a).unwrap();
        fresh.select(q, &all, &Budget::TopK(10), &mut b).unwrap();
        assert!(a.ids.iter().all(|i| dynamic.contains(i)));
        assert_eq!(a.ids, b.ids, "incremental and fresh probes must select alike");
    }
}

#[test]
fn mass_budgets_stop_early_and_respect_the_cap() {
    let (k, _, qs) = data(1000, 5);
    let keys = Rows::new("k", &k, DIM).unwrap();
    let mut s = built(StridedRerankConfig { sinks: 4, window: 16, stride: 4, oversample: 2 }, &keys);
    let mut sel = Selection::default();
    s.select(&qs[0], &keys, &Budget::Mass { target: 1.0, max: 50 }, &mut sel).unwrap();
    assert_eq!(sel.ids.len(), 50);
    s.select(&qs[0], &keys, &Budget::Mass { target: 0.05, max: 50 }, &mut sel).unwrap();
    assert!(!sel.ids.is_empty() && sel.ids.len() < 50, "{}", sel.ids.len());
}

#[test]
fn bad_settings_and_inputs_are_errors() {
    let bad = StridedRerankConfig { stride: 0, ..Default::default() };
    let e = bad.create(HeadId { layer: 0, kv_head: 0 }, DIM).err().unwrap().to_string();
    assert!(e.contains("stride"), "{e}");
    let bad = StridedRerankConfig { oversample: 0, ..Default::default() };
    assert!(bad.create(HeadId { layer: 0, kv_head: 0 }, DIM).is_err());
    let (k, _, _) = data(200, 6);
    let keys = Rows::new("k", &k, DIM).unwrap();
    let mut s = built(StridedRerankConfig::default(), &keys);
    let mut sel = Selection::default();
    assert!(s.select(&[0.0; 5], &keys, &Budget::TopK(3), &mut sel).is_err());
    let narrow = Rows::new("k", &k[..8 * 100], 8).unwrap();
    assert!(s.select(&[0.0; DIM], &narrow, &Budget::TopK(3), &mut sel).is_err());
}
