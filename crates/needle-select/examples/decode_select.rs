//! # What a decode step's selections cost across many heads
//!
//! A decode step selects for every KV head of every layer in turn (90 heads in SmolLM2-135M),
//! so each head's index is cold in the CPU caches when its turn comes; a benchmark that
//! searches one index over and over measures a warm cache instead. This builds `heads`
//! retrieval selectors over attention-like keys (one draw per head), then runs decode steps
//! that select once per head, round robin, with GQA groups of queries that drift from step to
//! step as a decode's do, and prints per spec: build seconds per head, index bytes per key,
//! select ms per step, keys scored per select, and recall@k of the group's true top-k.
//!
//! `cargo run --release -p needle-select --example decode_select [heads] [keys] [steps] [spec;spec...]`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use needle_core::synth::{AttentionLike, gaussian};
use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, Rows, Selection, SelectorFactory, metrics::recall};
use rayon::prelude::*;

/// One head's keys, training queries and the query group of each step.
struct Head {
    keys: Vec<f32>,
    train: Vec<f32>,
    groups: Vec<Vec<f32>>,
}

fn main() -> needle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let heads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8192);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let specs = args.get(4).map_or("retrieval:index=graph;retrieval", String::as_str);
    let (dim, g, k, train_positions) = (64, 3, 100, 4096);
    // One key/query law per head; queries drift by a small step per decode position.
    let data: Vec<Head> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let law = AttentionLike::new(dim, 1000 + h as u64);
            let keys = law.keys(n, 1);
            let train = law.group_queries(train_positions, g, 2);
            let mut q = law.group_queries(1, g, 3);
            let noise = gaussian(steps * g * dim, 0.08, 4 + h as u64);
            let mut groups = Vec::with_capacity(steps);
            for s in 0..steps {
                groups.push(q.clone());
                q.iter_mut().zip(&noise[s * g * dim..(s + 1) * g * dim]).for_each(|(a, b)| *a += b);
            }
            Head { keys, train, groups }
        })
        .collect();
    // Exact group top-k of every step (`max_h q_h·k`), for recall.
    let truth: Vec<Vec<Vec<u32>>> = data
        .par_iter()
        .map(|Head { keys, groups, .. }| {
            groups
                .iter()
                .map(|q| {
                    let s: Vec<f32> = keys
                        .chunks_exact(dim)
                        .map(|x| {
                            q.chunks_exact(dim).map(|h| needle_core::kit::dot(h, x)).fold(f32::NEG_INFINITY, f32::max)
                        })
                        .collect();
                    needle_core::attention::top_k(&s, k).unwrap().into_iter().map(|x| x.0).collect()
                })
                .collect()
        })
        .collect();
    println!("heads={heads} keys={n} dim={dim} group={g} k={k} steps={steps}");
    println!(
        "{:<44} {:>9} {:>8} {:>10} {:>9} {:>9} {:>8}",
        "spec", "build s/h", "B/key", "ms/step", "full/sel", "codes/sel", "recall"
    );
    for spec in specs.split(';') {
        // No static part: every key is in the index, so recall is the index's alone.
        let sep = if spec.contains(':') { ',' } else { ':' };
        let factory: Box<dyn SelectorFactory> = needle_select::parse(&format!("{spec}{sep}sinks=0,window=0"))?.factory;
        let t = Instant::now();
        let mut sels: Vec<Box<dyn AttentionSelector>> = data
            .par_iter()
            .enumerate()
            .map(|(h, Head { keys, train, .. })| {
                let head = HeadId { layer: h / 3, kv_head: h % 3 };
                let mut sel = factory.create(head, dim).unwrap();
                let rows = Rows::new("keys", keys, dim).unwrap();
                sel.build(&BuildContext { head, keys: &rows, train_queries: train, scale: 0.125 }).unwrap();
                sel
            })
            .collect();
        let build_s = t.elapsed().as_secs_f64();
        let bytes: usize = sels.iter().map(|s| s.memory_bytes()).sum();
        let (mut sel_s, mut full, mut codes, mut rec) = (0.0, 0u64, 0u64, 0.0);
        let mut out = Selection::default();
        for s in 0..steps {
            let t = Instant::now();
            for ((sel, head), want) in sels.iter_mut().zip(&data).zip(&truth) {
                let rows = Rows::new("keys", &head.keys, dim)?;
                sel.select(&head.groups[s], &rows, &Budget::TopK(k), &mut out)?;
                full += out.stats.full_scored;
                codes += out.stats.codes_scored;
                rec += recall(&out.ids, &want[s]);
            }
            sel_s += t.elapsed().as_secs_f64();
        }
        let per = (steps * heads) as f64;
        println!(
            "{:<44} {:>9.2} {:>8.0} {:>10.2} {:>9.0} {:>9.0} {:>8.4}",
            factory.describe(),
            // Builds run in parallel over the cores: wall seconds × cores per head.
            build_s * rayon::current_num_threads() as f64 / heads as f64,
            bytes as f64 / (heads * n) as f64,
            1e3 * sel_s / steps as f64,
            full as f64 / per,
            codes as f64 / per,
            rec / per
        );
    }
    Ok(())
}
