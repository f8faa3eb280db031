//! The GGUF / ggml block formats needle reads and writes, and nothing that is a SIMD kernel.
//!
//! * [`QuantType`]: the supported ggml element types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
//!   Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K), their GGUF ids, block sizes and bytes per block, with the
//!   byte layout of each in [`mod@format`].
//! * [`dequantize_row`]: the one scalar dequantizer (the reference every fast path is tested
//!   against).
//! * [`quantize_row`] / [`can_quantize`]: plain round-to-nearest quantizers for weights made in
//!   memory (random models of a real shape for tests and benchmarks).
//! * [`f16_at`], [`u32_at`], [`q5_values`], [`k_scale_min`], [`IQ4_NL_VALUES`]: the layout reads
//!   and the table the fused kernels share with the dequantizer.
//!
//! A leaf crate (half and thiserror only) so that the loader (needle-loader), the CPU kernels
//! (needle-kernels-cpu, which re-exports these items) and the GPU kernels (needle-kernels-cubecl)
//! agree on one description of the formats without depending on each other.

pub mod format;
pub mod quantize;

pub use format::{IQ4_NL_VALUES, QuantType, dequantize_row, f16_at, k_scale_min, q5_values, u32_at};
pub use quantize::{can_quantize, quantize_row};

/// Errors of the block formats: a bad length or type, naming the parameter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A buffer length does not match what the other parameters imply.
    #[error("`{param}` has length {got}, expected {expected}")]
    Len {
        /// The parameter.
        param: &'static str,
        /// Its length.
        got: usize,
        /// The length the other parameters imply.
        expected: usize,
    },
    /// A dimension is not a multiple of the block size of the type.
    #[error("`{param}` = {got} is not a multiple of the {ty:?} block size {block}")]
    NotBlockMultiple {
        /// The parameter.
        param: &'static str,
        /// Its value.
        got: usize,
        /// The type.
        ty: QuantType,
        /// The block size in elements.
        block: usize,
    },
    /// A parameter is out of its valid range.
    #[error("`{param}`: {why}")]
    Invalid {
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        why: String,
    },
    /// No such ggml type id among the supported types.
    #[error("unsupported ggml type id {0}")]
    UnsupportedType(u32),
}

/// Result of the block formats.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_len(param: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(Error::Len { param, got, expected }) }
}
