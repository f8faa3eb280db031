//! AnchorAttention (Zhang et al., 2025, "AnchorAttention: Difference-Aware Sparse Attention with
//! Stripe Granularity"), at the kernel's block granularity: for each query block and query head,
//! the anchor is the largest score of the block's queries over the keys always attended (the
//! first block and the diagonal block); a key block is attended when one of its keys (a stripe)
//! scores within `theta` of the anchor for one of the block's queries. The paper keeps single
//! stripes; here a block holding one qualifying stripe is attended whole, and only every
//! `stride`-th query of the block is scored, which keeps the search cheaper than the attention.

use needle_core::Result;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern};

/// `anchor:theta=8,stride=32,block=64,local=2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Anchor {
    /// How far below the anchor (in scaled logits, so `e^-theta` in weight) a stripe may score.
    pub theta: f32,
    /// Every `stride`-th query of a block is scored (the block's last one always).
    pub stride: usize,
    /// Tokens per block.
    pub block: usize,
    /// Blocks of the local window, the diagonal one included: each query sees at least the
    /// `(local − 1)·block` tokens before its own block.
    pub local: usize,
}

impl Default for Anchor {
    fn default() -> Self {
        Self { theta: 8.0, stride: 32, block: 64, local: 2 }
    }
}

impl PrefillPattern for Anchor {
    fn describe(&self) -> String {
        format!("anchor:theta={},stride={},block={},local={}", self.theta, self.stride, self.block, self.local)
    }

    fn block(&self) -> usize {
        self.block
    }

    fn local_blocks(&self) -> usize {
        self.local
    }

    fn choose(&self, chunk: &PrefillChunk<'_>, mask: &mut BlockMask) -> Result<()> {
        let (b, pos0, t, dim) = (self.block, chunk.pos0, chunk.t(), chunk.dim);
        let mut k = vec![0f32; dim];
        for qb in mask.query_blocks() {
            let (lo, hi) = ((qb * b).max(pos0), ((qb + 1) * b).min(pos0 + t));
            // The scored queries: every `stride`-th, and the block's last.
            let mut rows: Vec<usize> = (lo..hi).step_by(self.stride.max(1)).collect();
            if rows.last() != Some(&(hi - 1)) {
                rows.push(hi - 1);
            }
            let queries: Vec<(usize, &[f32])> = rows
                .iter()
                .flat_map(|&p| chunk.heads.clone().map(move |h| (p, h)))
                .map(|(p, h)| (p, chunk.query(p - pos0, h)))
                .collect();
            let load = |j: usize, k: &mut [f32]| k.iter_mut().zip(chunk.keys.row(j).iter()).for_each(|(a, v)| *a = v);
            let dot = |k: &[f32], q: &[f32]| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * chunk.scale;
            // Anchors: the best score over the first block and the diagonal block (causal).
            let mut anchors = vec![f32::NEG_INFINITY; queries.len()];
            for j in (0..b.min(lo + 1)).chain(qb * b..hi) {
                load(j, &mut k);
                for (a, &(p, q)) in anchors.iter_mut().zip(&queries) {
                    if j <= p {
                        *a = a.max(dot(&k, q));
                    }
                }
            }
            for kb in 1..qb {
                let hit = (kb * b..(kb + 1) * b).any(|j| {
                    load(j, &mut k);
                    queries.iter().zip(&anchors).any(|(&(_, q), &a)| dot(&k, q) >= a - self.theta)
                });
                if hit {
                    mask.add(qb, kb);
                }
            }
        }
        Ok(())
    }
}
