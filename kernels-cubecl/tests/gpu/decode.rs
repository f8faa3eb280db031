//! Gathered flash-decoding attention against the f64 reference.

use needle_kernels_cubecl::cubecl::prelude::*;
use needle_kernels_cubecl::{DecodeOptions, DeviceKv, Error, decode_attention, read_f32s};
use rand::Rng;
use rand::seq::SliceRandom;

use crate::common::{assert_close, client, normal, ref_attend, rng, values};

/// f32 attention against f64: outputs and LSE within 1e-5 (relative above 1); observed ≤ 1e-6.
pub const TOL: f64 = 1e-5;

/// With scores of magnitude ~1e3 the f32 rounding of a score (|s|·6e-8) enters the exponent:
/// 1e-4 (observed ≤ 3e-5).
pub const TOL_LARGE: f64 = 1e-4;

struct Case {
    n_rows: usize,
    n_kv: usize,
    group: usize,
    d: usize,
    /// Ids per KV head.
    lists: Vec<Vec<u32>>,
    weighted: bool,
    /// Multiplies the queries: large values make scores of magnitude ~1e3–1e4.
    q_gain: f32,
    chunk_rows: usize,
}

fn random_list(rng: &mut rand::rngs::StdRng, n_rows: usize, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..n_rows as u32)).collect()
}

/// Runs one case on the device and checks every query head against the reference.
fn check(seed: u64, case: &Case) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let (n_rows, n_kv, d, g) = (case.n_rows, case.n_kv, case.d, case.group);
    let n_q = n_kv * g;
    let k = normal(&mut r, n_rows * n_kv * d);
    let v = values(&mut r, n_rows * n_kv * d);
    let q: Vec<f32> = normal(&mut r, n_q * d).into_iter().map(|x| x * case.q_gain).collect();
    let weights: Vec<Vec<f32>> =
        case.lists.iter().map(|l| l.iter().map(|_| r.random_range(-3.0f32..1.0)).collect()).collect();
    let scale = 1.0 / (d as f32).sqrt();

    let kv = DeviceKv::upload(&c, &k, &v, n_rows, n_kv, d).unwrap();
    let lists: Vec<&[u32]> = case.lists.iter().map(Vec::as_slice).collect();
    let wref: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
    let got = decode_attention(
        &c,
        &kv,
        &q,
        n_q,
        &lists,
        case.weighted.then_some(wref.as_slice()),
        scale,
        DecodeOptions { chunk_rows: case.chunk_rows },
    )
    .unwrap();

    for hq in 0..n_q {
        let h = hq / g;
        let (out, lse) = ref_attend(
            &q[hq * d..(hq + 1) * d],
            &k,
            &v,
            n_kv,
            d,
            h,
            &case.lists[h],
            case.weighted.then_some(weights[h].as_slice()),
            scale,
        );
        let what = format!("seed {seed} head {hq} (d {d}, group {g}, {} ids)", case.lists[h].len());
        let tol = if case.q_gain > 1.0 { TOL_LARGE } else { TOL };
        assert_close(&format!("{what} out"), &got.out[hq * d..(hq + 1) * d], &out, tol);
        assert_close(&format!("{what} lse"), &got.lse[hq..hq + 1], &[lse], tol);
    }
}

#[test]
fn decode_matches_reference_over_shapes_and_groups() {
    let mut r = rng(1);
    let mut seed = 100;
    for d in [64, 80, 96] {
        for group in [1, 3, 4] {
            for weighted in [false, true] {
                let n_rows = 333;
                let n_kv = 3;
                // Head 0: a random selection (odd length, duplicates possible); head 1: one row;
                // head 2: a static-like prefix + window, not a multiple of the tile.
                let lists = vec![
                    random_list(&mut r, n_rows, 201),
                    vec![r.random_range(0..n_rows as u32)],
                    (0..4).chain(250..333).collect(),
                ];
                seed += 1;
                check(seed, &Case { n_rows, n_kv, group, d, lists, weighted, q_gain: 1.0, chunk_rows: 128 });
            }
        }
    }
}

#[test]
fn decode_empty_lists_give_zero_output_and_neg_inf_lse() {
    let mut r = rng(2);
    let lists = vec![vec![], random_list(&mut r, 50, 17), vec![]];
    check(21, &Case { n_rows: 50, n_kv: 3, group: 4, d: 64, lists, weighted: true, q_gain: 1.0, chunk_rows: 64 });
    // Every list empty (the id buffer itself is empty).
    check(
        22,
        &Case {
            n_rows: 50,
            n_kv: 2,
            group: 3,
            d: 80,
            lists: vec![vec![], vec![]],
            weighted: false,
            q_gain: 1.0,
            chunk_rows: 64,
        },
    );
    // A store with no rows at all.
    check(
        23,
        &Case {
            n_rows: 0,
            n_kv: 1,
            group: 1,
            d: 64,
            lists: vec![vec![]],
            weighted: false,
            q_gain: 1.0,
            chunk_rows: 64,
        },
    );
}

#[test]
fn decode_long_context_splits_into_many_chunks() {
    let mut r = rng(3);
    let n_rows = 10_000;
    let mut all: Vec<u32> = (0..n_rows as u32).collect();
    all.shuffle(&mut r);
    let mut sparse = random_list(&mut r, n_rows, 2_500);
    sparse.sort_unstable();
    // 10,000 ids at 256 rows a chunk: 40 cubes for head 0; head 1 leaves chunks 10.. empty.
    let lists = vec![all, sparse];
    check(31, &Case { n_rows, n_kv: 2, group: 4, d: 64, lists, weighted: false, q_gain: 1.0, chunk_rows: 256 });
}

#[test]
fn decode_is_stable_for_large_magnitude_scores() {
    let mut r = rng(4);
    let n_rows = 700;
    let lists = vec![random_list(&mut r, n_rows, 650), (0..n_rows as u32).rev().collect()];
    // q·k/√d of order 1e3: a naive exp overflows; the online max keeps it exact.
    check(41, &Case { n_rows, n_kv: 2, group: 3, d: 96, lists, weighted: true, q_gain: 300.0, chunk_rows: 64 });
}

#[test]
fn decode_chunking_does_not_change_the_result() {
    let Some(c) = client() else { return };
    let mut r = rng(5);
    let (n_rows, d) = (1_500, 64);
    let k = normal(&mut r, n_rows * d);
    let v = values(&mut r, n_rows * d);
    let q = normal(&mut r, 4 * d);
    let ids: Vec<u32> = (0..n_rows as u32).collect();
    let kv = DeviceKv::upload(&c, &k, &v, n_rows, 1, d).unwrap();
    let run =
        |chunk_rows| decode_attention(&c, &kv, &q, 4, &[&ids], None, 0.125, DecodeOptions { chunk_rows }).unwrap();
    let one = run(1 << 20);
    for chunk_rows in [1, 64, 200, 777] {
        let many = run(chunk_rows);
        let want: Vec<f64> = one.out.iter().map(|&x| x as f64).collect();
        assert_close(&format!("chunk_rows {chunk_rows}"), &many.out, &want, 1e-5);
        let want: Vec<f64> = one.lse.iter().map(|&x| x as f64).collect();
        assert_close(&format!("chunk_rows {chunk_rows} lse"), &many.lse, &want, 1e-5);
    }
}

#[test]
fn decode_matches_needle_core_reference_attention() {
    let Some(c) = client() else { return };
    let mut r = rng(6);
    let (n_rows, d) = (300, 80);
    let k = normal(&mut r, n_rows * d);
    let v = values(&mut r, n_rows * d);
    let q = normal(&mut r, d);
    let ids = random_list(&mut r, n_rows, 123);
    let w: Vec<f32> = ids.iter().map(|_| r.random_range(-2.0f32..0.0)).collect();
    let kv = DeviceKv::upload(&c, &k, &v, n_rows, 1, d).unwrap();
    let got = decode_attention(&c, &kv, &q, 1, &[&ids], Some(&[&w]), 0.1, DecodeOptions::default()).unwrap();
    let keys = needle_core::Rows::new("k", &k, d).unwrap();
    let values = needle_core::Rows::new("v", &v, d).unwrap();
    let want = needle_core::attention::attend_weighted::<f64>(
        &q,
        &keys,
        &values,
        ids.iter().copied().zip(w.iter().copied()),
        0.1,
    )
    .unwrap();
    assert_close("out", &got.out, &want.out, TOL);
    assert_close("lse", &got.lse, &[want.lse], TOL);
}

#[test]
fn decode_rejects_bad_arguments() {
    let Some(c) = client() else { return };
    let kv = DeviceKv::upload(&c, &[0.0; 2 * 2 * 64], &[0.0; 2 * 2 * 64], 2, 2, 64).unwrap();
    let q = vec![0.0; 4 * 64];
    let opts = DecodeOptions::default();
    let err = decode_attention(&c, &kv, &q, 4, &[&[0, 2], &[]], None, 1.0, opts).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "lists", .. }), "{err}");
    let err = decode_attention(&c, &kv, &q[..100], 4, &[&[0], &[]], None, 1.0, opts).unwrap_err();
    assert_eq!(err, Error::Len { param: "q", got: 100, expected: 256 });
    let err = decode_attention(&c, &kv, &q, 3, &[&[0], &[]], None, 1.0, opts).unwrap_err();
    assert!(matches!(err, Error::Len { param: "q", .. }), "{err}");
    let err = decode_attention(&c, &kv, &q, 4, &[&[0], &[1]], Some(&[&[0.0], &[]]), 1.0, opts).unwrap_err();
    assert!(matches!(err, Error::Len { param: "log_weights (one list)", .. }), "{err}");
    let err = DeviceKv::upload(&c, &[0.0; 10], &[0.0; 10], 2, 2, 64).unwrap_err();
    assert!(matches!(err, Error::Len { param: "k", .. }), "{err}");
}

#[test]
fn decode_neg_inf_log_weights_drop_their_rows() {
    let Some(c) = client() else { return };
    let mut r = rng(7);
    let (n_rows, d) = (400, 64);
    let k = normal(&mut r, n_rows * d);
    let v = values(&mut r, n_rows * d);
    let q = normal(&mut r, 3 * d);
    let ids = random_list(&mut r, n_rows, 300);
    // Every third weight is -inf (weight 0): those rows must not count at all.
    let w: Vec<f32> =
        (0..ids.len()).map(|j| if j % 3 == 0 { f32::NEG_INFINITY } else { r.random_range(-1.0f32..1.0) }).collect();
    let kv = DeviceKv::upload(&c, &k, &v, n_rows, 1, d).unwrap();
    let got = decode_attention(&c, &kv, &q, 3, &[&ids], Some(&[&w]), 0.125, DecodeOptions { chunk_rows: 64 }).unwrap();
    let (kept, kept_w): (Vec<u32>, Vec<f32>) =
        ids.iter().zip(&w).filter(|(_, w)| w.is_finite()).map(|(&i, &w)| (i, w)).unzip();
    for hq in 0..3 {
        let (out, lse) = ref_attend(&q[hq * d..(hq + 1) * d], &k, &v, 1, d, 0, &kept, Some(&kept_w), 0.125);
        assert_close(&format!("head {hq} out"), &got.out[hq * d..(hq + 1) * d], &out, TOL);
        assert_close(&format!("head {hq} lse"), &got.lse[hq..hq + 1], &[lse], TOL);
    }
    // All weights -inf: an empty key set.
    let all_zero = vec![f32::NEG_INFINITY; ids.len()];
    let got = decode_attention(&c, &kv, &q, 3, &[&ids], Some(&[&all_zero]), 0.125, DecodeOptions::default()).unwrap();
    assert!(got.lse.iter().all(|&l| l == f32::NEG_INFINITY), "{:?}", got.lse);
    assert!(got.out.iter().all(|&x| x == 0.0));
}

#[test]
fn decode_over_a_store_filled_by_device_appends() {
    let Some(c) = client() else { return };
    let mut r = rng(8);
    let (n_kv, d, group) = (2, 80, 3);
    let k = normal(&mut r, 88 * n_kv * d);
    let v = values(&mut r, 88 * n_kv * d);
    let mut kv = DeviceKv::with_capacity(&c, 100, n_kv, d).unwrap();
    // Prefill chunk, one decode token, another chunk: rows land in order.
    for (a, b) in [(0, 37), (37, 38), (38, 88)] {
        let span = a * n_kv * d..b * n_kv * d;
        kv.append(&c, &k[span.clone()], &v[span]).unwrap();
    }
    assert_eq!(kv.n_rows, 88);
    let q = normal(&mut r, n_kv * group * d);
    let all: Vec<u32> = (0..88).collect();
    let got =
        decode_attention(&c, &kv, &q, n_kv * group, &[&all, &all[10..]], None, 0.1, DecodeOptions::default()).unwrap();
    for hq in 0..n_kv * group {
        let h = hq / group;
        let ids = if h == 0 { &all[..] } else { &all[10..] };
        let (out, lse) = ref_attend(&q[hq * d..(hq + 1) * d], &k, &v, n_kv, d, h, ids, None, 0.1);
        assert_close(&format!("head {hq} out"), &got.out[hq * d..(hq + 1) * d], &out, TOL);
        assert_close(&format!("head {hq} lse"), &got.lse[hq..hq + 1], &[lse], TOL);
    }
    // Rows past n_rows are not addressable, and the capacity holds.
    let err =
        decode_attention(&c, &kv, &q, n_kv * group, &[&[88], &[]], None, 0.1, DecodeOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "lists", .. }), "{err}");
    let err = kv.append(&c, &k[..13 * n_kv * d], &v[..13 * n_kv * d]).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "k", .. }), "{err}");
    assert_eq!(kv.n_rows, 88);
}

#[test]
fn decode_over_a_store_grown_on_the_device_from_device_rows() {
    let Some(c) = client() else { return };
    let mut r = rng(10);
    let (n_kv, d, group) = (3, 64, 2);
    let k = normal(&mut r, 150 * n_kv * d);
    let v = values(&mut r, 150 * n_kv * d);
    let (kh, vh) = (c.create_from_slice(f32::as_bytes(&k)), c.create_from_slice(f32::as_bytes(&v)));
    let mut kv = DeviceKv::with_capacity(&c, 16, n_kv, d).unwrap();
    kv.append(&c, &k[..5 * n_kv * d], &v[..5 * n_kv * d]).unwrap();
    // Rows already on the device (a model's new keys): the first `n` rows of the handles.
    let err = kv.append_device(&c, &kh, &vh, 12).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "n", .. }), "{err}");
    kv.reserve(&c, 40).unwrap();
    assert_eq!((kv.n_rows, kv.capacity), (5, 40));
    let (k2, v2) = (normal(&mut r, 30 * n_kv * d), values(&mut r, 30 * n_kv * d));
    let (kh2, vh2) = (c.create_from_slice(f32::as_bytes(&k2)), c.create_from_slice(f32::as_bytes(&v2)));
    kv.append_device(&c, &kh2, &vh2, 30).unwrap();
    kv.reserve(&c, 20).unwrap(); // no-op: room already
    kv.reserve(&c, 200).unwrap();
    kv.append_device(&c, &kh, &vh, 0).unwrap();
    kv.append_device(&c, &kh, &vh, 150).unwrap();
    assert_eq!((kv.n_rows, kv.capacity), (185, 200));
    let row = n_kv * d;
    let all_k = [&k[..5 * row], &k2[..], &k[..]].concat();
    let all_v = [&v[..5 * row], &v2[..], &v[..]].concat();
    let q = normal(&mut r, n_kv * group * d);
    let ids: Vec<u32> = (0..185).collect();
    let lists = [&ids[..], &ids[3..40], &ids[100..]];
    let got = decode_attention(&c, &kv, &q, n_kv * group, &lists, None, 0.1, DecodeOptions::default()).unwrap();
    for hq in 0..n_kv * group {
        let h = hq / group;
        let (out, lse) = ref_attend(&q[hq * d..(hq + 1) * d], &all_k, &all_v, n_kv, d, h, lists[h], None, 0.1);
        assert_close(&format!("head {hq} out"), &got.out[hq * d..(hq + 1) * d], &out, TOL);
        assert_close(&format!("head {hq} lse"), &got.lse[hq..hq + 1], &[lse], TOL);
    }
}

#[test]
fn decode_and_prefill_at_a_llama_like_shape() {
    // 32 query heads over 8 KV heads of 128: the shape of the default model family.
    let mut r = rng(9);
    let n_rows = 3_000;
    let lists: Vec<Vec<u32>> = (0..8).map(|h| random_list(&mut r, n_rows, 500 + 300 * h)).collect();
    check(91, &Case { n_rows, n_kv: 8, group: 4, d: 128, lists, weighted: true, q_gain: 1.0, chunk_rows: 256 });
    crate::prefill::check(92, 40, 100, 8, 4, 128, 1.0);
}

#[test]
fn several_buffers_come_back_in_one_read() {
    let Some(c) = client() else { return };
    let mut r = rng(12);
    let (a, b) = (normal(&mut r, 70), normal(&mut r, 5));
    let (ah, bh) = (c.create_from_slice(f32::as_bytes(&a)), c.create_from_slice(f32::as_bytes(&b)));
    // The first `n` floats of each, in order; the same buffer twice; asking past a buffer fails.
    let got = read_f32s(&c, &[(&ah, 70), (&bh, 3), (&ah, 1)]).unwrap();
    assert_eq!(got, vec![a.clone(), b[..3].to_vec(), a[..1].to_vec()]);
    assert!(matches!(read_f32s(&c, &[(&bh, 1000)]).unwrap_err(), Error::ReadBack(_)));
    assert_eq!(read_f32s(&c, &[]).unwrap(), Vec::<Vec<f32>>::new());
}
