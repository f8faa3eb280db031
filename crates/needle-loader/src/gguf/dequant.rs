//! Dequantisation of ggml blocks to f32: a parallel driver over `needle_quant`'s
//! dequantizer, the one implementation of ggml's block layouts in needle.

use needle_quant::{QuantType, dequantize_row};
use rayon::prelude::*;

use super::types::GgmlType;

/// Below this many blocks, threads cost more than they save.
const PAR_MIN_BLOCKS: usize = 4096;
const PAR_CHUNK_BLOCKS: usize = 1024;

/// Converts `bytes` of type `ty` into `out`. Returns `false` (and leaves `out` alone) when the
/// type is unsupported or the lengths disagree; callers check both beforehand for good errors.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !ty.can_dequantize() || !out.len().is_multiple_of(ty.block_elems) {
        return false;
    }
    let Ok(qt) = QuantType::from_ggml_id(ty.id) else {
        return false;
    };
    let blocks = out.len() / ty.block_elems;
    if blocks.checked_mul(ty.block_bytes) != Some(bytes.len()) {
        return false;
    }
    // Scalar types are processed as runs of 64 elements per "block" when chunking.
    let (ce, cb) = if ty.block_elems == 1 {
        (PAR_CHUNK_BLOCKS * 64, PAR_CHUNK_BLOCKS * 64 * ty.block_bytes)
    } else {
        (ty.block_elems * PAR_CHUNK_BLOCKS, ty.block_bytes * PAR_CHUNK_BLOCKS)
    };
    // Lengths were checked above, so each chunk is whole blocks and cannot fail.
    if blocks >= PAR_MIN_BLOCKS {
        out.par_chunks_mut(ce).zip(bytes.par_chunks(cb)).all(|(o, b)| dequantize_row(qt, b, o).is_ok())
    } else {
        dequantize_row(qt, bytes, out).is_ok()
    }
}
