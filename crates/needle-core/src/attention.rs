//! Exact attention on slices: the reference every fast path is checked against.
//!
//! Attention over a key set `S` for one query returns the normalised output and the
//! log-sum-exp of its scores, so that results over disjoint key sets merge exactly:
//! `lse = max(a, b) + ln(e^(a - max) + e^(b - max))`,
//! `out = e^(lse_a - lse) · out_a + e^(lse_b - lse) · out_b`.
//! The accumulator type `T` is `f32` for speed or `f64` for checks.

use crate::error::{Error, Result, check_finite, check_len};
use crate::kv::{Row, RowSource};

/// Floating-point accumulator for reference attention (`f32` or `f64`).
pub trait Real:
    Copy
    + PartialOrd
    + std::fmt::Debug
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Negative infinity: the log-sum-exp of an empty key set.
    const NEG_INFINITY: Self;
    /// Conversion from `f32`.
    fn from_f32(x: f32) -> Self;
    /// Conversion to `f64` (for metrics).
    fn to_f64(self) -> f64;
    /// `e^self`.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Attention over one key set for one query: the normalised output and the log-sum-exp of
/// the (scaled, possibly log-weighted) scores. An empty key set has `lse = -inf` and a zero output.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial<T = f32> {
    /// Softmax-weighted sum of value rows.
    pub out: Vec<T>,
    /// `ln Σ exp(score)` over the key set.
    pub lse: T,
}

impl<T: Real> Partial<T> {
    /// The result over an empty key set.
    pub fn empty(dim: usize) -> Self {
        Self { out: vec![T::ZERO; dim], lse: T::NEG_INFINITY }
    }

    /// True when no key contributed.
    pub fn is_empty(&self) -> bool {
        self.lse == T::NEG_INFINITY
    }
}

/// Scaled dot product `scale · q·k` accumulated in `T` (`k` an `f32` slice or a stored [`Row`]).
#[inline]
pub fn score<'a, T: Real>(q: &[f32], k: impl Into<Row<'a>>, scale: f32) -> T {
    let k = k.into();
    let mut acc = T::ZERO;
    for (&a, b) in q.iter().zip(k.iter()) {
        acc += T::from_f32(a) * T::from_f32(b);
    }
    acc * T::from_f32(scale)
}

/// Attention of `q` over the keys named by `ids`, each with an additive log-weight
/// (`0.0` for plain attention; `ln w` for importance-weighted estimates such as MagicPIG's).
///
/// Validates shapes, ids and finiteness of the query; duplicate ids count twice, as the
/// formula says.
pub fn attend_weighted<T: Real>(
    q: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    ids: impl IntoIterator<Item = (u32, f32)>,
    scale: f32,
) -> Result<Partial<T>> {
    check_len("query", keys.dim(), q.len())?;
    check_finite("query", q)?;
    check_len("values (rows)", keys.len(), values.len())?;
    let mut scored: Vec<(u32, T)> = Vec::new();
    for (id, log_w) in ids {
        keys.check_id("keys", id)?;
        scored.push((id, score::<T>(q, keys.row(id as usize), scale) + T::from_f32(log_w)));
    }
    let mut out = Partial::empty(values.dim());
    let Some(max) = scored.iter().map(|s| s.1).reduce(|a, b| if b > a { b } else { a }) else {
        return Ok(out);
    };
    let mut denom = T::ZERO;
    for &(id, s) in &scored {
        let p = (s - max).exp();
        denom += p;
        for (o, v) in out.out.iter_mut().zip(values.row(id as usize).iter()) {
            *o += p * T::from_f32(v);
        }
    }
    for o in &mut out.out {
        *o = *o / denom;
    }
    out.lse = max + denom.ln();
    Ok(out)
}

/// Attention of `q` over the keys named by `ids`.
pub fn attend<T: Real>(
    q: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    ids: impl IntoIterator<Item = u32>,
    scale: f32,
) -> Result<Partial<T>> {
    attend_weighted(q, keys, values, ids.into_iter().map(|i| (i, 0.0)), scale)
}

/// Dense attention of `q` over every key. Errors on an empty key set.
pub fn dense<T: Real>(q: &[f32], keys: &dyn RowSource, values: &dyn RowSource, scale: f32) -> Result<Partial<T>> {
    if keys.is_empty() {
        return Err(Error::EmptyKeys { what: "dense attention".into() });
    }
    let n = u32::try_from(keys.len()).map_err(|_| Error::invalid("keys", "more than u32::MAX rows"))?;
    attend(q, keys, values, 0..n, scale)
}

/// Exact merge of two partial results over disjoint key sets.
pub fn merge<T: Real>(a: &Partial<T>, b: &Partial<T>) -> Partial<T> {
    let mut m = a.clone();
    merge_into(&mut m.out, &mut m.lse, &b.out, b.lse);
    m
}

/// [`merge`] in place: `(out, lse)` becomes the merge of itself with `(b_out, b_lse)` (an empty
/// side, `lse = -inf`, leaves the other as it is). For the decode kernels' partials over row
/// chunks, merged chunk after chunk.
pub fn merge_into<T: Real>(out: &mut [T], lse: &mut T, b_out: &[T], b_lse: T) {
    if b_lse == T::NEG_INFINITY {
        return;
    }
    if *lse == T::NEG_INFINITY {
        out.copy_from_slice(b_out);
        *lse = b_lse;
        return;
    }
    let max = if *lse > b_lse { *lse } else { b_lse };
    let (ea, eb) = ((*lse - max).exp(), (b_lse - max).exp());
    let sum = ea + eb;
    let (wa, wb) = (ea / sum, eb / sum);
    out.iter_mut().zip(b_out).for_each(|(x, &y)| *x = wa * *x + wb * y);
    *lse = max + sum.ln();
}

/// Causal attention for a chunk of prefill queries: query `i` (at position `first_pos + i`)
/// sees keys `0..=first_pos + i`. `queries` is row-major `n × dim`.
pub fn causal_chunk<T: Real>(
    queries: &[f32],
    first_pos: usize,
    keys: &dyn RowSource,
    values: &dyn RowSource,
    scale: f32,
) -> Result<Vec<Partial<T>>> {
    let dim = keys.dim();
    if dim == 0 || !queries.len().is_multiple_of(dim) {
        return Err(Error::DimensionMismatch {
            what: "prefill queries (rows of dim)".into(),
            expected: dim,
            got: queries.len(),
        });
    }
    let n = queries.len() / dim;
    if first_pos + n > keys.len() {
        return Err(Error::OutOfRange {
            what: "causal chunk keys".into(),
            id: (first_pos + n) as u64,
            len: keys.len(),
        });
    }
    (0..n)
        .map(|i| {
            let last = u32::try_from(first_pos + i + 1).map_err(|_| Error::invalid("position", "exceeds u32"))?;
            attend(&queries[i * dim..(i + 1) * dim], keys, values, 0..last, scale)
        })
        .collect()
}

/// Grouped-query attention layout: `n_q_heads` query heads share `n_kv_heads` KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GqaLayout {
    /// Query heads.
    pub n_q_heads: usize,
    /// KV heads; divides `n_q_heads`.
    pub n_kv_heads: usize,
}

impl GqaLayout {
    /// Validates that the KV heads divide the query heads.
    pub fn new(n_q_heads: usize, n_kv_heads: usize) -> Result<Self> {
        if n_kv_heads == 0 || n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::invalid(
                "n_kv_heads",
                format!("{n_kv_heads} KV heads must divide {n_q_heads} query heads (both > 0)"),
            ));
        }
        Ok(Self { n_q_heads, n_kv_heads })
    }
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }
    /// The KV head that query head `q_head` reads.
    pub fn kv_head_of(&self, q_head: usize) -> usize {
        q_head / self.group_size()
    }
    /// The query heads that share `kv_head`.
    pub fn group(&self, kv_head: usize) -> std::ops::Range<usize> {
        kv_head * self.group_size()..(kv_head + 1) * self.group_size()
    }
}

/// Scaled scores `scale · q·k_i` for every key, in `f32`.
pub fn scores(q: &[f32], keys: &dyn RowSource, scale: f32) -> Result<Vec<f32>> {
    check_len("query", keys.dim(), q.len())?;
    Ok((0..keys.len()).map(|i| score::<f32>(q, keys.row(i), scale)).collect())
}

/// The `k` largest entries of `scores` as `(index, score)`, best first; ties by lower index.
/// Errors if `k > scores.len()` or a score is NaN.
pub fn top_k(scores: &[f32], k: usize) -> Result<Vec<(u32, f32)>> {
    if k > scores.len() {
        return Err(Error::BudgetTooLarge { what: "top-k".into(), budget: k, available: scores.len() });
    }
    if let Some(index) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::NonFinite { what: "scores".into(), index, value: f32::NAN });
    }
    let mut idx: Vec<(u32, f32)> = scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
    let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, better);
    }
    idx.truncate(k);
    idx.sort_unstable_by(better);
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Rows;

    #[test]
    fn single_key_attention_returns_its_value() {
        let k = [1.0, 2.0];
        let v = [3.0, -1.0];
        let keys = Rows::new("k", &k, 2).unwrap();
        let values = Rows::new("v", &v, 2).unwrap();
        let p: Partial<f64> = dense(&[0.5, 0.5], &keys, &values, 1.0).unwrap();
        assert_eq!(p.out, vec![3.0, -1.0]);
        assert!((p.lse - 1.5).abs() < 1e-12);
    }

    #[test]
    fn errors_are_named() {
        let keys = Rows::new("k", &[], 2).unwrap();
        assert!(matches!(dense::<f32>(&[0.0, 0.0], &keys, &keys, 1.0), Err(Error::EmptyKeys { .. })));
        let k = [1.0, 2.0];
        let keys = Rows::new("k", &k, 2).unwrap();
        assert!(matches!(dense::<f32>(&[f32::NAN, 0.0], &keys, &keys, 1.0), Err(Error::NonFinite { .. })));
        assert!(matches!(dense::<f32>(&[0.0], &keys, &keys, 1.0), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(attend::<f32>(&[0.0, 0.0], &keys, &keys, [1], 1.0), Err(Error::OutOfRange { .. })));
        assert!(matches!(top_k(&[1.0, 2.0], 3), Err(Error::BudgetTooLarge { .. })));
        assert!(GqaLayout::new(9, 4).is_err());
    }

    #[test]
    fn top_k_orders_best_first_with_stable_ties() {
        let t = top_k(&[0.5, 2.0, -1.0, 2.0, 1.0], 3).unwrap();
        assert_eq!(t, vec![(1, 2.0), (3, 2.0), (4, 1.0)]);
        assert!(top_k(&[1.0], 0).unwrap().is_empty());
    }

    #[test]
    fn gqa_groups_cover_all_query_heads_once() {
        let g = GqaLayout::new(9, 3).unwrap();
        assert_eq!(g.group(1), 3..6);
        assert_eq!((0..9).map(|h| g.kv_head_of(h)).collect::<Vec<_>>(), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }
}
