//! Quest (Tang et al., arXiv 2406.10774): the dynamic part in pages of `page` keys, each
//! summarised by its element-wise minimum and maximum key. For a query `q` the page's
//! largest possible score is `Σ_i max(q_i·min_i, q_i·max_i)`, an upper bound of `q·k` for
//! every key of the page; the pages with the largest bounds are attended in full.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, SearchStats, Selection,
    SelectorFactory, StaticPart, check_len,
};

use crate::common::{Frame, SelectStep, begin_select, begin_state, keep_top, open_state, read_range, write_range};

const TAG: &[u8; 8] = b"sel.qest";
const VERSION: u32 = 1;

/// Default page size in tokens (Quest's).
pub const DEFAULT_PAGE: usize = 16;

/// Makes [`QuestSelector`]s; spec `quest:k=256,page=16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuestFactory {
    frame: Frame,
    page: usize,
}

impl QuestFactory {
    /// Pages of `page` tokens (at least 1) beside a static part of `sinks` + `window` tokens.
    pub fn new(sinks: usize, window: usize, page: usize) -> Result<Self> {
        if page == 0 {
            return Err(Error::invalid("page", "must be at least 1 token"));
        }
        Ok(Self { frame: Frame { sinks, window }, page })
    }
}

impl SelectorFactory for QuestFactory {
    fn describe(&self) -> String {
        format!("quest:page={},{}", self.page, self.frame.describe())
    }
    fn create(&self, _head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(QuestSelector::new(*self, dim)))
    }
}

/// The page upper bound `Σ_i max(q_i·min_i, q_i·max_i)` of `q·k` over keys with element-wise
/// bounds `min ≤ k ≤ max`.
#[inline]
pub fn page_bound(q: &[f32], min: &[f32], max: &[f32]) -> f32 {
    q.iter().zip(min.iter().zip(max)).map(|(&q, (&lo, &hi))| (q * lo).max(q * hi)).sum()
}

/// Page selection by min/max bounds.
///
/// Pages are aligned on absolute positions (`position / page`), so a page may straddle the
/// start of the dynamic part (its bound then covers only its dynamic keys) and the last page
/// may be partial (its bound grows as tokens are inserted). A budget of `k` tokens selects
/// `⌈k/page⌉` pages; for a query group a page's score is the largest bound over the group.
/// `Budget::Mass` is served as its cap (bounds do not estimate mass).
#[derive(Debug, Clone)]
pub struct QuestSelector {
    cfg: QuestFactory,
    dim: usize,
    /// Absolute page number of `mins[0..dim]`.
    first_page: u32,
    mins: Vec<f32>,
    maxs: Vec<f32>,
    /// Positions summarised by the pages.
    covered: Range<u32>,
    cands: Vec<(u32, f32)>,
}

impl QuestSelector {
    /// An empty selector for vectors of `dim` floats.
    pub fn new(cfg: QuestFactory, dim: usize) -> Self {
        Self { cfg, dim, first_page: 0, mins: Vec::new(), maxs: Vec::new(), covered: 0..0, cands: Vec::new() }
    }

    /// Pages summarised so far.
    pub fn pages(&self) -> usize {
        self.mins.len() / self.dim.max(1)
    }

    /// Element-wise `(min, max)` of page `i` (counted from the first summarised page).
    pub fn page(&self, i: usize) -> Option<(&[f32], &[f32])> {
        let r = i * self.dim..(i + 1) * self.dim;
        Some((self.mins.get(r.clone())?, self.maxs.get(r)?))
    }

    /// Positions of page `i` that the selector summarises.
    fn page_positions(&self, i: usize) -> Range<u32> {
        let start = (self.first_page as usize + i) * self.cfg.page;
        let (s, e) = (start as u32, (start + self.cfg.page) as u32);
        s.max(self.covered.start)..e.min(self.covered.end)
    }

    /// The bound of page `i` for the group (largest over its queries).
    pub fn group_bound(&self, queries: &[f32], i: usize) -> Option<f32> {
        let (lo, hi) = self.page(i)?;
        Some(queries.chunks_exact(self.dim).map(|q| page_bound(q, lo, hi)).fold(f32::NEG_INFINITY, f32::max))
    }

    /// Adds positions `covered.end..end` to their pages.
    fn extend_to(&mut self, keys: &dyn RowSource, end: u32) -> Result<()> {
        if end <= self.covered.end {
            return Ok(());
        }
        keys.check_id("keys", end - 1)?;
        check_len("keys dim", self.dim, keys.dim())?;
        let d = self.dim;
        for p in self.covered.end..end {
            let page = p / self.cfg.page as u32;
            if self.covered.is_empty() && self.mins.is_empty() {
                self.first_page = page;
            }
            let i = (page - self.first_page) as usize;
            let key = keys.row(p as usize);
            if i == self.pages() {
                key.extend_into(&mut self.mins);
                key.extend_into(&mut self.maxs);
            } else {
                let (lo, hi) = (&mut self.mins[i * d..(i + 1) * d], &mut self.maxs[i * d..(i + 1) * d]);
                for ((l, h), x) in lo.iter_mut().zip(hi.iter_mut()).zip(key.iter()) {
                    *l = l.min(x);
                    *h = h.max(x);
                }
            }
            self.covered.end = p + 1;
        }
        Ok(())
    }
}

impl AttentionSelector for QuestSelector {
    fn describe(&self) -> String {
        self.cfg.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.cfg.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        self.mins.clear();
        self.maxs.clear();
        self.first_page = dynamic.start / self.cfg.page as u32;
        self.covered = dynamic.start..dynamic.start;
        self.extend_to(ctx.keys, dynamic.end)?;
        Ok(BuildStats { vectors: self.covered.len(), train_queries: 0, seconds: 0.0, bytes: self.memory_bytes() })
    }
    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()> {
        if self.covered.is_empty() && self.mins.is_empty() {
            self.covered = positions.start..positions.start;
        }
        self.extend_to(keys, positions.end)
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        let Some(step) = begin_select(self.static_part(), queries, self.dim, keys, budget, out)? else {
            return Ok(());
        };
        let SelectStep { group: g, dynamic, budget } = step;
        let budget = &budget;
        if self.covered.is_empty() && self.mins.is_empty() {
            self.first_page = dynamic.start / self.cfg.page as u32;
            self.covered = dynamic.start..dynamic.start;
        }
        // Tokens that reached the dynamic part without an insert are summarised now.
        self.extend_to(keys, dynamic.end)?;
        let d = self.dim;
        self.cands.clear();
        for i in 0..self.pages() {
            let (lo, hi) = (&self.mins[i * d..(i + 1) * d], &self.maxs[i * d..(i + 1) * d]);
            let b = queries.chunks_exact(d).map(|q| page_bound(q, lo, hi)).fold(f32::NEG_INFINITY, f32::max);
            self.cands.push((i as u32, b));
        }
        let pages = self.pages();
        keep_top(&mut self.cands, budget.max_ids().div_ceil(self.cfg.page));
        for c in &self.cands {
            let r = self.page_positions(c.0 as usize);
            out.ids.extend(r.start.max(dynamic.start)..r.end.min(dynamic.end));
        }
        out.stats =
            SearchStats { full_scored: 0, codes_scored: (pages * g) as u64, bytes_read: (pages * 2 * d * 4) as u64 };
        Ok(())
    }
    // The page bounds are written (recomputing them reads every key again).
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = begin_state(out, TAG, VERSION, &self.describe());
        w.u32(self.first_page);
        write_range(&mut w, &self.covered);
        w.f32s(&self.mins);
        w.f32s(&self.maxs);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let mut r = open_state("quest selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?;
        let first_page = r.u32("first_page")?;
        let covered = read_range(&mut r, "covered", keys.len())?;
        let page = self.cfg.page as u32;
        // Pages run from the covered start's page to the last covered position's.
        let pages = if covered.is_empty() {
            0
        } else if first_page != covered.start / page {
            return Err(r.fail(
                "first_page",
                format!("{first_page}, but the covered positions start on page {}", covered.start / page),
            ));
        } else {
            ((covered.end - 1) / page - first_page + 1) as usize
        };
        let mins = r.f32s_exact("mins", pages * self.dim)?;
        let maxs = r.f32s_exact("maxs", pages * self.dim)?;
        if let Some(i) = mins.iter().zip(&maxs).position(|(lo, hi)| lo > hi) {
            return Err(r.fail("mins", format!("page bound {i}: minimum {} above maximum {}", mins[i], maxs[i])));
        }
        r.finish()?;
        (self.first_page, self.covered, self.mins, self.maxs) = (first_page, covered, mins, maxs);
        Ok(())
    }
    fn memory_bytes(&self) -> usize {
        (self.mins.capacity() + self.maxs.capacity()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{HEAD, assert_dense, built, select, uniform};
    use needle_core::PagedRows;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn page_bound_bounds_every_key_of_the_page(
            keys in proptest::collection::vec(-10.0f32..10.0, 4..=64),
            q in proptest::collection::vec(-10.0f32..10.0, 4),
        ) {
            let rows = keys.chunks_exact(4);
            let mut lo = [f32::INFINITY; 4];
            let mut hi = [f32::NEG_INFINITY; 4];
            for k in rows.clone() {
                for i in 0..4 {
                    lo[i] = lo[i].min(k[i]);
                    hi[i] = hi[i].max(k[i]);
                }
            }
            let b = page_bound(&q, &lo, &hi);
            for k in rows {
                let s: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                prop_assert!(s <= b + 1e-3 * (1.0 + b.abs()), "score {} > bound {}", s, b);
            }
        }
    }

    #[test]
    fn every_selector_page_bounds_its_keys_across_boundaries() {
        // sinks = 5 and a partial last page: pages straddle both ends of the dynamic part.
        let data = uniform(300, 3, 8, 11);
        let mut sel = QuestSelector::new(QuestFactory::new(5, 30, 16).unwrap(), 8);
        let keys = needle_core::Rows::new("k", &data.keys, 8).unwrap();
        let dynamic = sel.static_part().dynamic_range(300);
        assert_eq!(dynamic, 5..270);
        sel.build(&BuildContext { head: HEAD, keys: &keys, train_queries: &[], scale: 0.3 }).unwrap();
        assert_eq!(sel.pages(), 17); // pages 0..=16, the first and last partial
        for i in 0..sel.pages() {
            let b = sel.group_bound(&data.queries, i).unwrap();
            let r = sel.page_positions(i);
            assert!(r.start >= dynamic.start && r.end <= dynamic.end && !r.is_empty());
            for p in r {
                let s = crate::common::group_max(&data.queries, 8, &data.keys[p as usize * 8..(p as usize + 1) * 8]);
                assert!(s <= b + 1e-4, "page {i}: {s} > {b}");
            }
        }
    }

    #[test]
    fn all_pages_are_dense_and_budget_counts_pages() {
        let data = uniform(300, 3, 8, 12);
        let f = QuestFactory::new(5, 30, 16).unwrap();
        let mut sel = built(&f, &data);
        let n_dyn = sel.static_part().dynamic_range(300).len();
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
        assert_eq!(s.ids.len(), n_dyn);
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-9);
        // 20 tokens = 2 pages; the selected pages hold the best key (its page bound is largest
        // or another page's bound is larger still).
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(20));
        assert!(s.ids.len() <= 32 && s.ids.len() > 16, "{}", s.ids.len());
        assert_eq!(s.stats.codes_scored, 17 * 3);
    }

    #[test]
    fn inserted_tokens_extend_the_last_page() {
        let dim = 8;
        let data = uniform(100, 1, dim, 13);
        let mut keys = PagedRows::new(dim, 32).unwrap();
        keys.extend_from_slice(&data.keys).unwrap();
        let f = QuestFactory::new(4, 10, 16).unwrap();
        let mut sel = f.create(HEAD, dim).unwrap();
        let sp = sel.static_part();
        let ctx = BuildContext { head: HEAD, keys: &keys, train_queries: &[], scale: 0.3 };
        sel.build(&ctx).unwrap();
        let q = &data.queries[..dim];
        let pos = keys.push(&q.iter().map(|x| 50.0 * x).collect::<Vec<_>>()).unwrap();
        for _ in 0..sp.window {
            keys.push(&data.keys[..dim]).unwrap();
        }
        for p in sp.dynamic_range(101).end..sp.dynamic_range(keys.len()).end {
            sel.insert(&keys, p..p + 1).unwrap();
        }
        let mut out = Selection::default();
        sel.select(q, &keys, &Budget::TopK(16), &mut out).unwrap();
        assert!(out.ids.contains(&pos), "{:?}", out.ids);
    }
}
