//! Dequantisation of ggml blocks to f32, following ggml's block layouts
//! (`block_q4_0`, `block_q4_1`, `block_q8_0`, `block_q4_K`, `block_q6_K`).

use half::{bf16, f16};
use rayon::prelude::*;

use super::types::GgmlType;

/// Below this many blocks, threads cost more than they save.
const PAR_MIN_BLOCKS: usize = 4096;
const PAR_CHUNK_BLOCKS: usize = 1024;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Converts `bytes` of type `ty` into `out`. Returns `false` (and leaves `out` alone) when the
/// type is unsupported or the lengths disagree; callers check both beforehand for good errors.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !ty.can_dequantize() || !out.len().is_multiple_of(ty.block_elems) {
        return false;
    }
    let blocks = out.len() / ty.block_elems;
    if blocks.checked_mul(ty.block_bytes) != Some(bytes.len()) {
        return false;
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty.id {
        0 => |b, o| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        },
        1 => |b, o| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        },
        30 => |b, o| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *x = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        },
        2 => q4_0,
        3 => q4_1,
        8 => q8_0,
        12 => q4_k,
        14 => q6_k,
        _ => return false,
    };
    // Scalar types are processed as runs of elements; their "block" is one element.
    let (elems, nbytes) = if ty.block_elems == 1 {
        (PAR_CHUNK_BLOCKS * 64, PAR_CHUNK_BLOCKS * 64 * ty.block_bytes)
    } else {
        (ty.block_elems, ty.block_bytes)
    };
    let run = |bytes: &[u8], out: &mut [f32]| {
        if ty.block_elems == 1 {
            block_fn(bytes, out);
        } else {
            for (b, o) in bytes.chunks_exact(nbytes).zip(out.chunks_exact_mut(elems)) {
                block_fn(b, o);
            }
        }
    };
    if blocks >= PAR_MIN_BLOCKS {
        let (ce, cb) =
            if ty.block_elems == 1 { (elems, nbytes) } else { (elems * PAR_CHUNK_BLOCKS, nbytes * PAR_CHUNK_BLOCKS) };
        out.par_chunks_mut(ce).zip(bytes.par_chunks(cb)).for_each(|(o, b)| run(b, o));
    } else {
        run(bytes, out);
    }
    true
}

/// `block_q4_0`: f16 scale, 16 bytes of nibbles; low nibbles are elements 0..16, high 16..32.
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: f16 scale, f16 min, 16 bytes of nibbles laid out as in `q4_0`.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        o[j] = (q & 0x0F) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// `block_q8_0`: f16 scale, 32 signed bytes.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..34]) {
        *x = q as i8 as f32 * d;
    }
}

/// 6-bit scale and min of sub-block `j` (0..8) packed in the 12 `scales` bytes of a Q4_K block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// `block_q4_K`: f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
/// Each 64-element chunk takes 32 bytes: low nibbles then high nibbles, each a 32-element sub-block.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let y = &mut o[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - min1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// `block_q6_K`: 128 bytes low nibbles `ql`, 64 bytes high 2-bit pairs `qh`, 16 signed scales, f16 d.
fn q6_k(b: &[u8], o: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let y = &mut o[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[is + k] as i8 as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}
