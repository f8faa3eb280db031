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
//! The crate depends only on `needle-core` for the contract; `needle-model`, `needle-loader`
//! and `needle-fetch` are there for the end-to-end run in `src/main.rs` and `tests/`.
//! See `docs/writing-a-selector.md` in the needle repository for a walkthrough.
//!
//! ```
//! use custom_selector::StridedRerankConfig;
//! use needle_core::{HeadId, SelectorFactory};
//! let factory = StridedRerankConfig { sinks: 4, window: 64, stride: 8, oversample: 2 };
//! let sel = factory.create(HeadId { layer: 0, kv_head: 0 }, 64)?;
//! assert_eq!(sel.name(), "strided-rerank:sinks=4,window=64,stride=8,oversample=2");
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]

use std::ops::Range;

use needle_core::attention::{score, top_k};
use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};

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
        Self { sinks: 4, window: 64, stride: 8, oversample: 2 }
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
            "strided-rerank:sinks={},window={},stride={},oversample={}",
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
        self.probe_keys.extend_from_slice(keys.row(position as usize));
        Ok(())
    }

    /// Best `q·k` over the group's query heads (unscaled).
    fn group_score(&self, queries: &[f32], key: &[f32]) -> f32 {
        queries.chunks_exact(self.dim).map(|q| score::<f32>(q, key, 1.0)).fold(f32::NEG_INFINITY, f32::max)
    }
}

impl AttentionSelector for StridedRerank {
    fn name(&self) -> String {
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
        for pos in ctx.dynamic.clone() {
            self.add_probe(ctx.keys, pos)?;
        }
        Ok(BuildStats {
            vectors: self.probe_pos.len(),
            train_queries: 0,
            seconds: start.elapsed().as_secs_f64(),
            bytes: self.memory_bytes(),
        })
    }

    fn insert(&mut self, keys: &dyn RowSource, position: u32) -> Result<()> {
        self.add_probe(keys, position)
    }

    fn select(
        &mut self,
        queries: &[f32],
        keys: &dyn RowSource,
        dynamic: Range<u32>,
        budget: &Budget,
        out: &mut Selection,
    ) -> Result<()> {
        out.clear();
        if queries.is_empty() || !queries.len().is_multiple_of(self.dim) {
            return Err(Error::DimensionMismatch {
                what: format!("queries (rows of {})", self.dim),
                expected: queries.len().div_ceil(self.dim).max(1) * self.dim,
                got: queries.len(),
            });
        }
        if dynamic.end as usize > keys.len() {
            return Err(Error::OutOfRange { what: "dynamic range".into(), id: dynamic.end.into(), len: keys.len() });
        }
        let n = dynamic.len();
        let k = budget.max_ids().min(n);
        if k == 0 {
            return Ok(());
        }
        // The budget covers the whole dynamic part: nothing to choose, and exactness for free.
        if k == n {
            out.ids.extend(dynamic);
            return Ok(());
        }

        // 1. Score the probes inside the dynamic range.
        let stride = self.cfg.stride as u32;
        let lo = self.probe_pos.partition_point(|&p| p < dynamic.start);
        let hi = self.probe_pos.partition_point(|&p| p < dynamic.end);
        let probe_scores: Vec<f32> =
            (lo..hi).map(|i| self.group_score(queries, &self.probe_keys[i * self.dim..(i + 1) * self.dim])).collect();
        out.stats.full_scored += probe_scores.len() as u64;

        // 2. Candidates: keys before the first probe (always), then whole blocks in probe order.
        let want = (k * self.cfg.oversample).min(n);
        let first_probe = self.probe_pos.get(lo).copied().filter(|&p| p < dynamic.end).unwrap_or(dynamic.end);
        let mut candidates: Vec<u32> = (dynamic.start..first_probe).collect();
        for (i, _) in top_k(&probe_scores, probe_scores.len())? {
            if candidates.len() >= want {
                break;
            }
            let p = self.probe_pos[lo + i as usize];
            candidates.extend(p..(p + stride).min(dynamic.end));
        }
        // Positions between probes that no block covers (a probe missing after a gap) still count.
        if candidates.len() < k {
            let held: std::collections::HashSet<u32> = candidates.iter().copied().collect();
            candidates.extend(dynamic.clone().filter(|p| !held.contains(p)).take(k - candidates.len()));
        }

        // 3. Exact re-rank of the candidates.
        let exact: Vec<f32> = candidates.iter().map(|&p| self.group_score(queries, keys.row(p as usize))).collect();
        out.stats.full_scored += exact.len() as u64;
        out.stats.bytes_read = out.stats.full_scored * (self.dim * std::mem::size_of::<f32>()) as u64;
        let ranked = top_k(&exact, k)?;
        let take = match *budget {
            Budget::TopK(_) => k,
            // Mass: the shortest prefix whose softmax share among the candidates reaches the target.
            Budget::Mass { target, .. } => {
                let m = ranked.first().map_or(0.0, |r| r.1 * self.scale);
                let w: Vec<f64> = ranked.iter().map(|r| f64::from(r.1 * self.scale - m).exp()).collect();
                let total: f64 =
                    exact.iter().map(|&s| f64::from(s * self.scale - m).exp()).sum::<f64>().max(f64::MIN_POSITIVE);
                let mut acc = 0.0;
                w.iter()
                    .position(|x| {
                        acc += x;
                        acc / total >= f64::from(target)
                    })
                    .map_or(k, |i| i + 1)
            }
        };
        out.ids.extend(ranked[..take].iter().map(|&(i, _)| candidates[i as usize]));
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.probe_pos.len() * std::mem::size_of::<u32>() + self.probe_keys.len() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_core::Rows;
    use needle_core::attend_selected;
    use needle_core::attention::{Partial, dense};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const DIM: usize = 16;

    /// Keys in slowly drifting clusters (neighbouring tokens resemble each other, as in real
    /// attention), values uniform, and a few query groups of 3 heads.
    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut centre: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut keys = Vec::with_capacity(n * DIM);
        for _ in 0..n {
            for c in &mut centre {
                *c += rng.random_range(-0.15..0.15);
            }
            keys.extend(centre.iter().map(|&c| c + rng.random_range(-0.1..0.1)));
        }
        let values = (0..n * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
        let queries = (0..5).map(|_| (0..3 * DIM).map(|_| rng.random_range(-2.0..2.0)).collect()).collect();
        (keys, values, queries)
    }

    fn built(cfg: StridedRerankConfig, keys: &Rows<'_>) -> StridedRerank {
        let mut s = StridedRerank::new(cfg, DIM);
        let ctx = BuildContext {
            head: HeadId { layer: 0, kv_head: 0 },
            keys,
            dynamic: s.static_part().dynamic_range(keys.len()),
            train_queries: &[],
            scale: 1.0 / (DIM as f32).sqrt(),
        };
        s.build(&ctx).unwrap();
        s
    }

    /// The true top-k of the dynamic part by best group score, as a sorted id list.
    fn oracle(queries: &[f32], keys: &Rows<'_>, dynamic: Range<u32>, k: usize) -> Vec<u32> {
        let s = StridedRerank::new(StridedRerankConfig::default(), DIM);
        let scores: Vec<f32> = dynamic.clone().map(|p| s.group_score(queries, keys.row(p as usize))).collect();
        let mut ids: Vec<u32> = top_k(&scores, k).unwrap().iter().map(|&(i, _)| dynamic.start + i).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_budget_covering_the_dynamic_part_gives_dense_attention() {
        let (k, v, qs) = data(300, 1);
        let (keys, values) = (Rows::new("k", &k, DIM).unwrap(), Rows::new("v", &v, DIM).unwrap());
        let cfg = StridedRerankConfig { sinks: 4, window: 32, stride: 8, oversample: 2 };
        let mut s = built(cfg, &keys);
        let dynamic = s.static_part().dynamic_range(keys.len());
        let scale = 1.0 / (DIM as f32).sqrt();
        for q in &qs {
            let mut sel = Selection::default();
            s.select(q, &keys, dynamic.clone(), &Budget::TopK(dynamic.len()), &mut sel).unwrap();
            assert_eq!(sel.ids, dynamic.clone().collect::<Vec<_>>());
            for head in q.chunks_exact(DIM) {
                let got: Partial<f64> = attend_selected(head, &keys, &values, s.static_part(), &sel, scale).unwrap();
                let want: Partial<f64> = dense(head, &keys, &values, scale).unwrap();
                assert!((got.lse - want.lse).abs() < 1e-9);
                for (a, b) in got.out.iter().zip(&want.out) {
                    assert!((a - b).abs() < 1e-9, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn stride_one_is_exact_top_k() {
        let (k, _, qs) = data(500, 2);
        let keys = Rows::new("k", &k, DIM).unwrap();
        let mut s = built(StridedRerankConfig { sinks: 2, window: 16, stride: 1, oversample: 1 }, &keys);
        let dynamic = s.static_part().dynamic_range(keys.len());
        for q in &qs {
            let mut sel = Selection::default();
            s.select(q, &keys, dynamic.clone(), &Budget::TopK(20), &mut sel).unwrap();
            let mut got = sel.ids.clone();
            got.sort_unstable();
            assert_eq!(got, oracle(q, &keys, dynamic.clone(), 20));
        }
    }

    #[test]
    fn sampling_finds_most_of_the_true_top_k_while_scanning_less() {
        let (k, _, qs) = data(4000, 3);
        let keys = Rows::new("k", &k, DIM).unwrap();
        let mut s = built(StridedRerankConfig { sinks: 4, window: 64, stride: 8, oversample: 4 }, &keys);
        let dynamic = s.static_part().dynamic_range(keys.len());
        let (mut hits, mut total, mut scanned) = (0, 0, 0);
        for q in &qs {
            let mut sel = Selection::default();
            s.select(q, &keys, dynamic.clone(), &Budget::TopK(32), &mut sel).unwrap();
            assert_eq!(sel.ids.len(), 32);
            assert!(sel.ids.iter().all(|i| dynamic.contains(i)));
            let truth = oracle(q, &keys, dynamic.clone(), 32);
            hits += sel.ids.iter().filter(|i| truth.contains(i)).count();
            total += truth.len();
            scanned += sel.stats.full_scored as usize;
        }
        let recall = hits as f64 / total as f64;
        let share = scanned as f64 / (qs.len() * dynamic.len()) as f64;
        assert!(recall >= 0.8, "recall {recall:.3}");
        assert!(share < 0.25, "scanned {share:.3} of the dynamic keys");
    }

    #[test]
    fn inserted_tokens_become_probes_and_candidates() {
        let (k, _, qs) = data(400, 4);
        let all = Rows::new("k", &k, DIM).unwrap();
        let cfg = StridedRerankConfig { sinks: 4, window: 32, stride: 4, oversample: 2 };
        // Build on the first 200 tokens, then let the rest leave the window one by one.
        let first = Rows::new("k", &k[..200 * DIM], DIM).unwrap();
        let mut s = built(cfg, &first);
        let before = s.probes();
        let sp = s.static_part();
        for n in 201..=400 {
            let (old, new) = (sp.dynamic_range(n - 1), sp.dynamic_range(n));
            for pos in old.end.max(new.start)..new.end {
                s.insert(&all, pos).unwrap();
            }
        }
        assert_eq!(s.probes(), before + 50);
        // Incremental insertion ends where a fresh build on all tokens starts.
        let fresh = built(cfg, &all);
        assert_eq!((s.probe_pos.clone(), s.probe_keys.clone()), (fresh.probe_pos.clone(), fresh.probe_keys.clone()));
        let dynamic = sp.dynamic_range(400);
        let mut sel = Selection::default();
        s.select(&qs[0], &all, dynamic.clone(), &Budget::TopK(10), &mut sel).unwrap();
        assert!(sel.ids.iter().all(|i| dynamic.contains(i)));
    }

    #[test]
    fn mass_budgets_stop_early_and_respect_the_cap() {
        let (k, _, qs) = data(1000, 5);
        let keys = Rows::new("k", &k, DIM).unwrap();
        let mut s = built(StridedRerankConfig { sinks: 4, window: 16, stride: 4, oversample: 2 }, &keys);
        let dynamic = s.static_part().dynamic_range(keys.len());
        let mut sel = Selection::default();
        s.select(&qs[0], &keys, dynamic.clone(), &Budget::Mass { target: 1.0, max: 50 }, &mut sel).unwrap();
        assert_eq!(sel.ids.len(), 50);
        s.select(&qs[0], &keys, dynamic.clone(), &Budget::Mass { target: 0.05, max: 50 }, &mut sel).unwrap();
        assert!(!sel.ids.is_empty() && sel.ids.len() < 50, "{}", sel.ids.len());
    }

    #[test]
    fn bad_settings_and_inputs_are_errors() {
        let bad = StridedRerankConfig { stride: 0, ..Default::default() };
        let e = bad.create(HeadId { layer: 0, kv_head: 0 }, DIM).err().unwrap().to_string();
        assert!(e.contains("stride"), "{e}");
        let bad = StridedRerankConfig { oversample: 0, ..Default::default() };
        assert!(bad.create(HeadId { layer: 0, kv_head: 0 }, DIM).is_err());
        let (k, _, _) = data(200, 6);
        let keys = Rows::new("k", &k, DIM).unwrap();
        let mut s = built(StridedRerankConfig::default(), &keys);
        let dynamic = s.static_part().dynamic_range(keys.len());
        let mut sel = Selection::default();
        assert!(s.select(&[0.0; 5], &keys, dynamic.clone(), &Budget::TopK(3), &mut sel).is_err());
        assert!(s.select(&[0.0; DIM], &keys, 0..500, &Budget::TopK(3), &mut sel).is_err());
    }
}
