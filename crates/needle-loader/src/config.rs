//! The model configuration shared by both checkpoint formats, and the architectures it covers.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A decoder family needle runs. All are the Llama layout (RMSNorm, RoPE, GQA, gated MLP); they
/// differ in a few switches the config records ([`LlamaConfig::qkv_bias`],
/// [`LlamaConfig::qk_norm`], [`LlamaConfig::sliding_window`], [`LlamaConfig::local_attention`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1–3.x, SmolLM2 (`llama`, `LlamaForCausalLM`).
    #[default]
    Llama,
    /// Mistral 7B (`mistral`, `MistralForCausalLM`; its GGUF says `llama`).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3 (dense): RMSNorm of each query and key head before RoPE, no biases.
    Qwen3,
    /// Gemma 3 (text, from GGUF only): embeddings scaled by √hidden, per-head q/k RMSNorm,
    /// RMSNorm after attention and after the feed-forward as well as before them, GeGLU
    /// (tanh GELU), and sliding-window layers interleaved with global ones
    /// ([`LlamaConfig::local_attention`]).
    Gemma3,
}

impl Architecture {
    /// Names accepted in GGUF `general.architecture` and HF `model_type`, for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gemma3 (GGUF)";

    /// The architecture of a GGUF `general.architecture` or HF `model_type` value.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            _ => return None,
        })
    }

    /// The architecture of an HF `architectures` entry (`Qwen2ForCausalLM`).
    pub fn from_hf_class(class: &str) -> Option<Self> {
        Some(match class {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            _ => return None,
        })
    }

    /// The lowercase name (`qwen2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    /// Whether llama.cpp's converter permuted the Q/K rows into its interleaved RoPE order (the
    /// Llama family). Qwen runs llama.cpp's NEOX RoPE, which is the HF order already.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Llama 3.x (`rope_type = "llama3"`): long wavelengths divided by `factor`, short ones kept,
    /// a smooth ramp between.
    Llama3 {
        /// Scale applied to the lowest frequencies.
        factor: f64,
        /// Wavelength threshold (in units of the original context) below which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength threshold above which frequencies are kept.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
    /// Position interpolation (`rope_type = "linear"`): every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// Per-frequency divisors, one per rotated pair: llama.cpp's `rope_freqs.weight`, which is
    /// how a GGUF stores Llama 3.x scaling (precomputed from the `llama3` parameters).
    FreqFactors(Vec<f32>),
}

/// Sliding-window layers interleaved with global ones (Gemma 3): layer `l` is local unless
/// `l % pattern == pattern - 1` (llama.cpp's `set_swa_pattern`), and a local layer attends to
/// the last `window` positions (itself included) with its own RoPE base.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalAttention {
    /// Positions a local layer attends to, the query's own included.
    pub window: usize,
    /// Every `pattern`-th layer is global.
    pub pattern: usize,
    /// RoPE base of the local layers (the global ones use [`LlamaConfig::rope_theta`] and its
    /// scaling; local layers are never scaled).
    pub rope_theta: f64,
}

impl LocalAttention {
    /// Whether layer `l` attends to a window only.
    pub fn is_local(&self, layer: usize) -> bool {
        layer % self.pattern < self.pattern - 1
    }
}

/// RoPE scaling types read, for error messages.
pub const SUPPORTED_ROPE_SCALING: &str = "none, default, linear, llama3 (GGUF: rope_freqs.weight)";

/// Hyper-parameters of a Llama-family decoder, independent of the checkpoint format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The decoder family.
    #[serde(default)]
    pub architecture: Architecture,
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
    /// Width of one attention head (Qwen3 allows `head_dim × heads != hidden_size`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Whether the q, k and v projections have biases (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// Whether each query and key head is RMS-normalised before RoPE (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Mistral's sliding attention window: a token attends to the last `sliding_window`
    /// positions only. needle attends to all of them, so the model refuses contexts longer
    /// than this (within it the two are the same).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Sliding-window layers interleaved with global ones (Gemma 3), attended as such.
    #[serde(default)]
    pub local_attention: Option<LocalAttention>,
    /// Gemma's `query_pre_attn_scalar`: the attention scale is `1/√` of it rather than
    /// `1/√head_dim` ([`LlamaConfig::attention_scale`]).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Final logit soft-capping: logits become `cap · tanh(logits / cap)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

/// Names of [`LlamaConfig::preset`]s.
pub const PRESETS: &str = "llama3-8b, qwen2.5-7b, qwen3-8b, smollm2-135m, gemma3-270m";

impl LlamaConfig {
    /// The config of a released model, by name (see [`PRESETS`]), as its `config.json` has it:
    /// `llama3-8b` (Llama-3.1-8B-Instruct), `qwen2.5-7b` (Qwen2.5-7B-Instruct), `qwen3-8b`,
    /// `smollm2-135m` (SmolLM2-135M-Instruct). For random-weight models of a real shape
    /// ([`Checkpoint::random`](crate::Checkpoint::random)).
    pub fn preset(name: &str) -> Result<Self> {
        let base = |architecture, vocab_size, hidden_size, intermediate_size, layers, heads, kv_heads| LlamaConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: None,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
            sliding_window: None,
            local_attention: None,
            query_pre_attn_scalar: None,
            final_logit_softcapping: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let c = match name {
            "llama3-8b" => LlamaConfig {
                rms_norm_eps: 1e-5,
                rope_theta: 500_000.0,
                rope_scaling: Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                max_position_embeddings: 131_072,
                bos_token_id: Some(128_000),
                eos_token_ids: vec![128_001, 128_008, 128_009],
                ..base(Architecture::Llama, 128_256, 4096, 14_336, 32, 32, 8)
            },
            "qwen2.5-7b" => LlamaConfig {
                qkv_bias: true,
                bos_token_id: Some(151_643),
                eos_token_ids: vec![151_645, 151_643],
                ..base(Architecture::Qwen2, 152_064, 3584, 18_944, 28, 28, 4)
            },
            "qwen3-8b" => LlamaConfig {
                qk_norm: true,
                max_position_embeddings: 40_960,
                bos_token_id: Some(151_643),
                eos_token_ids: vec![151_645, 151_643],
                ..base(Architecture::Qwen3, 151_936, 4096, 12_288, 36, 32, 8)
            },
            "smollm2-135m" => LlamaConfig {
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                ..base(Architecture::Llama, 49_152, 576, 1536, 30, 9, 3)
            },
            "gemma3-270m" => LlamaConfig {
                head_dim: 256,
                tie_word_embeddings: true,
                qk_norm: true,
                local_attention: Some(LocalAttention { window: 512, pattern: 6, rope_theta: 10_000.0 }),
                query_pre_attn_scalar: Some(256.0),
                bos_token_id: Some(2),
                eos_token_ids: vec![1, 106],
                ..base(Architecture::Gemma3, 262_144, 640, 2048, 18, 4, 1)
            },
            other => {
                return Err(Error::InvalidConfig(format!("unknown preset {other:?} (presets: {PRESETS})")));
            }
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks that the sizes are positive and consistent: heads divide evenly, `head_dim` is even
    /// (RoPE pairs), special ids are in the vocabulary, and epsilon, theta and scaling are
    /// finite and positive.
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
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd; RoPE rotates pairs", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} must be finite and > 0", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be finite and > 0", self.rope_theta));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let scaling_ok = match &self.rope_scaling {
            None => true,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                [*factor, *low_freq_factor, *high_freq_factor].into_iter().all(positive)
                    && high_freq_factor > low_freq_factor
                    && *original_max_position_embeddings > 0
            }
            Some(RopeScaling::Linear { factor }) => positive(*factor),
            Some(RopeScaling::FreqFactors(f)) => f.len() == self.head_dim / 2 && f.iter().all(|&x| positive(x.into())),
        };
        if !scaling_ok {
            return bad(format!(
                "rope_scaling {:?}: factors must be finite and > 0 (llama3: high_freq_factor > low_freq_factor; \
                 frequency factors: head_dim/2 = {} of them)",
                self.rope_scaling,
                self.head_dim / 2
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window is 0".into());
        }
        if let Some(la) = &self.local_attention
            && (la.window == 0 || la.pattern == 0 || !(la.rope_theta.is_finite() && la.rope_theta > 0.0))
        {
            return bad(format!("local attention {la:?}: window and pattern must be > 0, rope_theta finite and > 0"));
        }
        for (name, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return bad(format!("{name} {v} must be finite and > 0"));
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

    /// The window layer `layer` attends to, or `None` for a layer that attends to everything.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.local_attention.filter(|la| la.is_local(layer)).map(|la| la.window)
    }

    /// The scale of attention scores: `1/√query_pre_attn_scalar` when set, else `1/√head_dim`.
    pub fn attention_scale(&self) -> f32 {
        (1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()) as f32
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
            "self_attn.q_proj.bias" => vec![q],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
            "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => vec![self.head_dim],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![self.intermediate_size, h],
            "mlp.down_proj.weight" => vec![h, self.intermediate_size],
            "input_layernorm.weight"
            | "post_attention_layernorm.weight"
            | "post_attention_norm.weight"
            | "post_feedforward_layernorm.weight" => vec![h],
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

/// Mirror of the `transformers` configs of the supported families, for the keys needle uses.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
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
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

/// The scaling an HF `rope_scaling` object asks for; `source` names the file in errors.
fn hf_rope_scaling(s: HfRopeScaling, source: &std::path::Path) -> Result<Option<RopeScaling>> {
    let refuse = |rope_type: String| Error::UnsupportedRopeScaling {
        path: source.into(),
        rope_type,
        supported: SUPPORTED_ROPE_SCALING,
    };
    let need = |v: Option<f64>, k: &str| v.ok_or_else(|| refuse(format!("llama3 without {k}")));
    Ok(match s.rope_type.as_deref() {
        Some("default") | None if s.factor.is_none() => None,
        Some("linear") => {
            Some(RopeScaling::Linear { factor: s.factor.ok_or_else(|| refuse("linear without factor".into()))? })
        }
        Some("llama3") => Some(RopeScaling::Llama3 {
            factor: need(s.factor, "factor")?,
            low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: s
                .original_max_position_embeddings
                .ok_or_else(|| refuse("llama3 without original_max_position_embeddings".into()))?,
        }),
        other => return Err(refuse(other.unwrap_or("(none, with a factor)").to_string())),
    })
}

impl HfConfig {
    fn architecture(&self, source: &std::path::Path) -> Result<Architecture> {
        let by_type = self.model_type.as_deref().map(|t| (t, Architecture::from_name(t)));
        let by_class = self.architectures.first().map(|c| (c.as_str(), Architecture::from_hf_class(c)));
        match (by_type, by_class) {
            (Some((_, Some(a))), _) | (None, Some((_, Some(a)))) => Ok(a),
            // Old Llama configs name neither.
            (None, None) => Ok(Architecture::Llama),
            (Some((name, None)), _) | (None, Some((name, None))) => Err(Error::UnsupportedArchitecture {
                path: source.into(),
                arch: name.into(),
                supported: Architecture::SUPPORTED,
            }),
        }
    }

    fn into_config(self, source: &std::path::Path) -> Result<LlamaConfig> {
        let architecture = self.architecture(source)?;
        let unsupported =
            |what: &str, reason: String| Error::Unsupported { path: source.into(), what: what.into(), reason };
        if architecture == Architecture::Gemma3 {
            // Its checkpoints store RMSNorm weights as `w` for `x · (1 + w)`; llama.cpp's GGUF
            // converter adds the 1, which is the form needle reads.
            return Err(unsupported("config", "gemma3 is read from a GGUF file only".into()));
        }
        if self.mlp_bias {
            return Err(unsupported("config", "mlp_bias is not supported".into()));
        }
        // Qwen2's q/k/v biases are implied by the architecture; Llama's attention_bias would
        // also put one on o_proj, which no supported family has.
        let qkv_bias = architecture == Architecture::Qwen2;
        if self.attention_bias && !qkv_bias {
            return Err(unsupported(
                "config",
                format!("attention_bias on {} (only qwen2's q/k/v biases are supported)", architecture.name()),
            ));
        }
        let rope_scaling = match self.rope_scaling {
            None => None,
            Some(s) => hf_rope_scaling(s, source)?,
        };
        let sliding_window = if self.use_sliding_window == Some(false) { None } else { self.sliding_window };
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let cfg = LlamaConfig {
            architecture,
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
            qkv_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            local_attention: None,
            query_pre_attn_scalar: None,
            final_logit_softcapping: None,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.into_vec(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
