//! Fidelity metrics: how close a selector's attention (and the model's output) is to full
//! attention. All accumulate in `f64`.

use crate::error::{Error, Result, check_len};
use crate::index::SearchResult;

/// Share of the true top-k ids that `found` contains: `|found ∩ truth| / |truth|`.
/// An empty `truth` has recall 1 (nothing was missed).
pub fn recall(found: &[u32], truth: &[u32]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let set: std::collections::HashSet<u32> = found.iter().copied().collect();
    truth.iter().filter(|t| set.contains(t)).count() as f64 / truth.len() as f64
}

/// Per-query [`recall`] of an index's results `found` against exact results `truth` (row `i` of
/// each is query `i`; padding is ignored, so a query's denominator is its number of true
/// neighbours). The mean over queries is the usual recall@k.
pub fn recall_of_results(found: &SearchResult, truth: &SearchResult) -> Result<Vec<f64>> {
    check_len("recall_of_results found rows", truth.n_queries(), found.n_queries())?;
    Ok((0..truth.n_queries()).map(|i| recall(found.labels_of(i), truth.labels_of(i))).collect())
}

/// Share of the softmax mass of `scores` (all keys, scaled) that falls on `ids`, in `[0, 1]`.
/// Duplicate ids count once.
pub fn attention_mass(scores: &[f32], ids: &[u32]) -> Result<f64> {
    if scores.is_empty() {
        return Err(Error::EmptyKeys { what: "attention_mass".into() });
    }
    let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
    let total: f64 = scores.iter().map(|&s| (s as f64 - max).exp()).sum();
    let mut seen = vec![false; scores.len()];
    let mut part = 0.0;
    for &i in ids {
        let i = i as usize;
        let s = scores.get(i).ok_or(Error::OutOfRange { what: "scores".into(), id: i as u64, len: scores.len() })?;
        if !std::mem::replace(&mut seen[i], true) {
            part += (*s as f64 - max).exp();
        }
    }
    Ok((part / total).clamp(0.0, 1.0))
}

/// Relative L2 error `‖approx − exact‖ / ‖exact‖` (absolute error when `exact` is zero).
pub fn relative_error(approx: &[f32], exact: &[f32]) -> Result<f64> {
    check_len("relative_error approx", exact.len(), approx.len())?;
    let diff: f64 = approx.iter().zip(exact).map(|(&a, &e)| (a as f64 - e as f64).powi(2)).sum();
    let norm: f64 = exact.iter().map(|&e| (e as f64).powi(2)).sum();
    Ok(if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() })
}

/// `ln softmax(logits)` in `f64`.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
    let lse = max + logits.iter().map(|&s| (s as f64 - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&s| s as f64 - lse).collect()
}

/// KL(P ‖ Q) between the next-token distributions given by two logit vectors
/// (P: the reference, e.g. full attention; Q: the approximation). Non-negative.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> Result<f64> {
    check_len("kl_divergence q_logits", p_logits.len(), q_logits.len())?;
    if p_logits.is_empty() {
        return Err(Error::EmptyKeys { what: "kl_divergence".into() });
    }
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    let kl: f64 = lp.iter().zip(&lq).map(|(&a, &b)| if a > f64::NEG_INFINITY { a.exp() * (a - b) } else { 0.0 }).sum();
    Ok(kl.max(0.0))
}

/// Share of positions where two equally long token sequences agree.
pub fn token_agreement(a: &[u32], b: &[u32]) -> Result<f64> {
    check_len("token_agreement", a.len(), b.len())?;
    if a.is_empty() {
        return Ok(1.0);
    }
    Ok(a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64)
}

/// Length of the common prefix of two generations (greedy decoding diverges for good after it).
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_at_their_bounds() {
        assert_eq!(recall(&[1, 2, 3], &[3, 2, 1]), 1.0);
        assert_eq!(recall(&[4, 5], &[1, 2]), 0.0);
        assert_eq!(recall(&[], &[]), 1.0);
        let s = [0.1, 3.0, -2.0];
        assert!((attention_mass(&s, &[0, 1, 2]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(attention_mass(&s, &[]).unwrap(), 0.0);
        assert!((attention_mass(&s, &[1, 1]).unwrap() - attention_mass(&s, &[1]).unwrap()).abs() < 1e-15);
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]).unwrap(), 0.0);
        assert!((relative_error(&[0.0, 0.0], &[3.0, 4.0]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap(), 0.0);
        // Shifting logits leaves the distribution, and so KL, unchanged.
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0]).unwrap() < 1e-12);
        assert!(kl_divergence(&[10.0, 0.0], &[0.0, 10.0]).unwrap() > 9.0);
        assert_eq!(token_agreement(&[1, 2, 3, 4], &[1, 2, 0, 4]).unwrap(), 0.75);
        assert_eq!(common_prefix(&[1, 2, 3, 4], &[1, 2, 0, 4]), 2);
        assert!(token_agreement(&[1], &[1, 2]).is_err());
    }

    #[test]
    fn recall_of_results_counts_the_overlap_whatever_the_order() {
        use crate::index::{NO_LABEL, SearchStats};
        let result = |k: usize, rows: &[&[u32]]| {
            let rows = rows.iter().map(|r| (r.iter().map(|&l| (l, 0.0)).collect(), SearchStats::default())).collect();
            SearchResult::from_rows(k, rows)
        };
        let truth = result(3, &[&[1, 2, 3], &[4, 5, 6]]);
        let found = result(3, &[&[3, 1, 9], &[6, 5, 4]]);
        assert_eq!(recall_of_results(&found, &truth).unwrap(), vec![2.0 / 3.0, 1.0]);
        // Padding (fewer hits than k) counts as misses.
        let short = result(3, &[&[1], &[]]);
        assert_eq!(short.labels[1], NO_LABEL);
        assert_eq!(recall_of_results(&short, &truth).unwrap(), vec![1.0 / 3.0, 0.0]);
        assert!(recall_of_results(&result(3, &[&[1, 2, 3]]), &truth).is_err());
    }

    #[test]
    fn kl_matches_a_hand_computed_value() {
        // P = softmax(0, ln 3) = (1/4, 3/4), Q = (1/2, 1/2).
        let kl = kl_divergence(&[0.0, 3f32.ln()], &[0.0, 0.0]).unwrap();
        let expect = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((kl - expect).abs() < 1e-7, "{kl} vs {expect}");
    }
}
