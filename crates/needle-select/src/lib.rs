//! # needle-select
//!
//! Built-in [`AttentionSelector`](needle_core::AttentionSelector)s: per layer and KV head,
//! which keys of the dynamic part (between the attention sinks and the recent window) a decode
//! query group attends to.
//!
//! | spec name | selector |
//! |---|---|
//! | `full`, `dense` | every token, densely ([`needle_core::FullSelector`]) |
//! | `streaming` | StreamingLLM: sinks + window only ([`StreamingFactory`]) |
//! | `oracle` | exact top-k or mass target: the upper bound ([`OracleFactory`]) |
//! | `retrieval` | RetrievalAttention: top-k from any vector index ([`RetrievalFactory`]) |
//! | `quest` | Quest: pages with min/max bounds ([`QuestFactory`]) |
//! | `block` | InfLLM: blocks with representative keys ([`BlockFactory`]) |
//! | `lsh-sample` | MagicPIG: LSH sampling with importance log-weights (`LshSampleFactory`, feature `lsh`) |
//! | `tokenselect` | TokenSelect: soft voting across the group, selection cache ([`TokenSelectFactory`]) |
//! | `policy` | per-head specs from a JSON file, DuoAttention-style ([`PolicyFactory`], [`rank_heads`]) |
//!
//! ## Specs
//! [`parse`] reads `name[:key=value,...]`, the one grammar of [`needle_core::spec`]: names are
//! case-insensitive, unknown and repeated keys are errors naming them and listing the valid
//! ones. `auto` is resolved first by [`resolve_auto`] (it depends on the context length). Common keys: `k` (top-k budget, default 100),
//! `mass` (share of attention mass, `k` the cap), `sinks`, `window`, `dense_layers`,
//! `train_positions` (prefill positions whose queries are kept for the build: 4096 by default,
//! 0 for `full` and `streaming`, which learn nothing from them). Per selector:
//! - `retrieval`: `index` (`qgraph` default: RoarGraph walked over 8-bit codes; `graph`, `hnsw`, `ivfpq`, `lsh`, `flat`, a registered name,
//!   or a FAISS-style factory string that starts with one, such as `IVF64,PQ16`: [`index_factory`]), `effort` (the index's `SearchParams::effort`), `combine`
//!   (`max` default for `qgraph`, `mean-rerank` for other indexes, `rerank`, `mean`, `split`: see [`GroupCombine`]), `min_index`, `tail` (decode keys scanned exactly before one batch insert).
//! - `quest`: `page` (16). `block`: `block` (128), `reps` (4).
//! - `lsh-sample`: `bits`, `tables`, `min_collisions`, `seed`. `tokenselect`: `threshold` (0.9).
//! - `policy`: `file` (a [`HeadPolicy`] as JSON). `streaming`: `sinks`, `window` only.
//!
//! Every selector defaults to the static part of RetrievalAttention (128 sinks + 512 window)
//! so that selectors compared at their defaults differ only in what they pick.
//!
//! ## Plugins
//! Another crate adds a selector with [`register_selector`] (its builder reads [`SpecOptions`])
//! and an index with [`register_index`]; both then parse by name exactly like the built-ins,
//! which are registered through the same two functions ([`selector_names`], [`index_names`]
//! list them all). The helpers the built-ins use are public in [`needle_core::kit`]. See
//! `examples/custom-selector`.
//!
//! A model takes the parsed [`SelectorSpec`] (a needle-core type), so it needs no dependency on
//! this crate: resolving a spec string is this crate's job, or the caller's.
//!
//! ## Features
//! - `graph` (default): RoarGraph and HNSW indexes (`retrieval:index=qgraph|graph|hnsw`).
//! - `ivfpq` (default): IVF-PQ (`retrieval:index=ivfpq`).
//! - `lsh` (default): SimHash LSH (`retrieval:index=lsh`) and the `lsh-sample` selector.
//!
//! ## Usage
//! ```
//! use needle_core::{BuildContext, HeadId, Rows, Selection};
//! let dim = 4;
//! let keys: Vec<f32> = (0..64 * dim).map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0).collect();
//! let rows = Rows::new("keys", &keys, dim)?;
//! let spec = needle_select::parse("oracle:k=5,sinks=4,window=8")?;
//! let mut sel = spec.factory.create(HeadId { layer: 0, kv_head: 0 }, dim)?;
//! sel.build(&BuildContext { head: HeadId { layer: 0, kv_head: 0 }, keys: &rows, train_queries: &[], scale: 0.5 })?;
//! let mut out = Selection::default();
//! sel.select(&[1.0, 0.0, 0.5, -0.5], &rows, &spec.budget, &mut out)?;
//! assert_eq!(out.ids.len(), 5);
//! assert!(out.ids.iter().all(|&i| (4..56).contains(&i))); // the dynamic part
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod block;
mod common;
mod hip;
mod index;
#[cfg(feature = "lsh")]
mod lsh_sample;
mod oracle;
mod policy;
mod quest;
mod retrieval;
mod spec;
use needle_core::state;
#[cfg(test)]
mod state_tests;
mod streaming;
#[cfg(test)]
mod testutil;
mod tokenselect;

pub use block::{BlockFactory, BlockSelector, DEFAULT_BLOCK, DEFAULT_REPS};
pub use common::{DEFAULT_SINKS, DEFAULT_WINDOW};
pub use hip::{DEFAULT_HIP_BLOCK, DEFAULT_HIP_WIDTH, HipFactory, HipSelector};
pub use index::{IndexBuilder, index_factory, index_names, register_index};
#[cfg(feature = "lsh")]
pub use lsh_sample::{DEFAULT_BITS, DEFAULT_MIN_COLLISIONS, DEFAULT_TABLES, LshSampleFactory, LshSampleSelector};
pub use oracle::{OracleFactory, OracleSelector};
pub use policy::{HeadPolicy, HeadRule, PolicyFactory, rank_heads};
pub use quest::{DEFAULT_PAGE, QuestFactory, QuestSelector, page_bound};
pub use retrieval::{DEFAULT_MIN_INDEX, DEFAULT_TAIL, GroupCombine, RetrievalFactory, RetrievalSelector};
// The grammar and the parsed form live in needle-core (a model takes a `SelectorSpec` without
// depending on this crate); re-exported here for plugins, which register through this crate.
pub use needle_core::spec::{DEFAULT_K, DEFAULT_TRAIN_POSITIONS, SelectorSpec, SpecOptions};
pub use spec::{
    AUTO_RETRIEVAL_FROM, DEFAULT_INDEX, SelectorBuilder, parse, register_selector, resolve_auto, selector_names,
};
pub use streaming::{StreamingFactory, StreamingSelector};
pub use tokenselect::{CacheCounters, DEFAULT_THRESHOLD, TokenSelectFactory, TokenSelectSelector};
