// # IVF-PQ on attention-like out-of-distribution queries
//
// 1. Generate seeded keys and queries (`needle_core::synth::AttentionLike`).
// 2. Ground truth from the exact `FlatIndex`.
// 3. Build plain and query-aware IVF-PQ indexes.
// 4. For a few `nprobe` settings, print recall@10 and the work per query.
//
// Run: cargo run --release -p needle-index-ivfpq --example ood_recall [n_keys] [dim] [spec]
#![allow(clippy::print_stdout)]

use needle_core::synth::AttentionLike;
use needle_core::{FlatIndex, SearchParams, VectorIndex, metrics::recall};
use needle_index_ivfpq::{IvfPqIndex, IvfPqParams, parse_factory};

fn main() -> needle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8192);
    let dim: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let spec = args.get(3).cloned().unwrap_or_else(|| "IVF64,PQ16".into());
    let (nq, k) = (200, 10);
    let g = AttentionLike::new(dim, 42);
    let (keys, queries, train_queries) = (g.keys(n, 1), g.queries(nq, 2), g.queries(1000, 3));
    let mut flat = FlatIndex::new(dim);
    flat.build(&keys, None)?;
    let truth = flat.search(&queries, k, &SearchParams::default())?;
    println!("{n} keys, dim {dim}, {nq} OOD queries, recall@{k}, {spec}");
    println!(
        "{:<12} {:>6} {:>6} {:>8} {:>10} {:>9} {:>11} {:>9}",
        "mode", "nprobe", "rerank", "recall", "codes/q", "full/q", "bytes/q", "ip_mse"
    );
    for query_aware in [false, true] {
        let params = IvfPqParams { query_aware, ..parse_factory(&spec)? };
        let mut index = IvfPqIndex::new(dim, params)?;
        index.build(&keys, Some(&train_queries))?;
        // Mean squared error of the PQ inner-product estimate over all (query, key) pairs.
        let mut se = 0.0f64;
        for q in queries.chunks_exact(dim) {
            let est = index.estimated_scores(q)?;
            for (e, key) in est.iter().zip(keys.chunks_exact(dim)) {
                let exact = needle_core::kit::dot(q, key);
                se += ((e - exact) as f64).powi(2);
            }
        }
        let ip_mse = se / (nq * n) as f64;
        for rerank in [0usize, 4, 8] {
            index.set_rerank(rerank);
            for nprobe in [1usize, 4, 8, 16, 32] {
                let r = index.search(&queries, k, &SearchParams::effort(nprobe))?;
                let rec: f64 = (0..nq).map(|i| recall(r.labels_of(i), truth.labels_of(i))).sum::<f64>() / nq as f64;
                let mode = if query_aware { "query-aware" } else { "plain" };
                println!(
                    "{mode:<12} {nprobe:>6} {rerank:>6} {rec:>8.3} {:>10.0} {:>9.0} {:>11.0} {ip_mse:>9.3}",
                    r.stats.codes_scored as f64 / nq as f64,
                    r.stats.full_scored as f64 / nq as f64,
                    r.stats.bytes_read as f64 / nq as f64
                );
            }
        }
    }
    Ok(())
}
