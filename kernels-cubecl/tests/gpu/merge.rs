//! LSE merge: device static part + retrieved part equals attention over the union.

use needle_kernels_cubecl::{Attention, DecodeOptions, DeviceKv, decode_attention, lse_merge};
use rand::Rng;

use crate::common::{assert_close, client, normal, ref_attend, rng, values};
use crate::decode::TOL;

#[test]
fn merge_of_two_halves_equals_attention_over_the_union() {
    let Some(c) = client() else { return };
    let mut r = rng(11);
    for (d, group) in [(64, 1), (80, 3), (96, 4)] {
        let (n_rows, n_kv) = (500, 2);
        let n_q = n_kv * group;
        let k = normal(&mut r, n_rows * n_kv * d);
        let v = values(&mut r, n_rows * n_kv * d);
        let q = normal(&mut r, n_q * d);
        let kv = DeviceKv::upload(&c, &k, &v, n_rows, n_kv, d).unwrap();
        // Static part: sinks + window; retrieved part: a random disjoint middle selection.
        let stat: Vec<u32> = (0..4).chain(440..500).collect();
        let retr: Vec<Vec<u32>> = (0..n_kv).map(|_| (4..440).filter(|_| r.random_bool(0.2)).collect()).collect();
        let opts = DecodeOptions::default();
        let a = decode_attention(&c, &kv, &q, n_q, &[&stat, &stat], None, 0.1, opts).unwrap();
        let b = decode_attention(&c, &kv, &q, n_q, &[&retr[0], &retr[1]], None, 0.1, opts).unwrap();
        let m = lse_merge(&c, d, &a, &b).unwrap();
        for hq in 0..n_q {
            let h = hq / group;
            let union: Vec<u32> = stat.iter().chain(&retr[h]).copied().collect();
            let (out, lse) = ref_attend(&q[hq * d..(hq + 1) * d], &k, &v, n_kv, d, h, &union, None, 0.1);
            assert_close(&format!("d {d} head {hq} out"), &m.out[hq * d..(hq + 1) * d], &out, TOL);
            assert_close(&format!("d {d} head {hq} lse"), &m.lse[hq..hq + 1], &[lse], TOL);
        }
    }
}

#[test]
fn merge_handles_empty_partials_exactly() {
    let Some(c) = client() else { return };
    let mut r = rng(12);
    let d = 80;
    let heads = 4;
    let full = Attention { out: normal(&mut r, heads * d), lse: vec![3.5, -20.0, 0.0, 1e4] };
    let other =
        Attention { out: normal(&mut r, heads * d), lse: vec![f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY, 1e4 - 1.0] };
    let empty = Attention { out: vec![0.0; heads * d], lse: vec![f32::NEG_INFINITY; heads] };
    let as64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();

    // Either side empty: the other side passes through unchanged.
    let m = lse_merge(&c, d, &full, &empty).unwrap();
    assert_eq!(m, full);
    let m = lse_merge(&c, d, &empty, &full).unwrap();
    assert_eq!(m, full);
    // Both empty: zeros and -inf.
    let m = lse_merge(&c, d, &empty, &empty).unwrap();
    assert_eq!(m, empty);
    // Mixed heads, including two large, close LSEs (1e4 and 1e4 − 1).
    let m = lse_merge(&c, d, &full, &other).unwrap();
    for h in 0..heads {
        let (a, b) = (full.lse[h] as f64, other.lse[h] as f64);
        let (oa, ob) = (&full.out[h * d..(h + 1) * d], &other.out[h * d..(h + 1) * d]);
        let (want_out, want_lse) = if b == f64::NEG_INFINITY {
            (as64(oa), a)
        } else {
            let mx = a.max(b);
            let (wa, wb) = ((a - mx).exp(), (b - mx).exp());
            let s = wa + wb;
            (oa.iter().zip(ob).map(|(&x, &y)| (wa * x as f64 + wb * y as f64) / s).collect(), mx + s.ln())
        };
        assert_close(&format!("head {h} out"), &m.out[h * d..(h + 1) * d], &want_out, 1e-5);
        assert_close(&format!("head {h} lse"), &m.lse[h..h + 1], &[want_lse], 1e-6);
    }
}

#[test]
fn merge_rejects_mismatched_partials() {
    let Some(c) = client() else { return };
    let a = Attention { out: vec![0.0; 64], lse: vec![0.0] };
    let b = Attention { out: vec![0.0; 63], lse: vec![0.0] };
    let err = lse_merge(&c, 64, &a, &b).unwrap_err();
    assert!(matches!(err, needle_kernels_cubecl::Error::Len { param: "b.out", .. }), "{err}");
}

#[test]
fn merge_over_a_grid_wider_than_one_axis() {
    let Some(c) = client() else { return };
    let mut r = rng(13);
    // 66,000 heads × 64 = 66,000 cubes of 64 units: the grid wraps onto y.
    let (heads, d) = (66_000, 64);
    let lse = |r: &mut rand::rngs::StdRng| -> Vec<f32> {
        (0..heads).map(|h| if h % 5 == 0 { f32::NEG_INFINITY } else { r.random_range(-5.0f32..5.0) }).collect()
    };
    let a = Attention { out: normal(&mut r, heads * d), lse: lse(&mut r) };
    let b = Attention { out: normal(&mut r, heads * d), lse: lse(&mut r) };
    let m = lse_merge(&c, d, &a, &b).unwrap();
    for h in (0..heads).step_by(97).chain([heads - 1]) {
        let (la, lb) = (a.lse[h] as f64, b.lse[h] as f64);
        let (oa, ob) = (&a.out[h * d..(h + 1) * d], &b.out[h * d..(h + 1) * d]);
        let (want, want_lse): (Vec<f64>, f64) = if la == f64::NEG_INFINITY && lb == f64::NEG_INFINITY {
            (vec![0.0; d], f64::NEG_INFINITY)
        } else {
            let mx = la.max(lb);
            let (wa, wb) = ((la - mx).exp(), (lb - mx).exp());
            let s = wa + wb;
            (oa.iter().zip(ob).map(|(&x, &y)| (wa * x as f64 + wb * y as f64) / s).collect(), mx + s.ln())
        };
        assert_close(&format!("head {h} out"), &m.out[h * d..(h + 1) * d], &want, 1e-5);
        assert_close(&format!("head {h} lse"), &m.lse[h..h + 1], &[want_lse], 1e-6);
    }
}
