//! # needle-index-graph
//!
//! Attention-aware graph index (RoarGraph-style query-to-key projection) and an HNSW baseline, on needle-core's VectorIndex.
#![warn(missing_docs)]
