//! Tiled quantized GEMM `Y = X · Wᵀ` for prefill: `t` tokens of f32 activations (`X`, `t × cols`)
//! against the GGUF blocks of a [`DeviceQMatrix`] (`W`, `rows × cols`), every format the GEMV
//! reads.
//!
//! One cube per tile of [`TILE_ROWS`] weight rows × `8·tm` tokens (`tm` = 1 for a few tokens, 4
//! otherwise). The cube walks `cols` one 32-element group at a time: it stages the tokens' 32
//! activations in shared memory and dequantizes the tile's 64 row groups (one per unit) into
//! shared memory once, where every token of the tile meets them; each unit then accumulates a
//! `tm × 8` block of outputs in registers (tokens `tmi + 8i`, rows `tn + 8j`, so the units of a
//! warp read a few shared words each and broadcast them). The weights are thus read once per
//! `8·tm` tokens instead of once per token as in one GEMV per token. Shared memory:
//! `4·32·(64 + 8·tm)` bytes (at most 12 KiB, under WebGPU's 16 KiB minimum). No plane
//! operations.
//!
//! The dequantized value of each element is the f32 expression needle-quant's decoder uses
//! (`d·q`, `d·q + m`, `(d·sc)·q − dmin·m`, …), so the result differs from the f64 product of
//! needle-quant's rows only by the f32 accumulation.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{Result, check_len, invalid, to_u32};
use crate::gemv::{
    DeviceQMatrix, byte_at, f16_at, f16_bits_to_f32, group_bytes, i8_at, k_scale_min, kind_of, launch_gemv, q6_k_group,
    u32_at,
};
use crate::util::{MAX_CUBES_PER_AXIS, empty_f32, read_f32, upload_f32};

/// Weight rows per tile; also the units per cube (each unit dequantizes one row's group).
pub const TILE_ROWS: usize = 64;

/// Token rows of a tile per `tm` (the units along the token axis: 64 units = 8 × 8).
const TOKEN_LANES: usize = 8;

/// Weight rows each unit accumulates (`TILE_ROWS / 8`).
const ROWS_PER_UNIT: usize = 8;

/// Tokens from which a tile holds 32 tokens (`tm` = 4) rather than 8.
const WIDE_FROM: usize = 9;

/// Writes the 32 dequantized values of group `g` of a row starting at byte `row_base` to
/// `out[col + kk·stride]`, `kk` = 0..32 (see the module doc for the expressions).
#[cube]
#[allow(clippy::too_many_arguments)]
fn dequantize_group(
    w: &Array<u32>,
    lut: &Array<f32>,
    row_base: usize,
    g: usize,
    out: &mut SharedMemory<f32>,
    col: usize,
    stride: usize,
    #[comptime] kind: u32,
) {
    let block_bytes = comptime!(group_bytes(kind));
    let super_block = comptime!((6..=8).contains(&kind));
    let mut base = row_base + g * block_bytes;
    let mut sub = 0usize;
    if super_block {
        base = row_base + (g / 8) * block_bytes;
        sub = g % 8;
    }
    if kind == 0 {
        let d = f16_at(w, base);
        for j in 0..32usize {
            out[col + j * stride] = d * i8_at(w, base + 2 + j);
        }
    } else if kind == 1 || kind == 2 || kind == 5 {
        // Q4_0 (d·(q − 8)), Q4_1 (d·q + m), IQ4_NL (d·table[q]): nibbles of 16 bytes.
        let d = f16_at(w, base);
        let mut m = 0.0f32;
        let mut qs = base + 2;
        if kind == 2 {
            m = f16_at(w, base + 2);
            qs = base + 4;
        }
        for j in 0..16usize {
            let byte = byte_at(w, qs + j);
            let lo = byte & 15;
            let hi = byte >> 4;
            if kind == 1 {
                out[col + j * stride] = d * (f32::cast_from(lo) - 8.0);
                out[col + (j + 16) * stride] = d * (f32::cast_from(hi) - 8.0);
            } else if kind == 2 {
                out[col + j * stride] = d * f32::cast_from(lo) + m;
                out[col + (j + 16) * stride] = d * f32::cast_from(hi) + m;
            } else {
                out[col + j * stride] = d * lut[lo as usize];
                out[col + (j + 16) * stride] = d * lut[hi as usize];
            }
        }
    } else if kind == 3 || kind == 4 {
        // Q5_0 (d·(q − 16)) and Q5_1 (d·q + m).
        let d = f16_at(w, base);
        let mut m = 0.0f32;
        let mut h = base + 2;
        if kind == 4 {
            m = f16_at(w, base + 2);
            h = base + 4;
        }
        let qh = u32_at(w, h);
        for j in 0..16usize {
            let byte = byte_at(w, h + 4 + j);
            let lo = f32::cast_from((byte & 15) | (((qh >> j as u32) & 1) << 4));
            let hi = f32::cast_from((byte >> 4) | (((qh >> (j as u32 + 16)) & 1) << 4));
            if kind == 3 {
                out[col + j * stride] = d * (lo - 16.0);
                out[col + (j + 16) * stride] = d * (hi - 16.0);
            } else {
                out[col + j * stride] = d * lo + m;
                out[col + (j + 16) * stride] = d * hi + m;
            }
        }
    } else if kind == 6 || kind == 7 {
        // Q4_K / Q5_K: (d·sc)·q − dmin·m over the low (even sub) or high (odd) nibbles.
        let sm = k_scale_min(w, base + 4, sub);
        let d1 = f16_at(w, base) * f32::cast_from(sm & 255);
        let m1 = f16_at(w, base + 2) * f32::cast_from(sm >> 8);
        let shift = ((sub % 2) * 4) as u32;
        let mut qs = base + 16 + 32 * (sub / 2);
        if kind == 7 {
            qs = base + 48 + 32 * (sub / 2);
        }
        for l in 0..32usize {
            let mut q = (byte_at(w, qs + l) >> shift) & 15;
            if kind == 7 {
                q |= ((byte_at(w, base + 16 + l) >> sub as u32) & 1) << 4;
            }
            out[col + l * stride] = d1 * f32::cast_from(q) - m1;
        }
    } else if kind == 8 {
        // Q6_K: (d·sc)·(q − 32), one scale per 16 elements.
        let d = f16_at(w, base + 208);
        let sc = base + 192 + 8 * (sub / 4) + 2 * (sub % 4);
        let d0 = d * i8_at(w, sc);
        let d1 = d * i8_at(w, sc + 1);
        for l in 0..16usize {
            out[col + l * stride] = d0 * (f32::cast_from(q6_k_group(w, base, sub, l)) - 32.0);
            out[col + (l + 16) * stride] = d1 * (f32::cast_from(q6_k_group(w, base, sub, l + 16)) - 32.0);
        }
    } else {
        // F16 / BF16: 32 halves in 16 words.
        let wb = base / 4;
        for j in 0..16usize {
            let word = w[wb + j];
            if kind == 9 {
                out[col + 2 * j * stride] = f16_bits_to_f32(word & 0xffff);
                out[col + (2 * j + 1) * stride] = f16_bits_to_f32(word >> 16);
            } else {
                out[col + 2 * j * stride] = f32::reinterpret(word << 16);
                out[col + (2 * j + 1) * stride] = f32::reinterpret((word >> 16) << 16);
            }
        }
    }
}

/// One cube per (row tile, token tile); see the module doc. `y` is `t × rows`, row-major.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_q_kernel(
    w: &Array<u32>,
    x: &Array<f32>,
    lut: &Array<f32>,
    y: &mut Array<f32>,
    t: u32,
    rows: u32,
    blocks_per_row: u32,
    #[comptime] kind: u32,
    #[comptime] tm: usize,
) {
    let bm = comptime!(TOKEN_LANES * tm);
    let u = UNIT_POS_X as usize;
    let n0 = CUBE_POS_X as usize * TILE_ROWS;
    let m0 = CUBE_POS_Y as usize * bm;
    let nb = blocks_per_row as usize;
    let cols = nb * 32;
    let n_rows = rows as usize;
    let n_tok = t as usize;
    let tn = u % ROWS_PER_UNIT;
    let tmi = u / ROWS_PER_UNIT;

    // Bytes of one row: K-quants hold 8 groups per super-block.
    let mut row_bytes = nb * comptime!(group_bytes(kind));
    if comptime!((6..=8).contains(&kind)) {
        row_bytes = (nb / 8) * comptime!(group_bytes(kind));
    }

    // k-major tiles: xs[kk·bm + m], ws[kk·64 + n].
    let mut xs = SharedMemory::<f32>::new(comptime!(32 * TOKEN_LANES * tm));
    let mut ws = SharedMemory::<f32>::new(comptime!(32 * TILE_ROWS));
    let mut acc = Array::<f32>::new(comptime!(tm * ROWS_PER_UNIT));
    let mut wv = Array::<f32>::new(ROWS_PER_UNIT);
    #[unroll]
    for i in 0..comptime!(tm * ROWS_PER_UNIT) {
        acc[i] = 0.0;
    }

    let my_row = n0 + u;
    for g in 0..nb {
        // Stage the tokens' 32 activations (consecutive units read consecutive columns).
        let mut e = u;
        while e < comptime!(32 * TOKEN_LANES * tm) {
            let m = e / 32;
            let kk = e % 32;
            let tok = m0 + m;
            let mut v = 0.0f32;
            if tok < n_tok {
                v = x[tok * cols + g * 32 + kk];
            }
            xs[kk * bm + m] = v;
            e += TILE_ROWS;
        }
        // Unit u dequantizes group g of row n0 + u (zeros past the last row).
        if my_row < n_rows {
            dequantize_group(w, lut, my_row * row_bytes, g, &mut ws, u, TILE_ROWS, kind);
        } else {
            for kk in 0..32usize {
                ws[kk * TILE_ROWS + u] = 0.0;
            }
        }
        sync_cube();

        for kk in 0..32usize {
            #[unroll]
            for j in 0..ROWS_PER_UNIT {
                wv[j] = ws[kk * TILE_ROWS + tn + ROWS_PER_UNIT * j];
            }
            #[unroll]
            for i in 0..tm {
                let xv = xs[kk * bm + tmi + TOKEN_LANES * i];
                #[unroll]
                for j in 0..ROWS_PER_UNIT {
                    acc[i * ROWS_PER_UNIT + j] += xv * wv[j];
                }
            }
        }
        sync_cube();
    }

    #[unroll]
    for i in 0..tm {
        let tok = m0 + tmi + TOKEN_LANES * i;
        #[unroll]
        for j in 0..ROWS_PER_UNIT {
            let n = n0 + tn + ROWS_PER_UNIT * j;
            if tok < n_tok && n < n_rows {
                y[tok * n_rows + n] = acc[i * ROWS_PER_UNIT + j];
            }
        }
    }
}

/// Launches `Y = X · Wᵀ` for `t` tokens on device buffers (`x`: `t × cols` f32, `y`: `t × rows`
/// f32, row-major): the GEMV for one token, the tiled GEMM (module doc) for more.
pub fn launch_gemm<R: Runtime>(
    client: &ComputeClient<R>,
    w: &DeviceQMatrix,
    x: &Handle,
    y: &Handle,
    t: usize,
) -> Result<()> {
    if t == 1 {
        return launch_gemv(client, w, x, y);
    }
    let kind = kind_of(w.ty)?;
    if t == 0 {
        return Err(invalid("t", "0 tokens"));
    }
    let tm = if t >= WIDE_FROM { 4 } else { 1 };
    let row_tiles = w.rows.div_ceil(TILE_ROWS);
    let tok_tiles = t.div_ceil(TOKEN_LANES * tm);
    if row_tiles > MAX_CUBES_PER_AXIS as usize {
        return Err(invalid(
            "rows",
            format!("{} rows: at most {} per launch", w.rows, MAX_CUBES_PER_AXIS as usize * TILE_ROWS),
        ));
    }
    if tok_tiles > MAX_CUBES_PER_AXIS as usize {
        return Err(invalid("t", format!("{t} tokens: too many for one launch")));
    }
    to_u32("t · cols", t * w.cols)?;
    to_u32("t · rows", t * w.rows)?;
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        gemm_q_kernel::launch::<R>(
            client,
            CubeCount::Static(to_u32("rows", row_tiles)?, to_u32("t", tok_tiles)?, 1),
            CubeDim::new_1d(TILE_ROWS as u32),
            ArrayArg::from_raw_parts(w.words.clone(), w.n_words),
            ArrayArg::from_raw_parts(x.clone(), t * w.cols),
            ArrayArg::from_raw_parts(w.lut.clone(), w.lut_len()),
            ArrayArg::from_raw_parts(y.clone(), t * w.rows),
            to_u32("t", t)?,
            to_u32("rows", w.rows)?,
            to_u32("cols / 32", w.cols / 32)?,
            kind,
            tm,
        );
    }
    Ok(())
}

/// Uploads `x` (`t × cols`), runs [`launch_gemm`] and reads `y` (`t × rows`) back.
pub fn gemm<R: Runtime>(client: &ComputeClient<R>, w: &DeviceQMatrix, x: &[f32], t: usize) -> Result<Vec<f32>> {
    check_len("x", x.len(), t * w.cols)?;
    let xh = upload_f32(client, x);
    let y = empty_f32(client, t * w.rows);
    launch_gemm(client, w, &xh, &y, t)?;
    read_f32(client, y, t * w.rows)
}
