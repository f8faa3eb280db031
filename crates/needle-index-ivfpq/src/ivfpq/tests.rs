//! Recall against the exact `FlatIndex` on seeded attention-like OOD data, cost accounting,
//! query-aware training, insert, and bad input.

use needle_core::{Error, FlatIndex, NO_LABEL, SearchParams, VectorIndex, metrics::recall};

use super::*;

/// Keys, held-out queries and a separate sample of training queries, row-major, from
/// needle-core's attention-like generator.
struct AttentionLike {
    dim: usize,
    keys: Vec<f32>,
    queries: Vec<f32>,
    train_queries: Vec<f32>,
}

fn attention_like(n_keys: usize, n_queries: usize, n_train: usize, dim: usize, seed: u64) -> AttentionLike {
    let g = needle_core::synth::AttentionLike::new(dim, seed);
    let (keys, queries, train_queries) =
        (g.keys(n_keys, seed ^ 1), g.queries(n_queries, seed ^ 2), g.queries(n_train, seed ^ 3));
    AttentionLike { dim, keys, queries, train_queries }
}

const DIM: usize = 32;
const N: usize = 3000;
const NQ: usize = 100;
const K: usize = 10;

fn data() -> AttentionLike {
    attention_like(N, NQ, 500, DIM, 7)
}

fn params(query_aware: bool) -> IvfPqParams {
    IvfPqParams { nlist: 32, m: 8, nprobe: 8, rerank: 8, query_aware, seed: 3, ..IvfPqParams::default() }
}

fn truth(d: &AttentionLike, keys: &[f32]) -> needle_core::SearchResult {
    let mut flat = FlatIndex::new(d.dim);
    flat.build(keys, None).unwrap();
    flat.search(&d.queries, K, &SearchParams::default()).unwrap()
}

fn mean_recall(r: &needle_core::SearchResult, t: &needle_core::SearchResult) -> f64 {
    (0..t.n_queries()).map(|i| recall(r.labels_of(i), t.labels_of(i))).sum::<f64>() / t.n_queries() as f64
}

/// Mean squared error of the PQ estimate of `q·k` over every (query, key) pair.
fn ip_mse(index: &IvfPqIndex, d: &AttentionLike) -> f64 {
    let mut se = 0.0;
    for q in d.queries.chunks_exact(d.dim) {
        let est = index.estimated_scores(q).unwrap();
        for (e, k) in est.iter().zip(d.keys.chunks_exact(d.dim)) {
            se += ((e - dot(q, k)) as f64).powi(2);
        }
    }
    se / (d.queries.len() / d.dim * index.len()) as f64
}

#[test]
fn recall_on_ood_queries_with_honest_costs() {
    let d = data();
    let t = truth(&d, &d.keys);
    for qa in [false, true] {
        let mut index = IvfPqIndex::new(DIM, params(qa)).unwrap();
        let stats = index.build(&d.keys, Some(&d.train_queries)).unwrap();
        assert_eq!(stats.vectors, N);
        assert_eq!(stats.train_queries, if qa { 500 } else { 0 });
        assert_eq!(index.mode(), if qa { TrainingMode::QueryAware } else { TrainingMode::Plain });
        assert_eq!(index.lists().total(), N);

        let r = index.search(&d.queries, K, &SearchParams::effort(8)).unwrap();
        let rec = mean_recall(&r, &t);
        assert!(rec >= 0.85, "qa={qa}: recall@10 {rec} at nprobe 8, rerank 8");
        // A quarter of the lists: far fewer codes than keys, exactly rerank·k full vectors each.
        assert!(r.stats.codes_scored < (NQ * N / 2) as u64, "{:?}", r.stats);
        assert!(r.stats.codes_scored > (NQ * N / 10) as u64, "{:?}", r.stats);
        assert_eq!(r.stats.full_scored, (NQ * K * 8) as u64);
        let min_bytes = r.stats.codes_scored * (8 + 4) + r.stats.full_scored * (DIM as u64 * 4);
        assert!(r.stats.bytes_read > min_bytes);

        // More effort never hurts much and probing everything is near-exact.
        let all = index.search(&d.queries, K, &SearchParams::effort(32)).unwrap();
        assert_eq!(all.stats.codes_scored, (NQ * N) as u64);
        assert!(mean_recall(&all, &t) >= rec - 0.02);
        let one = index.search(&d.queries, K, &SearchParams::effort(1)).unwrap();
        assert!(mean_recall(&one, &t) < rec);

        // Without re-rank, the LUT ranking alone must still be far better than chance.
        index.set_rerank(0);
        let raw = index.search(&d.queries, K, &SearchParams::effort(8)).unwrap();
        assert_eq!(raw.stats.full_scored, 0);
        let raw_rec = mean_recall(&raw, &t);
        assert!(raw_rec >= 0.4 && raw_rec < rec, "qa={qa}: LUT-only recall {raw_rec}");
        // Re-ranked scores are exact inner products.
        for i in 0..NQ {
            let q = &d.queries[i * DIM..(i + 1) * DIM];
            for (&l, &s) in r.labels[i * K..(i + 1) * K].iter().zip(&r.scores[i * K..(i + 1) * K]) {
                assert!((s - dot(q, &d.keys[l as usize * DIM..(l as usize + 1) * DIM])).abs() < 1e-3);
            }
        }
    }
}

#[test]
fn query_aware_codebooks_estimate_inner_products_better() {
    let d = data();
    let mut plain = IvfPqIndex::new(DIM, params(false)).unwrap();
    plain.build(&d.keys, Some(&d.train_queries)).unwrap();
    let mut aware = IvfPqIndex::new(DIM, params(true)).unwrap();
    aware.build(&d.keys, Some(&d.train_queries)).unwrap();
    let (e_plain, e_aware) = (ip_mse(&plain, &d), ip_mse(&aware, &d));
    assert!(e_aware < 0.75 * e_plain, "query-aware MSE {e_aware} vs plain {e_plain}");
}

#[test]
fn estimates_are_inner_products_with_reconstructions() {
    let d = data();
    for qa in [false, true] {
        let mut index = IvfPqIndex::new(DIM, params(qa)).unwrap();
        index.build(&d.keys[..800 * DIM], Some(&d.train_queries)).unwrap();
        let q = &d.queries[..DIM];
        let est = index.estimated_scores(q).unwrap();
        for id in [0u32, 17, 799] {
            let rec = index.reconstruct(id).unwrap();
            let e = est[id as usize];
            assert!((e - dot(q, &rec)).abs() < 1e-3 * (1.0 + e.abs()), "qa={qa} id={id}");
        }
        assert!(matches!(index.reconstruct(800), Err(Error::OutOfRange { .. })));
    }
}

#[test]
fn pq_only_and_deterministic() {
    let d = data();
    let t = truth(&d, &d.keys);
    let mut index = IvfPqIndex::from_factory(DIM, "PQ8").unwrap();
    assert_eq!(index.describe(), "PQ8");
    index.build(&d.keys, Some(&d.train_queries)).unwrap();
    assert_eq!(index.nlist_effective(), 1);
    let r = index.search(&d.queries, K, &SearchParams::default()).unwrap();
    assert_eq!(r.stats.codes_scored, (NQ * N) as u64);
    assert!(mean_recall(&r, &t) >= 0.9);

    let mut again = IvfPqIndex::from_factory(DIM, "PQ8").unwrap();
    again.build(&d.keys, Some(&d.train_queries)).unwrap();
    assert_eq!(again.search(&d.queries, K, &SearchParams::default()).unwrap(), r);
}

#[test]
fn inserted_vectors_are_found() {
    let d = data();
    let half = N / 2;
    let mut index = IvfPqIndex::new(DIM, params(true)).unwrap();
    index.build(&d.keys[..half * DIM], Some(&d.train_queries)).unwrap();
    assert_eq!(index.insert(&d.keys[half * DIM..]).unwrap(), half as u32..N as u32);
    assert_eq!(index.len(), N);
    assert_eq!(index.lists().total(), N);
    let t = truth(&d, &d.keys);
    let r = index.search(&d.queries, K, &SearchParams::effort(8)).unwrap();
    assert!(mean_recall(&r, &t) >= 0.85);
    assert!(r.labels.iter().any(|&l| l != NO_LABEL && l as usize >= half));

    // The true neighbours that were inserted after the build are found as often as the others.
    let (mut hit, mut total) = (0usize, 0usize);
    for i in 0..NQ {
        for &l in t.labels_of(i).iter().filter(|&&l| l as usize >= half) {
            total += 1;
            hit += r.labels_of(i).contains(&l) as usize;
        }
    }
    assert!(total > 100 && hit as f64 >= 0.85 * total as f64, "{hit} of {total} inserted neighbours found");
    assert_eq!(index.insert(&[]).unwrap(), N as u32..N as u32);

    // Insert into a never-built index trains on what it is given.
    let mut fresh = IvfPqIndex::new(DIM, params(false)).unwrap();
    assert_eq!(fresh.insert(&d.keys[..400 * DIM]).unwrap(), 0..400);
    assert!(fresh.is_trained());
}

#[test]
fn few_keys_degrade_without_panicking() {
    let d = attention_like(20, 3, 10, 16, 1);
    let mut index = IvfPqIndex::new(16, IvfPqParams { m: 4, ..IvfPqParams::default() }).unwrap();
    index.build(&d.keys, Some(&d.train_queries)).unwrap();
    assert_eq!(index.nlist_effective(), 2);
    assert_eq!(index.pq().ksub(), 20);
    let mut flat = FlatIndex::new(16);
    flat.build(&d.keys, None).unwrap();
    let exact = flat.search(&d.queries, 20, &SearchParams::default()).unwrap();
    let r = index.search(&d.queries, 20, &SearchParams::effort(2)).unwrap();
    assert_eq!(r.labels, exact.labels);

    let one = [1.0f32; 16];
    let mut tiny = IvfPqIndex::new(16, IvfPqParams { m: 4, ..IvfPqParams::default() }).unwrap();
    tiny.build(&one, None).unwrap();
    assert_eq!(tiny.search(&one, 1, &SearchParams::default()).unwrap().labels, vec![0]);
}

#[test]
fn duplicate_keys_are_kept_and_searchable() {
    let mut keys = vec![0.25f32; 200 * 8];
    keys.extend_from_slice(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]);
    for qa in [false, true] {
        let mut index =
            IvfPqIndex::new(8, IvfPqParams { nlist: 16, m: 2, query_aware: qa, ..Default::default() }).unwrap();
        index.build(&keys, Some(&keys[..50 * 8])).unwrap();
        let r = index.search(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], 5, &SearchParams::effort(16)).unwrap();
        assert_eq!(r.labels_of(0).len(), 5);
        assert_eq!(r.labels_of(0)[0], 200);
    }
}

#[test]
fn bad_input_is_rejected_by_name() {
    let sp = SearchParams::default();
    let mut index = IvfPqIndex::new(4, IvfPqParams { nlist: 2, m: 2, ..Default::default() }).unwrap();
    assert!(matches!(index.search(&[0.0; 4], 1, &sp), Err(Error::EmptyKeys { .. })));
    assert!(matches!(index.estimated_scores(&[0.0; 4]), Err(Error::EmptyKeys { .. })));
    assert!(matches!(index.build(&[], None), Err(Error::EmptyKeys { .. })));
    assert!(matches!(index.build(&[1.0; 5], None), Err(Error::DimensionMismatch { .. })));
    assert!(matches!(index.build(&[1.0, f32::NAN, 0.0, 0.0], None), Err(Error::NonFinite { .. })));
    assert!(matches!(index.build(&[1.0; 4], Some(&[f32::INFINITY; 4])), Err(Error::NonFinite { .. })));
    assert!(matches!(index.build(&[1.0; 4], Some(&[1.0; 3])), Err(Error::DimensionMismatch { .. })));
    let keys: Vec<f32> = (0..64).map(|i| (i * 37 % 11) as f32).collect();
    index.build(&keys, None).unwrap();
    assert!(matches!(index.search(&[0.0; 4], 0, &sp), Err(Error::BudgetTooLarge { .. })));
    assert!(matches!(index.search(&[0.0; 4], 17, &sp), Err(Error::BudgetTooLarge { .. })));
    assert!(matches!(index.search(&[0.0; 3], 1, &sp), Err(Error::DimensionMismatch { .. })));
    assert!(matches!(index.search(&[0.0, f32::NAN, 0.0, 0.0], 1, &sp), Err(Error::NonFinite { .. })));
    assert!(matches!(index.search(&[0.0; 4], 1, &SearchParams::effort(0)), Err(Error::InvalidParameter { .. })));
    assert!(matches!(index.insert(&[1.0; 3]), Err(Error::DimensionMismatch { .. })));
    assert!(matches!(index.insert(&[f32::NAN; 4]), Err(Error::NonFinite { .. })));
    assert!(matches!(index.set_nprobe(0), Err(Error::InvalidParameter { .. })));
    // A failed build or insert leaves the index usable.
    assert_eq!(index.len(), 16);
    assert!(index.search(&[1.0; 4], 16, &sp).is_ok());

    let named = |p: IvfPqParams, dim: usize| match IvfPqIndex::new(dim, p) {
        Err(Error::InvalidParameter { name, .. }) => name,
        other => panic!("{other:?}"),
    };
    assert_eq!(named(IvfPqParams { m: 3, ..Default::default() }, 64), "m");
    assert_eq!(named(IvfPqParams { nbits: 0, ..Default::default() }, 64), "nbits");
    assert_eq!(named(IvfPqParams { nlist: 0, ..Default::default() }, 64), "nlist");
    assert_eq!(named(IvfPqParams { nprobe: 0, ..Default::default() }, 64), "nprobe");
    assert_eq!(named(IvfPqParams { qa_reg: f32::NAN, ..Default::default() }, 64), "qa_reg");
    assert_eq!(named(IvfPqParams::default(), 0), "dim");
}

#[test]
fn describe_and_memory() {
    let p = IvfPqParams::new(256, 16);
    assert_eq!(p.describe(), "IVF256,PQ16");
    assert_eq!(IvfPqParams { nbits: 4, ..p }.describe(), "IVF256,PQ16x4");
    let d = attention_like(1000, 1, 100, 16, 2);
    let mut index = IvfPqIndex::new(16, IvfPqParams { nlist: 8, m: 4, ..p }).unwrap();
    let stats = index.build(&d.keys, None).unwrap();
    assert_eq!((index.nlist_effective(), index.pq().ksub(), index.mode()), (8, 256, TrainingMode::Plain));
    // The layout, counted by hand: per key the full vector, its id and m one-byte codes; the
    // coarse centroids and their norms; m codebooks of ksub sub-centroids (dim/m floats each)
    // and their norms; no query transform without training queries.
    let per_key = 16 * 4 + 4 + 4;
    let coarse = 8 * 16 * 4 + 8 * 4;
    let codebooks = 256 * 16 * 4 + 4 * 256 * 4;
    let expected = 1000 * per_key + coarse + codebooks;
    assert_eq!(index.memory_bytes(), expected);
    assert_eq!(stats.bytes, expected);
}

/// Build on `keys[..n0]`, insert up to `n1`, save; a fresh index loads it, searches alike, saves
/// the same bytes, and keeps agreeing after inserting the rest.
fn round_trip(
    make: &dyn Fn() -> IvfPqIndex,
    d: &AttentionLike,
    train: Option<&[f32]>,
    n0: usize,
    n1: usize,
) -> Vec<u8> {
    let mut built = make();
    built.build(&d.keys[..n0 * DIM], train).unwrap();
    built.insert(&d.keys[n0 * DIM..n1 * DIM]).unwrap();
    let mut state = Vec::new();
    built.save_state(&mut state).unwrap();
    let mut fresh = make();
    fresh.load_state(&state, &d.keys[..n1 * DIM]).unwrap();
    let mut again = Vec::new();
    fresh.save_state(&mut again).unwrap();
    assert!(again == state, "save → load → save changed the bytes");
    let p = SearchParams::default();
    assert_eq!(built.search(&d.queries, K, &p).unwrap(), fresh.search(&d.queries, K, &p).unwrap());
    assert_eq!(built.estimated_scores(&d.queries[..DIM]).unwrap(), fresh.estimated_scores(&d.queries[..DIM]).unwrap());
    built.insert(&d.keys[n1 * DIM..]).unwrap();
    fresh.insert(&d.keys[n1 * DIM..]).unwrap();
    assert_eq!(built.search(&d.queries, K, &p).unwrap(), fresh.search(&d.queries, K, &p).unwrap());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    built.save_state(&mut a).unwrap();
    fresh.save_state(&mut b).unwrap();
    assert!(a == b, "states differ after the same inserts");
    state
}

#[test]
fn state_round_trips_query_aware_plain_and_unbuilt() {
    let d = data();
    let make = || IvfPqIndex::new(DIM, params(true)).unwrap();
    let state = round_trip(&make, &d, Some(&d.train_queries), 2000, 2500);
    round_trip(&|| IvfPqIndex::new(DIM, params(false)).unwrap(), &d, None, 2000, 2500);
    round_trip(
        &|| IvfPqIndex::new(DIM, IvfPqParams { nlist: 1, ..params(true) }).unwrap(),
        &d,
        Some(&d.train_queries),
        200,
        300,
    );
    // Unbuilt: an empty state, and an insert then builds as it would have.
    let mut empty = Vec::new();
    make().save_state(&mut empty).unwrap();
    let mut e = make();
    e.load_state(&empty, &[]).unwrap();
    assert!(!e.is_trained());
    assert!(matches!(e.load_state(&empty, &d.keys[..DIM]), Err(Error::Corrupt { .. })));

    let keys = &d.keys[..2500 * DIM];
    // Corruption: truncations and bit flips never panic.
    needle_core::state::check_damage(&state, 300, 0x2545_f491_4f6c_dd1d, |s| {
        let mut idx = make();
        idx.load_state(s, keys)?;
        let _ = idx.search(&d.queries[..DIM], K, &SearchParams::default());
        Ok(())
    });
    let mut newer = state.clone();
    newer[8] += 1;
    assert!(make().load_state(&newer, keys).unwrap_err().to_string().contains("newer"));
    let mut other = state.clone();
    other[..8].copy_from_slice(b"ndl.roar");
    assert!(make().load_state(&other, keys).unwrap_err().to_string().contains("another kind"));
    let e = IvfPqIndex::new(DIM, IvfPqParams { seed: 9, ..params(true) }).unwrap().load_state(&state, keys);
    assert!(e.unwrap_err().to_string().contains("params"));
}

/// Load time against build time on an 8K-key head (printed with `--nocapture`; not asserted).
#[test]
#[allow(clippy::print_stderr)] // The timings are what this test is for.
fn load_is_cheaper_than_build_at_8k() {
    let d = attention_like(8192, 1, 2048, 64, 5);
    let make = || IvfPqIndex::from_factory(64, "IVF256,PQ16").unwrap();
    let mut idx = make();
    let t = std::time::Instant::now();
    idx.build(&d.keys, Some(&d.train_queries)).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let mut state = Vec::new();
    idx.save_state(&mut state).unwrap();
    let mut fresh = make();
    let t = std::time::Instant::now();
    fresh.load_state(&state, &d.keys).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    eprintln!(
        "IVF256,PQ16 at 8192 keys: build {:.1} ms, load {:.2} ms, state {} KiB",
        build_s * 1e3,
        load_s * 1e3,
        state.len() / 1024
    );
}
