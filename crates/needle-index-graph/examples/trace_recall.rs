// # Recall against keys scanned on real attention traces
//
// Reads a `needle trace` safetensors file (`layer.L.keys` f32 `[n_kv_heads, n_tokens, d]`,
// `layer.L.prefill_queries` `[n_prompt, n_q_heads, d]`, `layer.L.decode_queries`
// `[n_generated, n_q_heads, d]`) and, per layer and KV head, builds Flat, HNSW and RoarGraph
// over the head's prefill keys, trains RoarGraph on the prefill queries of the head's GQA group
// and searches the group's decode queries. Prints recall@100 and the share of keys scanned at
// each effort, the build time, and a summary per index (mean over heads).
//
// cargo run --release -p needle-index-graph --example trace_recall -- \
//     /root/.cache/needle/traces/pride-8k-l5-15-25.safetensors [options]
// cargo run --release -p needle-index-graph --example trace_recall -- synth:8192 [options]
//
// Options:
//   --layers 5,15        layers to run (default: all in the file)
//   --heads 0,2          KV heads to run (default: all)
//   --efforts 64,100     RoarGraph efforts (default: 32,48,64,80,100,128,160; below k = 100
//                        the beam is narrower and every scored key is re-ranked)
//   --hnsw-efforts ...   HNSW efforts (default: 100,128,200,300,400,600,800,1200)
//   --roar SPEC;SPEC     RoarGraph variants, each `key=value,...` over RoarGraphParams fields
//                        (default: one variant with the default parameters)
//   --no-hnsw            skip HNSW
//   --all-keys           index every key (default: the prefill keys only, what exists at prefill)
//   --max-test N         decode queries per head at most (default 256)
//   --quiet              only the summary
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/synth.rs"]
mod synth;

use std::collections::BTreeSet;
use std::time::Instant;

use needle_core::{FlatIndex, SearchParams, SearchResult, VectorIndex};
use needle_index_graph::{Hnsw, HnswParams, RoarGraph, RoarGraphParams};
use safetensors::{Dtype, SafeTensors};

const K: usize = 100;

struct Head {
    label: String,
    dim: usize,
    keys: Vec<f32>,
    train: Vec<f32>,
    test: Vec<f32>,
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let data = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => {
            data.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
        }
        other => panic!("tensor {name}: dtype {other:?} not supported (f32, bf16)"),
    };
    (t.shape().to_vec(), v)
}

struct Opts {
    layers: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
    efforts: Vec<usize>,
    hnsw_efforts: Vec<usize>,
    roar: Vec<(String, RoarGraphParams)>,
    hnsw: bool,
    all_keys: bool,
    max_test: usize,
    quiet: bool,
}

fn list(s: &str) -> Vec<usize> {
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.trim().parse().expect("number list")).collect()
}

fn roar_spec(spec: &str) -> RoarGraphParams {
    let mut p = RoarGraphParams::default();
    for kv in spec.split(',').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').expect("key=value");
        let v: usize = v.trim().parse().expect("integer value");
        match k.trim() {
            "m" => p.m = v,
            "n_q" => p.n_q = v,
            "pivots" => p.pivots = v,
            "ef_construction" | "efc" => p.ef_construction = v,
            "ef_search" => p.ef_search = v,
            "max_train" => p.max_train = v,
            "seed" => p.seed = v as u64,
            "clusters" => p.clusters = v,
            "entry_keys" => p.entry_keys = v,
            "probe" => p.probe = v,
            other => panic!("unknown RoarGraph parameter `{other}`"),
        }
    }
    p
}

fn heads_of(path: &str, o: &Opts) -> Vec<Head> {
    if let Some(n) = path.strip_prefix("synth:") {
        let n: usize = n.parse().expect("synth:N");
        let data = synth::AttentionLike::new(64, 7);
        return vec![Head {
            label: format!("synth n={n}"),
            dim: 64,
            keys: data.keys(n, 1),
            train: data.queries(n, 2),
            test: data.queries(o.max_test.min(200), 3),
        }];
    }
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut layers: BTreeSet<usize> = BTreeSet::new();
    for name in st.names() {
        if let Some((l, "keys")) = name.strip_prefix("layer.").and_then(|rest| rest.split_once('.')) {
            layers.insert(l.parse().expect("layer number"));
        }
    }
    let mut out = Vec::new();
    for l in layers {
        if o.layers.as_ref().is_some_and(|ls| !ls.contains(&l)) {
            continue;
        }
        let (ks, keys) = f32s(&st, &format!("layer.{l}.keys"));
        let (ps, pre) = f32s(&st, &format!("layer.{l}.prefill_queries"));
        let (ds, dec) = f32s(&st, &format!("layer.{l}.decode_queries"));
        let (n_kv, n_tok, dim) = (ks[0], ks[1], ks[2]);
        let (n_prompt, n_qh) = (ps[0], ps[1]);
        let n_gen = ds[0];
        let group = n_qh / n_kv;
        let n_keys = if o.all_keys { n_tok } else { n_prompt.min(n_tok) };
        for j in 0..n_kv {
            if o.heads.as_ref().is_some_and(|hs| !hs.contains(&j)) {
                continue;
            }
            let hk = keys[j * n_tok * dim..(j * n_tok + n_keys) * dim].to_vec();
            let pick = |src: &[f32], rows: usize, limit: usize| -> Vec<f32> {
                let mut v = Vec::new();
                for t in 0..rows.min(limit) {
                    for h in j * group..(j + 1) * group {
                        let s = (t * n_qh + h) * dim;
                        v.extend_from_slice(&src[s..s + dim]);
                    }
                }
                v
            };
            let test_steps = o.max_test.div_ceil(group);
            out.push(Head {
                label: format!("L{l} h{j}"),
                dim,
                keys: hk,
                train: pick(&pre, n_prompt, usize::MAX),
                test: pick(&dec, n_gen, test_steps),
            });
        }
    }
    out
}

/// CPU seconds used by this process so far (all threads; Linux `/proc`, else 0): under a
/// shared machine's load, CPU time per build is steadier than wall time.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let after = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields after the name: state(skipped, not numeric) ppid pgrp session tty tpgid flags
    // minflt cminflt majflt cmajflt utime stime: utime/stime are the 11th/12th numeric ones.
    if f.len() > 12 { (f[10] + f[11]) / 100.0 } else { 0.0 }
}

fn recall(truth: &SearchResult, got: &SearchResult, k: usize) -> f64 {
    let mut hit = 0usize;
    for i in 0..truth.n_queries() {
        let t = &truth.labels_of(i)[..k];
        hit += got.labels_of(i).iter().take(k).filter(|l| t.contains(l)).count();
    }
    hit as f64 / (truth.n_queries() * k) as f64
}

/// Per index name: (build seconds per head, per effort (recall, scanned)).
type Curve = Vec<(usize, f64, f64)>;

fn sweep(index: &dyn VectorIndex, h: &Head, truth: &SearchResult, efforts: &[usize]) -> Curve {
    let n = h.keys.len() / h.dim;
    let nq = h.test.len() / h.dim;
    efforts
        .iter()
        .map(|&ef| {
            let r = index.search(&h.test, K, &SearchParams::effort(ef)).unwrap();
            (ef, recall(truth, &r, K), r.stats.full_scored as f64 / (nq * n) as f64)
        })
        .collect()
}

/// Least share scanned at which the curve reaches `target` recall (linear interpolation).
fn scanned_at(curve: &Curve, target: f64) -> Option<f64> {
    let mut prev: Option<(f64, f64)> = None;
    for &(_, r, s) in curve {
        if r >= target {
            return Some(match prev {
                Some((pr, ps)) if r > pr => ps + (s - ps) * (target - pr) / (r - pr),
                _ => s,
            });
        }
        prev = Some((r, s));
    }
    None
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        layers: None,
        heads: None,
        efforts: vec![32, 48, 64, 80, 100, 128, 160],
        hnsw_efforts: vec![100, 128, 200, 300, 400, 600, 800, 1200],
        roar: Vec::new(),
        hnsw: true,
        all_keys: false,
        max_test: 256,
        quiet: false,
    };
    let mut path = String::from("synth:8192");
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || {
            i += 1;
            args.get(i).cloned().unwrap_or_else(|| panic!("{a} needs a value"))
        };
        match a {
            "--layers" => o.layers = Some(list(&val())),
            "--heads" => o.heads = Some(list(&val())),
            "--efforts" => o.efforts = list(&val()),
            "--hnsw-efforts" => o.hnsw_efforts = list(&val()),
            "--roar" => o.roar = val().split(';').map(|s| (s.to_string(), roar_spec(s))).collect(),
            "--no-hnsw" => o.hnsw = false,
            "--all-keys" => o.all_keys = true,
            "--max-test" => o.max_test = val().parse().expect("--max-test N"),
            "--quiet" => o.quiet = true,
            p if !p.starts_with("--") => path = p.to_string(),
            other => panic!("unknown option {other}"),
        }
        i += 1;
    }
    if o.roar.is_empty() {
        o.roar.push(("default".into(), RoarGraphParams::default()));
    }
    let heads = heads_of(&path, &o);
    println!("{path}: {} heads, threads={}", heads.len(), rayon::current_num_threads());
    // name -> (build seconds, curves)
    let mut summary: Vec<(String, Vec<f64>, Vec<Curve>)> = Vec::new();
    let mut record = |name: &str, secs: f64, curve: Curve| {
        if let Some(e) = summary.iter_mut().find(|e| e.0 == name) {
            e.1.push(secs);
            e.2.push(curve);
        } else {
            summary.push((name.to_string(), vec![secs], vec![curve]));
        }
    };
    let mut cpu: Vec<f64> = Vec::new();
    for h in &heads {
        let (n, dim) = (h.keys.len() / h.dim, h.dim);
        let (nt, nq) = (h.train.len() / dim, h.test.len() / dim);
        let mut flat = FlatIndex::new(dim);
        flat.build(&h.keys, None).unwrap();
        let truth = flat.search(&h.test, K, &SearchParams::default()).unwrap();
        if !o.quiet {
            println!("== {}: keys={n} train={nt} test={nq} (Flat scans 100%)", h.label);
        }
        let mut report = |name: String, secs: f64, curve: Curve| {
            if !o.quiet {
                let pts: Vec<String> =
                    curve.iter().map(|(ef, r, s)| format!("ef{ef}:{r:.3}@{:.2}%", s * 100.0)).collect();
                println!("  {name:<40} build {secs:6.2}s  {}", pts.join(" "));
            }
            record(&name, secs, curve);
        };
        if o.hnsw {
            let mut hnsw = Hnsw::new(dim, HnswParams { m: 32, ..Default::default() }).unwrap();
            let t = Instant::now();
            hnsw.build(&h.keys, None).unwrap();
            let secs = t.elapsed().as_secs_f64();
            let c = sweep(&hnsw, h, &truth, &o.hnsw_efforts);
            report("HNSW32".into(), secs, c);
        }
        for (spec, p) in &o.roar {
            let mut roar = RoarGraph::with_params(dim, *p).unwrap();
            let (t, c0) = (Instant::now(), cpu_seconds());
            roar.build(&h.keys, Some(&h.train)).unwrap();
            let secs = t.elapsed().as_secs_f64();
            cpu.push(cpu_seconds() - c0);
            let c = sweep(&roar, h, &truth, &o.efforts);
            report(format!("RoarGraph[{spec}]"), secs, c);
        }
    }
    println!("== summary (mean over {} heads; recall@{K} vs % of keys scanned)", heads.len());
    if !cpu.is_empty() {
        let per = cpu.iter().sum::<f64>() / cpu.len() as f64;
        println!(
            "  RoarGraph builds: {per:.2} CPU-s per head (all variants); 90 heads on 2 idle cores ≈ {:.0} s",
            per * 90.0 / 2.0
        );
    }
    let hnsw_at: Vec<Option<f64>> = [0.9, 0.95]
        .iter()
        .map(|&t| summary.iter().find(|e| e.0 == "HNSW32").and_then(|e| scanned_at(&mean_curve(&e.2), t)))
        .collect();
    for (name, secs, curves) in &summary {
        let c = mean_curve(curves);
        let b = secs.iter().sum::<f64>() / secs.len() as f64;
        let pts: Vec<String> = c.iter().map(|(ef, r, s)| format!("ef{ef}:{r:.3}@{:.2}%", s * 100.0)).collect();
        let min_r = curves.iter().map(|c| c.last().map_or(0.0, |x| x.1)).fold(1.0, f64::min);
        println!("  {name:<40} build {b:6.2}s/head  {}  (worst head at max effort {min_r:.3})", pts.join(" "));
        for (j, t) in [0.9, 0.95].iter().enumerate() {
            if let Some(s) = scanned_at(&c, *t) {
                let vs = hnsw_at[j].map_or(String::from("HNSW n/a"), |h| format!("HNSW/this = {:.2}x", h / s));
                println!("      recall {t}: {:.2}% scanned ({vs})", s * 100.0);
            }
        }
    }
}

fn mean_curve(curves: &[Curve]) -> Curve {
    let n = curves.len() as f64;
    (0..curves[0].len())
        .map(|i| {
            let ef = curves[0][i].0;
            let r = curves.iter().map(|c| c[i].1).sum::<f64>() / n;
            let s = curves.iter().map(|c| c[i].2).sum::<f64>() / n;
            (ef, r, s)
        })
        .collect()
}
