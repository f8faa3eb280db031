//! Activations quantized on the fly for the fused dot products.
//!
//! * [`BlockQ8`] (Q8_0-style, 32 elements): for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL weights.
//!   It keeps the sum of its quants so the Q4_0 / Q5_0 offsets (−8, −16) and the Q4_1 / Q5_1 mins
//!   come out of one integer sum.
//! * [`BlockQ8K`] (Q8_K-style, 256 elements): for Q4_K, Q5_K and Q6_K weights, with the sums of
//!   each 16 quants for the K-quant mins and the Q6_K offset (−32).
//! * Float weights (F32, F16, BF16) take the activations as they are.
//!
//! Quants are `round(x / d)` with `d = max|x| / 127` (Q8 blocks round half to even and keep `d` as
//! an f16 value, as ggml does), so every quant is in −127..=127 (never −128,
//! which keeps the signed×unsigned SIMD products exact).

use crate::{Isa, Result, check_len};
use needle_quant::QuantType;

/// A Q8_0-style activation block: scale, sum of the quants, 32 quants.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale: element ≈ `d · qs[i]`.
    pub d: f32,
    /// `Σ qs[i]`.
    pub sum: i32,
    /// `d · Σ qs[i]` before `d` is rounded, itself rounded to f16: ggml's Q8_1 `s`, which the
    /// Q4_1 min multiplies.
    pub s: f32,
    /// Quants.
    pub qs: [i8; 32],
}

/// A Q8_K-style activation block: scale, 256 quants, sums of each 16.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale: element ≈ `d · qs[i]`.
    pub d: f32,
    /// Quants.
    pub qs: [i8; 256],
    /// `bsums[k] = Σ qs[16k..16k+16]`.
    pub bsums: [i16; 16],
}

/// One row of prepared activations, as a dot product takes it.
#[derive(Clone, Copy, Debug)]
pub enum QActRow<'a> {
    /// Q8_0-style blocks.
    Q8(&'a [BlockQ8]),
    /// Q8_K-style blocks.
    Q8K(&'a [BlockQ8K]),
    /// Plain floats.
    F32(&'a [f32]),
}

impl QActRow<'_> {
    /// Elements in the row.
    pub fn len(&self) -> usize {
        match self {
            QActRow::Q8(b) => b.len() * 32,
            QActRow::Q8K(b) => b.len() * 256,
            QActRow::F32(x) => x.len(),
        }
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            QActRow::Q8(_) => "Q8",
            QActRow::Q8K(_) => "Q8K",
            QActRow::F32(_) => "F32",
        }
    }
}

/// The activation kind a weight type's dot product needs.
pub(crate) fn kind_for(ty: QuantType) -> &'static str {
    match ty {
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => "F32",
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::IQ4_NL => {
            "Q8"
        }
        QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => "Q8K",
    }
}

/// `rows × cols` activations prepared for weights of one type.
#[derive(Clone, Debug)]
pub enum QActs {
    /// Q8_0-style blocks, `cols / 32` per row.
    Q8 {
        /// Elements per row.
        cols: usize,
        /// Blocks, row after row.
        blocks: Vec<BlockQ8>,
    },
    /// Q8_K-style blocks, `cols / 256` per row.
    Q8K {
        /// Elements per row.
        cols: usize,
        /// Blocks, row after row.
        blocks: Vec<BlockQ8K>,
    },
    /// Floats as given.
    F32 {
        /// Elements per row.
        cols: usize,
        /// Values, row after row.
        data: Vec<f32>,
    },
}

impl QActs {
    /// Prepares the `rows × cols` row-major `x` for dot products with `ty` weights.
    pub fn quantize(ty: QuantType, x: &[f32], rows: usize, cols: usize) -> Result<QActs> {
        QActs::quantize_with(Isa::detect(), ty, x, rows, cols)
    }

    /// [`QActs::quantize`] on a given ISA: the same blocks, bit for bit, on every ISA.
    pub fn quantize_with(isa: Isa, ty: QuantType, x: &[f32], rows: usize, cols: usize) -> Result<QActs> {
        ty.bytes_for("cols", cols)?;
        check_len("x", x.len(), rows.saturating_mul(cols))?;
        Ok(match kind_for(ty) {
            "F32" => QActs::F32 { cols, data: x.to_vec() },
            "Q8" => QActs::Q8 { cols, blocks: quantize_q8_blocks(isa, x) },
            _ => QActs::Q8K { cols, blocks: x.chunks_exact(256).map(quantize_q8k).collect() },
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            QActs::Q8 { cols, blocks } => (blocks.len() * 32).checked_div(*cols).unwrap_or(0),
            QActs::Q8K { cols, blocks } => (blocks.len() * 256).checked_div(*cols).unwrap_or(0),
            QActs::F32 { cols, data } => data.len().checked_div(*cols).unwrap_or(0),
        }
    }

    /// Row `i` (panics when out of range, like slice indexing).
    pub fn row(&self, i: usize) -> QActRow<'_> {
        match self {
            QActs::Q8 { cols, blocks } => QActRow::Q8(&blocks[i * cols / 32..(i + 1) * cols / 32]),
            QActs::Q8K { cols, blocks } => QActRow::Q8K(&blocks[i * cols / 256..(i + 1) * cols / 256]),
            QActs::F32 { cols, data } => QActRow::F32(&data[i * cols..(i + 1) * cols]),
        }
    }
}

fn scale_of(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// Round half to even for |x| < 2²²: adding 1.5·2²³ leaves no fraction bits, so the FPU's
/// round-to-nearest-even does the rounding (inline and vectorizable, unlike `rintf` without SSE4.1).
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Quantizes 32 values to a [`BlockQ8`] exactly as ggml's x86 `quantize_row_q8_0` /
/// `quantize_row_q8_1` do: `q = round_half_even(x · 127 / amax)`, the scale `amax / 127` kept
/// rounded to f16 (and `s` likewise), so the fused dot products reproduce llama.cpp's integer
/// sums and scales.
pub fn quantize_q8(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_half_even(v * id).clamp(-127.0, 127.0) as i8;
    }
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    let f16r = |v: f32| half::f16::from_f32(v).to_f32();
    BlockQ8 { d: f16r(d), sum, s: f16r(d * sum as f32), qs }
}

/// [`quantize_q8`] of each 32 values of `x`, by SIMD where `isa` has it (the same bits).
fn quantize_q8_blocks(isa: Isa, x: &[f32]) -> Vec<BlockQ8> {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2()` means avx2, fma and f16c were detected on this CPU; each chunk
        // has 32 values.
        return unsafe { x86::quantize_q8_blocks(x) };
    }
    let _ = isa;
    x.chunks_exact(32).map(quantize_q8).collect()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BlockQ8;

    /// [`super::quantize_q8_blocks`]'s loop in one function with the block's features, so that
    /// [`quantize_q8`] is inlined into it (a closure would not inherit the features, and each
    /// block would be a call).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_blocks(x: &[f32]) -> Vec<BlockQ8> {
        let mut out = Vec::with_capacity(x.len() / 32);
        for b in x.chunks_exact(32) {
            // SAFETY: the features per this fn's contract; `b` has 32 values.
            out.push(unsafe { quantize_q8(b) });
        }
        out
    }

    /// [`super::quantize_q8`] on four 8-lane vectors: the same max, quotient, rounding (to
    /// nearest even), clamp and f16 rounding, so the same bits.
    ///
    /// # Safety
    /// Needs avx2, fma and f16c; `x` has 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn quantize_q8(x: &[f32]) -> BlockQ8 {
        // SAFETY (the block): `x` has 32 readable values; the features per this fn's contract.
        unsafe {
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(x.as_ptr().add(o)));
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| _mm256_max_ps(m, _mm256_and_ps(x, abs)));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let q = v.map(|x| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, id));
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum)));
            // Packing works within 128-bit halves: the dword permute puts the bytes back in order.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            let mut qs = [0i8; 32];
            _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes);
            let f16r = |v: f32| {
                let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
                _mm_cvtss_f32(_mm_cvtph_ps(h))
            };
            BlockQ8 { d: f16r(d), sum, s: f16r(d * sum as f32), qs }
        }
    }
}

/// Quantizes 256 values to a [`BlockQ8K`].
pub fn quantize_q8k(x: &[f32]) -> BlockQ8K {
    let (d, id) = scale_of(x);
    let mut qs = [0i8; 256];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    let mut bsums = [0i16; 16];
    for (s, c) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = c.iter().map(|&q| i16::from(q)).sum();
    }
    BlockQ8K { d, qs, bsums }
}

#[cfg(test)]
mod round_tests {
    #[test]
    fn round_half_even_matches_std() {
        for i in -2600..=2600 {
            let x = i as f32 * 0.05;
            assert_eq!(super::round_half_even(x), x.round_ties_even(), "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 127.49] {
            assert_eq!(super::round_half_even(x), x.round_ties_even(), "{x}");
        }
    }
}
