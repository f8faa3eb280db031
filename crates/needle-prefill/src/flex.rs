//! FlexPrefill (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
//! Efficient Long-Sequence Inference"), per query head:
//! 1. From the last query block, the true block distribution `ā` (exact attention of its queries,
//!    summed per key block) and the estimate `â` (softmax of the block-pooled query against the
//!    block-pooled keys). If `√JSD(ā, â) < tau` the cheap pooled estimate is trusted:
//!    **query-aware** — each query block keeps the key blocks of largest pooled score until their
//!    softmax mass reaches `gamma`.
//! 2. Otherwise **vertical-slash**: the fewest vertical keys and slash offsets (of the last
//!    queries' attention) whose mass reaches `gamma`, and the blocks they touch.
//!
//! The KV head's mask is the union of its query heads' choices (one mask per group: the kernel
//! reads each key tile once for the group).

use needle_core::Result;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern};

use crate::estimate::{HeadStats, cumulative, js_divergence, last_queries, mark_vertical_slash};

/// `flex:gamma=0.9,tau=0.1,block=64,local=2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Flex {
    /// Attention mass each selection keeps (cumulative budget).
    pub gamma: f64,
    /// Threshold on `√JSD(ā, â)` below which a head is query-aware.
    pub tau: f64,
    /// Tokens per block (also the estimating query block's size).
    pub block: usize,
    /// Blocks of the local window, the diagonal one included: each query sees at least the
    /// `(local − 1)·block` tokens before its own block.
    pub local: usize,
}

impl Default for Flex {
    fn default() -> Self {
        Self { gamma: 0.9, tau: 0.1, block: 64, local: 2 }
    }
}

/// Mean of rows `rows` (of `dim`), from `row(i)`.
fn mean(dim: usize, rows: std::ops::Range<usize>, mut row: impl FnMut(usize, &mut [f32])) -> Vec<f32> {
    let (mut acc, mut tmp) = (vec![0f32; dim], vec![0f32; dim]);
    let n = rows.len().max(1) as f32;
    for i in rows {
        row(i, &mut tmp);
        acc.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
    }
    acc.iter_mut().for_each(|a| *a /= n);
    acc
}

/// Softmax of `s` in f64.
fn softmax(s: &[f32]) -> Vec<f64> {
    let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = s.iter().map(|&x| f64::from(x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Flex {
    /// `√JSD(ā, â)` of every head of the chunk's group (query-aware where below `tau`).
    pub fn divergences(&self, chunk: &PrefillChunk<'_>) -> Vec<f64> {
        let stats = last_queries(chunk, self.block, self.block);
        let pooled_keys = self.pooled_keys(chunk);
        chunk.heads.clone().zip(&stats).map(|(h, st)| self.divergence(chunk, h, st, &pooled_keys)).collect()
    }

    /// `√JSD(ā, â)` of query head `h`: its last block's true block distribution (`st.blocks`)
    /// against the pooled estimate.
    fn divergence(&self, chunk: &PrefillChunk<'_>, h: usize, st: &HeadStats, pooled_keys: &[Vec<f32>]) -> f64 {
        let t = chunk.t();
        let pq = mean(chunk.dim, t - self.block.clamp(1, t)..t, |i, out| out.copy_from_slice(chunk.query(i, h)));
        let s: Vec<f32> = pooled_keys.iter().map(|k| dot(&pq, k) * chunk.scale).collect();
        js_divergence(&st.blocks, &softmax(&s)).sqrt()
    }

    /// The mean key of every key block the chunk sees.
    fn pooled_keys(&self, chunk: &PrefillChunk<'_>) -> Vec<Vec<f32>> {
        let n = chunk.pos0 + chunk.t();
        (0..n.div_ceil(self.block))
            .map(|b| {
                mean(chunk.dim, b * self.block..((b + 1) * self.block).min(n), |j, out| {
                    out.iter_mut().zip(chunk.keys.row(j).iter()).for_each(|(o, v)| *o = v);
                })
            })
            .collect()
    }
}

impl PrefillPattern for Flex {
    fn describe(&self) -> String {
        format!("flex:gamma={},tau={},block={},local={}", self.gamma, self.tau, self.block, self.local)
    }

    fn block(&self) -> usize {
        self.block
    }

    fn local_blocks(&self) -> usize {
        self.local
    }

    fn choose(&self, chunk: &PrefillChunk<'_>, mask: &mut BlockMask) -> Result<()> {
        let block = self.block;
        let stats = last_queries(chunk, block, block);
        let pooled_keys = self.pooled_keys(chunk);
        let (t, pos0) = (chunk.t(), chunk.pos0);
        for (h, st) in chunk.heads.clone().zip(&stats) {
            if self.divergence(chunk, h, st, &pooled_keys) < self.tau {
                for qb in mask.query_blocks() {
                    let rows = (qb * block).max(pos0) - pos0..((qb + 1) * block).min(pos0 + t) - pos0;
                    let q = mean(chunk.dim, rows, |i, out| out.copy_from_slice(chunk.query(i, h)));
                    let s: Vec<f32> = pooled_keys[..=qb].iter().map(|k| dot(&q, k) * chunk.scale).collect();
                    for kb in cumulative(&softmax(&s), self.gamma) {
                        mask.add(qb, kb);
                    }
                }
            } else {
                let (v, s) = (cumulative(&st.vertical, self.gamma), cumulative(&st.slash, self.gamma));
                mark_vertical_slash(mask, &v, &s, pos0, t);
            }
        }
        Ok(())
    }
}
