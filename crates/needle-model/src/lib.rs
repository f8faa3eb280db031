//! # needle-model
//!
//! A Llama-family language model on [Burn](https://burn.dev) whose decode attention goes
//! through needle's [`AttentionSelector`](needle_core::AttentionSelector) contract: each layer
//! and KV head attends densely to a static part and to what its selector picks from the rest,
//! merged exactly by log-sum-exp. Full attention is the [`FullSelector`](needle_core::FullSelector).
//!
//! [`Llama`] is a Burn `Module`. A model of your own routes its attention through the same
//! entry point, [`cached_attention`], one call per layer (see `examples/downstream-burn`).
//!
//! ## Features
//! The model composes the selectors it is handed ([`compose`] a [`SelectorSpec`]); spec
//! strings are resolved by needle-select, whose features choose the index crates.
//!
//! - `wgpu`, `cuda`: the `burn::backend::Wgpu` / `Cuda` backends with needle's CubeCL kernels as
//!   their [`NeedleBackend`] arm (module `cube`): weights stay quantized on the device, the
//!   cache's rows are mirrored there, decode is a hybrid step (device static part, host
//!   selection and retrieved rows, one merge).
//! - `autodiff`: [`NeedleBackend`] for `burn::backend::Autodiff<B>` (`B`'s ops, forward only).
//!
//! ## Backends
//! [`NeedleBackend`] is a Burn backend extension implemented per backend type (module
//! [`backend`]): the model and [`cached_attention`] are generic over `B: NeedleBackend`, and a
//! backend of your own gets the plain Burn-op version with [`plain_backend!`]. A model on `B`
//! takes a `KvCache<B::KvMirror>` (plain [`KvCache`] on the CPU).
//!
//! ## Engine
//! [`Llama::load`] keeps GGUF weights in their blocks ([`Weights::Native`]); on the CPU backend
//! the fused kernels of needle-kernels-cpu run them ([`NeedleBackend`], module [`backend`]).
//! [`Llama::load_with`] with [`Weights::F32`] is the f32 reference path.
//!
//! ## Usage
//! ```no_run
//! use needle_model::{Cpu, KvCache, Llama, generate, GenerateConfig, compose};
//! let ck = needle_loader::open(std::path::Path::new("model.gguf"))?;
//! let model = Llama::<Cpu>::load(&ck, &Default::default())?;
//! let tok = ck.tokenizer()?;
//! // Specs are resolved by the caller: needle-select knows the built-ins and the plugins.
//! let (factory, sel) = compose(needle_select::parse("full")?);
//! let cfg = model.config();
//! let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
//! let prompt = tok.encode("The capital of France is", false)?;
//! let out = generate(&model, &tok, &prompt, &mut cache, &GenerateConfig::default(), &mut |s| print!("{s}"), &mut |_, _| {})?;
//! # Ok::<(), needle_model::Error>(())
//! ```
#![warn(missing_docs)]

mod attention;
pub mod backend;
mod background;
mod cache;
pub mod context;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod decode;
mod error;
mod generate;
mod model;
mod rope;
mod sampling;
mod spec;
#[cfg(test)]
mod testutil;
mod weights;

pub use attention::{AttentionStep, cached_attention};
pub use backend::NeedleBackend;
pub use cache::{
    DecodeMode, DecodeProfile, DecodeStats, DynamicPart, KvCache, LayerKind, PAGE_SIZE, QueryTrace, SelectionConfig,
    StepTimes,
};
pub use error::{Error, Result};
pub use generate::{GenerateConfig, Generation, StopReason, generate, generate_from, prefill_then_extend};
pub use model::Llama;
/// A parsed selector spec (from `needle_select::parse` or built by hand), what [`compose`] takes.
pub use needle_core::SelectorSpec;
/// The query/KV head layout a [`KvCache`] is made for (re-exported so a model needs no
/// `needle-core` dependency to build one).
pub use needle_core::{GqaLayout, KvDtype};
/// The ggml block types weights are kept in ([`Llama::random`] takes one).
pub use needle_kernels_cpu::QuantType;
/// Memory budgets of the KV tiers ([`KvCache::set_kv_budget`]).
pub use needle_kv::TierBudget;
pub use rope::Rope;
pub use sampling::{Sampler, SamplingConfig, argmax};
pub use spec::compose;
pub use weights::{LinearWeight, LoadOptions, QWeight, Weights};

/// The CPU backend (burn's pure-Rust Flex).
pub type Cpu = burn::backend::Flex;
