//! # needle-tasks
//!
//! Seeded synthetic long-context tasks for judging attention selectors by task accuracy:
//! a needle hidden at a chosen depth of filler sized to a target number of tokens, a question
//! at the end, and a scorer.
//!
//! - `passkey` — Landmark Attention (Mohtashami & Jaggi, 2023): a 5-digit pass key in
//!   "The grass is green. The sky is blue. ..." filler.
//! - `niah_single`, `niah_multikey:keys=4`, `niah_multivalue:values=4`,
//!   `niah_multiquery:queries=4`, `variable_tracking:chains=1,hops=4` — RULER (Hsieh et al., 2024).
//!
//! The crate knows no tokenizer: callers pass a token counter (`&dyn Fn(&str) -> usize`), so a
//! prompt is "N tokens" of whatever model runs it. Filler is the Landmark sentences, seeded
//! varied sentences, or a text passed in (e.g. a public-domain book), see [`Filler`].
//!
//! Prompts suit a small instruct model used as a plain completion: the question comes last and
//! ends with an answer prefix ("What is the pass key? The pass key is"), so a greedy
//! continuation starts with the answer. Variable tracking ends its RULER prefix with "they
//! are: VAR" so that SmolLM2-135M continues with a variable name rather than a list of filler
//! (measured: recall 0 → about 0.4 at 1K tokens). Score a continuation with [`score`].
//!
//! ## Usage
//! ```
//! use needle_tasks::{Filler, TaskSpec, grid, score};
//! // Any token counter; with a real tokenizer: |s| tok.encode(s, false).map_or(0, |t| t.len()).
//! let words = |s: &str| s.split_whitespace().count();
//! let spec: TaskSpec = "niah_multikey:keys=4".parse()?;
//! for point in grid(&[1000, 2000], &[0.0, 0.5, 1.0], &[1, 2]) {
//!     let inst = spec.instance(point, &Filler::Landmark, &words)?;
//!     assert!(inst.prompt.ends_with("mentioned in the provided text is"));
//!     let generated = format!(" {}.", inst.answer); // what a perfect model would write
//!     assert_eq!(score(&spec, &generated, &inst), 1.0);
//! }
//! # Ok::<(), needle_tasks::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod build;
mod error;
mod filler;
mod score;
mod spec;

pub use build::{GridPoint, TaskInstance, TaskMeta, grid};
pub use error::{Error, Result};
pub use filler::{Filler, LANDMARK};
pub use score::{exact_first_number, recall_all, score};
pub use spec::{Metric, TASKS, TaskSpec};
