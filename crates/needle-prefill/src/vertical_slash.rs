//! MInference's vertical-slash pattern (Jiang et al., 2024, "MInference 1.0: Accelerating
//! Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"): the attention of the last
//! `last_q` queries estimates, per KV head group, which keys are vertical lines (attended by
//! every query: sinks, separators) and which offsets are slashes (diagonals: the local and
//! periodic structure); the top `vertical` keys and top `slash` offsets are kept, and every key
//! block they touch is attended. The blocks are the kernel's unit: a block holding one vertical
//! key is attended whole.

use needle_core::Result;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern};

use crate::estimate::{last_queries, mark_vertical_slash, top};

/// `vertical-slash:block=64,last_q=64,vertical=512,slash=512,local=2`.
#[derive(Debug, Clone, PartialEq)]
pub struct VerticalSlash {
    /// Tokens per block.
    pub block: usize,
    /// Last queries of the chunk the lines are estimated from.
    pub last_q: usize,
    /// Vertical keys kept.
    pub vertical: usize,
    /// Slash offsets kept.
    pub slash: usize,
    /// Blocks of the local window, the diagonal one included: each query sees at least the
    /// `(local − 1)·block` tokens before its own block.
    pub local: usize,
}

impl Default for VerticalSlash {
    fn default() -> Self {
        Self { block: 64, last_q: 64, vertical: 512, slash: 512, local: 2 }
    }
}

impl PrefillPattern for VerticalSlash {
    fn describe(&self) -> String {
        format!(
            "vertical-slash:block={},last_q={},vertical={},slash={},local={}",
            self.block, self.last_q, self.vertical, self.slash, self.local
        )
    }

    fn block(&self) -> usize {
        self.block
    }

    fn local_blocks(&self) -> usize {
        self.local
    }

    fn choose(&self, chunk: &PrefillChunk<'_>, mask: &mut BlockMask) -> Result<()> {
        let heads = last_queries(chunk, self.last_q, self.block);
        // One mask serves the group: the lines of its heads summed.
        let (mut v, mut s) = (heads[0].vertical.clone(), heads[0].slash.clone());
        for h in &heads[1..] {
            v.iter_mut().zip(&h.vertical).for_each(|(a, b)| *a += b);
            s.iter_mut().zip(&h.slash).for_each(|(a, b)| *a += b);
        }
        mark_vertical_slash(mask, &top(&v, self.vertical), &top(&s, self.slash), chunk.pos0, chunk.t());
        Ok(())
    }
}
