//! Llama-family transformer on Burn: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
//! tied or separate output head (Touvron et al. 2023; the Hugging Face Llama layout), with the
//! switches of the other supported families: q/k/v biases (Qwen2), per-head q/k RMSNorm before
//! RoPE (Qwen3), and Mistral's sliding window (contexts past it are refused).
//!
//! The model is a Burn [`Module`]. With [`Weights::Native`] (the default) on the CPU backend, the
//! linear weights stay in the checkpoint's blocks (a GGUF memory map) and run through
//! [`NeedleBackend`]'s fused ops; with [`Weights::F32`] (or on plain-op backends) they are f32 Burn
//! parameters transposed to `[in, out]` so a layer is `x · W`. Every layer's attention goes
//! through [`cached_attention`]: keys and values leave the model after RoPE into the host-tier
//! [`KvCache`]; prefill attends causally over the cache, decode goes through the cache's selectors.

use burn::module::{
    AutodiffModule, Content, Devices, EmptyRecord, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor, Param,
};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use needle_core::GqaLayout;
use needle_loader::{Checkpoint, HostTensor, LlamaConfig};
use std::time::{Duration, Instant};

use crate::attention::{AttentionStep, cached_attention};
use crate::backend::{NeedleBackend, plain};
use crate::cache::{KvCache, LayerKind};
use crate::error::{Error, Result};
use crate::rope::Rope;
use crate::weights::{LinearWeight, LoadOptions, QWeight, Weights};

/// A linear layer's weight: an f32 parameter `[in, out]` (so the layer is `x · W`), or the
/// checkpoint's blocks for [`NeedleBackend::qlinear`] (`x · Wᵀ`, `W` as stored `[out, in]`)
/// with the backend's device copy beside them.
#[derive(Module, Debug)]
struct Linear<B: NeedleBackend> {
    dense: Option<Param<Tensor<B, 2>>>,
    native: Native<B>,
}

/// The stored blocks of a linear and the backend's device copy beside them: a module without
/// parameters (no record), so that the model's inner (non-autodiff) module gets its own copy
/// of the inner backend's type, made again on first use.
#[derive(Debug)]
struct Native<B: NeedleBackend>(Option<LinearWeight<B::DeviceWeight>>);

impl<B: NeedleBackend> Clone for Native<B> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<B: NeedleBackend> Module<B> for Native<B> {
    type Record = EmptyRecord;

    fn visit<V: ModuleVisitor<B>>(&self, _: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _: &mut M) -> Self {
        self
    }

    fn load_record(self, _: Self::Record) -> Self {
        self
    }

    fn into_record(self) -> Self::Record {
        EmptyRecord::new()
    }

    fn to_device(self, _: &B::Device) -> Self {
        // A copy made on another device is not this one's: made again on first use.
        Self(self.0.map(|w| LinearWeight::new(w.weight().clone())))
    }

    fn fork(self, device: &B::Device) -> Self {
        self.to_device(device)
    }

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        devices
    }
}

impl<B: AutodiffBackend + NeedleBackend> AutodiffModule<B> for Native<B>
where
    B::InnerBackend: NeedleBackend,
{
    type InnerModule = Native<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        Native(self.0.as_ref().map(|w| LinearWeight::new(w.weight().clone())))
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        Native(module.0.map(|w| LinearWeight::new(w.weight().clone())))
    }
}

impl<B: NeedleBackend> ModuleDisplayDefault for Native<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&format!("{:?}", self.0.as_ref().map(|w| w.weight()))).optional()
    }
}

impl<B: NeedleBackend> ModuleDisplay for Native<B> {}

impl<B: NeedleBackend> Linear<B> {
    fn stored(w: QWeight) -> Self {
        Self { dense: None, native: Native(Some(LinearWeight::new(w))) }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        match (&self.native.0, &self.dense) {
            (Some(w), _) => B::qlinear(x, w),
            (None, Some(w)) => Ok(x.matmul(w.val())),
            (None, None) => Err(Error::State("a linear layer has no weight".into())),
        }
    }

    fn native_bytes(&self) -> usize {
        self.native.0.as_ref().map_or(0, |w| w.bytes())
    }
}

/// `x` through several linears sharing it: one fused call when all keep stored blocks.
fn forward_many<B: NeedleBackend>(x: Tensor<B, 2>, ls: &[&Linear<B>]) -> Result<Vec<Tensor<B, 2>>> {
    match ls.iter().map(|l| l.native.0.as_ref()).collect::<Option<Vec<_>>>() {
        Some(ws) => B::qlinear_many(x, &ws),
        None => ls.iter().map(|l| l.forward(x.clone())).collect(),
    }
}

/// What [`Llama::layers`] attends with: `(layer, q, k, v)` (`[t, heads, dim]` each) → `[t, heads·dim]`.
type Attend<'a, B> = dyn FnMut(usize, Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) -> Result<Tensor<B, 2>> + 'a;

/// The `N` outputs of linears that shared one input, as an array.
fn take<B: NeedleBackend, const N: usize>(outs: Vec<Tensor<B, 2>>) -> Result<[Tensor<B, 2>; N]> {
    outs.try_into().map_err(|_| Error::State("a fused linear returned the wrong number of outputs".into()))
}

/// One transformer layer's weights.
#[derive(Module, Debug)]
struct Block<B: NeedleBackend> {
    attn_norm: Param<Tensor<B, 2>>,
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    wo: Linear<B>,
    ffn_norm: Param<Tensor<B, 2>>,
    w_gate: Linear<B>,
    w_up: Linear<B>,
    w_down: Linear<B>,
    /// Biases `[1, out]` of the q, k and v projections (Qwen2).
    bias_q: Option<Param<Tensor<B, 2>>>,
    bias_k: Option<Param<Tensor<B, 2>>>,
    bias_v: Option<Param<Tensor<B, 2>>>,
    /// RMSNorm weights `[1, head_dim]` of every query and key head, before RoPE (Qwen3, Gemma 3).
    q_norm: Option<Param<Tensor<B, 2>>>,
    k_norm: Option<Param<Tensor<B, 2>>>,
    /// RMSNorm weights `[1, hidden]` of the attention's and the feed-forward's outputs, before
    /// each joins the residual (Gemma 3's sandwich norms).
    post_attn_norm: Option<Param<Tensor<B, 2>>>,
    post_ffn_norm: Option<Param<Tensor<B, 2>>>,
}

impl<B: NeedleBackend> Block<B> {
    fn linears(&self) -> [&Linear<B>; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_gate, &self.w_up, &self.w_down]
    }
}

/// A Llama-family causal language model, as a Burn [`Module`].
#[derive(Module, Debug)]
pub struct Llama<B: NeedleBackend> {
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    gqa: GqaLayout,
    #[module(skip)]
    rope: Rope,
    /// RoPE of the sliding-window layers, when they have their own base (Gemma 3).
    #[module(skip)]
    local_rope: Option<Rope>,
    /// `[vocab, hidden]` rows: a parameter on the f32 path, else the checkpoint's blocks.
    embed: Linear<B>,
    blocks: Vec<Block<B>>,
    norm: Param<Tensor<B, 2>>,
    lm_head: Linear<B>,
    /// Whether the decoder ops run fused ([`NeedleBackend`]) rather than as plain Burn ops.
    #[module(skip)]
    fused: bool,
}

impl<B: NeedleBackend> Llama<B> {
    /// Loads weights by checkpoint name (Hugging Face names; GGUF files are mapped by the
    /// loader), kept as stored ([`Weights::Native`]).
    pub fn load(ck: &Checkpoint, device: &B::Device) -> Result<Self> {
        Self::load_with(ck, device, &LoadOptions::default())
    }

    /// Loads weights as `opts` says. [`Weights::Native`] on a backend with fused linears
    /// ([`NeedleBackend::fuses_linear`], the CPU backend) keeps GGUF weights in their blocks,
    /// memory-mapped, and runs the fused ops; elsewhere, and with [`Weights::F32`], every weight
    /// is an f32 Burn parameter and the layers are plain Burn ops.
    pub fn load_with(ck: &Checkpoint, device: &B::Device, opts: &LoadOptions) -> Result<Self> {
        let cfg = ck.config().clone();
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let gqa = GqaLayout::new(cfg.num_attention_heads, cfg.num_key_value_heads)?;
        let native = opts.weights == Weights::Native && B::fuses_linear();
        let get = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            let t = ck.tensor(name)?;
            if t.shape != shape {
                return Err(Error::Shape { tensor: name.into(), expected: shape.to_vec(), got: t.shape.clone() });
            }
            Ok(t)
        };
        let param = |data: Vec<f32>, shape: [usize; 2]| {
            Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device))
        };
        let stored = |name: &str, out: usize, inp: usize| -> Result<QWeight> {
            if let Some(raw) = ck.tensor_blocks(name)? {
                match QWeight::from_raw(name, raw) {
                    Ok(w) => return Ok(w),
                    // A ggml type the kernels do not handle: dequantized by the loader below.
                    Err(Error::Kernel { source: needle_kernels_cpu::Error::UnsupportedType(_), .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            QWeight::from_f32(name, &get(name, &[out, inp])?.data, out, inp)
        };
        // HF linear weights are [out, in]; the f32 path stores [in, out].
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear<B>> {
            if native {
                return Ok(Linear::stored(stored(name, out, inp)?));
            }
            let t = get(name, &[out, inp])?;
            Ok(Linear { dense: Some(param(transpose(&t.data, out, inp), [inp, out])), native: Native(None) })
        };
        let vector = |name: &str, n: usize| -> Result<Param<Tensor<B, 2>>> { Ok(param(get(name, &[n])?.data, [1, n])) };
        let (embed, lm_head) = if native {
            let e = Linear::stored(stored("model.embed_tokens.weight", cfg.vocab_size, h)?);
            // Tied: one weight, so the device copy is made once.
            let head = if cfg.tie_word_embeddings {
                Linear { dense: None, native: e.native.clone() }
            } else {
                linear("lm_head.weight", cfg.vocab_size, h)?
            };
            (e, head)
        } else {
            let embed_host = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
            let head = if cfg.tie_word_embeddings {
                Linear {
                    dense: Some(param(transpose(&embed_host.data, cfg.vocab_size, h), [h, cfg.vocab_size])),
                    native: Native(None),
                }
            } else {
                linear("lm_head.weight", cfg.vocab_size, h)?
            };
            (Linear { dense: Some(param(embed_host.data, [cfg.vocab_size, h])), native: Native(None) }, head)
        };
        let (qd, kvd, ff) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size);
        let optional = |on: bool, name: &str, n: usize| on.then(|| vector(name, n)).transpose();
        let gemma = cfg.architecture == needle_loader::Architecture::Gemma3;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                Ok(Block {
                    bias_q: optional(cfg.qkv_bias, &p("self_attn.q_proj.bias"), qd)?,
                    bias_k: optional(cfg.qkv_bias, &p("self_attn.k_proj.bias"), kvd)?,
                    bias_v: optional(cfg.qkv_bias, &p("self_attn.v_proj.bias"), kvd)?,
                    q_norm: optional(cfg.qk_norm, &p("self_attn.q_norm.weight"), d)?,
                    k_norm: optional(cfg.qk_norm, &p("self_attn.k_norm.weight"), d)?,
                    post_attn_norm: optional(gemma, &p("post_attention_norm.weight"), h)?,
                    post_ffn_norm: optional(gemma, &p("post_feedforward_layernorm.weight"), h)?,
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
        Ok(Self {
            rope: Rope::new(&cfg),
            local_rope: local_rope(&cfg),
            gqa,
            config: cfg,
            embed,
            blocks,
            norm,
            lm_head,
            fused: native,
        })
    }

    /// A model of `config`'s shape with seeded random weights, linear weights quantized to `ty`
    /// in memory ([`Checkpoint::random`]); no file, no tokenizer. For benchmarks and memory runs
    /// at real shapes: `Llama::random(&LlamaConfig::preset("smollm2-135m")?, QuantType::Q8_0, 7, &device)`.
    pub fn random(
        config: &LlamaConfig,
        ty: needle_kernels_cpu::QuantType,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load(&Checkpoint::random(config, ty, seed)?, device)
    }

    /// The same weights under a changed config: RoPE (`rope_theta`, `rope_scaling`), the
    /// sliding window, the special ids. Anything that shapes the weights must stay as it is.
    pub fn with_config(mut self, config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        let shape = |c: &LlamaConfig| {
            (
                (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers),
                (
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    c.tie_word_embeddings,
                    c.qkv_bias,
                    c.qk_norm,
                ),
            )
        };
        if shape(&config) != shape(&self.config) {
            return Err(Error::invalid("config", "with_config changes RoPE, the sliding window and special ids only"));
        }
        self.rope = Rope::new(&config);
        self.local_rope = local_rope(&config);
        self.config = config;
        Ok(self)
    }

    /// What each layer attends to: a window for the sliding-window layers of a model that has
    /// them ([`LlamaConfig::local_attention`]), everything otherwise. A cache takes these kinds
    /// on the model's first forward pass ([`KvCache::set_layer_kinds`]).
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        (0..self.config.num_hidden_layers)
            .map(|l| self.config.layer_window(l).map_or(LayerKind::Global, LayerKind::Window))
            .collect()
    }

    /// How the weights are kept: [`Weights::Native`] when the fused kernels run on stored blocks.
    pub fn weights(&self) -> Weights {
        if self.fused { Weights::Native } else { Weights::F32 }
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Query/KV head layout.
    pub fn gqa(&self) -> GqaLayout {
        self.gqa
    }

    /// Attention scale: `1/√head_dim`, or Gemma's `1/√query_pre_attn_scalar`.
    pub fn scale(&self) -> f32 {
        self.config.attention_scale()
    }

    /// Bytes of weights a decode step reads: f32 parameters plus stored blocks (the tied
    /// embedding counted once, as the output head).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().flat_map(|b| b.linears()).map(Linear::native_bytes).sum();
        Module::num_params(self) * 4 + blocks + self.lm_head.native_bytes()
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab: self.config.vocab_size }),
            None => Ok(()),
        }
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Param<Tensor<B, 2>>) -> Result<Tensor<B, 2>> {
        let eps = self.config.rms_norm_eps as f32;
        if self.fused { B::fused_rms_norm(x, &w.val(), eps) } else { Ok(plain::rms_norm(x, &w.val(), eps)) }
    }

    /// `[t, heads × dim]` → `[t, heads, dim]`, each head RMS-normalised when `norm` is given.
    fn heads(&self, x: Tensor<B, 2>, heads: usize, norm: &Option<Param<Tensor<B, 2>>>) -> Result<Tensor<B, 3>> {
        let (t, d) = (x.dims()[0], self.config.head_dim);
        Ok(match norm {
            Some(w) => self.rms_norm(x.reshape([t * heads, d]), w)?.reshape([t, heads, d]),
            None => x.reshape([t, heads, d]),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.norm.val().device()
    }

    /// Token embeddings `[t, hidden]`.
    fn embed(&self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let (t, h, device) = (tokens.len(), self.config.hidden_size, self.device());
        match (&self.embed.native.0, &self.embed.dense) {
            (Some(w), _) => {
                let mut x = vec![0f32; t * h];
                for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
                    w.row(id as usize, row)?;
                }
                Ok(Tensor::from_data(TensorData::new(x, [t, h]), &device))
            }
            (None, Some(e)) => {
                let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
                let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [t]), &device);
                Ok(e.val().select(0, ids))
            }
            (None, None) => Err(Error::State("the embedding has no weight".into())),
        }
    }

    /// Runs `tokens` (at positions `cache.len()..`) through the model, appending their keys and
    /// values to the cache, and returns the final-normed hidden states `[t, hidden]`.
    /// `step` says what the tokens are in the cache's lifecycle ([`cached_attention`]).
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B::KvMirror>,
        step: AttentionStep,
    ) -> Result<Tensor<B, 2>> {
        self.check_tokens(tokens)?;
        cache.set_layer_kinds(&self.layer_kinds())?;
        let (t, pos0) = (tokens.len(), cache.len());
        if let Some(w) = self.config.sliding_window
            && pos0 + t > w
        {
            return Err(Error::invalid(
                "sliding_window",
                format!(
                    "the model attends to its last {w} positions only and needle attends to all: \
                     {} tokens is past the window (contexts up to {w} are exact)",
                    pos0 + t
                ),
            ));
        }
        let d = self.config.head_dim;
        let device = self.device();
        let x = self.embed_scaled(tokens)?;
        let rope = RopeTables::new(self.fused, &self.rope, pos0..pos0 + t, d, &device);
        let local = self.local_rope.as_ref().map(|r| RopeTables::new(self.fused, r, pos0..pos0 + t, d, &device));
        let scale = self.scale();
        let mut attend = |l: usize, q, k, v| cached_attention(cache, l, step, q, k, v, scale);
        let (hidden, weights) = self.layers(x, (&rope, local.as_ref()), false, &mut attend)?;
        cache.last_weights_time = weights;
        Ok(hidden)
    }

    /// The token embeddings, scaled by √hidden for Gemma 3.
    fn embed_scaled(&self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let x = self.embed(tokens)?;
        Ok(match self.config.architecture {
            needle_loader::Architecture::Gemma3 => x * (self.config.hidden_size as f32).sqrt(),
            _ => x,
        })
    }

    /// The transformer blocks over embedded rows `x` (`[t, hidden]`), then the final norm: the one
    /// layer computation of prefill, extension, decode and batched decode. `ropes` are the global
    /// and (if the model has them) local layers' tables for the rows; `attend(layer, q, k, v)`
    /// attends the rows (`[t, heads, dim]` each) and returns `[t, heads·dim]`. With `rows`, each
    /// row goes through the linears as a lone decode row does ([`NeedleBackend::qlinear_rows`]).
    /// Also returns the time spent in the linears (the decode profile's weights).
    fn layers(
        &self,
        mut x: Tensor<B, 2>,
        ropes: (&RopeTables<B>, Option<&RopeTables<B>>),
        rows: bool,
        attend: &mut Attend<'_, B>,
    ) -> Result<(Tensor<B, 2>, Duration)> {
        let (nh, nkv, d) = (self.gqa.n_q_heads, self.gqa.n_kv_heads, self.config.head_dim);
        let t = x.dims()[0];
        let gemma = self.config.architecture == needle_loader::Architecture::Gemma3;
        let mut weights = Duration::ZERO;
        let mut linear = |x: Tensor<B, 2>, ls: &[&Linear<B>]| -> Result<Vec<Tensor<B, 2>>> {
            let t0 = Instant::now();
            let out = if rows { batch::rows_many(x, ls)? } else { forward_many(x, ls)? };
            weights += t0.elapsed();
            Ok(out)
        };
        for (l, b) in self.blocks.iter().enumerate() {
            let rope = match (ropes.1, self.config.layer_window(l)) {
                (Some(local), Some(_)) => local,
                _ => ropes.0,
            };
            let h = self.rms_norm(x.clone(), &b.attn_norm)?;
            let [q, k, v]: [Tensor<B, 2>; 3] = take(linear(h, &[&b.wq, &b.wk, &b.wv])?)?;
            let bias = |x: Tensor<B, 2>, b: &Option<Param<Tensor<B, 2>>>| match b {
                Some(b) => x + b.val(),
                None => x,
            };
            let (q, k, v) = (bias(q, &b.bias_q), bias(k, &b.bias_k), bias(v, &b.bias_v));
            let q = rope.apply(self.heads(q, nh, &b.q_norm)?)?;
            let k = rope.apply(self.heads(k, nkv, &b.k_norm)?)?;
            let v = v.reshape([t, nkv, d]);
            let attn = attend(l, q, k, v)?;
            let [o] = take(linear(attn, &[&b.wo])?)?;
            x = x + self.post_norm(o, &b.post_attn_norm)?;
            let h = self.rms_norm(x.clone(), &b.ffn_norm)?;
            let [gate, up] = take(linear(h, &[&b.w_gate, &b.w_up])?)?;
            let ff = if gemma && self.fused {
                B::fused_gelu_mul(gate, up)?
            } else if gemma {
                plain::gelu_mul(gate, up)
            } else if self.fused {
                B::fused_silu_mul(gate, up)?
            } else {
                plain::silu_mul(gate, up)
            };
            let [down] = take(linear(ff, &[&b.w_down])?)?;
            x = x + self.post_norm(down, &b.post_ffn_norm)?;
        }
        Ok((self.rms_norm(x, &self.norm)?, weights))
    }

    /// `x`, RMS-normalised when the block has the norm (Gemma 3's norms after attention and MLP).
    fn post_norm(&self, x: Tensor<B, 2>, w: &Option<Param<Tensor<B, 2>>>) -> Result<Tensor<B, 2>> {
        match w {
            Some(w) => self.rms_norm(x, w),
            None => Ok(x),
        }
    }

    /// Logits of the given rows of final hidden states, row-major `rows × vocab`.
    pub(crate) fn logits(&self, hidden: Tensor<B, 2>, rows: &[usize]) -> Result<Vec<f32>> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &self.device());
        let mut logits = B::with_host(self.lm_head.forward(hidden.select(0, idx))?, <[f32]>::to_vec)?;
        if let Some(cap) = self.config.final_logit_softcapping {
            let cap = cap as f32;
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(logits)
    }

    /// Prefills `tokens` in chunks of `chunk` tokens, calling `progress(done, total)` after each,
    /// then builds the cache's selectors. Returns the logits of each position in `logit_positions`
    /// (absolute positions inside this prompt), row-major.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B::KvMirror>,
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
        let logits = self.run_chunks(tokens, cache, AttentionStep::Prefill, chunk, logit_positions, progress)?;
        cache.build(self.scale())?;
        Ok(logits)
    }

    /// Feeds `tokens` to a prefilled (built) cache in chunks of `chunk` tokens — a question
    /// after a saved document, say — and returns the logits after the last one. Each chunk
    /// attends densely to everything before it, as prefill does ([`AttentionStep::Extend`]); a
    /// chunk of one token is a decode step through the selectors. The tokens that leave the
    /// window join the selectors as decode tokens do.
    pub fn extend(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B::KvMirror>,
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if !cache.is_built() {
            return Err(Error::State("extend needs a prefilled cache: prefill (or load) one first".into()));
        }
        if tokens.is_empty() || chunk == 0 {
            return Err(Error::invalid("tokens/chunk", "extend needs at least one token and a chunk of at least 1"));
        }
        self.run_chunks(tokens, cache, AttentionStep::Extend, chunk, &[tokens.len() - 1], progress)
    }

    /// The forward passes of [`Llama::prefill`] and [`Llama::extend`]: chunk by chunk, keeping
    /// the logits at `logit_positions`.
    fn run_chunks(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B::KvMirror>,
        step: AttentionStep,
        chunk: usize,
        logit_positions: &[usize],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let mut logits = vec![Vec::new(); logit_positions.len()];
        for (c, part) in tokens.chunks(chunk).enumerate() {
            let first = c * chunk;
            // A one-token part of an extension is a decode step through the selectors (as it
            // always was: the extended logits stay what they were).
            let step = if step == AttentionStep::Extend && part.len() == 1 { AttentionStep::Decode } else { step };
            let hidden = self.forward(part, cache, step)?;
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
        Ok(logits.concat())
    }

    /// One decode step: feeds `token`, returns the next-token logits.
    pub fn decode(&self, token: u32, cache: &mut KvCache<B::KvMirror>) -> Result<Vec<f32>> {
        if !cache.is_built() {
            return Err(Error::State("decode before prefill: prefill a prompt first".into()));
        }
        let (before, t0) = (cache.stats, Instant::now());
        let hidden = self.forward(&[token], cache, AttentionStep::Decode)?;
        cache.finish_step();
        let t1 = Instant::now();
        let logits = self.logits(hidden, &[0])?;
        let weights = cache.last_weights_time + t1.elapsed();
        cache.stats.account_decode_step(&before, t0.elapsed(), weights);
        Ok(logits)
    }

    /// Positions the model was trained for; longer contexts still run (RoPE extrapolates).
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }
}

/// The RoPE of a config's sliding-window layers when they have their own base: that base,
/// unscaled (llama.cpp's `rope_freq_base_train_swa`, `rope_freq_scale_train_swa = 1`).
fn local_rope(cfg: &LlamaConfig) -> Option<Rope> {
    cfg.local_attention
        .map(|la| Rope::new(&LlamaConfig { rope_theta: la.rope_theta, rope_scaling: None, ..cfg.clone() }))
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

/// RoPE tables for a run of positions, in the form the chosen ops read: half tables
/// `[t, dim/2]` for the fused op, full `[t, 1, dim]` for the plain Burn ops of the f32 path.
enum RopeTables<B: NeedleBackend> {
    Half(Tensor<B, 2>, Tensor<B, 2>),
    Full(Tensor<B, 3>, Tensor<B, 3>),
}

impl<B: NeedleBackend> RopeTables<B> {
    fn new(fused: bool, rope: &Rope, positions: std::ops::Range<usize>, d: usize, device: &B::Device) -> Self {
        let t = positions.len();
        if fused {
            let (cos, sin) = rope.half_tables(positions);
            let table = |v| Tensor::<B, 2>::from_data(TensorData::new(v, [t, d / 2]), device);
            RopeTables::Half(table(cos), table(sin))
        } else {
            let (cos, sin) = rope.tables(positions);
            let table = |v| Tensor::<B, 3>::from_data(TensorData::new(v, [t, 1, d]), device);
            RopeTables::Full(table(cos), table(sin))
        }
    }

    /// Rotates `[t, heads, dim]`.
    fn apply(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        match self {
            RopeTables::Half(cos, sin) => B::fused_rope(x, cos, sin),
            RopeTables::Full(cos, sin) => Ok(plain::rope_full(x, cos, sin)),
        }
    }
}

// Batched decode (several sequences, one pass over the weights) lives beside the model.
mod batch;
