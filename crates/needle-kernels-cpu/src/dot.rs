//! Fused quantized dot products, ggml style: weights stay in their blocks, activations come
//! pre-quantized ([`crate::act`]), products are integer per block and scaled per block.
//!
//! Each weight type has a scalar reference and an AVX2+FMA path doing the same integer math
//! (results differ only by f32 summation order); Q5_0, Q5_1 and IQ4_NL take the Q8_0-style
//! activations, as in llama.cpp. The 32-element types also have an AVX2 multi-token (gemm)
//! kernel; AVX-512 adds row dots for Q8_0, Q4_0 and Q4_1 only; VNNI (AVX-VNNI or AVX512-VNNI
//! on 256-bit registers) has its own row and multi-row dots for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
//! (the lane kernels: four blocks' weights transposed so each block's integer sum is exact and
//! needs no horizontal sum; see `quad_body`) and a multi-token kernel for Q4_0, Q4_1, Q5_0 and
//! Q5_1 (the others run their AVX2 code there). On
//! aarch64 the float types, Q8_0, Q4_0 and Q4_1 have NEON paths (and `sdot` ones where the
//! dotprod extension is present); Q5_0, Q5_1, IQ4_NL and the K-quants (Q4_K, Q5_K, Q6_K) run
//! their scalar code there.

use half::{bf16, f16};

use crate::act::{BlockQ8, BlockQ8K, QActRow, kind_for};
use crate::{Error, Isa, Result};
use needle_quant::{IQ4_NL_VALUES, QuantType, f16_at, k_scale_min, q5_values};

/// A dot product of one weight row (its bytes) with one activation row.
pub(crate) type Kernel = fn(&[u8], QActRow<'_>) -> f32;

/// Dot product of the weight row `w` (whole blocks of `ty`) with `x`, on the best ISA.
pub fn vec_dot(ty: QuantType, w: &[u8], x: QActRow<'_>) -> Result<f32> {
    vec_dot_with(Isa::detect(), ty, w, x)
}

/// [`vec_dot`] on a given ISA (scalar when `isa` is not available here).
pub fn vec_dot_with(isa: Isa, ty: QuantType, w: &[u8], x: QActRow<'_>) -> Result<f32> {
    check_act(ty, x)?;
    crate::check_len("w", w.len(), ty.bytes_for("x.len()", x.len())?)?;
    Ok(kernel(ty, isa)(w, x))
}

pub(crate) fn check_act(ty: QuantType, x: QActRow<'_>) -> Result<()> {
    if x.kind() != kind_for(ty) {
        return Err(Error::ActKind { got: x.kind(), want: kind_for(ty) });
    }
    Ok(())
}

/// The kernel for `ty` on `isa` (falls back to scalar). Callers have checked lengths and kinds.
pub(crate) fn kernel(ty: QuantType, isa: Isa) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        return x86::kernel(ty, isa.effective());
    }
    #[cfg(target_arch = "aarch64")]
    if isa.has_neon()
        && let Some(k) = arm::kernel(ty, isa.effective() == Isa::NeonDot)
    {
        return k;
    }
    let _ = isa;
    match ty {
        QuantType::F32 => |w, x| f32_scalar(w, f32s(x)),
        QuantType::F16 => |w, x| f16_scalar(w, f32s(x)),
        QuantType::BF16 => |w, x| bf16_scalar(w, f32s(x)),
        QuantType::Q8_0 => |w, x| q8_0_scalar(w, q8(x)),
        QuantType::Q4_0 => |w, x| q4_0_scalar(w, q8(x)),
        QuantType::Q4_1 => |w, x| q4_1_scalar(w, q8(x)),
        QuantType::Q5_0 => |w, x| q5_0_scalar(w, q8(x)),
        QuantType::Q5_1 => |w, x| q5_1_scalar(w, q8(x)),
        QuantType::IQ4_NL => |w, x| iq4_nl_scalar(w, q8(x)),
        QuantType::Q4_K => |w, x| q4_k_scalar(w, q8k(x)),
        QuantType::Q5_K => |w, x| q5_k_scalar(w, q8k(x)),
        QuantType::Q6_K => |w, x| q6_k_scalar(w, q8k(x)),
    }
}

/// A dot product of one weight row with [`TOKENS`] activation rows at once: each weight block is
/// decoded once and used for every token (the gemm micro-kernel).
pub(crate) type Kernel4 = fn(&[u8], &[QActRow<'_>; TOKENS]) -> [f32; TOKENS];

/// Tokens per [`Kernel4`] call.
pub(crate) const TOKENS: usize = 4;

/// The multi-token kernel for `ty` on `isa`, where one exists (AVX2 and NEON, 32-element block
/// types).
pub(crate) fn kernel4(ty: QuantType, isa: Isa) -> Option<Kernel4> {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        return x86::kernel4(ty, isa.effective() == Isa::AvxVnni);
    }
    #[cfg(target_arch = "aarch64")]
    if isa.has_neon() {
        return arm::kernel4(ty, isa.effective() == Isa::NeonDot);
    }
    let _ = (ty, isa);
    None
}

/// Dot products of one weight row with 1 to [`ROWS`] activation rows (`out[j]` for `xs[j]`),
/// each bit for bit what [`kernel`] gives for that row alone: the same per-row arithmetic and
/// summation order, with each weight block decoded once for all rows. For batched decode, where
/// each row is another sequence's and must get the bits it gets alone.
pub(crate) type KernelRows = fn(&[u8], &[QActRow<'_>], &mut [f32]);

/// [`KernelRows`] over rows whose per-block scalars were laid out once per call ([`Lanes`]):
/// `out[j]` for row `j` of the group.
pub(crate) type KernelLanes = fn(&[u8], &Lanes, &mut [f32]);

/// A multi-row kernel and what it takes (x86-64 only so far).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum RowsKernel {
    /// The rows as they are.
    Rows(KernelRows),
    /// The rows prepared as [`Lanes`].
    Lanes(KernelLanes),
}

/// Rows per [`KernelRows`] call, at most.
pub(crate) const ROWS: usize = 4;

/// The multi-row kernel of `ty` on `isa`, where one exists (AVX2 and VNNI: the 32-element block
/// types and the K-quants); elsewhere [`RowsPlan`] runs the row kernel once per row.
pub(crate) fn kernel_rows(ty: QuantType, isa: Isa) -> Option<RowsKernel> {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        return x86::kernel_rows(ty, isa.effective());
    }
    let _ = (ty, isa);
    None
}

/// An all-zero activation block: the padding of a row's last partial four blocks in the lane
/// kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static ZERO_Q8: BlockQ8 = BlockQ8 { d: 0.0, sum: 0, s: 0.0, qs: [0; 32] };

/// Four blocks of a Q8 activation row laid out for the lane kernels (the VNNI row and multi-row
/// dots): `y` is four vectors of 32 bytes, vector `i` with elements `4i..4i + 4` of the four
/// blocks in its first 16 bytes and elements `16 + 4i..20 + 4i` in its last 16; `d`, `s` and
/// `sum` are the four blocks' scalars. Missing blocks (past a row's end) are zeros.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Four {
    /// The quants, transposed.
    pub(crate) y: [i8; 128],
    /// The blocks' scales.
    pub(crate) d: [f32; 4],
    /// The blocks' `s` (the Q4_1 / Q5_1 min's factor).
    pub(crate) s: [f32; 4],
    /// The blocks' quant sums.
    pub(crate) sum: [i32; 4],
}

/// One Q8 activation row laid out for the lane kernels, four blocks at a time ([`Four`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct LaneRow {
    /// Blocks in the row.
    pub(crate) blocks: usize,
    /// The row's fours.
    pub(crate) fours: Vec<Four>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl LaneRow {
    /// The first `blocks` blocks of `x` laid out.
    pub(crate) fn new(x: &[BlockQ8], blocks: usize) -> LaneRow {
        let blocks = blocks.min(x.len());
        let zero = Four { y: [0; 128], d: [0.0; 4], s: [0.0; 4], sum: [0; 4] };
        let mut fours = vec![zero; blocks.div_ceil(4)];
        for (i, blk) in x[..blocks].iter().enumerate() {
            let (f, b) = (&mut fours[i / 4], i % 4);
            for e in 0..4 {
                f.y[32 * e + 4 * b..32 * e + 4 * b + 4].copy_from_slice(&blk.qs[4 * e..4 * e + 4]);
                f.y[32 * e + 16 + 4 * b..32 * e + 20 + 4 * b].copy_from_slice(&blk.qs[16 + 4 * e..20 + 4 * e]);
            }
            (f.d[b], f.s[b], f.sum[b]) = (blk.d, blk.s, blk.sum);
        }
        LaneRow { blocks, fours }
    }
}

/// Up to [`ROWS`] activation rows laid out for a lane kernel ([`LaneRow`]), built once per call
/// and used for every weight row.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Lanes {
    /// The rows (1 to [`ROWS`]).
    pub(crate) rows: Vec<LaneRow>,
}

/// `xs` (Q8 rows of `blocks` blocks) laid out in groups of [`ROWS`] for a lane kernel.
pub(crate) fn lanes_for(xs: &[QActRow<'_>], blocks: usize) -> Vec<Lanes> {
    xs.chunks(ROWS).map(|g| Lanes { rows: g.iter().map(|&x| LaneRow::new(q8(x), blocks)).collect() }).collect()
}

/// The rows of a multi-row dot with the kernels for them, prepared once for every weight row
/// of a matrix: [`dot`](Self::dot) gives each row the bits [`kernel`] gives it alone.
pub(crate) struct RowsPlan<'a> {
    k: Kernel,
    kr: Option<RowsKernel>,
    xs: Vec<QActRow<'a>>,
    lanes: &'a [Lanes],
}

impl<'a> RowsPlan<'a> {
    /// The plan for weights of `ty` on `isa` against `xs` (checked kinds); `lanes` is
    /// [`lanes_for`]`(xs)` where `ty`'s multi-row kernel takes [`Lanes`] ([`Self::wants_lanes`]).
    pub(crate) fn new(ty: QuantType, isa: Isa, xs: Vec<QActRow<'a>>, lanes: &'a [Lanes]) -> RowsPlan<'a> {
        RowsPlan { k: kernel(ty, isa), kr: kernel_rows(ty, isa), xs, lanes }
    }

    /// Whether weights of `ty` on `isa` take their rows as [`Lanes`].
    pub(crate) fn wants_lanes(ty: QuantType, isa: Isa) -> bool {
        matches!(kernel_rows(ty, isa), Some(RowsKernel::Lanes(_)))
    }

    /// The plan's rows as Q8 blocks (empty rows where they are of another kind).
    pub(crate) fn q8_rows(&self) -> Vec<&'a [BlockQ8]> {
        self.xs.iter().map(|&x| q8(x)).collect()
    }

    /// Rows in the plan.
    pub(crate) fn len(&self) -> usize {
        self.xs.len()
    }

    /// `out[j]` = the dot of the weight row `w` with row `j` (`out` has [`len`](Self::len) floats).
    pub(crate) fn dot(&self, w: &[u8], out: &mut [f32]) {
        match self.kr {
            Some(RowsKernel::Lanes(kl)) if self.lanes.len() == self.xs.len().div_ceil(ROWS) => {
                for (g, o) in self.lanes.iter().zip(out.chunks_mut(ROWS)) {
                    kl(w, g, o);
                }
            }
            Some(RowsKernel::Rows(kr)) => {
                for (x, o) in self.xs.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
                    kr(w, x, o);
                }
            }
            _ => {
                for (&x, o) in self.xs.iter().zip(out) {
                    *o = (self.k)(w, x);
                }
            }
        }
    }
}

/// Dot products of the weight row `w` with each of `xs` into `out`, on `isa`: `out[j]` is bit for
/// bit [`vec_dot_with`]`(isa, ty, w, xs[j])`, while each weight block is decoded once for up to
/// [`ROWS`] rows where the type has such a kernel on `isa`.
pub fn vec_dot_rows_with(isa: Isa, ty: QuantType, w: &[u8], xs: &[QActRow<'_>], out: &mut [f32]) -> Result<()> {
    crate::check_len("out", out.len(), xs.len())?;
    for &x in xs {
        check_act(ty, x)?;
        crate::check_len("w", w.len(), ty.bytes_for("x.len()", x.len())?)?;
    }
    let blocks = xs.first().map_or(0, |x| x.len() / ty.block_elems());
    let lanes = if RowsPlan::wants_lanes(ty, isa) { lanes_for(xs, blocks) } else { Vec::new() };
    RowsPlan::new(ty, isa, xs.to_vec(), &lanes).dot(w, out);
    Ok(())
}

// Kind mismatches are rejected by `check_act` before a kernel runs; an empty row makes these total.
fn f32s(x: QActRow<'_>) -> &[f32] {
    if let QActRow::F32(v) = x { v } else { &[] }
}
fn q8(x: QActRow<'_>) -> &[BlockQ8] {
    if let QActRow::Q8(v) = x { v } else { &[] }
}
fn q8k(x: QActRow<'_>) -> &[BlockQ8K] {
    if let QActRow::Q8K(v) = x { v } else { &[] }
}

fn f32_scalar(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (c, v)) in w.chunks_exact(4).zip(x).enumerate() {
        acc[i % 8] += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v;
    }
    acc.iter().sum()
}

fn f16_scalar(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (c, v)) in w.chunks_exact(2).zip(x).enumerate() {
        acc[i % 8] += f16::from_le_bytes([c[0], c[1]]).to_f32() * v;
    }
    acc.iter().sum()
}

fn bf16_scalar(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (c, v)) in w.chunks_exact(2).zip(x).enumerate() {
        acc[i % 8] += bf16::from_le_bytes([c[0], c[1]]).to_f32() * v;
    }
    acc.iter().sum()
}

fn q8_0_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(34).zip(x) {
        let sumi: i32 = b[2..34].iter().zip(&y.qs).map(|(&q, &v)| i32::from(q as i8) * i32::from(v)).sum();
        acc += f16_at(b, 0) * y.d * sumi as f32;
    }
    acc
}

/// `Σ nibble·y` over a 16-byte nibble array laid out ggml style (low nibbles first).
fn nib_dot(qs: &[u8], y: &[i8; 32]) -> i32 {
    let (lo, hi) = y.split_at(16);
    qs.iter()
        .zip(lo)
        .zip(hi)
        .map(|((&q, &a), &b)| i32::from(q & 15) * i32::from(a) + i32::from(q >> 4) * i32::from(b))
        .sum()
}

fn q4_0_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(18).zip(x) {
        let sumi = nib_dot(&b[2..18], &y.qs) - 8 * y.sum;
        acc += f16_at(b, 0) * y.d * sumi as f32;
    }
    acc
}

fn q4_1_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(20).zip(x) {
        let sumi = nib_dot(&b[4..20], &y.qs);
        acc += f16_at(b, 0) * y.d * sumi as f32 + f16_at(b, 2) * y.s;
    }
    acc
}

/// `Σ q·y` over the 32 five-bit values of a Q5_0 / Q5_1 block whose `qh` is at byte `h`.
fn q5_dot(b: &[u8], h: usize, y: &[i8; 32]) -> i32 {
    q5_values(b, h).iter().zip(y).map(|(&q, &v)| i32::from(q) * i32::from(v)).sum()
}

fn q5_0_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(22).zip(x) {
        let sumi = q5_dot(b, 2, &y.qs) - 16 * y.sum;
        acc += f16_at(b, 0) * y.d * sumi as f32;
    }
    acc
}

fn q5_1_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(24).zip(x) {
        let sumi = q5_dot(b, 4, &y.qs);
        acc += f16_at(b, 0) * y.d * sumi as f32 + f16_at(b, 2) * y.s;
    }
    acc
}

fn iq4_nl_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(18).zip(x) {
        let (lo, hi) = y.qs.split_at(16);
        let sumi: i32 = b[2..18]
            .iter()
            .zip(lo)
            .zip(hi)
            .map(|((&q, &a), &c)| {
                i32::from(IQ4_NL_VALUES[usize::from(q & 15)]) * i32::from(a)
                    + i32::from(IQ4_NL_VALUES[usize::from(q >> 4)]) * i32::from(c)
            })
            .sum();
        acc += f16_at(b, 0) * y.d * sumi as f32;
    }
    acc
}

/// The 8 scales and the min correction `Σ m_j · (sum of the 32 quants of sub-block j)` of a
/// Q4_K/Q5_K block against a Q8_K block.
fn k_scales(scales: &[u8], y: &BlockQ8K) -> ([i32; 8], i32) {
    let mut sc = [0i32; 8];
    let mut summ = 0i32;
    for (j, s) in sc.iter_mut().enumerate() {
        let (a, m) = k_scale_min(j, scales);
        *s = i32::from(a);
        summ += i32::from(m) * (i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]));
    }
    (sc, summ)
}

fn q4_k_scalar(w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(144).zip(x) {
        let (sc, summ) = k_scales(&b[4..16], y);
        let qs = &b[16..144];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                s1 += i32::from(q & 15) * i32::from(y.qs[64 * c + l]);
                s2 += i32::from(q >> 4) * i32::from(y.qs[64 * c + 32 + l]);
            }
            sumi += sc[2 * c] * s1 + sc[2 * c + 1] * s2;
        }
        acc += f16_at(b, 0) * y.d * sumi as f32 - f16_at(b, 2) * y.d * summ as f32;
    }
    acc
}

fn q5_k_scalar(w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(176).zip(x) {
        let (sc, summ) = k_scales(&b[4..16], y);
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                let q1 = (q & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
                let q2 = (q >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
                s1 += i32::from(q1) * i32::from(y.qs[64 * c + l]);
                s2 += i32::from(q2) * i32::from(y.qs[64 * c + 32 + l]);
            }
            sumi += sc[2 * c] * s1 + sc[2 * c + 1] * s2;
        }
        acc += f16_at(b, 0) * y.d * sumi as f32 - f16_at(b, 2) * y.d * summ as f32;
    }
    acc
}

/// The 6-bit quant of element `32r + l` of Q6_K half `h` (see [`needle_quant::format`]).
fn q6(b: &[u8], h: usize, r: usize, l: usize) -> i32 {
    let ql = b[64 * h + l + if r % 2 == 1 { 32 } else { 0 }];
    let low = if r < 2 { ql & 15 } else { ql >> 4 };
    let high = (b[128 + 32 * h + l] >> (2 * r)) & 3;
    i32::from(low | (high << 4))
}

fn q6_k_scalar(w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(210).zip(x) {
        let mut sumi = 0i32;
        for k in 0..16 {
            let (h, r) = (k / 8, (k % 8) / 2);
            let mut s = 0i32;
            for l in 16 * (k % 2)..16 * (k % 2) + 16 {
                s += q6(b, h, r, l) * i32::from(y.qs[16 * k + l % 16]);
            }
            sumi += i32::from(b[192 + k] as i8) * (s - 32 * i32::from(y.bsums[k]));
        }
        acc += f16_at(b, 208) * y.d * sumi as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 + FMA (+ F16C) kernels. Each `unsafe fn` only needs the CPU features it enables;
    //! the safe wrappers are handed out by [`kernel`] only after [`Isa::Avx2`] was detected.

    use std::arch::x86_64::*;

    use super::{
        BlockQ8, BlockQ8K, IQ4_NL_VALUES, Isa, Kernel, QuantType, f16_at, f32s, k_scale_min, k_scales, q8, q8k,
    };

    pub(super) fn kernel(ty: QuantType, isa: Isa) -> Kernel {
        if isa == Isa::Avx512 {
            // SAFETY (every closure here): `Isa::Avx512` was detected (avx512f, avx512bw and
            // everything `Isa::Avx2` needs).
            match ty {
                QuantType::Q8_0 => return |w, x| unsafe { q32_avx512::<0>(w, q8(x)) },
                QuantType::Q4_0 => return |w, x| unsafe { q32_avx512::<1>(w, q8(x)) },
                QuantType::Q4_1 => return |w, x| unsafe { q32_avx512::<2>(w, q8(x)) },
                _ => {}
            }
        }
        if isa == Isa::AvxVnni {
            // SAFETY (every closure here): `Isa::AvxVnni` was detected, and `vnni_encoding`
            // names the VNNI extension this machine has, as the called fn requires.
            let avx512 = vnni_encoding() == Vnni::Avx512;
            match (ty, avx512) {
                (QuantType::Q8_0, false) => return |w, x| unsafe { row_lanes_vnni::<0>(w, q8(x)) },
                (QuantType::Q4_0, false) => return |w, x| unsafe { row_lanes_vnni::<1>(w, q8(x)) },
                (QuantType::Q4_1, false) => return |w, x| unsafe { row_lanes_vnni::<2>(w, q8(x)) },
                (QuantType::Q5_0, false) => return |w, x| unsafe { row_lanes_vnni::<3>(w, q8(x)) },
                (QuantType::Q5_1, false) => return |w, x| unsafe { row_lanes_vnni::<4>(w, q8(x)) },
                (QuantType::Q8_0, true) => return |w, x| unsafe { row_lanes_vnni512::<0>(w, q8(x)) },
                (QuantType::Q4_0, true) => return |w, x| unsafe { row_lanes_vnni512::<1>(w, q8(x)) },
                (QuantType::Q4_1, true) => return |w, x| unsafe { row_lanes_vnni512::<2>(w, q8(x)) },
                (QuantType::Q5_0, true) => return |w, x| unsafe { row_lanes_vnni512::<3>(w, q8(x)) },
                (QuantType::Q5_1, true) => return |w, x| unsafe { row_lanes_vnni512::<4>(w, q8(x)) },
                _ => {}
            }
        }
        // SAFETY (every closure below): `kernel` is only called once `Isa::Avx2` was detected
        // (avx2, fma and f16c present), which is all the target features these functions enable.
        match ty {
            QuantType::F32 => |w, x| unsafe { f32_avx2(w, f32s(x)) },
            QuantType::F16 => |w, x| unsafe { f16_avx2(w, f32s(x)) },
            QuantType::BF16 => |w, x| unsafe { bf16_avx2(w, f32s(x)) },
            QuantType::Q8_0 => |w, x| unsafe { q8_0_avx2(w, q8(x)) },
            QuantType::Q4_0 => |w, x| unsafe { q4_x_avx2::<false>(w, q8(x)) },
            QuantType::Q4_1 => |w, x| unsafe { q4_x_avx2::<true>(w, q8(x)) },
            QuantType::Q5_0 => |w, x| unsafe { q5_nl_avx2::<0>(w, q8(x)) },
            QuantType::Q5_1 => |w, x| unsafe { q5_nl_avx2::<1>(w, q8(x)) },
            QuantType::IQ4_NL => |w, x| unsafe { q5_nl_avx2::<2>(w, q8(x)) },
            QuantType::Q4_K => |w, x| unsafe { qk_avx2::<false>(w, q8k(x)) },
            QuantType::Q5_K => |w, x| unsafe { qk_avx2::<true>(w, q8k(x)) },
            QuantType::Q6_K => |w, x| unsafe { q6_k_avx2(w, q8k(x)) },
        }
    }

    pub(super) fn kernel4(ty: QuantType, vnni: bool) -> Option<super::Kernel4> {
        if vnni {
            // SAFETY (every closure here): `vnni` is only true once `Isa::AvxVnni` was detected,
            // and `vnni_encoding` names the VNNI extension this machine has.
            // Q8_0 and IQ4_NL keep the AVX2 code: their sign trick leaves VNNI no instruction to
            // save.
            let avx512 = vnni_encoding() == Vnni::Avx512;
            match (ty, avx512) {
                (QuantType::Q4_0, false) => {
                    return Some(|w, x| unsafe { multi_vnni::<1, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q4_1, false) => {
                    return Some(|w, x| unsafe { multi_vnni::<2, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q5_0, false) => {
                    return Some(|w, x| unsafe { multi_vnni::<3, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q5_1, false) => {
                    return Some(|w, x| unsafe { multi_vnni::<4, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q4_0, true) => {
                    return Some(|w, x| unsafe { multi_vnni512::<1, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q4_1, true) => {
                    return Some(|w, x| unsafe { multi_vnni512::<2, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q5_0, true) => {
                    return Some(|w, x| unsafe { multi_vnni512::<3, { super::TOKENS }>(w, &x.map(q8)) });
                }
                (QuantType::Q5_1, true) => {
                    return Some(|w, x| unsafe { multi_vnni512::<4, { super::TOKENS }>(w, &x.map(q8)) });
                }
                _ => {}
            }
        }
        // SAFETY (every closure below): as in `kernel`, only handed out once Avx2 was detected.
        match ty {
            QuantType::Q8_0 => Some(|w, x| unsafe { multi_avx2::<0>(w, &x.map(q8)) }),
            QuantType::Q4_0 => Some(|w, x| unsafe { multi_avx2::<1>(w, &x.map(q8)) }),
            QuantType::Q4_1 => Some(|w, x| unsafe { multi_avx2::<2>(w, &x.map(q8)) }),
            QuantType::Q5_0 => Some(|w, x| unsafe { multi_avx2::<3>(w, &x.map(q8)) }),
            QuantType::Q5_1 => Some(|w, x| unsafe { multi_avx2::<4>(w, &x.map(q8)) }),
            QuantType::IQ4_NL => Some(|w, x| unsafe { multi_avx2::<5>(w, &x.map(q8)) }),
            _ => None,
        }
    }

    /// `body::<generics.., N>` over 1 to 4 rows as a [`KernelRows`](super::KernelRows), each row
    /// taken as Q8 blocks (`rows_fn!(body::<g>)`) or as `conv` gives it (`rows_fn!(q8k, body, g)`).
    macro_rules! rows_fn {
        ($body:ident::<$($g:tt),*>) => {
            rows_fn!(q8, $body $(, $g)*)
        };
        ($conv:ident, $body:ident $(, $g:tt)*) => {
            |w: &[u8], xs: &[super::QActRow<'_>], out: &mut [f32]| {
                // SAFETY: `kernel_rows` hands this out only where the body's features were
                // detected (see there); the rows are whole blocks, checked by the callers.
                let v: &[f32] = unsafe {
                    match *xs {
                        [a] => &$body::<$($g,)* 1>(w, &[$conv(a)]),
                        [a, b] => &$body::<$($g,)* 2>(w, &[$conv(a), $conv(b)]),
                        [a, b, c] => &$body::<$($g,)* 3>(w, &[$conv(a), $conv(b), $conv(c)]),
                        [a, b, c, d] => &$body::<$($g,)* 4>(w, &[$conv(a), $conv(b), $conv(c), $conv(d)]),
                        _ => &[],
                    }
                };
                out[..v.len()].copy_from_slice(v);
            }
        };
    }

    /// `body::<T, R>` for the 1 to 4 rows of a [`Lanes`](super::Lanes) group as a
    /// [`KernelLanes`](super::KernelLanes).
    macro_rules! lanes_fn {
        ($body:ident::<$t:literal>) => {
            |w: &[u8], g: &super::Lanes, out: &mut [f32]| {
                // SAFETY: `kernel_rows` hands this out only where the body's features were
                // detected (see there); the rows are whole blocks, checked by the callers.
                let v: &[f32] = unsafe {
                    match g.rows.len() {
                        1 => &$body::<$t, 1>(w, g),
                        2 => &$body::<$t, 2>(w, g),
                        3 => &$body::<$t, 3>(w, g),
                        4 => &$body::<$t, 4>(w, g),
                        _ => &[],
                    }
                };
                let n = out.len().min(v.len());
                out[..n].copy_from_slice(&v[..n]);
            }
        };
    }

    /// The multi-row kernel whose rows are bit for bit [`kernel`]`(ty, isa)`'s: the lane bodies
    /// where the row kernel is one ([`row_lanes_vnni`] is [`quad_body`] of one row), else
    /// [`pair_rows`] where the row kernel is the AVX2 pair loop. The AVX-512 row dots (Q8_0,
    /// Q4_0, Q4_1) have none.
    pub(super) fn kernel_rows(ty: QuantType, isa: Isa) -> Option<super::RowsKernel> {
        use super::RowsKernel::{Lanes, Rows};
        if isa == Isa::AvxVnni {
            // SAFETY (lanes_fn): `Isa::AvxVnni` was detected and `vnni_encoding` names the
            // encoding this machine has, as for `row_lanes_vnni` / `row_lanes_vnni512` in `kernel`.
            let avx512 = vnni_encoding() == Vnni::Avx512;
            match (ty, avx512) {
                (QuantType::Q8_0, false) => return Some(Lanes(lanes_fn!(lanes_vnni::<0>))),
                (QuantType::Q4_0, false) => return Some(Lanes(lanes_fn!(lanes_vnni::<1>))),
                (QuantType::Q4_1, false) => return Some(Lanes(lanes_fn!(lanes_vnni::<2>))),
                (QuantType::Q5_0, false) => return Some(Lanes(lanes_fn!(lanes_vnni::<3>))),
                (QuantType::Q5_1, false) => return Some(Lanes(lanes_fn!(lanes_vnni::<4>))),
                (QuantType::Q8_0, true) => return Some(Lanes(lanes_fn!(lanes_vnni512::<0>))),
                (QuantType::Q4_0, true) => return Some(Lanes(lanes_fn!(lanes_vnni512::<1>))),
                (QuantType::Q4_1, true) => return Some(Lanes(lanes_fn!(lanes_vnni512::<2>))),
                (QuantType::Q5_0, true) => return Some(Lanes(lanes_fn!(lanes_vnni512::<3>))),
                (QuantType::Q5_1, true) => return Some(Lanes(lanes_fn!(lanes_vnni512::<4>))),
                _ => {}
            }
        }
        if isa == Isa::Avx512 && matches!(ty, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1) {
            return None;
        }
        // SAFETY (rows_fn): only called once `Isa::Avx2` (or a superset) was detected.
        match ty {
            QuantType::Q8_0 => Some(Rows(rows_fn!(pair_rows::<0>))),
            QuantType::Q4_0 => Some(Rows(rows_fn!(pair_rows::<1>))),
            QuantType::Q4_1 => Some(Rows(rows_fn!(pair_rows::<2>))),
            QuantType::Q5_0 => Some(Rows(rows_fn!(pair_rows::<3>))),
            QuantType::Q5_1 => Some(Rows(rows_fn!(pair_rows::<4>))),
            QuantType::IQ4_NL => Some(Rows(rows_fn!(pair_rows::<5>))),
            QuantType::Q4_K => Some(Rows(rows_fn!(q8k, qk_rows, false))),
            QuantType::Q5_K => Some(Rows(rows_fn!(q8k, qk_rows, true))),
            QuantType::Q6_K => Some(Rows(rows_fn!(q8k, q6_k_rows))),
            _ => None,
        }
    }

    /// One weight row of Q8_0 (`T = 0`), Q4_0 (`T = 1`), Q4_1 (`T = 2`), Q5_0 (`T = 3`), Q5_1
    /// (`T = 4`) or IQ4_NL (`T = 5`) against `N` token rows, each row's sums exactly those of its
    /// AVX2 row kernel ([`q8_0_avx2`], [`q4_x_avx2`], [`q5_nl_avx2`]: even and odd blocks in two
    /// accumulators, a last odd block in the first), each block decoded once for the `N` rows.
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pair_rows<const T: u8, const N: usize>(w: &[u8], x: &[&[BlockQ8]; N]) -> [f32; N] {
        let bb = match T {
            0 => 34,
            1 | 5 => 18,
            2 => 20,
            3 => 22,
            _ => 24,
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let mut corr = [[0f32; 2]; N];
        for (i, b) in w.chunks_exact(bb).enumerate() {
            // (unsigned weight bytes, sign source for the activations, d, min)
            let (u, sgn, dw, m) = match T {
                0 => {
                    // SAFETY: b[2..34] is 32 bytes.
                    let qx = unsafe { load32(&b[2..34]) };
                    (_mm256_sign_epi8(qx, qx), Some(qx), h2f(b, 0), 0.0)
                }
                // SAFETY: b[2..18] is the block's 16 nibble bytes.
                1 => (unsafe { nibbles(&b[2..18]) }, None, h2f(b, 0), 0.0),
                2 => {
                    let (d, m) = h2f_pair(b);
                    // SAFETY: b[4..20] is the block's 16 nibble bytes.
                    (unsafe { nibbles(&b[4..20]) }, None, d, m)
                }
                3 | 4 => {
                    let h = if T == 3 { 2 } else { 4 };
                    // SAFETY: b[h + 4..h + 20] is the block's 16 nibble bytes.
                    let lo = unsafe { nibbles(&b[h + 4..h + 20]) };
                    let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                    let (d, m) = if T == 3 { (h2f(b, 0), 0.0) } else { h2f_pair(b) };
                    (_mm256_or_si256(lo, q5_high_bits(qh)), None, d, m)
                }
                _ => {
                    // SAFETY: b[2..18] is the block's 16 nibble bytes.
                    let v = unsafe { iq4_nl_values(&b[2..18]) };
                    (_mm256_sign_epi8(v, v), Some(v), h2f(b, 0), 0.0)
                }
            };
            let s = i % 2;
            for k in 0..N {
                let y = &x[k][i];
                let mut qy = load_i8x32(&y.qs);
                if let Some(sg) = sgn {
                    qy = _mm256_sign_epi8(qy, sg);
                }
                let p = _mm256_cvtepi32_ps(dot_u8i8(u, qy));
                let d = dw * y.d;
                acc[k][s] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[k][s]);
                corr[k][s] += match T {
                    1 => -d * (8 * y.sum) as f32,
                    3 => -d * (16 * y.sum) as f32,
                    2 | 4 => m * y.s,
                    _ => 0.0,
                };
            }
        }
        let mut out = [0f32; N];
        for k in 0..N {
            let sum = hsum_ps(_mm256_add_ps(acc[k][0], acc[k][1]));
            // Q8_0's row kernel adds no correction (adding a zero would turn -0 into +0).
            out[k] = if T == 0 { sum } else { sum + (corr[k][0] + corr[k][1]) };
        }
        out
    }

    /// One weight row of Q8_0 (`T = 0`), Q4_0 (`T = 1`), Q4_1 (`T = 2`), Q5_0 (`T = 3`), Q5_1
    /// (`T = 4`) or IQ4_NL (`T = 5`) against 4 token rows:
    /// each block is loaded and unpacked once, then multiplied with the 4 tokens' blocks.
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn multi_avx2<const T: u8>(w: &[u8], x: &[&[BlockQ8]; super::TOKENS]) -> [f32; super::TOKENS] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { multi_body::<T, MADD, { super::TOKENS }>(w, x) }
    }

    /// [`multi_avx2`] with each block's integer dot as one AVX-VNNI `vpdpbusd` (same sums: the
    /// AVX2 pair of instructions never saturates on these ranges).
    ///
    /// # Safety
    /// Needs avx2, fma, f16c and avxvnni.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn multi_vnni<const T: u8, const N: usize>(w: &[u8], x: &[&[BlockQ8]; N]) -> [f32; N] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { multi_body::<T, AVXVNNI, N>(w, x) }
    }

    /// [`multi_vnni`] with the AVX-512 encoding of `vpdpbusd` on 256-bit registers (AVX512-VNNI +
    /// VL: the machines with AVX-512 but without AVX-VNNI, such as AMD Zen 4).
    ///
    /// # Safety
    /// Needs avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn multi_vnni512<const T: u8, const N: usize>(w: &[u8], x: &[&[BlockQ8]; N]) -> [f32; N] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { multi_body::<T, AVX512VNNI, N>(w, x) }
    }

    /// One weight row of Q8_0 (`T = 0`), Q4_0 (`T = 1`), Q4_1 (`T = 2`), Q5_0 (`T = 3`) or Q5_1
    /// (`T = 4`) against one token row with AVX-VNNI: [`quad_body`] of one row, its activations
    /// laid out as it goes. The row kernel of these types on VNNI machines.
    ///
    /// # Safety
    /// Needs avx2, fma, f16c and avxvnni.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn row_lanes_vnni<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        // SAFETY: the features the body needs are this fn's.
        unsafe { quad_body::<T, AVXVNNI, 1>(w, None, x)[0] }
    }

    /// [`row_lanes_vnni`] with the AVX512-VNNI + VL encoding.
    ///
    /// # Safety
    /// Needs avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn row_lanes_vnni512<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        // SAFETY: the features the body needs are this fn's.
        unsafe { quad_body::<T, AVX512VNNI, 1>(w, None, x)[0] }
    }

    /// The `R` prepared rows of `g` against one weight row (`T` as in [`row_lanes_vnni`]),
    /// AVX-VNNI.
    ///
    /// # Safety
    /// Needs avx2, fma, f16c and avxvnni.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn lanes_vnni<const T: u8, const R: usize>(w: &[u8], g: &super::Lanes) -> [f32; R] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { quad_body::<T, AVXVNNI, R>(w, Some(&g.rows), &[]) }
    }

    /// [`lanes_vnni`] with the AVX512-VNNI + VL encoding.
    ///
    /// # Safety
    /// Needs avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
    unsafe fn lanes_vnni512<const T: u8, const R: usize>(w: &[u8], g: &super::Lanes) -> [f32; R] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { quad_body::<T, AVX512VNNI, R>(w, Some(&g.rows), &[]) }
    }

    /// Bytes per block of the lane types (`T` as in [`row_lanes_vnni`]).
    const fn lane_block_bytes(t: u8) -> usize {
        match t {
            0 => 34,
            1 => 18,
            2 => 20,
            3 => 22,
            _ => 24,
        }
    }

    /// The 32 quants of a block of lane type `T` as unsigned bytes in [`nibbles`] order: Q8_0's
    /// shifted by +128 (its `−128 · Σy` is taken off in integers), the 4- and 5-bit ones as
    /// stored.
    ///
    /// # Safety
    /// `b` must be a whole block; needs avx2.
    #[inline(always)]
    unsafe fn lane_quants<const T: u8>(b: &[u8]) -> __m256i {
        // SAFETY: the caller's contract; each range is inside a whole block.
        unsafe {
            match T {
                0 => _mm256_xor_si256(load32(&b[2..34]), _mm256_set1_epi8(-128)),
                1 => nibbles(&b[2..18]),
                2 => nibbles(&b[4..20]),
                _ => {
                    let h = if T == 3 { 2 } else { 4 };
                    let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                    _mm256_or_si256(nibbles(&b[h + 4..h + 20]), q5_high_bits(qh))
                }
            }
        }
    }

    /// `acc` plus `vpdpbusd` in the encoding `DOT`: 4 products `u`·`y` more in each i32 lane.
    ///
    /// # Safety
    /// As [`quad_body`].
    #[inline(always)]
    pub(crate) unsafe fn dpbusd<const DOT: u8>(acc: __m256i, u: __m256i, y: __m256i) -> __m256i {
        // SAFETY: the caller enables the encoding's features.
        unsafe {
            match DOT {
                AVXVNNI => _mm256_dpbusd_avx_epi32(acc, u, y),
                _ => _mm256_dpbusd_epi32(acc, u, y),
            }
        }
    }

    /// Four blocks' 32 bytes each (as [`nibbles`] orders them: in each 128-bit half, dwords of
    /// elements 4i..4i+4 and 16+4i..16+4i+4) to four vectors, vector `i` holding dword `i` of
    /// blocks 0..4 in each half: lane `b` (`4 + b`) is block `b`'s elements 4i.. (16+4i..).
    ///
    /// # Safety
    /// Needs avx2.
    #[inline(always)]
    unsafe fn transpose4(x: [__m256i; 4]) -> [__m256i; 4] {
        // SAFETY: the caller enables avx2.
        unsafe {
            let (t0, t1) = (_mm256_unpacklo_epi32(x[0], x[1]), _mm256_unpackhi_epi32(x[0], x[1]));
            let (t2, t3) = (_mm256_unpacklo_epi32(x[2], x[3]), _mm256_unpackhi_epi32(x[2], x[3]));
            [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ]
        }
    }

    /// The quants of the first `have` (1 to 4) blocks of `w` (lane type `T`), transposed
    /// ([`transpose4`]), and their (d, m) as f32 pairs; missing blocks are zeros. `FULL`: all
    /// four are there (no tests).
    ///
    /// # Safety
    /// `w` must hold `have` whole blocks; as [`quad_body`].
    #[inline(always)]
    unsafe fn weight_four<const T: u8, const FULL: bool>(w: &[u8], have: usize) -> ([__m256i; 4], __m256) {
        let bb = lane_block_bytes(T);
        // SAFETY: the caller's contract: blocks below `have` are inside `w`.
        unsafe {
            // A plain loop, not closures: a closure does not inherit the caller's target
            // features, so the intrinsics in it would be calls.
            let (mut quants, mut head) = ([_mm256_setzero_si256(); 4], [0i32; 4]);
            for b in 0..4 {
                if FULL || b < have {
                    quants[b] = lane_quants::<T>(w.get_unchecked(b * bb..b * bb + bb));
                    let h = w.get_unchecked(b * bb..b * bb + 4);
                    head[b] = i32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                }
            }
            // (d, m) of the four blocks as f16, then f32; Q8_0 / Q4_0 / Q5_0 have no m (their m
            // lanes are quant bytes, never used).
            let dm = _mm256_cvtph_ps(_mm_setr_epi32(head[0], head[1], head[2], head[3]));
            (transpose4(quants), dm)
        }
    }

    /// One weight row of lane type `T` (as in [`row_lanes_vnni`]) against `R` (1 to 4)
    /// activation rows, four blocks a step. Per row the arithmetic is fixed, whatever `R`:
    /// each block's integer sum `Σ q·y` exactly, in two halves (the elements each 128-bit half
    /// of the registers holds; the Q8_0 / Q4_0 / Q5_0 offsets taken off the first in integers),
    /// then `acc_bh = fma(d·d_y, sum_h, acc_bh)` per half `h` and, for Q4_1 / Q5_1,
    /// `corr_b = fma(m, s_y, corr_b)`, with `b` the block's place in its four; with
    /// `acc_b = acc_b0 + acc_b1`, the row's dot is
    /// `((acc_0 + acc_1) + (acc_2 + acc_3)) + ((corr_0 + corr_1) + (corr_2 + corr_3))`. The four
    /// blocks' weights are decoded and transposed once ([`transpose4`]) so that one `vpdpbusd`
    /// per block and row leaves each block's sum in its own lanes: no horizontal sum per block.
    /// `lanes` has the rows' activations in that layout ([`super::Four`]); without it (one
    /// row) they are transposed from `x` as it goes. A last partial four is padded with zero
    /// blocks.
    ///
    /// # Safety
    /// Inlined only into fns enabling avx2, fma and f16c, plus avxvnni when `DOT == AVXVNNI` and
    /// avx512vnni + avx512vl when `DOT == AVX512VNNI`.
    #[inline(always)]
    unsafe fn quad_body<const T: u8, const DOT: u8, const R: usize>(
        w: &[u8],
        lanes: Option<&[super::LaneRow]>,
        x: &[BlockQ8],
    ) -> [f32; R] {
        let bb = lane_block_bytes(T);
        let nb = match lanes {
            Some(rows) if rows.len() >= R => rows[..R].iter().fold(w.len() / bb, |n, r| n.min(r.blocks)),
            Some(_) => 0,
            None => x.len().min(w.len() / bb),
        };
        // SAFETY: the caller enables the target features (see `# Safety`); every block read is
        // below `nb`: inside `w` and each row.
        unsafe {
            let d_idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
            let m_idx = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut corr = [_mm_setzero_ps(); R];
            for g in 0..nb.div_ceil(4) {
                // Blocks of this four in the row; the missing ones of a last partial four are
                // zeros (quants and scales alike).
                let have = (nb - 4 * g).min(4);
                let (v, dm) = if have == 4 {
                    weight_four::<T, true>(w.get_unchecked(4 * g * bb..(4 * g + 4) * bb), 4)
                } else {
                    weight_four::<T, false>(w.get_unchecked(4 * g * bb..(4 * g + have) * bb), have)
                };
                // The scales twice: one copy per 128-bit half of a block sum.
                let dw = _mm256_permutevar8x32_ps(dm, d_idx);
                let mw = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, m_idx));
                for k in 0..R {
                    let (y, dy, sy, sumy) = match lanes {
                        Some(rows) => {
                            let f = rows.get_unchecked(k).fours.get_unchecked(g);
                            let q = f.y.as_ptr();
                            (
                                [
                                    _mm256_loadu_si256(q.cast()),
                                    _mm256_loadu_si256(q.add(32).cast()),
                                    _mm256_loadu_si256(q.add(64).cast()),
                                    _mm256_loadu_si256(q.add(96).cast()),
                                ],
                                {
                                    let d = _mm_loadu_ps(f.d.as_ptr());
                                    _mm256_set_m128(d, d)
                                },
                                _mm_loadu_ps(f.s.as_ptr()),
                                _mm_loadu_si128(f.sum.as_ptr().cast()),
                            )
                        }
                        None => {
                            let blk = |b: usize| x.get(4 * g + b).filter(|_| 4 * g + b < nb).unwrap_or(&super::ZERO_Q8);
                            let (y0, y1, y2, y3) = (blk(0), blk(1), blk(2), blk(3));
                            (
                                transpose4([
                                    load_i8x32(&y0.qs),
                                    load_i8x32(&y1.qs),
                                    load_i8x32(&y2.qs),
                                    load_i8x32(&y3.qs),
                                ]),
                                _mm256_setr_ps(y0.d, y1.d, y2.d, y3.d, y0.d, y1.d, y2.d, y3.d),
                                _mm_setr_ps(y0.s, y1.s, y2.s, y3.s),
                                _mm_setr_epi32(y0.sum, y1.sum, y2.sum, y3.sum),
                            )
                        }
                    };
                    let z = _mm256_setzero_si256();
                    let a = dpbusd::<DOT>(dpbusd::<DOT>(z, v[0], y[0]), v[1], y[1]);
                    let b = dpbusd::<DOT>(dpbusd::<DOT>(z, v[2], y[2]), v[3], y[3]);
                    // Block b's sum is in lanes b and 4 + b: both halves are scaled and summed
                    // as they are (folded once, at the end), the offset taken off the first.
                    let mut s = _mm256_add_epi32(a, b);
                    let sumy = _mm256_zextsi128_si256(sumy);
                    s = match T {
                        0 => _mm256_sub_epi32(s, _mm256_slli_epi32::<7>(sumy)),
                        1 => _mm256_sub_epi32(s, _mm256_slli_epi32::<3>(sumy)),
                        3 => _mm256_sub_epi32(s, _mm256_slli_epi32::<4>(sumy)),
                        _ => s,
                    };
                    acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dy), _mm256_cvtepi32_ps(s), acc[k]);
                    if T == 2 || T == 4 {
                        corr[k] = _mm_fmadd_ps(mw, sy, corr[k]);
                    }
                }
            }
            let mut out = [0f32; R];
            for k in 0..R {
                let (mut a, mut c) = ([0f32; 4], [0f32; 4]);
                let halves = _mm_add_ps(_mm256_castps256_ps128(acc[k]), _mm256_extractf128_ps::<1>(acc[k]));
                _mm_storeu_ps(a.as_mut_ptr(), halves);
                _mm_storeu_ps(c.as_mut_ptr(), corr[k]);
                let dot = (a[0] + a[1]) + (a[2] + a[3]);
                out[k] = if T == 2 || T == 4 { dot + ((c[0] + c[1]) + (c[2] + c[3])) } else { dot };
            }
            out
        }
    }

    /// How [`multi_body`] does a block's integer dot: `vpmaddubsw` + `vpmaddwd` (AVX2) or one
    /// `vpdpbusd` in either encoding.
    const MADD: u8 = 0;
    pub(crate) const AVXVNNI: u8 = 1;
    pub(crate) const AVX512VNNI: u8 = 2;

    /// The encoding of `vpdpbusd` this machine has, once [`Isa::AvxVnni`] was detected.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Vnni {
        Avx,
        Avx512,
    }

    pub(crate) fn vnni_encoding() -> Vnni {
        if std::arch::is_x86_feature_detected!("avxvnni") { Vnni::Avx } else { Vnni::Avx512 }
    }

    /// # Safety
    /// Inlined only into fns enabling avx2, fma and f16c, plus avxvnni when `DOT == AVXVNNI` and
    /// avx512vnni + avx512vl when `DOT == AVX512VNNI`.
    #[inline(always)]
    unsafe fn multi_body<const T: u8, const DOT: u8, const N: usize>(w: &[u8], x: &[&[BlockQ8]; N]) -> [f32; N] {
        // SAFETY: the caller enables the target features (see `# Safety`); slices are whole blocks.
        #[allow(unused_unsafe)]
        unsafe {
            let bb = match T {
                0 => 34,
                1 | 5 => 18,
                2 => 20,
                3 => 22,
                _ => 24,
            };
            let mut acc = [_mm256_setzero_ps(); N];
            let mut corr = [0f32; N];
            for (i, b) in w.chunks_exact(bb).enumerate() {
                // (unsigned weight bytes, sign source for the activations, d, min)
                let (u, sgn, d, m) = match T {
                    0 => {
                        // SAFETY: b[2..34] is 32 bytes.
                        let qx = unsafe { load32(&b[2..34]) };
                        (_mm256_sign_epi8(qx, qx), Some(qx), h2f(b, 0), 0.0)
                    }
                    1 => {
                        // SAFETY: b[2..18] is the block's 16 nibble bytes.
                        (unsafe { nibbles(&b[2..18]) }, None, h2f(b, 0), 0.0)
                    }
                    2 => {
                        let (d, m) = h2f_pair(b);
                        // SAFETY: b[4..20] is the block's 16 nibble bytes.
                        (unsafe { nibbles(&b[4..20]) }, None, d, m)
                    }
                    3 | 4 => {
                        let h = if T == 3 { 2 } else { 4 };
                        let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                        // SAFETY: b[h + 4..h + 20] is the block's 16 nibble bytes.
                        let q = _mm256_or_si256(unsafe { nibbles(&b[h + 4..h + 20]) }, q5_high_bits(qh));
                        let (d, m) = if T == 3 { (h2f(b, 0), 0.0) } else { h2f_pair(b) };
                        (q, None, d, m)
                    }
                    _ => {
                        // SAFETY: b[2..18] is the block's 16 nibble bytes.
                        let v = unsafe { iq4_nl_values(&b[2..18]) };
                        (_mm256_sign_epi8(v, v), Some(v), h2f(b, 0), 0.0)
                    }
                };
                for k in 0..N {
                    let y = &x[k][i];
                    let mut qy = load_i8x32(&y.qs);
                    if let Some(s) = sgn {
                        qy = _mm256_sign_epi8(qy, s);
                    }
                    let p = match DOT {
                        AVXVNNI => _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, qy)),
                        AVX512VNNI => _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, qy)),
                        _ => _mm256_cvtepi32_ps(dot_u8i8(u, qy)),
                    };
                    let dd = d * y.d;
                    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(dd), p, acc[k]);
                    match T {
                        0 | 5 => {}
                        1 => corr[k] -= dd * (8 * y.sum) as f32,
                        3 => corr[k] -= dd * (16 * y.sum) as f32,
                        _ => corr[k] += m * y.s,
                    }
                }
            }
            let mut out = [0f32; N];
            for k in 0..N {
                out[k] = hsum_ps(acc[k]) + corr[k];
            }
            out
        }
    }

    /// Q8_0 (`T = 0`), Q4_0 (`T = 1`), Q4_1 (`T = 2`) with AVX-512: two blocks per 512-bit
    /// register (8 i32 lanes each), per-block scales in the two 256-bit halves.
    ///
    /// # Safety
    /// Needs avx512f, avx512bw, avx2, fma and f16c.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn q32_avx512<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = match T {
            0 => 34,
            1 => 18,
            _ => 20,
        };
        // Unsigned weight bytes and the activations (sign-adjusted for Q8_0) of one block.
        let block = |b: &[u8], y: &BlockQ8| -> (__m256i, __m256i) {
            let qy = load_i8x32(&y.qs);
            match T {
                0 => {
                    // SAFETY: b[2..34] is 32 bytes; the features are those of the enclosing fn.
                    let qx = unsafe { load32(&b[2..34]) };
                    (_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
                }
                // SAFETY: the block's 16 nibble bytes; features as above.
                1 => (unsafe { nibbles(&b[2..18]) }, qy),
                // SAFETY: as above.
                _ => (unsafe { nibbles(&b[4..20]) }, qy),
            }
        };
        let mut acc = _mm512_setzero_ps();
        let mut corr = [0f32; 2];
        let pairs = w.chunks_exact(2 * bb).zip(x.chunks_exact(2));
        let nb = pairs.len() * 2;
        for (b, y) in pairs {
            let (b0, b1) = b.split_at(bb);
            let (u0, s0) = block(b0, &y[0]);
            let (u1, s1) = block(b1, &y[1]);
            let u = _mm512_inserti64x4(_mm512_castsi256_si512(u0), u1, 1);
            let v = _mm512_inserti64x4(_mm512_castsi256_si512(s0), s1, 1);
            let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1)));
            let mut d = [0f32; 2];
            for k in 0..2 {
                let (bk, yk) = (&b[bb * k..bb * (k + 1)], &y[k]);
                if T == 2 {
                    let (dk, mk) = h2f_pair(bk);
                    d[k] = dk * yk.d;
                    corr[k] += mk * yk.s;
                } else {
                    d[k] = h2f(bk, 0) * yk.d;
                    if T == 1 {
                        corr[k] -= d[k] * (8 * yk.sum) as f32;
                    }
                }
            }
            let dv = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(d[0]))),
                _mm256_castps_pd(_mm256_set1_ps(d[1])),
                1,
            ));
            acc = _mm512_fmadd_ps(dv, p, acc);
        }
        let mut total = _mm512_reduce_add_ps(acc) + corr[0] + corr[1];
        if nb < x.len().min(w.len() / bb) {
            // SAFETY: the features of this fn include those of the AVX2 kernels.
            total += unsafe {
                match T {
                    0 => q8_0_avx2(&w[bb * nb..], &x[nb..]),
                    1 => q4_x_avx2::<false>(&w[bb * nb..], &x[nb..]),
                    _ => q4_x_avx2::<true>(&w[bb * nb..], &x[nb..]),
                }
            };
        }
        total
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 bytes at `p`.
    ///
    /// # Safety
    /// `p` must have 32 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load32(p: &[u8]) -> __m256i {
        debug_assert!(p.len() >= 32);
        // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment requirement.
        unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
    }

    /// 32 signed quants of an activation block, as a vector.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load_i8x32(q: &[i8; 32]) -> __m256i {
        // SAFETY: `q` is exactly 32 bytes.
        unsafe { _mm256_loadu_si256(q.as_ptr().cast()) }
    }

    /// Σ over pairs of u8·i8 products into 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_u8i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_avx2(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 4);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, so 16 floats are readable from both rows.
            unsafe {
                let wp = w.as_ptr().add(4 * i).cast::<f32>();
                let xp = x.as_ptr().add(i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp), _mm256_loadu_ps(xp), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(8)), _mm256_loadu_ps(xp.add(8)), a1);
            }
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(a0, a1));
        for (c, v) in w[4 * i..].chunks_exact(4).zip(&x[i..n]) {
            s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v;
        }
        s
    }

    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_avx2(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 2);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n: 32 bytes of halves and 16 floats are readable.
            unsafe {
                let wp = w.as_ptr().add(2 * i);
                let xp = x.as_ptr().add(i);
                let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.cast()));
                let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(16).cast()));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a1);
            }
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(a0, a1));
        for (c, v) in w[2 * i..].chunks_exact(2).zip(&x[i..n]) {
            s += f16_at(c, 0) * v;
        }
        s
    }

    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_avx2(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 2);
        let mut a0 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n: 16 bytes of bf16 and 8 floats are readable.
            unsafe {
                let h = _mm_loadu_si128(w.as_ptr().add(2 * i).cast());
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), a0);
            }
            i += 8;
        }
        let mut s = hsum_ps(a0);
        for (c, v) in w[2 * i..].chunks_exact(2).zip(&x[i..n]) {
            s += half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * v;
        }
        s
    }

    /// The f16 at `b[i..i + 2]` through F16C.
    #[inline]
    #[target_feature(enable = "f16c")]
    fn h2f(b: &[u8], i: usize) -> f32 {
        let v = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(v))))
    }

    /// The two f16 at `b[0..4]` (scale, min) through F16C.
    #[inline]
    #[target_feature(enable = "f16c")]
    fn h2f_pair(b: &[u8]) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// Q8_0 block: (integer products in 8 lanes, combined scale).
    ///
    /// # Safety
    /// `b` must be a whole 34-byte block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_block(b: &[u8], y: &BlockQ8) -> (__m256, f32) {
        // SAFETY: b[2..34] is 32 bytes.
        let qx = unsafe { load32(&b[2..34]) };
        let qy = load_i8x32(&y.qs);
        // |x| as unsigned times y carrying x's sign: exact since |y| <= 127.
        let p = dot_u8i8(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
        (_mm256_cvtepi32_ps(p), h2f(b, 0) * y.d)
    }

    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_avx2(w: &[u8], x: &[BlockQ8]) -> f32 {
        // Two independent accumulators: the FMA latency chain would otherwise bound the loop.
        let mut acc = [_mm256_setzero_ps(); 2];
        let pairs = w.chunks_exact(68).zip(x.chunks_exact(2));
        let nb = pairs.len() * 2;
        for (b, y) in pairs {
            for k in 0..2 {
                // SAFETY: b[34k..34k + 34] is a whole block.
                let (p, d) = unsafe { q8_0_block(&b[34 * k..34 * k + 34], &y[k]) };
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[k]);
            }
        }
        for (b, y) in w[34 * nb..].chunks_exact(34).zip(&x[nb..]) {
            // SAFETY: a whole block.
            let (p, d) = unsafe { q8_0_block(b, y) };
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[0]);
        }
        hsum_ps(_mm256_add_ps(acc[0], acc[1]))
    }

    /// 16 bytes of ggml nibbles → 32 bytes: low nibbles (elements 0..16), then high (16..32).
    ///
    /// # Safety
    /// `p` must have 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: &[u8]) -> __m256i {
        debug_assert!(p.len() >= 16);
        // SAFETY: the caller guarantees 16 readable bytes.
        let v = unsafe { _mm_loadu_si128(p.as_ptr().cast()) };
        let m = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
    }

    /// Q4_0 / Q4_1 block: (Σ nibble·y in 8 lanes as floats, d·d_y, scalar correction).
    ///
    /// # Safety
    /// `b` must be a whole block (18 bytes for Q4_0, 20 for Q4_1).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_x_block<const MIN: bool>(b: &[u8], y: &BlockQ8) -> (__m256, f32, f32) {
        let off = if MIN { 4 } else { 2 };
        // SAFETY: b[off..off + 16] is the block's 16 nibble bytes.
        let q = unsafe { nibbles(&b[off..off + 16]) };
        let p = _mm256_cvtepi32_ps(dot_u8i8(q, load_i8x32(&y.qs)));
        if MIN {
            let (d, m) = h2f_pair(b);
            (p, d * y.d, m * y.s)
        } else {
            let d = h2f(b, 0) * y.d;
            (p, d, -d * (8 * y.sum) as f32)
        }
    }

    /// 32 bytes, byte j = 0x10 where bit j of `qh` is set, else 0 (ggml's `bytes_from_bits_32`):
    /// bit 4 of the Q5 values, in the element order of [`nibbles`].
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q5_high_bits(qh: u32) -> __m256i {
        // Byte j gets byte j/8 of qh, then all bits but bit j%8 are forced on.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let set = _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
            _mm256_set1_epi64x(-1),
        );
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// The 32 signed IQ4_NL values of a block's 16 nibble bytes: the table in both 128-bit lanes,
    /// each nibble looked up within its lane by `vpshufb`.
    ///
    /// # Safety
    /// `p` must have 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn iq4_nl_values(p: &[u8]) -> __m256i {
        // SAFETY: the table is 16 bytes.
        let t = unsafe { _mm_loadu_si128(IQ4_NL_VALUES.as_ptr().cast()) };
        // SAFETY: the caller guarantees 16 readable bytes.
        _mm256_shuffle_epi8(_mm256_set_m128i(t, t), unsafe { nibbles(p) })
    }

    /// Q5_0 (`T = 0`), Q5_1 (`T = 1`), IQ4_NL (`T = 2`) block: (Σ q·y in 8 lanes as floats,
    /// d·d_y, scalar correction).
    ///
    /// # Safety
    /// `b` must be a whole block (22, 24 or 18 bytes).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_nl_block<const T: u8>(b: &[u8], y: &BlockQ8) -> (__m256, f32, f32) {
        let qy = load_i8x32(&y.qs);
        match T {
            0 | 1 => {
                let h = if T == 0 { 2 } else { 4 };
                // SAFETY: b[h + 4..h + 20] is the block's 16 nibble bytes.
                let lo = unsafe { nibbles(&b[h + 4..h + 20]) };
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let q = _mm256_or_si256(lo, q5_high_bits(qh));
                let p = _mm256_cvtepi32_ps(dot_u8i8(q, qy));
                if T == 0 {
                    let d = h2f(b, 0) * y.d;
                    (p, d, -d * (16 * y.sum) as f32)
                } else {
                    let (d, m) = h2f_pair(b);
                    (p, d * y.d, m * y.s)
                }
            }
            _ => {
                // SAFETY: b[2..18] is the block's 16 nibble bytes.
                let v = unsafe { iq4_nl_values(&b[2..18]) };
                // Signed × signed as in Q8_0: |v| times y carrying v's sign (|y| ≤ 127: exact).
                let p = dot_u8i8(_mm256_sign_epi8(v, v), _mm256_sign_epi8(qy, v));
                (_mm256_cvtepi32_ps(p), h2f(b, 0) * y.d, 0.0)
            }
        }
    }

    /// Q5_0 (`T = 0`, offset −16), Q5_1 (`T = 1`, f16 min) and IQ4_NL (`T = 2`, table).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_nl_avx2<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = match T {
            0 => 22,
            1 => 24,
            _ => 18,
        };
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut corr = [0f32; 2];
        let pairs = w.chunks_exact(2 * bb).zip(x.chunks_exact(2));
        let nb = pairs.len() * 2;
        for (b, y) in pairs {
            for k in 0..2 {
                // SAFETY: b[bb·k..bb·(k + 1)] is a whole block.
                let (p, d, c) = unsafe { q5_nl_block::<T>(&b[bb * k..bb * (k + 1)], &y[k]) };
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[k]);
                corr[k] += c;
            }
        }
        for (b, y) in w[bb * nb..].chunks_exact(bb).zip(&x[nb..]) {
            // SAFETY: a whole block.
            let (p, d, c) = unsafe { q5_nl_block::<T>(b, y) };
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[0]);
            corr[0] += c;
        }
        hsum_ps(_mm256_add_ps(acc[0], acc[1])) + (corr[0] + corr[1])
    }

    /// Q4_0 (`MIN = false`, offset −8) and Q4_1 (`MIN = true`, f16 min).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_x_avx2<const MIN: bool>(w: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = if MIN { 20 } else { 18 };
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut corr = [0f32; 2];
        let pairs = w.chunks_exact(2 * bb).zip(x.chunks_exact(2));
        let nb = pairs.len() * 2;
        for (b, y) in pairs {
            for k in 0..2 {
                // SAFETY: b[bb·k..bb·(k + 1)] is a whole block.
                let (p, d, c) = unsafe { q4_x_block::<MIN>(&b[bb * k..bb * (k + 1)], &y[k]) };
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[k]);
                corr[k] += c;
            }
        }
        for (b, y) in w[bb * nb..].chunks_exact(bb).zip(&x[nb..]) {
            // SAFETY: a whole block.
            let (p, d, c) = unsafe { q4_x_block::<MIN>(b, y) };
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc[0]);
            corr[0] += c;
        }
        hsum_ps(_mm256_add_ps(acc[0], acc[1])) + (corr[0] + corr[1])
    }

    /// The quants of chunk `c` (64 elements) of a Q4_K (`HIGH = false`) or Q5_K block `b`: the
    /// low nibbles (its first 32) and the high ones (its last 32), with bit 4 from `qh` for Q5_K.
    ///
    /// # Safety
    /// Needs avx2; `b` is a whole block, `c < 4`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_chunk<const HIGH: bool>(b: &[u8], qh: __m256i, c: usize) -> (__m256i, __m256i) {
        let (m4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
        let qs_off = if HIGH { 48 } else { 16 };
        // SAFETY: 32 nibble bytes of chunk c lie within the block.
        let q = unsafe { load32(&b[qs_off + 32 * c..qs_off + 32 * c + 32]) };
        let mut lo = _mm256_and_si256(q, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if HIGH {
            let h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32)), one);
            let h2 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32 + 1)), one);
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(h1, 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(h2, 4));
        }
        (lo, hi)
    }

    /// The 6-bit quants of half `h` (128 elements) of a Q6_K block `b`, as four vectors of 32.
    ///
    /// # Safety
    /// Needs avx2; `b` is a whole block, `h < 2`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_quarters(b: &[u8], h: usize) -> [__m256i; 4] {
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        // SAFETY: ql half = 64 bytes at 64h, qh half = 32 bytes at 128 + 32h, in the block.
        let (qa, qb, qh) = unsafe { (load32(&b[64 * h..]), load32(&b[64 * h + 32..]), load32(&b[128 + 32 * h..])) };
        [
            _mm256_or_si256(_mm256_and_si256(qa, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
            _mm256_or_si256(_mm256_and_si256(qb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), _mm256_and_si256(qh, m30)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
            ),
        ]
    }

    /// Q4_K (`HIGH = false`) and Q5_K (`HIGH = true`, bit 4 from `qh`).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_avx2<const HIGH: bool>(w: &[u8], x: &[BlockQ8K]) -> f32 {
        let bb = if HIGH { 176 } else { 144 };
        let mut acc = _mm256_setzero_ps();
        let mut corr = 0f32;
        for (b, y) in w.chunks_exact(bb).zip(x) {
            let (sc, summ) = k_scales(&b[4..16], y);
            // SAFETY: for Q5_K b[16..48] is the 32-byte `qh`; for Q4_K it is part of `qs`, unused.
            let qh = unsafe { load32(&b[16..48]) };
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                // SAFETY: the block is whole (`chunks_exact`).
                let (lo, hi) = unsafe { qk_chunk::<HIGH>(b, qh, c) };
                // SAFETY: y.qs has 256 bytes; 64c + 64 <= 256.
                let (y0, y1) = unsafe {
                    (
                        _mm256_loadu_si256(y.qs.as_ptr().add(64 * c).cast()),
                        _mm256_loadu_si256(y.qs.as_ptr().add(64 * c + 32).cast()),
                    )
                };
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16(sc[2 * c] as i16));
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), _mm256_set1_epi16(sc[2 * c + 1] as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
            }
            let (d, dmin) = h2f_pair(b);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc);
            corr -= dmin * y.d * summ as f32;
        }
        hsum_ps(acc) + corr
    }

    /// # Safety
    /// Needs avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_avx2(w: &[u8], x: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut corr = 0f32;
        for (b, y) in w.chunks_exact(210).zip(x) {
            let sc = &b[192..208];
            let mut offs = 0i32;
            for (k, &s) in sc.iter().enumerate() {
                offs += i32::from(s as i8) * i32::from(y.bsums[k]);
            }
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                // SAFETY: the block is whole (`chunks_exact`), `h < 2`.
                let quarters = unsafe { q6_quarters(b, h) };
                for (r, q) in quarters.into_iter().enumerate() {
                    let k = 8 * h + 2 * r;
                    // SAFETY: 128h + 32r + 32 <= 256 bytes of y.qs.
                    let yv = unsafe { _mm256_loadu_si256(y.qs.as_ptr().add(128 * h + 32 * r).cast()) };
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(sc[k + 1] as i8)),
                        _mm_set1_epi16(i16::from(sc[k] as i8)),
                    );
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), s));
                }
            }
            let d = h2f(b, 208) * y.d;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            corr -= d * (32 * offs) as f32;
        }
        hsum_ps(acc) + corr
    }

    /// [`qk_avx2`] for `N` token rows: each block's quants decoded once for the rows, each row's
    /// integer sums and float steps exactly its own call's (the same bits).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c; each row of `x` has a block per 256 weights of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_rows<const HIGH: bool, const N: usize>(w: &[u8], x: &[&[BlockQ8K]; N]) -> [f32; N] {
        let bb = if HIGH { 176 } else { 144 };
        let mut acc = [_mm256_setzero_ps(); N];
        let mut corr = [0f32; N];
        for (i, b) in w.chunks_exact(bb).enumerate() {
            // The scales and mins are the weights' own; `summ` (the mins against a row's block
            // sums) is a row's: the integers `k_scales` gives.
            let (mut sc, mut mins) = ([0i32; 8], [0i32; 8]);
            for (j, (s, m)) in sc.iter_mut().zip(&mut mins).enumerate() {
                let (scale, min) = k_scale_min(j, &b[4..16]);
                (*s, *m) = (i32::from(scale), i32::from(min));
            }
            // SAFETY: for Q5_K b[16..48] is the 32-byte `qh`; for Q4_K it is part of `qs`, unused.
            let qh = unsafe { load32(&b[16..48]) };
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                // SAFETY: the block is whole (`chunks_exact`).
                let (lo, hi) = unsafe { qk_chunk::<HIGH>(b, qh, c) };
                let (s0, s1) = (_mm256_set1_epi16(sc[2 * c] as i16), _mm256_set1_epi16(sc[2 * c + 1] as i16));
                for (r, row) in x.iter().enumerate() {
                    let y = &row[i];
                    // SAFETY: y.qs has 256 bytes; 64c + 64 <= 256.
                    let (y0, y1) = unsafe {
                        (
                            _mm256_loadu_si256(y.qs.as_ptr().add(64 * c).cast()),
                            _mm256_loadu_si256(y.qs.as_ptr().add(64 * c + 32).cast()),
                        )
                    };
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), s0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), s1);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
                }
            }
            let (d, dmin) = h2f_pair(b);
            for (r, row) in x.iter().enumerate() {
                let y = &row[i];
                let mut summ = 0i32;
                for (j, m) in mins.iter().enumerate() {
                    summ += m * (i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                corr[r] -= dmin * y.d * summ as f32;
            }
        }
        let mut out = [0f32; N];
        for (o, (a, c)) in out.iter_mut().zip(acc.iter().zip(&corr)) {
            *o = hsum_ps(*a) + c;
        }
        out
    }

    /// [`q6_k_avx2`] for `N` token rows: each block's 6-bit quants assembled once for the rows,
    /// each row's sums and float steps exactly its own call's (the same bits).
    ///
    /// # Safety
    /// Needs avx2, fma and f16c; each row of `x` has a block per 256 weights of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_rows<const N: usize>(w: &[u8], x: &[&[BlockQ8K]; N]) -> [f32; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut corr = [0f32; N];
        for (i, b) in w.chunks_exact(210).enumerate() {
            let sc = &b[192..208];
            let mut sumi = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                // SAFETY: the block is whole (`chunks_exact`), `h < 2`.
                let quarters = unsafe { q6_quarters(b, h) };
                for (q4, q) in quarters.into_iter().enumerate() {
                    let k = 8 * h + 2 * q4;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(sc[k + 1] as i8)),
                        _mm_set1_epi16(i16::from(sc[k] as i8)),
                    );
                    for (r, row) in x.iter().enumerate() {
                        // SAFETY: 128h + 32q4 + 32 <= 256 bytes of y.qs.
                        let yv = unsafe { _mm256_loadu_si256(row[i].qs.as_ptr().add(128 * h + 32 * q4).cast()) };
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), s));
                    }
                }
            }
            let dw = h2f(b, 208);
            for (r, row) in x.iter().enumerate() {
                let y = &row[i];
                let mut offs = 0i32;
                for (k, &s) in sc.iter().enumerate() {
                    offs += i32::from(s as i8) * i32::from(y.bsums[k]);
                }
                let d = dw * y.d;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                corr[r] -= d * (32 * offs) as f32;
            }
        }
        let mut out = [0f32; N];
        for (o, (a, c)) in out.iter_mut().zip(acc.iter().zip(&corr)) {
            *o = hsum_ps(*a) + c;
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! NEON kernels for the float rows and the 32-element block types (Q8_0, Q4_0, Q4_1); the
    //! K-quants keep their scalar code on aarch64. `DOT` variants use the dotprod extension's
    //! `sdot` through inline assembly (its intrinsic, `vdotq_s32`, is not stable Rust); the others
    //! widen with `smull`/`smlal2` and add pairwise with `sadalp`. Both give the exact integer sums
    //! of the scalar code; only the f32 accumulation order differs.

    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{BlockQ8, Kernel, Kernel4, QuantType, TOKENS, f32s, q8};
    use crate::neon::{f16_one, f16_pair, f16x8_to_f32};

    /// The NEON kernel for `ty`, `None` where only scalar code exists (the K-quants).
    pub(super) fn kernel(ty: QuantType, dot: bool) -> Option<Kernel> {
        if dot {
            // SAFETY (every closure here): `dot` is only true once `Isa::NeonDot` was detected
            // (neon and dotprod), all the features these functions enable.
            match ty {
                QuantType::Q8_0 => return Some(|w, x| unsafe { q32_dot::<0>(w, q8(x)) }),
                QuantType::Q4_0 => return Some(|w, x| unsafe { q32_dot::<1>(w, q8(x)) }),
                QuantType::Q4_1 => return Some(|w, x| unsafe { q32_dot::<2>(w, q8(x)) }),
                _ => {}
            }
        }
        // SAFETY (every closure below): only handed out once `Isa::Neon` was detected.
        Some(match ty {
            QuantType::F32 => |w, x| unsafe { f32_neon(w, f32s(x)) },
            QuantType::F16 => |w, x| unsafe { f16_neon(w, f32s(x)) },
            QuantType::BF16 => |w, x| unsafe { bf16_neon(w, f32s(x)) },
            QuantType::Q8_0 => |w, x| unsafe { q32_neon::<0>(w, q8(x)) },
            QuantType::Q4_0 => |w, x| unsafe { q32_neon::<1>(w, q8(x)) },
            QuantType::Q4_1 => |w, x| unsafe { q32_neon::<2>(w, q8(x)) },
            QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::IQ4_NL
            | QuantType::Q4_K
            | QuantType::Q5_K
            | QuantType::Q6_K => return None,
        })
    }

    /// The NEON multi-token kernel for `ty` (Q8_0, Q4_0, Q4_1).
    pub(super) fn kernel4(ty: QuantType, dot: bool) -> Option<Kernel4> {
        if dot {
            // SAFETY (every closure here): as in `kernel`, `dot` means neon and dotprod.
            return match ty {
                QuantType::Q8_0 => Some(|w, x| unsafe { multi_dot::<0>(w, &x.map(q8)) }),
                QuantType::Q4_0 => Some(|w, x| unsafe { multi_dot::<1>(w, &x.map(q8)) }),
                QuantType::Q4_1 => Some(|w, x| unsafe { multi_dot::<2>(w, &x.map(q8)) }),
                _ => None,
            };
        }
        // SAFETY (every closure below): only handed out once `Isa::Neon` was detected.
        match ty {
            QuantType::Q8_0 => Some(|w, x| unsafe { multi_neon::<0>(w, &x.map(q8)) }),
            QuantType::Q4_0 => Some(|w, x| unsafe { multi_neon::<1>(w, &x.map(q8)) }),
            QuantType::Q4_1 => Some(|w, x| unsafe { multi_neon::<2>(w, &x.map(q8)) }),
            _ => None,
        }
    }

    /// Bytes per block of Q8_0 (`T = 0`), Q4_0 (`T = 1`) or Q4_1 (`T = 2`).
    const fn block_bytes(t: u8) -> usize {
        match t {
            0 => 34,
            1 => 18,
            _ => 20,
        }
    }

    /// 16 bytes of `b` from `off`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn load16(b: &[u8], off: usize) -> uint8x16_t {
        let s = &b[off..off + 16];
        // SAFETY: `s` is 16 readable bytes; `vld1q_u8` has no alignment requirement.
        unsafe { vld1q_u8(s.as_ptr()) }
    }

    /// The 32 quants of an activation block as two halves (elements 0..16, 16..32).
    #[inline]
    #[target_feature(enable = "neon")]
    fn load_y(q: &[i8; 32]) -> (int8x16_t, int8x16_t) {
        // SAFETY: `q` is 32 readable bytes.
        unsafe { (vld1q_s8(q.as_ptr()), vld1q_s8(q.as_ptr().add(16))) }
    }

    /// One weight block of type `T`: its 32 signed quants as two halves (elements 0..16, 16..32),
    /// its scale and its min (0 but for Q4_1). Q4_0's offset −8 is applied here, so every type's
    /// block product is plain `Σ q·y` (the same integer the scalar code ends up with).
    #[inline]
    #[target_feature(enable = "neon")]
    fn unpack<const T: u8>(b: &[u8]) -> (int8x16_t, int8x16_t, f32, f32) {
        match T {
            0 => {
                let (lo, hi) = (load16(b, 2), load16(b, 18));
                (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), f16_one(b, 0), 0.0)
            }
            1 => {
                let v = load16(b, 2);
                let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                let eight = vdupq_n_s8(8);
                (vsubq_s8(lo, eight), vsubq_s8(hi, eight), f16_one(b, 0), 0.0)
            }
            _ => {
                let v = load16(b, 4);
                let (d, m) = f16_pair(b);
                (vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)), d, m)
            }
        }
    }

    /// `acc` plus the 16 products `a·b`, four per lane.
    ///
    /// # Safety
    /// Inlined only into fns enabling neon, and dotprod when `DOT`.
    #[inline(always)]
    unsafe fn dot16<const DOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: the caller enables the features (see `# Safety`); `sdot` touches only the named
        // registers.
        unsafe {
            if DOT {
                let mut acc = acc;
                asm!(
                    "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                    inout(vreg) acc,
                    in(vreg) a,
                    in(vreg) b,
                    options(pure, nomem, nostack, preserves_flags)
                );
                acc
            } else {
                // Two products per i16 lane: at most 2·128·127, which fits.
                vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b))
            }
        }
    }

    /// `Σ q·y` of one block (quants in two halves) against an activation block, in four lanes.
    ///
    /// # Safety
    /// As [`dot16`].
    #[inline(always)]
    unsafe fn block_dot<const DOT: bool>(lo: int8x16_t, hi: int8x16_t, y: &[i8; 32]) -> float32x4_t {
        // SAFETY: as this fn's contract; `load_y` needs only neon.
        unsafe {
            let (y0, y1) = load_y(y);
            vcvtq_f32_s32(dot16::<DOT>(dot16::<DOT>(vdupq_n_s32(0), lo, y0), hi, y1))
        }
    }

    /// # Safety
    /// Needs neon.
    #[target_feature(enable = "neon")]
    unsafe fn q32_neon<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        // SAFETY: the features the body needs are this fn's.
        unsafe { q32_body::<T, false>(w, x) }
    }

    /// # Safety
    /// Needs neon and dotprod.
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn q32_dot<const T: u8>(w: &[u8], x: &[BlockQ8]) -> f32 {
        // SAFETY: the features the body needs are this fn's.
        unsafe { q32_body::<T, true>(w, x) }
    }

    /// One weight row of Q8_0 (`T = 0`), Q4_0 (`T = 1`) or Q4_1 (`T = 2`) against one token row.
    ///
    /// # Safety
    /// As [`dot16`].
    #[inline(always)]
    unsafe fn q32_body<const T: u8, const DOT: bool>(w: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = block_bytes(T);
        // SAFETY: as this fn's contract; slices are whole blocks.
        unsafe {
            // Two accumulators: the FMA latency chain would otherwise bound the loop.
            let mut acc = [vdupq_n_f32(0.0); 2];
            let mut corr = 0f32;
            let pairs = w.chunks_exact(2 * bb).zip(x.chunks_exact(2));
            let nb = pairs.len() * 2;
            for (b, y) in pairs {
                for k in 0..2 {
                    let (lo, hi, d, m) = unpack::<T>(&b[bb * k..bb * (k + 1)]);
                    acc[k] = vfmaq_n_f32(acc[k], block_dot::<DOT>(lo, hi, &y[k].qs), d * y[k].d);
                    if T == 2 {
                        corr += m * y[k].s;
                    }
                }
            }
            for (b, y) in w[bb * nb..].chunks_exact(bb).zip(&x[nb..]) {
                let (lo, hi, d, m) = unpack::<T>(b);
                acc[0] = vfmaq_n_f32(acc[0], block_dot::<DOT>(lo, hi, &y.qs), d * y.d);
                if T == 2 {
                    corr += m * y.s;
                }
            }
            vaddvq_f32(vaddq_f32(acc[0], acc[1])) + corr
        }
    }

    /// # Safety
    /// Needs neon.
    #[target_feature(enable = "neon")]
    unsafe fn multi_neon<const T: u8>(w: &[u8], x: &[&[BlockQ8]; TOKENS]) -> [f32; TOKENS] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { multi_body::<T, false>(w, x) }
    }

    /// # Safety
    /// Needs neon and dotprod.
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn multi_dot<const T: u8>(w: &[u8], x: &[&[BlockQ8]; TOKENS]) -> [f32; TOKENS] {
        // SAFETY: the features the body needs are this fn's.
        unsafe { multi_body::<T, true>(w, x) }
    }

    /// One weight row of type `T` against [`TOKENS`] token rows: each block is loaded and
    /// unpacked once, then multiplied with the tokens' blocks.
    ///
    /// # Safety
    /// As [`dot16`].
    #[inline(always)]
    unsafe fn multi_body<const T: u8, const DOT: bool>(w: &[u8], x: &[&[BlockQ8]; TOKENS]) -> [f32; TOKENS] {
        // SAFETY: as this fn's contract; slices are whole blocks.
        unsafe {
            let mut acc = [vdupq_n_f32(0.0); TOKENS];
            let mut corr = [0f32; TOKENS];
            for (i, b) in w.chunks_exact(block_bytes(T)).enumerate() {
                let (lo, hi, d, m) = unpack::<T>(b);
                for k in 0..TOKENS {
                    let y = &x[k][i];
                    acc[k] = vfmaq_n_f32(acc[k], block_dot::<DOT>(lo, hi, &y.qs), d * y.d);
                    if T == 2 {
                        corr[k] += m * y.s;
                    }
                }
            }
            std::array::from_fn(|k| vaddvq_f32(acc[k]) + corr[k])
        }
    }

    /// # Safety
    /// Needs neon.
    #[target_feature(enable = "neon")]
    unsafe fn f32_neon(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 4);
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 16 <= n, so 16 floats are readable from both rows (the weight
                // bytes as little-endian f32, which aarch64 Linux is; `vld1q_u8` is unaligned).
                let (wv, xv) = unsafe {
                    let wv = vreinterpretq_f32_u8(vld1q_u8(w.as_ptr().add(4 * (i + 4 * k))));
                    (wv, vld1q_f32(x.as_ptr().add(i + 4 * k)))
                };
                *a = vfmaq_f32(*a, wv, xv);
            }
            i += 16;
        }
        let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
        for (c, v) in w[4 * i..].chunks_exact(4).zip(&x[i..n]) {
            s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v;
        }
        s
    }

    /// # Safety
    /// Needs neon.
    #[target_feature(enable = "neon")]
    unsafe fn f16_neon(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 2);
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for k in 0..2 {
                // SAFETY: i + 16 <= n: 32 bytes of halves are readable (little endian, as
                // aarch64 Linux is; `vld1q_u8` is unaligned).
                let h = unsafe { vreinterpretq_u16_u8(vld1q_u8(w.as_ptr().add(2 * (i + 8 * k)))) };
                let (w0, w1) = f16x8_to_f32(h);
                // SAFETY: i + 16 <= n floats of `x` are readable.
                let (x0, x1) =
                    unsafe { (vld1q_f32(x.as_ptr().add(i + 8 * k)), vld1q_f32(x.as_ptr().add(i + 8 * k + 4))) };
                acc[2 * k] = vfmaq_f32(acc[2 * k], w0, x0);
                acc[2 * k + 1] = vfmaq_f32(acc[2 * k + 1], w1, x1);
            }
            i += 16;
        }
        let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
        for (c, v) in w[2 * i..].chunks_exact(2).zip(&x[i..n]) {
            s += f16_one(c, 0) * v;
        }
        s
    }

    /// # Safety
    /// Needs neon.
    #[target_feature(enable = "neon")]
    unsafe fn bf16_neon(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len().min(w.len() / 2);
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n: 16 bytes of bf16 and 8 floats are readable.
            let (h, x0, x1) = unsafe {
                let xp = x.as_ptr().add(i);
                (vreinterpretq_u16_u8(vld1q_u8(w.as_ptr().add(2 * i))), vld1q_f32(xp), vld1q_f32(xp.add(4)))
            };
            // A bf16 is the upper half of an f32.
            let w0 = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h)));
            let w1 = vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h));
            acc[0] = vfmaq_f32(acc[0], w0, x0);
            acc[1] = vfmaq_f32(acc[1], w1, x1);
            i += 8;
        }
        let mut s = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
        for (c, v) in w[2 * i..].chunks_exact(2).zip(&x[i..n]) {
            s += half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * v;
        }
        s
    }
}
