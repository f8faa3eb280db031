//! Causal prefill against the f64 reference: query i of the chunk sees keys 0..=start + i.

use needle_kernels_cubecl::{DeviceKv, Error, prefill_attention};

use crate::common::{assert_close, client, normal, ref_attend, rng, values};
use crate::decode::{TOL, TOL_LARGE};

pub fn check(seed: u64, t: usize, start: usize, n_kv: usize, group: usize, d: usize, q_gain: f32) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let n_rows = start + t + 3; // rows past the chunk exist and must stay unseen
    let n_q = n_kv * group;
    let k = normal(&mut r, n_rows * n_kv * d);
    let v = values(&mut r, n_rows * n_kv * d);
    let q: Vec<f32> = normal(&mut r, t * n_q * d).into_iter().map(|x| x * q_gain).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let kv = DeviceKv::upload(&c, &k, &v, n_rows, n_kv, d).unwrap();
    let got = prefill_attention(&c, &kv, &q, n_q, start, scale).unwrap();
    for i in 0..t {
        let ids: Vec<u32> = (0..=(start + i) as u32).collect();
        for hq in 0..n_q {
            let row = i * n_q + hq;
            let (out, lse) = ref_attend(&q[row * d..(row + 1) * d], &k, &v, n_kv, d, hq / group, &ids, None, scale);
            let what = format!("seed {seed} t {t} start {start} group {group} d {d}: token {i} head {hq}");
            let tol = if q_gain > 1.0 { TOL_LARGE } else { TOL };
            assert_close(&format!("{what} out"), &got.out[row * d..(row + 1) * d], &out, tol);
            assert_close(&format!("{what} lse"), &got.lse[row..row + 1], &[lse], tol);
        }
    }
}

#[test]
fn prefill_matches_reference_over_shapes_and_groups() {
    let mut seed = 90;
    for (d, group) in [(64, 1), (80, 3), (96, 4), (64, 4)] {
        for (t, start) in [(1, 0), (37, 0), (21, 45)] {
            seed += 1;
            check(seed, t, start, 2, group, d, 1.0);
        }
    }
}

#[test]
fn prefill_is_stable_for_large_magnitude_scores() {
    check(99, 19, 70, 1, 3, 64, 200.0);
}

#[test]
fn prefill_rejects_a_chunk_past_the_store() {
    let Some(c) = client() else { return };
    let kv = DeviceKv::upload(&c, &[0.0; 10 * 64], &[0.0; 10 * 64], 10, 1, 64).unwrap();
    let err = prefill_attention(&c, &kv, &[0.0; 4 * 64], 1, 7, 1.0).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "start", .. }), "{err}");
    let err = prefill_attention(&c, &kv, &[0.0; 65], 1, 0, 1.0).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "q", .. }), "{err}");
}
