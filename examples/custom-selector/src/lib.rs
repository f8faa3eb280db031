//! # A needle selector written outside the needle workspace
//!
//! [`StridedRerank`] is a small but real [`AttentionSelector`]: it keeps attention sinks and a
//! recent window static (attended densely by the model), and picks dynamic-part keys in two
//! stages:
//!
//! 1. **Strided sampling.** At build time (and as tokens leave the window) it copies every
//!    `stride`-th key into a compact probe table. A decode step scores the probes only:
//!    `1/stride` of the dynamic keys.
//! 2. **Exact re-rank.** Each probe stands for the block of `stride` keys that starts at it.
//!    The best-scoring blocks are expanded until `oversample × k` candidates are gathered,
//!    every candidate is scored exactly, and the best `k` are returned.
//!
//! A GQA group's query heads share one selection, so a key's score is its best `q·k` over the
//! group's heads. When the budget covers the whole dynamic part, every dynamic id is returned,
//! and the model's output equals full attention (up to float summation order).
//!
//! The crate is a library depending on `needle-core` (the contract and the selector kit) and
//! `needle-select` (to be named in specs, [`register`]) only; its defaults are the spec's
//! ([`needle_select::DEFAULT_SINKS`], [`needle_select::DEFAULT_WINDOW`]). The model is a
//! dev-dependency of its end-to-end test, and `examples/custom-selector-cli` beside it is the
//! `needle` binary with this selector registered. See `docs/writing-a-selector.md` in the
//! needle repository for a walkthrough.
//!
//! ```
//! use custom_selector::StridedRerankConfig;
//! use needle_core::{HeadId, SelectorFactory};
//! let factory = StridedRerankConfig { sinks: 4, window: 64, stride: 8, oversample: 2 };
//! let sel = factory.create(HeadId { layer: 0, kv_head: 0 }, 64)?;
//! assert_eq!(sel.describe(), "strided-rerank:sinks=4,window=64,stride=8,oversample=2");
//! // Registered, it is named in specs like a built-in, with the same static part by default.
//! custom_selector::register()?;
//! let spec = needle_select::parse("strided-rerank:k=64")?;
//! assert_eq!(spec.factory.describe(), "strided-rerank:sinks=128,window=512,stride=8,oversample=2");
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]

use std::ops::Range;

use needle_core::kit::{SelectStep, apply_budget, begin_select, full_cost, group_max, keep_top};
use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};
use needle_select::SpecOptions;

/// The name this selector registers under ([`register`]).
pub const NAME: &str = "strided-rerank";

/// Settings of [`StridedRerank`]; also its [`SelectorFactory`] (one selector per layer × KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StridedRerankConfig {
    /// Attention-sink tokens at the start, attended densely.
    pub sinks: usize,
    /// Most recent tokens, attended densely.
    pub window: usize,
    /// One probe every `stride` positions (≥ 1; 1 scores every key: exact top-k).
    pub stride: usize,
    /// Candidates re-ranked exactly, as a multiple of the budget (≥ 1).
    pub oversample: usize,
}

impl Default for StridedRerankConfig {
    fn default() -> Self {
        // The static part every built-in selector defaults to, so that comparisons at defaults
        // differ only in what is selected.
        Self { sinks: needle_select::DEFAULT_SINKS, window: needle_select::DEFAULT_WINDOW, stride: 8, oversample: 2 }
    }
}

impl StridedRerankConfig {
    /// Rejects settings that cannot work, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.stride == 0 {
            return Err(Error::invalid("stride", "must be at least 1 (1 = score every key)"));
        }
        if self.oversample == 0 {
            return Err(Error::invalid("oversample", "must be at least 1 (candidates = oversample × k)"));
        }
        Ok(())
    }

    fn spec(&self) -> String {
        format!(
            "{NAME}:sinks={},window={},stride={},oversample={}",
            self.sinks, self.window, self.stride, self.oversample
        )
    }
}

impl SelectorFactory for StridedRerankConfig {
    fn describe(&self) -> String {
        self.spec()
    }

    fn create(&self, head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        self.validate()?;
        if dim == 0 {
            return Err(Error::invalid("dim", format!("head {head:?}: keys need at least one float")));
        }
        Ok(Box::new(StridedRerank::new(*self, dim)))
    }
}

/// Strided sampling of the dynamic part plus exact re-rank of the best blocks.
/// One instance serves one layer and KV head.
#[derive(Debug, Clone)]
pub struct StridedRerank {
    cfg: StridedRerankConfig,
    dim: usize,
    scale: f32,
    /// Positions of the probes (multiples of `stride`), ascending.
    probe_pos: Vec<u32>,
    /// Their keys, row-major `probes × dim`: the selector's own compact structure.
    probe_keys: Vec<f32>,
}

impl StridedRerank {
    /// An empty selector over keys of `dim` floats (built by [`AttentionSelector::build`]).
    pub fn new(cfg: StridedRerankConfig, dim: usize) -> Self {
        Self { cfg, dim, scale: 1.0 / (dim as f32).sqrt(), probe_pos: Vec::new(), probe_keys: Vec::new() }
    }

    /// Number of probes held.
    pub fn probes(&self) -> usize {
        self.probe_pos.len()
    }

    fn add_probe(&mut self, keys: &dyn RowSource, position: u32) -> Result<()> {
        keys.check_id("keys", position)?;
        if !(position as usize).is_multiple_of(self.cfg.stride) {
            return Ok(());
        }
        // Tokens arrive in order; a position already held (or older) is not added twice.
        if self.probe_pos.last().is_some_and(|&p| p >= position) {
            return Ok(());
        }
        self.probe_pos.push(position);
        keys.row(position as usize).extend_into(&mut self.probe_keys);
        Ok(())
    }
}

impl AttentionSelector for StridedRerank {
    fn describe(&self) -> String {
        self.cfg.spec()
    }

    fn static_part(&self) -> StaticPart {
        StaticPart { sinks: self.cfg.sinks, window: self.cfg.window }
    }

    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        if ctx.keys.dim() != self.dim {
            return Err(Error::DimensionMismatch { what: "keys".into(), expected: self.dim, got: ctx.keys.dim() });
        }
        let start = std::time::Instant::now();
        self.scale = ctx.scale;
        self.probe_pos.clear();
        self.probe_keys.clear();
        self.insert(ctx.keys, self.static_part().dynamic_range(ctx.keys.len()))?;
        Ok(BuildStats {
            vectors: self.probe_pos.len(),
            train_queries: 0,
            seconds: start.elapsed().as_secs_f64(),
            bytes: self.memory_bytes(),
        })
    }

    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()> {
        positions.into_iter().try_for_each(|p| self.add_probe(keys, p))
    }

    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        // Clears `out`, checks the group, derives the dynamic part and clamps the budget.
        let Some(SelectStep { dynamic, budget, .. }) =
            begin_select(self.static_part(), queries, self.dim, keys, budget, out)?
        else {
            return Ok(());
        };
        let (n, k, dim) = (dynamic.len(), budget.max_ids(), self.dim);
        // The budget covers the whole dynamic part: nothing to choose, and exactness for free.
        if k == n {
            out.ids.extend(dynamic);
            return Ok(());
        }
        // 1. Score the probes inside the dynamic part.
        let lo = self.probe_pos.partition_point(|&p| p < dynamic.start);
        let hi = self.probe_pos.partition_point(|&p| p < dynamic.end);
        let mut probes: Vec<(u32, f32)> =
            (lo..hi).map(|i| (i as u32, group_max(queries, dim, &self.probe_keys[i * dim..(i + 1) * dim]))).collect();
        let probes_scored = probes.len();
        keep_top(&mut probes, probes_scored);

        // 2. Candidates: keys before the first probe (always), then whole blocks in probe order.
        let want = (k * self.cfg.oversample).min(n);
        let first_probe = self.probe_pos.get(lo).copied().filter(|&p| p < dynamic.end).unwrap_or(dynamic.end);
        let mut candidates: Vec<u32> = (dynamic.start..first_probe).collect();
        for &(i, _) in &probes {
            if candidates.len() >= want {
                break;
            }
            let p = self.probe_pos[i as usize];
            candidates.extend(p..(p + self.cfg.stride as u32).min(dynamic.end));
        }
        // Positions no block covers (a probe missing after a gap) still count.
        if candidates.len() < k {
            let held: std::collections::HashSet<u32> = candidates.iter().copied().collect();
            candidates.extend(dynamic.clone().filter(|p| !held.contains(p)).take(k - candidates.len()));
        }

        // 3. Exact re-rank of the candidates, then the budget (top-k, or a mass target).
        let mut exact: Vec<(u32, f32)> =
            candidates.iter().map(|&p| (p, group_max(queries, dim, keys.row(p as usize)))).collect();
        out.stats = full_cost(probes_scored + exact.len(), dim);
        apply_budget(&mut exact, &budget, self.scale);
        out.ids.extend(exact.iter().map(|c| c.0));
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.probe_pos.len() * std::mem::size_of::<u32>() + self.probe_keys.len() * std::mem::size_of::<f32>()
    }
}

/// Registers `strided-rerank` with needle's spec parser, so that
/// `strided-rerank:stride=8,oversample=2,k=64,sinks=4,window=64` works wherever needle takes a
/// selector spec (`needle generate --selector …` in `examples/custom-selector-cli`).
/// Registering twice is an error (the name is taken).
pub fn register() -> Result<()> {
    needle_select::register_selector(NAME, "strided probes + exact re-rank (examples/custom-selector)", |o| {
        let allowed: Vec<&str> = SpecOptions::COMMON.iter().copied().chain(["stride", "oversample"]).collect();
        o.only(&allowed)?;
        let d = StridedRerankConfig::default();
        let sp = o.static_part()?;
        let cfg = StridedRerankConfig {
            sinks: sp.sinks,
            window: sp.window,
            stride: o.usize("stride", d.stride)?,
            oversample: o.usize("oversample", d.oversample)?,
        };
        cfg.validate()?;
        o.spec(Box::new(cfg), o.budget()?)
    })
}
