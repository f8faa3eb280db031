//! Repacked decode weights (`PackedRows`): the packed arithmetic against an f64 dot of the
//! dequantized weights, every ISA's kernel bit for bit against the plain-Rust packed
//! arithmetic, and batched decode rows bit for bit against each row alone.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_kernels_cpu::act::QActRow;
use needle_kernels_cpu::packed::PACK;
use needle_kernels_cpu::{BlockQ8, Error, Isa, PackedRows, QActs, QMatrix, QuantType};

const TYPES: [QuantType; 3] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1];

fn q8(x: QActRow<'_>) -> &[BlockQ8] {
    match x {
        QActRow::Q8(b) => b,
        _ => panic!("Q8 rows expected"),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn packed_dots_match_f64_and_every_isa_matches_the_scalar_bits() {
    let mut r = rng(41);
    for ty in TYPES {
        for (rows, blocks) in [(1, 1), (13, 3), (37, 18), (64, 2)] {
            let cols = cols_for(ty, blocks);
            let w = random_weights(&mut r, ty, rows, cols);
            let m = QMatrix::new(ty, rows, cols, &w).unwrap();
            let p = PackedRows::new(&m).unwrap();
            assert_eq!(p.groups(), rows.div_ceil(PACK));
            let wf = dequant(ty, &w, rows * cols);
            for t in [1, 3, 6] {
                let x = randn(&mut r, t * cols);
                let acts = QActs::quantize(ty, &x, t, cols).unwrap();
                let xs: Vec<&[BlockQ8]> = (0..t).map(|k| q8(acts.row(k))).collect();
                for g in 0..p.groups() {
                    let mut want = vec![[f32::NAN; PACK]; t];
                    p.dot_scalar(g, &xs, &mut want);
                    for (k, o) in want.iter().enumerate() {
                        for (i, &v) in o.iter().enumerate() {
                            let row = g * PACK + i;
                            if row >= rows {
                                assert_eq!(v, 0.0, "{ty:?} padding row {row}");
                                continue;
                            }
                            let (wr, xr) = (&wf[row * cols..(row + 1) * cols], &x[k * cols..(k + 1) * cols]);
                            let exact: f64 = wr.iter().zip(xr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                            let tol = act_tolerance(ty, wr, xr);
                            assert!(
                                (f64::from(v) - exact).abs() <= tol,
                                "{ty:?} {rows}×{cols} row {row} act {k}: {v} vs {exact} (tol {tol})"
                            );
                        }
                    }
                    for isa in Isa::all_available() {
                        let mut got = vec![[f32::NAN; PACK]; t];
                        p.dot_group(isa, g, &xs, &mut got);
                        assert_eq!(
                            bits(got.as_flattened()),
                            bits(want.as_flattened()),
                            "{ty:?} {isa:?} {rows}×{cols} group {g}, {t} rows"
                        );
                    }
                }
            }
        }
    }
}

/// Through `gemv_rows_with`: each batched row's outputs are bit for bit the row's own
/// `gemv_many` and the packed arithmetic's, on every ISA (those without the kernel run the
/// unpacked one, also row by row), with the pool splitting big matrices at whole groups; a
/// packed matrix's GEMM (prefill) gives the same bits.
#[test]
fn packed_batched_rows_equal_each_rows_alone() {
    let mut r = rng(42);
    let cols = 768;
    let specs = [(QuantType::Q4_1, 1029), (QuantType::Q8_0, 37), (QuantType::Q4_0, 300), (QuantType::Q6_K, 20)];
    let ws: Vec<Vec<u8>> = specs.iter().map(|&(ty, rows)| random_weights(&mut r, ty, rows, cols)).collect();
    let plain: Vec<QMatrix<'_>> =
        specs.iter().zip(&ws).map(|(&(ty, rows), w)| QMatrix::new(ty, rows, cols, w).unwrap()).collect();
    let packs: Vec<Option<PackedRows>> = plain.iter().map(|m| PackedRows::new(m).ok()).collect();
    let mats: Vec<QMatrix<'_>> = plain
        .iter()
        .zip(&packs)
        .map(|(m, p)| match p {
            Some(p) => m.with_packed(p).unwrap(),
            None => *m,
        })
        .collect();
    for t in [1, 2, 4, 7] {
        let x = randn(&mut r, t * cols);
        for isa in Isa::all_available() {
            let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; t * m.rows()]).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
            needle_kernels_cpu::gemv_rows_with(isa, &mats, &x, t, &mut outs).unwrap();
            // A prefill GEMM of a packed matrix takes the same path: the same bits.
            for (m, y) in mats.iter().zip(&ys) {
                let mut g = vec![f32::NAN; t * m.rows()];
                m.gemm_with(isa, &x, t, &mut g).unwrap();
                if PackedRows::wanted(m.ty(), isa) || t == 1 {
                    assert_eq!(bits(&g), bits(y), "gemm of {:?} {isa:?} t={t}", m.ty());
                }
            }
            for tok in 0..t {
                let xr = &x[tok * cols..(tok + 1) * cols];
                let mut alone: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.rows()]).collect();
                let mut ao: Vec<&mut [f32]> = alone.iter_mut().map(Vec::as_mut_slice).collect();
                needle_kernels_cpu::linear::gemv_many_with(isa, &mats, xr, &mut ao).unwrap();
                for (((m, y), a), p) in mats.iter().zip(&ys).zip(&alone).zip(&packs) {
                    let got = &y[tok * m.rows()..(tok + 1) * m.rows()];
                    assert_eq!(bits(got), bits(a), "{:?} {isa:?} t={t} row {tok}", m.ty());
                    let Some(p) = p.as_ref().filter(|_| PackedRows::wanted(m.ty(), isa)) else { continue };
                    let acts = QActs::quantize(m.ty(), xr, 1, cols).unwrap();
                    let mut want = vec![[0f32; PACK]; 1];
                    for g in 0..p.groups() {
                        p.dot_scalar(g, &[q8(acts.row(0))], &mut want);
                        let n = PACK.min(m.rows() - g * PACK);
                        assert_eq!(bits(&got[g * PACK..g * PACK + n]), bits(&want[0][..n]), "{:?} group {g}", m.ty());
                    }
                }
            }
        }
    }
}

#[test]
fn packing_errors_name_the_parameter() {
    let mut r = rng(43);
    let w = random_weights(&mut r, QuantType::Q4_1, 16, 64);
    let m = QMatrix::new(QuantType::Q4_1, 16, 64, &w).unwrap();
    let other = QMatrix::new(QuantType::Q4_1, 8, 128, &w).unwrap();
    let p = PackedRows::new(&other).unwrap();
    assert!(matches!(m.with_packed(&p), Err(Error::Invalid { param: "packed", .. })));
    let k = random_weights(&mut r, QuantType::Q6_K, 2, 256);
    let e = PackedRows::new(&QMatrix::new(QuantType::Q6_K, 2, 256, &k).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Invalid { param: "ty", .. }), "{e}");
}
