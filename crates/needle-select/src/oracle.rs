//! The oracle: exact top-k over the dynamic part by true scores. It scans every key, so it is
//! no speed-up; it is the upper bound of what any index-based selector can reach.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};

use crate::common::{
    Frame, SelectStep, begin_select, begin_state, default_scale, full_cost, group_max, keep_top, open_state,
};

const TAG: &[u8; 8] = b"sel.orcl";
const VERSION: u32 = 1;

/// Makes [`OracleSelector`]s; spec `oracle:k=K` or `oracle:mass=0.9,k=MAX`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OracleFactory {
    frame: Frame,
}

impl OracleFactory {
    /// An oracle beside a static part of `sinks` + `window` tokens.
    pub fn new(sinks: usize, window: usize) -> Self {
        Self { frame: Frame { sinks, window } }
    }
}

impl SelectorFactory for OracleFactory {
    fn describe(&self) -> String {
        format!("oracle:{}", self.frame.describe())
    }
    fn create(&self, _head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(OracleSelector::new(self.frame.sinks, self.frame.window, dim)))
    }
}

/// Exact selection over the dynamic part.
///
/// - `Budget::TopK(k)`: the `k` keys with the largest group score `max_h q_h·k` (the group's
///   true top-k; with one query head, the exact top-k).
/// - `Budget::Mass { target, max }`: the smallest set whose share of the dynamic part's
///   attention mass, averaged over the group's heads, reaches `target` (at most `max` ids):
///   keys in decreasing order of their mean per-head softmax probability, which is optimal
///   for that objective.
#[derive(Debug, Clone)]
pub struct OracleSelector {
    frame: Frame,
    dim: usize,
    scale: f32,
    cands: Vec<(u32, f32)>,
    scores: Vec<f32>,
    probs: Vec<f64>,
}

impl OracleSelector {
    /// An oracle for vectors of `dim` floats.
    pub fn new(sinks: usize, window: usize, dim: usize) -> Self {
        Self {
            frame: Frame { sinks, window },
            dim,
            scale: default_scale(dim),
            cands: Vec::new(),
            scores: Vec::new(),
            probs: Vec::new(),
        }
    }

    fn select_mass(&mut self, queries: &[f32], keys: &dyn RowSource, dynamic: Range<u32>, target: f32, max: usize) {
        let (dim, n) = (self.dim, dynamic.len());
        let g = queries.len() / dim;
        self.scores.clear();
        for q in queries.chunks_exact(dim) {
            self.scores.extend(dynamic.clone().map(|p| self.scale * keys.row(p as usize).dot(q)));
        }
        self.probs.clear();
        self.probs.resize(n, 0.0);
        for h in 0..g {
            let row = &self.scores[h * n..(h + 1) * n];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&s| f64::from(s - m).exp()).sum();
            for (p, &s) in self.probs.iter_mut().zip(row) {
                *p += f64::from(s - m).exp() / z / g as f64;
            }
        }
        self.cands.clear();
        self.cands.extend(self.probs.iter().enumerate().map(|(i, &p)| (dynamic.start + i as u32, p as f32)));
        keep_top(&mut self.cands, max);
        let goal = f64::from(target);
        let mut acc = 0.0;
        let mut take = self.cands.len();
        for (i, c) in self.cands.iter().enumerate() {
            acc += self.probs[(c.0 - dynamic.start) as usize];
            // Slack for rounding: a target of 1 must not demand more than every key.
            if acc >= goal - 1e-9 {
                take = i + 1;
                break;
            }
        }
        self.cands.truncate(take);
    }
}

impl AttentionSelector for OracleSelector {
    fn describe(&self) -> String {
        format!("oracle:{}", self.frame.describe())
    }
    fn static_part(&self) -> StaticPart {
        self.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        self.scale = ctx.scale;
        Ok(BuildStats { vectors: dynamic.len(), ..Default::default() })
    }
    // The attention scale is all a build sets.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        begin_state(out, TAG, VERSION, &self.describe()).f32(self.scale);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let mut r = open_state("oracle selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?;
        let scale = r.f32("scale")?;
        r.finish()?;
        self.scale = scale;
        Ok(())
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> Result<()> {
        Ok(())
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        let Some(step) = begin_select(self.static_part(), queries, self.dim, keys, budget, out)? else {
            return Ok(());
        };
        let SelectStep { group: _, dynamic, budget } = step;
        let budget = &budget;
        out.stats = full_cost(dynamic.len(), self.dim);
        match *budget {
            Budget::TopK(k) => {
                self.cands.clear();
                self.cands.extend(dynamic.clone().map(|p| (p, group_max(queries, self.dim, keys.row(p as usize)))));
                keep_top(&mut self.cands, k);
            }
            Budget::Mass { target, max } => self.select_mass(queries, keys, dynamic, target, max),
        }
        out.ids.extend(self.cands.iter().map(|c| c.0));
        Ok(())
    }
    fn memory_bytes(&self) -> usize {
        self.cands.capacity() * 8 + self.scores.capacity() * 4 + self.probs.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_dense, attention_like, built, select, true_topk, uniform};
    use needle_core::metrics::attention_mass;

    #[test]
    fn whole_dynamic_budget_is_dense() {
        let data = uniform(300, 3, 16, 1);
        let mut sel = built(&OracleFactory::new(4, 16), &data);
        let n_dyn = sel.static_part().dynamic_range(300).len();
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
        assert_eq!(s.ids.len(), n_dyn);
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-9);
        let s = select(sel.as_mut(), &data, &data.queries, Budget::Mass { target: 1.0, max: n_dyn });
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-6);
    }

    #[test]
    fn top_k_is_exact_for_a_group() {
        let data = attention_like(500, 8, 6, 32, 2);
        let mut sel = built(&OracleFactory::new(8, 32), &data);
        let dynamic = sel.static_part().dynamic_range(500);
        for group in data.queries.chunks_exact(3 * 32) {
            let s = select(sel.as_mut(), &data, group, Budget::TopK(20));
            assert_eq!(s.ids, true_topk(&data, group, dynamic.clone(), 20));
            assert_eq!(s.stats.full_scored, dynamic.len() as u64);
        }
    }

    #[test]
    fn mass_budget_reaches_its_target_with_the_fewest_keys() {
        let data = attention_like(800, 8, 3, 32, 3);
        let mut sel = built(&OracleFactory::new(8, 32), &data);
        let dynamic = sel.static_part().dynamic_range(800);
        let scale = 1.0 / (32f32).sqrt();
        // The group's mass: mean over heads of each head's dynamic-part softmax share.
        let mass = |ids: &[u32]| -> f64 {
            let local: Vec<u32> = ids.iter().map(|p| p - dynamic.start).collect();
            let per_head = data.queries.chunks_exact(32).map(|q| {
                let s: Vec<f32> = dynamic
                    .clone()
                    .map(|p| scale * crate::common::dot(q, &data.keys[p as usize * 32..(p as usize + 1) * 32]))
                    .collect();
                attention_mass(&s, &local).unwrap()
            });
            per_head.sum::<f64>() / 3.0
        };
        for target in [0.5f32, 0.8, 0.95] {
            let s = select(sel.as_mut(), &data, &data.queries, Budget::Mass { target, max: dynamic.len() });
            let got = mass(&s.ids);
            assert!(got >= f64::from(target) - 1e-6, "target {target}: {got}");
            assert!(mass(&s.ids[..s.ids.len() - 1]) < f64::from(target), "not minimal at {target}");
        }
        // The cap wins over the target.
        let s = select(sel.as_mut(), &data, &data.queries, Budget::Mass { target: 0.99, max: 5 });
        assert_eq!(s.ids.len(), 5);
    }
}
