//! [`Lanes`]: the few vector operations the tiled prefill ([`super::prefill`]) is written in, for
//! AVX2 (`__m256`, eight lanes), NEON (`float32x4_t`, four) and plain `f32` (one lane, the
//! portable check of the shared algorithm).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;

use super::KvElem;

/// A vector of `N` f32 lanes.
///
/// # Safety
/// Every method needs the instruction set of its type (AVX2 + FMA + F16C for `__m256`, NEON
/// for `float32x4_t`) enabled in the calling function: they are `#[inline(always)]` so that they
/// compile inside the caller's `#[target_feature]` function. Pointer arguments must have `N`
/// readable (or writable) elements.
pub(crate) trait Lanes: Copy {
    /// Lanes per vector.
    const N: usize;
    /// Vectors per register block of the prefill products (rows of `Sᵀ`, dims of `O`).
    const BLOCK: usize;
    /// `N` key limits (`i32`) as loaded by [`Lanes::load_lim`].
    type Lim: Copy;
    /// A per-lane condition.
    type Mask: Copy;

    /// All zeros.
    unsafe fn zero() -> Self;
    /// `x` in every lane.
    unsafe fn splat(x: f32) -> Self;
    /// `N` floats from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores to `p` (`N` floats).
    unsafe fn store(self, p: *mut f32);
    /// `self · b`.
    unsafe fn mul(self, b: Self) -> Self;
    /// `self + b`.
    unsafe fn add(self, b: Self) -> Self;
    /// `self − b`.
    unsafe fn sub(self, b: Self) -> Self;
    /// The lane-wise maximum.
    unsafe fn max(self, b: Self) -> Self;
    /// `self · b + c`, fused.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// [`super::exp_approx`] per lane.
    unsafe fn exp(self) -> Self;
    /// `N` key limits from `p`.
    unsafe fn load_lim(p: *const i32) -> Self::Lim;
    /// The lanes whose limit exceeds `j` (they see key `j`).
    unsafe fn keep(lim: Self::Lim, j: usize) -> Self::Mask;
    /// `self` where `m`, else `other`.
    unsafe fn select(self, m: Self::Mask, other: Self) -> Self;
    /// `self` where `m`, else 0.
    unsafe fn and(self, m: Self::Mask) -> Self;
    /// The sum of the lanes.
    unsafe fn hsum(self) -> f32;
    /// `dst[u] = scale · (sum of the lanes of acc[u]) + bias[u]` for `u < 8` (no bias: `+ 0`).
    unsafe fn sums8(acc: &[Self; 8], scale: f32, bias: Option<*const f32>, dst: *mut f32);

    /// `Qᵀ` columns `r0..r0 + N`: `qt[d·rp + r0 + u] = scale · src[u][d]` (0 where `src[u]` is
    /// `None`) for `d < dim`.
    ///
    /// # Safety
    /// `src` has `N` entries, each `Some` row `dim` long; `qt` has `dim × rp` entries, `r0 + N
    /// ≤ rp`; the instruction set as above.
    #[inline(always)]
    unsafe fn put_qt(src: &[Option<&[f32]>], scale: f32, qt: &mut [f32], rp: usize, r0: usize, dim: usize) {
        for (u, row) in src.iter().enumerate() {
            if let Some(qr) = row {
                for (d, v) in qr[..dim].iter().enumerate() {
                    qt[d * rp + r0 + u] = v * scale;
                }
            }
        }
    }

    /// `src` as f32 ([`KvElem::as_f32`], or a vector conversion of f16 pages).
    ///
    /// # Safety
    /// The instruction set as above.
    #[inline(always)]
    unsafe fn tile_f32<'b, T: KvElem>(src: &'b [T], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        T::as_f32(src, scratch)
    }
}

impl Lanes for f32 {
    const N: usize = 1;
    const BLOCK: usize = 4;
    type Lim = i32;
    type Mask = bool;

    #[inline(always)]
    unsafe fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees one readable float.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees one writable float.
        unsafe { *p = self }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        self * b
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        self.max(b)
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        self * b + c
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        super::exp_approx(self)
    }
    #[inline(always)]
    unsafe fn load_lim(p: *const i32) -> i32 {
        // SAFETY: the caller guarantees one readable limit.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn keep(lim: i32, j: usize) -> bool {
        lim > j as i32
    }
    #[inline(always)]
    unsafe fn select(self, m: bool, other: Self) -> Self {
        if m { self } else { other }
    }
    #[inline(always)]
    unsafe fn and(self, m: bool) -> Self {
        if m { self } else { 0.0 }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn sums8(acc: &[Self; 8], scale: f32, bias: Option<*const f32>, dst: *mut f32) {
        for (u, a) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees 8 readable biases and 8 writable floats.
            unsafe { *dst.add(u) = a * scale + bias.map_or(0.0, |b| *b.add(u)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for __m256 {
    const N: usize = 8;
    const BLOCK: usize = 2;
    type Lim = __m256i;
    type Mask = __m256;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (all of this impl): avx2, fma and f16c per the trait's contract; pointers as
        // the caller guarantees.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { _mm256_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { _mm256_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { _mm256_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { _mm256_max_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { _mm256_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        exp8(self)
    }
    #[inline(always)]
    unsafe fn load_lim(p: *const i32) -> __m256i {
        unsafe { _mm256_loadu_si256(p.cast()) }
    }
    #[inline(always)]
    unsafe fn keep(lim: __m256i, j: usize) -> __m256 {
        unsafe { _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, _mm256_set1_epi32(j as i32))) }
    }
    #[inline(always)]
    unsafe fn select(self, m: __m256, other: Self) -> Self {
        unsafe { _mm256_blendv_ps(other, self, m) }
    }
    #[inline(always)]
    unsafe fn and(self, m: __m256) -> Self {
        unsafe { _mm256_and_ps(self, m) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        let mut l = [0f32; 8];
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), self) };
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    }
    /// One transpose-sum of the eight accumulators into one vector.
    #[inline(always)]
    unsafe fn sums8(a: &[Self; 8], scale: f32, bias: Option<*const f32>, dst: *mut f32) {
        unsafe {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
            let mut s = _mm256_mul_ps(sums, _mm256_set1_ps(scale));
            if let Some(b) = bias {
                s = _mm256_add_ps(s, _mm256_loadu_ps(b));
            }
            _mm256_storeu_ps(dst, s);
        }
    }

    /// Eight rows at a time through an 8×8 transpose.
    #[inline(always)]
    unsafe fn put_qt(src: &[Option<&[f32]>], scale: f32, qt: &mut [f32], rp: usize, r0: usize, dim: usize) {
        // SAFETY (the block): each row has `dim` elements, `d0 + 8 ≤ dim` (`dim` is a multiple of
        // 8 on this path); column `d0 + k` of the block lands in `qt[(d0 + k)·rp + r0..][..8]`,
        // inside `dim × rp`.
        unsafe {
            let sv = _mm256_set1_ps(scale);
            for d0 in (0..dim).step_by(8) {
                let blk = std::array::from_fn(|u| {
                    src[u].map_or(_mm256_setzero_ps(), |qr| _mm256_mul_ps(sv, _mm256_loadu_ps(qr.as_ptr().add(d0))))
                });
                for (k, col) in transpose8(blk).into_iter().enumerate() {
                    _mm256_storeu_ps(qt.as_mut_ptr().add((d0 + k) * rp + r0), col);
                }
            }
        }
    }

    /// F16C for f16 pages.
    #[inline(always)]
    unsafe fn tile_f32<'b, T: KvElem>(src: &'b [T], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        use half::f16;
        use half::slice::HalfFloatSliceExt;
        use std::any::TypeId;
        if TypeId::of::<T>() != TypeId::of::<f16>() {
            return T::as_f32(src, scratch);
        }
        // SAFETY: `T` is `f16` (equal type ids), so the slice is reinterpreted as itself.
        let src = unsafe { &*(src as *const [T] as *const [f16]) };
        scratch.resize(src.len(), 0.0);
        let (mut ch, out) = (src.chunks_exact(8), scratch.chunks_exact_mut(8));
        for (h, o) in (&mut ch).zip(out) {
            // SAFETY: 8 halves in, 8 floats out; f16c per the trait's contract.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))) };
        }
        let done = src.len() - ch.remainder().len();
        ch.remainder().convert_to_f32_slice(&mut scratch[done..]);
        scratch
    }
}

/// The 8×8 transpose: lane `u` of output `k` is lane `k` of input `u`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: only called (inlined) from fns with avx enabled.
    unsafe {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

/// [`super::exp_approx`] on eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn exp8(x: __m256) -> __m256 {
    // SAFETY: only called (inlined) from fns with avx2 and fma enabled.
    unsafe {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_setzero_ps());
        let round = _mm256_set1_ps(12_582_912.0);
        let n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round), round);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x));
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
        let pow =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
        _mm256_mul_ps(e, pow)
    }
}

#[cfg(target_arch = "aarch64")]
impl Lanes for float32x4_t {
    const N: usize = 4;
    const BLOCK: usize = 4;
    type Lim = int32x4_t;
    type Mask = uint32x4_t;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (all of this impl): neon per the trait's contract; pointers as the caller
        // guarantees.
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { vst1q_f32(p, self) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { vmulq_f32(self, b) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { vaddq_f32(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { vsubq_f32(self, b) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { vmaxq_f32(self, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { vfmaq_f32(c, self, b) }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe { crate::neon::exp4(self) }
    }
    #[inline(always)]
    unsafe fn load_lim(p: *const i32) -> int32x4_t {
        unsafe { vld1q_s32(p) }
    }
    #[inline(always)]
    unsafe fn keep(lim: int32x4_t, j: usize) -> uint32x4_t {
        unsafe { vcgtq_s32(lim, vdupq_n_s32(j as i32)) }
    }
    #[inline(always)]
    unsafe fn select(self, m: uint32x4_t, other: Self) -> Self {
        unsafe { vbslq_f32(m, self, other) }
    }
    #[inline(always)]
    unsafe fn and(self, m: uint32x4_t) -> Self {
        unsafe { vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(self), m)) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        unsafe { vaddvq_f32(self) }
    }
    /// Pairwise adds, four accumulators per vector of sums.
    #[inline(always)]
    unsafe fn sums8(a: &[Self; 8], scale: f32, bias: Option<*const f32>, dst: *mut f32) {
        unsafe {
            let s = [
                vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3])),
                vpaddq_f32(vpaddq_f32(a[4], a[5]), vpaddq_f32(a[6], a[7])),
            ];
            for (k, sv) in s.into_iter().enumerate() {
                let mut sv = vmulq_n_f32(sv, scale);
                if let Some(b) = bias {
                    sv = vaddq_f32(sv, vld1q_f32(b.add(4 * k)));
                }
                vst1q_f32(dst.add(4 * k), sv);
            }
        }
    }

    /// `fcvtl` for f16 pages.
    #[inline(always)]
    unsafe fn tile_f32<'b, T: KvElem>(src: &'b [T], scratch: &'b mut Vec<f32>) -> &'b [f32] {
        use half::f16;
        use half::slice::HalfFloatSliceExt;
        use std::any::TypeId;
        if TypeId::of::<T>() != TypeId::of::<f16>() {
            return T::as_f32(src, scratch);
        }
        // SAFETY: `T` is `f16` (equal type ids), so the slice is reinterpreted as itself.
        let src = unsafe { &*(src as *const [T] as *const [f16]) };
        scratch.resize(src.len(), 0.0);
        let (mut ch, out) = (src.chunks_exact(8), scratch.chunks_exact_mut(8));
        for (h, o) in (&mut ch).zip(out) {
            // SAFETY: 8 halves in (an `f16` is its `u16` bits), 8 floats out; neon as above.
            unsafe {
                let (a, b) = crate::neon::f16x8_to_f32(vld1q_u16(h.as_ptr().cast()));
                vst1q_f32(o.as_mut_ptr(), a);
                vst1q_f32(o.as_mut_ptr().add(4), b);
            }
        }
        let done = src.len() - ch.remainder().len();
        ch.remainder().convert_to_f32_slice(&mut scratch[done..]);
        scratch
    }
}

/// A KV element type loaded as `L` lanes of f32 (f16 converted on the way).
pub(crate) trait LoadLanes<L: Lanes>: KvElem {
    /// `L::N` elements from `p` as f32.
    ///
    /// # Safety
    /// `p` has `L::N` readable elements; `L`'s instruction set as in [`Lanes`].
    unsafe fn load(p: *const Self) -> L;
}

#[cfg(target_arch = "x86_64")]
impl LoadLanes<__m256> for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable floats and avx.
        unsafe { _mm256_loadu_ps(p) }
    }
}

#[cfg(target_arch = "x86_64")]
impl LoadLanes<__m256> for half::f16 {
    #[inline(always)]
    unsafe fn load(p: *const half::f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable halves (16 bytes) and f16c.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

#[cfg(target_arch = "aarch64")]
impl LoadLanes<float32x4_t> for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable floats and neon.
        unsafe { vld1q_f32(p) }
    }
}

#[cfg(target_arch = "aarch64")]
impl LoadLanes<float32x4_t> for half::f16 {
    #[inline(always)]
    unsafe fn load(p: *const half::f16) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable halves (an `f16` is its `u16` bits) and neon.
        unsafe { crate::neon::f16x4_to_f32(vld1_u16(p.cast())) }
    }
}

impl LoadLanes<f32> for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees one readable float.
        unsafe { *p }
    }
}

impl LoadLanes<f32> for half::f16 {
    #[inline(always)]
    unsafe fn load(p: *const half::f16) -> f32 {
        // SAFETY: the caller guarantees one readable half.
        unsafe { (*p).to_f32() }
    }
}
