//! `needle bench index`: every index backend on the keys and queries of a `needle trace` file.
//!
//! Per traced layer and KV head: the head's keys are the database, the GQA group's prefill
//! queries train query-aware indexes, the group's decode queries are the test set, and
//! [`FlatIndex`] gives the exact top-k. Each index is built once per head and searched at each
//! effort of its sweep, single-threaded, so latency is per query.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use needle_core::{FlatIndex, SearchParams, VectorIndex};
use serde_json::json;

use super::plot;
use super::stats::{Row, Summary, curve, per_query_share, points, recalls, scanned_at_recall, summarize, table};
use crate::trace::Trace;

/// Default interpreter for `--peers` (the venv of tests/peers/README.md).
const PEERS_PYTHON: &str = "/root/.cache/needle/peersenv/bin/python";

/// Arguments of `needle bench index`.
#[derive(Args)]
pub struct IndexArgs {
    /// A file written by `needle trace`.
    #[arg(long)]
    pub trace: PathBuf,
    /// Neighbours per query (recall@k).
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Layers to bench (default: every traced layer), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Index factory strings, comma-separated (`IVF256,PQ16` stays one index).
    #[arg(long, default_value = "Flat,RoarGraph32,HNSW32,IVF256,PQ16,LSH10x64")]
    pub indexes: String,
    /// Beam widths swept for graph indexes (values below k act as k).
    #[arg(long, value_delimiter = ',', default_value = "100,128,160,200,256,320,400,512,768,1024")]
    pub graph_efforts: Vec<usize>,
    /// Lists probed swept for IVF indexes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    pub ivf_nprobes: Vec<usize>,
    /// Tables probed swept for LSH indexes.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    pub lsh_tables: Vec<usize>,
    /// Use at most this many training queries per head (evenly strided); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub max_train: usize,
    /// Write every row and the summaries as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw recall against % of keys scanned (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Also run tests/peers/bench_peers.py (faiss, hnswlib) on the same trace and merge its rows.
    #[arg(long)]
    pub peers: bool,
    /// Python interpreter for --peers.
    #[arg(long, default_value = PEERS_PYTHON)]
    pub peers_python: PathBuf,
    /// The peer script (default: tests/peers/bench_peers.py of this source tree).
    #[arg(long)]
    pub peers_script: Option<PathBuf>,
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
        bail!("--indexes: give at least one index (e.g. Flat,RoarGraph32,HNSW32,IVF256,PQ16,LSH10x64)");
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
    idx.with_context(|| format!("--indexes: `{spec}`"))
}

impl IndexArgs {
    /// The efforts swept for an index (`None` = the index has no knob).
    fn sweep(&self, spec: &str) -> Vec<Option<usize>> {
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
}

/// Every `stride`-th row so that at most `max` rows remain (`max == 0` keeps all).
fn stride_rows(xs: Vec<f32>, dim: usize, max: usize) -> Vec<f32> {
    let n = xs.len() / dim;
    if max == 0 || n <= max {
        return xs;
    }
    let stride = n.div_ceil(max);
    xs.chunks_exact(dim).step_by(stride).flatten().copied().collect()
}

/// The layers to bench, each checked against the trace.
fn chosen_layers(trace: &Trace, asked: Option<&[usize]>, file: &Path) -> Result<Vec<usize>> {
    let all: Vec<usize> = trace.layers.iter().map(|l| l.layer).collect();
    let layers = asked.map_or(all, <[usize]>::to_vec);
    for &l in &layers {
        trace.layer(l).with_context(|| format!("--layers: {}", file.display()))?;
    }
    Ok(layers)
}

/// Benches every index on one (layer, head); pushes one row per effort.
#[allow(clippy::too_many_arguments)]
fn bench_head(
    a: &IndexArgs,
    trace: &Trace,
    layer: usize,
    kv_head: usize,
    specs: &[String],
    single: &rayon::ThreadPool,
    pb: &ProgressBar,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let d = trace.head_dim;
    let l = trace.layer(layer)?;
    let keys = trace.keys(l, kv_head);
    let train = stride_rows(trace.group_queries(&l.prefill_queries, kv_head), d, a.max_train);
    let test = trace.group_queries(&l.decode_queries, kv_head);
    let (n_keys, n_test) = (keys.len() / d, test.len() / d);
    ensure!(n_test > 0, "{}: layer {layer} has no decode queries (trace with --generate > 0)", a.trace.display());
    let mut flat = FlatIndex::new(d);
    flat.build(keys, None)?;
    let truth = flat.search(&test, a.k, &SearchParams::default()).with_context(|| format!("--k {}", a.k))?;
    for spec in specs {
        pb.set_message(format!("L{layer} h{kv_head} {spec}"));
        let mut idx = make_index(d, spec)?;
        let built = idx
            .build(keys, Some(&train))
            .with_context(|| format!("building {spec} on layer {layer} head {kv_head}"))?;
        let bytes_per_key = idx.memory_bytes() as f64 / n_keys as f64;
        for effort in a.sweep(spec) {
            let params = SearchParams { effort };
            let t = Instant::now();
            let found = single
                .install(|| idx.search(&test, a.k, &params))
                .with_context(|| format!("searching {spec} (effort {effort:?}) on layer {layer} head {kv_head}"))?;
            let secs = t.elapsed().as_secs_f64();
            let r = recalls(&found, &truth)?;
            rows.push(Row {
                engine: "needle".into(),
                index: idx.describe(),
                layer,
                kv_head,
                effort,
                recall: r.iter().sum::<f64>() / r.len() as f64,
                min_query_recall: r.iter().copied().fold(1.0, f64::min),
                scanned_frac: per_query_share(found.stats.full_scored, n_test, n_keys),
                codes_frac: per_query_share(found.stats.codes_scored, n_test, n_keys),
                latency_us: 1e6 * secs / n_test as f64,
                build_s: built.seconds,
                bytes_per_key,
                n_keys,
                n_queries: n_test,
                scanned_note: None,
            });
        }
        pb.inc(1);
    }
    Ok(())
}

/// Runs the peer script and returns its rows.
fn run_peers(a: &IndexArgs, layers: &[usize], out_dir: &Path) -> Result<Vec<Row>> {
    let script = a
        .peers_script
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/bench_peers.py"));
    ensure!(script.exists(), "--peers-script: {} not found", script.display());
    let out = out_dir.join("needle-peers.json");
    let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let layers = join(layers);
    tracing::info!("running {} {}", a.peers_python.display(), script.display());
    let status = Command::new(&a.peers_python)
        .arg(&script)
        .args(["--trace".as_ref(), a.trace.as_os_str()])
        .args(["--k", &a.k.to_string(), "--layers", &layers])
        .args(["--graph-efforts", &join(&a.graph_efforts), "--ivf-nprobes", &join(&a.ivf_nprobes)])
        .args(["--json".as_ref(), out.as_os_str()])
        // Its own table would repeat the merged one; progress still shows on stderr.
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| {
            format!("--peers-python: running {} (see tests/peers/README.md for the venv)", a.peers_python.display())
        })?;
    ensure!(status.success(), "peer script {} failed ({status})", script.display());
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
    serde_json::from_value(v["rows"].clone()).with_context(|| format!("{}: `rows`", out.display()))
}

/// Keys scanned at equal mean recall: faiss HNSW's share over each needle index's share.
pub fn equal_recall_ratios(summary: &[Summary], reference: &str, targets: &[f64]) -> Vec<serde_json::Value> {
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
            out.push(json!({
                "index": name, "reference": reference, "recall": t,
                "scanned_frac": ours, "reference_scanned_frac": theirs,
                "ratio": ours.zip(theirs).and_then(|(o, r)| (o > 0.0).then_some(r / o)),
            }));
        }
    }
    out
}

/// Runs `needle bench index`.
pub fn run(a: IndexArgs) -> Result<()> {
    ensure!(a.k > 0, "--k must be at least 1");
    let trace = Trace::read(&a.trace)?;
    let layers = chosen_layers(&trace, a.layers.as_deref(), &a.trace)?;
    if a.k > trace.n_tokens() {
        bail!("--k {} is larger than the {} keys per head in {}", a.k, trace.n_tokens(), a.trace.display());
    }
    let specs = parse_indexes(&a.indexes)?;
    for s in &specs {
        make_index(trace.head_dim, s)?;
    }
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("building a 1-thread pool")?;
    let jobs = layers.len() * trace.n_kv_heads * specs.len();
    let pb = ProgressBar::new(jobs as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} builds {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let t = Instant::now();
    let mut rows = Vec::new();
    for &layer in &layers {
        for h in 0..trace.n_kv_heads {
            bench_head(&a, &trace, layer, h, &specs, &single, &pb, &mut rows)?;
        }
    }
    pb.finish_and_clear();
    tracing::info!("needle indexes benched in {:.1}s", t.elapsed().as_secs_f64());
    if a.peers {
        let dir = a.json.as_deref().and_then(Path::parent).map_or_else(std::env::temp_dir, Path::to_path_buf);
        rows.extend(run_peers(&a, &layers, if dir.as_os_str().is_empty() { Path::new(".") } else { &dir })?);
    }
    let summary = summarize(&rows);
    let ratios = equal_recall_ratios(&summary, "faiss/HNSW32", &[0.9, 0.95, 0.99]);
    println!(
        "{} | {} prompt + {} generated tokens, layers {:?}, {} KV heads, k = {}",
        a.trace.display(),
        trace.n_prompt,
        trace.n_generated,
        layers,
        trace.n_kv_heads,
        a.k
    );
    if let Some(p) = trace.info.get("prefill_seconds") {
        println!("prefill of this context: {p} s");
    }
    print!("{}", table(&summary, a.k));
    if rows.iter().any(|r| r.engine == "faiss" && r.index == "HNSW32") {
        println!("\nkeys scanned at equal recall, faiss/HNSW32 ÷ needle index (higher = needle scans fewer):");
        for r in &ratios {
            let f = |v: &serde_json::Value| v.as_f64().map_or("—".into(), |x| format!("{:.3}%", 100.0 * x));
            println!(
                "  {:<22} recall {:.2}: {:>9} vs {:>9}  ratio {}",
                r["index"].as_str().unwrap_or(""),
                r["recall"].as_f64().unwrap_or(0.0),
                f(&r["scanned_frac"]),
                f(&r["reference_scanned_frac"]),
                r["ratio"].as_f64().map_or("—".into(), |x| format!("{x:.2}×"))
            );
        }
    }
    if let Some(p) = &a.json {
        let v = json!({
            "trace": a.trace.display().to_string(),
            "trace_info": trace.info,
            "n_prompt": trace.n_prompt,
            "n_generated": trace.n_generated,
            "k": a.k,
            "layers": layers,
            "rows": rows,
            "summary": summary,
            "equal_recall_vs_faiss_hnsw": ratios,
        });
        crate::common::write_new(p, &serde_json::to_string_pretty(&v)?).context("--json")?;
    }
    if let Some(p) = &a.plot {
        let title = format!("recall@{} vs keys scanned — {} tokens", a.k, trace.n_tokens());
        plot::recall_vs_scanned(&summary, &title, p).with_context(|| format!("--plot: {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::synthetic;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: IndexArgs,
    }

    fn args(extra: &[&str]) -> IndexArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).a
    }

    #[test]
    fn index_lists_keep_ivf_pq_together() {
        assert_eq!(
            parse_indexes("flat, RoarGraph32,HNSW32,IVF256,PQ16,LSH10x64").unwrap(),
            vec!["flat", "RoarGraph32", "HNSW32", "IVF256,PQ16", "LSH10x64"]
        );
        assert_eq!(parse_indexes("PQ8,IVF16,PQ4").unwrap(), vec!["PQ8", "IVF16,PQ4"]);
        assert!(parse_indexes(" , ").is_err());
        let e = format!("{:#}", make_index(64, "Bogus7").err().unwrap());
        assert!(e.contains("Bogus7"), "{e}");
    }

    #[test]
    fn bench_runs_on_a_synthetic_trace_and_flat_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        synthetic(&[2, 7], 200, 4).write(&p, false).unwrap();
        let json = dir.path().join("out.json");
        let mut a = args(&["--trace", p.to_str().unwrap(), "--k", "5", "--indexes", "Flat,HNSW8"]);
        a.graph_efforts = vec![5, 50];
        a.json = Some(json.clone());
        run(a).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows: Vec<Row> = serde_json::from_value(v["rows"].clone()).unwrap();
        // 2 layers × 2 KV heads × (Flat + 2 efforts).
        assert_eq!(rows.len(), 12);
        for r in rows.iter().filter(|r| r.index == "Flat") {
            assert_eq!(r.recall, 1.0);
            assert!((r.scanned_frac - 1.0).abs() < 1e-12);
            assert_eq!(r.n_keys, 204);
            assert_eq!(r.n_queries, 4 * 3);
        }
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        synthetic(&[5], 20, 2).write(&p, false).unwrap();
        let ps = p.to_str().unwrap();
        let err = |a: IndexArgs| format!("{:#}", run(a).unwrap_err());
        let e = err(args(&["--trace", dir.path().join("missing.safetensors").to_str().unwrap()]));
        assert!(e.contains("missing.safetensors"), "{e}");
        let e = err(args(&["--trace", ps, "--layers", "5,15"]));
        assert!(e.contains("layer 15") && e.contains("--layers"), "{e}");
        let e = err(args(&["--trace", ps, "--k", "100"]));
        assert!(e.contains("--k 100") && e.contains("22 keys"), "{e}");
        let e = err(args(&["--trace", ps, "--k", "5", "--indexes", "Nope"]));
        assert!(e.contains("Nope"), "{e}");
    }
}
