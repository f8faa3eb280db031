//! # needle-index-ivfpq
//!
//! IVF coarse lists with product quantization, query-aware codebooks and exact re-rank, on needle-core's VectorIndex.
#![warn(missing_docs)]
