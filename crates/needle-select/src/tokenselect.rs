//! TokenSelect (Wu et al., arXiv 2411.02886): token-level selection by per-head `Q·K` scores
//! with soft voting across the heads that share a KV head, and a selection cache reused while
//! consecutive query groups stay similar.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, SearchStats, Selection,
    SelectorFactory, StaticPart,
};

use crate::common::{
    Frame, SelectStep, begin_select, begin_state, default_scale, dot, full_cost, keep_top, open_state, read_range,
    write_range,
};

const TAG: &[u8; 8] = b"sel.toks";
const VERSION: u32 = 1;

/// Default cosine similarity above which a cached selection is reused.
pub const DEFAULT_THRESHOLD: f32 = 0.9;

/// Cache hits and misses, shared by every selector of one factory.
#[derive(Debug, Default)]
pub struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CacheCounters {
    /// `(hits, misses)` so far.
    pub fn get(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

/// Makes [`TokenSelectSelector`]s; spec `tokenselect:k=256,threshold=0.9`.
#[derive(Debug, Clone)]
pub struct TokenSelectFactory {
    frame: Frame,
    threshold: f32,
    counters: Arc<CacheCounters>,
}

impl TokenSelectFactory {
    /// Reuses a selection while every query of the group has cosine `>= threshold` (in
    /// `[-1, 1]`; above 1 disables the cache) with the query it was made for.
    pub fn new(sinks: usize, window: usize, threshold: f32) -> Result<Self> {
        if !(-1.0..=2.0).contains(&threshold) {
            return Err(Error::invalid("threshold", format!("{threshold} is outside [-1, 2] (above 1: no cache)")));
        }
        Ok(Self { frame: Frame { sinks, window }, threshold, counters: Arc::default() })
    }

    /// Cache hits and misses of every selector made by this factory.
    pub fn counters(&self) -> Arc<CacheCounters> {
        Arc::clone(&self.counters)
    }
}

impl SelectorFactory for TokenSelectFactory {
    fn describe(&self) -> String {
        format!("tokenselect:threshold={},{}", self.threshold, self.frame.describe())
    }
    fn create(&self, _head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(TokenSelectSelector::new(self.clone(), dim)))
    }
}

/// Token-level selection with soft voting and a selection cache.
///
/// On a miss every dynamic key is scored by every query of the group; each head's scores go
/// through a softmax over the dynamic part and the group votes with the sum of those
/// probabilities (so no single head with large logits dominates). The top-k by vote is the
/// selection; with `Budget::Mass`, the shortest prefix whose mean per-head probability reaches
/// the target. On a hit (same budget, every query at cosine `>= threshold` with the cached
/// one) the cached ids are returned and only `g` cosines are computed: the selection's stats
/// then show `full_scored = 0` and `codes_scored = g`. Hits and misses are counted per
/// selector ([`TokenSelectSelector::cache_stats`]) and per factory ([`CacheCounters`]).
#[derive(Debug, Clone)]
pub struct TokenSelectSelector {
    cfg: TokenSelectFactory,
    dim: usize,
    scale: f32,
    cached_queries: Vec<f32>,
    cached_ids: Vec<u32>,
    cached_budget: Option<Budget>,
    cached_dynamic: Range<u32>,
    scores: Vec<f32>,
    votes: Vec<(u32, f32)>,
    hits: u64,
    misses: u64,
}

impl TokenSelectSelector {
    /// A selector for vectors of `dim` floats.
    pub fn new(cfg: TokenSelectFactory, dim: usize) -> Self {
        Self {
            cfg,
            dim,
            scale: default_scale(dim),
            cached_queries: Vec::new(),
            cached_ids: Vec::new(),
            cached_budget: None,
            cached_dynamic: 0..0,
            scores: Vec::new(),
            votes: Vec::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// `(hits, misses)` of this selector.
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    fn cache_hit(&self, queries: &[f32], dynamic: &Range<u32>, budget: &Budget) -> bool {
        if self.cached_budget != Some(*budget)
            || self.cached_queries.len() != queries.len()
            || dynamic.start != self.cached_dynamic.start
            || dynamic.end < self.cached_dynamic.end
        {
            return false;
        }
        let d = self.dim;
        queries.chunks_exact(d).zip(self.cached_queries.chunks_exact(d)).all(|(a, b)| {
            let n = (dot(a, a) * dot(b, b)).sqrt();
            n > 0.0 && dot(a, b) / n >= self.cfg.threshold
        })
    }
}

impl AttentionSelector for TokenSelectSelector {
    fn describe(&self) -> String {
        self.cfg.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.cfg.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        self.scale = ctx.scale;
        self.cached_budget = None;
        Ok(BuildStats { vectors: dynamic.len(), ..Default::default() })
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> Result<()> {
        Ok(())
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        let Some(step) = begin_select(self.static_part(), queries, self.dim, keys, budget, out)? else {
            return Ok(());
        };
        let SelectStep { group: g, dynamic, budget } = step;
        let budget = &budget;
        if self.cache_hit(queries, &dynamic, budget) {
            self.hits += 1;
            self.cfg.counters.hits.fetch_add(1, Ordering::Relaxed);
            out.ids.extend_from_slice(&self.cached_ids);
            out.stats =
                SearchStats { full_scored: 0, codes_scored: g as u64, bytes_read: (2 * g * self.dim * 4) as u64 };
            return Ok(());
        }
        self.misses += 1;
        self.cfg.counters.misses.fetch_add(1, Ordering::Relaxed);
        let (d, n) = (self.dim, dynamic.len());
        self.votes.clear();
        self.votes.extend(dynamic.clone().map(|p| (p, 0.0)));
        for q in queries.chunks_exact(d) {
            self.scores.clear();
            self.scores.extend(dynamic.clone().map(|p| self.scale * keys.row(p as usize).dot(q)));
            let m = self.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = self.scores.iter().map(|&s| (s - m).exp()).sum();
            for (v, &s) in self.votes.iter_mut().zip(&self.scores) {
                v.1 += (s - m).exp() / z;
            }
        }
        keep_top(&mut self.votes, budget.max_ids());
        if let Budget::Mass { target, .. } = *budget {
            // Votes are sums of g probabilities: mean mass is vote / g.
            let mut acc = 0.0f64;
            let goal = f64::from(target) * g as f64;
            let take = self.votes.iter().position(|v| {
                acc += f64::from(v.1);
                acc >= goal * (1.0 - 1e-6)
            });
            self.votes.truncate(take.map_or(self.votes.len(), |i| i + 1));
        }
        out.ids.extend(self.votes.iter().map(|v| v.0));
        out.stats = full_cost(n, d);
        self.cached_queries.clear();
        self.cached_queries.extend_from_slice(queries);
        self.cached_ids.clear();
        self.cached_ids.extend_from_slice(&out.ids);
        self.cached_budget = Some(*budget);
        self.cached_dynamic = dynamic;
        Ok(())
    }
    // Nothing is built but the scale; the selection cache and its counters are written too, so
    // that a loaded selector hits and misses exactly as the saved one would have.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = begin_state(out, TAG, VERSION, &self.describe());
        w.f32(self.scale);
        w.u64(self.hits);
        w.u64(self.misses);
        match self.cached_budget {
            None => w.u8(0),
            Some(Budget::TopK(k)) => {
                w.u8(1);
                w.len(k);
            }
            Some(Budget::Mass { target, max }) => {
                w.u8(2);
                w.f32(target);
                w.len(max);
            }
        }
        write_range(&mut w, &self.cached_dynamic);
        w.f32s(&self.cached_queries);
        w.u32s(&self.cached_ids);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let mut r = open_state("tokenselect selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?;
        let scale = r.f32("scale")?;
        let (hits, misses) = (r.u64("hits")?, r.u64("misses")?);
        let budget = match r.u8("cached_budget")? {
            0 => None,
            1 => Some(Budget::TopK(r.len("cached_budget", keys.len())?)),
            2 => Some(Budget::Mass { target: r.f32("cached_budget")?, max: r.len("cached_budget", keys.len())? }),
            t => return Err(r.fail("cached_budget", format!("unknown budget kind {t}"))),
        };
        if let Some(b) = &budget {
            b.validate(keys.len()).map_err(|e| r.fail("cached_budget", e.to_string()))?;
        }
        let dynamic = read_range(&mut r, "cached_dynamic", keys.len())?;
        let queries = r.f32s("cached_queries", usize::MAX)?;
        if !queries.len().is_multiple_of(self.dim) {
            return Err(r.fail("cached_queries", format!("{} floats are not rows of {}", queries.len(), self.dim)));
        }
        let ids = r.u32s("cached_ids", dynamic.len())?;
        if let Some(&p) = ids.iter().find(|p| !dynamic.contains(p)) {
            return Err(r.fail("cached_ids", format!("{p} lies outside the cached dynamic part {dynamic:?}")));
        }
        r.finish()?;
        (self.scale, self.hits, self.misses, self.cached_budget) = (scale, hits, misses, budget);
        (self.cached_dynamic, self.cached_queries, self.cached_ids) = (dynamic, queries, ids);
        Ok(())
    }
    fn memory_bytes(&self) -> usize {
        (self.cached_queries.capacity() + self.cached_ids.capacity() + self.scores.capacity()) * 4
            + self.votes.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_dense, built, select, uniform};

    #[test]
    fn whole_budget_is_dense() {
        let data = uniform(300, 3, 8, 41);
        let mut sel = built(&TokenSelectFactory::new(4, 16, 0.9).unwrap(), &data);
        let n_dyn = sel.static_part().dynamic_range(300).len();
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
        assert_eq!(s.ids.len(), n_dyn);
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-9);
    }

    #[test]
    fn cache_hits_when_the_query_repeats_and_misses_when_it_changes() {
        let data = uniform(300, 6, 8, 42);
        let f = TokenSelectFactory::new(4, 16, 0.95).unwrap();
        let mut sel = TokenSelectSelector::new(f.clone(), 8);
        let keys = needle_core::Rows::new("k", &data.keys, 8).unwrap();
        let (a, b) = data.queries.split_at(24);
        let mut out = Selection::default();
        let mut run = |sel: &mut TokenSelectSelector, q: &[f32], k: usize| {
            sel.select(q, &keys, &Budget::TopK(k), &mut out).unwrap();
            out.clone()
        };
        let first = run(&mut sel, a, 20);
        let again = run(&mut sel, a, 20);
        assert_eq!(again.ids, first.ids);
        assert_eq!((again.stats.full_scored, again.stats.codes_scored), (0, 3));
        // A slightly scaled query has cosine 1: still a hit.
        let scaled: Vec<f32> = a.iter().map(|x| 1.5 * x).collect();
        run(&mut sel, &scaled, 20);
        assert_eq!(sel.cache_stats(), (2, 1));
        // A different query, or another budget, misses.
        let other = run(&mut sel, b, 20);
        assert!(other.stats.full_scored > 0);
        run(&mut sel, b, 30);
        assert_eq!(sel.cache_stats(), (2, 3));
        assert_eq!(f.counters().get(), (2, 3));
    }
}
