// # Recall against cost on out-of-distribution queries
//
// Builds Flat, HNSW and RoarGraph on the same attention-like keys (RoarGraph also sees a sample
// of "prefill" queries), then sweeps the effort knob on fresh "decode" queries and prints
// recall@10, recall@100 and the share of keys scored.
//
// cargo run --release -p needle-index-graph --example ood_recall -- 8192 32768
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use needle_core::{FlatIndex, SearchParams, VectorIndex};
use needle_index_graph::{Hnsw, HnswParams, RoarGraph};

/// Mean over queries of needle-core's recall of the first `k` results.
fn recall(truth: &needle_core::SearchResult, got: &needle_core::SearchResult, k: usize) -> f64 {
    let per = |i: usize| {
        let g = got.labels_of(i);
        needle_core::metrics::recall(&g[..k.min(g.len())], &truth.labels_of(i)[..k])
    };
    (0..truth.n_queries()).map(per).sum::<f64>() / truth.n_queries() as f64
}

fn main() -> needle_core::Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![8192] } else { sizes };
    let dim = 64;
    for n in sizes {
        let data = needle_core::synth::AttentionLike::new(dim, 7);
        let keys = data.keys(n, 1);
        let train = data.queries(n, 2);
        let test = data.queries(200, 3);
        let mut flat = FlatIndex::new(dim);
        flat.build(&keys, None)?;
        let truth = flat.search(&test, 100, &SearchParams::default())?;
        println!("n={n} dim={dim}: Flat scores 100% of keys");
        let mut indexes: Vec<Box<dyn VectorIndex>> = vec![
            Box::new(Hnsw::new(dim, HnswParams { m: 32, ..Default::default() })?),
            Box::new(RoarGraph::with_m(dim, 32)?),
        ];
        for index in indexes.iter_mut() {
            let b = index.build(&keys, Some(&train))?;
            println!("{} build {:.2}s, {:.1} MiB", index.describe(), b.seconds, b.bytes as f64 / (1 << 20) as f64);
            for ef in [100, 128, 160, 200, 256, 384, 512, 1024] {
                let r = index.search(&test, 100, &SearchParams::effort(ef))?;
                let scanned = r.stats.full_scored as f64 / (test.len() / dim * n) as f64;
                println!(
                    "  ef={ef:5} recall@10={:.3} recall@100={:.3} scanned={:.2}%",
                    recall(&truth, &r, 10),
                    recall(&truth, &r, 100),
                    scanned * 100.0
                );
            }
        }
    }
    Ok(())
}
