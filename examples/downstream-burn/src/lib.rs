//! # downstream-burn
//!
//! A Burn model of *your own* whose attention goes through needle. [`TinyLm`] stands for the
//! model of a user's project: token embedding, pre-norm transformer layers with grouped-query
//! attention (4 query heads, 2 KV heads), rotary positions, an MLP, RMSNorm and an output head,
//! all built from `burn::nn` modules with random weights.
//!
//! It has two forward paths over the same weights:
//! - [`TinyLm::forward_dense`]: the model's own causal attention, written with Burn tensor ops;
//! - [`TinyLm::forward_needle`]: each layer's attention is one call to
//!   [`needle_model::cached_attention`], which appends the layer's keys and values to a
//!   [`KvCache`] and attends to it — causal and dense while prefilling, through the cache's
//!   selectors (full, streaming, oracle, retrieval, …) when decoding one token at a time. The
//!   caller says which ([`AttentionStep`]); a step that does not fit the cache's state (a
//!   decode before [`KvCache::build`], say) is an error.
//!
//! `TinyLm<B>` runs on any backend with needle's [`NeedleBackend`] extension: burn's `Flex`
//! (needle's `Cpu`), its CubeCL backends (needle-model's `wgpu`/`cuda` features), `Autodiff` of
//! those (feature `autodiff`), or a backend of your own given the plain Burn-op version with
//! `needle_model::plain_backend!(MyBackend)`.
//!
//! The lifecycle of one sequence:
//! ```
//! use downstream_burn::{TinyLm, TinyLmConfig};
//! use needle_model::{AttentionStep, Cpu};
//!
//! let device = Default::default();
//! let model: TinyLm<Cpu> = TinyLmConfig::default().init(&device);
//! let mut cache = model.new_cache("full")?;
//! let prompt = [1, 2, 3, 4, 5];
//! let logits = model.forward_needle(&prompt, &mut cache, AttentionStep::Prefill)?; // [5, vocab]
//! cache.build(model.scale())?; // selectors are built from the prefilled keys
//! let mut next = downstream_burn::argmax_last(logits)?;
//! for _ in 0..4 {
//!     let logits = model.forward_needle(&[next], &mut cache, AttentionStep::Decode)?; // [1, vocab]
//!     cache.finish_step();
//!     next = downstream_burn::argmax_last(logits)?;
//! }
//! assert_eq!(cache.len(), 9);
//! # Ok::<(), needle_model::Error>(())
//! ```

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use needle_core::GqaLayout;
use needle_model::{AttentionStep, Error, KvCache, NeedleBackend, Result, cached_attention, compose};

/// Sizes of a [`TinyLm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TinyLmConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Transformer layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_q_heads: usize,
    /// Key/value heads (each serves `n_q_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// MLP inner size.
    pub d_ff: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Seed of the random initialisation.
    pub seed: u64,
}

impl Default for TinyLmConfig {
    fn default() -> Self {
        Self {
            vocab: 256,
            d_model: 64,
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            d_ff: 128,
            rope_theta: 10_000.0,
            seed: 42,
        }
    }
}

impl TinyLmConfig {
    /// A model with random weights (seeded with [`TinyLmConfig::seed`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> TinyLm<B> {
        B::seed(device, self.seed);
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let (q_out, kv_out) = (self.n_q_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                attn_norm: RmsNormConfig::new(self.d_model).with_epsilon(1e-5).init(device),
                wq: linear(self.d_model, q_out),
                wk: linear(self.d_model, kv_out),
                wv: linear(self.d_model, kv_out),
                wo: linear(q_out, self.d_model),
                mlp_norm: RmsNormConfig::new(self.d_model).with_epsilon(1e-5).init(device),
                up: linear(self.d_model, self.d_ff),
                down: linear(self.d_ff, self.d_model),
            })
            .collect();
        TinyLm {
            embed: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            blocks,
            norm: RmsNormConfig::new(self.d_model).with_epsilon(1e-5).init(device),
            head: linear(self.d_model, self.vocab),
            vocab: self.vocab,
            n_q_heads: self.n_q_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
        }
    }
}

/// One pre-norm transformer layer.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    attn_norm: RmsNorm<B>,
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    wo: Linear<B>,
    mlp_norm: RmsNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// The user's model: a small GQA transformer language model.
#[derive(Module, Debug)]
pub struct TinyLm<B: Backend> {
    embed: Embedding<B>,
    blocks: Vec<Block<B>>,
    norm: RmsNorm<B>,
    head: Linear<B>,
    vocab: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rope_theta: f32,
}

/// What [`TinyLm::greedy_needle`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Greedy {
    /// Prefill logits, row-major `prompt_len × vocab`.
    pub prefill: Vec<f32>,
    /// Logits of each decode step (`vocab` each): step `i` fed `tokens[i]`.
    pub steps: Vec<Vec<f32>>,
    /// Greedy tokens: `tokens[0]` from the prefill's last row, `tokens[i + 1]` from step `i`.
    pub tokens: Vec<u32>,
}

/// Which attention a forward pass uses.
enum Attention<'a, M> {
    /// The model's own causal attention over the tokens of this call (positions from 0).
    Dense,
    /// needle's [`cached_attention`] over everything in the cache, as the step says.
    Needle(&'a mut KvCache<M>, AttentionStep),
}

impl<B: NeedleBackend> TinyLm<B> {
    /// Attention scale `1/√head_dim`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Layers.
    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Query/KV head layout, as needle names it.
    pub fn gqa(&self) -> Result<GqaLayout> {
        Ok(GqaLayout::new(self.n_q_heads, self.n_kv_heads)?)
    }

    /// An empty needle cache for one sequence, its selectors named by `spec`
    /// (`full`, `streaming:sinks=4,window=64`, `retrieval:index=graph,k=16`, …).
    pub fn new_cache(&self, spec: &str) -> Result<KvCache<B::KvMirror>> {
        let (factory, sel_cfg) = compose(needle_select::parse(spec)?);
        KvCache::new(self.n_layers(), self.gqa()?, self.head_dim, factory.as_ref(), sel_cfg)
    }

    /// The original model: logits `[t, vocab]` of every position of `tokens` (positions `0..t`)
    /// with the model's own dense causal attention.
    pub fn forward_dense(&self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        self.forward(tokens, 0, Attention::<B::KvMirror>::Dense)
    }

    /// The same model with needle's attention: logits `[t, vocab]` of `tokens`, which take
    /// positions `cache.len()..`. Their keys and values are appended to `cache`. `step` says
    /// what they are: [`AttentionStep::Prefill`] before [`KvCache::build`] (causal dense
    /// attention), [`AttentionStep::Decode`] for one token after it (through the cache's
    /// selectors), [`AttentionStep::Extend`] for a dense chunk after it.
    pub fn forward_needle(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B::KvMirror>,
        step: AttentionStep,
    ) -> Result<Tensor<B, 2>> {
        let pos0 = cache.len();
        self.forward(tokens, pos0, Attention::Needle(cache, step))
    }

    /// Greedy generation through needle, the whole lifecycle: prefill `prompt` into the empty
    /// `cache`, [`KvCache::build`] its selectors, then `steps` decode steps of one token each,
    /// [`KvCache::finish_step`] after each.
    pub fn greedy_needle(&self, prompt: &[u32], steps: usize, cache: &mut KvCache<B::KvMirror>) -> Result<Greedy> {
        if !cache.is_empty() || cache.is_built() {
            return Err(Error::State("greedy_needle takes an empty cache".into()));
        }
        cache.plan_training(prompt.len()); // which prefill queries the selectors train on
        let prefill = to_host(self.forward_needle(prompt, cache, AttentionStep::Prefill)?)?;
        cache.build(self.scale())?;
        let mut next = argmax(&prefill[prefill.len() - self.vocab..])?;
        let (mut tokens, mut step_logits) = (vec![next], Vec::with_capacity(steps));
        for _ in 0..steps {
            let logits = to_host(self.forward_needle(&[next], cache, AttentionStep::Decode)?)?;
            cache.finish_step();
            next = argmax(&logits)?;
            tokens.push(next);
            step_logits.push(logits);
        }
        Ok(Greedy { prefill, steps: step_logits, tokens })
    }

    fn forward(&self, tokens: &[u32], pos0: usize, mut attention: Attention<'_, B::KvMirror>) -> Result<Tensor<B, 2>> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::TokenOutOfRange { id, vocab: self.vocab });
        }
        let (t, nh, nkv, d) = (tokens.len(), self.n_q_heads, self.n_kv_heads, self.head_dim);
        let device = self.embed.weight.device();
        let ids: Vec<i64> = tokens.iter().map(|&id| i64::from(id)).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, t]), &device);
        let mut x: Tensor<B, 2> = self.embed.forward(ids).squeeze_dim(0);
        let (cos, sin) = self.rope_tables(pos0, t, &device);
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(x.clone());
            let q = rope(b.wq.forward(h.clone()).reshape([t, nh, d]), &cos, &sin);
            let k = rope(b.wk.forward(h.clone()).reshape([t, nkv, d]), &cos, &sin);
            let v = b.wv.forward(h).reshape([t, nkv, d]);
            let attn = match &mut attention {
                Attention::Dense => dense_causal_attention(q, k, v, self.scale()),
                // The one line that puts needle in the model: keys are given after RoPE.
                Attention::Needle(cache, step) => cached_attention(cache, layer, *step, q, k, v, self.scale())?,
            };
            x = x + b.wo.forward(attn);
            let h = b.mlp_norm.forward(x.clone());
            x = x + b.down.forward(silu(b.up.forward(h)));
        }
        Ok(self.head.forward(self.norm.forward(x)))
    }

    /// Rotate-half RoPE tables `[t, 1, head_dim]` for positions `pos0..pos0 + t`.
    fn rope_tables(&self, pos0: usize, t: usize, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let half = self.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t * self.head_dim), Vec::with_capacity(t * self.head_dim));
        for p in pos0..pos0 + t {
            for _ in 0..2 {
                for i in 0..half {
                    let angle = p as f64 * f64::from(self.rope_theta).powf(-2.0 * i as f64 / self.head_dim as f64);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = [t, 1, self.head_dim];
        (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
    }
}

/// Rotate-half RoPE on `[t, heads, dim]` with `[t, 1, dim]` tables.
fn rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [t, h, d] = x.dims();
    let x1 = x.clone().slice([0..t, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone().expand([t, h, d]) + rotated * sin.clone().expand([t, h, d])
}

/// The model's own attention: `softmax(q·kᵀ·scale + causal mask)·v` over the `t` tokens of one
/// call, each KV head repeated over its group of query heads (query head `h` reads KV head
/// `h / (n_q_heads / n_kv_heads)`). `q` is `[t, n_q_heads, d]`, `k` and `v` `[t, n_kv_heads, d]`;
/// returns `[t, n_q_heads * d]`.
pub fn dense_causal_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    scale: f32,
) -> Tensor<B, 2> {
    let ([t, nh, d], [_, nkv, _]) = (q.dims(), k.dims());
    let group = nh / nkv;
    let repeat =
        |x: Tensor<B, 3>| x.unsqueeze_dim::<4>(2).expand([t, nkv, group, d]).reshape([t, nh, d]).swap_dims(0, 1);
    let (q, k, v) = (q.swap_dims(0, 1), repeat(k), repeat(v)); // [heads, t, d]
    let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale); // [heads, t, t]
    let future = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &scores.device()).unsqueeze_dim::<3>(0).expand([nh, t, t]);
    let probs = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 2);
    probs.matmul(v).swap_dims(0, 1).reshape([t, nh * d])
}

/// Reads `[t, vocab]` logits back to the host, row-major.
pub fn to_host<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<f32>> {
    logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| Error::Data(format!("{e:?}")))
}

/// The greedy next token after the last row of `[t, vocab]` logits.
pub fn argmax_last<B: Backend>(logits: Tensor<B, 2>) -> Result<u32> {
    let [t, vocab] = logits.dims();
    argmax(&to_host(logits.slice([t - 1..t, 0..vocab]))?)
}

/// The index of the largest logit of one row.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    needle_model::argmax(logits).ok_or_else(|| Error::Data("no logits".into()))
}
