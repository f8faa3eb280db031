//! Fused quantized dot products: against f64 dots of dequantized weights with the original
//! activations (bounded by the 8-bit activation quantization error), and every SIMD path against
//! the scalar reference (same integer math).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_kernels_cpu::act::quantize_q8;
use needle_kernels_cpu::dot::{vec_dot, vec_dot_rows_with, vec_dot_with};
use needle_kernels_cpu::{BlockQ8, Error, Isa, QActs, QuantType};

#[test]
fn fused_dot_matches_dequantized_f64_dot_within_quantization_bound() {
    let mut r = rng(1);
    for ty in QuantType::ALL {
        for blocks in [1, 2, 3, 7] {
            let cols = cols_for(ty, blocks);
            for _ in 0..20 {
                let w = random_weights(&mut r, ty, 1, cols);
                let x = randn(&mut r, cols);
                let wf = dequant(ty, &w, cols);
                let want: f64 = wf.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                let tol = act_tolerance(ty, &wf, &x);
                let acts = QActs::quantize(ty, &x, 1, cols).unwrap();
                for isa in Isa::all_available() {
                    let got = vec_dot_with(isa, ty, &w, acts.row(0)).unwrap();
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "{ty:?} {isa:?} cols {cols}: {got} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

/// The activation blocks are the same bits on every ISA as the plain quantizer's (which follows
/// ggml's), on random rows with a zero block, tiny and huge blocks, and exact ties.
#[test]
fn q8_activations_are_the_same_bits_on_every_isa() {
    let mut r = rng(12);
    for _ in 0..50 {
        let mut x = randn(&mut r, 32 * 9);
        x[..32].fill(0.0);
        x[32..64].iter_mut().for_each(|v| *v *= 1e-6);
        x[64..96].iter_mut().for_each(|v| *v *= 1e5);
        // amax 127: every integer and half-integer value is its own quotient, ties included.
        x[96] = 127.0;
        x[97..128].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 * 0.5 - 7.5);
        let want: Vec<BlockQ8> = x.chunks_exact(32).map(quantize_q8).collect();
        for isa in Isa::all_available() {
            let QActs::Q8 { blocks, .. } = QActs::quantize_with(isa, QuantType::Q8_0, &x, 1, x.len()).unwrap() else {
                panic!("Q8_0 takes Q8 blocks");
            };
            for (i, (g, w)) in blocks.iter().zip(&want).enumerate() {
                assert_eq!(
                    (g.d.to_bits(), g.sum, g.s.to_bits(), g.qs),
                    (w.d.to_bits(), w.sum, w.s.to_bits(), w.qs),
                    "{isa:?} block {i}"
                );
            }
        }
    }
}

#[test]
fn simd_dot_matches_scalar_reference() {
    let isas = Isa::all_available();
    assert_eq!(isas[0], Isa::Scalar);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(isas.contains(&Isa::Avx2), "AVX2 machine but the AVX2 path is not offered");
        if std::arch::is_x86_feature_detected!("avx512bw") {
            assert!(isas.contains(&Isa::Avx512), "AVX-512 machine but the AVX-512 path is not offered");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        assert!(isas.contains(&Isa::Neon), "aarch64 but the NEON path is not offered");
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            assert!(isas.contains(&Isa::NeonDot), "dotprod CPU but the NEON dotprod path is not offered");
            assert_eq!(Isa::detect(), Isa::NeonDot);
        } else {
            assert_eq!(Isa::detect(), Isa::Neon);
        }
    }
    let mut r = rng(2);
    for ty in QuantType::ALL {
        // 5 and 18 blocks: the VNNI lane kernels' fours with a partial last one (18: the default
        // model's width).
        for blocks in [1, 3, 5, 8, 18] {
            let cols = cols_for(ty, blocks);
            for _ in 0..30 {
                let w = random_weights(&mut r, ty, 1, cols);
                let x = randn(&mut r, cols);
                let acts = QActs::quantize(ty, &x, 1, cols).unwrap();
                let s = vec_dot_with(Isa::Scalar, ty, &w, acts.row(0)).unwrap();
                let wf = dequant(ty, &w, cols);
                let abs: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                for &isa in &isas[1..] {
                    let v = vec_dot_with(isa, ty, &w, acts.row(0)).unwrap();
                    assert!((v - s).abs() <= 1e-5 * abs + 1e-6, "{ty:?} {isa:?} cols {cols}: {v} vs scalar {s}");
                }
                assert_eq!(
                    vec_dot(ty, &w, acts.row(0)).unwrap(),
                    vec_dot_with(Isa::detect(), ty, &w, acts.row(0)).unwrap()
                );
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_parameter() {
    let x = vec![0.5f32; 64];
    let acts = QActs::quantize(QuantType::Q4_1, &x, 1, 64).unwrap();
    let e = vec_dot(QuantType::Q4_1, &[0u8; 39], acts.row(0)).unwrap_err();
    assert!(matches!(e, Error::Len { param: "w", got: 39, expected: 40 }), "{e}");
    let e = vec_dot(QuantType::Q4_K, &[0u8; 144], acts.row(0)).unwrap_err();
    assert!(matches!(e, Error::ActKind { .. }), "{e}");
    let e = QActs::quantize(QuantType::Q6_K, &x, 1, 64).unwrap_err();
    assert!(matches!(e, Error::NotBlockMultiple { param: "cols", .. }), "{e}");
    let e = QActs::quantize(QuantType::Q8_0, &x, 3, 32).unwrap_err();
    assert!(matches!(e, Error::Len { param: "x", .. }), "{e}");
}

/// The multi-row dot (batched decode: each row another sequence's) gives every row the bits of
/// the row dot alone, for every type and ISA, any number of rows (groups of up to 4 and the
/// rest), on fresh random weights and activations (an all-zero row among them); block counts
/// with every remainder of the VNNI lane kernels' fours.
#[test]
fn multi_row_dot_is_bit_identical_to_the_row_dot() {
    let mut r = rng(5);
    for ty in QuantType::ALL {
        for blocks in [1, 2, 3, 5, 8, 18] {
            let cols = cols_for(ty, blocks);
            for n in [1, 2, 3, 4, 5, 7, 9] {
                let w = random_weights(&mut r, ty, 1, cols);
                let mut x = randn(&mut r, n * cols);
                if n > 2 {
                    x[cols..2 * cols].fill(0.0);
                }
                let acts = QActs::quantize(ty, &x, n, cols).unwrap();
                let rows: Vec<_> = (0..n).map(|i| acts.row(i)).collect();
                for isa in Isa::all_available() {
                    let mut out = vec![f32::NAN; n];
                    vec_dot_rows_with(isa, ty, &w, &rows, &mut out).unwrap();
                    for (i, (&got, &row)) in out.iter().zip(&rows).enumerate() {
                        let want = vec_dot_with(isa, ty, &w, row).unwrap();
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty:?} {isa:?} {blocks} blocks, row {i} of {n}");
                    }
                }
            }
        }
    }
    let x = vec![0.5f32; 64];
    let acts = QActs::quantize(QuantType::Q4_1, &x, 2, 32).unwrap();
    let rows = [acts.row(0), acts.row(1)];
    let e = vec_dot_rows_with(Isa::detect(), QuantType::Q4_1, &[0u8; 20], &rows, &mut [0.0]).unwrap_err();
    assert!(matches!(e, Error::Len { param: "out", .. }), "{e}");
    let e = vec_dot_rows_with(Isa::detect(), QuantType::Q4_K, &[0u8; 144], &rows, &mut [0.0; 2]).unwrap_err();
    assert!(matches!(e, Error::ActKind { .. }), "{e}");
}
