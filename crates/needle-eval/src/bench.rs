//! Index benchmark on a [`Trace`]: every index backend on the keys and queries of real heads.
//!
//! Per traced layer and KV head: the head's keys are the database, the GQA group's prefill
//! queries train query-aware indexes, the group's decode queries are the test set, and
//! [`FlatIndex`] gives the exact top-k. Each index is built once per head and searched at each
//! effort of its sweep, single-threaded, so latency is per query.

use std::time::Instant;

use needle_core::{FlatIndex, SearchParams, VectorIndex};
use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::stats::{Row, Summary, curve, per_query_share, points, recalls, scanned_at_recall};
use crate::trace::Trace;

/// What to bench, and at which efforts.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexBench {
    /// Neighbours per query (recall@k).
    pub k: usize,
    /// Layers to bench (`None`: every traced layer).
    pub layers: Option<Vec<usize>>,
    /// Index factory strings (see [`parse_indexes`]).
    pub indexes: Vec<String>,
    /// Beam widths swept for graph indexes (values below k act as k).
    pub graph_efforts: Vec<usize>,
    /// Lists probed swept for IVF indexes.
    pub ivf_nprobes: Vec<usize>,
    /// Tables probed swept for LSH indexes.
    pub lsh_tables: Vec<usize>,
    /// At most this many training queries per head (evenly strided); 0 = all.
    pub max_train: usize,
}

impl Default for IndexBench {
    fn default() -> Self {
        Self {
            k: 100,
            layers: None,
            indexes: ["Flat", "RoarGraph32", "HNSW32", "IVF256,PQ16", "LSH10x64"].map(String::from).to_vec(),
            graph_efforts: vec![100, 128, 160, 200, 256, 320, 400, 512, 768, 1024],
            ivf_nprobes: vec![1, 2, 4, 8, 16, 32, 64, 128],
            lsh_tables: vec![4, 8, 16, 32, 64],
            max_train: 0,
        }
    }
}

/// Splits a comma-separated index list, keeping `IVFn,PQm` together as one factory string.
pub fn parse_indexes(s: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match out.last_mut() {
            Some(prev) if part.starts_with("PQ") && prev.starts_with("IVF") && !prev.contains(',') => {
                prev.push(',');
                prev.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "indexes",
            "give at least one index (e.g. Flat,RoarGraph32,HNSW32,IVF256,PQ16,LSH10x64)",
        ));
    }
    Ok(out)
}

/// An empty index from a factory string of one of the index crates.
pub fn make_index(dim: usize, spec: &str) -> Result<Box<dyn VectorIndex>> {
    let s = spec.trim();
    let idx = if s.eq_ignore_ascii_case("flat") {
        needle_index_graph::from_factory(dim, "Flat")
    } else if s.starts_with("IVF") || s.starts_with("PQ") {
        needle_index_ivfpq::from_factory(dim, s)
    } else if s.starts_with("LSH") {
        needle_index_lsh::from_factory(dim, s)
    } else {
        needle_index_graph::from_factory(dim, s)
    };
    idx.map_err(|e| Error::invalid("indexes", format!("`{spec}`: {e}")))
}

impl IndexBench {
    /// The efforts swept for an index (`None` = the index has no knob).
    pub fn efforts(&self, spec: &str) -> Vec<Option<usize>> {
        let list = if spec.starts_with("IVF") || spec.starts_with("PQ") {
            &self.ivf_nprobes
        } else if spec.starts_with("LSH") {
            &self.lsh_tables
        } else if spec.eq_ignore_ascii_case("flat") {
            return vec![None];
        } else {
            &self.graph_efforts
        };
        let mut v = list.clone();
        v.sort_unstable();
        v.dedup();
        v.into_iter().map(Some).collect()
    }

    /// The layers to bench, each checked against the trace.
    pub fn chosen_layers(&self, trace: &Trace) -> Result<Vec<usize>> {
        let layers = self.layers.clone().unwrap_or_else(|| trace.layers.iter().map(|l| l.layer).collect());
        for &l in &layers {
            trace.layer(l)?;
        }
        Ok(layers)
    }

    /// Checks the configuration against the trace: layers, k, index strings.
    pub fn check(&self, trace: &Trace) -> Result<Vec<usize>> {
        if self.k == 0 {
            return Err(Error::invalid("k", "must be at least 1"));
        }
        let layers = self.chosen_layers(trace)?;
        if self.k > trace.n_tokens() {
            return Err(Error::invalid(
                "k",
                format!("{} is larger than the {} keys per head of the trace", self.k, trace.n_tokens()),
            ));
        }
        if trace.n_generated == 0 {
            return Err(Error::invalid("trace", "has no decode queries (trace with generated tokens)"));
        }
        for s in &self.indexes {
            make_index(trace.head_dim, s)?;
        }
        Ok(layers)
    }

    /// Builds and searches every index on every chosen (layer, KV head) of `trace`: one row per
    /// index, head and effort. `progress(done, total)` counts index builds.
    pub fn run(&self, trace: &Trace, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Row>> {
        let layers = self.check(trace)?;
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .map_err(|e| Error::invalid("threads", format!("building a 1-thread pool: {e}")))?;
        let total = layers.len() * trace.n_kv_heads * self.indexes.len();
        let mut rows = Vec::new();
        let mut done = 0;
        for &layer in &layers {
            for h in 0..trace.n_kv_heads {
                self.bench_head(trace, layer, h, &single, &mut rows, &mut || {
                    done += 1;
                    progress(done, total);
                })?;
            }
        }
        Ok(rows)
    }

    /// Benches every index on one (layer, head); pushes one row per effort.
    fn bench_head(
        &self,
        trace: &Trace,
        layer: usize,
        kv_head: usize,
        single: &rayon::ThreadPool,
        rows: &mut Vec<Row>,
        built_one: &mut dyn FnMut(),
    ) -> Result<()> {
        let d = trace.head_dim;
        let l = trace.layer(layer)?;
        let keys = trace.keys(l, kv_head);
        let train = stride_rows(trace.group_queries(&l.prefill_queries, kv_head), d, self.max_train);
        let test = trace.group_queries(&l.decode_queries, kv_head);
        let (n_keys, n_test) = (keys.len() / d, test.len() / d);
        let mut flat = FlatIndex::new(d);
        flat.build(keys, None)?;
        let truth = flat.search(&test, self.k, &SearchParams::default()).during(|| format!("k {}", self.k))?;
        for spec in &self.indexes {
            let mut idx = make_index(d, spec)?;
            let built =
                idx.build(keys, Some(&train)).during(|| format!("building {spec} on layer {layer} head {kv_head}"))?;
            let bytes_per_key = idx.memory_bytes() as f64 / n_keys as f64;
            for effort in self.efforts(spec) {
                let params = SearchParams { effort };
                let t = Instant::now();
                let found = single
                    .install(|| idx.search(&test, self.k, &params))
                    .during(|| format!("searching {spec} (effort {effort:?}) on layer {layer} head {kv_head}"))?;
                let secs = t.elapsed().as_secs_f64();
                let r = recalls(&found, &truth)?;
                rows.push(Row {
                    engine: "needle".into(),
                    index: idx.describe(),
                    layer,
                    kv_head,
                    effort,
                    recall: r.iter().sum::<f64>() / r.len().max(1) as f64,
                    min_query_recall: r.iter().copied().fold(1.0, f64::min),
                    scanned_frac: per_query_share(found.stats.full_scored, n_test, n_keys),
                    codes_frac: per_query_share(found.stats.codes_scored, n_test, n_keys),
                    latency_us: 1e6 * secs / n_test.max(1) as f64,
                    build_s: built.seconds,
                    bytes_per_key,
                    n_keys,
                    n_queries: n_test,
                    scanned_note: None,
                });
            }
            built_one();
        }
        Ok(())
    }
}

/// Every `stride`-th row so that at most `max` rows remain (`max == 0` keeps all).
pub fn stride_rows(xs: Vec<f32>, dim: usize, max: usize) -> Vec<f32> {
    let n = xs.len() / dim.max(1);
    if max == 0 || n <= max {
        return xs;
    }
    let stride = n.div_ceil(max);
    xs.chunks_exact(dim).step_by(stride).flatten().copied().collect()
}

/// Keys scanned at equal mean recall by a reference curve and by one needle index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EqualRecall {
    /// The needle curve (`needle/<index>`).
    pub index: String,
    /// The reference curve (e.g. `faiss/HNSW32`).
    pub reference: String,
    /// The recall target.
    pub recall: f64,
    /// Share of keys the needle index scans to reach it (`None`: never reached).
    pub scanned_frac: Option<f64>,
    /// The same for the reference.
    pub reference_scanned_frac: Option<f64>,
    /// `reference_scanned_frac / scanned_frac` (higher = needle scans fewer).
    pub ratio: Option<f64>,
}

/// Keys scanned at equal mean recall: the reference's share over each needle index's share.
pub fn equal_recall_ratios(summary: &[Summary], reference: &str, targets: &[f64]) -> Vec<EqualRecall> {
    let rp = points(&curve(summary, reference));
    // Exact scans have no knob to trade; they are the 100% reference, not a curve.
    let approx = |s: &&Summary| s.engine == "needle" && !s.index.eq_ignore_ascii_case("flat");
    let mut names: Vec<String> = summary.iter().filter(approx).map(Summary::name).collect();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let p = points(&curve(summary, &name));
        for &t in targets {
            let (ours, theirs) = (scanned_at_recall(&p, t), scanned_at_recall(&rp, t));
            out.push(EqualRecall {
                index: name.clone(),
                reference: reference.into(),
                recall: t,
                scanned_frac: ours,
                reference_scanned_frac: theirs,
                ratio: ours.zip(theirs).and_then(|(o, r)| (o > 0.0).then_some(r / o)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lists_keep_ivf_pq_together() {
        assert_eq!(
            parse_indexes("flat, RoarGraph32,HNSW32,IVF256,PQ16,LSH10x64").unwrap(),
            vec!["flat", "RoarGraph32", "HNSW32", "IVF256,PQ16", "LSH10x64"]
        );
        assert_eq!(parse_indexes("PQ8,IVF16,PQ4").unwrap(), vec!["PQ8", "IVF16,PQ4"]);
        assert!(parse_indexes(" , ").is_err());
        let e = make_index(64, "Bogus7").err().unwrap().to_string();
        assert!(e.contains("Bogus7"), "{e}");
    }

    #[test]
    fn bench_runs_on_a_synthetic_trace_and_flat_is_exact() {
        let trace = Trace::synthetic(&[2, 7], 200, 4);
        let cfg = IndexBench {
            k: 5,
            indexes: vec!["Flat".into(), "HNSW8".into()],
            graph_efforts: vec![5, 50],
            ..IndexBench::default()
        };
        let mut calls = Vec::new();
        let rows = cfg.run(&trace, &mut |d, t| calls.push((d, t))).unwrap();
        // 2 layers × 2 KV heads × (Flat + 2 efforts).
        assert_eq!(rows.len(), 12);
        assert_eq!(calls.last(), Some(&(8, 8)));
        for r in rows.iter().filter(|r| r.index == "Flat") {
            assert_eq!(r.recall, 1.0);
            assert!((r.scanned_frac - 1.0).abs() < 1e-12);
            assert_eq!(r.n_keys, 204);
            assert_eq!(r.n_queries, 4 * 3);
        }
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let trace = Trace::synthetic(&[5], 20, 2);
        let err = |c: IndexBench| c.run(&trace, &mut |_, _| {}).unwrap_err().to_string();
        let e = err(IndexBench { layers: Some(vec![5, 15]), ..IndexBench::default() });
        assert!(e.contains("layer 15") && e.contains("layers"), "{e}");
        let e = err(IndexBench { k: 100, ..IndexBench::default() });
        assert!(e.contains("k: 100") && e.contains("22 keys"), "{e}");
        let e = err(IndexBench { k: 5, indexes: vec!["Nope".into()], ..IndexBench::default() });
        assert!(e.contains("Nope"), "{e}");
        let e = err(IndexBench { k: 0, ..IndexBench::default() });
        assert!(e.contains("k:"), "{e}");
    }
}
