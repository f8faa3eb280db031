//! `needle bench index`: every index backend on the keys and queries of a `needle trace` file
//! (the benchmark is `needle_eval::bench`; this module parses, runs the peers and prints).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::{Args, Subcommand};
use needle_eval::bench::{IndexBench, equal_recall_ratios, parse_indexes};
use needle_eval::stats::{Row, summarize, table};
use needle_eval::trace::Trace;
use serde_json::json;

/// Default interpreter for `--peers` (the venv of tests/peers/README.md).
const PEERS_PYTHON: &str = "/root/.cache/needle/peersenv/bin/python";

/// Arguments of `needle bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Recall@k, keys scanned, latency and build cost of index backends on a `needle trace` file.
    Index(IndexArgs),
}

/// Runs `needle bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Index(a) => index(a),
    }
}

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

/// Runs the peer script and returns its rows.
fn run_peers(a: &IndexArgs, layers: &[usize], out_dir: &Path) -> Result<Vec<Row>> {
    let script = a
        .peers_script
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/bench_peers.py"));
    ensure!(script.exists(), "--peers-script: {} not found", script.display());
    let out = out_dir.join("needle-peers.json");
    let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    tracing::info!("running {} {}", a.peers_python.display(), script.display());
    let status = Command::new(&a.peers_python)
        .arg(&script)
        .args(["--trace".as_ref(), a.trace.as_os_str()])
        .args(["--k", &a.k.to_string(), "--layers", &join(layers)])
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

/// Runs `needle bench index`.
fn index(a: IndexArgs) -> Result<()> {
    let trace = Trace::read(&a.trace)?;
    let cfg = IndexBench {
        k: a.k,
        layers: a.layers.clone(),
        indexes: parse_indexes(&a.indexes)?,
        graph_efforts: a.graph_efforts.clone(),
        ivf_nprobes: a.ivf_nprobes.clone(),
        lsh_tables: a.lsh_tables.clone(),
        max_train: a.max_train,
    };
    let layers = cfg.check(&trace).with_context(|| a.trace.display().to_string())?;
    let pb = crate::common::progress_bar(0, "builds");
    let t = Instant::now();
    let mut rows = cfg.run(&trace, &mut |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    })?;
    pb.finish_and_clear();
    tracing::info!("needle indexes benched in {:.1}s", t.elapsed().as_secs_f64());
    if a.peers {
        let dir = a.json.as_deref().and_then(Path::parent).map_or_else(std::env::temp_dir, Path::to_path_buf);
        rows.extend(run_peers(&a, &layers, if dir.as_os_str().is_empty() { Path::new(".") } else { &dir })?);
    }
    let summary = summarize(&rows);
    let ratios = equal_recall_ratios(&summary, "faiss/HNSW32", &[0.9, 0.95, 0.99]);
    let (np, ng, kv) = (trace.n_prompt, trace.n_generated, trace.n_kv_heads);
    println!(
        "{} | {np} prompt + {ng} generated tokens, layers {layers:?}, {kv} KV heads, k = {}",
        a.trace.display(),
        a.k
    );
    if let Some(p) = trace.info.get("prefill_seconds") {
        println!("prefill of this context: {p} s");
    }
    print!("{}", table(&summary, a.k));
    if rows.iter().any(|r| r.engine == "faiss" && r.index == "HNSW32") {
        println!("\nkeys scanned at equal recall, faiss/HNSW32 ÷ needle index (higher = needle scans fewer):");
        let pct = |v: Option<f64>| v.map_or("—".into(), |x| format!("{:.3}%", 100.0 * x));
        for r in &ratios {
            let ratio = r.ratio.map_or("—".into(), |x| format!("{x:.2}×"));
            let (ours, theirs) = (pct(r.scanned_frac), pct(r.reference_scanned_frac));
            println!("  {:<22} recall {:.2}: {ours:>9} vs {theirs:>9}  ratio {ratio}", r.index, r.recall);
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
        needle_eval::plot::recall_vs_scanned(&summary, &title, p)
            .with_context(|| format!("--plot: {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn bench_writes_json_and_names_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        Trace::synthetic(&[2, 7], 200, 4).write(&p, false).unwrap();
        let json = dir.path().join("out.json");
        let ps = p.to_str().unwrap();
        let mut a = args(&["--trace", ps, "--k", "5", "--indexes", "Flat,HNSW8", "--graph-efforts", "5,50"]);
        a.json = Some(json.clone());
        index(a).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows: Vec<Row> = serde_json::from_value(v["rows"].clone()).unwrap();
        assert_eq!(rows.len(), 12);
        // Results a user already has are never overwritten.
        let mut again = args(&["--trace", ps, "--k", "5", "--indexes", "Flat"]);
        again.json = Some(json);
        assert!(index(again).is_err());
        let err = |a: IndexArgs| format!("{:#}", index(a).unwrap_err());
        let e = err(args(&["--trace", dir.path().join("missing.safetensors").to_str().unwrap()]));
        assert!(e.contains("missing.safetensors"), "{e}");
        let e = err(args(&["--trace", ps, "--layers", "2,15"]));
        assert!(e.contains("layer 15") && e.contains("layers"), "{e}");
        let e = err(args(&["--trace", ps, "--k", "5", "--indexes", "Nope"]));
        assert!(e.contains("Nope"), "{e}");
    }
}
