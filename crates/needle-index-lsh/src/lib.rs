//! # needle-index-lsh
//!
//! SimHash LSH tables (K bits x L tables) with MagicPIG-style collision-probability weights, on needle-core's VectorIndex.
#![warn(missing_docs)]
