//! The model configuration shared by both checkpoint formats.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type = "llama3"` in `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Scale applied to the lowest frequencies.
    pub factor: f64,
    /// Wavelength threshold (in units of the original context) below which frequencies are scaled.
    pub low_freq_factor: f64,
    /// Wavelength threshold above which frequencies are kept.
    pub high_freq_factor: f64,
    /// Context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters of a Llama-family decoder, independent of the checkpoint format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Optional Llama-3 RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Checks that the sizes are positive and consistent: heads divide evenly, `head_dim *
    /// num_attention_heads == hidden_size`, `head_dim` is even (RoPE pairs), special ids are in
    /// the vocabulary, and epsilon, theta and scaling are finite and positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.checked_mul(self.num_attention_heads) != Some(self.hidden_size) {
            return bad(format!(
                "head_dim {} × num_attention_heads {} != hidden_size {}",
                self.head_dim, self.num_attention_heads, self.hidden_size
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd; RoPE rotates pairs", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} must be finite and > 0", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be finite and > 0", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            let ok = [s.factor, s.low_freq_factor, s.high_freq_factor].iter().all(|x| x.is_finite() && *x > 0.0)
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !ok {
                return bad(format!(
                    "rope_scaling {s:?}: factors must be finite and > 0, high_freq_factor > low_freq_factor"
                ));
            }
        }
        let vocab = self.vocab_size;
        for id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if *id as usize >= vocab {
                return bad(format!("special token id {id} is outside the vocabulary of {vocab}"));
            }
        }
        Ok(())
    }

    /// Parses a Hugging Face Llama `config.json` (optional keys get the `transformers` defaults)
    /// and validates it. `source` names the file in errors.
    pub fn from_hf_json(json: &str, source: &std::path::Path) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| Error::Json { path: source.into(), source: e })?;
        hf.into_config(source)
    }

    /// Shape the config implies for a tensor given by its Hugging Face name, or `None` for a
    /// name outside the Llama layout.
    pub fn expected_shape(&self, hf_name: &str) -> Option<Vec<usize>> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match hf_name {
            "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![self.vocab_size, h]),
            "model.norm.weight" => return Some(vec![h]),
            _ => {}
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, leaf) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if layer >= self.num_hidden_layers {
            return None;
        }
        Some(match leaf {
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![self.intermediate_size, h],
            "mlp.down_proj.weight" => vec![h, self.intermediate_size],
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            _ => return None,
        })
    }
}

/// `eos_token_id` in `config.json` / `generation_config.json`: one id or a list.
#[derive(Deserialize, Default)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
    #[default]
    None,
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(x) => vec![x],
            Self::Many(v) => v,
            Self::None => vec![],
        }
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Mirror of `transformers.LlamaConfig` for the keys needle uses.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: OneOrMany,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    attention_bias: bool,
}

impl HfConfig {
    fn into_config(self, source: &std::path::Path) -> Result<LlamaConfig> {
        let unsupported =
            |what: &str, reason: String| Error::Unsupported { path: source.into(), what: what.into(), reason };
        if self.mlp_bias || self.attention_bias {
            return Err(unsupported("config", "attention_bias / mlp_bias are not supported".into()));
        }
        let rope_scaling = match self.rope_scaling {
            None => None,
            Some(s) => match s.rope_type.as_deref() {
                Some("default") | None if s.factor.is_none() => None,
                Some("llama3") => {
                    let need = |v: Option<f64>, k: &str| {
                        v.ok_or_else(|| unsupported("rope_scaling", format!("llama3 scaling without {k}")))
                    };
                    Some(RopeScaling {
                        factor: need(s.factor, "factor")?,
                        low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: s.original_max_position_embeddings.ok_or_else(|| {
                            unsupported(
                                "rope_scaling",
                                "llama3 scaling without original_max_position_embeddings".into(),
                            )
                        })?,
                    })
                }
                other => {
                    return Err(unsupported(
                        "rope_scaling",
                        format!("rope_type {other:?} (only \"llama3\" is supported)"),
                    ));
                }
            },
        };
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.into_vec(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
