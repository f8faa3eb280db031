//! Block-sparse causal prefill attention, GQA-aware, reading KV pages in place.
//!
//! Positions are cut into blocks of `block` tokens (absolute: block `b` holds positions
//! `b·block..(b + 1)·block`). For each KV head, a [`BlockLayout`] lists the key blocks each query
//! block of the chunk attends to; the query rows of a block see exactly the keys of those blocks,
//! causally masked. The tile loop is [`flash_prefill`](crate::flash_prefill)'s own, run over the
//! chosen key spans instead of `0..=pos`, so a layout listing every block is dense prefill.

use std::ops::Range;

use rayon::prelude::*;

use crate::attn::{Job, KvElem, Pages, Shape, TILE_Q, check_shapes};
use crate::{Error, Isa, Result};

/// The key blocks each query block of a prefill chunk attends to, for one KV head (its whole
/// query group): query block `first + i` reads `blocks[offsets[i]..offsets[i + 1]]`.
#[derive(Clone, Copy, Debug)]
pub struct BlockLayout<'a> {
    /// Tokens per block.
    pub block: usize,
    /// The first query block of the chunk (`pos0 / block`).
    pub first: usize,
    /// `n + 1` offsets into `blocks` for the chunk's `n` query blocks.
    pub offsets: &'a [usize],
    /// Key block ids, ascending within each query block, each at most the query block; the last
    /// is the query block itself (the diagonal: every query sees its own key).
    pub blocks: &'a [u32],
}

impl BlockLayout<'_> {
    /// Query blocks of a chunk of `t` positions from `pos0` (`t > 0`).
    fn query_blocks(block: usize, pos0: usize, t: usize) -> Range<usize> {
        pos0 / block..(pos0 + t - 1) / block + 1
    }

    fn check(&self, block: usize, pos0: usize, t: usize) -> Result<()> {
        let bad = |why: String| Err(Error::Invalid { param: "layouts", why });
        if self.block != block {
            return bad(format!("block {} differs from the first KV head's {block}", self.block));
        }
        let qbs = Self::query_blocks(block, pos0, t);
        if self.first != qbs.start || self.offsets.len() != qbs.len() + 1 {
            return bad(format!(
                "covers query blocks from {} with {} offsets; the chunk has blocks {qbs:?}",
                self.first,
                self.offsets.len()
            ));
        }
        if self.offsets[0] != 0 || self.offsets[qbs.len()] != self.blocks.len() {
            return bad(format!("offsets must run from 0 to {} (the blocks' length)", self.blocks.len()));
        }
        for (i, qb) in qbs.enumerate() {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            if a > b || b > self.blocks.len() {
                return bad(format!("offsets {a}..{b} of query block {qb} are out of order or range"));
            }
            let list = &self.blocks[a..b];
            if list.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("key blocks of query block {qb} are not strictly ascending"));
            }
            if list.last().map(|&l| l as usize) != Some(qb) {
                return bad(format!("key blocks of query block {qb} must end with the diagonal block {qb}"));
            }
        }
        Ok(())
    }

    /// The key spans of query block `first + i`: runs of consecutive blocks merged.
    fn spans(&self, i: usize) -> Vec<Range<usize>> {
        let mut spans: Vec<Range<usize>> = Vec::new();
        for &kb in &self.blocks[self.offsets[i]..self.offsets[i + 1]] {
            let r = kb as usize * self.block..(kb as usize + 1) * self.block;
            match spans.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => spans.push(r),
            }
        }
        spans
    }
}

/// Block-sparse causal attention of `t` query positions `pos0..pos0 + t` over one layer's paged
/// KV cache: as [`flash_prefill`](crate::flash_prefill) (same shapes, same GQA mapping, same
/// online softmax), but query block `qb` of KV head `g` sees only the keys of the key blocks
/// `layouts[g]` lists for it (and, in the diagonal block, only those at or before its position).
#[allow(clippy::too_many_arguments)]
pub fn sparse_prefill<T: KvElem>(
    q: &[f32],
    keys: &[Pages<'_, T>],
    values: &[Pages<'_, T>],
    out: &mut [f32],
    pos0: usize,
    n_q_heads: usize,
    scale: f32,
    layouts: &[BlockLayout<'_>],
) -> Result<()> {
    sparse_prefill_with(Isa::detect(), q, keys, values, out, pos0, n_q_heads, scale, layouts)
}

/// [`sparse_prefill`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn sparse_prefill_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[Pages<'_, T>],
    values: &[Pages<'_, T>],
    out: &mut [f32],
    pos0: usize,
    n_q_heads: usize,
    scale: f32,
    layouts: &[BlockLayout<'_>],
) -> Result<()> {
    let Shape { t, dim, n_kv, row } = check_shapes(q, keys, values, out, pos0, n_q_heads)?;
    if layouts.len() != n_kv {
        return Err(Error::Len { param: "layouts", got: layouts.len(), expected: n_kv });
    }
    if t == 0 {
        return Ok(());
    }
    let block = layouts[0].block;
    if block == 0 {
        return Err(Error::Invalid { param: "layouts", why: "block is 0".into() });
    }
    for l in layouts {
        l.check(block, pos0, t)?;
    }
    let job = Job { q, keys, values, pos0, n_q_heads, group: n_q_heads / n_kv, dim, scale };
    let isa = isa.effective();
    let qbs = BlockLayout::query_blocks(block, pos0, t);
    // Spans per (query block, KV head), then the pieces: query tiles that never straddle a block.
    let spans: Vec<Vec<Vec<Range<usize>>>> =
        (0..qbs.len()).map(|i| layouts.iter().map(|l| l.spans(i)).collect()).collect();
    let mut pieces = Vec::new();
    let mut rest = out;
    for (i, qb) in qbs.enumerate() {
        let (a, b) = ((qb * block).max(pos0) - pos0, ((qb + 1) * block).min(pos0 + t) - pos0);
        let mut i0 = a;
        while i0 < b {
            let nq = TILE_Q.min(b - i0);
            let (tile, tail) = rest.split_at_mut(nq * row);
            pieces.push((i, i0, nq, tile));
            rest = tail;
            i0 += nq;
        }
    }
    pieces.into_par_iter().for_each(|(i, i0, nq, out_tile)| {
        let kend = pos0 + i0 + nq;
        let heads: Vec<Vec<f32>> = (0..n_kv)
            .into_par_iter()
            .map(|g| {
                // Only the diagonal span can reach past the tile's last position.
                let clipped: Vec<Range<usize>> =
                    spans[i][g].iter().map(|s| s.start..s.end.min(kend)).filter(|s| !s.is_empty()).collect();
                job.run(isa, i0, nq, g, &clipped)
            })
            .collect();
        for (g, res) in heads.iter().enumerate() {
            job.scatter(g, res, out_tile);
        }
    });
    Ok(())
}
