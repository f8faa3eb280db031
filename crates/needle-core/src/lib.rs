//! # needle-core
//!
//! The contracts every needle crate and plugin builds on, the exact math they are checked
//! against, and the kit a plugin author needs. No Burn, no GPU, no kernels, no files: plain Rust
//! on slices. It depends on **no needle crate** (the fast paths live in the crates that own them:
//! the SIMD kernels in needle-kernels-cpu, the decode fast path in needle-model, the spill and
//! context files in needle-kv) and uses nothing OS-specific, so it builds on every platform Rust
//! does and a plugin that depends on it pulls none of that.
//!
//! - [`AttentionSelector`] / [`SelectorFactory`]: per layer and KV head, which dynamic-part keys
//!   a decode query group attends to, within a [`Budget`], beside a densely attended
//!   [`StaticPart`] (sinks + window); [`attend_selected`] is the reference attention over them.
//! - [`VectorIndex`]: maximum-inner-product search (build with optional training queries,
//!   batch search, insert), with [`FlatIndex`] as exact oracle.
//! - [`prefill::PrefillPattern`]: which key blocks each query block of a prefill chunk attends to.
//! - [`RowSource`], [`Rows`], [`PagedRows`]: KV rows by token position, in fixed-size pages,
//!   stored as `f32`, `f16` or `q8` ([`KvDtype`], read as a [`Row`]). A page ([`PageBuf`]) is in
//!   RAM or read in place from bytes a storage tier holds ([`PageBytes`]); a full page can leave
//!   RAM for a tier ([`PageSpill`], implemented over memory-mapped files by needle-kv).
//! - [`attention`]: dense, sparse and weighted attention with log-sum-exp, the exact merge,
//!   causal prefill chunks, GQA layout; accumulate in `f32` or `f64`.
//! - [`kit`]: what every selector needs — input checks, [`kit::dot`], group scores, top-k,
//!   budgets, costs.
//! - [`spec`]: the one spec grammar (`name[:key=value,...]`, [`SpecOptions`]) and name
//!   [`Registry`] of selectors, indexes and prefill patterns; [`SelectorSpec`], a parsed selector.
//! - [`state`]: the binary form selectors and indexes save their built state in.
//! - [`metrics`]: recall, attention mass, relative error, KL divergence, token agreement.
//!
//! ```
//! use needle_core::{Rows, attention::{dense, attend, merge, Partial}};
//! let keys = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5];
//! let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let (k, v) = (Rows::new("k", &keys, 2)?, Rows::new("v", &values, 2)?);
//! let q = [0.3, -0.2];
//! let full: Partial<f64> = dense(&q, &k, &v, 1.0)?;
//! let a: Partial<f64> = attend(&q, &k, &v, [0, 2], 1.0)?;
//! let b: Partial<f64> = attend(&q, &k, &v, [1], 1.0)?;
//! let merged = merge(&a, &b);
//! assert!((merged.lse - full.lse).abs() < 1e-12);
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

pub mod attention;
mod error;
mod index;
pub mod kit;
mod kv;
pub mod metrics;
mod page;
pub mod prefill;
mod selector;
pub mod spec;
pub mod state;
#[cfg(feature = "synth")]
pub mod synth;

pub use attention::GqaLayout;
pub use error::{Error, Result, check_finite, check_len};
pub use index::{
    BuildStats, FlatIndex, NO_LABEL, SearchParams, SearchResult, SearchStats, VectorIndex, check_batch, check_search,
};
pub use kv::{KvDtype, PagedRows, Pages, Row, RowSource, Rows};
pub use page::{PageBuf, PageBytes, PageSpill};
pub use selector::{
    AttentionSelector, Budget, BuildContext, FullSelector, HeadId, Selection, SelectorFactory, StaticPart,
    attend_selected,
};
pub use spec::{Registry, SelectorSpec, SpecOptions};
