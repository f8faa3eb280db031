//! Seeded recall and robustness tests of both graphs against the exact `FlatIndex`.
#![allow(clippy::unwrap_used)]

use needle_core::{Error, FlatIndex, NO_LABEL, SearchParams, SearchResult, VectorIndex};

use crate::{
    CompactGraph, CompactGraphParams, DEFAULT_SCAN_BELOW, Hnsw, HnswParams, Level, MAX_DIM, RoarGraph, RoarGraphParams,
    from_factory,
};
use needle_core::synth::AttentionLike;

const DIM: usize = 64;

struct Fixture {
    n: usize,
    keys: Vec<f32>,
    train: Vec<f32>,
    test: Vec<f32>,
    truth: SearchResult,
}

fn fixture(n: usize, n_train: usize, n_test: usize) -> Fixture {
    let data = AttentionLike::new(DIM, 7);
    let keys = data.keys(n, 1);
    let train = data.queries(n_train, 2);
    let test = data.queries(n_test, 3);
    let mut flat = FlatIndex::new(DIM);
    flat.build(&keys, None).unwrap();
    let truth = flat.search(&test, 100, &SearchParams::default()).unwrap();
    Fixture { n, keys, train, test, truth }
}

/// Mean recall@k of `got` against `truth` (both searched with k ≥ `k`): needle-core's recall
/// over each query's first `k` results.
fn recall(truth: &SearchResult, got: &SearchResult, k: usize) -> f64 {
    let per = |i: usize| {
        let g = got.labels_of(i);
        needle_core::metrics::recall(&g[..k.min(g.len())], &truth.labels_of(i)[..k])
    };
    (0..truth.n_queries()).map(per).sum::<f64>() / truth.n_queries() as f64
}

/// Share of keys scored per query.
fn scanned(r: &SearchResult, n: usize) -> f64 {
    r.stats.full_scored as f64 / (r.n_queries() * n) as f64
}

fn reachable_all(g: &RoarGraph) -> bool {
    let n = g.len();
    let mut seen = vec![false; n];
    let mut stack: Vec<u32> = g.entry_points().to_vec();
    stack.iter().for_each(|&s| seen[s as usize] = true);
    while let Some(u) = stack.pop() {
        for &v in g.neighbors(u) {
            if !seen[v as usize] {
                seen[v as usize] = true;
                stack.push(v);
            }
        }
    }
    seen.iter().all(|&s| s)
}

#[test]
fn roargraph_recalls_ood_queries_scanning_few_keys_and_beats_hnsw() {
    let f = fixture(4096, 4096, 40);
    let mut roar = RoarGraph::new(DIM).unwrap();
    let b = roar.build(&f.keys, Some(&f.train)).unwrap();
    assert_eq!((b.vectors, b.train_queries), (f.n, 4096));
    assert!(reachable_all(&roar));
    let r = roar.search(&f.test, 100, &SearchParams::effort(128)).unwrap();
    let (r10, r100, rs) = (recall(&f.truth, &r, 10), recall(&f.truth, &r, 100), scanned(&r, f.n));
    assert!(r10 >= 0.93, "RoarGraph recall@10 {r10}");
    assert!(r100 >= 0.85, "RoarGraph recall@100 {r100}");
    assert!(rs <= 0.21, "RoarGraph scanned {rs}");
    assert_eq!(r.stats.bytes_read % 4, 0);
    assert!(r.stats.bytes_read > r.stats.full_scored * (DIM as u64) * 4);

    // Query-awareness, measured: HNSW (keys only, same degree) needs more scored keys than
    // RoarGraph to reach RoarGraph's recall@10, at every effort on its sweep.
    let r = roar.search(&f.test, 10, &SearchParams::effort(48)).unwrap();
    let (r10, rs) = (recall(&f.truth, &r, 10), scanned(&r, f.n));
    assert!(r10 >= 0.9, "RoarGraph recall@10 at effort 48: {r10}");
    let mut hnsw = Hnsw::new(DIM, HnswParams { m: 32, ef_construction: 100, ..Default::default() }).unwrap();
    hnsw.build(&f.keys, Some(&f.train)).unwrap();
    let mut matched = false;
    for ef in [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512] {
        let h = hnsw.search(&f.test, 10, &SearchParams::effort(ef)).unwrap();
        let (h10, hs) = (recall(&f.truth, &h, 10), scanned(&h, f.n));
        if h10 >= r10 {
            assert!(hs > rs, "HNSW ef={ef}: recall@10 {h10} scanning {hs}, RoarGraph {r10} scanning {rs}");
            matched = true;
            break;
        }
    }
    assert!(matched, "HNSW never reached RoarGraph's recall@10 {r10}");
}

#[test]
fn hnsw_recalls_in_distribution_queries() {
    let data = AttentionLike::new(DIM, 11);
    let keys = data.keys(3000, 1);
    let queries = data.keys(30, 9);
    let mut flat = FlatIndex::new(DIM);
    flat.build(&keys, None).unwrap();
    let truth = flat.search(&queries, 10, &SearchParams::default()).unwrap();
    let mut hnsw = Hnsw::with_m(DIM, 16).unwrap();
    hnsw.build(&keys, None).unwrap();
    let got = hnsw.search(&queries, 10, &SearchParams::effort(128)).unwrap();
    let r = recall(&truth, &got, 10);
    assert!(r >= 0.9, "HNSW recall@10 {r}");
    assert!(scanned(&got, 3000) < 0.5);
}

#[test]
fn inserted_keys_are_found_and_ids_continue() {
    let data = AttentionLike::new(DIM, 3);
    let keys = data.keys(1500, 1);
    let train = data.queries(800, 2);
    // New keys point in fresh directions and are long, so each is the unique best for its direction.
    let mut fresh = Vec::new();
    for i in 0..8 {
        let mut v = vec![0.0f32; DIM];
        v[4 + i * 3] = 60.0;
        v[5 + i * 3] = -30.0;
        fresh.extend(v);
    }
    let mut indexes: Vec<Box<dyn VectorIndex>> =
        vec![Box::new(RoarGraph::with_m(DIM, 16).unwrap()), Box::new(Hnsw::with_m(DIM, 16).unwrap())];
    for index in indexes.iter_mut() {
        index.build(&keys, Some(&train)).unwrap();
        let ids = index.insert(&fresh).unwrap();
        assert_eq!(ids, 1500..1508, "{}", index.describe());
        assert_eq!(index.len(), 1508);
        for (i, id) in ids.enumerate() {
            let q = &fresh[i * DIM..(i + 1) * DIM];
            let r = index.search(q, 5, &SearchParams::default()).unwrap();
            assert_eq!(r.labels_of(0)[0], id, "{} lost inserted key {id}", index.describe());
        }
        assert_eq!(index.insert(&[]).unwrap(), 1508..1508);
    }
}

#[test]
fn insert_into_empty_index_builds_it() {
    let data = AttentionLike::new(DIM, 5);
    let keys = data.keys(300, 1);
    let mut roar = RoarGraph::with_m(DIM, 8).unwrap();
    assert_eq!(roar.insert(&keys).unwrap(), 0..300);
    assert!(reachable_all(&roar));
    let mut hnsw = Hnsw::with_m(DIM, 8).unwrap();
    assert_eq!(hnsw.insert(&keys).unwrap(), 0..300);
    let r = hnsw.search(&keys[..DIM], 300, &SearchParams::default()).unwrap();
    assert!(r.labels_of(0).len() >= 290);
}

#[test]
fn bad_input_is_rejected_with_named_errors() {
    for spec in ["RoarGraph8", "HNSW8"] {
        let mut index = from_factory(2, spec).unwrap();
        assert!(matches!(index.build(&[], None), Err(Error::EmptyKeys { .. })), "{spec}");
        assert!(matches!(index.search(&[1.0, 0.0], 1, &SearchParams::default()), Err(Error::EmptyKeys { .. })));
        assert!(matches!(index.build(&[1.0, 0.0, 2.0], None), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(index.build(&[1.0, f32::NAN], None), Err(Error::NonFinite { .. })));
        assert!(matches!(index.build(&[1.0, 0.0], Some(&[f32::INFINITY, 0.0])), Err(Error::NonFinite { .. })));
        index.build(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], None).unwrap();
        let p = SearchParams::default();
        assert!(matches!(index.search(&[1.0, 0.0], 4, &p), Err(Error::BudgetTooLarge { .. })));
        assert!(matches!(index.search(&[1.0, 0.0], 0, &p), Err(Error::BudgetTooLarge { .. })));
        assert!(matches!(index.search(&[1.0, 0.0, 1.0], 1, &p), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(index.search(&[f32::NAN, 0.0], 1, &p), Err(Error::NonFinite { .. })));
        assert!(matches!(index.insert(&[0.0, f32::NAN]), Err(Error::NonFinite { .. })));
        assert!(matches!(index.insert(&[0.0]), Err(Error::DimensionMismatch { .. })));
        assert_eq!(index.len(), 3);
        let r = index.search(&[1.0, 0.0], 3, &p).unwrap();
        assert_eq!(r.labels_of(0), &[0, 2, 1]);
    }
    assert!(matches!(RoarGraph::new(0), Err(Error::InvalidParameter { .. })));
    let bad = RoarGraphParams { n_q: 0, ..Default::default() };
    assert!(matches!(RoarGraph::with_params(4, bad), Err(Error::InvalidParameter { name, .. }) if name == "n_q"));
    assert!(matches!(Hnsw::with_m(4, 1), Err(Error::InvalidParameter { name, .. }) if name == "m"));
}

#[test]
fn duplicate_keys_break_neither_build_nor_search() {
    // 3 distinct keys, each repeated 100 times, plus one clear winner.
    let mut keys = Vec::new();
    for i in 0..300 {
        keys.extend_from_slice(&[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.3, 0.3, 0.3]][i % 3]);
    }
    keys.extend_from_slice(&[2.0, 2.0, 2.0]);
    let queries: Vec<f32> = (0..50).flat_map(|i| [1.0, (i as f32) * 0.02, 0.1]).collect();
    for spec in ["RoarGraph8", "HNSW8"] {
        let mut index = from_factory(3, spec).unwrap();
        index.build(&keys, Some(&queries)).unwrap();
        let r = index.search(&[1.0, 0.0, 0.0], 60, &SearchParams::default()).unwrap();
        assert_eq!(r.labels_of(0)[0], 300, "{spec}");
        let found = r.labels_of(0).len();
        // RoarGraph makes every key reachable, so it always fills k; HNSW gives no such
        // guarantee when ties split the graph into islands of twins (it pads instead).
        if spec.starts_with("RoarGraph") {
            assert!(r.labels.iter().all(|&l| l != NO_LABEL), "{spec}: padded result");
        } else {
            assert!(found >= 30, "{spec}: only {found} results");
        }
        // After the winner, the best duplicates (score 1.0) for RoarGraph; best first for both.
        assert!(r.scores[1..found].windows(2).all(|w| w[0] >= w[1]), "{spec}");
        if spec.starts_with("RoarGraph") {
            assert!(r.scores[1..found].iter().all(|&s| (s - 1.0).abs() < 1e-6), "{spec}");
        }
        let mut ids = r.labels_of(0).to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), found, "{spec}: repeated id");
    }
}

#[test]
fn no_training_queries_falls_back_to_keys() {
    let f = fixture(2000, 0, 20);
    let mut roar = RoarGraph::with_m(DIM, 16).unwrap();
    let b = roar.build(&f.keys, None).unwrap();
    assert_eq!(b.train_queries, 0);
    assert!(reachable_all(&roar));
    let r = roar.search(&f.test, 100, &SearchParams::effort(256)).unwrap();
    assert!(recall(&f.truth, &r, 10) >= 0.5);
    // An empty training set means the same.
    assert_eq!(roar.build(&f.keys, Some(&[])).unwrap().train_queries, 0);
}

#[test]
fn builds_are_deterministic_for_a_seed() {
    let f = fixture(1200, 600, 10);
    let run = |index: &mut dyn VectorIndex| {
        index.build(&f.keys, Some(&f.train)).unwrap();
        index.search(&f.test, 20, &SearchParams::default()).unwrap()
    };
    let a = run(&mut RoarGraph::with_m(DIM, 16).unwrap());
    let b = run(&mut RoarGraph::with_m(DIM, 16).unwrap());
    assert_eq!(a, b);
    let a = run(&mut Hnsw::with_m(DIM, 8).unwrap());
    let b = run(&mut Hnsw::with_m(DIM, 8).unwrap());
    assert_eq!(a, b);
}

#[test]
fn factory_parses_known_forms_only() {
    assert_eq!(from_factory(8, "RoarGraph32").unwrap().describe(), "RoarGraph32");
    assert_eq!(from_factory(8, "HNSW16").unwrap().describe(), "HNSW16");
    assert_eq!(from_factory(8, "Flat").unwrap().describe(), "Flat");
    for bad in ["IVF1024", "HNSW", "RoarGraphx", "HNSW-3", "", "HNSW1", "HNSW99999999999999999999", "RoarGraph32r0"] {
        match from_factory(8, bad) {
            Err(Error::InvalidParameter { name, reason }) => {
                assert!(name == "spec" || name == "m", "{bad}: {name}");
                // A parse error names the string and the valid forms.
                assert!(
                    name == "m" || (reason.contains(&format!("`{bad}`")) && reason.contains("RoarGraph<m>")),
                    "{bad}: {reason}"
                );
            }
            _ => panic!("`{bad}` accepted"),
        }
    }
}

#[test]
fn factory_parses_projected_walks() {
    assert_eq!(from_factory(64, "RoarGraph32r16").unwrap().describe(), "RoarGraph32r16");
    assert_eq!(from_factory(64, "RoarGraph32r16p50").unwrap().describe(), "RoarGraph32r16p50");
    assert_eq!(from_factory(64, "RoarGraph32r16p100").unwrap().describe(), "RoarGraph32r16");
    assert_eq!(from_factory(64, "RoarGraph32r16f").unwrap().describe(), "RoarGraph32r16f");
    assert_eq!(from_factory(64, "RoarGraph32r16p50f").unwrap().describe(), "RoarGraph32r16p50f");
    for bad in [
        "RoarGraph32r0",
        "RoarGraph32r",
        "RoarGraphr16",
        "RoarGraph32r16r2",
        "RoarGraph8r65",
        "RoarGraph32r16p0",
        "RoarGraph32r16p101",
        "RoarGraph32f",
        "RoarGraph32r16ff",
    ] {
        match from_factory(64, bad) {
            Err(Error::InvalidParameter { name, .. }) => {
                assert!(["spec", "reduce", "rerank"].contains(&name.as_str()), "{bad}: {name}")
            }
            _ => panic!("`{bad}` accepted"),
        }
    }
}

#[test]
fn projected_walk_at_full_rank_matches_the_full_walk() {
    // With as many projected dimensions as the keys have, projected scores rank keys exactly as
    // full ones do, so the fast path must return what the plain walk returns.
    let f = fixture(2048, 2048, 30);
    let mut full = RoarGraph::new(DIM).unwrap();
    full.build(&f.keys, Some(&f.train)).unwrap();
    let exact = RoarGraphParams { reduce: DIM, walk_bits: 32, ..Default::default() };
    let mut same = RoarGraph::with_params(DIM, exact).unwrap();
    same.build(&f.keys, Some(&f.train)).unwrap();
    // 8-bit codes of the same projection rank nearly as the floats do.
    let mut coded = RoarGraph::with_params(DIM, RoarGraphParams { walk_bits: 8, ..exact }).unwrap();
    coded.build(&f.keys, Some(&f.train)).unwrap();
    for ef in [100, 160] {
        let p = SearchParams::effort(ef);
        let (a, b) = (full.search(&f.test, 100, &p).unwrap(), same.search(&f.test, 100, &p).unwrap());
        let agree = recall(&a, &b, 100);
        assert!(agree >= 0.995, "ef {ef}: the full-rank projected walk returned {agree} of the full walk's keys");
        let c = coded.search(&f.test, 100, &p).unwrap();
        let agree = recall(&a, &c, 100);
        assert!(agree >= 0.97, "ef {ef}: the full-rank coded walk returned {agree} of the full walk's keys");
        assert!(c.stats.bytes_read < b.stats.bytes_read);
        // Scores returned are the exact inner products, not projected ones.
        for i in 0..b.n_queries() {
            for (l, s) in b.labels_of(i).iter().zip(&b.scores[i * 100..(i + 1) * 100]) {
                let k = &f.keys[*l as usize * DIM..(*l as usize + 1) * DIM];
                let exact: f32 = f.test[i * DIM..(i + 1) * DIM].iter().zip(k).map(|(x, y)| x * y).sum();
                assert!((exact - s).abs() <= 1e-4 * (1.0 + exact.abs()), "{exact} vs {s}");
            }
        }
        // Cost: the walk's scores are codes; only the re-ranked keys are full inner products
        // (at full rank the maps are the identity: the query is not projected).
        assert_eq!(b.stats.full_scored, (b.n_queries() * ef) as u64);
        assert!(b.stats.codes_scored >= a.stats.full_scored / 2, "{:?} vs {:?}", b.stats, a.stats);
    }
}

#[test]
fn projected_walk_keeps_recall_scoring_few_full_keys() {
    let f = fixture(4096, 4096, 40);
    let mut roar = RoarGraph::with_params(DIM, RoarGraphParams { reduce: 16, ..Default::default() }).unwrap();
    roar.build(&f.keys, Some(&f.train)).unwrap();
    let r = roar.search(&f.test, 100, &SearchParams::effort(200)).unwrap();
    let (r100, rs) = (recall(&f.truth, &r, 100), scanned(&r, f.n));
    assert!(r100 >= 0.85, "recall@100 {r100}");
    assert!(rs <= (200.0 + 16.0) / 4096.0 + 1e-9, "full share {rs}");
    assert!(r.stats.codes_scored > 0);
    // Inserted keys are projected too: twice each test query's best key becomes its new best.
    let extra: Vec<f32> = (0..f.test.len() / DIM)
        .flat_map(|i| {
            let best = f.truth.labels_of(i)[0] as usize;
            f.keys[best * DIM..(best + 1) * DIM].iter().map(|x| 2.0 * x).collect::<Vec<_>>()
        })
        .collect();
    // The plain walk over the same inserts is the reference.
    let mut plain = RoarGraph::new(DIM).unwrap();
    plain.build(&f.keys, Some(&f.train)).unwrap();
    let found = |g: &mut RoarGraph| {
        assert_eq!(g.insert(&extra).unwrap(), 4096..4136);
        let hit = g.search(&f.test, 1, &SearchParams::effort(200)).unwrap();
        (0..40).filter(|&i| hit.labels_of(i) == [4096 + i as u32]).count()
    };
    let (got, want) = (found(&mut roar), found(&mut plain));
    assert!(got + 2 >= want && got >= 20, "{got} of 40 inserted best keys found, the plain walk {want}");
}

#[test]
fn cluster_entries_and_rerank_pool_serve_narrow_beams() {
    let f = fixture(2000, 2000, 40);
    let exact = |q: usize, id: u32| -> f32 {
        let (a, b) = (&f.test[q * DIM..(q + 1) * DIM], &f.keys[id as usize * DIM..(id as usize + 1) * DIM]);
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    };
    let with = |clusters: usize| {
        let p = RoarGraphParams { m: 16, clusters, entry_keys: 24, probe: 1, ..Default::default() };
        let mut g = RoarGraph::with_params(DIM, p).unwrap();
        g.build(&f.keys, Some(&f.train)).unwrap();
        g
    };
    let (plain, multi) = (with(0), with(16));
    assert_eq!(plain.n_clusters(), 0);
    assert!(multi.n_clusters() > 0 && multi.n_clusters() <= 16);
    for c in 0..multi.n_clusters() {
        let e = multi.cluster_entry_points(c);
        assert_eq!(e.len(), 24);
        assert!(e.iter().all(|&id| (id as usize) < f.n));
    }
    assert!(multi.cluster_entry_points(multi.n_clusters()).is_empty());
    // Effort 1 is a greedy walk: from one global entry it stalls early, while the cluster's
    // entry keys already hold many of the query's best keys.
    let g1 = plain.search(&f.test, 10, &SearchParams::effort(1)).unwrap();
    let m1 = multi.search(&f.test, 10, &SearchParams::effort(1)).unwrap();
    let (rg, rm) = (recall(&f.truth, &g1, 10), recall(&f.truth, &m1, 10));
    assert!(rm >= 0.5 && rm > rg + 0.1, "recall@10 at effort 1: clusters {rm}, single entry {rg}");
    // Every search scores the centroids and its cluster's entry keys.
    assert!(m1.stats.full_scored >= (f.test.len() / DIM * (multi.n_clusters() + 24)) as u64);
    // A beam narrower than k still returns k distinct keys, best first, with exact scores
    // (re-ranked from everything the search scored), and recalls most of the top 100.
    for g in [&plain, &multi] {
        let r = g.search(&f.test, 100, &SearchParams::effort(32)).unwrap();
        for q in 0..r.n_queries() {
            let labels = r.labels_of(q);
            assert_eq!(labels.len(), 100);
            let mut ids = labels.to_vec();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 100, "query {q}: repeated or missing ids");
            let sc = &r.scores[q * 100..(q + 1) * 100];
            assert!(sc.windows(2).all(|w| w[0] >= w[1]));
            for (i, &id) in labels.iter().enumerate() {
                assert!((sc[i] - exact(q, id)).abs() < 1e-3 * (1.0 + sc[i].abs()));
            }
        }
        let r100 = recall(&f.truth, &r, 100);
        let full = g.search(&f.test, 100, &SearchParams::effort(100)).unwrap();
        assert!(r100 >= 0.45, "recall@100 at effort 32: {r100}");
        assert!(r.stats.full_scored < full.stats.full_scored);
    }
}

/// Saves `built` (built on `keys[..n0]`, then grown to `keys[..n1]` by insert), loads the
/// state into `fresh`, and checks that both search alike, keep doing so after more inserts up
/// to `keys.len()`, and save the same bytes. Returns the state at `n1`.
fn assert_round_trip(
    built: &mut dyn VectorIndex,
    fresh: &mut dyn VectorIndex,
    keys: &[f32],
    n1: usize,
    queries: &[f32],
) -> Vec<u8> {
    let mut state = Vec::new();
    built.save_state(&mut state).unwrap();
    fresh.load_state(&state, &keys[..n1 * DIM]).unwrap();
    let mut again = Vec::new();
    fresh.save_state(&mut again).unwrap();
    assert!(again == state, "{}: save → load → save changed the bytes", built.describe());
    let p = SearchParams::default();
    assert_eq!(built.search(queries, 20, &p).unwrap(), fresh.search(queries, 20, &p).unwrap());
    built.insert(&keys[n1 * DIM..]).unwrap();
    fresh.insert(&keys[n1 * DIM..]).unwrap();
    assert_eq!(built.search(queries, 20, &p).unwrap(), fresh.search(queries, 20, &p).unwrap());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    built.save_state(&mut a).unwrap();
    fresh.save_state(&mut b).unwrap();
    assert!(a == b, "{}: states differ after the same inserts", built.describe());
    state
}

/// Truncations (every length up to 256, then strided) and single-bit flips of `state` never
/// panic; truncations are always `Corrupt`.
fn assert_corruption_is_caught(make: &dyn Fn() -> Box<dyn VectorIndex>, state: &[u8], keys: &[f32]) {
    needle_core::state::check_damage(state, 300, 0x9e37_79b9_7f4a_7c15, |s| {
        let mut idx = make();
        idx.load_state(s, keys)?;
        let _ = idx.search(&keys[..DIM], 5, &SearchParams::default());
        Ok(())
    });
    let mut newer = state.to_vec();
    newer[8] = newer[8].wrapping_add(1);
    let e = make().load_state(&newer, keys).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }) && e.to_string().contains("newer"), "{e}");
}

#[test]
fn roargraph_state_round_trips() {
    let f = fixture(1200, 400, 12);
    let params = RoarGraphParams { clusters: 4, ..Default::default() };
    let make = || -> Box<dyn VectorIndex> { Box::new(RoarGraph::with_params(DIM, params).unwrap()) };
    let mut built = make();
    built.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    built.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap();
    let state = assert_round_trip(built.as_mut(), make().as_mut(), &f.keys, 1100, &f.test);
    assert_corruption_is_caught(&make, &state, &f.keys[..1100 * DIM]);
    // Other parameters, another kind, other keys.
    let e = RoarGraph::new(DIM).unwrap().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
    let e = make().load_state(&state, &f.keys[..1000 * DIM]).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    let e = Hnsw::with_m(DIM, 16).unwrap().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("another kind"), "{e}");
    // The projected walk's maps travel with the state; a state without them does not load into
    // an index that walks projected, nor the other way round.
    let reduced = RoarGraphParams { reduce: 8, rerank: 60, ..params };
    let make_r = || -> Box<dyn VectorIndex> { Box::new(RoarGraph::with_params(DIM, reduced).unwrap()) };
    let mut built = make_r();
    built.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    built.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap();
    let state_r = assert_round_trip(built.as_mut(), make_r().as_mut(), &f.keys, 1100, &f.test);
    assert_corruption_is_caught(&make_r, &state_r, &f.keys[..1100 * DIM]);
    let e = make_r().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
    let e = make().load_state(&state_r, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
}

#[test]
fn hnsw_state_round_trips() {
    let f = fixture(1200, 10, 12);
    let make = || -> Box<dyn VectorIndex> { Box::new(Hnsw::with_m(DIM, 8).unwrap()) };
    let mut built = make();
    built.build(&f.keys[..1000 * DIM], None).unwrap();
    built.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap();
    let state = assert_round_trip(built.as_mut(), make().as_mut(), &f.keys, 1100, &f.test);
    assert_corruption_is_caught(&make, &state, &f.keys[..1100 * DIM]);
    let e = RoarGraph::new(DIM).unwrap().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("another kind"), "{e}");
    // An unbuilt index saves and loads as empty.
    let mut empty = Vec::new();
    make().save_state(&mut empty).unwrap();
    make().load_state(&empty, &[]).unwrap();
}

/// Load time against build time on an 8K-key head (printed with `--nocapture`; not asserted).
#[test]
#[allow(clippy::print_stderr)] // The timings are what this test is for.
fn load_is_cheaper_than_build_at_8k() {
    let f = fixture(8192, 2048, 1);
    for make in [
        &(|| Box::new(RoarGraph::new(DIM).unwrap()) as Box<dyn VectorIndex>) as &dyn Fn() -> Box<dyn VectorIndex>,
        &|| Box::new(Hnsw::with_m(DIM, 16).unwrap()),
    ] {
        let mut idx = make();
        let t = std::time::Instant::now();
        idx.build(&f.keys, Some(&f.train)).unwrap();
        let build_s = t.elapsed().as_secs_f64();
        let mut state = Vec::new();
        idx.save_state(&mut state).unwrap();
        let mut fresh = make();
        let t = std::time::Instant::now();
        fresh.load_state(&state, &f.keys).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        eprintln!(
            "{} at 8192 keys: build {:.1} ms, load {:.2} ms, state {} KiB",
            idx.describe(),
            build_s * 1e3,
            load_s * 1e3,
            state.len() / 1024
        );
    }
}

// ---- CompactGraph: the coded walk ----

fn compact(params: CompactGraphParams) -> CompactGraph {
    CompactGraph::with_params(DIM, params).unwrap()
}

/// An index that always builds its graph, whatever the size (these tests are about the walk).
fn walker() -> CompactGraph {
    compact(CompactGraphParams { scan_below: 0, ..Default::default() })
}

/// Exact top-`k` ids of a group (`max_h q_h·x`) over `keys`.
fn group_truth(keys: &[f32], group: &[f32], k: usize) -> Vec<u32> {
    let s: Vec<f32> = keys
        .chunks_exact(DIM)
        .map(|x| group.chunks_exact(DIM).map(|q| crate::dist::dot(q, x)).fold(f32::NEG_INFINITY, f32::max))
        .collect();
    needle_core::attention::top_k(&s, k).unwrap().into_iter().map(|x| x.0).collect()
}

#[test]
fn compact_walk_recalls_like_the_full_walk_reading_codes_only() {
    let f = fixture(4096, 4096, 40);
    let mut roar = RoarGraph::new(DIM).unwrap();
    roar.build(&f.keys, Some(&f.train)).unwrap();
    let full = roar.search(&f.test, 100, &SearchParams::effort(128)).unwrap();
    let mut idx = compact(CompactGraphParams { graph: RoarGraphParams::default(), patience: 0, scan_below: 0 });
    let b = idx.build(&f.keys, Some(&f.train)).unwrap();
    assert_eq!((b.vectors, b.train_queries), (4096, 4096));
    let r = idx.search(&f.test, 100, &SearchParams::effort(128)).unwrap();
    let (rc, rf) = (recall(&f.truth, &r, 100), recall(&f.truth, &full, 100));
    // The same graph; only the scores differ (8-bit codes), so recall stays within a little.
    assert!(rc >= rf - 0.02 && rc >= 0.85, "compact recall@100 {rc}, full walk {rf}");
    assert_eq!(r.stats.full_scored, 0, "no key is read at full precision");
    assert!(r.stats.codes_scored > 0);
    // Both walks score about the same number of keys.
    let ratio = r.stats.codes_scored as f64 / full.stats.full_scored as f64;
    assert!((0.7..1.3).contains(&ratio), "scored {} vs {}", r.stats.codes_scored, full.stats.full_scored);
}

#[test]
fn compact_walk_recalls_uniform_random_keys() {
    // No cluster structure: keys and queries i.i.d. Gaussian, queries are keys' distribution.
    let n = 3000;
    let keys = needle_core::synth::gaussian(n * DIM, 1.0, 21);
    let test = needle_core::synth::gaussian(20 * DIM, 1.0, 22);
    let train = needle_core::synth::gaussian(2000 * DIM, 1.0, 23);
    let mut flat = FlatIndex::new(DIM);
    flat.build(&keys, None).unwrap();
    let truth = flat.search(&test, 10, &SearchParams::default()).unwrap();
    let mut idx = walker();
    idx.build(&keys, Some(&train)).unwrap();
    let r = idx.search(&test, 10, &SearchParams::effort(256)).unwrap();
    let rc = recall(&truth, &r, 10);
    assert!(rc >= 0.85, "recall@10 on Gaussian keys {rc}");
}

#[test]
fn code_scores_are_close_to_exact_inner_products() {
    let f = fixture(500, 200, 10);
    let mut idx = walker();
    idx.build(&f.keys, Some(&f.train)).unwrap();
    let r = idx.search(&f.test, 50, &SearchParams::effort(500)).unwrap();
    for (qi, q) in f.test.chunks_exact(DIM).enumerate() {
        for j in 0..50 {
            let (id, s) = (r.labels[qi * 50 + j], r.scores[qi * 50 + j]);
            let x = &f.keys[id as usize * DIM..(id as usize + 1) * DIM];
            let exact = crate::dist::dot(q, x);
            // Per coordinate: half a key step (max|x|/254) times |q_d|, plus the query's rounding.
            let maxk = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let bound = q.iter().map(|v| v.abs()).sum::<f32>() * maxk / 254.0 * 1.01 + 1e-3;
            assert!((s - exact).abs() <= bound, "query {qi}, key {id}: {s} vs {exact} (bound {bound})");
        }
    }
}

#[test]
fn every_kernel_level_walks_identically() {
    let f = fixture(1500, 800, 12);
    let mut idx = walker();
    idx.build(&f.keys, Some(&f.train)).unwrap();
    let groups = &f.test[..6 * DIM];
    let mut want = None;
    for level in Level::all_available() {
        idx.set_level(level).unwrap();
        // Integer sums are exact at every level, so the walks are identical, not just close.
        let got = (
            idx.search(&f.test, 20, &SearchParams::effort(64)).unwrap(),
            idx.search_group(groups, 20, &SearchParams::effort(64), &[3, 5]).unwrap(),
        );
        match &want {
            None => want = Some(got),
            Some(w) => assert_eq!(&got, w, "{level:?}"),
        }
    }
    assert!(Level::all_available().contains(&Level::detect()));
}

#[test]
fn one_group_walk_recalls_the_group_top_k() {
    let data = AttentionLike::new(DIM, 7);
    let keys = data.keys(4096, 1);
    let train = data.queries(4096, 2);
    let groups = data.group_queries(20, 3, 5);
    let mut idx = walker();
    idx.build(&keys, Some(&train)).unwrap();
    let (mut total, mut scored) = (0.0, 0);
    for g in groups.chunks_exact(3 * DIM) {
        let r = idx.search_group(g, 100, &SearchParams::effort(128), &[]).unwrap();
        assert_eq!(r.n_queries(), 1);
        total += needle_core::metrics::recall(r.labels_of(0), &group_truth(&keys, g, 100));
        scored += r.stats.codes_scored;
    }
    let rc = total / 20.0;
    assert!(rc >= 0.85, "group recall@100 {rc}");
    // One walk per group, not one per query: about what one query's walk scores.
    let single = idx.search(&groups[..DIM], 100, &SearchParams::effort(128)).unwrap().stats.codes_scored;
    assert!(scored / 20 < 2 * single, "group walk scored {} per group, one query {single}", scored / 20);
}

#[test]
fn warm_start_and_early_stop_keep_recall() {
    // Consecutive decode queries: each a small step from the last, as a real decode's are.
    let data = AttentionLike::new(DIM, 7);
    let keys = data.keys(4096, 1);
    let train = data.queries(4096, 2);
    let start = data.group_queries(1, 3, 9);
    let noise = needle_core::synth::gaussian(40 * 3 * DIM, 0.08, 10);
    let mut steps = vec![start.clone()];
    for s in 1..40 {
        let prev = &steps[s - 1];
        steps.push(prev.iter().zip(&noise[s * 3 * DIM..(s + 1) * 3 * DIM]).map(|(a, b)| a + b).collect());
    }
    let run = |patience: usize, warm: bool| -> (f64, u64) {
        let params = CompactGraphParams { patience, scan_below: 0, ..Default::default() };
        let mut idx = compact(params);
        idx.build(&keys, Some(&train)).unwrap();
        let (mut total, mut scored, mut seeds) = (0.0, 0, Vec::new());
        for g in &steps {
            let r = idx.search_group(g, 100, &SearchParams::effort(128), &seeds).unwrap();
            total += needle_core::metrics::recall(r.labels_of(0), &group_truth(&keys, g, 100));
            scored += r.stats.codes_scored;
            if warm {
                seeds = r.labels_of(0).to_vec();
            }
        }
        (total / steps.len() as f64, scored)
    };
    let (base, base_scored) = run(0, false);
    let (warm, warm_scored) = run(0, true);
    let (stop, stop_scored) = run(32, true);
    assert!(base >= 0.85, "cold recall {base}");
    // Stated tolerance: warm start may not cost recall; early stop at most 0.02.
    assert!(warm >= base - 0.005, "warm start recall {warm} vs cold {base}");
    assert!(stop >= base - 0.02, "early stop recall {stop} vs {base}");
    assert!(
        stop_scored < warm_scored.min(base_scored),
        "early stop scored {stop_scored}, full walks {warm_scored}, {base_scored}"
    );
    // Seeds past the index are ignored.
    let mut idx = walker();
    idx.build(&keys, Some(&train)).unwrap();
    let p = SearchParams::effort(64);
    assert_eq!(
        idx.search_group(&start, 10, &p, &[]).unwrap().labels,
        idx.search_group(&start, 10, &p, &[4096, u32::MAX]).unwrap().labels
    );
}

#[test]
fn compact_memory_is_codes_links_and_entries() {
    let f = fixture(2000, 500, 3);
    for m in [16, 32] {
        let params =
            CompactGraphParams { graph: RoarGraphParams { m, ..Default::default() }, patience: 0, scan_below: 0 };
        let mut idx = compact(params);
        let b = idx.build(&f.keys, Some(&f.train)).unwrap();
        let entries = idx.entry_points().len();
        // Codes (64-byte aligned, one spare line), a scale, `m` u16 links per key, entry ids.
        let want = 2000 * DIM + 64 + 2000 * 4 + 2000 * m * 2 + entries * 4;
        assert_eq!(b.bytes, want, "m {m}");
        assert_eq!(idx.memory_bytes(), want);
        // A search adds its visited set (one bit per key), kept for the next.
        idx.search(&f.test[..DIM], 5, &SearchParams::default()).unwrap();
        let visited = 2000usize.div_ceil(64) * 8;
        assert_eq!(idx.memory_bytes(), want + visited);
        // Inserts grow codes, scales and links by exactly the new keys.
        let more = &f.keys[..100 * DIM];
        idx.insert(more).unwrap();
        // (linking the new keys searched, over all 2,100)
        let visited = 2100usize.div_ceil(64) * 8;
        assert_eq!(idx.memory_bytes(), want + visited + 100 * (DIM + 4 + m * 2), "m {m} after insert");
        let f32_keys = 2100 * DIM * 4;
        assert!(idx.memory_bytes() < f32_keys, "m {m}: {} bytes vs {f32_keys} of f32 keys", idx.memory_bytes());
    }
}

#[test]
fn compact_inserts_are_found_and_ids_continue() {
    let data = AttentionLike::new(DIM, 3);
    let keys = data.keys(1500, 1);
    let train = data.queries(800, 2);
    let mut fresh = Vec::new();
    for i in 0..8 {
        let mut v = vec![0.0f32; DIM];
        v[4 + i * 3] = 60.0;
        v[5 + i * 3] = -30.0;
        fresh.extend(v);
    }
    let mut idx = walker();
    idx.build(&keys, Some(&train)).unwrap();
    let ids = idx.insert(&fresh).unwrap();
    assert_eq!(ids, 1500..1508);
    for (i, id) in ids.enumerate() {
        let r = idx.search(&fresh[i * DIM..(i + 1) * DIM], 5, &SearchParams::default()).unwrap();
        assert_eq!(r.labels_of(0)[0], id, "lost inserted key {id}");
        assert!(!idx.neighbors(id).is_empty());
    }
    // Into an empty index: a build.
    let mut empty = walker();
    assert_eq!(empty.insert(&keys[..300 * DIM]).unwrap(), 0..300);
}

#[test]
fn compact_state_round_trips() {
    let f = fixture(1200, 400, 12);
    let params = CompactGraphParams {
        graph: RoarGraphParams { clusters: 4, m: 16, ..Default::default() },
        patience: 0,
        scan_below: 0,
    };
    let make = || -> Box<dyn VectorIndex> { Box::new(compact(params)) };
    let mut built = make();
    built.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    built.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap();
    let state = assert_round_trip(built.as_mut(), make().as_mut(), &f.keys, 1100, &f.test);
    assert_corruption_is_caught(&make, &state, &f.keys[..1100 * DIM]);
    let e = CompactGraph::new(DIM).unwrap().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
    // A RoarGraph state is another kind, and the other way round.
    let e = RoarGraph::new(DIM).unwrap().load_state(&state, &f.keys[..1100 * DIM]).unwrap_err();
    assert!(e.to_string().contains("another kind"), "{e}");
    let mut roar = RoarGraph::with_m(DIM, 16).unwrap();
    roar.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    let mut rs = Vec::new();
    roar.save_state(&mut rs).unwrap();
    let e = make().load_state(&rs, &f.keys[..1000 * DIM]).unwrap_err();
    assert!(e.to_string().contains("another kind"), "{e}");
    let mut empty = Vec::new();
    make().save_state(&mut empty).unwrap();
    make().load_state(&empty, &[]).unwrap();
}

#[test]
fn factory_parses_compact_forms() {
    let idx = from_factory(DIM, "RoarGraph24q8").unwrap();
    assert_eq!(idx.describe(), "RoarGraph24q8");
    let idx = from_factory(DIM, "RoarGraph32q8s12").unwrap();
    assert_eq!(idx.describe(), "RoarGraph32q8s12");
    assert_eq!(from_factory(DIM, &idx.describe()).unwrap().describe(), idx.describe());
    for bad in ["RoarGraphq8", "RoarGraph32q8x", "RoarGraph32q8s", "RoarGraph32q8s1x"] {
        let e = from_factory(DIM, bad).err().unwrap().to_string();
        assert!(e.contains(bad) && e.contains("q8"), "{bad}: {e}");
    }
    assert!(from_factory(MAX_DIM + 1, "RoarGraph32q8").is_err());
}

// ---- CompactGraph below `scan_below`: no graph, a scan of every code ----

/// The plain reference of a code scan: each key and query coded as the index documents
/// (`round(x / s)`, keys to ±127, queries to ±8191), integer dots, the group's best, the
/// exact top `k` (ties: lower id).
fn scan_reference(keys: &[f32], group: &[f32], k: usize) -> Vec<(u32, f32)> {
    let code = |x: &[f32], max: f32| -> (Vec<i64>, f32) {
        let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = if m > 0.0 { m / max } else { 1.0 };
        (x.iter().map(|v| (v / s).round().clamp(-max, max) as i64).collect(), s)
    };
    let queries: Vec<_> = group.chunks_exact(DIM).map(|q| code(q, 8191.0)).collect();
    let mut scored: Vec<(u32, f32)> = keys
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, x)| {
            let (kc, ks) = code(x, 127.0);
            let best = queries.iter().fold(f32::NEG_INFINITY, |b, (qc, qs)| {
                let d: i64 = kc.iter().zip(qc).map(|(a, b)| a * b).sum();
                b.max(d as i32 as f32 * qs)
            });
            (i as u32, best * ks)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

#[test]
fn a_small_build_scans_every_code_exactly() {
    let data = AttentionLike::new(DIM, 11);
    let keys = data.keys(3000, 1);
    let train = data.queries(1000, 2);
    let groups = data.group_queries(12, 3, 5);
    let mut idx = CompactGraph::new(DIM).unwrap();
    let b = idx.build(&keys, Some(&train)).unwrap();
    assert!(idx.is_scan() && 3000 < DEFAULT_SCAN_BELOW);
    assert_eq!((b.vectors, b.train_queries), (3000, 0), "no graph, so no training query is used");
    let (mut total, p) = (0.0, SearchParams::default());
    for level in Level::all_available() {
        idx.set_level(level).unwrap();
        for g in groups.chunks_exact(3 * DIM) {
            for k in [1, 10, 100, 2999, 3000] {
                let r = idx.search_group(g, k, &p, &[7, 9]).unwrap();
                let want = scan_reference(&keys, g, k);
                let got: Vec<(u32, f32)> = r.labels.iter().copied().zip(r.scores.iter().copied()).collect();
                assert_eq!(got, want, "{level:?}, k {k}");
                assert_eq!((r.stats.codes_scored, r.stats.full_scored), (3000, 0));
            }
            if level == Level::detect() {
                let r = idx.search_group(g, 100, &p, &[]).unwrap();
                total += needle_core::metrics::recall(r.labels_of(0), &group_truth(&keys, g, 100));
            }
        }
    }
    // Codes rank almost as the keys do (the caller re-ranks its candidates exactly).
    let rc = total / 12.0;
    assert!(rc >= 0.95, "code scan recall@100 {rc}");
    // One query at a time scans too.
    let one = idx.search(&groups[..2 * DIM], 10, &p).unwrap();
    assert_eq!(
        one.labels_of(1),
        scan_reference(&keys, &groups[DIM..2 * DIM], 10).iter().map(|x| x.0).collect::<Vec<_>>()
    );
}

/// Scan indexes loaded over the same keys (sequences of one context) scan one copy of the
/// codes; keys one of them inserts are its own, and each still ranks exactly as the reference.
#[test]
fn scan_indexes_over_the_same_keys_share_their_codes() {
    let f = fixture(1200, 400, 12);
    let mut built = CompactGraph::new(DIM).unwrap();
    built.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    let mut state = Vec::new();
    built.save_state(&mut state).unwrap();
    let load = || {
        let mut idx = CompactGraph::new(DIM).unwrap();
        idx.load_state(&state, &f.keys[..1000 * DIM]).unwrap();
        idx
    };
    let (mut a, b) = (load(), load());
    assert!(a.shares_scan_codes_with(&b) && a.shares_scan_codes_with(&built));
    let mut other = CompactGraph::new(DIM).unwrap();
    other.build(&f.keys[DIM..1001 * DIM], Some(&f.train)).unwrap();
    assert!(!other.shares_scan_codes_with(&a), "other keys, other codes");
    a.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap();
    assert!(a.shares_scan_codes_with(&b), "an insert keeps the shared blocks");
    let g = &f.test[..3 * DIM];
    for (idx, n) in [(&a, 1100), (&b, 1000)] {
        let r = idx.search_group(g, 20, &SearchParams::default(), &[]).unwrap();
        let want: Vec<u32> = scan_reference(&f.keys[..n * DIM], g, 20).iter().map(|x| x.0).collect();
        assert_eq!(r.labels, want, "{n} keys");
    }
}

#[test]
fn a_scan_index_holds_codes_only_inserts_and_round_trips() {
    let f = fixture(1200, 400, 12);
    let mut idx = CompactGraph::new(DIM).unwrap();
    idx.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    // Codes and a scale per key, in whole blocks of 16 keys: no links, no visited set.
    assert_eq!(idx.memory_bytes(), 1008 * DIM + 1008 * 4);
    assert_eq!(idx.insert(&f.keys[1000 * DIM..1100 * DIM]).unwrap(), 1000..1100);
    assert!(idx.is_scan() && idx.neighbors(5).is_empty());
    let g = &f.test[..3 * DIM];
    let r = idx.search_group(g, 20, &SearchParams::default(), &[]).unwrap();
    let want: Vec<u32> = scan_reference(&f.keys[..1100 * DIM], g, 20).iter().map(|x| x.0).collect();
    assert_eq!(r.labels, want, "inserted keys are scanned too");
    let make = || -> Box<dyn VectorIndex> { Box::new(CompactGraph::new(DIM).unwrap()) };
    let mut boxed: Box<dyn VectorIndex> = Box::new(idx);
    let state = assert_round_trip(boxed.as_mut(), make().as_mut(), &f.keys, 1100, &f.test);
    assert_corruption_is_caught(&make, &state, &f.keys[..1100 * DIM]);
    // Another degree is refused, as for a graph's state.
    let e = CompactGraph::with_params(
        DIM,
        CompactGraphParams { graph: RoarGraphParams { m: 16, ..Default::default() }, ..Default::default() },
    )
    .unwrap()
    .load_state(&state, &f.keys[..1100 * DIM])
    .unwrap_err();
    assert!(e.to_string().contains("params"), "{e}");
    // At or past the threshold a build makes its graph.
    let mut graph = compact(CompactGraphParams { scan_below: 1000, ..Default::default() });
    graph.build(&f.keys[..1000 * DIM], Some(&f.train)).unwrap();
    assert!(!graph.is_scan() && !graph.neighbors(5).is_empty());
    assert_eq!(graph.describe(), "RoarGraph32q8x1000");
    assert_eq!(from_factory(DIM, "RoarGraph32q8x1000").unwrap().describe(), graph.describe());
}
