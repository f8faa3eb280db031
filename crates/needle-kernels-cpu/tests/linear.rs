//! QMatrix gemv/gemm against a plain f64 loop over dequantized weights, and per-ISA agreement.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_kernels_cpu::{Error, Isa, QMatrix, QuantType};

fn reference(ty: QuantType, w: &[u8], rows: usize, cols: usize, x: &[f32], t: usize) -> (Vec<f64>, Vec<f64>) {
    let wf = dequant(ty, w, rows * cols);
    let mut y = vec![0f64; t * rows];
    let mut tol = vec![0f64; t * rows];
    for tok in 0..t {
        let xr = &x[tok * cols..(tok + 1) * cols];
        for r in 0..rows {
            let wr = &wf[r * cols..(r + 1) * cols];
            y[tok * rows + r] = wr.iter().zip(xr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            tol[tok * rows + r] = act_tolerance(ty, wr, xr);
        }
    }
    (y, tol)
}

#[test]
fn gemv_and_gemm_match_reference_on_every_isa() {
    let mut r = rng(3);
    for ty in QuantType::ALL {
        for (rows, blocks) in [(1, 1), (7, 2), (33, 3), (257, 1)] {
            let cols = cols_for(ty, blocks);
            let w = random_weights(&mut r, ty, rows, cols);
            let m = QMatrix::new(ty, rows, cols, &w).unwrap();
            for t in [1, 3, 13] {
                let x = randn(&mut r, t * cols);
                let (want, tol) = reference(ty, &w, rows, cols, &x, t);
                let mut outs = Vec::new();
                for isa in Isa::all_available() {
                    let mut y = vec![f32::NAN; t * rows];
                    m.gemm_with(isa, &x, t, &mut y).unwrap();
                    for (i, (g, (w, e))) in y.iter().zip(want.iter().zip(&tol)).enumerate() {
                        assert!(
                            (f64::from(*g) - w).abs() <= *e,
                            "{ty:?} {isa:?} {rows}x{cols} t={t} [{i}]: {g} vs {w}"
                        );
                    }
                    if t == 1 {
                        let mut yv = vec![f32::NAN; rows];
                        m.gemv_with(isa, &x, &mut yv).unwrap();
                        assert_eq!(yv, y, "{ty:?} {isa:?}: gemv differs from gemm at t = 1");
                    } else {
                        // Row by row through gemv: the same integer math on the same quantized
                        // rows (the multi-token micro-kernel only sums the f32 partials in another order).
                        for tok in 0..t {
                            let mut yv = vec![0f32; rows];
                            m.gemv_with(isa, &x[tok * cols..(tok + 1) * cols], &mut yv).unwrap();
                            for (r, (a, b)) in yv.iter().zip(&y[tok * rows..(tok + 1) * rows]).enumerate() {
                                let i = tok * rows + r;
                                let scale = tol[i].max(want[i].abs()).max(1.0);
                                assert!(
                                    f64::from((a - b).abs()) <= 1e-5 * scale,
                                    "{ty:?} {isa:?} token {tok} row {r}: gemv {a} vs gemm {b}"
                                );
                            }
                        }
                    }
                    outs.push(y);
                }
                for o in &outs[1..] {
                    for (a, b) in o.iter().zip(&outs[0]) {
                        let scale = want.iter().map(|v| v.abs()).fold(1.0, f64::max);
                        assert!(f64::from((a - b).abs()) <= 1e-5 * scale, "{ty:?}: SIMD {a} vs scalar {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn big_gemv_runs_in_parallel_and_matches() {
    let mut r = rng(4);
    let (rows, cols) = (1536, 576);
    let ty = QuantType::Q4_1;
    let w = random_weights(&mut r, ty, rows, cols);
    let m = QMatrix::new(ty, rows, cols, &w).unwrap();
    let x = randn(&mut r, cols);
    let (want, tol) = reference(ty, &w, rows, cols, &x, 1);
    let mut y = vec![0f32; rows];
    m.gemv(&x, &mut y).unwrap();
    for ((g, w), e) in y.iter().zip(&want).zip(&tol) {
        assert!((f64::from(*g) - w).abs() <= *e);
    }
}

#[test]
fn shape_errors_name_the_parameter() {
    let w = vec![0u8; 2 * 20];
    assert!(matches!(QMatrix::new(QuantType::Q4_1, 2, 32, &w[1..]), Err(Error::Len { param: "data", .. })));
    assert!(matches!(QMatrix::new(QuantType::Q4_1, 2, 33, &w), Err(Error::NotBlockMultiple { param: "cols", .. })));
    let m = QMatrix::new(QuantType::Q4_1, 2, 32, &w).unwrap();
    let mut y = vec![0f32; 2];
    assert!(matches!(m.gemv(&[0.0; 31], &mut y), Err(Error::Len { param: "x", .. })));
    assert!(matches!(m.gemv(&[0.0; 32], &mut y[..1]), Err(Error::Len { param: "y", .. })));
    assert!(matches!(m.gemm(&[0.0; 64], 2, &mut y), Err(Error::Len { param: "y", .. })));
}

/// Matrices of mixed types sharing one input, big enough to run on the pool: each output equals
/// that matrix's own gemv (same quantized input, same kernel), on every ISA.
#[test]
fn gemv_many_equals_separate_gemvs_for_mixed_types() {
    let mut r = rng(9);
    let cols = 512;
    let specs = [(QuantType::Q4_1, 300), (QuantType::Q6_K, 70), (QuantType::Q8_0, 1), (QuantType::F32, 129)];
    let ws: Vec<Vec<u8>> = specs.iter().map(|&(ty, rows)| random_weights(&mut r, ty, rows, cols)).collect();
    let mats: Vec<QMatrix<'_>> =
        specs.iter().zip(&ws).map(|(&(ty, rows), w)| QMatrix::new(ty, rows, cols, w).unwrap()).collect();
    let x = randn(&mut r, cols);
    for isa in Isa::all_available() {
        let mut ys: Vec<Vec<f32>> = specs.iter().map(|&(_, rows)| vec![f32::NAN; rows]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
        needle_kernels_cpu::linear::gemv_many_with(isa, &mats, &x, &mut outs).unwrap();
        for (m, y) in mats.iter().zip(&ys) {
            let mut want = vec![0f32; m.rows()];
            m.gemv_with(isa, &x, &mut want).unwrap();
            assert_eq!(*y, want, "{:?} {isa:?}", m.ty());
        }
    }
    let mut short = vec![0f32; 3];
    let e = needle_kernels_cpu::gemv_many(&mats[..1], &x, &mut [&mut short]).unwrap_err();
    assert!(matches!(e, Error::Len { param: "y", .. }), "{e}");
    let e = needle_kernels_cpu::gemv_many(&mats[..1], &x, &mut []).unwrap_err();
    assert!(matches!(e, Error::Len { param: "ys", .. }), "{e}");
}

/// Batched decode rows through matrices of mixed types (big enough for the pool, and small):
/// each row's outputs are bit for bit that row's own `gemv_many`, on every ISA.
#[test]
fn gemv_rows_equals_each_rows_gemv_many() {
    let mut r = rng(10);
    let cols = 512;
    let specs = [
        (QuantType::Q4_1, 300),
        (QuantType::Q8_0, 37),
        (QuantType::Q6_K, 70),
        (QuantType::Q4_K, 41),
        (QuantType::Q5_K, 23),
        (QuantType::F32, 9),
    ];
    let ws: Vec<Vec<u8>> = specs.iter().map(|&(ty, rows)| random_weights(&mut r, ty, rows, cols)).collect();
    let mats: Vec<QMatrix<'_>> =
        specs.iter().zip(&ws).map(|(&(ty, rows), w)| QMatrix::new(ty, rows, cols, w).unwrap()).collect();
    for t in [1, 2, 3, 4, 5, 9] {
        let x = randn(&mut r, t * cols);
        for isa in Isa::all_available() {
            for ms in [&mats[..], &mats[1..2]] {
                let mut ys: Vec<Vec<f32>> = ms.iter().map(|m| vec![f32::NAN; t * m.rows()]).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
                needle_kernels_cpu::gemv_rows_with(isa, ms, &x, t, &mut outs).unwrap();
                for tok in 0..t {
                    let mut want: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows()]).collect();
                    let mut wo: Vec<&mut [f32]> = want.iter_mut().map(Vec::as_mut_slice).collect();
                    needle_kernels_cpu::linear::gemv_many_with(isa, ms, &x[tok * cols..(tok + 1) * cols], &mut wo)
                        .unwrap();
                    for ((m, y), w) in ms.iter().zip(&ys).zip(&want) {
                        let got = &y[tok * m.rows()..(tok + 1) * m.rows()];
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(got), bits(w), "{:?} {isa:?} t={t} row {tok}", m.ty());
                    }
                }
            }
        }
    }
    let x = randn(&mut r, 2 * cols);
    let mut short = vec![0f32; 300];
    let e = needle_kernels_cpu::gemv_rows(&mats[..1], &x, 2, &mut [&mut short]).unwrap_err();
    assert!(matches!(e, Error::Len { param: "y", .. }), "{e}");
    let e = needle_kernels_cpu::gemv_rows(&mats[..1], &x, 3, &mut [&mut short]).unwrap_err();
    assert!(matches!(e, Error::Len { param: "x", .. }), "{e}");
}
