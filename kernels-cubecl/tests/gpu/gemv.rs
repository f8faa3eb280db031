//! Quantized GEMV from raw GGUF blocks against needle-quant's dequantizer in f64.

use half::f16;
use needle_kernels_cubecl::{DeviceQMatrix, Error, gemm, gemv};
use needle_quant::{QuantType, dequantize_row};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::{client, normal, rng};

/// Random `rows × cols` matrix of `ty` blocks. Every 7th block gets a subnormal f16 scale so
/// the kernel's integer f16 decoding is exercised off the normal path too.
fn random_blocks(r: &mut StdRng, ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let n_blocks = rows * cols / 32;
    let mut out = Vec::with_capacity(n_blocks * ty.block_bytes());
    for b in 0..n_blocks {
        let d = if b % 7 == 3 {
            f16::from_bits(r.random_range(1..1024))
        } else {
            f16::from_f32(r.random_range(-0.05..0.05))
        };
        out.extend_from_slice(&d.to_le_bytes());
        if ty == QuantType::Q4_1 {
            out.extend_from_slice(&f16::from_f32(r.random_range(-0.5..0.5)).to_le_bytes());
        }
        let n_qs = if ty == QuantType::Q8_0 { 32 } else { 16 };
        out.extend((0..n_qs).map(|_| r.random::<u8>()));
    }
    assert_eq!(out.len(), n_blocks * ty.block_bytes());
    out
}

fn check(seed: u64, ty: QuantType, rows: usize, cols: usize) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let bytes = random_blocks(&mut r, ty, rows, cols);
    let x = normal(&mut r, cols);
    let w = DeviceQMatrix::upload(&c, ty, rows, cols, &bytes).unwrap();
    let y = gemv(&c, &w, &x).unwrap();
    let row_bytes = cols / 32 * ty.block_bytes();
    let mut deq = vec![0.0f32; cols];
    for (i, &got) in y.iter().enumerate() {
        dequantize_row(ty, &bytes[i * row_bytes..(i + 1) * row_bytes], &mut deq).unwrap();
        let want: f64 = deq.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = deq.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        // f32 accumulation over `cols` terms: error relative to Σ|w·x|.
        let tol = 2e-6 * mag + 1e-7;
        assert!(
            (got as f64 - want).abs() <= tol,
            "{ty:?} {rows}×{cols} row {i}: got {got}, want {want}, |error| {:e} > {tol:e}",
            (got as f64 - want).abs()
        );
    }
}

#[test]
fn gemv_q8_0_matches_dequantized_reference() {
    check(51, QuantType::Q8_0, 37, 416);
    check(52, QuantType::Q8_0, 5, 32);
    check(53, QuantType::Q8_0, 70, 2048);
}

#[test]
fn gemv_q4_0_matches_dequantized_reference() {
    check(61, QuantType::Q4_0, 37, 416);
    check(62, QuantType::Q4_0, 1, 32);
    check(63, QuantType::Q4_0, 70, 2048);
}

#[test]
fn gemv_q4_1_matches_dequantized_reference() {
    check(71, QuantType::Q4_1, 37, 416);
    check(72, QuantType::Q4_1, 3, 64);
    check(73, QuantType::Q4_1, 70, 2048);
}

#[test]
fn gemv_rejects_unsupported_types_and_bad_shapes() {
    let Some(c) = client() else { return };
    let err = DeviceQMatrix::upload(&c, QuantType::Q4_K, 1, 256, &[0; 144]).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "ty", .. }), "{err}");
    let err = DeviceQMatrix::upload(&c, QuantType::Q4_1, 2, 48, &[0; 60]).unwrap_err();
    assert!(matches!(err, Error::Invalid { param: "cols", .. }), "{err}");
    let err = DeviceQMatrix::upload(&c, QuantType::Q4_1, 2, 64, &[0; 79]).unwrap_err();
    assert_eq!(err, Error::Len { param: "bytes", got: 79, expected: 80 });
    let w = DeviceQMatrix::upload(&c, QuantType::Q8_0, 2, 64, &[0; 136]).unwrap();
    let err = gemv(&c, &w, &[0.0; 63]).unwrap_err();
    assert_eq!(err, Error::Len { param: "x", got: 63, expected: 64 });
}

#[test]
fn gemv_with_more_rows_than_one_grid_axis_holds() {
    // 70,000 rows: more cubes than the 65,535 of one axis, so the grid wraps onto y.
    check(74, QuantType::Q4_1, 70_000, 32);
}

#[test]
fn gemm_over_several_tokens_is_one_gemv_per_token() {
    let Some(c) = client() else { return };
    for (seed, ty, rows, cols, t) in
        [(81, QuantType::Q4_1, 37, 416, 5), (82, QuantType::Q8_0, 70, 96, 3), (83, QuantType::Q4_0, 9, 64, 17)]
    {
        let mut r = rng(seed);
        let bytes = random_blocks(&mut r, ty, rows, cols);
        let x = normal(&mut r, t * cols);
        let w = DeviceQMatrix::upload(&c, ty, rows, cols, &bytes).unwrap();
        let y = gemm(&c, &w, &x, t).unwrap();
        assert_eq!(y.len(), t * rows);
        for (i, xi) in x.chunks_exact(cols).enumerate() {
            // The same kernel per token: bit-identical to a lone GEMV of that token.
            assert_eq!(&y[i * rows..(i + 1) * rows], &gemv(&c, &w, xi).unwrap()[..], "{ty:?} token {i}");
        }
    }
    let w = DeviceQMatrix::upload(&c, QuantType::Q8_0, 2, 64, &[0; 136]).unwrap();
    assert_eq!(gemm(&c, &w, &[0.0; 127], 2).unwrap_err(), Error::Len { param: "x", got: 127, expected: 128 });
    assert!(matches!(gemm(&c, &w, &[], 0).unwrap_err(), Error::Invalid { param: "t", .. }));
}
