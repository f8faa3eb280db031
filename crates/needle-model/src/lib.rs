//! # needle-model
//!
//! Burn Llama-family model whose attention goes through needle's AttentionSelector.
#![warn(missing_docs)]
