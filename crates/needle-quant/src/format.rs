//! ggml-compatible block formats and the scalar dequantizer.
//!
//! Byte layouts (little endian, blocks packed back to back without padding), as ggml defines them:
//!
//! | type | elems | bytes | layout |
//! |---|---|---|---|
//! | F32 | 1 | 4 | `f32` |
//! | F16 | 1 | 2 | IEEE half |
//! | BF16 | 1 | 2 | bfloat16 |
//! | Q8_0 | 32 | 34 | `d: f16`, `qs: [i8; 32]`; x = d·q |
//! | Q4_0 | 32 | 18 | `d: f16`, `qs: [u8; 16]`; element j < 16 is the low nibble of `qs[j]`, j ≥ 16 the high nibble of `qs[j-16]`; x = d·(q − 8) |
//! | Q4_1 | 32 | 20 | `d: f16`, `m: f16`, nibbles as Q4_0; x = d·q + m |
//! | Q5_0 | 32 | 22 | `d: f16`, `qh: u32`, `qs: [u8; 16]`; low 4 bits as Q4_0, bit 4 of element j is bit j of `qh`; x = d·(q − 16) |
//! | Q5_1 | 32 | 24 | `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`; q as Q5_0; x = d·q + m |
//! | IQ4_NL | 32 | 18 | `d: f16`, `qs: [u8; 16]`; nibbles as Q4_0 index [`IQ4_NL_VALUES`]; x = d·table[q] |
//! | Q4_K | 256 | 144 | `d, dmin: f16`, `scales: [u8; 12]` (8 packed 6-bit scale/min pairs), `qs: [u8; 128]`; 64-element chunk c uses bytes `32c..32c+32`, low nibbles = sub-block 2c, high = 2c+1; x = d·sc·q − dmin·m |
//! | Q5_K | 256 | 176 | `d, dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]`; as Q4_K plus bit 4 of element l of sub-block s is bit s of `qh[l]` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`; two 128-element halves; in half h, element 32r + l (l < 32) has low bits from `ql[64h + l + 32·(r odd)]` (low nibble for r < 2), high 2 bits = bits 2r..2r+2 of `qh[32h + l]`, scale `scales[(32r + l)/16 + 8h]`; x = d·sc·(q − 32) |

use half::{bf16, f16};

use crate::{Error, Result};

/// A ggml tensor element type needle handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-element blocks, f16 scale, 8-bit signed values.
    Q8_0,
    /// 32-element blocks, f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32-element blocks, f16 scale and min, 4-bit values.
    Q4_1,
    /// 32-element blocks, f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32-element blocks, f16 scale and min, 5-bit values.
    Q5_1,
    /// 32-element blocks, f16 scale, 4-bit indices into the non-linear [`IQ4_NL_VALUES`].
    IQ4_NL,
    /// 256-element super-blocks of 8 × 32 with 6-bit scales and mins, 4-bit values.
    Q4_K,
    /// As Q4_K with 5-bit values.
    Q5_K,
    /// 256-element super-blocks of 16 × 16 with 8-bit scales, 6-bit values offset by 32.
    Q6_K,
}

impl QuantType {
    /// Every supported type.
    pub const ALL: [QuantType; 12] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::IQ4_NL,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// The ggml / GGUF type id.
    pub const fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::IQ4_NL => 20,
            QuantType::BF16 => 30,
        }
    }

    /// The type of a ggml id, if supported.
    pub fn from_ggml_id(id: u32) -> Result<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_id() == id).ok_or(Error::UnsupportedType(id))
    }

    /// Elements per block (1 for the float types).
    pub const fn block_elems(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q8_0
            | QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::IQ4_NL => 32,
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 | QuantType::IQ4_NL => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// Whether this is a float type (F32, F16, BF16).
    pub const fn is_float(self) -> bool {
        self.block_elems() == 1
    }

    /// Bytes taken by `n` elements; an error naming `param` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, param: &'static str, n: usize) -> Result<usize> {
        let be = self.block_elems();
        if !n.is_multiple_of(be) {
            return Err(Error::NotBlockMultiple { param, got: n, ty: self, block: be });
        }
        (n / be).checked_mul(self.block_bytes()).ok_or_else(|| Error::Invalid { param, why: "too large".into() })
    }
}

/// The 16 values an IQ4_NL nibble indexes (ggml's `kvalues_iq4nl`): denser near zero, where
/// most weights are.
pub const IQ4_NL_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// The little-endian u32 at byte `i` of `b` (the `qh` high bits of Q5_0 / Q5_1 blocks).
#[inline]
pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The little-endian f16 at byte `i` of `b`, as f32 (the scales of every quantized block).
#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`; `out.len()` gives the element count.
pub fn dequantize_row(ty: QuantType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let nb = ty.bytes_for("out.len()", out.len())?;
    crate::check_len("bytes", bytes.len(), nb)?;
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    match ty {
        QuantType::F32 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QuantType::F16 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QuantType::BF16 => {
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            let f: fn(&[u8], &mut [f32]) = match ty {
                QuantType::Q8_0 => q8_0_block,
                QuantType::Q4_0 => q4_0_block,
                QuantType::Q4_1 => q4_1_block,
                QuantType::Q5_0 => q5_0_block,
                QuantType::Q5_1 => q5_1_block,
                QuantType::IQ4_NL => iq4_nl_block,
                QuantType::Q4_K => q4_k_block,
                QuantType::Q5_K => q5_k_block,
                QuantType::Q6_K => q6_k_block,
                // Converted by the arms above.
                QuantType::F32 | QuantType::F16 | QuantType::BF16 => return Ok(()),
            };
            for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
                f(b, o);
            }
        }
    }
    Ok(())
}

fn q8_0_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..34]) {
        *x = d * f32::from(q as i8);
    }
}

fn q4_0_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = o.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
        *l = d * f32::from(i16::from(q & 0x0F) - 8);
        *h = d * f32::from(i16::from(q >> 4) - 8);
    }
}

fn q4_1_block(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (lo, hi) = o.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..20]) {
        *l = d * f32::from(q & 0x0F) + m;
        *h = d * f32::from(q >> 4) + m;
    }
}

/// The 5-bit values of a Q5_0 / Q5_1 block from its `qh` (at byte `h`) and nibbles (at `h + 4`):
/// element j < 16 is the low nibble of `qs[j]` plus bit j of `qh` as bit 4, element j + 16 the
/// high nibble plus bit j + 16.
#[inline]
pub fn q5_values(b: &[u8], h: usize) -> [u8; 32] {
    let qh = u32_at(b, h);
    let mut q = [0u8; 32];
    for (j, &byte) in b[h + 4..h + 20].iter().enumerate() {
        q[j] = (byte & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (byte >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

fn q5_0_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, q) in o.iter_mut().zip(q5_values(b, 2)) {
        *x = d * f32::from(i16::from(q) - 16);
    }
}

fn q5_1_block(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (x, q) in o.iter_mut().zip(q5_values(b, 4)) {
        *x = d * f32::from(q) + m;
    }
}

fn iq4_nl_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = o.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
        *l = d * f32::from(IQ4_NL_VALUES[usize::from(q & 0x0F)]);
        *h = d * f32::from(IQ4_NL_VALUES[usize::from(q >> 4)]);
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) in the 12 packed bytes of a Q4_K/Q5_K block:
/// sub-blocks 0..4 keep theirs in the low 6 bits of bytes j and j+4; sub-blocks 4..8 keep the low
/// 4 bits in the nibbles of byte j+4 and the high 2 bits in the top bits of bytes j-4 and j.
#[inline]
pub fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn q4_k_block(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for c in 0..4 {
        let (s1, m1) = k_scale_min(2 * c, scales);
        let (s2, m2) = k_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        let (lo, hi) = o[64 * c..64 * c + 64].split_at_mut(32);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&qs[32 * c..32 * c + 32]) {
            *l = d1 * f32::from(q & 0x0F) - m1;
            *h = d2 * f32::from(q >> 4) - m2;
        }
    }
}

fn q5_k_block(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for c in 0..4 {
        let (s1, m1) = k_scale_min(2 * c, scales);
        let (s2, m2) = k_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        let (lo, hi) = o[64 * c..64 * c + 64].split_at_mut(32);
        for (l, ((x1, x2), &q)) in lo.iter_mut().zip(hi).zip(&qs[32 * c..32 * c + 32]).enumerate() {
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            *x1 = d1 * f32::from((q & 0x0F) | h1) - m1;
            *x2 = d2 * f32::from((q >> 4) | h2) - m2;
        }
    }
}

/// Q6_K: two 128-element halves. In half h, element `32r + l` (quarter r, l < 32) takes its low 4
/// bits from `ql[64h + l + 32·(r odd)]` (low nibble for r < 2, high otherwise) and its high 2
/// bits from bits `2r..2r+2` of `qh[32h + l]`; value q − 32, scale `scales[8h + 2r + l/16]`.
fn q6_k_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut o[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i16::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i16::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i16::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i16::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| f32::from(sc[is + k] as i8);
            y[l] = d * s(0) * f32::from(q1);
            y[l + 32] = d * s(2) * f32::from(q2);
            y[l + 64] = d * s(4) * f32::from(q3);
            y[l + 96] = d * s(6) * f32::from(q4);
        }
    }
}
