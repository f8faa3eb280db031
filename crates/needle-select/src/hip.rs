//! HiP (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
//! With Hierarchically Pruned Attention", arXiv 2406.09827): top-k keys by hierarchical pruning,
//! with no index and nothing learned.
//!
//! The dynamic part starts as `nodes` equal spans. Each round splits every span longer than
//! `block` into two halves, scores each half by one representative key (its middle one) with
//! the group score `max_h q_h·k`, and keeps the `nodes` best spans; after `log2(n / (nodes ·
//! block))` rounds every span is a block of at most `block` keys. With `width` = 1 the best
//! `⌈k / block⌉` blocks are attended whole, as HiP does; with `width` > 1 the descent keeps
//! `width` times as many spans and the keys of the final blocks are re-scored exactly, the best
//! `k` kept. A step scores `O(nodes · log n)` keys and the selector holds no state, so it is
//! ready the moment prefill ends and nothing is inserted as tokens leave the window.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};

use crate::common::{Frame, SelectStep, begin_select, begin_state, full_cost, group_max, keep_top, open_state};

const TAG: &[u8; 8] = b"sel.hip_";
const VERSION: u32 = 1;

/// Default block size in keys (the leaves of the descent).
pub const DEFAULT_HIP_BLOCK: usize = 4;
/// Default descent width: spans kept per round, as a multiple of `⌈k / block⌉`.
pub const DEFAULT_HIP_WIDTH: usize = 4;

/// Makes [`HipSelector`]s; spec `hip:k=100,block=4,width=2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HipFactory {
    frame: Frame,
    block: usize,
    width: usize,
}

impl HipFactory {
    /// Leaves of `block` keys, `width` times `⌈k / block⌉` spans kept per round, beside a static
    /// part of `sinks` + `window` tokens.
    pub fn new(sinks: usize, window: usize, block: usize, width: usize) -> Result<Self> {
        if block == 0 {
            return Err(Error::invalid("hip option `block`", "must be at least 1 key"));
        }
        if width == 0 {
            return Err(Error::invalid("hip option `width`", "must be at least 1"));
        }
        Ok(Self { frame: Frame { sinks, window }, block, width })
    }
}

impl SelectorFactory for HipFactory {
    fn describe(&self) -> String {
        format!("hip:block={},width={},{}", self.block, self.width, self.frame.describe())
    }
    fn create(&self, _head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(HipSelector::new(*self, dim)))
    }
}

/// Hierarchical pruning over the dynamic part (see the module docs). `Budget::Mass` is served
/// as its cap: representative scores do not estimate mass.
#[derive(Debug, Clone)]
pub struct HipSelector {
    cfg: HipFactory,
    dim: usize,
    spans: Vec<(Range<u32>, f32)>,
    next: Vec<(Range<u32>, f32)>,
    order: Vec<(u32, f32)>,
    cands: Vec<(u32, f32)>,
}

impl HipSelector {
    /// A selector for vectors of `dim` floats.
    pub fn new(cfg: HipFactory, dim: usize) -> Self {
        Self { cfg, dim, spans: Vec::new(), next: Vec::new(), order: Vec::new(), cands: Vec::new() }
    }

    /// Keeps the `keep` best of `self.next` (ties: earlier span) in `self.spans`.
    fn keep_best(&mut self, keep: usize) {
        self.order.clear();
        self.order.extend(self.next.iter().enumerate().map(|(i, s)| (i as u32, s.1)));
        keep_top(&mut self.order, keep);
        self.spans.clear();
        self.spans.extend(self.order.iter().map(|&(i, _)| self.next[i as usize].clone()));
    }
}

/// The key that stands for `span` (its middle one).
fn representative(span: &Range<u32>) -> u32 {
    span.start + (span.end - span.start) / 2
}

impl AttentionSelector for HipSelector {
    fn describe(&self) -> String {
        self.cfg.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.cfg.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        Ok(BuildStats { vectors: dynamic.len(), ..Default::default() })
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> Result<()> {
        Ok(())
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        let Some(step) = begin_select(self.static_part(), queries, self.dim, keys, budget, out)? else {
            return Ok(());
        };
        let SelectStep { group: _, dynamic, budget } = step;
        let (dim, block) = (self.dim, self.cfg.block as u32);
        let k = budget.max_ids();
        let nodes = k.div_ceil(self.cfg.block);
        let keep = nodes * self.cfg.width;
        // Equal first spans, at most one per key.
        let n = dynamic.len();
        let first = keep.min(n).max(1);
        self.next.clear();
        for i in 0..first {
            let s = dynamic.start + (i * n / first) as u32;
            let e = dynamic.start + ((i + 1) * n / first) as u32;
            self.next.push((s..e, f32::INFINITY));
        }
        let mut scored = 0usize;
        let mut split = true;
        while split {
            split = false;
            self.spans.clear();
            std::mem::swap(&mut self.spans, &mut self.next);
            for (span, score) in self.spans.drain(..) {
                if span.len() as u32 <= block {
                    // A first span that is already a leaf is scored once, like any other.
                    let score = if score == f32::INFINITY {
                        scored += 1;
                        group_max(queries, dim, keys.row(representative(&span) as usize))
                    } else {
                        score
                    };
                    self.next.push((span, score));
                    continue;
                }
                split = true;
                let mid = representative(&span);
                for half in [span.start..mid, mid..span.end] {
                    scored += 1;
                    let s = group_max(queries, dim, keys.row(representative(&half) as usize));
                    self.next.push((half, s));
                }
            }
            if split || self.next.len() > keep {
                self.keep_best(keep);
                std::mem::swap(&mut self.spans, &mut self.next);
            }
        }
        // `self.next` holds the final blocks, best first once a round has ranked them.
        self.cands.clear();
        if self.cfg.width == 1 {
            for (span, _) in self.next.iter().take(nodes) {
                self.cands.extend(span.clone().map(|p| (p, 0.0)));
            }
            self.cands.truncate(k);
        } else {
            for (span, _) in &self.next {
                self.cands.extend(span.clone().map(|p| (p, group_max(queries, dim, keys.row(p as usize)))));
            }
            scored += self.cands.len();
            keep_top(&mut self.cands, k);
        }
        out.ids.extend(self.cands.iter().map(|c| c.0));
        out.stats = full_cost(scored, dim);
        Ok(())
    }
    // Nothing is learned or built: the state is the spec alone.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        begin_state(out, TAG, VERSION, &self.describe());
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        open_state("hip selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?.finish()
    }
    fn memory_bytes(&self) -> usize {
        (self.spans.capacity() + self.next.capacity()) * 12 + (self.order.capacity() + self.cands.capacity()) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::OracleFactory;
    use crate::testutil::{assert_dense, attention_like, built, select, true_topk, uniform};

    fn recall(got: &[u32], want: &[u32]) -> f64 {
        want.iter().filter(|w| got.contains(w)).count() as f64 / want.len() as f64
    }

    #[test]
    fn bad_options_are_named() {
        assert!(HipFactory::new(4, 16, 0, 2).unwrap_err().to_string().contains("block"));
        assert!(HipFactory::new(4, 16, 4, 0).unwrap_err().to_string().contains("width"));
        let s = crate::parse("hip:block=8,width=2,k=64,sinks=4,window=16").unwrap();
        assert_eq!(s.factory.describe(), "hip:block=8,width=2,sinks=4,window=16");
        assert_eq!(s.budget, Budget::TopK(64));
        assert!(crate::parse("hip:width=0").unwrap_err().to_string().contains("width"));
        assert!(crate::parse("hip:reps=2").unwrap_err().to_string().contains("reps"));
    }

    #[test]
    fn a_descent_wide_enough_for_every_key_is_the_oracle() {
        // keep · block ≥ the dynamic part: nothing is pruned, the final re-score is exact.
        let data = attention_like(600, 8, 6, 32, 5);
        let f = HipFactory::new(8, 32, 4, 40).unwrap();
        let mut sel = built(&f, &data);
        let dynamic = sel.static_part().dynamic_range(600);
        for group in data.queries.chunks_exact(3 * 32) {
            let s = select(sel.as_mut(), &data, group, Budget::TopK(15));
            assert_eq!(s.ids, true_topk(&data, group, dynamic.clone(), 15));
        }
    }

    #[test]
    fn whole_dynamic_budget_is_dense() {
        let data = uniform(300, 3, 16, 1);
        for width in [1, 2] {
            let mut sel = built(&HipFactory::new(4, 16, 4, width).unwrap(), &data);
            let n_dyn = sel.static_part().dynamic_range(300).len();
            let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
            let mut ids = s.ids.clone();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), n_dyn, "width {width}");
            assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-9);
        }
    }

    /// Keys with positional locality, as text has: runs of 32–160 consecutive keys around one
    /// of 64 topic directions each. Query groups aim at a random topic (plus noise), so the true
    /// top-k sits in the few runs of that topic, anywhere in the context.
    fn local_topics(n: usize, dim: usize, groups: usize, seed: u64) -> crate::testutil::Data {
        use needle_core::synth::{gaussian, uniform};
        let lens = uniform(n, 32.0, 160.0, seed);
        let noise = gaussian(n * dim, 0.6, seed ^ 1);
        let (mut keys, mut topics, mut run) = (Vec::with_capacity(n * dim), Vec::new(), 0usize);
        while keys.len() < n * dim {
            let t = gaussian(dim, 1.0, seed ^ (100 + (lens[(run + 7) % n] as u64 % 64)));
            let len = lens[run % n] as usize;
            for _ in 0..len.min(n - keys.len() / dim) {
                let i = keys.len();
                keys.extend(t.iter().zip(&noise[i..i + dim]).map(|(a, b)| a + b));
            }
            topics.push(t);
            run += 1;
        }
        let pick = uniform(groups, 0.0, topics.len() as f32, seed ^ 2);
        let qn = gaussian(groups * 3 * dim, 0.5, seed ^ 3);
        let queries = (0..groups * 3)
            .flat_map(|r| {
                let t = &topics[(pick[r / 3] as usize).min(topics.len() - 1)];
                t.iter().zip(&qn[r * dim..(r + 1) * dim]).map(|(a, b)| a + b).collect::<Vec<_>>()
            })
            .collect();
        crate::testutil::Data { dim, values: gaussian(n * dim, 1.0, seed ^ 4), keys, train: Vec::new(), queries }
    }

    #[test]
    fn recalls_the_oracles_keys_scoring_a_fraction() {
        // At 16K keys with locality, HiP must recover most of the oracle's top-k while scoring a
        // small share of the keys, and a wider descent must do better.
        let (n, dim, k) = (16384, 64, 100);
        let data = local_topics(n, dim, 8, 9);
        let mut oracle = built(&OracleFactory::new(16, 64), &data);
        let mut recall_of = |data: &crate::testutil::Data, width: usize| -> (f64, f64) {
            let mut sel = built(&HipFactory::new(16, 64, 4, width).unwrap(), data);
            let (mut r, mut scored) = (0.0, 0.0);
            let groups = data.queries.chunks_exact(3 * dim).count();
            for group in data.queries.chunks_exact(3 * dim) {
                let want = select(oracle.as_mut(), data, group, Budget::TopK(k));
                let got = select(sel.as_mut(), data, group, Budget::TopK(k));
                assert_eq!(got.ids.len(), k);
                r += recall(&got.ids, &want.ids) / groups as f64;
                scored += got.stats.full_scored as f64 / groups as f64 / n as f64;
            }
            (r, scored)
        };
        let (r2, s2) = recall_of(&data, 2);
        let (r8, s8) = recall_of(&data, 8);
        // The target topic has a few runs; 2 × 25 spans cannot follow all of them, 8 × 25 can.
        assert!(r2 >= 0.3 && r8 >= 0.8, "recall {r2} at width 2 (scored {s2}), {r8} at 8 (scored {s8})");
        assert!(r8 >= r2 + 0.2, "recall {r8} at width 8 against {r2} at 2");
        assert!(s2 < 0.08 && s8 < 0.2, "scored {s2} / {s8}");
        // Without locality (keys i.i.d. over positions) a middle key says little about its
        // span: HiP's premise fails, and this test's bar would too.
        let iid = attention_like(n, 8, 24, dim, 9);
        let (r_iid, _) = recall_of(&iid, 8);
        assert!(r_iid < r8 - 0.3, "recall {r_iid} without locality, {r8} with");
    }

    #[test]
    fn state_is_the_spec() {
        let data = uniform(200, 3, 16, 2);
        let sel = built(&HipFactory::new(4, 16, 4, 2).unwrap(), &data);
        let mut st = Vec::new();
        sel.save_state(&mut st).unwrap();
        let keys = needle_core::Rows::new("keys", &data.keys, 16).unwrap();
        let mut same = HipFactory::new(4, 16, 4, 2).unwrap().create(crate::testutil::HEAD, 16).unwrap();
        same.load_state(&st, &keys).unwrap();
        let mut other = HipFactory::new(4, 16, 8, 2).unwrap().create(crate::testutil::HEAD, 16).unwrap();
        assert!(other.load_state(&st, &keys).is_err());
    }
}
