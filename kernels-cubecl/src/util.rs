//! Shared pieces: grids larger than one dimension allows, the online-softmax step of the
//! attention kernels, buffer upload and read-back.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{Error, Result, invalid};

/// Most cubes along one grid axis that every backend accepts (WebGPU's minimum limit).
pub(crate) const MAX_CUBES_PER_AXIS: u32 = 65_535;

/// A grid of at least `n` cubes: `n` along x when it fits, else rows of 65,535 along y.
/// Kernels recover the linear index with [`cube_linear`] and skip indices `>= n`.
pub(crate) fn grid_1d(param: &'static str, n: usize) -> Result<CubeCount> {
    let n = u32::try_from(n).map_err(|_| invalid(param, format!("{n} cubes do not fit in 32 bits")))?;
    if n <= MAX_CUBES_PER_AXIS {
        Ok(CubeCount::Static(n.max(1), 1, 1))
    } else {
        Ok(CubeCount::Static(MAX_CUBES_PER_AXIS, n.div_ceil(MAX_CUBES_PER_AXIS), 1))
    }
}

/// Linear cube index over a grid made by [`grid_1d`].
#[cube]
pub(crate) fn cube_linear() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// A score at or below this is masked (padding, or a key the query may not see): the kernels
/// write `-3.0e38`, far below any real score and finite, since WGSL forbids infinite literals.
pub(crate) const MASKED_BELOW: f32 = -1.0e38;

/// One step of an online softmax for row `r` (one query) of a tile of `n` scores at
/// `s[r · stride..]`: folds them into the row's running max `m[r]` and sum `l[r]`, overwrites
/// each score with its weight `exp(score − max)` (0 where masked), and leaves in `f[r]` the factor
/// the row's output so far must be scaled by (0 while the row has seen nothing: no inf
/// arithmetic). The decode and prefill kernels share it.
#[cube]
pub(crate) fn online_softmax_step(
    s: &mut SharedMemory<f32>,
    m: &mut SharedMemory<f32>,
    l: &mut SharedMemory<f32>,
    f: &mut SharedMemory<f32>,
    r: usize,
    stride: usize,
    n: usize,
) {
    let base = r * stride;
    let m_old = m[r];
    let mut mx = m_old;
    for j in 0..n {
        let x = s[base + j];
        if x > mx {
            mx = x;
        }
    }
    let l_old = l[r];
    let mut scale = 0.0f32;
    if l_old > 0.0 {
        scale = (m_old - mx).exp();
    }
    let mut sum = 0.0f32;
    for j in 0..n {
        let x = s[base + j];
        let mut p = 0.0f32;
        if x > MASKED_BELOW {
            p = (x - mx).exp();
        }
        s[base + j] = p;
        sum += p;
    }
    m[r] = mx;
    l[r] = l_old * scale + sum;
    f[r] = scale;
}

/// The f16 bits (in the low 16 bits) of `x`, rounded to nearest even as `half::f16::from_f32`
/// rounds: overflow to ±inf, underflow to subnormals or ±0, NaN kept a (quiet) NaN.
#[cube]
// Nested `if`s in kernel code: the rounding conditions stay plain branches (no `&&` expansion).
#[allow(clippy::collapsible_if)]
pub(crate) fn f32_to_f16_bits(x: f32) -> u32 {
    let b = u32::reinterpret(x);
    let sign = (b >> 16) & 0x8000;
    let exp = (b >> 23) & 0xff;
    let man = b & 0x7f_ffff;
    let mut out = sign;
    if exp == 255 {
        let mut nan = 0u32;
        if man != 0 {
            nan = 0x200 | (man >> 13);
        }
        out = sign | 0x7c00 | nan;
    } else if exp > 142 {
        // Past f16's largest exponent.
        out = sign | 0x7c00;
    } else if exp < 113 {
        // f16 subnormal (or zero below 2^-25).
        if exp >= 102 {
            let m = man | 0x80_0000;
            let shift = 126 - exp;
            let round = 1u32 << (shift - 1);
            let mut h = m >> shift;
            if (m & round) != 0 {
                if (m & (3 * round - 1)) != 0 {
                    h += 1;
                }
            }
            out = sign | h;
        }
    } else {
        let mut h = sign | ((exp - 112) << 10) | (man >> 13);
        if (man & 0x1000) != 0 {
            if (man & 0x2fff) != 0 {
                h += 1;
            }
        }
        out = h;
    }
    out
}

/// Uploads `data` (never an empty buffer: WebGPU rejects zero-sized bindings, so an empty slice
/// becomes one unused zero).
pub(crate) fn upload_f32<R: Runtime>(client: &ComputeClient<R>, data: &[f32]) -> Handle {
    if data.is_empty() {
        client.create_from_slice(f32::as_bytes(&[0.0]))
    } else {
        client.create_from_slice(f32::as_bytes(data))
    }
}

/// As [`upload_f32`] for `u32`.
pub(crate) fn upload_u32<R: Runtime>(client: &ComputeClient<R>, data: &[u32]) -> Handle {
    if data.is_empty() {
        client.create_from_slice(u32::as_bytes(&[0]))
    } else {
        client.create_from_slice(u32::as_bytes(data))
    }
}

/// An uninitialised buffer of `n` f32 (at least one).
pub(crate) fn empty_f32<R: Runtime>(client: &ComputeClient<R>, n: usize) -> Handle {
    client.empty(n.max(1) * size_of::<f32>())
}

/// Reads `n` f32 back from `handle`.
pub(crate) fn read_f32<R: Runtime>(client: &ComputeClient<R>, handle: Handle, n: usize) -> Result<Vec<f32>> {
    let bytes = client.read_one(handle).map_err(|e| Error::ReadBack(format!("{e:?}")))?;
    let all = f32::from_bytes(&bytes);
    all.get(..n).map(<[f32]>::to_vec).ok_or_else(|| Error::ReadBack(format!("got {} floats, expected {n}", all.len())))
}

/// Reads several f32 buffers back in one read (one wait for the device): the first `n` floats
/// of each `(handle, n)`.
pub fn read_f32s<R: Runtime>(client: &ComputeClient<R>, reads: &[(&Handle, usize)]) -> Result<Vec<Vec<f32>>> {
    if reads.is_empty() {
        return Ok(Vec::new());
    }
    let handles = reads.iter().map(|(h, _)| (*h).clone()).collect();
    let bytes = cubecl::reader::try_read_sync(client.read_async(handles))
        .ok_or_else(|| Error::ReadBack("this platform cannot wait for the device".into()))?
        .map_err(|e| Error::ReadBack(format!("{e:?}")))?;
    if bytes.len() != reads.len() {
        return Err(Error::ReadBack(format!("got {} buffers, expected {}", bytes.len(), reads.len())));
    }
    bytes
        .iter()
        .zip(reads)
        .map(|(b, &(_, n))| {
            let all = f32::from_bytes(b);
            all.get(..n)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::ReadBack(format!("got {} floats, expected {n}", all.len())))
        })
        .collect()
}

/// Reads `n` u32 back from `handle`.
pub(crate) fn read_u32<R: Runtime>(client: &ComputeClient<R>, handle: Handle, n: usize) -> Result<Vec<u32>> {
    let bytes = client.read_one(handle).map_err(|e| Error::ReadBack(format!("{e:?}")))?;
    let all = u32::from_bytes(&bytes);
    all.get(..n).map(<[u32]>::to_vec).ok_or_else(|| Error::ReadBack(format!("got {} words, expected {n}", all.len())))
}

/// Length of the buffer [`upload_f32`] / [`upload_u32`] make for `n` elements.
pub(crate) fn buf_len(n: usize) -> usize {
    n.max(1)
}
