//! needle's own fused CPU kernels.
//!
//! * Block formats ([`QuantType`], [`dequantize_row`], [`quantize_row`]) live in the leaf crate
//!   needle-quant and are re-exported here.
//! * [`act`]: activations quantized on the fly to 8-bit blocks (Q8_0-style and Q8_K-style).
//! * [`dot`]: fused quantized dot products, one per weight type (F32, F16, BF16, Q8_0, Q4_0,
//!   Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K), scalar reference + AVX2/FMA for every type
//!   (+ AVX-512 for the Q8_0 / Q4_0 / Q4_1 row dots; + NEON on aarch64 for the float types, Q8_0,
//!   Q4_0 and Q4_1).
//! * [`linear`]: [`QMatrix`], a borrowed view of quantized weight rows, with `gemv` and `gemm`.
//! * [`attn`]: causal, GQA-aware flash prefill reading KV pages in place, and decode attention
//!   of a query group over gathered rows ([`attend_rows`], [`attend_rows_lse`] with the
//!   log-sum-exp); the AVX2 and NEON bodies of both are written once over a small lane trait,
//!   and decode has an AVX-512 body where AVX-512 F is present.
//! * [`sparse`]: block-sparse causal prefill ([`sparse_prefill`]): the same tile loop over the
//!   key blocks a [`BlockLayout`] chooses for each query block.
//! * [`ops`]: RMSNorm, rotate-half RoPE, SiLU·up.
//! * [`pool`]: the spinning thread pool the linears' parallel loops run on.
//!
//! SIMD paths are picked at run time ([`Isa::detect`], once: AVX2+FMA+F16C where present on
//! x86-64; NEON, with the dotprod extension where present, on aarch64), so one binary is fast on
//! any such CPU without `target-cpu=native`. Every kernel has a `*_with(isa, …)` variant so tests
//! can compare paths explicitly; [`Isa::Avx512`] is opt-in there (see its doc).
//!
//! On aarch64, [`Isa::Neon`] / [`Isa::NeonDot`] cover the Q8_0 / Q4_0 / Q4_1 dots and their
//! multi-token GEMM micro-kernel, the F32 / F16 / BF16 row dots, [`attend_rows`] and
//! [`flash_prefill`] (head dims that are a multiple of 4); the Q5_0, Q5_1 and IQ4_NL dots, the
//! K-quant dots (Q4_K, Q5_K, Q6_K), the [`ops`] and attention with other head dims run the scalar code (auto-vectorized: NEON is
//! part of every aarch64 CPU). The tests run under qemu-user (`cargo xtask ci` does this when the
//! cross tools are installed); NEON speed has not been measured on real hardware. Other targets
//! run the scalar code everywhere.

pub mod act;
pub mod attn;
pub mod dot;
pub mod linear;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod sparse;

mod isa;
#[cfg(target_arch = "aarch64")]
mod neon;

pub use act::{BlockQ8, BlockQ8K, QActs};
pub use attn::{Pages, attend_rows, attend_rows_lse, flash_prefill};
pub use isa::Isa;
pub use linear::{QMatrix, gemv_many, gemv_rows, gemv_rows_with};
pub use needle_quant::{QuantType, can_quantize, dequantize_row, quantize_row};
pub use packed::PackedRows;
pub use pool::Pool;
pub use sparse::{BlockLayout, sparse_prefill};

/// Errors of the kernels: a bad shape or length, naming the parameter.
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
    /// Activations were quantized for another weight type.
    #[error("activations quantized for {got:?}, weights are {want:?}")]
    ActKind {
        /// Kind the activations were quantized as.
        got: &'static str,
        /// Kind the weight type needs.
        want: &'static str,
    },
}

impl From<needle_quant::Error> for Error {
    /// The same error: the block formats' variants are this enum's, so matches on
    /// `Error::UnsupportedType` and the like see format errors as before the formats moved out.
    fn from(e: needle_quant::Error) -> Self {
        use needle_quant::Error as Q;
        match e {
            Q::Len { param, got, expected } => Error::Len { param, got, expected },
            Q::NotBlockMultiple { param, got, ty, block } => Error::NotBlockMultiple { param, got, ty, block },
            Q::Invalid { param, why } => Error::Invalid { param, why },
            Q::UnsupportedType(id) => Error::UnsupportedType(id),
        }
    }
}

/// Result of the kernels.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_len(param: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(Error::Len { param, got, expected }) }
}
