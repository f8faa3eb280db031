//! Llama-family transformer on Burn: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
//! tied or separate output head (Touvron et al. 2023; the Hugging Face Llama layout).
//!
//! Weights are Burn parameters (a [`Module`], so the model can be held, moved between devices
//! and visited like any Burn module), linear weights transposed to `[in, out]` so a layer is
//! `x · W`. Every layer's attention goes through [`cached_attention`]: keys and values leave the
//! model after RoPE into the host-tier [`KvCache`]; prefill attends causally over the cache,
//! decode goes through the cache's selectors.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use needle_core::GqaLayout;
use needle_loader::{Checkpoint, HostTensor, LlamaConfig};

use crate::attention::{cached_attention, to_vec};
use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::rope::Rope;

/// One transformer layer's weights.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    attn_norm: Param<Tensor<B, 2>>,
    wq: Param<Tensor<B, 2>>,
    wk: Param<Tensor<B, 2>>,
    wv: Param<Tensor<B, 2>>,
    wo: Param<Tensor<B, 2>>,
    ffn_norm: Param<Tensor<B, 2>>,
    w_gate: Param<Tensor<B, 2>>,
    w_up: Param<Tensor<B, 2>>,
    w_down: Param<Tensor<B, 2>>,
}

/// A Llama-family causal language model, as a Burn [`Module`].
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    gqa: GqaLayout,
    #[module(skip)]
    rope: Rope,
    embed: Param<Tensor<B, 2>>,
    blocks: Vec<Block<B>>,
    norm: Param<Tensor<B, 2>>,
    lm_head: Param<Tensor<B, 2>>,
}

impl<B: Backend> Llama<B> {
    /// Loads weights by checkpoint name (Hugging Face names; GGUF files are mapped by the loader).
    pub fn load(ck: &Checkpoint, device: &B::Device) -> Result<Self> {
        let cfg = ck.config().clone();
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let gqa = GqaLayout::new(cfg.num_attention_heads, cfg.num_key_value_heads)?;
        let get = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            let t = ck.tensor(name)?;
            if t.shape != shape {
                return Err(Error::Shape { tensor: name.into(), expected: shape.to_vec(), got: t.shape.clone() });
            }
            Ok(t)
        };
        // HF linear weights are [out, in]; store [in, out].
        let param = |data: Vec<f32>, shape: [usize; 2]| Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device));
        let linear = |name: &str, out: usize, inp: usize| -> Result<Param<Tensor<B, 2>>> {
            let t = get(name, &[out, inp])?;
            Ok(param(transpose(&t.data, out, inp), [inp, out]))
        };
        let vector = |name: &str, n: usize| -> Result<Param<Tensor<B, 2>>> { Ok(param(get(name, &[n])?.data, [1, n])) };
        let embed_host = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            param(transpose(&embed_host.data, cfg.vocab_size, h), [h, cfg.vocab_size])
        } else {
            linear("lm_head.weight", cfg.vocab_size, h)?
        };
        let embed = param(embed_host.data, [cfg.vocab_size, h]);
        let (qd, kvd, ff) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size);
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                Ok(Block {
                    attn_norm: vector(&p("input_layernorm.weight"), h)?,
                    wq: linear(&p("self_attn.q_proj.weight"), qd, h)?,
                    wk: linear(&p("self_attn.k_proj.weight"), kvd, h)?,
                    wv: linear(&p("self_attn.v_proj.weight"), kvd, h)?,
                    wo: linear(&p("self_attn.o_proj.weight"), h, qd)?,
                    ffn_norm: vector(&p("post_attention_layernorm.weight"), h)?,
                    w_gate: linear(&p("mlp.gate_proj.weight"), ff, h)?,
                    w_up: linear(&p("mlp.up_proj.weight"), ff, h)?,
                    w_down: linear(&p("mlp.down_proj.weight"), h, ff)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = vector("model.norm.weight", h)?;
        Ok(Self { rope: Rope::new(&cfg), gqa, config: cfg, embed, blocks, norm, lm_head })
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Query/KV head layout.
    pub fn gqa(&self) -> GqaLayout {
        self.gqa
    }

    /// Attention scale `1/√head_dim`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.config.head_dim as f32).sqrt()
    }

    /// Bytes of f32 weights held (the bytes a decode step reads).
    pub fn weight_bytes(&self) -> usize {
        self.num_params() * 4
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab: self.config.vocab_size }),
            None => Ok(()),
        }
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Param<Tensor<B, 2>>) -> Tensor<B, 2> {
        let ms = x.clone().square().mean_dim(1);
        x * ms.add_scalar(self.config.rms_norm_eps).sqrt().recip() * w.val()
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.embed.val().device()
    }

    /// Rotate-half RoPE on `[t, heads, dim]` with `[t, 1, dim]` tables.
    fn rope(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        let [t, h, d] = x.dims();
        let x1 = x.clone().slice([0..t, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..t, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * cos.clone().expand([t, h, d]) + rotated * sin.clone().expand([t, h, d])
    }

    /// Runs `tokens` (at positions `cache.len()..`) through the model, appending their keys and
    /// values to the cache, and returns the final-normed hidden states `[t, hidden]`.
    /// One token after the cache is built decodes through the selectors; anything else is
    /// prefill with causal dense attention.
    pub(crate) fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor<B, 2>> {
        self.check_tokens(tokens)?;
        let (t, pos0) = (tokens.len(), cache.len());
        let (nh, nkv, d) = (self.gqa.n_q_heads, self.gqa.n_kv_heads, self.config.head_dim);
        let device = self.device();
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [t]), &device);
        let mut x = self.embed.val().select(0, ids);
        let (cos, sin) = self.rope.tables(pos0..pos0 + t);
        let cos = Tensor::<B, 3>::from_data(TensorData::new(cos, [t, 1, d]), &device);
        let sin = Tensor::<B, 3>::from_data(TensorData::new(sin, [t, 1, d]), &device);
        for (l, b) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &b.attn_norm);
            let q = Self::rope(h.clone().matmul(b.wq.val()).reshape([t, nh, d]), &cos, &sin);
            let k = Self::rope(h.clone().matmul(b.wk.val()).reshape([t, nkv, d]), &cos, &sin);
            let v = h.matmul(b.wv.val()).reshape([t, nkv, d]);
            let attn = cached_attention(cache, l, q, k, v, self.scale())?;
            x = x + attn.matmul(b.wo.val());
            let h = self.rms_norm(x.clone(), &b.ffn_norm);
            let ff = silu(h.clone().matmul(b.w_gate.val())) * h.matmul(b.w_up.val());
            x = x + ff.matmul(b.w_down.val());
        }
        Ok(self.rms_norm(x, &self.norm))
    }

    /// Logits of the given rows of final hidden states, row-major `rows × vocab`.
    pub(crate) fn logits(&self, hidden: Tensor<B, 2>, rows: &[usize]) -> Result<Vec<f32>> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &self.device());
        to_vec(hidden.select(0, idx).matmul(self.lm_head.val()))
    }

    /// Prefills `tokens` in chunks of `chunk` tokens, calling `progress(done, total)` after each,
    /// then builds the cache's selectors. Returns the logits of each position in `logit_positions`
    /// (absolute positions inside this prompt), row-major.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        chunk: usize,
        logit_positions: &[usize],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if chunk == 0 {
            return Err(Error::invalid("chunk", "prefill chunk size must be at least 1"));
        }
        if let Some(&p) = logit_positions.iter().find(|&&p| p >= tokens.len()) {
            return Err(Error::invalid(
                "logit_positions",
                format!("position {p} is past the {}-token prompt", tokens.len()),
            ));
        }
        if cache.is_built() {
            return Err(Error::State("this cache was already prefilled; start a new one".into()));
        }
        let start = cache.len();
        cache.plan_training(start + tokens.len());
        let mut logits = vec![Vec::new(); logit_positions.len()];
        for (c, part) in tokens.chunks(chunk).enumerate() {
            let first = c * chunk;
            let hidden = self.forward(part, cache)?;
            let wanted: Vec<(usize, usize)> = logit_positions
                .iter()
                .enumerate()
                .filter(|(_, p)| (first..first + part.len()).contains(p))
                .map(|(i, p)| (i, p - first))
                .collect();
            if !wanted.is_empty() {
                let rows: Vec<usize> = wanted.iter().map(|w| w.1).collect();
                let out = self.logits(hidden, &rows)?;
                for ((i, _), row) in wanted.iter().zip(out.chunks_exact(self.config.vocab_size)) {
                    logits[*i] = row.to_vec();
                }
            }
            progress(first + part.len(), tokens.len());
        }
        cache.build(self.scale())?;
        Ok(logits.concat())
    }

    /// One decode step: feeds `token`, returns the next-token logits.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        if !cache.is_built() {
            return Err(Error::State("decode before prefill: prefill a prompt first".into()));
        }
        let hidden = self.forward(&[token], cache)?;
        cache.finish_step();
        self.logits(hidden, &[0])
    }

    /// Positions the model was trained for; longer contexts still run (RoPE extrapolates).
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }
}

/// `[rows, cols]` → `[cols, rows]`, row-major.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
