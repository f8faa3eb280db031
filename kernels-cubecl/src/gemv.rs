//! Quantized GEMV `y = W · x` straight from GGUF blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL,
//! the K-quants Q4_K, Q5_K, Q6_K, and F16 / BF16 rows.
//!
//! `W` is `rows × cols`, each row `cols / 32` ggml blocks packed back to back exactly as in the
//! GGUF file (see `needle_quant::format`), the whole matrix uploaded as bytes in
//! little-endian `u32` words (zero-padded to a whole word). Blocks of 34 (Q8_0) and 18 (Q4_0)
//! bytes are not word aligned, so the kernel extracts bytes from words; Q4_1 (20 bytes) is, and
//! its blocks are read a word at a time.
//! `x` is `cols` f32, `y` is `rows` f32.
//!
//! One cube per output row; its units stride over the row's 32-element groups (a block, or an
//! eighth of a K-quant super-block), each group dotted whole with its scale applied once
//! (`d·Σq·x` for Q8_0, `d·Σq·x + m·Σx` for Q4_1 and Q5_1, `d·sc·Σq·x − dmin·m·Σx` for
//! Q4_K/Q5_K, two scales per group for Q6_K), then a shared-memory tree sum (no plane
//! operations). Bytes are extracted from words, so no block needs to be word aligned.
//! f16 scales are decoded with integer ops: WGSL on lavapipe has no `f16`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use needle_quant::{IQ4_NL_VALUES, QuantType};

use crate::error::{Result, check_len, invalid, to_u32};
use crate::util::{cube_linear, empty_f32, grid_1d, read_f32, upload_f32};

/// Units per cube (power of two, for the tree sum).
pub(crate) const GEMV_UNITS: usize = 64;

/// Comptime tag of the weight format inside the kernel, and the bytes one 32-element group of
/// it spans in a row (a K-quant's 256-element super-block holds eight groups).
pub(crate) fn kind_of(ty: QuantType) -> Result<u32> {
    match ty {
        QuantType::Q8_0 => Ok(0),
        QuantType::Q4_0 => Ok(1),
        QuantType::Q4_1 => Ok(2),
        QuantType::Q5_0 => Ok(3),
        QuantType::Q5_1 => Ok(4),
        QuantType::IQ4_NL => Ok(5),
        QuantType::Q4_K => Ok(6),
        QuantType::Q5_K => Ok(7),
        QuantType::Q6_K => Ok(8),
        QuantType::F16 => Ok(9),
        QuantType::BF16 => Ok(10),
        QuantType::F32 => Err(invalid("ty", "F32 is not a block format: multiply it as a dense matrix")),
    }
}

/// Bytes of one 32-element group of format `kind` (K-quants: of the 256-element super-block
/// holding eight groups).
pub(crate) const fn group_bytes(kind: u32) -> usize {
    match kind {
        0 => 34,
        1 | 5 => 18,
        2 => 20,
        3 => 22,
        4 => 24,
        6 => 144,
        7 => 176,
        8 => 210,
        _ => 64,
    }
}

/// Sub-block `sub`'s 6-bit scale (low byte) and min (`<< 8`) from the 12 packed scale bytes of a
/// Q4_K/Q5_K super-block at byte `ks` (needle-quant's `k_scale_min`).
#[cube]
pub(crate) fn k_scale_min(w: &Array<u32>, ks: usize, sub: usize) -> u32 {
    let mut sc = byte_at(w, ks + sub) & 63;
    let mut m = byte_at(w, ks + sub + 4) & 63;
    if sub >= 4 {
        sc = (byte_at(w, ks + sub + 4) & 15) | ((byte_at(w, ks + sub - 4) >> 6) << 4);
        m = (byte_at(w, ks + sub + 4) >> 4) | ((byte_at(w, ks + sub) >> 6) << 4);
    }
    sc | (m << 8)
}

/// Element `l` (0..32) of group `sub` of the Q6_K super-block at byte `base`, unsigned (0..64;
/// the value is `q − 32`): half h = sub / 4, quarter r = sub % 4; low 4 bits from
/// `ql[64h + l + 32·(r odd)]` (high nibble for r ≥ 2), high 2 bits from bits 2r..2r+2 of
/// `qh[32h + l]`.
#[cube]
pub(crate) fn q6_k_group(w: &Array<u32>, base: usize, sub: usize, l: usize) -> u32 {
    let h = sub / 4;
    let r = sub % 4;
    let ql = base + 64 * h + 32 * (r % 2);
    let qh = base + 128 + 32 * h;
    let nib = ((r / 2) * 4) as u32;
    let hs = (2 * r) as u32;
    ((byte_at(w, ql + l) >> nib) & 15) | (((byte_at(w, qh + l) >> hs) & 3) << 4)
}

/// Byte `b` of the word buffer.
#[cube]
pub(crate) fn byte_at(w: &Array<u32>, b: usize) -> u32 {
    (w[b / 4] >> (((b % 4) * 8) as u32)) & 0xff
}

/// The little-endian `u32` at byte `b` (any alignment: Q5_0 / Q5_1's `qh`).
#[cube]
pub(crate) fn u32_at(w: &Array<u32>, b: usize) -> u32 {
    byte_at(w, b) | (byte_at(w, b + 1) << 8) | (byte_at(w, b + 2) << 16) | (byte_at(w, b + 3) << 24)
}

/// The little-endian f16 at byte `b`, as f32.
#[cube]
pub(crate) fn f16_at(w: &Array<u32>, b: usize) -> f32 {
    f16_bits_to_f32(byte_at(w, b) | (byte_at(w, b + 1) << 8))
}

/// f16 bits (low 16 bits of `h`) as f32: normals, subnormals, zero; inf/NaN keep their bits.
#[cube]
pub(crate) fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = h >> 15;
    let e = (h >> 10) & 31;
    let m = h & 1023;
    let mut mag = f32::reinterpret(((e + 112) << 23) | (m << 13));
    if e == 0 {
        // Subnormal: m · 2^-24.
        mag = f32::cast_from(m) * 5.960_464_5e-8;
    } else if e == 31 {
        mag = f32::reinterpret((255u32 << 23) | (m << 13));
    }
    let mut out = mag;
    if sign == 1 {
        out = -mag;
    }
    out
}

/// The signed value of byte `b` (an `i8`), as f32.
#[cube]
pub(crate) fn i8_at(w: &Array<u32>, b: usize) -> f32 {
    let byte = byte_at(w, b);
    let mut v = f32::cast_from(byte);
    if byte >= 128 {
        v -= 256.0;
    }
    v
}

/// One cube per row (along the x/y grid); see the module doc.
/// Units stride over the row's 32-element groups (a block of the 32-element formats, an eighth
/// of a K-quant super-block, 32 halves of F16/BF16). `lut` is IQ4_NL's table (unused otherwise).
#[cube(launch)]
pub fn gemv_q_kernel(
    w: &Array<u32>,
    x: &Array<f32>,
    lut: &Array<f32>,
    y: &mut Array<f32>,
    rows: u32,
    blocks_per_row: u32,
    #[comptime] kind: u32,
    #[comptime] units: usize,
) {
    let row = cube_linear();
    if row >= rows as usize {
        terminate!();
    }
    let u = UNIT_POS_X as usize;
    let nb = blocks_per_row as usize;
    // Bytes per 32 elements (K-quants: per super-block of 256).
    let block_bytes = comptime!(group_bytes(kind));
    let super_block = comptime!((6..=8).contains(&kind));
    let mut row_base = row * nb * block_bytes;
    if super_block {
        row_base = row * (nb / 8) * block_bytes;
    }
    let mut acc = 0.0f32;
    let mut b = u;
    while b < nb {
        let mut base = row_base + b * block_bytes;
        let mut sub = 0usize;
        if super_block {
            base = row_base + (b / 8) * block_bytes;
            sub = b % 8;
        }
        let xb = b * 32;
        if kind == 0 {
            let d = f16_at(w, base);
            let mut s = 0.0f32;
            for j in 0..32usize {
                s += i8_at(w, base + 2 + j) * x[xb + j];
            }
            acc += d * s;
        } else if kind == 2 {
            // Q4_1 blocks are 20 bytes, so word aligned: one load per 4 bytes.
            let wb = base / 4;
            let dm = w[wb];
            let d = f16_bits_to_f32(dm & 0xffff);
            let m = f16_bits_to_f32(dm >> 16);
            let mut s = 0.0f32;
            let mut sx = 0.0f32;
            #[unroll]
            for j in 0..4usize {
                let word = w[wb + 1 + j];
                #[unroll]
                for t in 0..4usize {
                    let byte = (word >> comptime!(8 * t as u32)) & 0xff;
                    let x0 = x[xb + 4 * j + t];
                    let x1 = x[xb + 4 * j + t + 16];
                    s += f32::cast_from(byte & 15) * x0 + f32::cast_from(byte >> 4) * x1;
                    sx += x0 + x1;
                }
            }
            acc += d * s + m * sx;
        } else if kind == 1 || kind == 5 {
            // Q4_0 (q − 8) and IQ4_NL (table[q]): a scale and 16 bytes of nibbles.
            let d = f16_at(w, base);
            let qs = base + 2;
            let mut s = 0.0f32;
            for j in 0..16usize {
                let byte = byte_at(w, qs + j);
                if kind == 1 {
                    s += (f32::cast_from(byte & 15) - 8.0) * x[xb + j]
                        + (f32::cast_from(byte >> 4) - 8.0) * x[xb + j + 16];
                } else {
                    s += lut[(byte & 15) as usize] * x[xb + j] + lut[(byte >> 4) as usize] * x[xb + j + 16];
                }
            }
            acc += d * s;
        } else if kind == 3 || kind == 4 {
            // Q5_0 (d, qh, qs; q − 16) and Q5_1 (d, m, qh, qs; d·q + m): bit j of qh is bit 4 of
            // element j.
            let d = f16_at(w, base);
            let mut m = 0.0f32;
            let mut h = base + 2;
            if kind == 4 {
                m = f16_at(w, base + 2);
                h = base + 4;
            }
            let qh = u32_at(w, h);
            let mut s = 0.0f32;
            let mut sx = 0.0f32;
            for j in 0..16usize {
                let byte = byte_at(w, h + 4 + j);
                let lo = (byte & 15) | (((qh >> j as u32) & 1) << 4);
                let hi = (byte >> 4) | (((qh >> (j as u32 + 16)) & 1) << 4);
                let x0 = x[xb + j];
                let x1 = x[xb + j + 16];
                s += f32::cast_from(lo) * x0 + f32::cast_from(hi) * x1;
                sx += x0 + x1;
            }
            if kind == 3 {
                acc += d * (s - 16.0 * sx);
            } else {
                acc += d * s + m * sx;
            }
        } else if kind == 6 || kind == 7 {
            // Q4_K / Q5_K: group `sub` is the low (even) or high (odd) nibbles of 32 bytes;
            // x = d·sc·q − dmin·m.
            let d = f16_at(w, base);
            let dmin = f16_at(w, base + 2);
            // Sub-block `sub`'s 6-bit scale and min (needle-quant's `k_scale_min`).
            let sm = k_scale_min(w, base + 4, sub);
            let sc = f32::cast_from(sm & 255);
            let m = f32::cast_from(sm >> 8);
            let c = sub / 2;
            let shift = ((sub % 2) * 4) as u32;
            let mut qs = base + 16 + 32 * c;
            if kind == 7 {
                qs = base + 48 + 32 * c;
            }
            let mut s = 0.0f32;
            let mut sx = 0.0f32;
            for l in 0..32usize {
                let mut q = (byte_at(w, qs + l) >> shift) & 15;
                if kind == 7 {
                    q |= ((byte_at(w, base + 16 + l) >> sub as u32) & 1) << 4;
                }
                let xv = x[xb + l];
                s += f32::cast_from(q) * xv;
                sx += xv;
            }
            acc += d * sc * s - dmin * m * sx;
        } else if kind == 8 {
            // Q6_K: group `sub` = half h, quarter r; element l's low 4 bits from
            // ql[64h + l + 32·(r odd)] (high nibble for r ≥ 2), high 2 bits from qh[32h + l] bits
            // 2r..2r+2, value q − 32, scale scales[8h + 2r + l/16].
            let d = f16_at(w, base + 208);
            let sc = base + 192 + 8 * (sub / 4) + 2 * (sub % 4);
            let mut s0 = 0.0f32;
            let mut s1 = 0.0f32;
            for l in 0..16usize {
                let q0 = q6_k_group(w, base, sub, l);
                let q1 = q6_k_group(w, base, sub, l + 16);
                s0 += (f32::cast_from(q0) - 32.0) * x[xb + l];
                s1 += (f32::cast_from(q1) - 32.0) * x[xb + l + 16];
            }
            acc += d * (i8_at(w, sc) * s0 + i8_at(w, sc + 1) * s1);
        } else {
            // F16 / BF16: 32 halves in 16 words (rows are whole groups, so word aligned).
            let wb = base / 4;
            let mut s = 0.0f32;
            for j in 0..16usize {
                let word = w[wb + j];
                if kind == 9 {
                    s += f16_bits_to_f32(word & 0xffff) * x[xb + 2 * j]
                        + f16_bits_to_f32(word >> 16) * x[xb + 2 * j + 1];
                } else {
                    s += f32::reinterpret(word << 16) * x[xb + 2 * j]
                        + f32::reinterpret((word >> 16) << 16) * x[xb + 2 * j + 1];
                }
            }
            acc += s;
        }
        b += units;
    }

    let mut red = SharedMemory::<f32>::new(units);
    red[u] = acc;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            red[u] += red[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if u == 0 {
        y[row] = red[0];
    }
}

/// A quantized weight matrix on the device (raw GGUF blocks as words).
#[derive(Debug, Clone)]
pub struct DeviceQMatrix {
    /// The blocks, little-endian words.
    pub words: Handle,
    /// Number of words in `words`.
    pub n_words: usize,
    /// Block format.
    pub ty: QuantType,
    /// Output rows.
    pub rows: usize,
    /// Input columns (a multiple of the format's block).
    pub cols: usize,
    /// IQ4_NL's 16 values (one zero for the other formats).
    pub lut: Handle,
}

impl DeviceQMatrix {
    /// Elements in `lut`.
    pub(crate) fn lut_len(&self) -> usize {
        if self.ty == QuantType::IQ4_NL { 16 } else { 1 }
    }

    /// Uploads `rows` rows of `cols` elements of `ty` blocks (`bytes` exactly as in the GGUF).
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        ty: QuantType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        kind_of(ty)?;
        if rows == 0 || cols == 0 {
            return Err(invalid("rows", "rows and cols must be > 0"));
        }
        let row_bytes = ty.bytes_for("cols", cols).map_err(|e| invalid("cols", e.to_string()))?;
        let total = row_bytes.checked_mul(rows).ok_or_else(|| invalid("rows", "matrix size overflows"))?;
        to_u32("matrix bytes", total)?;
        check_len("bytes", bytes.len(), total)?;
        let words: Vec<u32> = bytes
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_le_bytes(w)
            })
            .collect();
        let lut: Vec<f32> =
            if ty == QuantType::IQ4_NL { IQ4_NL_VALUES.iter().map(|&v| f32::from(v)).collect() } else { vec![0.0] };
        Ok(Self {
            words: client.create_from_slice(u32::as_bytes(&words)),
            n_words: words.len(),
            ty,
            rows,
            cols,
            lut: upload_f32(client, &lut),
        })
    }
}

/// Launches `y = W · x` on device buffers (`x`: `cols` f32, `y`: `rows` f32).
pub fn launch_gemv<R: Runtime>(client: &ComputeClient<R>, w: &DeviceQMatrix, x: &Handle, y: &Handle) -> Result<()> {
    let kind = kind_of(w.ty)?;
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        gemv_q_kernel::launch::<R>(
            client,
            grid_1d("rows", w.rows)?,
            CubeDim::new_1d(GEMV_UNITS as u32),
            ArrayArg::from_raw_parts(w.words.clone(), w.n_words),
            ArrayArg::from_raw_parts(x.clone(), w.cols),
            ArrayArg::from_raw_parts(w.lut.clone(), w.lut_len()),
            ArrayArg::from_raw_parts(y.clone(), w.rows),
            to_u32("rows", w.rows)?,
            to_u32("cols / 32", w.cols / 32)?,
            kind,
            GEMV_UNITS,
        );
    }
    Ok(())
}

/// Uploads `x`, runs [`launch_gemv`] and reads `y` back.
pub fn gemv<R: Runtime>(client: &ComputeClient<R>, w: &DeviceQMatrix, x: &[f32]) -> Result<Vec<f32>> {
    check_len("x", x.len(), w.cols)?;
    let xh = upload_f32(client, x);
    let y = empty_f32(client, w.rows);
    launch_gemv(client, w, &xh, &y)?;
    read_f32(client, y, w.rows)
}
