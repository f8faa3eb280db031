//! MagicPIG (Chen et al., arXiv 2410.16179): instead of the top-k, a sample of the dynamic part
//! drawn by SimHash collisions, each key carrying the log-weight `ln(1/u)` of its inclusion
//! probability `u`, so that the model's weighted attention over the sample is the
//! importance-sampling (Horvitz–Thompson) estimate of the dynamic part's softmax numerator and
//! denominator.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart, VectorIndex, check_len,
};
use needle_index_lsh::LshIndex;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

use crate::common::{Frame, SelectStep, begin_select, begin_state, gather, open_state, read_range, write_range};

const TAG: &[u8; 8] = b"sel.lshs";
const VERSION: u32 = 1;

/// Default signature bits `K`.
pub const DEFAULT_BITS: usize = needle_index_lsh::DEFAULT_K_BITS;
/// Default tables `L`.
pub const DEFAULT_TABLES: usize = needle_index_lsh::DEFAULT_L_TABLES;
/// Default minimum collisions for a key to be sampled (MagicPIG uses 2).
pub const DEFAULT_MIN_COLLISIONS: usize = 2;

/// Makes [`LshSampleSelector`]s; spec `lsh-sample:bits=10,tables=64,min_collisions=2,seed=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshSampleFactory {
    frame: Frame,
    bits: usize,
    tables: usize,
    min_collisions: usize,
    seed: u64,
}

impl LshSampleFactory {
    /// Sampling with `bits`-bit signatures in `tables` tables, keeping keys that collide in at
    /// least `min_collisions` tables; hyperplanes and thinning drawn from `seed` (and the head).
    pub fn new(
        sinks: usize,
        window: usize,
        bits: usize,
        tables: usize,
        min_collisions: usize,
        seed: u64,
    ) -> Result<Self> {
        // Validates bits and tables the way the index does.
        LshIndex::new(1, bits, tables, seed)?;
        if !(1..=tables).contains(&min_collisions) {
            return Err(Error::invalid("min_collisions", format!("{min_collisions} is outside 1..={tables} (tables)")));
        }
        Ok(Self { frame: Frame { sinks, window }, bits, tables, min_collisions, seed })
    }
}

impl Default for LshSampleFactory {
    fn default() -> Self {
        Self {
            frame: Frame::default(),
            bits: DEFAULT_BITS,
            tables: DEFAULT_TABLES,
            min_collisions: DEFAULT_MIN_COLLISIONS,
            seed: needle_index_lsh::DEFAULT_SEED,
        }
    }
}

impl SelectorFactory for LshSampleFactory {
    fn describe(&self) -> String {
        format!(
            "lsh-sample:bits={},tables={},min_collisions={},seed={},{}",
            self.bits,
            self.tables,
            self.min_collisions,
            self.seed,
            self.frame.describe()
        )
    }
    fn create(&self, head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(LshSampleSelector::new(*self, head, dim)?))
    }
}

/// MagicPIG sampling over the dynamic part.
///
/// The group is sampled once, with the mean of its queries: the inclusion probabilities `u`
/// are then exact for the one sample every head of the group attends to, so the estimate is
/// unbiased for each head (with more variance for heads far from the mean). When the sample
/// holds more keys than the budget allows, `k` of them are kept by simple random sampling and
/// their log-weights gain `ln(n/k)` — conditional inclusion `k/n` — which keeps the estimates
/// unbiased. `Budget::Mass` is served as its cap.
#[derive(Debug, Clone)]
pub struct LshSampleSelector {
    cfg: LshSampleFactory,
    dim: usize,
    index: LshIndex,
    covered: Range<u32>,
    /// `StdRng`'s generator, whose position can be saved.
    rng: ChaCha12Rng,
    rng_seed: u64,
    mean: Vec<f32>,
    rows: Vec<f32>,
    picks: Vec<(u32, f32)>,
}

impl LshSampleSelector {
    /// An empty selector for `head` over vectors of `dim` floats.
    pub fn new(cfg: LshSampleFactory, head: HeadId, dim: usize) -> Result<Self> {
        // Each head gets its own hyperplanes, as independent samplers.
        let seed = cfg.seed ^ ((head.layer as u64) << 32 | head.kv_head as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(Self {
            index: LshIndex::new(dim, cfg.bits, cfg.tables, seed)?,
            cfg,
            dim,
            covered: 0..0,
            rng: ChaCha12Rng::seed_from_u64(seed.rotate_left(17)),
            rng_seed: seed.rotate_left(17),
            mean: Vec::new(),
            rows: Vec::new(),
            picks: Vec::new(),
        })
    }

    fn extend_to(&mut self, keys: &dyn RowSource, end: u32) -> Result<()> {
        if end <= self.covered.end {
            return Ok(());
        }
        keys.check_id("keys", end - 1)?;
        check_len("keys dim", self.dim, keys.dim())?;
        self.rows.clear();
        for p in self.covered.end..end {
            keys.row(p as usize).extend_into(&mut self.rows);
        }
        let ids = self.index.insert(&self.rows)?;
        check_len("LSH ids", self.covered.len(), ids.start as usize)?;
        self.covered.end = end;
        Ok(())
    }
}

impl AttentionSelector for LshSampleSelector {
    fn describe(&self) -> String {
        self.cfg.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.cfg.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        check_len("keys dim", self.dim, ctx.keys.dim())?;
        self.rows.clear();
        for p in dynamic.clone() {
            ctx.keys.row(p as usize).extend_into(&mut self.rows);
        }
        let stats = self.index.build(&self.rows, None)?;
        self.rows = Vec::new();
        self.covered = dynamic.clone();
        Ok(stats)
    }
    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()> {
        if self.covered.is_empty() {
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
        if self.covered.is_empty() {
            self.covered = dynamic.start..dynamic.start;
        }
        self.extend_to(keys, dynamic.end)?;
        self.mean.clear();
        self.mean.resize(self.dim, 0.0);
        for q in queries.chunks_exact(self.dim) {
            self.mean.iter_mut().zip(q).for_each(|(m, &x)| *m += x / g as f32);
        }
        let sample = self.index.sample_min_collisions(&self.mean, self.cfg.min_collisions)?;
        out.stats = sample.stats;
        self.picks.clear();
        let base = self.covered.start;
        for (id, lw) in sample.weighted_ids() {
            let p = base + id;
            if dynamic.contains(&p) {
                self.picks.push((p, lw));
            }
        }
        let (n, k) = (self.picks.len(), budget.max_ids());
        if k == 0 {
            return Ok(());
        }
        if n > k {
            let extra = (n as f64 / k as f64).ln() as f32;
            let keep = rand::seq::index::sample(&mut self.rng, n, k);
            for i in keep.iter() {
                let (p, lw) = self.picks[i];
                out.ids.push(p);
                out.log_weights.push(lw + extra);
            }
        } else {
            out.ids.extend(self.picks.iter().map(|c| c.0));
            out.log_weights.extend(self.picks.iter().map(|c| c.1));
        }
        Ok(())
    }
    // The sampler's position is written with the LSH tables, so that the loaded selector
    // thins the same samples the same way.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = begin_state(out, TAG, VERSION, &self.describe());
        write_range(&mut w, &self.covered);
        w.u128(self.rng.get_word_pos());
        w.nested(|o| self.index.save_state(o))
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let mut r = open_state("lsh-sample selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?;
        let covered = read_range(&mut r, "covered", keys.len())?;
        let word_pos = r.u128("rng")?;
        let mut index = self.index.clone();
        index.load_state(r.nested("index")?, &gather(keys, covered.clone()))?;
        r.finish()?;
        let mut rng = ChaCha12Rng::seed_from_u64(self.rng_seed);
        rng.set_word_pos(word_pos);
        (self.covered, self.index, self.rng) = (covered, index, rng);
        Ok(())
    }
    fn memory_bytes(&self) -> usize {
        self.index.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{HEAD, assert_dense, select, uniform};
    use needle_core::Rows;

    /// Dense and estimated `Σ e^{s}` and `Σ e^{s} v_0` over the dynamic part, for one head.
    fn sums(data: &crate::testutil::Data, q: &[f32], dynamic: Range<u32>, s: &Selection) -> [(f64, f64); 2] {
        let d = data.dim;
        let sc = |p: u32| f64::from(crate::common::dot(q, &data.keys[p as usize * d..(p as usize + 1) * d])) * 0.35;
        let v0 = |p: u32| f64::from(data.values[p as usize * d]);
        let (mut den, mut num) = (0.0, 0.0);
        for p in dynamic {
            den += sc(p).exp();
            num += sc(p).exp() * v0(p);
        }
        let (mut eden, mut enum_) = (0.0, 0.0);
        for (&p, &lw) in s.ids.iter().zip(&s.log_weights) {
            let w = (sc(p) + f64::from(lw)).exp();
            eden += w;
            enum_ += w * v0(p);
        }
        [(den, eden), (num, enum_)]
    }

    fn unbiased(k: usize) {
        let dim = 8;
        let data = uniform(240, 3, dim, 31);
        let rows = Rows::new("k", &data.keys, dim).unwrap();
        let runs = 400;
        let mut est = vec![[0.0f64; 2]; 0];
        let mut truth = [0.0; 2];
        for seed in 0..runs {
            let f = LshSampleFactory::new(4, 8, 4, 8, 1, seed).unwrap();
            let mut sel = f.create(HEAD, dim).unwrap();
            let dynamic = sel.static_part().dynamic_range(240);
            let ctx = BuildContext { head: HEAD, keys: &rows, train_queries: &[], scale: 0.35 };
            sel.build(&ctx).unwrap();
            let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(k));
            assert!(s.ids.len() <= k && s.ids.len() == s.log_weights.len());
            // The second head of the group: unbiased for every head, not only the mean query.
            let r = sums(&data, &data.queries[dim..2 * dim], dynamic, &s);
            truth = [r[0].0, r[1].0];
            est.push([r[0].1, r[1].1]);
        }
        for j in 0..2 {
            let mean = est.iter().map(|e| e[j]).sum::<f64>() / runs as f64;
            let var = est.iter().map(|e| (e[j] - mean).powi(2)).sum::<f64>() / (runs - 1) as f64;
            let se = (var / runs as f64).sqrt();
            assert!((mean - truth[j]).abs() < 4.5 * se + 1e-9, "sum {j} (k={k}): {mean} vs {} (se {se})", truth[j]);
        }
    }

    #[test]
    fn weighted_sums_are_unbiased_over_seeds() {
        unbiased(1000);
    }

    #[test]
    fn thinning_to_the_budget_stays_unbiased() {
        unbiased(40);
    }

    #[test]
    fn sampling_every_key_with_certainty_is_dense() {
        // One bit per signature, many tables: every key collides somewhere, u ≈ 1.
        let data = uniform(200, 3, 8, 32);
        let f = LshSampleFactory::new(4, 8, 1, 2048, 1, 3).unwrap();
        let mut sel = crate::testutil::built(&f, &data);
        let n_dyn = sel.static_part().dynamic_range(200).len();
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
        assert_eq!(s.ids.len(), n_dyn);
        assert!(s.log_weights.iter().all(|&w| (0.0..1e-6).contains(&w)), "{:?}", s.log_weights);
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-5);
    }
}
