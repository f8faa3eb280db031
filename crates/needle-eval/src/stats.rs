//! The arithmetic of index benchmarks: recall against ground truth, share of keys scanned,
//! aggregation over heads, and keys scanned at equal recall. Shared with the peer script's
//! JSON (same field names), so rows from faiss and hnswlib merge into one table.

use std::collections::BTreeMap;

use needle_core::SearchResult;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One index at one effort on one (layer, KV head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `needle`, `faiss` or `hnswlib`.
    pub engine: String,
    /// Factory string, e.g. `RoarGraph32`.
    pub index: String,
    /// Layer of the trace.
    pub layer: usize,
    /// KV head of the layer.
    pub kv_head: usize,
    /// The effort knob (beam width, nprobe, tables); `null` for exact scans.
    pub effort: Option<usize>,
    /// Mean recall@k over the test queries.
    pub recall: f64,
    /// Worst single-query recall@k.
    pub min_query_recall: f64,
    /// Full-precision keys scored per query, as a share of the keys.
    pub scanned_frac: f64,
    /// Compressed codes scored per query, as a share of the keys.
    pub codes_frac: f64,
    /// Mean single-thread latency per query in microseconds.
    pub latency_us: f64,
    /// Build wall time in seconds.
    pub build_s: f64,
    /// Index bytes (vectors included) per key.
    pub bytes_per_key: f64,
    /// Keys of the head (the database).
    pub n_keys: usize,
    /// Test queries searched.
    pub n_queries: usize,
    /// How `scanned_frac` was obtained when it is not an exact count (e.g. a timing proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned_note: Option<String>,
}

/// Rows of one index and effort aggregated over heads (and layers, when `layer` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `needle`, `faiss` or `hnswlib`.
    pub engine: String,
    /// Factory string.
    pub index: String,
    /// The layer, or `None` for all layers.
    pub layer: Option<usize>,
    /// The effort knob.
    pub effort: Option<usize>,
    /// Heads aggregated.
    pub heads: usize,
    /// Mean over heads of the mean recall.
    pub mean_recall: f64,
    /// Lowest per-head mean recall.
    pub min_head_recall: f64,
    /// Mean share of keys scored at full precision per query.
    pub scanned_frac: f64,
    /// Mean share of compressed codes scored per query.
    pub codes_frac: f64,
    /// Mean single-thread latency per query (µs).
    pub latency_us: f64,
    /// Mean build time (s).
    pub build_s: f64,
    /// Mean index bytes per key.
    pub bytes_per_key: f64,
}

impl Summary {
    /// `engine/index`, the name of a curve.
    pub fn name(&self) -> String {
        format!("{}/{}", self.engine, self.index)
    }
}

/// Per-query recall@k of `found` against exact results `truth` (both `n × k`): see
/// [`needle_core::metrics::recall_of_results`].
pub fn recalls(found: &SearchResult, truth: &SearchResult) -> Result<Vec<f64>> {
    Ok(needle_core::metrics::recall_of_results(found, truth)?)
}

/// Share of the database touched per query: `count / (n_queries × n_keys)`.
pub fn per_query_share(count: u64, n_queries: usize, n_keys: usize) -> f64 {
    if n_queries == 0 || n_keys == 0 {
        return 0.0;
    }
    count as f64 / (n_queries as f64 * n_keys as f64)
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Aggregates rows per (engine, index, effort): over all layers (`layer: None`) and per layer.
/// Sorted by engine, index, layer (all first) and effort.
pub fn summarize(rows: &[Row]) -> Vec<Summary> {
    type Key = (String, String, Option<usize>, Option<usize>);
    let mut groups: BTreeMap<Key, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        for layer in [None, Some(r.layer)] {
            groups.entry((r.engine.clone(), r.index.clone(), layer, r.effort)).or_default().push(r);
        }
    }
    groups
        .into_iter()
        .map(|((engine, index, layer, effort), g)| Summary {
            engine,
            index,
            layer,
            effort,
            heads: g.len(),
            mean_recall: mean(g.iter().map(|r| r.recall)),
            min_head_recall: g.iter().map(|r| r.recall).fold(f64::INFINITY, f64::min),
            scanned_frac: mean(g.iter().map(|r| r.scanned_frac)),
            codes_frac: mean(g.iter().map(|r| r.codes_frac)),
            latency_us: mean(g.iter().map(|r| r.latency_us)),
            build_s: mean(g.iter().map(|r| r.build_s)),
            bytes_per_key: mean(g.iter().map(|r| r.bytes_per_key)),
        })
        .collect()
}

/// The all-layer curve of one index, as `(recall, scanned share)` points in effort order.
pub fn curve<'a>(summary: &'a [Summary], name: &str) -> Vec<&'a Summary> {
    let mut c: Vec<&Summary> = summary.iter().filter(|s| s.layer.is_none() && s.name() == name).collect();
    c.sort_by_key(|s| s.effort);
    c
}

/// Share of keys scanned to first reach mean recall `target` along a curve (points in effort
/// order), interpolated linearly between the last point below and the first point at or
/// above the target; `None` if the curve never reaches it.
pub fn scanned_at_recall(points: &[(f64, f64)], target: f64) -> Option<f64> {
    let i = points.iter().position(|&(r, _)| r >= target)?;
    if i == 0 {
        return Some(points[0].1);
    }
    let ((r0, s0), (r1, s1)) = (points[i - 1], points[i]);
    if r1 <= r0 {
        return Some(s1);
    }
    Some(s0 + (s1 - s0) * (target - r0) / (r1 - r0))
}

/// `(recall, scanned share)` of a curve.
pub fn points(c: &[&Summary]) -> Vec<(f64, f64)> {
    c.iter().map(|s| (s.mean_recall, s.scanned_frac)).collect()
}

/// Renders the all-layer summary as a fixed-width text table.
pub fn table(summary: &[Summary], k: usize) -> String {
    let mut out = format!(
        "{:<22} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}\n",
        "index",
        "effort",
        format!("recall@{k}"),
        "min head",
        "% keys",
        "% codes",
        "lat µs/q",
        "build s",
        "B/key"
    );
    for s in summary.iter().filter(|s| s.layer.is_none()) {
        out += &format!(
            "{:<22} {:>6} {:>9.4} {:>9.4} {:>9.3} {:>9.3} {:>10.1} {:>9.3} {:>8.1}\n",
            s.name(),
            s.effort.map_or("-".into(), |e| e.to_string()),
            s.mean_recall,
            s.min_head_recall,
            100.0 * s.scanned_frac,
            100.0 * s.codes_frac,
            s.latency_us,
            s.build_s,
            s.bytes_per_key
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_per_query() {
        // 4 queries scanning 200 of 1000 keys each.
        assert!((per_query_share(800, 4, 1000) - 0.2).abs() < 1e-12);
        assert_eq!(per_query_share(5, 0, 10), 0.0);
    }

    fn row(index: &str, layer: usize, head: usize, effort: usize, recall: f64, scanned: f64) -> Row {
        Row {
            engine: "needle".into(),
            index: index.into(),
            layer,
            kv_head: head,
            effort: Some(effort),
            recall,
            min_query_recall: recall,
            scanned_frac: scanned,
            codes_frac: 0.0,
            latency_us: 10.0,
            build_s: 1.0,
            bytes_per_key: 300.0,
            n_keys: 100,
            n_queries: 3,
            scanned_note: None,
        }
    }

    #[test]
    fn summary_means_and_minima_over_heads() {
        let rows = vec![
            row("G", 5, 0, 10, 0.9, 0.02),
            row("G", 5, 1, 10, 0.7, 0.04),
            row("G", 15, 0, 10, 0.8, 0.06),
            row("G", 5, 0, 20, 1.0, 0.1),
        ];
        let s = summarize(&rows);
        let all10 = s.iter().find(|s| s.layer.is_none() && s.effort == Some(10)).unwrap();
        assert_eq!(all10.heads, 3);
        assert!((all10.mean_recall - 0.8).abs() < 1e-12);
        assert!((all10.min_head_recall - 0.7).abs() < 1e-12);
        assert!((all10.scanned_frac - 0.04).abs() < 1e-12);
        let l5 = s.iter().find(|s| s.layer == Some(5) && s.effort == Some(10)).unwrap();
        assert_eq!(l5.heads, 2);
        assert!((l5.mean_recall - 0.8).abs() < 1e-12);
        let c = curve(&s, "needle/G");
        assert_eq!(c.iter().map(|s| s.effort).collect::<Vec<_>>(), vec![Some(10), Some(20)]);
        assert!(table(&s, 100).contains("needle/G"));
    }

    #[test]
    fn scanned_at_equal_recall_interpolates() {
        let pts = [(0.5, 0.01), (0.9, 0.03), (0.99, 0.12)];
        assert_eq!(scanned_at_recall(&pts, 0.4), Some(0.01));
        assert!((scanned_at_recall(&pts, 0.7).unwrap() - 0.02).abs() < 1e-12);
        assert!((scanned_at_recall(&pts, 0.95).unwrap() - 0.08).abs() < 1e-12);
        assert_eq!(scanned_at_recall(&pts, 0.995), None);
    }
}
