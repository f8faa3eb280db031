//! # needle-index-lsh
//!
//! SimHash locality-sensitive hashing (Charikar 2002) on needle-core's [`VectorIndex`]:
//! `K`-bit signatures in `L` independent tables, with the sampling weights of MagicPIG
//! (Chen et al., *MagicPIG: LSH Sampling for Efficient LLM Generation*, arXiv 2410.16179).
//!
//! - [`LshIndex`] — build, insert, and `search`: the exact top-k among the keys that share
//!   a bucket with the query in at least one probed table (`SearchParams::effort` = tables
//!   probed). Factory strings `"LSH"` and `"LSH{K}x{L}"` through [`from_factory`].
//! - [`LshIndex::sample`] / [`LshIndex::sample_min_collisions`] — the colliding keys with
//!   log-weights `ln(1/u)`, where `u` is the key's probability of being sampled; attention
//!   over them with those weights is the MagicPIG estimator.
//! - [`collision_probability`], [`retrieval_probability`], [`binomial_tail`], [`angle`] —
//!   the probabilities in `f64`, stable when tiny.
//!
//! Parameters, ranges and memory per key: `ALGO_PARAMS.md` in this crate.
//!
//! ```
//! use needle_core::{Rows, SearchParams, VectorIndex, attention::{attend_weighted, Partial}};
//! use needle_index_lsh::{LshIndex, from_factory};
//!
//! let dim = 4;
//! let keys: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
//! let values = keys.clone();
//! let mut index = LshIndex::new(dim, 4, 16, 7)?;
//! index.build(&keys, None)?;
//! let q = [1.0, 0.5, -0.2, 0.1];
//!
//! // Candidate retrieval: exact top-2 among the colliding keys.
//! let hits = index.search(&q, 2, &SearchParams::default())?;
//! assert_eq!(hits.k, 2);
//!
//! // MagicPIG: importance-weighted attention over the sampled keys.
//! let sample = index.sample(&q)?;
//! let (k, v) = (Rows::new("k", &keys, dim)?, Rows::new("v", &values, dim)?);
//! let est: Partial<f64> = attend_weighted(&q, &k, &v, sample.weighted_ids(), 0.5)?;
//! assert_eq!(est.out.len(), dim);
//!
//! assert_eq!(from_factory(dim, "LSH8x64")?.describe(), "LSH8x64");
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod hash;
mod index;
mod prob;
use needle_core::state;
mod table;

pub use hash::MAX_K_BITS;
pub use index::{
    DEFAULT_K_BITS, DEFAULT_L_TABLES, DEFAULT_SEED, LshIndex, MAX_L_TABLES, Sample, from_factory, parse_factory,
};
pub use prob::{angle, binomial_tail, collision_probability, retrieval_probability};
