//! # needle-loader
//!
//! Reads Llama-family checkpoints (GGUF, Hugging Face safetensors) and their tokenizers into host tensors.
#![warn(missing_docs)]
