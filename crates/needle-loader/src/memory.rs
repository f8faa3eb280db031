//! A checkpoint made in memory: every tensor of a config's layout filled with seeded random
//! values and stored in ggml blocks, so a model of a real shape (Llama-3-8B, Qwen2.5-7B) runs
//! without a download, for benchmarks and memory runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use needle_quant::{QuantType, can_quantize, quantize_row};
use rayon::prelude::*;

use crate::gguf::{GgmlType, RawTensor, dequantize};
use crate::{Error, HostTensor, LlamaConfig, Result};

struct MemTensor {
    ty: GgmlType,
    shape: Vec<usize>,
    bytes: Arc<[u8]>,
}

/// Tensors in ggml blocks held in memory under Hugging Face names, with their config.
pub struct MemoryCheckpoint {
    name: PathBuf,
    config: LlamaConfig,
    tensors: HashMap<String, MemTensor>,
    digest: u64,
}

impl std::fmt::Debug for MemoryCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCheckpoint").field("name", &self.name).field("tensors", &self.tensors.len()).finish()
    }
}

/// Every tensor name of `c`'s layout with its shape (HF names, `[out, in]` for linears).
pub fn layout(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".into()];
    if !c.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for l in 0..c.num_hidden_layers {
        let mut leaves = vec![
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        if c.qkv_bias {
            leaves.extend(["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]);
        }
        if c.qk_norm {
            leaves.extend(["self_attn.q_norm.weight", "self_attn.k_norm.weight"]);
        }
        if c.architecture == crate::Architecture::Gemma3 {
            leaves.extend(["post_attention_norm.weight", "post_feedforward_layernorm.weight"]);
        }
        names.extend(leaves.iter().map(|leaf| format!("model.layers.{l}.{leaf}")));
    }
    names
        .into_iter()
        .filter_map(|n| {
            let shape = c.expected_shape(&n)?;
            Some((n, shape))
        })
        .collect()
}

/// SplitMix64: a seekable stream, so every row of every tensor is drawn independently (and in
/// parallel) from `(seed, tensor, row)`.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform values in `[-a, a)` for row `row` of the tensor keyed `key`.
fn fill_uniform(out: &mut [f32], key: u64, row: u64, a: f32) {
    let mut s = splitmix(key ^ splitmix(row));
    for v in out {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let u = (splitmix(s) >> 40) as f32 / (1u64 << 24) as f32;
        *v = (2.0 * u - 1.0) * a;
    }
}

impl MemoryCheckpoint {
    /// A random-weight model of `config`'s shape: linear weights and the embedding in `ty`
    /// (rows whose length is not a multiple of its block fall back to Q8_0, then F32, as
    /// llama.cpp's quantizer falls back), uniform with the variance of `1/in_features` so
    /// activations keep their scale through the layers; norm weights near 1, biases small.
    /// The same `(config, ty, seed)` gives the same bytes. Quantizing runs on rayon.
    pub fn random(config: &LlamaConfig, ty: QuantType, seed: u64) -> Result<Self> {
        config.validate()?;
        let name = PathBuf::from(format!("<random {} seed {seed} {ty:?}>", config.architecture.name()));
        if !can_quantize(ty) {
            return Err(Error::Unsupported {
                path: name,
                what: "random weight type".into(),
                reason: format!("{ty:?} (supported: F32, F16, Q8_0, Q4_0, Q4_K)"),
            });
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(format!("{config:?} {ty:?} {seed}").as_bytes());
        let digest = h.digest();
        let mut tensors = HashMap::new();
        for (i, (tname, shape)) in layout(config).into_iter().enumerate() {
            let key = splitmix(seed ^ splitmix(i as u64 + 1));
            let t = if shape.len() == 2 {
                let (rows, cols) = (shape[0], shape[1]);
                let a = (3.0 / cols as f32).sqrt();
                let a = if tname == "model.embed_tokens.weight" { 1.0 } else { a };
                let ty = [ty, QuantType::Q8_0, QuantType::F32]
                    .into_iter()
                    .find(|t| cols.is_multiple_of(t.block_elems()))
                    .unwrap_or(QuantType::F32);
                let row_bytes = ty.bytes_for("cols", cols).map_err(|e| kernel_err(&name, &tname, e))?;
                let mut bytes = vec![0u8; rows * row_bytes];
                bytes
                    .par_chunks_mut(row_bytes)
                    .enumerate()
                    .try_for_each_init(
                        || vec![0f32; cols],
                        |x, (r, out)| {
                            fill_uniform(x, key, r as u64, a);
                            quantize_row(ty, x, out)
                        },
                    )
                    .map_err(|e| kernel_err(&name, &tname, e))?;
                (ty, shape, bytes)
            } else {
                let mut x = vec![0f32; shape[0]];
                fill_uniform(&mut x, key, 0, 0.1);
                if !tname.ends_with(".bias") {
                    x.iter_mut().for_each(|v| *v += 1.0);
                }
                (QuantType::F32, shape, bytemuck::cast_slice::<f32, u8>(&x).to_vec())
            };
            let (qt, shape, bytes) = t;
            let gty = GgmlType::from_id(qt.ggml_id()).ok_or_else(|| Error::UnsupportedTensorType {
                path: name.clone(),
                tensor: tname.clone(),
                dtype: format!("{qt:?}"),
                supported: crate::gguf::SUPPORTED_NAMES,
            })?;
            tensors.insert(tname, MemTensor { ty: gty, shape, bytes: bytes.into() });
        }
        tracing::debug!(name = %name.display(), tensors = tensors.len(), "made a random checkpoint");
        Ok(Self { name, config: config.clone(), tensors, digest })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// A name standing for a path in messages (`<random llama seed 7 Q4_K>`).
    pub fn path(&self) -> &Path {
        &self.name
    }

    /// Number of tensors.
    pub fn tensors_len(&self) -> usize {
        self.tensors.len()
    }

    /// Bytes of all tensors as stored.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes.len()).sum()
    }

    /// xxh3-64 of the config, type and seed (what made the bytes), as 16 hex digits.
    pub fn digest(&self) -> String {
        format!("{:016x}", self.digest)
    }

    /// Tensor counts per type, most frequent first.
    pub fn type_summary(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for t in self.tensors.values() {
            match counts.iter_mut().find(|(n, _)| *n == t.ty.name) {
                Some((_, c)) => *c += 1,
                None => counts.push((t.ty.name, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect::<Vec<_>>().join(", ")
    }

    fn get(&self, name: &str) -> Result<&MemTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { path: self.name.clone(), tensor: name.into() })
    }

    /// A tensor dequantized to f32.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let t = self.get(name)?;
        let mut data = vec![0f32; t.shape.iter().product()];
        if !dequantize(t.ty, &t.bytes, &mut data) {
            return Err(Error::InvalidTensorInfo {
                path: self.name.clone(),
                tensor: name.into(),
                dims: t.shape.iter().map(|&d| d as u64).collect(),
                reason: "data size does not match the type".into(),
            });
        }
        Ok(HostTensor { shape: t.shape.clone(), data })
    }

    /// A tensor's blocks, shared (no copy).
    pub fn tensor_blocks(&self, name: &str) -> Result<RawTensor> {
        let t = self.get(name)?;
        RawTensor::owned(Arc::clone(&t.bytes), t.ty, t.shape.clone()).ok_or_else(|| Error::InvalidTensorInfo {
            path: self.name.clone(),
            tensor: name.into(),
            dims: t.shape.iter().map(|&d| d as u64).collect(),
            reason: "data size does not match the type".into(),
        })
    }
}

fn kernel_err(path: &Path, tensor: &str, e: needle_quant::Error) -> Error {
    Error::InvalidTensorInfo { path: path.into(), tensor: tensor.into(), dims: vec![], reason: e.to_string() }
}
