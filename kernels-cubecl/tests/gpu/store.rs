//! `KvStore`: KV slots in f32 or f16 over several buffers, against the f64 reference.

use half::f16;
use needle_kernels_cubecl::cubecl::prelude::*;
use needle_kernels_cubecl::{Error, KvFormat, KvStore, read_f32s};
use rand::Rng;
use rand::seq::SliceRandom;

use crate::common::{assert_close, client, normal, ref_attend, rng, values};
use crate::decode::TOL;

/// `x` as the store keeps it.
fn stored(format: KvFormat, x: f32) -> f32 {
    match format {
        KvFormat::F32 => x,
        KvFormat::F16 => f16::from_f32(x).to_f32(),
    }
}

#[test]
fn device_rows_round_to_f16_as_the_host_does() {
    let Some(c) = client() else { return };
    let mut r = rng(31);
    // Every rounding case: ties (odd and even), subnormals and their ties, overflow to inf,
    // underflow to ±0, the largest finite, inf, NaN, and wide random magnitudes.
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65519.0,
        65520.0,
        -1.0e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        6.0e-8,
        -3.0e-8,
        2.98e-8,
        1.0e-10,
        f32::MIN_POSITIVE,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        f16::MIN_POSITIVE_SUBNORMAL.to_f32() * 1.5,
        f16::MIN_POSITIVE_SUBNORMAL.to_f32() * 2.5,
        f16::MIN_POSITIVE.to_f32() * 0.75,
    ];
    for _ in 0..4000 {
        let e = r.random_range(-30i32..18);
        xs.push(r.random_range(-1.0f32..1.0) * 2f32.powi(e));
    }
    xs.extend((0..64).map(|_| f32::from_bits(r.random::<u32>())));
    xs.resize(xs.len().next_multiple_of(4), 0.5);
    // Rows of 2 heads × 2: the slots hold the values in order.
    let n = xs.len() / 4;
    let mut store = KvStore::new(KvFormat::F16, 2, 2, 1 << 20).unwrap();
    store.reserve(&c, n).unwrap();
    let h = c.create_from_slice(f32::as_bytes(&xs));
    store.write_device(&c, 0, &h, &h, n).unwrap();
    let dense = store.dense_f32(&c, n).unwrap();
    let back = read_f32s(&c, &[(&dense.k, xs.len()), (&dense.v, xs.len())]).unwrap();
    for (i, &x) in xs.iter().enumerate() {
        let want = f16::from_f32(x).to_f32();
        for got in [back[0][i], back[1][i]] {
            if want.is_nan() {
                assert!(got.is_nan(), "{x:e}: got {got:e}, want NaN");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{x:e} ({:#x}): got {got:e}, want {want:e}", x.to_bits());
            }
        }
    }
    // Host rows round the same way.
    let mut host = KvStore::new(KvFormat::F16, 2, 2, 1 << 20).unwrap();
    host.reserve(&c, n).unwrap();
    host.write(&c, 0, &xs, &xs).unwrap();
    let dense = host.dense_f32(&c, n).unwrap();
    let back = read_f32s(&c, &[(&dense.k, xs.len())]).unwrap();
    for (&x, &got) in xs.iter().zip(&back[0]) {
        let want = f16::from_f32(x).to_f32();
        assert!(got.to_bits() == want.to_bits() || want.is_nan() && got.is_nan(), "host {x:e}: {got:e}");
    }
}

/// Decode over a store of `format` whose buffers hold `per_buffer` slots, the rows written in
/// pieces (host rows and device rows, across buffer boundaries) at shuffled slots, against the
/// f64 reference over the rows as stored.
fn check_store(seed: u64, format: KvFormat, per_buffer: usize, weighted: bool) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let (n, n_kv, d, group) = (300, 2, 64, 3);
    let row = n_kv * d;
    let k = normal(&mut r, n * row);
    let v = values(&mut r, n * row);
    let mut store = KvStore::new(format, n_kv, d, per_buffer).unwrap();
    // Row i lives at slot perm[i]; written in runs of consecutive slots.
    let perm: Vec<usize> = {
        let mut p: Vec<usize> = (0..n).collect();
        p[40..].shuffle(&mut r);
        p
    };
    let mut at = 0;
    while at < n {
        let len = r.random_range(1..40).min(n - at);
        store.reserve(&c, at + len).unwrap();
        let (a, b) = (at * row, (at + len) * row);
        if r.random_bool(0.5) {
            store.write(&c, at, &k[a..b], &v[a..b]).unwrap();
        } else {
            let (kh, vh) = (c.create_from_slice(f32::as_bytes(&k[a..b])), c.create_from_slice(f32::as_bytes(&v[a..b])));
            store.write_device(&c, at, &kh, &vh, len).unwrap();
        }
        at += len;
    }
    assert_eq!(store.n_segments(), n.div_ceil(per_buffer), "buffers of {per_buffer} slots");
    assert!(store.capacity() >= n);
    let value_bytes = if format == KvFormat::F16 { 2 } else { 4 };
    assert_eq!(store.bytes(), (store.capacity() * row * value_bytes * 2) as u64);
    // Slot s holds row s (written in order); ask for rows through perm to scatter the lists.
    let (ks, vs): (Vec<f32>, Vec<f32>) =
        (k.iter().map(|&x| stored(format, x)).collect(), v.iter().map(|&x| stored(format, x)).collect());
    let lists: Vec<Vec<u32>> =
        vec![perm[..250].iter().map(|&s| s as u32).collect(), (0..4).chain(200..300).rev().collect()];
    let weights: Vec<Vec<f32>> =
        lists.iter().map(|l| l.iter().map(|_| r.random_range(-3.0f32..1.0)).collect()).collect();
    let n_q = n_kv * group;
    let q = normal(&mut r, n_q * d);
    let scale = 1.0 / (d as f32).sqrt();
    let qh = c.create_from_slice(f32::as_bytes(&q));
    let (out, lse) = (c.empty(n_q * d * 4), c.empty(n_q * 4));
    let lr: Vec<&[u32]> = lists.iter().map(Vec::as_slice).collect();
    let wr: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
    store.launch_decode(&c, &qh, n_q, &lr, weighted.then_some(&wr[..]), scale, 64, &out, &lse).unwrap();
    let got = read_f32s(&c, &[(&out, n_q * d), (&lse, n_q)]).unwrap();
    for hq in 0..n_q {
        let h = hq / group;
        let w = weighted.then_some(weights[h].as_slice());
        let (o, l) = ref_attend(&q[hq * d..(hq + 1) * d], &ks, &vs, n_kv, d, h, &lists[h], w, scale);
        let what = format!("{format:?} {per_buffer} slots/buffer weighted {weighted} head {hq}");
        assert_close(&format!("{what} out"), &got[0][hq * d..(hq + 1) * d], &o, TOL);
        assert_close(&format!("{what} lse"), &got[1][hq..hq + 1], &[l], TOL);
    }
    // The rows come back as one f32 store while they fit the first buffer.
    if per_buffer >= n {
        let dense = store.dense_f32(&c, n).unwrap();
        let back = read_f32s(&c, &[(&dense.k, n * row)]).unwrap();
        assert_eq!(back[0], ks);
    } else {
        assert!(matches!(store.dense_f32(&c, n), Err(Error::Invalid { param: "n_rows", .. })));
    }
}

#[test]
fn a_store_in_f32_or_f16_over_several_buffers_matches_the_reference() {
    let mut seed = 40;
    for format in [KvFormat::F32, KvFormat::F16] {
        // One buffer, one boundary inside a write, many small buffers.
        for per_buffer in [512, 160, 37] {
            for weighted in [false, true] {
                seed += 1;
                check_store(seed, format, per_buffer, weighted);
            }
        }
    }
}

#[test]
fn a_store_refuses_what_it_cannot_hold() {
    let Some(c) = client() else { return };
    assert!(matches!(KvStore::new(KvFormat::F16, 2, 63, 10), Err(Error::Invalid { param: "head_dim", .. })));
    assert!(matches!(KvStore::new(KvFormat::F32, 0, 64, 10), Err(Error::Invalid { param: "n_kv_heads", .. })));
    let mut s = KvStore::new(KvFormat::F32, 1, 4, 10).unwrap();
    let q = c.create_from_slice(f32::as_bytes(&[0.0; 4]));
    let (out, lse) = (c.empty(16), c.empty(4));
    // No buffer yet; then a slot past the capacity.
    assert!(s.launch_decode(&c, &q, 1, &[&[]], None, 1.0, 64, &out, &lse).is_err());
    s.reserve(&c, 5).unwrap();
    let err = s.launch_decode(&c, &q, 1, &[&[5]], None, 1.0, 64, &out, &lse).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "lists", .. }), "{err}");
    let err = s.write(&c, 4, &[0.0; 8], &[0.0; 8]).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "slot", .. }), "{err}");
    // Empty lists: zero output, -inf.
    s.launch_decode(&c, &q, 1, &[&[]], None, 1.0, 64, &out, &lse).unwrap();
    let got = read_f32s(&c, &[(&out, 4), (&lse, 1)]).unwrap();
    assert_eq!(got[0], [0.0; 4]);
    assert_eq!(got[1], [f32::NEG_INFINITY]);
}
