//! # needle-cli
//!
//! The needle command line: generate, logits, trace, eval, bench.
#![warn(missing_docs)]
