//! # needle-index-ivfpq
//!
//! IVF coarse lists with product quantization for maximum-inner-product search on
//! [`needle_core::VectorIndex`], shaped on faiss's `IndexIVFPQ`, with query-aware codebooks
//! (the A²ATS / PQCache idea) and exact re-rank of a shortlist.
//!
//! - [`KMeans`]: seeded Lloyd k-means (k-means++ or random init, empty-cluster repair).
//! - [`ProductQuantizer`]: `m` sub-codebooks of `2^nbits` centroids, encode / decode, and
//!   asymmetric inner-product tables scored with [`ProductQuantizer::lut_score`].
//! - [`IvfPqIndex`]: coarse lists ([`InvertedLists`]) of residual codes; search probes `nprobe`
//!   lists (the [`needle_core::SearchParams::effort`] knob), keeps a shortlist of `rerank × k`
//!   by LUT score and re-scores it with the stored full vectors.
//! - [`QueryTransform`]: with training queries, codes live in the space `k' = Lᵀk` where
//!   `Σ_q + λI = L Lᵀ`, so L2 quantization error there is the expected inner-product error.
//! - [`from_factory`]: `"IVF256,PQ16"`, `"IVF1024,PQ32x8"`, `"PQ16"`.
//!
//! Parameters, ranges and memory per key: `ALGO_PARAMS.md` in this crate.
//!
//! ```
//! use needle_core::{SearchParams, VectorIndex};
//! use needle_index_ivfpq::{IvfPqIndex, IvfPqParams};
//! let data = needle_core::synth::AttentionLike::new(16, 1);
//! let (keys, train, queries) = (data.keys(2000, 1), data.queries(200, 2), data.queries(4, 3));
//! let mut index = IvfPqIndex::new(16, IvfPqParams { nlist: 16, m: 4, ..IvfPqParams::default() })?;
//! index.build(&keys, Some(&train))?;
//! let hits = index.search(&queries, 5, &SearchParams::effort(4))?;
//! assert_eq!(hits.labels_of(0).len(), 5);
//! assert!(hits.stats.codes_scored < 4 * 2000);
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod factory;
mod invlists;
mod ivfpq;
mod kmeans;
mod linalg;
mod pq;
use needle_core::state;
mod transform;

pub use factory::{from_factory, parse as parse_factory};
pub use invlists::InvertedLists;
pub use ivfpq::{IvfPqIndex, IvfPqParams, TrainingMode};
pub use kmeans::{Clustering, KMeans, KMeansInit};
pub use linalg::{cholesky, lower_inverse};
pub use pq::ProductQuantizer;
pub use transform::QueryTransform;
