//! Property tests of the reference attention: the identities every fast path relies on.

use needle_core::attention::{Partial, attend, causal_chunk, dense, merge};
use needle_core::{Rows, Selection, StaticPart, attend_selected};
use proptest::prelude::*;

const TOL: f64 = 1e-9;

/// Keys, values and a query with `n` rows of `d` floats, and a random partition label per key.
fn case() -> impl Strategy<Value = (usize, Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>)> {
    (1usize..40, 1usize..9).prop_flat_map(|(n, d)| {
        (
            Just(d),
            prop::collection::vec(-3.0f32..3.0, n * d),
            prop::collection::vec(-3.0f32..3.0, n * d),
            prop::collection::vec(-3.0f32..3.0, d),
            prop::collection::vec(0u8..3, n),
        )
    })
}

/// Plain softmax attention of `q` over the first `upto` rows, in f64: `(lse, output)`.
fn naive(q: &[f32], k: &[f32], v: &[f32], d: usize, upto: usize, scale: f32) -> (f64, Vec<f64>) {
    let s: Vec<f64> = (0..upto)
        .map(|j| (0..d).map(|c| f64::from(q[c]) * f64::from(k[j * d + c])).sum::<f64>() * f64::from(scale))
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
    let out = (0..d).map(|c| (0..upto).map(|j| (s[j] - m).exp() / z * f64::from(v[j * d + c])).sum()).collect();
    (m + z.ln(), out)
}

fn close(a: &Partial<f64>, b: &Partial<f64>) -> bool {
    (a.lse == b.lse || (a.lse - b.lse).abs() < TOL) && a.out.iter().zip(&b.out).all(|(x, y)| (x - y).abs() < TOL)
}

proptest! {
    #[test]
    fn dense_equals_merge_of_any_partition((d, k, v, q, part) in case()) {
        let (keys, values) = (Rows::new("k", &k, d).unwrap(), Rows::new("v", &v, d).unwrap());
        let full: Partial<f64> = dense(&q, &keys, &values, 0.7).unwrap();
        let mut acc = Partial::<f64>::empty(d);
        for p in 0..3u8 {
            let ids = part.iter().enumerate().filter(|(_, l)| **l == p).map(|(i, _)| i as u32);
            let piece: Partial<f64> = attend(&q, &keys, &values, ids, 0.7).unwrap();
            acc = merge(&acc, &piece);
        }
        prop_assert!(close(&acc, &full), "merged {:?} vs dense {:?}", acc, full);
    }

    #[test]
    fn sparse_over_all_ids_equals_dense((d, k, v, q, _p) in case()) {
        let (keys, values) = (Rows::new("k", &k, d).unwrap(), Rows::new("v", &v, d).unwrap());
        let n = k.len() / d;
        let full: Partial<f64> = dense(&q, &keys, &values, 1.0).unwrap();
        let rev: Partial<f64> = attend(&q, &keys, &values, (0..n as u32).rev(), 1.0).unwrap();
        prop_assert!(close(&rev, &full));
        // f32 accumulation agrees with f64 to single-precision tolerance.
        let f: Partial<f32> = dense(&q, &keys, &values, 1.0).unwrap();
        prop_assert!((f.lse as f64 - full.lse).abs() < 1e-4);
        prop_assert!(f.out.iter().zip(&full.out).all(|(a, b)| (*a as f64 - b).abs() < 1e-4));
    }

    #[test]
    fn static_plus_full_selection_equals_dense((d, k, v, q, _p) in case(), sinks in 0usize..5, window in 0usize..10) {
        let (keys, values) = (Rows::new("k", &k, d).unwrap(), Rows::new("v", &v, d).unwrap());
        let n = k.len() / d;
        let s = StaticPart { sinks, window };
        let sel = Selection { ids: s.dynamic_range(n).collect(), ..Default::default() };
        let got: Partial<f64> = attend_selected(&q, &keys, &values, s, &sel, 0.5).unwrap();
        let full: Partial<f64> = dense(&q, &keys, &values, 0.5).unwrap();
        prop_assert!(close(&got, &full));
    }

    #[test]
    fn causal_chunk_is_prefix_attention((d, k, v, _q, _p) in case(), first in 0usize..5, noise in -3.0f32..3.0) {
        let n = k.len() / d;
        prop_assume!(first < n);
        let qs = &k[first * d..];
        let (keys, values) = (Rows::new("k", &k, d).unwrap(), Rows::new("v", &v, d).unwrap());
        let got: Vec<Partial<f64>> = causal_chunk(qs, first, &keys, &values, 0.3).unwrap();
        prop_assert_eq!(got.len(), n - first);
        for (i, g) in got.iter().enumerate() {
            // Written out independently of the library: softmax over keys 0..=pos, in f64.
            let (lse, out) = naive(&qs[i * d..(i + 1) * d], &k, &v, d, first + i + 1, 0.3);
            prop_assert!((g.lse - lse).abs() < TOL, "lse {} vs {}", g.lse, lse);
            prop_assert!(g.out.iter().zip(&out).all(|(a, b)| (a - b).abs() < TOL));
        }
        // Keys and values after the first query's position cannot change its output.
        let mut k2 = k.clone();
        let mut v2 = v.clone();
        k2[(first + 1) * d..].iter_mut().for_each(|x| *x += noise);
        v2[(first + 1) * d..].iter_mut().for_each(|x| *x -= noise);
        let (keys2, values2) = (Rows::new("k", &k2, d).unwrap(), Rows::new("v", &v2, d).unwrap());
        let again: Vec<Partial<f64>> = causal_chunk(&qs[..d], first, &keys2, &values2, 0.3).unwrap();
        prop_assert!(close(&again[0], &got[0]));
    }

    #[test]
    fn weights_of_one_change_nothing((d, k, v, q, part) in case()) {
        let (keys, values) = (Rows::new("k", &k, d).unwrap(), Rows::new("v", &v, d).unwrap());
        let ids: Vec<u32> = part.iter().enumerate().filter(|(_, l)| **l != 0).map(|(i, _)| i as u32).collect();
        let s = StaticPart { sinks: 0, window: 0 };
        let plain = Selection { ids: ids.clone(), ..Default::default() };
        let weighted = Selection { log_weights: vec![0.0; ids.len()], ids, ..Default::default() };
        let a: Partial<f64> = attend_selected(&q, &keys, &values, s, &plain, 1.0).unwrap();
        let b: Partial<f64> = attend_selected(&q, &keys, &values, s, &weighted, 1.0).unwrap();
        prop_assert!(close(&a, &b));
    }
}
