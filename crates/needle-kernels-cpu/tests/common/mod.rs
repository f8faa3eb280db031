//! Helpers shared by the kernel tests.
#![allow(dead_code, clippy::unwrap_used)]

use needle_kernels_cpu::QuantType;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.05) { 8.0 } else { 1.0 }).collect()
}

/// Offsets of the f16 scales in a block of `ty`.
pub fn scale_offsets(ty: QuantType) -> &'static [usize] {
    match ty {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 | QuantType::IQ4_NL => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K => &[0, 2],
        QuantType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows × cols` weights of `ty`: random bytes (every bit pattern) with finite f16 scales, or
/// random floats for the float types.
pub fn random_weights(rng: &mut StdRng, ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        QuantType::F32 => randn(rng, n).iter().flat_map(|v| v.to_le_bytes()).collect(),
        QuantType::F16 => randn(rng, n).iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        QuantType::BF16 => randn(rng, n).iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => {
            let bb = ty.block_bytes();
            let mut b: Vec<u8> = (0..n / ty.block_elems() * bb).map(|_| rng.random()).collect();
            for blk in b.chunks_exact_mut(bb) {
                for &o in scale_offsets(ty) {
                    let s = half::f16::from_f32(rng.random_range(-0.1f32..0.1));
                    blk[o..o + 2].copy_from_slice(&s.to_le_bytes());
                }
            }
            b
        }
    }
}

pub fn dequant(ty: QuantType, w: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    needle_kernels_cpu::dequantize_row(ty, w, &mut out).unwrap();
    out
}

/// A column count that is a whole number of blocks of `ty`, odd in blocks where possible.
pub fn cols_for(ty: QuantType, blocks: usize) -> usize {
    if ty.is_float() { 32 * blocks + 5 } else { ty.block_elems() * blocks }
}

/// Bound on |Σ w·x − Σ w·x̂| from 8-bit activation quantization (x̂ rounds x to the nearest
/// multiple of d = max|x_block|/127, so |x − x̂| ≤ d/2), plus f32 summation slack.
pub fn act_tolerance(ty: QuantType, w: &[f32], x: &[f32]) -> f64 {
    let abs: f64 = w.iter().zip(x).map(|(a, b)| f64::from(a.abs()) * f64::from(b.abs())).sum();
    if ty.is_float() {
        return 1e-5 * abs + 1e-6;
    }
    let blk = if ty.block_elems() == 32 { 32 } else { 256 };
    let mut bound = 0f64;
    for (wb, xb) in w.chunks(blk).zip(x.chunks(blk)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let half_step = f64::from(amax) / 127.0 / 2.0;
        bound += wb.iter().map(|v| f64::from(v.abs())).sum::<f64>() * half_step;
    }
    bound * 1.001 + 2e-5 * abs + 1e-6
}
