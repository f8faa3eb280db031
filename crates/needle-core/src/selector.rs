//! The `AttentionSelector` contract: which keys a decode query attends to.
//!
//! A selector instance serves one layer and one KV head. The context splits in two:
//! the **static part** (the first `sinks` tokens and the last `window` tokens), attended densely
//! every step, and the **dynamic part** (everything between), from which the selector picks ids
//! within a [`Budget`]. The model attends both and merges them exactly by log-sum-exp
//! ([`attend_selected`] is the reference of that step).
//!
//! Lifecycle: [`AttentionSelector::build`] once after prefill, [`AttentionSelector::insert`] for
//! the tokens that leave the window during decode, [`AttentionSelector::select`] per decode step.
//! The dynamic part is always derived, never passed: `static_part().dynamic_range(keys.len())`.
//! [`crate::kit`] holds the helpers every selector uses (checks, top-k, budgets, costs).
//! Selectors never own the KV cache: keys are read through a [`RowSource`] view of the tier that
//! holds them, addressed by absolute token position.

use std::ops::Range;

use crate::attention::{Partial, Real, attend, attend_weighted, merge};
use crate::error::{Error, Result, check_len};
use crate::index::{BuildStats, SearchStats};
use crate::kv::RowSource;

/// Which layer and KV head a selector serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct HeadId {
    /// Transformer layer, from 0.
    pub layer: usize,
    /// KV head within the layer, from 0.
    pub kv_head: usize,
}

/// How much of the dynamic part a selection may take.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Budget {
    /// At most `k` token ids.
    TopK(usize),
    /// Enough ids to capture `target` (in `(0, 1]`) of the estimated attention mass of the
    /// dynamic part, but at most `max` ids.
    Mass {
        /// Share of attention mass to capture.
        target: f32,
        /// Hard cap on ids.
        max: usize,
    },
}

impl Budget {
    /// The most ids this budget allows.
    pub fn max_ids(&self) -> usize {
        match *self {
            Budget::TopK(k) => k,
            Budget::Mass { max, .. } => max,
        }
    }

    /// The same budget allowing at most `n` ids (the size of the dynamic part).
    pub fn clamp(&self, n: usize) -> Budget {
        match *self {
            Budget::TopK(k) => Budget::TopK(k.min(n)),
            Budget::Mass { target, max } => Budget::Mass { target, max: max.min(n) },
        }
    }

    /// Rejects budgets that cannot be met: zero, a mass target outside `(0, 1]`, or more ids
    /// than the context (`context_len` tokens) holds.
    pub fn validate(&self, context_len: usize) -> Result<()> {
        if let Budget::Mass { target, .. } = *self
            && !(target > 0.0 && target <= 1.0)
        {
            return Err(Error::invalid("budget.target", format!("{target} is not in (0, 1]")));
        }
        let m = self.max_ids();
        if m == 0 {
            return Err(Error::invalid("budget", "must allow at least one token"));
        }
        if m > context_len {
            return Err(Error::BudgetTooLarge { what: "selector budget".into(), budget: m, available: context_len });
        }
        Ok(())
    }
}

/// The densely attended part of the context: `sinks` first tokens and `window` last tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaticPart {
    /// Attention-sink tokens at the start.
    pub sinks: usize,
    /// Most recent tokens.
    pub window: usize,
}

impl StaticPart {
    /// Everything is static: full attention.
    pub const ALL: StaticPart = StaticPart { sinks: 0, window: usize::MAX };

    /// `sinks=…,window=…`, as spec options.
    pub fn describe(&self) -> String {
        format!("sinks={},window={}", self.sinks, self.window)
    }

    /// Positions of the dynamic part when the context holds `n` tokens.
    pub fn dynamic_range(&self, n: usize) -> Range<u32> {
        let start = self.sinks.min(n);
        let end = n.saturating_sub(self.window).max(start);
        start as u32..end as u32
    }

    /// Positions attended densely when the context holds `n` tokens, in order.
    pub fn static_ids(&self, n: usize) -> impl Iterator<Item = u32> + Clone {
        let d = self.dynamic_range(n);
        (0..d.start).chain(d.end..n as u32)
    }
}

/// What a selector gets once after prefill.
pub struct BuildContext<'a> {
    /// The layer and KV head served.
    pub head: HeadId,
    /// All keys of this head so far, by position (post-RoPE). The dynamic part is
    /// `static_part().dynamic_range(keys.len())`.
    pub keys: &'a dyn RowSource,
    /// A sample of prefill queries of this head's query group, row-major `m × dim`
    /// (possibly empty): the query distribution that query-aware indexes train on.
    pub train_queries: &'a [f32],
    /// Attention scale (`1/√dim`).
    pub scale: f32,
}

/// A selection: dynamic-part positions, with optional additive log-weights (importance
/// weights of sampling estimators), and what producing it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Selected positions (all inside the dynamic part).
    pub ids: Vec<u32>,
    /// Empty, or one `ln w` per id added to its score.
    pub log_weights: Vec<f32>,
    /// Work done to select.
    pub stats: SearchStats,
}

impl Selection {
    /// Empties the selection for reuse.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.log_weights.clear();
        self.stats = SearchStats::default();
    }
}

/// Chooses, per decode step, which dynamic-part keys a KV head's query group attends to.
pub trait AttentionSelector: Send + Sync {
    /// The spec this selector was made from, e.g. `"retrieval:index=graph,combine=mean-rerank,sinks=128,window=512"`.
    fn describe(&self) -> String;
    /// The static part this selector assumes the model attends densely.
    fn static_part(&self) -> StaticPart;
    /// Called once after prefill with the keys and a sample of prefill queries.
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats>;
    /// Tokens at `positions` (ascending, contiguous) have left the window and joined the
    /// dynamic part; `keys` already holds them.
    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()>;
    /// Picks ids of the dynamic part (`static_part().dynamic_range(keys.len())`) for `queries`
    /// (the group's query heads, row-major `g × dim`) within `budget`, which may ask for more
    /// than the dynamic part holds (clamp it: [`crate::kit::begin_select`] does). `out` is
    /// cleared first.
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, budget: &Budget, out: &mut Selection) -> Result<()>;
    /// Bytes held by the selector's own structures (indexes, page bounds).
    fn memory_bytes(&self) -> usize {
        0
    }
    /// Appends this selector's built state (what `build` and every `insert` since made) to `out`,
    /// so that `load_state` on a selector from the same factory and head restores it without
    /// building again. Key rows are not written: `load_state` gets them back from `keys`.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        let _ = out;
        Err(Error::Unsupported { operation: "save_state".into(), implementation: self.describe() })
    }
    /// Restores state written by `save_state` into a fresh selector made by the same factory for
    /// the same head, over `keys` (the rows it was built and inserted on; `keys.len()` is the
    /// context length at save time). Bad or foreign bytes are an `Error::Corrupt` naming what is
    /// wrong — never a panic, never a silently different selector.
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        let _ = (state, keys);
        Err(Error::Unsupported { operation: "load_state".into(), implementation: self.describe() })
    }
}

/// Makes one selector per layer and KV head; what a model is configured with.
pub trait SelectorFactory: Send + Sync {
    /// The spec this factory was made from.
    fn describe(&self) -> String;
    /// A fresh selector for `head` over vectors of `dim` floats.
    fn create(&self, head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>>;
}

/// Full attention: everything is static, nothing is selected.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullSelector;

impl AttentionSelector for FullSelector {
    fn describe(&self) -> String {
        "full".into()
    }
    fn static_part(&self) -> StaticPart {
        StaticPart::ALL
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        Ok(BuildStats { vectors: ctx.keys.len(), ..Default::default() })
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> Result<()> {
        Ok(())
    }
    fn select(&mut self, _q: &[f32], _k: &dyn RowSource, _b: &Budget, out: &mut Selection) -> Result<()> {
        out.clear();
        Ok(())
    }
    // Full attention builds nothing: its state is empty.
    fn save_state(&self, _out: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], _keys: &dyn RowSource) -> Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(Error::corrupt("full selector state", format!("expected no bytes, got {}", state.len())))
        }
    }
}

impl SelectorFactory for FullSelector {
    fn describe(&self) -> String {
        "full".into()
    }
    fn create(&self, _head: HeadId, _dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(FullSelector))
    }
}

/// Reference decode step for one query head: dense attention over the static part, weighted
/// sparse attention over the selection, merged by log-sum-exp.
/// Errors if the selection strays outside the dynamic part or its weights do not match.
pub fn attend_selected<T: Real>(
    q: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    static_part: StaticPart,
    selection: &Selection,
    scale: f32,
) -> Result<Partial<T>> {
    let dynamic = static_part.dynamic_range(keys.len());
    if let Some(&bad) = selection.ids.iter().find(|&&i| !dynamic.contains(&i)) {
        return Err(Error::OutOfRange {
            what: format!("selection (dynamic part {dynamic:?})"),
            id: bad.into(),
            len: keys.len(),
        });
    }
    let s: Partial<T> = attend(q, keys, values, static_part.static_ids(keys.len()), scale)?;
    let d: Partial<T> = if selection.log_weights.is_empty() {
        attend(q, keys, values, selection.ids.iter().copied(), scale)?
    } else {
        check_len("selection log_weights", selection.ids.len(), selection.log_weights.len())?;
        attend_weighted(
            q,
            keys,
            values,
            selection.ids.iter().copied().zip(selection.log_weights.iter().copied()),
            scale,
        )?
    };
    Ok(merge(&s, &d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_parts_partition_the_context() {
        let s = StaticPart { sinks: 4, window: 8 };
        assert_eq!(s.dynamic_range(100), 4..92);
        assert_eq!(s.static_ids(14).collect::<Vec<_>>(), vec![0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13]);
        // Short contexts are all static.
        assert_eq!(s.dynamic_range(10), 4..4);
        assert_eq!(s.static_ids(3).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(StaticPart::ALL.dynamic_range(50), 0..0);
        assert_eq!(StaticPart::ALL.static_ids(3).count(), 3);
    }

    #[test]
    fn full_selector_state_is_empty() {
        let keys = crate::Rows::new("k", &[1.0, 2.0], 2).unwrap();
        let mut out = Vec::new();
        FullSelector.save_state(&mut out).unwrap();
        assert!(out.is_empty());
        FullSelector.load_state(&out, &keys).unwrap();
        assert!(matches!(FullSelector.load_state(&[1], &keys), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn budgets_are_validated() {
        assert!(Budget::TopK(10).validate(100).is_ok());
        assert!(matches!(Budget::TopK(101).validate(100), Err(Error::BudgetTooLarge { .. })));
        assert!(Budget::TopK(0).validate(100).is_err());
        assert!(Budget::Mass { target: 1.5, max: 10 }.validate(100).is_err());
        assert!(Budget::Mass { target: 0.9, max: 10 }.validate(100).is_ok());
    }
}
