//! Weights repacked for decode: eight weight rows interleaved block by block, so that one
//! `vpdpbusd` meets four quants of one activation row with the same four quants of eight
//! weight rows (the layout of llama.cpp's repacked CPU GEMMs). A block's integer sums of the
//! eight rows then lie in the eight lanes of one register, with no transposes or folds, and one
//! scale multiply serves all eight rows; each block's weights are decoded once for every
//! activation row of a batched decode step.
//!
//! Each row's arithmetic is fixed, whatever the number of activation rows: per block `b`, the
//! exact integer sum `s_b = Σ q·y`, then `acc = fma(d_w · d_y, s_b, acc)` and, for Q4_1,
//! `corr = fma(m_w, s_y, corr)`; the dot is `acc + corr`. So a row's bits do not depend on the
//! batch it is decoded in. [`PackedRows::dot_scalar`] is that arithmetic in plain Rust, the
//! SIMD kernel's bit-for-bit reference; both are checked against an f64 dot.

use half::f16;

use crate::act::BlockQ8;
use crate::linear::QMatrix;
use crate::{Error, Isa, Result};
use needle_quant::QuantType;

/// Weight rows per packed group.
pub const PACK: usize = 8;

/// A `rows × cols` Q8_0, Q4_0 or Q4_1 matrix in groups of [`PACK`] rows (the last padded
/// with zero rows), each group its blocks in order, each packed block the eight rows'
/// scales (f16), for Q4_1 their mins (f16), then the quants as the kernel loads them:
/// register `j` holds bytes `4j..4j + 4` of each row's quants, row `r` in dword `r`.
#[derive(Clone)]
pub struct PackedRows {
    ty: QuantType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedRows").field("ty", &self.ty).field("shape", &[self.rows, self.cols]).finish()
    }
}

/// Bytes of one packed block of eight rows.
fn packed_block_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q8_0 => 16 + 8 * 32,
        QuantType::Q4_1 => 32 + 4 * 32,
        _ => 16 + 4 * 32,
    }
}

impl PackedRows {
    /// Whether decode on `isa` repacks weights of `ty`: where the packed kernel exists.
    pub fn wanted(ty: QuantType, isa: Isa) -> bool {
        cfg!(target_arch = "x86_64")
            && isa.available()
            && isa.effective() == Isa::AvxVnni
            && matches!(ty, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1)
    }

    /// `m`'s rows repacked (any ISA: the layout is plain bytes).
    pub fn new(m: &QMatrix<'_>) -> Result<PackedRows> {
        let ty = m.ty();
        if !matches!(ty, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1) {
            return Err(Error::Invalid { param: "ty", why: format!("{ty:?} has no packed layout") });
        }
        let (rows, cols) = (m.rows(), m.cols());
        let (bb, pb) = (ty.block_bytes(), packed_block_bytes(ty));
        let blocks = cols / ty.block_elems();
        let groups = rows.div_ceil(PACK);
        let mut data = vec![0u8; groups * blocks * pb];
        // Scales and quants start after the f16 scales (and mins) of the eight rows.
        let (head, qoff) = if ty == QuantType::Q4_1 { (4, 32) } else { (2, 16) };
        let qbytes = bb - head;
        for (g, group) in data.chunks_exact_mut(blocks * pb).enumerate() {
            for r in 0..PACK.min(rows - g * PACK) {
                let w = m.row_bytes(g * PACK + r);
                for (b, dst) in group.chunks_exact_mut(pb).enumerate() {
                    let src = &w[b * bb..(b + 1) * bb];
                    dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                    if ty == QuantType::Q4_1 {
                        dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
                    }
                    for j in 0..qbytes / 4 {
                        let at = qoff + 32 * j + 4 * r;
                        dst[at..at + 4].copy_from_slice(&src[head + 4 * j..head + 4 * j + 4]);
                    }
                }
            }
        }
        Ok(PackedRows { ty, rows, cols, data })
    }

    /// Element type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Out features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// In features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Groups of [`PACK`] rows.
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(PACK)
    }

    fn blocks(&self) -> usize {
        self.cols / self.ty.block_elems()
    }

    /// The bytes of group `g`.
    fn group(&self, g: usize) -> &[u8] {
        let n = self.blocks() * packed_block_bytes(self.ty);
        &self.data[g * n..(g + 1) * n]
    }

    /// The dots of group `g`'s eight rows with each of `xs` (whole Q8 rows of `cols`), by the
    /// packed arithmetic in plain Rust: the reference of [`Self::dot_group`]. `out[k][r]` is row
    /// `8g + r` (zero for padding rows) against `xs[k]`.
    pub fn dot_scalar(&self, g: usize, xs: &[&[BlockQ8]], out: &mut [[f32; PACK]]) {
        let (pb, p) = (packed_block_bytes(self.ty), self.group(g));
        let qoff = if self.ty == QuantType::Q4_1 { 32 } else { 16 };
        for (x, o) in xs.iter().zip(out.iter_mut()) {
            let (mut acc, mut corr) = ([0f32; PACK], [0f32; PACK]);
            for (b, blk) in p.chunks_exact(pb).enumerate() {
                let y = &x[b];
                for r in 0..PACK {
                    let half = |at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
                    let mut s = 0i32;
                    for j in 0..qbytes_regs(self.ty) {
                        for e in 0..4 {
                            let q = blk[qoff + 32 * j + 4 * r + e];
                            match self.ty {
                                QuantType::Q8_0 => s += i32::from(q as i8) * i32::from(y.qs[4 * j + e]),
                                _ => {
                                    s += i32::from(q & 15) * i32::from(y.qs[4 * j + e]);
                                    s += i32::from(q >> 4) * i32::from(y.qs[16 + 4 * j + e]);
                                }
                            }
                        }
                    }
                    if self.ty == QuantType::Q4_0 {
                        s -= 8 * y.sum;
                    }
                    acc[r] = (half(2 * r) * y.d).mul_add(s as f32, acc[r]);
                    if self.ty == QuantType::Q4_1 {
                        corr[r] = half(16 + 2 * r).mul_add(y.s, corr[r]);
                    }
                }
            }
            for r in 0..PACK {
                o[r] = if self.ty == QuantType::Q4_1 { acc[r] + corr[r] } else { acc[r] };
            }
        }
    }

    /// The SIMD kernel of this matrix's type on `isa`, where `isa` has it ([`Self::wanted`]):
    /// chosen once per product, then run group by group ([`Self::dot_group_with`]).
    pub(crate) fn kernel(&self, isa: Isa) -> Option<GroupKernel> {
        #[cfg(target_arch = "x86_64")]
        if Self::wanted(self.ty, isa) {
            return Some(x86::kernel(self.ty));
        }
        let _ = isa;
        None
    }

    /// [`Self::dot_scalar`] on `isa`: bit for bit the same, by the SIMD kernel where `isa`
    /// has it ([`Self::wanted`]). `xs` and `out` have the same length.
    pub fn dot_group(&self, isa: Isa, g: usize, xs: &[&[BlockQ8]], out: &mut [[f32; PACK]]) {
        match self.kernel(isa) {
            // SAFETY: the kernel was chosen for this machine and type; each row of `xs` is a
            // whole row of `cols` (the caller's contract, as for `dot_scalar`).
            Some(k) => unsafe { self.dot_group_with(k, g, xs, out) },
            None => self.dot_scalar(g, xs, out),
        }
    }

    /// Group `g` against `xs` by `k`.
    ///
    /// # Safety
    /// `k` must be this matrix's [`Self::kernel`]; each row of `xs` must hold `cols` values.
    pub(crate) unsafe fn dot_group_with(&self, k: GroupKernel, g: usize, xs: &[&[BlockQ8]], out: &mut [[f32; PACK]]) {
        // SAFETY: the caller's contract.
        unsafe { k(self.group(g), self.blocks(), xs, out) }
    }
}

/// A packed group's dots on one ISA: (the group's bytes, its blocks, the activation rows, one
/// output per row); each row holds at least that many blocks.
pub(crate) type GroupKernel = unsafe fn(&[u8], usize, &[&[BlockQ8]], &mut [[f32; PACK]]);

/// Quant registers of a packed block (each 32 bytes).
fn qbytes_regs(ty: QuantType) -> usize {
    if ty == QuantType::Q8_0 { 8 } else { 4 }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PACK, QuantType, packed_block_bytes};
    use crate::act::BlockQ8;
    use crate::dot::x86::{AVX512VNNI, AVXVNNI, Vnni, dpbusd, vnni_encoding};

    /// Activation rows per body call.
    const ROWS: usize = 4;

    /// The packed kernel for `ty` (Q8_0, Q4_0 or Q4_1) in the VNNI encoding this machine has;
    /// handed out only once `Isa::AvxVnni` was detected.
    pub(super) fn kernel(ty: QuantType) -> super::GroupKernel {
        match (ty, vnni_encoding()) {
            (QuantType::Q8_0, Vnni::Avx) => rows::<0, AVXVNNI>,
            (QuantType::Q4_0, Vnni::Avx) => rows::<1, AVXVNNI>,
            (_, Vnni::Avx) => rows::<2, AVXVNNI>,
            (QuantType::Q8_0, Vnni::Avx512) => rows::<0, AVX512VNNI>,
            (QuantType::Q4_0, Vnni::Avx512) => rows::<1, AVX512VNNI>,
            (_, Vnni::Avx512) => rows::<2, AVX512VNNI>,
        }
    }

    /// One group against any number of rows `x`, [`ROWS`] a body call.
    ///
    /// # Safety
    /// The `DOT` encoding's features are present; `p` is one group of `nb` packed blocks and each
    /// row of `x` at least `nb` blocks.
    unsafe fn rows<const T: u8, const DOT: u8>(p: &[u8], nb: usize, x: &[&[BlockQ8]], out: &mut [[f32; PACK]]) {
        for (x, o) in x.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
            // SAFETY: the caller's contract.
            unsafe {
                match *x {
                    [a] => o[0] = call::<T, DOT, 1>(p, nb, [a])[0],
                    [a, b] => o.copy_from_slice(&call::<T, DOT, 2>(p, nb, [a, b])),
                    [a, b, c] => o.copy_from_slice(&call::<T, DOT, 3>(p, nb, [a, b, c])),
                    [a, b, c, d] => o.copy_from_slice(&call::<T, DOT, 4>(p, nb, [a, b, c, d])),
                    _ => {}
                }
            }
        }
    }

    /// The body in the `DOT` encoding.
    ///
    /// # Safety
    /// As [`rows`].
    #[inline(always)]
    unsafe fn call<const T: u8, const DOT: u8, const R: usize>(
        p: &[u8],
        nb: usize,
        x: [&[BlockQ8]; R],
    ) -> [[f32; PACK]; R] {
        // SAFETY: the caller's contract names the encoding's features.
        unsafe { if DOT == AVXVNNI { vnni::<T, R>(p, nb, x) } else { vnni512::<T, R>(p, nb, x) } }
    }

    /// [`body`] with the AVX-VNNI encoding.
    ///
    /// # Safety
    /// As [`body`]; needs avx2, fma, f16c and avxvnni.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn vnni<const T: u8, const R: usize>(p: &[u8], nb: usize, x: [&[BlockQ8]; R]) -> [[f32; PACK]; R] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { body::<T, AVXVNNI, R>(p, nb, x) }
    }

    /// [`body`] with the AVX512-VNNI + VL encoding.
    ///
    /// # Safety
    /// As [`body`]; needs avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn vnni512<const T: u8, const R: usize>(p: &[u8], nb: usize, x: [&[BlockQ8]; R]) -> [[f32; PACK]; R] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { body::<T, AVX512VNNI, R>(p, nb, x) }
    }

    /// One packed group (`T`: 0 Q8_0, 1 Q4_0, 2 Q4_1) against `R` activation rows: the
    /// arithmetic of `PackedRows::dot_scalar`, eight weight rows per register.
    ///
    /// # Safety
    /// Inlined only into fns enabling avx2, fma and f16c plus the `DOT` encoding's features;
    /// `p` holds `nb` packed blocks and each row of `x` at least `nb` blocks.
    #[inline(always)]
    unsafe fn body<const T: u8, const DOT: u8, const R: usize>(
        p: &[u8],
        nb: usize,
        x: [&[BlockQ8]; R],
    ) -> [[f32; PACK]; R] {
        let ty = match T {
            0 => QuantType::Q8_0,
            1 => QuantType::Q4_0,
            _ => QuantType::Q4_1,
        };
        let pb = packed_block_bytes(ty);
        let qoff = if T == 2 { 32 } else { 16 };
        // SAFETY: the caller enables the features and guarantees the lengths (see `# Safety`).
        unsafe {
            let (low, flip) = (_mm256_set1_epi8(15), _mm256_set1_epi8(-128));
            let mut acc = [_mm256_setzero_ps(); R];
            let mut corr = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let blk = p.as_ptr().add(b * pb);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                let m = if T == 2 { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast())) } else { d };
                let q = blk.add(qoff);
                // w[j] meets dword j of an activation block.
                let mut w = [_mm256_setzero_si256(); 8];
                if T == 0 {
                    for (j, wj) in w.iter_mut().enumerate() {
                        // Signed quants + 128 as unsigned bytes; 128 · Σy is taken off below.
                        *wj = _mm256_xor_si256(_mm256_loadu_si256(q.add(32 * j).cast()), flip);
                    }
                } else {
                    for j in 0..4 {
                        let raw = _mm256_loadu_si256(q.add(32 * j).cast());
                        w[j] = _mm256_and_si256(raw, low);
                        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                    }
                }
                for k in 0..R {
                    let y = x[k].get_unchecked(b);
                    let yq = y.qs.as_ptr().cast::<i32>();
                    // One chain of exact integer sums (the rows of a batch interleave their chains).
                    let mut s = _mm256_setzero_si256();
                    for (j, wj) in w.iter().enumerate() {
                        s = dpbusd::<DOT>(s, *wj, _mm256_set1_epi32(yq.add(j).read_unaligned()));
                    }
                    if T == 0 {
                        s = _mm256_sub_epi32(s, _mm256_set1_epi32(y.sum << 7));
                    } else if T == 1 {
                        s = _mm256_sub_epi32(s, _mm256_set1_epi32(y.sum << 3));
                    }
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                    acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[k]);
                    if T == 2 {
                        corr[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), corr[k]);
                    }
                }
            }
            let mut out = [[0f32; PACK]; R];
            for k in 0..R {
                let v = if T == 2 { _mm256_add_ps(acc[k], corr[k]) } else { acc[k] };
                _mm256_storeu_ps(out[k].as_mut_ptr(), v);
            }
            out
        }
    }
}
