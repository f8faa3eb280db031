//! The selector author's kit: the pieces every [`AttentionSelector`](crate::AttentionSelector)
//! needs, public so that a selector written in another crate gets what the built-ins get.
//!
//! A `select` typically starts with [`begin_select`] (clears the output, validates the query
//! group, derives the dynamic part and clamps the budget to it), scores candidates with
//! [`group_max`], and finishes with [`keep_top`] or [`apply_budget`], reporting its cost with
//! [`full_cost`]. Scores come from [`dot`], the one inner product of needle.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::index::{SearchStats, check_batch};
use crate::kv::{Row, RowSource};
use crate::selector::{Budget, Selection, StaticPart};

/// Sinks every built-in selector keeps by default (RetrievalAttention's static part), so that
/// selectors compared at their defaults differ only in the dynamic part.
pub const DEFAULT_SINKS: usize = 128;
/// Recent-window tokens every built-in selector keeps by default.
pub const DEFAULT_WINDOW: usize = 512;

/// Inner product of two slices (the shorter length wins): the one `dot` of needle, the reference
/// every selector, index and row read uses ([`Row::dot`]).
///
/// Eight independent accumulators break the add dependency chain, so the loop runs at SIMD
/// width without `-ffast-math`-style reassociation (and vectorises fully at `dim = 64`); they
/// are summed pairwise. Its rounding differs from a sequential sum in the last bits.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Hints the CPU to fetch the cache line(s) holding `bytes` starting at `p` (no effect off
/// x86-64): random reads issued together overlap their misses instead of queueing them.
#[inline(always)]
pub fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, bytes);
    }
}

/// The group's score of a key: the largest `q·k` over the group's query rows (unscaled).
/// A key any head of the group attends strongly to is worth fetching once for all of them.
#[inline]
pub fn group_max<'a>(queries: &[f32], dim: usize, key: impl Into<Row<'a>>) -> f32 {
    let key = key.into();
    queries.chunks_exact(dim).map(|q| key.dot(q)).fold(f32::NEG_INFINITY, f32::max)
}

/// Validates a decode query group (`g × dim`, finite, `g >= 1`) and returns `g`.
pub fn check_group(queries: &[f32], dim: usize) -> Result<usize> {
    let g = check_batch("queries", queries, dim)?;
    if g == 0 {
        return Err(Error::EmptyKeys { what: "select queries (need at least one query row)".into() });
    }
    Ok(g)
}

/// What a `select` works with once [`begin_select`] has checked its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectStep {
    /// Query rows in the group.
    pub group: usize,
    /// Positions of the dynamic part (never empty here).
    pub dynamic: Range<u32>,
    /// The budget, clamped to the dynamic part's size.
    pub budget: Budget,
}

/// The checks every `select` starts with: clears `out`, validates the query group against
/// `dim`, derives the dynamic part from `static_part` and the key count, and clamps `budget`
/// to it. Returns `None` when the dynamic part is empty (nothing to select).
pub fn begin_select(
    static_part: StaticPart,
    queries: &[f32],
    dim: usize,
    keys: &dyn RowSource,
    budget: &Budget,
    out: &mut Selection,
) -> Result<Option<SelectStep>> {
    out.clear();
    let group = check_group(queries, dim)?;
    if keys.dim() != dim {
        return Err(Error::invalid("keys dim", format!("{} (the selector was made for {dim})", keys.dim())));
    }
    let dynamic = static_part.dynamic_range(keys.len());
    if dynamic.is_empty() {
        return Ok(None);
    }
    Ok(Some(SelectStep { group, budget: budget.clamp(dynamic.len()), dynamic }))
}

/// Best first, ties by lower id: the order `needle_core::attention::top_k` uses.
#[inline]
pub fn better(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the `k` best `(id, score)` pairs of `cands`, sorted best first, in place.
pub fn keep_top(cands: &mut Vec<(u32, f32)>, k: usize) {
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
pub fn dedup_ids(cands: &mut Vec<(u32, f32)>) {
    cands.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    cands.dedup_by_key(|c| c.0);
}

/// For candidates sorted best first by (unscaled) score, the shortest prefix holding `target`
/// of their softmax mass at `scale`. Used by `Budget::Mass` where only candidates are scored.
pub fn mass_prefix(sorted: &[(u32, f32)], scale: f32, target: f32) -> usize {
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

/// Applies a budget to candidates scored exactly by the group ([`group_max`]), best first.
pub fn apply_budget(cands: &mut Vec<(u32, f32)>, budget: &Budget, scale: f32) {
    keep_top(cands, budget.max_ids());
    if let Budget::Mass { target, .. } = *budget {
        let n = mass_prefix(cands, scale, target);
        cands.truncate(n);
    }
}

/// Cost of reading and scoring `n` full keys of `dim` floats.
pub fn full_cost(n: usize, dim: usize) -> SearchStats {
    SearchStats { full_scored: n as u64, codes_scored: 0, bytes_read: (n * dim * 4) as u64 }
}

/// The attention scale before a build told the selector the real one.
pub fn default_scale(dim: usize) -> f32 {
    1.0 / (dim.max(1) as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rows;

    #[test]
    fn begin_select_derives_the_dynamic_part_and_clamps_the_budget() {
        let keys: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let rows = Rows::new("k", &keys, 2).unwrap();
        let sp = StaticPart { sinks: 2, window: 3 };
        let mut out = Selection { ids: vec![7], ..Default::default() };
        let step = begin_select(sp, &[1.0, 0.0], 2, &rows, &Budget::TopK(100), &mut out).unwrap().unwrap();
        assert!(out.ids.is_empty());
        assert_eq!((step.group, step.dynamic.clone(), step.budget), (1, 2..17, Budget::TopK(15)));
        let m = begin_select(sp, &[1.0, 0.0], 2, &rows, &Budget::Mass { target: 0.5, max: 99 }, &mut out).unwrap();
        assert_eq!(m.unwrap().budget, Budget::Mass { target: 0.5, max: 15 });
        let all = StaticPart { sinks: 0, window: 100 };
        assert!(begin_select(all, &[1.0, 0.0], 2, &rows, &Budget::TopK(3), &mut out).unwrap().is_none());
        assert!(begin_select(sp, &[1.0, 0.0, 1.0], 2, &rows, &Budget::TopK(3), &mut out).is_err());
        assert!(begin_select(sp, &[1.0, 0.0, 1.0], 3, &rows, &Budget::TopK(3), &mut out).is_err());
    }

    #[test]
    fn dot_matches_f64_for_all_tail_lengths_and_takes_the_shorter_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            assert!((f64::from(dot(&a, &b)) - exact).abs() < 1e-5, "n={n}");
            if n > 3 {
                assert_eq!(dot(&a, &b[..3]), dot(&a[..3], &b[..3]), "n={n}");
            }
        }
    }

    #[test]
    fn keep_top_and_mass_prefix_cut_where_they_should() {
        let mut c = vec![(3, 1.0), (1, 5.0), (2, 5.0), (9, -2.0)];
        keep_top(&mut c, 3);
        assert_eq!(c, vec![(1, 5.0), (2, 5.0), (3, 1.0)]);
        // Two equal leaders hold almost all the mass at scale 1 (the third has e^-4 of a leader's weight).
        assert_eq!(mass_prefix(&c, 1.0, 0.9), 2);
        assert_eq!(mass_prefix(&c, 1.0, 1.0), 3);
        let mut d = vec![(4, 1.0), (4, 3.0), (2, 0.0)];
        dedup_ids(&mut d);
        assert_eq!(d, vec![(2, 0.0), (4, 3.0)]);
    }
}
