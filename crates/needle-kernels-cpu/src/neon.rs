//! aarch64 helpers shared by the NEON kernels of [`crate::dot`] and [`crate::attn`].
//!
//! Half-precision conversion goes through `fcvtl` in inline assembly: it is a base Advanced SIMD
//! instruction, but Rust's `float16x4_t` intrinsics (`vcvt_f32_f16`) are newer than this crate's
//! minimum Rust version.

use std::arch::aarch64::*;
use std::arch::asm;

/// Four f16 bit patterns as f32 (exact).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
    let r;
    // SAFETY: `fcvtl` is base Advanced SIMD (enabled on this fn) and touches only the named
    // registers.
    unsafe {
        asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) r, in(vreg) h, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// Lanes 4..8 of eight f16 bit patterns as f32 (exact).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16x8_high_to_f32(h: uint16x8_t) -> float32x4_t {
    let r;
    // SAFETY: as in `f16x4_to_f32`.
    unsafe {
        asm!("fcvtl2 {0:v}.4s, {1:v}.8h", out(vreg) r, in(vreg) h, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// Eight f16 bit patterns as two f32 vectors (lanes 0..4, 4..8).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16x8_to_f32(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    (f16x4_to_f32(vget_low_u16(h)), f16x8_high_to_f32(h))
}

/// The f16 pair at `b[0..4]` (little endian) as `(b[0..2], b[2..4])` in f32.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16_pair(b: &[u8]) -> (f32, f32) {
    let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let v = f16x4_to_f32(vcreate_u16(u64::from(bits)));
    (vgetq_lane_f32::<0>(v), vgetq_lane_f32::<1>(v))
}

/// The f16 at `b[i..i + 2]` (little endian) in f32.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn f16_one(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    vgetq_lane_f32::<0>(f16x4_to_f32(vcreate_u16(u64::from(bits))))
}

/// The attention module's `exp_approx` on four lanes (same reduction and polynomial).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn exp4(x: float32x4_t) -> float32x4_t {
    let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(0.0));
    let round = vdupq_n_f32(12_582_912.0);
    let n = vsubq_f32(vfmaq_f32(round, x, vdupq_n_f32(std::f32::consts::LOG2_E)), round);
    let r = vfmaq_f32(vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4)), n, vdupq_n_f32(2.121_944_4e-4));
    let mut p = vdupq_n_f32(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = vfmaq_f32(vdupq_n_f32(c), p, r);
    }
    let e = vaddq_f32(vfmaq_f32(r, vmulq_f32(p, r), r), vdupq_n_f32(1.0));
    // `n` is integral and in −126..=0, so truncation is exact and the exponent stays normal.
    let pow = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127))));
    vmulq_f32(e, pow)
}
