//! # needle-loader
//!
//! Reads Llama-family checkpoints (GGUF, Hugging Face safetensors) and their tokenizers into host
//! tensors: plain row-major `f32` with Hugging Face names and layouts, whichever format they came
//! from. No Burn here; the model crate turns [`HostTensor`]s into its own tensors.
//!
//! - [`open`] a `.gguf` file or a folder with `config.json`, `model.safetensors` (or a sharded
//!   `model.safetensors.index.json`) and `tokenizer.json`.
//! - [`Checkpoint::config`] is a validated [`LlamaConfig`]; [`Checkpoint::tensor`] takes HF names
//!   (`model.layers.3.self_attn.q_proj.weight`) and returns linear weights as `[out, in]`. GGUF
//!   quantised tensors (every block format of needle-quant) are dequantised, and the Q/K row
//!   permutation llama.cpp applies is undone, so both formats give the same layout.
//! - [`Checkpoint::tokenizer`] gives a [`Tokenizer`] (from `tokenizer.json`, or rebuilt from the
//!   GGUF's embedded BPE vocabulary) with the model's own chat template ([`ChatTemplate`],
//!   rendered by minijinja; ChatML when the checkpoint has none) and streaming detokenisation.
//!
//! ```no_run
//! let ckpt = needle_loader::open("model.gguf".as_ref())?;
//! let cfg = ckpt.config();
//! let wq = ckpt.tensor("model.layers.0.self_attn.q_proj.weight")?;
//! assert_eq!(wq.shape, [cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size]);
//! let tok = ckpt.tokenizer()?;
//! // The model's own chat template (ChatML when the checkpoint has none).
//! let ids = tok.encode(&tok.chat_prompt(None, "Hi"), true)?;
//! assert!(!ids.is_empty());
//! # Ok::<(), needle_loader::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod chat;
mod config;
mod error;
pub mod gguf;
mod memory;
mod safetensors_dir;
mod tokenizer;

use std::path::Path;

pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, LlamaConfig, LocalAttention, PRESETS, RopeScaling, SUPPORTED_ROPE_SCALING};
pub use error::{Error, Result};
pub use gguf::{GgufFile, RawTensor};
pub use memory::{MemoryCheckpoint, layout};
pub use safetensors_dir::SafetensorsDir;
pub use tokenizer::{DecodeStream, Tokenizer};

/// A dense row-major `f32` tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first. Linear weights are `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// An opened checkpoint of either format.
#[derive(Debug)]
pub enum Checkpoint {
    /// A single `.gguf` file.
    Gguf(GgufFile),
    /// A Hugging Face folder with safetensors weights.
    Safetensors(SafetensorsDir),
    /// Tensors made in memory ([`Checkpoint::random`]); it has no tokenizer.
    Memory(MemoryCheckpoint),
}

/// Opens a checkpoint: a `.gguf` file (or any file starting with the GGUF magic), or a folder
/// with `config.json` and safetensors weights. The config is parsed and validated, and every
/// tensor's byte range is checked against its file; tensor data is read lazily.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(Checkpoint::Safetensors(SafetensorsDir::open(path)?));
    }
    Ok(Checkpoint::Gguf(GgufFile::open(path)?))
}

impl Checkpoint {
    /// A random-weight checkpoint of `config`'s shape, linear weights in `ty` (see
    /// [`MemoryCheckpoint::random`]): e.g. `Checkpoint::random(&LlamaConfig::preset("llama3-8b")?,
    /// QuantType::Q4_K, 7)` for a Llama-3-8B-shaped model without a download.
    pub fn random(config: &LlamaConfig, ty: needle_quant::QuantType, seed: u64) -> Result<Self> {
        Ok(Checkpoint::Memory(MemoryCheckpoint::random(config, ty, seed)?))
    }

    /// The validated model config.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Checkpoint::Gguf(g) => g.config(),
            Checkpoint::Safetensors(s) => s.config(),
            Checkpoint::Memory(m) => m.config(),
        }
    }

    /// A tensor by its Hugging Face name, as f32 in HF layout. Shapes of Llama tensors are
    /// checked against the config, and every value must be finite. `lm_head.weight` of a tied
    /// model is [`Error::MissingTensor`]: use `model.embed_tokens.weight`.
    ///
    /// For GGUF, names outside the Llama layout are looked up verbatim (e.g. `rope_freqs.weight`).
    pub fn tensor(&self, hf_name: &str) -> Result<HostTensor> {
        let t = match self {
            Checkpoint::Gguf(g) => g.hf_tensor(hf_name)?,
            Checkpoint::Safetensors(s) => s.tensor(hf_name)?,
            Checkpoint::Memory(m) => m.tensor(hf_name)?,
        };
        self.check_shape(hf_name, &t.shape)?;
        Ok(t)
    }

    /// Errors unless a tensor of the Llama layout has the shape the config implies.
    fn check_shape(&self, hf_name: &str, got: &[usize]) -> Result<()> {
        match self.config().expected_shape(hf_name) {
            Some(expected) if expected != got => Err(Error::ShapeMismatch {
                path: self.path().into(),
                tensor: hf_name.into(),
                expected,
                got: got.to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// A tensor by its Hugging Face name as stored, without dequantising: `Some` for GGUF files
    /// (a view of the memory map, see [`RawTensor`]; Q and K projections carry
    /// [`RawTensor::rope_heads`] when the architecture's converter permutes them), blocks of a
    /// [`Checkpoint::Memory`], `None` for safetensors folders (use [`Checkpoint::tensor`]).
    /// The shape is checked against the config like [`Checkpoint::tensor`]'s.
    pub fn tensor_blocks(&self, hf_name: &str) -> Result<Option<RawTensor>> {
        let g = match self {
            Checkpoint::Gguf(g) => g,
            Checkpoint::Safetensors(_) => return Ok(None),
            Checkpoint::Memory(m) => {
                let t = m.tensor_blocks(hf_name)?;
                self.check_shape(hf_name, &t.shape)?;
                return Ok(Some(t));
            }
        };
        let gname = gguf::hf_to_gguf(hf_name).unwrap_or_else(|| hf_name.to_string());
        let mut t = g.tensor_blocks(&gname).map_err(|e| match e {
            Error::MissingTensor { path, .. } => Error::MissingTensor { path, tensor: hf_name.into() },
            e => e,
        })?;
        self.check_shape(hf_name, &t.shape)?;
        t.rope_heads = gguf::permuted_heads(self.config(), hf_name);
        Ok(Some(t))
    }

    /// The tokenizer that goes with the weights.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Checkpoint::Gguf(g) => Tokenizer::from_gguf(g),
            Checkpoint::Safetensors(s) => s.tokenizer(),
            Checkpoint::Memory(m) => Err(Error::Unsupported {
                path: m.path().into(),
                what: "tokenizer".into(),
                reason: "a checkpoint made in memory has none; feed token ids".into(),
            }),
        }
    }

    /// Identity of the weights: xxh3-64 over the checkpoint's bytes (the GGUF file, or every
    /// file of the folder in name order), as 16 hex digits. Files saved for one model (a
    /// prefilled context) carry it, so they are never used with another.
    pub fn digest(&self) -> Result<String> {
        if let Checkpoint::Memory(m) = self {
            return Ok(m.digest());
        }
        let (mut files, folder) = (vec![self.path().to_path_buf()], matches!(self, Checkpoint::Safetensors(_)));
        if let Checkpoint::Safetensors(s) = self {
            let entries = std::fs::read_dir(s.path()).map_err(|e| Error::io(s.path(), e))?;
            files = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
            files.sort();
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        for f in &files {
            use std::io::Read;
            let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            if folder {
                h.update(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
            }
            loop {
                let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        Ok(format!("{:016x}", h.digest()))
    }

    /// The file or folder it was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Checkpoint::Gguf(g) => g.path(),
            Checkpoint::Safetensors(s) => s.path(),
            Checkpoint::Memory(m) => m.path(),
        }
    }

    /// One line for logs: path, format, tensor count and types (e.g. `Q4_1 ×210, F32 ×61`).
    pub fn describe(&self) -> String {
        let c = self.config();
        let model = format!(
            "{}, {} layers, hidden {}, {} q / {} kv heads × {}, vocab {}",
            c.architecture.name(),
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size
        );
        match self {
            Checkpoint::Gguf(g) => format!(
                "{}: GGUF v{}, {} tensors ({}); {model}",
                g.path().display(),
                g.version(),
                g.tensor_infos().len(),
                g.type_summary()
            ),
            Checkpoint::Safetensors(s) => format!(
                "{}: safetensors, {} shard(s), {} tensors ({}); {model}",
                s.path().display(),
                s.shard_count(),
                s.tensor_count(),
                s.type_summary()
            ),
            Checkpoint::Memory(m) => format!(
                "{}: in memory, {} tensors ({}); {model}",
                m.path().display(),
                m.tensors_len(),
                m.type_summary()
            ),
        }
    }
}

impl GgufFile {
    /// The validated Llama config read from `llama.*` metadata.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// A tensor by Hugging Face name, with llama.cpp's Q/K permutation undone.
    fn hf_tensor(&self, hf_name: &str) -> Result<HostTensor> {
        let gname = gguf::hf_to_gguf(hf_name).unwrap_or_else(|| hf_name.to_string());
        let mut t = self.tensor_f32(&gname).map_err(|e| match e {
            Error::MissingTensor { path, .. } => Error::MissingTensor { path, tensor: hf_name.into() },
            e => e,
        })?;
        let c = self.config();
        if let Some(n_head) = gguf::permuted_heads(c, hf_name) {
            let cols = if hf_name.ends_with(".bias") { 1 } else { c.hidden_size };
            let expected = if cols == 1 { vec![n_head * c.head_dim] } else { vec![n_head * c.head_dim, cols] };
            if t.shape != expected {
                return Err(Error::ShapeMismatch {
                    path: self.path().into(),
                    tensor: hf_name.into(),
                    expected,
                    got: t.shape,
                });
            }
            t.data = gguf::unpermute_rows(&t.data, n_head, c.head_dim, cols);
        }
        Ok(t)
    }
}

/// Fails with [`Error::NonFinite`] naming `tensor` at the first NaN or infinity.
pub(crate) fn check_finite(path: &Path, tensor: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { path: path.into(), tensor: tensor.into(), index, value: data[index] }),
    }
}
