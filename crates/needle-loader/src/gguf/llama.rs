//! The Llama family on GGUF: the model config from `{arch}.*` metadata (llama, qwen2, qwen3, gemma3),
//! Hugging Face ↔ GGUF tensor names, and the inverse of llama.cpp's Q/K row permutation.

use super::{GgufFile, Value};
use crate::config::{Architecture, LocalAttention, RopeScaling, SUPPORTED_ROPE_SCALING};
use crate::{Error, LlamaConfig, Result};

/// Leaves of a decoder block: (Hugging Face, GGUF).
/// Gemma 3's extra norms have no Llama counterpart: they keep their GGUF names (its norm before
/// the feed-forward is GGUF `ffn_norm`, as Llama's `post_attention_layernorm` is).
const LAYER_LEAVES: [(&str, &str); 16] = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("post_attention_norm.weight", "post_attention_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// GGUF name of a Hugging Face tensor name, or `None` outside the Llama layout.
pub fn hf_to_gguf(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some((*g).into());
    }
    let (layer, leaf) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = LAYER_LEAVES.iter().find(|(h, _)| *h == leaf)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Hugging Face name of a GGUF tensor name, or `None` outside the Llama layout.
pub fn gguf_to_hf(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL.iter().find(|(_, g)| *g == gguf) {
        return Some((*h).into());
    }
    let (layer, leaf) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (h, _) = LAYER_LEAVES.iter().find(|(_, g)| *g == leaf)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// `Some(n_head)` when the GGUF rows of `hf_name` are in llama.cpp's RoPE order: the Q and K
/// projections (and their biases) of an architecture whose converter permutes them.
pub fn permuted_heads(c: &LlamaConfig, hf_name: &str) -> Option<usize> {
    if !c.architecture.gguf_permutes_qk() {
        return None;
    }
    if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
        Some(c.num_attention_heads)
    } else if hf_name.ends_with("self_attn.k_proj.weight") || hf_name.ends_with("self_attn.k_proj.bias") {
        Some(c.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` on the rows of a `[n_head * head_dim, cols]` matrix.
///
/// The converter reshapes each head's rows as `[2, head_dim/2]` (rotate-half: first half, second
/// half) and swaps the two axes, so GGUF row `2i + s` of a head is HF row `s * head_dim/2 + i`.
pub fn unpermute_rows(data: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let src = (h * head_dim + 2 * i + s) * cols;
                let dst = (h * head_dim + s * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// The forward permutation (HF → GGUF), as llama.cpp's converter applies it. For writing tests.
pub fn permute_rows(data: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf = (h * head_dim + s * half + i) * cols;
                let gg = (h * head_dim + 2 * i + s) * cols;
                out[gg..gg + cols].copy_from_slice(&data[hf..hf + cols]);
            }
        }
    }
    out
}

impl GgufFile {
    /// RoPE scaling from `{arch}.rope.scaling.*` and llama.cpp's `rope_freqs.weight` (the
    /// per-frequency divisors its converter precomputes from Llama 3's `rope_scaling`).
    fn rope_scaling(&self, k: &dyn Fn(&str) -> String, head_dim: usize) -> Result<Option<RopeScaling>> {
        let type_key = k("rope.scaling.type");
        let ty = match self.get(&type_key) {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| self.bad(&type_key, format!("expected a string, found {v:?}")))?),
        };
        let refuse = |rope_type: &str| Error::UnsupportedRopeScaling {
            path: self.path.clone(),
            rope_type: rope_type.into(),
            supported: SUPPORTED_ROPE_SCALING,
        };
        let mut scaling = match ty {
            None | Some("none") => None,
            Some("linear") => {
                let factor_key = k("rope.scaling.factor");
                let factor = self
                    .meta_f64(&factor_key)?
                    .ok_or_else(|| Error::MissingMetadata { path: self.path.clone(), key: factor_key })?;
                // llama.cpp treats a factor of 0 or 1 as no scaling.
                (factor != 0.0 && factor != 1.0).then_some(RopeScaling::Linear { factor })
            }
            Some(other) => return Err(refuse(other)),
        };
        if let Some(info) = self.tensor_info("rope_freqs.weight") {
            if scaling.is_some() {
                return Err(refuse("linear together with rope_freqs.weight"));
            }
            if info.shape() != [head_dim / 2] {
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    tensor: info.name.clone(),
                    expected: vec![head_dim / 2],
                    got: info.shape(),
                });
            }
            scaling = Some(RopeScaling::FreqFactors(self.tensor_f32("rope_freqs.weight")?.data));
        }
        Ok(scaling)
    }

    fn need(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::MissingMetadata { path: self.path.clone(), key: key.into() })
    }

    fn bad(&self, key: &str, reason: String) -> Error {
        Error::BadMetadata { path: self.path.clone(), key: key.into(), reason }
    }

    pub(crate) fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, found {v:?}"))),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, format!("expected a number, found {v:?}"))),
        }
    }

    fn need_usize(&self, key: &str) -> Result<usize> {
        self.need(key)?;
        self.meta_usize(key)?.ok_or_else(|| self.bad(key, "missing".into()))
    }

    pub(crate) fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        self.meta_usize(key)?
            .map(|v| u32::try_from(v).map_err(|_| self.bad(key, format!("{v} does not fit a token id"))))
            .transpose()
    }

    /// Builds the config from `{arch}.*` metadata and validates it, together with the shapes
    /// of all Llama-layout tensors present.
    pub(crate) fn llama_config(&self) -> Result<LlamaConfig> {
        let arch_key = "general.architecture";
        let arch_name = self.need(arch_key)?.as_str().ok_or_else(|| self.bad(arch_key, "not a string".into()))?;
        let architecture = match Architecture::from_name(arch_name) {
            // llama.cpp converts Mistral 7B as `llama`; a `mistral` GGUF is not one it writes.
            Some(a) if a != Architecture::Mistral => a,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: self.path.clone(),
                    arch: arch_name.into(),
                    supported: "llama (also Mistral 7B), qwen2, qwen3, gemma3",
                });
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let hidden = self.need_usize(&k("embedding_length"))?;
        let heads = self.need_usize(&k("attention.head_count"))?;
        let kv_heads = self.meta_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim = match self.meta_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None => hidden.checked_div(heads).ok_or_else(|| self.bad(&k("attention.head_count"), "is 0".into()))?,
        };
        let vocab = match self.meta_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => match self.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
                Some(toks) => toks.len(),
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) if t.ne.len() == 2 => t.ne[1] as usize,
                    _ => return Err(Error::MissingMetadata { path: self.path.clone(), key: k("vocab_size") }),
                },
            },
        };
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = self
            .meta_f64(&eps_key)?
            .ok_or_else(|| Error::MissingMetadata { path: self.path.clone(), key: eps_key.clone() })?;
        let rope_theta = self.meta_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_scaling = self.rope_scaling(&k, head_dim)?;
        let mut sliding_window = self.meta_usize(&k("attention.sliding_window"))?;
        let (mut local_attention, mut query_pre_attn_scalar) = (None, None);
        let layers = self.need_usize(&k("block_count"))?;
        if architecture == Architecture::Gemma3 {
            // As llama.cpp reads gemma3: with a window, five local layers (RoPE base 10,000) to
            // one global; the query scale is 1/√head_dim except for the 27B (62 layers), whose
            // is 1/√(hidden/heads).
            local_attention = sliding_window.take().filter(|&w| w > 0).map(|window| LocalAttention {
                window,
                pattern: 6,
                rope_theta: 10_000.0,
            });
            let scalar = if layers == 62 { hidden / heads.max(1) } else { head_dim };
            query_pre_attn_scalar = Some(scalar as f64);
        }
        let final_logit_softcapping = self.meta_f64(&k("final_logit_softcapping"))?.filter(|&c| c > 0.0);
        let bos = self.meta_u32("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = self.meta_u32(key)?
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        let cfg = LlamaConfig {
            architecture,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.need_usize(&k("feed_forward_length"))?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.need_usize(&k("context_length"))?,
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            qkv_bias: self.tensor_info("blk.0.attn_q.bias").is_some(),
            qk_norm: self.tensor_info("blk.0.attn_q_norm.weight").is_some(),
            sliding_window,
            local_attention,
            query_pre_attn_scalar,
            final_logit_softcapping,
            bos_token_id: bos,
            eos_token_ids: eos,
        };
        cfg.validate().map_err(|e| match e {
            Error::InvalidConfig(msg) => Error::InvalidConfig(format!("{}: {msg}", self.path.display())),
            e => e,
        })?;
        for t in &self.tensors {
            if let Some(hf) = gguf_to_hf(&t.name)
                && let Some(expected) = cfg.expected_shape(&hf)
                && expected != t.shape()
            {
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    tensor: t.name.clone(),
                    expected,
                    got: t.shape(),
                });
            }
        }
        Ok(cfg)
    }
}
