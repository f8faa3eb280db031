//! Quantized GEMV `y = W · x` straight from GGUF blocks (Q8_0, Q4_0, Q4_1).
//!
//! `W` is `rows × cols`, each row `cols / 32` ggml blocks packed back to back exactly as in the
//! GGUF file (see `needle_quant::format`), the whole matrix uploaded as bytes in
//! little-endian `u32` words (zero-padded to a whole word). Blocks of 34 (Q8_0) and 18 (Q4_0)
//! bytes are not word aligned, so the kernel extracts bytes from words; Q4_1 (20 bytes) is, and
//! its blocks are read a word at a time.
//! `x` is `cols` f32, `y` is `rows` f32.
//!
//! One cube per output row; its units stride over the row's blocks, each block dotted whole
//! (scale applied once per block: `d·Σq·x` for Q8_0, `d·(Σq·x − 8·Σx)` for Q4_0,
//! `d·Σq·x + m·Σx` for Q4_1), then a shared-memory tree sum (no plane operations).
//! f16 scales are decoded with integer ops: WGSL on lavapipe has no `f16`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use needle_quant::QuantType;

use crate::error::{Result, check_len, invalid, to_u32};
use crate::util::{MAX_CUBES_PER_AXIS, cube_linear, empty_f32, grid_1d, read_f32, upload_f32};

/// Units per cube (power of two, for the tree sum).
const GEMV_UNITS: usize = 64;

/// Comptime tag of the weight format inside the kernel.
fn kind_of(ty: QuantType) -> Result<u32> {
    match ty {
        QuantType::Q8_0 => Ok(0),
        QuantType::Q4_0 => Ok(1),
        QuantType::Q4_1 => Ok(2),
        other => Err(invalid("ty", format!("{other:?} is not supported by the GPU GEMV (Q8_0, Q4_0, Q4_1 are)"))),
    }
}

/// Byte `b` of the word buffer.
#[cube]
fn byte_at(w: &Array<u32>, b: usize) -> u32 {
    (w[b / 4] >> (((b % 4) * 8) as u32)) & 0xff
}

/// The little-endian f16 at byte `b`, as f32.
#[cube]
fn f16_at(w: &Array<u32>, b: usize) -> f32 {
    f16_bits_to_f32(byte_at(w, b) | (byte_at(w, b + 1) << 8))
}

/// f16 bits (low 16 bits of `h`) as f32: normals, subnormals, zero; inf/NaN keep their bits.
#[cube]
fn f16_bits_to_f32(h: u32) -> f32 {
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

/// One cube per (row, token): rows along the x/y grid, tokens along z; see the module doc.
#[cube(launch)]
pub fn gemv_q_kernel(
    w: &Array<u32>,
    x: &Array<f32>,
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
    let tok = CUBE_POS_Z as usize;
    let x0 = tok * nb * 32;
    let block_bytes = comptime!(match kind {
        0 => 34usize,
        1 => 18usize,
        _ => 20usize,
    });
    let row_base = row * nb * block_bytes;
    let mut acc = 0.0f32;
    let mut b = u;
    while b < nb {
        let base = row_base + b * block_bytes;
        let xb = x0 + b * 32;
        if kind == 0 {
            let d = f16_at(w, base);
            let mut s = 0.0f32;
            for j in 0..32usize {
                let byte = byte_at(w, base + 2 + j);
                let mut qv = f32::cast_from(byte);
                if byte >= 128 {
                    qv -= 256.0;
                }
                s += qv * x[xb + j];
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
        } else {
            let d = f16_at(w, base);
            let qs = base + 2;
            let mut s = 0.0f32;
            let mut sx = 0.0f32;
            for j in 0..16usize {
                let byte = byte_at(w, qs + j);
                let x0 = x[xb + j];
                let x1 = x[xb + j + 16];
                s += f32::cast_from(byte & 15) * x0 + f32::cast_from(byte >> 4) * x1;
                sx += x0 + x1;
            }
            acc += d * (s - 8.0 * sx);
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
        y[tok * rows as usize + row] = red[0];
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
    /// Input columns (a multiple of 32).
    pub cols: usize,
}

impl DeviceQMatrix {
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
        Ok(Self { words: client.create_from_slice(u32::as_bytes(&words)), n_words: words.len(), ty, rows, cols })
    }
}

/// Launches `y = W · x` on device buffers (`x`: `cols` f32, `y`: `rows` f32).
pub fn launch_gemv<R: Runtime>(client: &ComputeClient<R>, w: &DeviceQMatrix, x: &Handle, y: &Handle) -> Result<()> {
    launch_gemm(client, w, x, y, 1)
}

/// Launches `Y = X · Wᵀ` for `t` tokens on device buffers (`x`: `t × cols` f32, `y`: `t × rows`
/// f32, row-major): one GEMV per token, so the blocks are read `t` times (a prefill path, not a
/// tuned GEMM).
pub fn launch_gemm<R: Runtime>(
    client: &ComputeClient<R>,
    w: &DeviceQMatrix,
    x: &Handle,
    y: &Handle,
    t: usize,
) -> Result<()> {
    let kind = kind_of(w.ty)?;
    if t == 0 || t > MAX_CUBES_PER_AXIS as usize {
        return Err(invalid("t", format!("{t} tokens: 1..={MAX_CUBES_PER_AXIS} per launch")));
    }
    let CubeCount::Static(gx, gy, _) = grid_1d("rows", w.rows)? else {
        return Err(invalid("rows", "grid_1d gives a static grid"));
    };
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        gemv_q_kernel::launch::<R>(
            client,
            CubeCount::Static(gx, gy, to_u32("t", t)?),
            CubeDim::new_1d(GEMV_UNITS as u32),
            ArrayArg::from_raw_parts(w.words.clone(), w.n_words),
            ArrayArg::from_raw_parts(x.clone(), t * w.cols),
            ArrayArg::from_raw_parts(y.clone(), t * w.rows),
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

/// Uploads `x` (`t × cols`), runs [`launch_gemm`] and reads `y` (`t × rows`) back.
pub fn gemm<R: Runtime>(client: &ComputeClient<R>, w: &DeviceQMatrix, x: &[f32], t: usize) -> Result<Vec<f32>> {
    check_len("x", x.len(), t * w.cols)?;
    let xh = upload_f32(client, x);
    let y = empty_f32(client, t * w.rows);
    launch_gemm(client, w, &xh, &y, t)?;
    read_f32(client, y, t * w.rows)
}
