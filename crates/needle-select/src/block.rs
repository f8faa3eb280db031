//! InfLLM (Xiao et al., arXiv 2402.04617): the dynamic part in blocks of `block` tokens, each
//! represented by `reps` of its keys, those that received the most attention inside the block.
//! A decode query scores a block by its best representative; the top blocks are attended in full.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart, check_len,
};

use crate::common::{
    Frame, SelectStep, begin_select, begin_state, default_scale, full_cost, gather, group_max, keep_top, open_state,
    read_range, write_range,
};

const TAG: &[u8; 8] = b"sel.blck";
const VERSION: u32 = 1;

/// Default block size in tokens (InfLLM's).
pub const DEFAULT_BLOCK: usize = 128;
/// Default representative keys per block.
pub const DEFAULT_REPS: usize = 4;

/// Makes [`BlockSelector`]s; spec `block:k=512,block=128,reps=4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFactory {
    frame: Frame,
    block: usize,
    reps: usize,
}

impl BlockFactory {
    /// Blocks of `block` tokens with `reps` representatives each (`1 <= reps <= block`).
    pub fn new(sinks: usize, window: usize, block: usize, reps: usize) -> Result<Self> {
        if block == 0 {
            return Err(Error::invalid("block", "must be at least 1 token"));
        }
        if reps == 0 || reps > block {
            return Err(Error::invalid("reps", format!("{reps} is outside 1..={block} (the block size)")));
        }
        Ok(Self { frame: Frame { sinks, window }, block, reps })
    }
}

impl SelectorFactory for BlockFactory {
    fn describe(&self) -> String {
        format!("block:block={},reps={},{}", self.block, self.reps, self.frame.describe())
    }
    fn create(&self, _head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(BlockSelector::new(*self, dim)))
    }
}

/// Block selection by representative keys.
///
/// Blocks are aligned on absolute positions (`position / block`); the first may start inside
/// the block (sinks not a multiple of `block`). A block gets its representatives once it is
/// complete. At build they are the keys with the largest attention from the training queries
/// that fall in the block: the sample is taken as evenly spaced over the prompt in position
/// order (how needle-model records it), so training row `r` of `m` stands at position
/// `⌊r·n/m⌋`. Blocks without such queries, and blocks completed during decode, score their keys
/// against the block's mean key (the keys themselves standing in for the block's queries). The
/// incomplete last block is scored by all of its keys. A budget of `k` tokens selects
/// `⌈k/block⌉` blocks; `Budget::Mass` is served as its cap.
#[derive(Debug, Clone)]
pub struct BlockSelector {
    cfg: BlockFactory,
    dim: usize,
    scale: f32,
    /// Absolute block number of the first block.
    first_block: u32,
    /// Positions of the representatives of every complete block, `reps` per block (fewer keys
    /// than `reps` in a short first block repeat the last one).
    rep_pos: Vec<u32>,
    /// Representative keys, row-major, parallel to `rep_pos`.
    rep_keys: Vec<f32>,
    covered: Range<u32>,
    cands: Vec<(u32, f32)>,
    weights: Vec<f32>,
    probs: Vec<f32>,
}

impl BlockSelector {
    /// An empty selector for vectors of `dim` floats.
    pub fn new(cfg: BlockFactory, dim: usize) -> Self {
        Self {
            cfg,
            dim,
            scale: default_scale(dim),
            first_block: 0,
            rep_pos: Vec::new(),
            rep_keys: Vec::new(),
            covered: 0..0,
            cands: Vec::new(),
            weights: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Complete blocks with representatives.
    pub fn blocks(&self) -> usize {
        self.rep_pos.len() / self.cfg.reps
    }

    /// Representative positions of complete block `i`.
    pub fn representatives(&self, i: usize) -> Option<&[u32]> {
        self.rep_pos.get(i * self.cfg.reps..(i + 1) * self.cfg.reps)
    }

    /// Covered positions of block `i` (counted from the first block).
    fn block_positions(&self, i: usize) -> Range<u32> {
        let start = (self.first_block as usize + i) * self.cfg.block;
        (start as u32).max(self.covered.start)..((start + self.cfg.block) as u32).min(self.covered.end)
    }

    /// Picks representatives of the block at `range` by attention from `queries` (row-major;
    /// the block's mean key when empty) and appends them.
    fn add_block(&mut self, keys: &dyn RowSource, range: Range<u32>, queries: &[f32]) {
        let d = self.dim;
        self.weights.clear();
        self.weights.resize(range.len(), 0.0);
        if queries.is_empty() {
            let mut mean = vec![0.0f32; d];
            for p in range.clone() {
                mean.iter_mut().zip(keys.row(p as usize).iter()).for_each(|(m, x)| *m += x);
            }
            for (w, p) in self.weights.iter_mut().zip(range.clone()) {
                *w = keys.row(p as usize).dot(&mean);
            }
        } else {
            // Attention each key receives inside the block: softmax per query, summed.
            for q in queries.chunks_exact(d) {
                self.probs.clear();
                self.probs.extend(range.clone().map(|p| self.scale * keys.row(p as usize).dot(q)));
                let m = self.probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = self.probs.iter().map(|&s| (s - m).exp()).sum();
                for (w, &s) in self.weights.iter_mut().zip(&self.probs) {
                    *w += (s - m).exp() / z;
                }
            }
        }
        self.cands.clear();
        self.cands.extend(range.clone().zip(&self.weights).map(|(p, &w)| (p, w)));
        keep_top(&mut self.cands, self.cfg.reps);
        for j in 0..self.cfg.reps {
            // A short block repeats its last representative so that every block has `reps`.
            let p = self.cands.get(j).or(self.cands.last()).map_or(range.start, |c| c.0);
            self.rep_pos.push(p);
            keys.row(p as usize).extend_into(&mut self.rep_keys);
        }
    }

    /// Learns positions up to `end`, closing blocks as they complete.
    fn extend_to(&mut self, keys: &dyn RowSource, end: u32, train: &[f32], prompt_len: usize) -> Result<()> {
        if end <= self.covered.end {
            return Ok(());
        }
        keys.check_id("keys", end - 1)?;
        check_len("keys dim", self.dim, keys.dim())?;
        self.covered.end = end;
        let (d, b) = (self.dim, self.cfg.block);
        let m = train.len() / d;
        loop {
            let i = self.blocks();
            let r = self.block_positions(i);
            let full_end = ((self.first_block as usize + i + 1) * b) as u32;
            if r.is_empty() || r.end < full_end {
                return Ok(());
            }
            // Training rows whose estimated position falls in this block.
            let (lo, hi) = if m == 0 || prompt_len == 0 {
                (0, 0)
            } else {
                let first = |pos: u32| (pos as usize * m).div_ceil(prompt_len).min(m);
                (first(r.start), first(r.end))
            };
            self.add_block(keys, r, &train[lo * d..hi * d]);
        }
    }
}

impl AttentionSelector for BlockSelector {
    fn describe(&self) -> String {
        self.cfg.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.cfg.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        let dynamic = self.static_part().dynamic_range(ctx.keys.len());
        if !ctx.train_queries.is_empty() {
            needle_core::check_batch("train_queries", ctx.train_queries, self.dim)?;
        }
        self.scale = ctx.scale;
        self.rep_pos.clear();
        self.rep_keys.clear();
        self.first_block = dynamic.start / self.cfg.block as u32;
        self.covered = dynamic.start..dynamic.start;
        self.extend_to(ctx.keys, dynamic.end, ctx.train_queries, ctx.keys.len())?;
        Ok(BuildStats {
            vectors: self.covered.len(),
            train_queries: ctx.train_queries.len() / self.dim,
            seconds: 0.0,
            bytes: self.memory_bytes(),
        })
    }
    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()> {
        if self.covered.is_empty() && self.rep_pos.is_empty() {
            self.first_block = positions.start / self.cfg.block as u32;
            self.covered = positions.start..positions.start;
        }
        self.extend_to(keys, positions.end, &[], 0)
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()> {
        let Some(step) = begin_select(self.static_part(), queries, self.dim, keys, budget, out)? else {
            return Ok(());
        };
        let SelectStep { group: _, dynamic, budget } = step;
        let budget = &budget;
        if self.covered.is_empty() && self.rep_pos.is_empty() {
            self.first_block = dynamic.start / self.cfg.block as u32;
            self.covered = dynamic.start..dynamic.start;
        }
        self.extend_to(keys, dynamic.end, &[], 0)?;
        let (d, reps) = (self.dim, self.cfg.reps);
        let n = self.blocks();
        self.cands.clear();
        for i in 0..n {
            let rk = &self.rep_keys[i * reps * d..(i + 1) * reps * d];
            let s = rk.chunks_exact(d).map(|k| group_max(queries, d, k)).fold(f32::NEG_INFINITY, f32::max);
            self.cands.push((i as u32, s));
        }
        // The incomplete last block has no representatives yet: its keys speak for it.
        let tail = self.block_positions(n);
        if !tail.is_empty() {
            let s = tail.clone().map(|p| group_max(queries, d, keys.row(p as usize))).fold(f32::NEG_INFINITY, f32::max);
            self.cands.push((n as u32, s));
        }
        out.stats = full_cost(n * reps + tail.len(), d);
        keep_top(&mut self.cands, budget.max_ids().div_ceil(self.cfg.block));
        for c in &self.cands {
            let r = self.block_positions(c.0 as usize);
            out.ids.extend(r.start.max(dynamic.start)..r.end.min(dynamic.end));
        }
        Ok(())
    }
    // Representatives are written by position; their keys come back from `keys`.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = begin_state(out, TAG, VERSION, &self.describe());
        w.f32(self.scale);
        w.u32(self.first_block);
        write_range(&mut w, &self.covered);
        w.u32s(&self.rep_pos);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let mut r = open_state("block selector", state, TAG, VERSION, &self.describe(), keys, self.dim)?;
        let scale = r.f32("scale")?;
        let first_block = r.u32("first_block")?;
        let covered = read_range(&mut r, "covered", keys.len())?;
        let (b, reps) = (self.cfg.block as u64, self.cfg.reps);
        // Every complete block of the covered positions has representatives, no other does.
        let mut blocks = Vec::new();
        if !covered.is_empty() {
            if u64::from(first_block) != u64::from(covered.start) / b {
                return Err(r.fail(
                    "first_block",
                    format!("{first_block}, but the covered positions start in block {}", u64::from(covered.start) / b),
                ));
            }
            let mut start = u64::from(first_block) * b;
            while start + b <= u64::from(covered.end) {
                blocks.push(start.max(u64::from(covered.start)) as u32..(start + b) as u32);
                start += b;
            }
        }
        let rep_pos = r.u32s_exact("rep_pos", blocks.len() * reps)?;
        for (i, (block, rp)) in blocks.iter().zip(rep_pos.chunks_exact(reps)).enumerate() {
            if let Some(&p) = rp.iter().find(|p| !block.contains(p)) {
                return Err(r.fail("rep_pos", format!("representative {p} of block {i} lies outside {block:?}")));
            }
        }
        r.finish()?;
        self.rep_keys = gather(keys, rep_pos.iter().copied());
        (self.scale, self.first_block, self.covered, self.rep_pos) = (scale, first_block, covered, rep_pos);
        Ok(())
    }
    fn memory_bytes(&self) -> usize {
        self.rep_pos.capacity() * 4 + self.rep_keys.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{HEAD, assert_dense, built, select, uniform};
    use needle_core::PagedRows;

    #[test]
    fn all_blocks_are_dense() {
        let data = uniform(700, 3, 8, 21);
        let f = BlockFactory::new(5, 30, 64, 4).unwrap();
        let mut sel = built(&f, &data);
        let n_dyn = sel.static_part().dynamic_range(700).len();
        let s = select(sel.as_mut(), &data, &data.queries, Budget::TopK(n_dyn));
        assert_eq!(s.ids.len(), n_dyn);
        assert_dense(sel.as_ref(), &data, &data.queries, &s, 1e-9);
    }

    #[test]
    fn representatives_are_the_most_attended_keys_of_their_block() {
        let dim = 8;
        let data = uniform(600, 3, dim, 22);
        let mut keys = data.keys.clone();
        // Block 2 (positions 128..192 at block = 64) holds one key that its queries attend to.
        let special = 150;
        let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
        keys[special * dim..(special + 1) * dim].copy_from_slice(&[9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let train: Vec<f32> = (0..600).flat_map(|_| q.clone()).collect();
        let rows = needle_core::Rows::new("k", &keys, dim).unwrap();
        let mut sel = BlockSelector::new(BlockFactory::new(0, 0, 64, 2).unwrap(), dim);
        let ctx = BuildContext { head: HEAD, keys: &rows, train_queries: &train, scale: 0.35 };
        sel.build(&ctx).unwrap();
        assert_eq!(sel.blocks(), 9); // 600 = 9 full blocks of 64 + 24
        assert_eq!(sel.representatives(2).unwrap()[0], special as u32);
        let mut out = Selection::default();
        sel.select(&q, &rows, &Budget::TopK(64), &mut out).unwrap();
        assert_eq!(out.ids, (128..192).collect::<Vec<u32>>());
    }

    #[test]
    fn blocks_completed_during_decode_get_representatives() {
        let dim = 8;
        let data = uniform(200, 1, dim, 23);
        let mut keys = PagedRows::new(dim, 64).unwrap();
        keys.extend_from_slice(&data.keys).unwrap();
        let f = BlockFactory::new(4, 10, 32, 2).unwrap();
        let mut sel = f.create(HEAD, dim).unwrap();
        let sp = sel.static_part();
        let ctx = BuildContext { head: HEAD, keys: &keys, train_queries: &[], scale: 0.3 };
        sel.build(&ctx).unwrap();
        let q = &data.queries[..dim];
        let pos = keys.push(&q.iter().map(|x| 50.0 * x).collect::<Vec<_>>()).unwrap();
        for _ in 0..80 {
            keys.push(&data.keys[..dim]).unwrap();
        }
        for p in sp.dynamic_range(201).end..sp.dynamic_range(keys.len()).end {
            sel.insert(&keys, p..p + 1).unwrap();
        }
        let mut out = Selection::default();
        sel.select(q, &keys, &Budget::TopK(32), &mut out).unwrap();
        assert!(out.ids.contains(&pos), "{:?}", out.ids);
        assert!(out.ids.len() <= 32);
    }
}
