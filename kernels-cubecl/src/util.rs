//! Shared pieces: grids larger than one dimension allows, buffer upload and read-back.

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
