//! Pieces every selector shares: the static part options, group scoring, top-k into reused
//! buffers and the attention-mass cut.

use std::ops::Range;

use needle_core::{Budget, Error, Result, RowSource, SearchStats, Selection, StaticPart, check_batch};

/// Sinks every selector keeps by default (RetrievalAttention's static part), so that selectors
/// compared at their defaults differ only in the dynamic part.
pub const DEFAULT_SINKS: usize = 128;
/// Recent-window tokens every selector keeps by default.
pub const DEFAULT_WINDOW: usize = 512;

/// Plain dot product in `f32`.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The group's score of a key: the largest `q·k` over the group's query rows (unscaled).
/// A key any head of the group attends strongly to is worth fetching once for all of them.
#[inline]
pub(crate) fn group_max(queries: &[f32], dim: usize, key: &[f32]) -> f32 {
    queries.chunks_exact(dim).map(|q| dot(q, key)).fold(f32::NEG_INFINITY, f32::max)
}

/// Validates a decode query group (`g × dim`, finite, `g >= 1`) and returns `g`.
pub(crate) fn check_group(queries: &[f32], dim: usize) -> Result<usize> {
    let g = check_batch("queries", queries, dim)?;
    if g == 0 {
        return Err(Error::EmptyKeys { what: "select queries (need at least one query row)".into() });
    }
    Ok(g)
}

/// Validates the dynamic range given to `select` against the key source.
pub(crate) fn check_dynamic(keys: &dyn RowSource, dynamic: &Range<u32>) -> Result<()> {
    if dynamic.end as usize > keys.len() {
        return Err(Error::OutOfRange { what: "dynamic range end".into(), id: dynamic.end.into(), len: keys.len() });
    }
    Ok(())
}

/// The checks every `select` starts with: clears `out`, validates the query group and the
/// dynamic range, and returns the group size, or `None` when the dynamic part is empty.
pub(crate) fn begin_select(
    queries: &[f32],
    dim: usize,
    keys: &dyn RowSource,
    dynamic: &Range<u32>,
    out: &mut Selection,
) -> Result<Option<usize>> {
    out.clear();
    let g = check_group(queries, dim)?;
    check_dynamic(keys, dynamic)?;
    Ok((!dynamic.is_empty()).then_some(g))
}

/// Best first, ties by lower id: the order `needle_core::attention::top_k` uses.
#[inline]
pub(crate) fn better(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the `k` best `(id, score)` pairs of `cands`, sorted best first, in place.
pub(crate) fn keep_top(cands: &mut Vec<(u32, f32)>, k: usize) {
    if k == 0 {
        cands.clear();
        return;
    }
    if k < cands.len() {
        cands.select_nth_unstable_by(k - 1, better);
        cands.truncate(k);
    }
    cands.sort_unstable_by(better);
}

/// Removes duplicate ids (keeping the best score of each); order afterwards is by id.
pub(crate) fn dedup_ids(cands: &mut Vec<(u32, f32)>) {
    cands.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    cands.dedup_by_key(|c| c.0);
}

/// For candidates sorted best first by (unscaled) score, the shortest prefix holding `target`
/// of their softmax mass at `scale`. Used by `Budget::Mass` where only candidates are scored.
pub(crate) fn mass_prefix(sorted: &[(u32, f32)], scale: f32, target: f32) -> usize {
    let Some(&(_, top)) = sorted.first() else { return 0 };
    let total: f64 = sorted.iter().map(|c| f64::from(scale * (c.1 - top)).exp()).sum();
    let goal = f64::from(target) * total;
    let mut acc = 0.0;
    for (i, c) in sorted.iter().enumerate() {
        acc += f64::from(scale * (c.1 - top)).exp();
        // A relative slack absorbs rounding so that target = 1 keeps every candidate, no more.
        if acc >= goal * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    sorted.len()
}

/// Applies a budget to candidates scored exactly by the group (`group_max`), best first.
pub(crate) fn apply_budget(cands: &mut Vec<(u32, f32)>, budget: &Budget, scale: f32) {
    keep_top(cands, budget.max_ids());
    if let Budget::Mass { target, .. } = *budget {
        let n = mass_prefix(cands, scale, target);
        cands.truncate(n);
    }
}

/// Cost of reading and scoring `n` full keys of `dim` floats.
pub(crate) fn full_cost(n: usize, dim: usize) -> SearchStats {
    SearchStats { full_scored: n as u64, codes_scored: 0, bytes_read: (n * dim * 4) as u64 }
}

/// Sinks and window of a selector, as spec options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub sinks: usize,
    pub window: usize,
}

impl Default for Frame {
    fn default() -> Self {
        Self { sinks: DEFAULT_SINKS, window: DEFAULT_WINDOW }
    }
}

impl Frame {
    pub fn static_part(&self) -> StaticPart {
        StaticPart { sinks: self.sinks, window: self.window }
    }
    pub fn describe(&self) -> String {
        format!("sinks={},window={}", self.sinks, self.window)
    }
}

/// The attention scale before a build told us the real one.
pub(crate) fn default_scale(dim: usize) -> f32 {
    1.0 / (dim.max(1) as f32).sqrt()
}
