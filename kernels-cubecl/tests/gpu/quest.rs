//! Quest page bounds and top-k against f64 / needle-core references.

use needle_kernels_cubecl::{Error, quest_scores, top_k};
use rand::Rng;

use crate::common::{assert_close, client, normal, rng};

#[test]
fn quest_scores_match_reference_and_bound_every_key() {
    let Some(c) = client() else { return };
    let mut r = rng(81);
    for (d, group, n_kv, n_pages) in [(64, 1, 2, 37), (80, 3, 2, 129), (96, 4, 1, 5)] {
        let page = 16;
        let n_q = n_kv * group;
        // Keys `[n_pages · page][n_kv][d]` and their per-page bounds.
        let keys = normal(&mut r, n_pages * page * n_kv * d);
        let mut mn = vec![f32::INFINITY; n_pages * n_kv * d];
        let mut mx = vec![f32::NEG_INFINITY; n_pages * n_kv * d];
        for t in 0..n_pages * page {
            for h in 0..n_kv {
                for i in 0..d {
                    let b = ((t / page) * n_kv + h) * d + i;
                    let x = keys[(t * n_kv + h) * d + i];
                    mn[b] = mn[b].min(x);
                    mx[b] = mx[b].max(x);
                }
            }
        }
        let q = normal(&mut r, n_q * d);
        let got = quest_scores(&c, &q, n_q, &mn, &mx, n_pages, n_kv, d).unwrap();
        for h in 0..n_kv {
            for p in 0..n_pages {
                let b = (p * n_kv + h) * d;
                let want = (0..group)
                    .map(|g| {
                        let qh = &q[(h * group + g) * d..(h * group + g + 1) * d];
                        (0..d)
                            .map(|i| (qh[i] as f64 * mn[b + i] as f64).max(qh[i] as f64 * mx[b + i] as f64))
                            .sum::<f64>()
                    })
                    .fold(f64::NEG_INFINITY, f64::max);
                let s = got[h * n_pages + p];
                assert_close(&format!("d {d} head {h} page {p}"), &[s], &[want], 1e-5);
                // The bound holds for every key of the page and every query of the group.
                for t in p * page..(p + 1) * page {
                    for g in 0..group {
                        let qh = &q[(h * group + g) * d..(h * group + g + 1) * d];
                        let k = &keys[(t * n_kv + h) * d..(t * n_kv + h + 1) * d];
                        let dot: f64 = qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        assert!(dot <= s as f64 + 1e-4, "page {p} key {t}: q·k {dot} above bound {s}");
                    }
                }
            }
        }
    }
}

#[test]
fn top_k_matches_stable_descending_order_with_ties() {
    let Some(c) = client() else { return };
    let mut r = rng(82);
    for (n_rows, n, k) in [(3, 1000, 37), (2, 129, 129), (1, 1, 1), (5, 300, 1)] {
        // Few distinct values: many ties, which must resolve to the smaller id.
        let scores: Vec<f32> = (0..n_rows * n).map(|_| r.random_range(1..20) as f32 * 0.25 - 2.6).collect();
        let got = top_k(&c, &scores, n_rows, n, k).unwrap();
        assert_eq!(got.len(), n_rows * k);
        for row in 0..n_rows {
            let want: Vec<u32> = needle_core::attention::top_k(&scores[row * n..(row + 1) * n], k)
                .unwrap()
                .into_iter()
                .map(|(i, _)| i)
                .collect();
            assert_eq!(&got[row * k..(row + 1) * k], want.as_slice(), "rows {n_rows} n {n} k {k} row {row}");
        }
    }
    // Continuous scores, k larger than n is clamped to n.
    let scores = normal(&mut r, 77);
    let got = top_k(&c, &scores, 1, 77, 500).unwrap();
    let want: Vec<u32> = needle_core::attention::top_k(&scores, 77).unwrap().into_iter().map(|(i, _)| i).collect();
    assert_eq!(got, want);
    assert!(top_k(&c, &scores, 1, 77, 0).unwrap().is_empty());
}

#[test]
fn top_k_rejects_nan_and_bad_lengths() {
    let Some(c) = client() else { return };
    let err = top_k(&c, &[1.0, f32::NAN], 1, 2, 1).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "scores", .. }), "{err}");
    let err = top_k(&c, &[1.0; 5], 2, 3, 1).unwrap_err();
    assert_eq!(err, Error::Len { param: "scores", got: 5, expected: 6 });
}
