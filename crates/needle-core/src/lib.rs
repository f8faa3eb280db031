//! # needle-core
//!
//! The contracts every needle crate builds on, and the exact math they are checked against.
//! No Burn, no GPU: plain Rust on slices.
//!
//! - [`AttentionSelector`] / [`SelectorFactory`]: per layer and KV head, which dynamic-part keys
//!   a decode query group attends to, within a [`Budget`], beside a densely attended
//!   [`StaticPart`] (sinks + window).
//! - [`VectorIndex`]: maximum-inner-product search (build with optional training queries,
//!   batch search, insert), with [`FlatIndex`] as exact oracle.
//! - [`RowSource`], [`Rows`], [`PagedRows`]: KV rows by token position, in fixed-size pages,
//!   stored as `f32` or `f16` ([`KvDtype`], read as a [`Row`]).
//! - [`attention`]: dense, sparse and weighted attention with log-sum-exp, the exact merge,
//!   causal prefill chunks, GQA layout; accumulate in `f32` or `f64`.
//! - [`kit`]: what every selector needs — input checks, group scores, top-k, budgets, costs.
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
pub mod decode;
mod error;
mod index;
pub mod kit;
mod kv;
pub mod metrics;
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
pub use selector::{
    AttentionSelector, Budget, BuildContext, FullSelector, HeadId, Selection, SelectorFactory, StaticPart,
    attend_selected,
};
pub use spec::{Registry, SelectorSpec, SpecOptions};
