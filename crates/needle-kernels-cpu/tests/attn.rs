//! flash_prefill against a plain f64 causal attention per head.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use half::f16;
use needle_kernels_cpu::attn::{KvElem, attend_rows_lse_with, attend_rows_with, flash_prefill_with};
use needle_kernels_cpu::{Error, Isa, Pages, attend_rows, attend_rows_lse, flash_prefill};

/// Cuts `len × dim` rows into pages of `page_rows` rows (last one partial, exactly sized).
fn paginate<T: Copy>(rows: &[T], page_rows: usize, dim: usize) -> Vec<Vec<T>> {
    rows.chunks(page_rows * dim).map(|c| c.to_vec()).collect()
}

#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    t: usize,
    hq: usize,
    dim: usize,
    pos0: usize,
    scale: f32,
) -> Vec<f64> {
    let group = hq / k.len();
    let mut out = vec![0f64; t * hq * dim];
    for i in 0..t {
        let pos = pos0 + i;
        for h in 0..hq {
            let (kh, vh) = (&k[h / group], &v[h / group]);
            let qr = &q[(i * hq + h) * dim..][..dim];
            let s: Vec<f64> = (0..=pos)
                .map(|j| {
                    qr.iter().zip(&kh[j * dim..(j + 1) * dim]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                for d in 0..dim {
                    out[(i * hq + h) * dim + d] += ej / z * f64::from(vh[j * dim + d]);
                }
            }
        }
    }
    out
}

fn check<T: KvElem>(conv: fn(&[f32]) -> Vec<T>, back: fn(&[T]) -> Vec<f32>, tol: f64) {
    let mut r = rng(5);
    // Group sizes 3, 1, 4, 7 times the query tiles' lengths give row counts with every remainder
    // of the AVX2 and NEON blocks (6 rows; 8-row resp. 4-row vectors, 16-row NEON blocks); dim 24
    // covers a lone 8-dim block, 20 and 28 the generic AVX2 path and the NEON 4- and 12-dim
    // remainders; t = 1 and odd page sizes give short key tiles.
    for (hq, hkv) in [(9, 3), (4, 4), (8, 2), (7, 1)] {
        for dim in [64, 48, 128, 24, 20, 28] {
            for (t, pos0, page_rows, extra) in
                [(1, 0, 16, 0), (1, 40, 16, 2), (37, 0, 16, 3), (23, 41, 7, 0), (70, 5, 256, 1), (100, 130, 64, 0)]
            {
                let len = pos0 + t + extra;
                let q = randn(&mut r, t * hq * dim);
                let kt: Vec<Vec<T>> = (0..hkv).map(|_| conv(&randn(&mut r, len * dim))).collect();
                let vt: Vec<Vec<T>> = (0..hkv).map(|_| conv(&randn(&mut r, len * dim))).collect();
                let (kf, vf): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                    (kt.iter().map(|x| back(x)).collect(), vt.iter().map(|x| back(x)).collect());
                let kp: Vec<Vec<Vec<T>>> = kt.iter().map(|x| paginate(x, page_rows, dim)).collect();
                let vp: Vec<Vec<Vec<T>>> = vt.iter().map(|x| paginate(x, page_rows, dim)).collect();
                let kr: Vec<Vec<&[T]>> = kp.iter().map(|ps| ps.iter().map(|p| p.as_slice()).collect()).collect();
                let vr: Vec<Vec<&[T]>> = vp.iter().map(|ps| ps.iter().map(|p| p.as_slice()).collect()).collect();
                let keys: Vec<Pages<'_, T>> = kr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                let values: Vec<Pages<'_, T>> = vr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                let scale = 1.0 / (dim as f32).sqrt();
                let want = reference(&q, &kf, &vf, t, hq, dim, pos0, scale);
                for isa in Isa::all_available() {
                    let mut out = vec![f32::NAN; q.len()];
                    flash_prefill_with(isa, &q, &keys, &values, &mut out, pos0, hq, scale).unwrap();
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (f64::from(*g) - w).abs() <= tol,
                            "{isa:?} hq {hq}/{hkv} dim {dim} t {t} pos0 {pos0} pages {page_rows} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn f32_pages_match_f64_reference() {
    check::<f32>(|x| x.to_vec(), |x| x.to_vec(), 2e-5);
}

#[test]
fn f16_pages_match_f64_reference_of_the_rounded_cache() {
    check::<f16>(|x| x.iter().map(|v| f16::from_f32(*v)).collect(), |x| x.iter().map(|v| v.to_f32()).collect(), 2e-5);
}

#[test]
fn bad_shapes_are_errors() {
    let page = vec![0f32; 4 * 8];
    let pages = [page.as_slice()];
    let kv = [Pages { pages: &pages, page_rows: 4, len: 4, dim: 8 }];
    let q = vec![0f32; 2 * 3 * 8];
    let mut out = vec![0f32; q.len()];
    let e = flash_prefill(&q, &kv, &kv, &mut out, 3, 3, 1.0).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "keys", .. }), "{e}"); // len 4 < pos0 + t = 5
    let e = flash_prefill(&q, &kv, &kv, &mut out, 0, 4, 1.0).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "q", .. } | Error::Invalid { param: "n_q_heads", .. }), "{e}");
    let e = flash_prefill(&q, &kv, &kv, &mut out[1..], 0, 3, 1.0).unwrap_err();
    assert!(matches!(e, Error::Len { param: "out", .. }), "{e}");
    let short = [Pages { pages: &pages, page_rows: 2, len: 4, dim: 8 }];
    let e = flash_prefill(&q, &short, &kv, &mut out, 0, 3, 1.0).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "keys", .. }), "{e}"); // 1 page of 2 rows < 4
    flash_prefill(&q, &kv, &kv, &mut out, 0, 3, 1.0).unwrap();
}

/// Plain f64 attention of `g` heads over gathered rows with per-row bias, and each head's
/// log-sum-exp of its scores (no rows: `g` is taken as `q.len()`, the heads' lse are `-inf`).
fn rows_reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], bias: Option<&[f32]>, scale: f32) -> (Vec<f64>, Vec<f64>) {
    let dim = k.first().map_or(1, Vec::len);
    let mut out = vec![0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; q.len() / dim];
    if k.is_empty() {
        return (out, lse);
    }
    for (h, qr) in q.chunks_exact(dim).enumerate() {
        let s: Vec<f64> = k
            .iter()
            .enumerate()
            .map(|(j, kr)| {
                let d: f64 = qr.iter().zip(kr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                d * f64::from(scale) + bias.map_or(0.0, |b| f64::from(b[j]))
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        lse[h] = m + z.ln();
        for (ej, vr) in e.iter().zip(v) {
            for (o, x) in out[h * dim..(h + 1) * dim].iter_mut().zip(vr) {
                *o += ej / z * f64::from(*x);
            }
        }
    }
    (out, lse)
}

fn check_rows<T: KvElem>(conv: fn(&[f32]) -> Vec<T>, back: fn(&[T]) -> Vec<f32>) {
    let mut r = rng(11);
    // 9 heads: more than one register block of the AVX-512 body in both of its passes.
    for g in [1, 3, 4, 9] {
        // 20 and 12: multiples of 4, not of 8 (NEON code, generic AVX2 code); 18: generic code;
        // 256: several 64-dim blocks of the AVX-512 body; 80: a multiple of 16 it does not take.
        for dim in [64, 128, 256, 20, 12, 18, 80] {
            // 9: one block of eight keys and a tail.
            for m in [0, 1, 7, 9, 333] {
                for biased in [false, true] {
                    let q = randn(&mut r, g * dim);
                    let kt: Vec<Vec<T>> = (0..m).map(|_| conv(&randn(&mut r, dim))).collect();
                    let vt: Vec<Vec<T>> = (0..m).map(|_| conv(&randn(&mut r, dim))).collect();
                    let bias: Vec<f32> = randn(&mut r, m).iter().map(|b| b - 2.0).collect();
                    let bias = biased.then_some(bias.as_slice());
                    let (kf, vf): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                        (kt.iter().map(|x| back(x)).collect(), vt.iter().map(|x| back(x)).collect());
                    let keys: Vec<&[T]> = kt.iter().map(Vec::as_slice).collect();
                    let values: Vec<&[T]> = vt.iter().map(Vec::as_slice).collect();
                    let scale = 1.0 / (dim as f32).sqrt();
                    let (want, want_lse) = rows_reference(&q, &kf, &vf, bias, scale);
                    for isa in Isa::all_available() {
                        let mut out = vec![f32::NAN; q.len()];
                        let mut scores = Vec::new();
                        attend_rows_with(isa, &q, &keys, &values, bias, scale, &mut scores, &mut out).unwrap();
                        for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (f64::from(*o) - w).abs() <= 2e-5,
                                "{isa:?} g {g} dim {dim} m {m} bias {biased} [{i}]: {o} vs {w}"
                            );
                        }
                        // The lse variant: the same output bit for bit, plus each head's lse.
                        let (mut out2, mut lse) = (vec![f32::NAN; q.len()], vec![f32::NAN; g]);
                        attend_rows_lse_with(isa, &q, &keys, &values, bias, scale, &mut scores, &mut out2, &mut lse)
                            .unwrap();
                        assert_eq!(
                            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            out2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "{isa:?} g {g} dim {dim} m {m} bias {biased}: lse variant output differs"
                        );
                        for (h, (l, w)) in lse.iter().zip(&want_lse[..g]).enumerate() {
                            let ok = if m == 0 {
                                *l == f32::NEG_INFINITY
                            } else {
                                (f64::from(*l) - w).abs() <= 2e-5 * (1.0 + w.abs())
                            };
                            assert!(ok, "{isa:?} g {g} dim {dim} m {m} bias {biased} lse[{h}]: {l} vs {w}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn attend_rows_f32_matches_f64_reference() {
    check_rows::<f32>(|x| x.to_vec(), |x| x.to_vec());
}

#[test]
fn attend_rows_f16_matches_f64_reference_of_the_rounded_rows() {
    check_rows::<f16>(|x| x.iter().map(|v| f16::from_f32(*v)).collect(), |x| x.iter().map(|v| v.to_f32()).collect());
}

/// A query head's output and log-sum-exp do not depend on the heads beside it: the query
/// groups of several sequences attended in one call over the same rows give each group the bits
/// it gets alone (needle-model attends a chunk several sequences share this way), on every ISA.
fn check_heads_independent<T: KvElem>(conv: fn(&[f32]) -> Vec<T>) {
    let mut r = rng(13);
    for (g, dim) in [(3, 64), (4, 64), (1, 128), (3, 20), (2, 18)] {
        for m in [1, 9, 64, 70] {
            for seqs in [2, 4] {
                let q = randn(&mut r, seqs * g * dim);
                let kt: Vec<Vec<T>> = (0..m).map(|_| conv(&randn(&mut r, dim))).collect();
                let vt: Vec<Vec<T>> = (0..m).map(|_| conv(&randn(&mut r, dim))).collect();
                let keys: Vec<&[T]> = kt.iter().map(Vec::as_slice).collect();
                let values: Vec<&[T]> = vt.iter().map(Vec::as_slice).collect();
                for isa in Isa::all_available() {
                    let mut scores = Vec::new();
                    let (mut out, mut lse) = (vec![f32::NAN; q.len()], vec![f32::NAN; seqs * g]);
                    attend_rows_lse_with(isa, &q, &keys, &values, None, 0.3, &mut scores, &mut out, &mut lse).unwrap();
                    for s in 0..seqs {
                        let qs = &q[s * g * dim..(s + 1) * g * dim];
                        let (mut o, mut l) = (vec![f32::NAN; g * dim], vec![f32::NAN; g]);
                        attend_rows_lse_with(isa, qs, &keys, &values, None, 0.3, &mut scores, &mut o, &mut l).unwrap();
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        let what = format!("{isa:?} g {g} dim {dim} m {m}: sequence {s} of {seqs}");
                        assert_eq!(bits(&out[s * g * dim..(s + 1) * g * dim]), bits(&o), "{what}: outputs");
                        assert_eq!(bits(&lse[s * g..(s + 1) * g]), bits(&l), "{what}: lse");
                    }
                }
            }
        }
    }
}

#[test]
fn a_query_heads_result_does_not_depend_on_the_heads_beside_it() {
    check_heads_independent::<f32>(|x| x.to_vec());
    check_heads_independent::<f16>(|x| x.iter().map(|v| f16::from_f32(*v)).collect());
}

#[test]
fn attend_rows_rejects_bad_shapes() {
    let (k, q) = (vec![0f32; 8], vec![0f32; 16]);
    let rows = [k.as_slice()];
    let (mut out, mut s) = (vec![0f32; 16], Vec::new());
    let e = attend_rows(&q, &rows, &[], None, 1.0, &mut s, &mut out).unwrap_err();
    assert!(matches!(e, Error::Len { param: "values", .. }), "{e}");
    let e = attend_rows(&q, &rows, &rows, Some(&[0.0, 1.0]), 1.0, &mut s, &mut out).unwrap_err();
    assert!(matches!(e, Error::Len { param: "bias", .. }), "{e}");
    let e = attend_rows(&q[..12], &rows, &rows, None, 1.0, &mut s, &mut out[..12]).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "q", .. }), "{e}");
    let short = [&k[..7]];
    let e = attend_rows(&q, &rows, &short, None, 1.0, &mut s, &mut out).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "keys/values", .. }), "{e}");
    attend_rows(&q, &rows, &rows, None, 1.0, &mut s, &mut out).unwrap();
    // `lse`: one entry per head (here 2 heads of dim 8); with no rows it must split `q` evenly.
    let mut lse = vec![0f32; 3];
    let e = attend_rows_lse(&q, &rows, &rows, None, 1.0, &mut s, &mut out, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Len { param: "lse", got: 3, expected: 2 }), "{e}");
    let e = attend_rows_lse::<f32>(&q, &[], &[], None, 1.0, &mut s, &mut out, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "lse", .. }), "{e}");
    let e = attend_rows_lse::<f32>(&q, &[], &[], None, 1.0, &mut s, &mut out, &mut []).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "lse", .. }), "{e}");
    attend_rows_lse(&q, &rows, &rows, None, 1.0, &mut s, &mut out, &mut lse[..2]).unwrap();
    attend_rows_lse::<f32>(&q, &[], &[], None, 1.0, &mut s, &mut out, &mut lse[..2]).unwrap();
    assert_eq!(lse[..2], [f32::NEG_INFINITY; 2]);
}
