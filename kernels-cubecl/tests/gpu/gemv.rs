//! Quantized GEMV from raw GGUF blocks against needle-quant's dequantizer in f64.

use half::f16;
use needle_kernels_cubecl::{DeviceQMatrix, Error, gemm, gemv};
use needle_quant::{QuantType, dequantize_row};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::{client, normal, rng};

/// A random f16 scale: mostly normal, every 7th a subnormal, so the kernel's integer f16
/// decoding is exercised off the normal path too.
fn scale(r: &mut StdRng, i: usize, range: f32) -> [u8; 2] {
    if i % 7 == 3 { f16::from_bits(r.random_range(1..1024)) } else { f16::from_f32(r.random_range(-range..range)) }
        .to_le_bytes()
}

/// Random `rows × cols` matrix of `ty` blocks: random bytes, with the f16 (and bf16) fields
/// replaced by finite values of a sensible size.
fn random_blocks(r: &mut StdRng, ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let n_blocks = rows * cols / be;
    let mut out: Vec<u8> = (0..n_blocks * bb).map(|_| r.random::<u8>()).collect();
    for (i, blk) in out.chunks_exact_mut(bb).enumerate() {
        // (offset, range) of each f16 field: the scale, then a min where the format has one.
        let fields: &[(usize, f32)] = match ty {
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 | QuantType::IQ4_NL => &[(0, 0.05)],
            QuantType::Q4_1 | QuantType::Q5_1 => &[(0, 0.05), (2, 0.5)],
            QuantType::Q4_K | QuantType::Q5_K => &[(0, 0.005), (2, 0.005)],
            QuantType::Q6_K => &[(208, 0.005)],
            QuantType::F16 => {
                for (j, h) in blk.chunks_exact_mut(2).enumerate() {
                    h.copy_from_slice(&scale(r, i + j, 1.0));
                }
                &[]
            }
            QuantType::BF16 => {
                for h in blk.chunks_exact_mut(2) {
                    h.copy_from_slice(&half::bf16::from_f32(r.random_range(-1.0..1.0)).to_le_bytes());
                }
                &[]
            }
            QuantType::F32 => unreachable!("F32 is not a block format"),
        };
        for &(at, range) in fields {
            blk[at..at + 2].copy_from_slice(&scale(r, i, range));
        }
    }
    out
}

/// The GEMV of a random matrix against needle-quant's dequantizer in f64, within
/// `2e-6·Σ|w·x| + 1e-7` (f32 accumulation over `cols` terms; the K-quants subtract their
/// min term once per 32, inside the same bound).
fn check(seed: u64, ty: QuantType, rows: usize, cols: usize) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let bytes = random_blocks(&mut r, ty, rows, cols);
    let x = normal(&mut r, cols);
    let w = DeviceQMatrix::upload(&c, ty, rows, cols, &bytes).unwrap();
    let y = gemv(&c, &w, &x).unwrap();
    let row_bytes = cols / ty.block_elems() * ty.block_bytes();
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
fn gemv_5_bit_and_iq4_nl_blocks_match_dequantized_reference() {
    for (seed, ty) in [(91, QuantType::Q5_0), (92, QuantType::Q5_1), (93, QuantType::IQ4_NL)] {
        check(seed, ty, 37, 416);
        check(seed + 10, ty, 3, 32);
        check(seed + 20, ty, 70, 2048);
    }
}

#[test]
fn gemv_k_quants_match_dequantized_reference() {
    for (seed, ty) in [(101, QuantType::Q4_K), (102, QuantType::Q5_K), (103, QuantType::Q6_K)] {
        check(seed, ty, 37, 512);
        check(seed + 10, ty, 3, 256);
        check(seed + 20, ty, 70, 2048);
    }
}

#[test]
fn gemv_half_precision_rows_match_reference() {
    for (seed, ty) in [(111, QuantType::F16), (112, QuantType::BF16)] {
        check(seed, ty, 37, 416);
        check(seed + 10, ty, 70, 2048);
    }
}

#[test]
fn gemv_rejects_unsupported_types_and_bad_shapes() {
    let Some(c) = client() else { return };
    let err = DeviceQMatrix::upload(&c, QuantType::F32, 1, 32, &[0; 128]).unwrap_err();
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

/// The tiled GEMM of `t` random tokens against needle-quant's dequantizer in f64, within the
/// GEMV's bound per output (`2e-6·Σ|w·x| + 1e-7`).
fn check_gemm(seed: u64, ty: QuantType, rows: usize, cols: usize, t: usize) {
    let Some(c) = client() else { return };
    let mut r = rng(seed);
    let bytes = random_blocks(&mut r, ty, rows, cols);
    let x = normal(&mut r, t * cols);
    let w = DeviceQMatrix::upload(&c, ty, rows, cols, &bytes).unwrap();
    let y = gemm(&c, &w, &x, t).unwrap();
    assert_eq!(y.len(), t * rows);
    let row_bytes = cols / ty.block_elems() * ty.block_bytes();
    let mut deq = vec![0.0f32; rows * cols];
    for (i, out) in deq.chunks_exact_mut(cols).enumerate() {
        dequantize_row(ty, &bytes[i * row_bytes..(i + 1) * row_bytes], out).unwrap();
    }
    for (tok, xt) in x.chunks_exact(cols).enumerate() {
        for (i, wr) in deq.chunks_exact(cols).enumerate() {
            let want: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = wr.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let got = y[tok * rows + i] as f64;
            let tol = 2e-6 * mag + 1e-7;
            assert!(
                (got - want).abs() <= tol,
                "{ty:?} {rows}×{cols}, {t} tokens: token {tok} row {i}: got {got}, want {want}, |error| {:e} > {tol:e}",
                (got - want).abs()
            );
        }
    }
}

#[test]
fn tiled_gemm_matches_dequantized_reference_for_every_format() {
    // Rows not a multiple of the 64-row tile; 2 and 5 tokens (one 8-token tile, part empty),
    // 45 (two 32-token tiles, the second part empty); several groups per row.
    // Every block format (f32 weights take no GEMM kernel).
    let formats = QuantType::ALL.into_iter().filter(|&t| t != QuantType::F32);
    for (i, ty) in formats.enumerate() {
        let cols = if ty.block_elems() == 256 { 512 } else { 160 };
        let seed = 120 + 10 * i as u64;
        check_gemm(seed, ty, 37, cols, 2);
        check_gemm(seed + 1, ty, 70, cols, 45);
    }
}

#[test]
fn tiled_gemm_over_larger_shapes_holds() {
    // Several row tiles and token tiles, a K-quant row of 8 super-blocks.
    check_gemm(201, QuantType::Q4_1, 130, 416, 5);
    check_gemm(202, QuantType::Q6_K, 129, 2048, 33);
    check_gemm(203, QuantType::Q8_0, 200, 1024, 70);
}

#[test]
fn gemm_of_one_token_is_the_gemv_and_bad_shapes_are_refused() {
    let Some(c) = client() else { return };
    let mut r = rng(211);
    let (rows, cols) = (37, 416);
    let bytes = random_blocks(&mut r, QuantType::Q4_1, rows, cols);
    let x = normal(&mut r, cols);
    let w = DeviceQMatrix::upload(&c, QuantType::Q4_1, rows, cols, &bytes).unwrap();
    assert_eq!(gemm(&c, &w, &x, 1).unwrap(), gemv(&c, &w, &x).unwrap());
    let w = DeviceQMatrix::upload(&c, QuantType::Q8_0, 2, 64, &[0; 136]).unwrap();
    assert_eq!(gemm(&c, &w, &[0.0; 127], 2).unwrap_err(), Error::Len { param: "x", got: 127, expected: 128 });
    assert!(matches!(gemm(&c, &w, &[], 0).unwrap_err(), Error::Invalid { param: "t", .. }));
}
