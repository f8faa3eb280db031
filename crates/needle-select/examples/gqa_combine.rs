//! # How should one retrieval serve a GQA group?
//!
//! A KV head's index is searched once per decode step for its whole query group (3 query
//! heads per KV head in SmolLM2). This compares the ways of combining the group's queries
//! ([`GroupCombine`]) by recall of the group's true top-k (top-k by `max_h q_h·k`) against
//! the keys each one scans, over a sweep of the index's effort knob.
//!
//! Steps: make attention-like keys and queries (keys share an offset and outlier dims;
//! queries come from a shifted distribution), build one retrieval selector per strategy,
//! select for each query group at each effort, print recall and keys scanned.
//!
//! `cargo run --release -p needle-select --example gqa_combine [index] [n_keys] [shared_weight] [own_weight]`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, Rows, Selection, metrics::recall};
use needle_select::{GroupCombine, RetrievalFactory, RetrievalSelector};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn main() -> needle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let index = args.get(1).map_or("graph", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8192);
    // Weights of the component the heads of a group share and of each head's own component.
    let shared_w: f32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1.2);
    let own_w: f32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0.8);
    let (dim, g, k, n_groups, n_train) = (64, 3, 100, 40, 1536);
    let mut rng = StdRng::seed_from_u64(7);
    let offset: Vec<f32> = normal(&mut rng, dim).iter().map(|x| x * 0.8).collect();
    let mut keys = normal(&mut rng, n * dim);
    for (i, key) in keys.chunks_exact_mut(dim).enumerate() {
        key.iter_mut().zip(&offset).for_each(|(x, o)| *x = 0.5 * *x + o);
        key[1] += 4.0 * ((i * 7919 % 13) as f32 / 13.0);
    }
    // A shared query direction per group plus a per-head one: heads of a group look alike
    // but not the same, as in GQA models.
    let dir = normal(&mut rng, dim);
    let make_group = |rng: &mut StdRng| -> Vec<f32> {
        let shared = normal(rng, dim);
        let own = normal(rng, g * dim);
        own.chunks_exact(dim)
            .flat_map(|o| {
                (0..dim).map(|d| shared_w * shared[d] + own_w * o[d] + dir[d] - 0.5 * offset[d]).collect::<Vec<_>>()
            })
            .collect()
    };
    let train: Vec<f32> = (0..n_train / g).flat_map(|_| make_group(&mut rng)).collect();
    let groups: Vec<Vec<f32>> = (0..n_groups).map(|_| make_group(&mut rng)).collect();
    let rows = Rows::new("keys", &keys, dim)?;
    let head = HeadId { layer: 0, kv_head: 0 };
    let truth: Vec<Vec<u32>> = groups
        .iter()
        .map(|q| {
            let mut s: Vec<(u32, f32)> = (0..n as u32)
                .map(|p| {
                    let key = &keys[p as usize * dim..(p as usize + 1) * dim];
                    let m = q.chunks_exact(dim).map(|h| h.iter().zip(key).map(|(a, b)| a * b).sum::<f32>());
                    (p, m.fold(f32::NEG_INFINITY, f32::max))
                })
                .collect();
            s.sort_by(|a, b| b.1.total_cmp(&a.1));
            s.into_iter().take(k).map(|x| x.0).collect()
        })
        .collect();
    println!("index={index} keys={n} dim={dim} group={g} k={k} groups={n_groups} shared={shared_w} own={own_w}");
    println!("{:>11} {:>7} {:>8} {:>12} {:>12}", "combine", "effort", "recall", "keys/step", "codes/step");
    // The effort knob is a beam width for graphs (raised to at least k), lists probed for IVF.
    let efforts: &[usize] = if index.starts_with("IVF") || index == "ivfpq" {
        &[1, 2, 4, 8, 16, 32, 64]
    } else {
        &[100, 200, 400, 800, 1600, 3200]
    };
    for combine in GroupCombine::ALL {
        let cfg = RetrievalFactory::new(index)?.with_static(0, 0).with_combine(combine).with_min_index(1);
        let mut sel = RetrievalSelector::new(cfg, head, dim)?;
        sel.build(&BuildContext { head, keys: &rows, train_queries: &train, scale: 0.125 })?;
        for &effort in efforts {
            sel.set_effort(Some(effort));
            let (mut rec, mut scanned, mut codes) = (0.0, 0u64, 0u64);
            let mut out = Selection::default();
            for (q, t) in groups.iter().zip(&truth) {
                sel.select(q, &rows, &Budget::TopK(k), &mut out)?;
                rec += recall(&out.ids, t);
                scanned += out.stats.full_scored;
                codes += out.stats.codes_scored;
            }
            let per = |x: u64| x as f64 / n_groups as f64;
            println!(
                "{:>11} {:>7} {:>8.3} {:>12.0} {:>12.0}",
                combine.name(),
                effort,
                rec / n_groups as f64,
                per(scanned),
                per(codes)
            );
        }
    }
    Ok(())
}
