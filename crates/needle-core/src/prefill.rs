//! The prefill plug-in point: which key blocks each query block of a prefill chunk attends to.
//!
//! Decode goes through an [`AttentionSelector`](crate::AttentionSelector) per (layer, KV head);
//! prefill, where a long prompt's dense attention is the user's wait, goes through a
//! [`PrefillPattern`]. Positions are cut into blocks of [`PrefillPattern::block`] tokens
//! (absolute: block `b` holds positions `b·block..(b + 1)·block`). For each chunk of queries the
//! engine hands the pattern a [`PrefillChunk`] per (layer, KV head) — the group's queries and the
//! keys so far — and the pattern marks, in a [`BlockMask`], the key blocks each query block
//! attends to. [`plan_chunk`] then adds what is always attended, whatever the pattern says:
//! - the first block (attention sinks),
//! - the local window: the diagonal block and the [`PrefillPattern::local_blocks`]` − 1` before it,
//! - every key block for the query blocks holding the prompt's last [`PrefillPattern::block`]
//!   positions (the tokens whose attention shapes the first decode step: the question at the end
//!   of a long document), in whichever chunks hold them: a whole block's worth of queries even
//!   when the prompt ends a few tokens into a block. When the prompt's length is not known
//!   ([`PrefillChunk::prompt_end`] is `None`) every chunk's last block's worth is dense.
//!
//! The engine computes block-sparse causal attention over exactly those blocks
//! (`needle_kernels_cpu::sparse_prefill`, in needle-model, fed [`BlockMask::offsets`] and
//! [`BlockMask::blocks`]). One mask serves the KV head's whole query group: its key tiles are read
//! once for all of them.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::kv::RowSource;

/// What a pattern sees of one prefill chunk, for one (layer, KV head).
#[derive(Clone)]
pub struct PrefillChunk<'a> {
    /// The layer.
    pub layer: usize,
    /// The KV head.
    pub kv_head: usize,
    /// Queries of the chunk, `t × n_q_heads × dim`, after RoPE, unscaled (all heads; this KV
    /// head's group is `heads`).
    pub queries: &'a [f32],
    /// Query heads in all.
    pub n_q_heads: usize,
    /// The query heads reading this KV head.
    pub heads: Range<usize>,
    /// Head dim.
    pub dim: usize,
    /// Position of the chunk's first query.
    pub pos0: usize,
    /// This KV head's keys, positions `0..pos0 + t` (the chunk's own keys included).
    pub keys: &'a dyn RowSource,
    /// The softmax scale of `q·k`.
    pub scale: f32,
    /// The position after the prompt's last token, when the engine knows it: only the query
    /// block holding the prompt's last position is made dense, not every chunk's last block.
    pub prompt_end: Option<usize>,
}

impl PrefillChunk<'_> {
    /// Query positions in the chunk.
    pub fn t(&self) -> usize {
        self.queries.len() / (self.n_q_heads * self.dim).max(1)
    }

    /// The query of chunk row `i` (position `pos0 + i`) and query head `h`.
    pub fn query(&self, i: usize, h: usize) -> &[f32] {
        &self.queries[(i * self.n_q_heads + h) * self.dim..][..self.dim]
    }

    fn check(&self) -> Result<()> {
        let row = self.n_q_heads * self.dim;
        if row == 0 || !self.queries.len().is_multiple_of(row) || self.queries.is_empty() {
            return Err(Error::invalid(
                "queries",
                format!("{} floats are not t ≥ 1 rows of n_q_heads × dim = {row}", self.queries.len()),
            ));
        }
        if self.heads.is_empty() || self.heads.end > self.n_q_heads {
            return Err(Error::invalid("heads", format!("{:?} is not within 0..{}", self.heads, self.n_q_heads)));
        }
        if self.keys.dim() != self.dim || self.keys.len() < self.pos0 + self.t() {
            return Err(Error::invalid(
                "keys",
                format!(
                    "{} keys of dim {}; the chunk needs {} of dim {}",
                    self.keys.len(),
                    self.keys.dim(),
                    self.pos0 + self.t(),
                    self.dim
                ),
            ));
        }
        Ok(())
    }
}

/// The key blocks each query block of a chunk attends to, for one KV head.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMask {
    block: usize,
    first: usize,
    lists: Vec<Vec<u32>>,
    offsets: Vec<usize>,
    blocks: Vec<u32>,
}

impl BlockMask {
    /// An empty mask over the query blocks of `t ≥ 1` positions from `pos0`.
    pub fn new(block: usize, pos0: usize, t: usize) -> Result<Self> {
        if block == 0 || t == 0 {
            return Err(Error::invalid("block", format!("block {block} and t {t} must both be at least 1")));
        }
        let first = pos0 / block;
        let n = (pos0 + t - 1) / block + 1 - first;
        Ok(Self { block, first, lists: vec![Vec::new(); n], offsets: Vec::new(), blocks: Vec::new() })
    }

    /// Tokens per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The chunk's query blocks (absolute block ids).
    pub fn query_blocks(&self) -> Range<usize> {
        self.first..self.first + self.lists.len()
    }

    /// Marks key block `kb` for query block `qb`; key blocks after `qb` (the future) and query
    /// blocks outside the chunk are ignored.
    pub fn add(&mut self, qb: usize, kb: usize) {
        if kb <= qb
            && let Some(list) = qb.checked_sub(self.first).and_then(|i| self.lists.get_mut(i))
        {
            list.push(kb as u32);
        }
    }

    /// Marks every key block `qb` can see.
    pub fn add_all(&mut self, qb: usize) {
        for kb in 0..=qb {
            self.add(qb, kb);
        }
    }

    /// The key blocks of query block `qb` (sorted once [`plan_chunk`] has finished the mask).
    pub fn key_blocks(&self, qb: usize) -> &[u32] {
        qb.checked_sub(self.first).and_then(|i| self.lists.get(i)).map_or(&[], Vec::as_slice)
    }

    /// Key blocks attended and key blocks a causal dense prefill would attend, over the chunk.
    pub fn density(&self) -> (usize, usize) {
        let kept = self.lists.iter().map(Vec::len).sum();
        (kept, self.query_blocks().map(|qb| qb + 1).sum())
    }

    /// Sorts and dedups every list, adds what is always attended (see the module docs; `dense` are
    /// the query blocks made dense) and builds the kernel's form.
    fn finish(&mut self, local_blocks: usize, dense: Range<usize>) {
        for qb in self.query_blocks() {
            self.add(qb, 0);
            for kb in qb.saturating_sub(local_blocks.max(1) - 1)..=qb {
                self.add(qb, kb);
            }
        }
        for qb in dense {
            self.add_all(qb);
        }
        self.offsets = vec![0];
        self.blocks.clear();
        for list in &mut self.lists {
            list.sort_unstable();
            list.dedup();
            self.blocks.extend_from_slice(list);
            self.offsets.push(self.blocks.len());
        }
    }

    /// The mask in the flat form a block-sparse kernel reads (valid after [`plan_chunk`]): for
    /// the `i`-th query block of [`BlockMask::query_blocks`], its key blocks are
    /// `blocks()[offsets()[i]..offsets()[i + 1]]`; `offsets()` holds one more entry than there
    /// are query blocks.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Every query block's key block ids, ascending within each query block, the query block's
    /// lists one after the other (see [`BlockMask::offsets`]; valid after [`plan_chunk`]).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

/// How a prefill chunk's attention is made sparse: per (layer, KV head), which key blocks each
/// query block attends to. Implementations live in `needle-prefill` (and users' crates).
pub trait PrefillPattern: Send + Sync + fmt::Debug {
    /// The spec this pattern was parsed from, e.g. `vertical-slash:block=64,last_q=64`.
    fn describe(&self) -> String;

    /// Tokens per block (64 or 128 are usual).
    fn block(&self) -> usize;

    /// Blocks of the local window, the diagonal one included (at least 1).
    fn local_blocks(&self) -> usize {
        1
    }

    /// Marks in `mask` (empty, over the chunk's query blocks) the key blocks each query block
    /// should attend to. The sinks, the local window and the prompt's last block of queries are added
    /// afterwards ([`plan_chunk`]), so a pattern need not mark them.
    fn choose(&self, chunk: &PrefillChunk<'_>, mask: &mut BlockMask) -> Result<()>;
}

/// The mask of one (layer, KV head) for a chunk: the pattern's choice plus what is always
/// attended (see the module docs), checked and in the kernel's form.
pub fn plan_chunk(pattern: &dyn PrefillPattern, chunk: &PrefillChunk<'_>) -> Result<BlockMask> {
    chunk.check()?;
    let mut mask = BlockMask::new(pattern.block(), chunk.pos0, chunk.t())?;
    pattern.choose(chunk, &mut mask)?;
    // The prompt's last `block` positions that fall in this chunk (the chunk's own last ones when
    // the prompt's end is not known), and the query blocks holding them.
    let (b, end) = (mask.block, chunk.pos0 + chunk.t());
    let tail_end = chunk.prompt_end.unwrap_or(end);
    let (lo, hi) = (tail_end.saturating_sub(b).max(chunk.pos0), tail_end.min(end));
    let dense = if lo < hi { lo / b..(hi - 1) / b + 1 } else { 0..0 };
    mask.finish(pattern.local_blocks(), dense);
    Ok(mask)
}

/// The prefill setting of a generation: dense, or a pattern. `Copy` (the pattern is shared for
/// the life of the process — patterns are small and parsed once per spec), compared and printed
/// by its spec.
#[derive(Clone, Copy, Default)]
pub struct PrefillSpec(Option<&'static dyn PrefillPattern>);

impl PrefillSpec {
    /// Dense causal prefill.
    pub const DENSE: PrefillSpec = PrefillSpec(None);

    /// Prefill through `pattern`.
    pub fn new(pattern: &'static dyn PrefillPattern) -> Self {
        Self(Some(pattern))
    }

    /// The pattern, or `None` for dense prefill.
    pub fn pattern(&self) -> Option<&'static dyn PrefillPattern> {
        self.0
    }

    /// `dense`, or the pattern's spec.
    pub fn describe(&self) -> String {
        self.0.map_or_else(|| "dense".to_string(), |p| p.describe())
    }
}

impl PartialEq for PrefillSpec {
    fn eq(&self, other: &Self) -> bool {
        self.describe() == other.describe()
    }
}

impl fmt::Debug for PrefillSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrefillSpec({})", self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Rows;

    /// Marks nothing: what [`plan_chunk`] adds is all there is.
    #[derive(Debug)]
    struct Nothing(usize, usize);

    impl PrefillPattern for Nothing {
        fn describe(&self) -> String {
            "nothing".into()
        }
        fn block(&self) -> usize {
            self.0
        }
        fn local_blocks(&self) -> usize {
            self.1
        }
        fn choose(&self, _: &PrefillChunk<'_>, _: &mut BlockMask) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sinks_local_window_and_last_block_are_always_attended() {
        let (dim, hq) = (4, 2);
        let keys = vec![0.1f32; 700 * dim];
        let rows = Rows::new("keys", &keys, dim).unwrap();
        // Positions 300..700 in blocks of 64: query blocks 4..=10, the last one partial.
        let q = vec![0.2f32; 400 * hq * dim];
        let chunk = PrefillChunk {
            layer: 0,
            kv_head: 0,
            queries: &q,
            n_q_heads: hq,
            heads: 0..hq,
            dim,
            pos0: 300,
            keys: &rows,
            scale: 0.5,
            prompt_end: None,
        };
        let mask = plan_chunk(&Nothing(64, 2), &chunk).unwrap();
        assert_eq!(mask.query_blocks(), 4..11);
        assert_eq!(mask.key_blocks(4), [0, 3, 4]);
        assert_eq!(mask.key_blocks(8), [0, 7, 8]);
        // The chunk's last 64 positions, 636..700, lie in blocks 9 and 10: both dense.
        assert_eq!(mask.key_blocks(9), (0..=9).collect::<Vec<u32>>());
        assert_eq!(mask.key_blocks(10), (0..=10).collect::<Vec<u32>>());
        assert_eq!(mask.density(), (3 * 5 + 10 + 11, (5..=11).sum()));
        let (offsets, blocks) = (mask.offsets(), mask.blocks());
        assert_eq!((mask.block(), offsets.len(), offsets[7], blocks.len()), (64, 8, blocks.len(), 36));
        for (i, qb) in mask.query_blocks().enumerate() {
            assert_eq!(&blocks[offsets[i]..offsets[i + 1]], mask.key_blocks(qb), "query block {qb}");
        }
        let one = plan_chunk(&Nothing(64, 1), &chunk).unwrap();
        assert_eq!(one.key_blocks(5), [0, 5]);
        // A chunk well before the prompt's end has no dense block.
        let with_end = |p: usize| plan_chunk(&Nothing(64, 1), &PrefillChunk { prompt_end: Some(p), ..chunk.clone() });
        let early = with_end(2000).unwrap();
        assert_eq!(early.key_blocks(10), [0, 10]);
        assert_eq!(early.density(), (2 * 7, (5..=11).sum()));
        // The prompt's last 64 positions, 536..600, are in blocks 8 and 9; block 10 is past the end.
        let last = with_end(600).unwrap();
        assert_eq!(last.key_blocks(7), [0, 7]);
        assert_eq!(last.key_blocks(8), (0..=8).collect::<Vec<u32>>());
        assert_eq!(last.key_blocks(9), (0..=9).collect::<Vec<u32>>());
        assert_eq!(last.key_blocks(10), [0, 10]);
        // A prompt ending 4 tokens into the next chunk: this chunk holds 640..700 of its last 64
        // positions (640..704), so its block 10 is dense — a 4-token final chunk alone would leave
        // the question before it sparse.
        let straddle = with_end(704).unwrap();
        assert_eq!(straddle.key_blocks(9), [0, 9]);
        assert_eq!(straddle.key_blocks(10), (0..=10).collect::<Vec<u32>>());
    }

    #[test]
    fn bad_chunks_are_errors() {
        let keys = vec![0f32; 10 * 4];
        let rows = Rows::new("keys", &keys, 4).unwrap();
        let q = vec![0f32; 8 * 4];
        let chunk = PrefillChunk {
            layer: 0,
            kv_head: 0,
            queries: &q,
            n_q_heads: 1,
            heads: 0..1,
            dim: 4,
            pos0: 5,
            keys: &rows,
            scale: 1.0,
            prompt_end: None,
        };
        assert!(matches!(plan_chunk(&Nothing(4, 1), &chunk), Err(Error::InvalidParameter { .. })), "13 > 10 keys");
        let chunk = PrefillChunk { pos0: 2, heads: 0..2, ..chunk };
        assert!(plan_chunk(&Nothing(4, 1), &chunk).is_err(), "heads past n_q_heads");
        let chunk = PrefillChunk { heads: 0..1, ..chunk };
        assert!(plan_chunk(&Nothing(0, 1), &chunk).is_err(), "block 0");
        assert!(plan_chunk(&Nothing(4, 1), &chunk).is_ok());
    }

    #[test]
    fn specs_compare_by_description() {
        static A: Nothing = Nothing(64, 1);
        assert_eq!(PrefillSpec::default(), PrefillSpec::DENSE);
        assert_eq!(PrefillSpec::new(&A).describe(), "nothing");
        assert_ne!(PrefillSpec::new(&A), PrefillSpec::DENSE);
        assert_eq!(format!("{:?}", PrefillSpec::DENSE), "PrefillSpec(dense)");
    }
}
