//! # needle-eval
//!
//! The evaluation harness of needle, as a library: everything `needle eval`, `needle trace` and
//! `needle bench index` compute, without the command line's parsing, progress bars or printing.
//!
//! - [`trace`]: the `needle trace` safetensors file ([`Trace`]: one reader and writer) and
//!   [`trace::record`], which records one from a model.
//! - [`bench`] and [`stats`]: every index backend on a trace's heads (recall@k against keys
//!   scanned, latency, build cost) and the arithmetic of the results.
//! - [`eval`]: fidelity of selectors against full attention (KL, agreement, top-k recall,
//!   attention mass, output error, cost) and passkey / RULER-style tasks.
//! - [`prefill`]: sparse prefill patterns against dense prefill (KL of the next token and of
//!   teacher-forced steps, tasks, prefill time per context length).
//! - [`sweep`]: decode-attention time of one layer against context length, per selector,
//!   through the model's own [`needle_model::KvCache`] decode step.
//! - [`plot`] (feature `plot`, default): PNG plots of the above.
//!
//! Functions that run the model are generic over the Burn backend; progress is reported through
//! `&mut dyn FnMut(done, total)` callbacks.
//!
//! ```
//! use needle_eval::bench::IndexBench;
//! use needle_eval::trace::Trace;
//! let trace = Trace::synthetic(&[0], 200, 4);
//! let bench = IndexBench { k: 5, indexes: vec!["Flat".into(), "HNSW8".into()], ..IndexBench::default() };
//! let rows = bench.run(&trace, &mut |_, _| {})?;
//! let summary = needle_eval::stats::summarize(&rows);
//! assert!(summary.iter().any(|s| s.index == "Flat" && s.mean_recall == 1.0));
//! # Ok::<(), needle_eval::Error>(())
//! ```
#![warn(missing_docs)]

pub mod bench;
mod error;
pub mod eval;
#[cfg(feature = "plot")]
pub mod plot;
pub mod prefill;
pub mod stats;
pub mod sweep;
pub mod trace;

pub use error::{Error, Result};
pub use trace::{Trace, TraceLayer};
