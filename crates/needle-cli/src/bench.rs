//! `needle bench index`: every index backend on the keys and queries of a `needle trace` file
//! (the benchmark is `needle_eval::bench`; this module parses, runs the peers and prints).
//! `needle bench model`: prefill and decode speed of a random-weight model of a real shape.
//! `needle bench decode`: decode speed and its profile from a context saved by `needle prefill`.

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
    /// Prefill and decode tokens/s and memory of a random-weight model of a real shape
    /// (`llama3-8b`, `qwen2.5-7b`, `qwen3-8b`, `smollm2-135m`), built in memory: no download.
    Model(ModelBenchArgs),
    /// Decode tokens/s and where a step's time goes (weights, attention, walk, insert, other),
    /// decoding from a context saved by `needle prefill --save`: a change to the selectors is
    /// measured in seconds, without a prefill.
    Decode(DecodeBenchArgs),
}

/// Runs `needle bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Index(a) => index(a),
        BenchCommand::Model(a) => crate::common::on_device!(a.device, |B, device| model::<B>(a, &device)),
        BenchCommand::Decode(a) => crate::common::on_device!(a.model.device, |B, device| decode::<B>(a, &device)),
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
    /// Peer engines to run with --peers, comma-separated: faiss-hnsw, faiss-ivfpq, hnswlib.
    #[arg(long, default_value = "faiss-hnsw,faiss-ivfpq,hnswlib")]
    pub peers_engines: String,
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
        .args(["--engines", &a.peers_engines])
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

/// Arguments of `needle bench model`.
#[derive(Args)]
pub struct ModelBenchArgs {
    /// The model's shape: a config preset (llama3-8b, qwen2.5-7b, qwen3-8b, smollm2-135m).
    #[arg(long)]
    pub shape: String,
    /// Prompt tokens to prefill (random ids).
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Selector spec (`auto`: retrieval from 2,048 tokens, full below).
    #[arg(long, default_value = "auto")]
    pub selector: String,
    /// Block type of the linear weights and the embedding: q4_k, q4_0, q8_0, f16 or f32 (rows
    /// that are not a whole number of blocks fall back to q8_0, then f32).
    #[arg(long, default_value = "q4_k")]
    pub quant: String,
    /// Seed of the weights and the prompt.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Prefill chunk size.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Precision of the KV cache's host pages.
    #[arg(long, default_value = "f32")]
    pub kv: needle_model::KvDtype,
    /// Also write the result as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Backend to run on (`wgpu`/`cuda` need the binary's features of those names).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::common::DeviceKind,
}

fn parse_quant(s: &str) -> Result<needle_model::QuantType> {
    use needle_model::QuantType as Q;
    Ok(match s.to_ascii_lowercase().as_str() {
        "q4_k" => Q::Q4_K,
        "q4_0" => Q::Q4_0,
        "q8_0" => Q::Q8_0,
        "f16" => Q::F16,
        "f32" => Q::F32,
        other => anyhow::bail!("unknown --quant {other:?} (q4_k, q4_0, q8_0, f16, f32)"),
    })
}

/// Runs `needle bench model`: build, prefill `--context` random tokens, decode `--decode` greedily.
fn model<B: needle_model::NeedleBackend>(a: ModelBenchArgs, device: &B::Device) -> Result<()> {
    use needle_model::{KvCache, Llama, argmax, compose};
    use needle_select::resolve_auto;
    ensure!(a.context > 0, "--context must be at least 1");
    let cfg = needle_loader::LlamaConfig::preset(&a.shape)?;
    let quant = parse_quant(&a.quant)?;
    let t0 = Instant::now();
    let model = Llama::<B>::random(&cfg, quant, a.seed, device)
        .with_context(|| format!("building a random {} model", a.shape))?;
    let build_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "{}: {} layers, hidden {}, {} q / {} kv heads, vocab {}; weights {:.2} GiB ({}) made in {build_s:.1} s",
        a.shape,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        model.weight_bytes() as f64 / (1u64 << 30) as f64,
        a.quant
    );
    let spec = resolve_auto(&a.selector, a.context);
    let (factory, mut sel) = compose(needle_select::parse(&spec)?);
    sel.kv = a.kv;
    let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
    // SplitMix64 over the seed: the same prompt for every run of a seed.
    let mut s = a.seed ^ 0x5EED;
    let prompt: Vec<u32> = (0..a.context)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % cfg.vocab_size as u64) as u32
        })
        .collect();
    let t0 = Instant::now();
    let logits = model.prefill(&prompt, &mut cache, a.chunk, &[a.context - 1], &mut |_, _| {})?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut next = argmax(&logits).context("empty logits")?;
    let t0 = Instant::now();
    for _ in 0..a.decode {
        next = argmax(&model.decode(next, &mut cache)?).context("empty logits")?;
    }
    let decode_s = t0.elapsed().as_secs_f64();
    let (kv_bytes, selector_bytes) = cache.memory_bytes();
    let rss = crate::common::peak_rss();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let prefill_tps = a.context as f64 / prefill_s;
    let decode_tps = if a.decode > 0 { a.decode as f64 / decode_s } else { 0.0 };
    println!(
        "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} |",
        a.shape,
        a.quant,
        a.context,
        spec,
        prefill_tps,
        decode_tps,
        gib(model.weight_bytes() as u64),
        gib((kv_bytes + selector_bytes) as u64),
        rss.map_or("?".into(), |r| format!("{:.2}", gib(r)))
    );
    if let Some(path) = &a.json {
        let v = json!({
            "shape": a.shape, "quant": a.quant, "context": a.context, "decode_tokens": a.decode, "selector": spec,
            "kv": format!("{:?}", a.kv), "device": format!("{:?}", a.device).to_ascii_lowercase(), "seed": a.seed, "chunk": a.chunk, "build_seconds": build_s,
            "prefill_seconds": prefill_s, "prefill_tokens_per_second": prefill_tps,
            "decode_seconds": decode_s, "decode_tokens_per_second": decode_tps,
            "weight_bytes": model.weight_bytes(), "kv_bytes": kv_bytes, "selector_bytes": selector_bytes,
            "peak_rss_bytes": rss, "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
        });
        crate::common::write_new(path, &serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Arguments of `needle bench decode`.
#[derive(Args)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    pub model: crate::common::ModelArgs,
    /// A context saved by `needle prefill --save`, made with this `--model`.
    #[arg(long)]
    pub context: PathBuf,
    /// A question fed (as an extension) before decoding; none: decode right after the context.
    #[arg(long)]
    pub question: Option<String>,
    /// Tokens to decode (greedy) per run.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Runs, each from a freshly loaded context; the fastest is reported (interference on a
    /// shared machine only slows a run down).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Sequences decoded together (`Llama::decode_batch`, as `needle serve --parallel` runs
    /// them), comma-separated: each count is run from the same context and reported against the
    /// first (`--streams 1,2,4`: total tokens/s of 2 and 4 sequences against one, in one run).
    /// Every stream must decode the tokens a lone decode does.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub streams: Vec<usize>,
    /// Also write the result as JSON (a new file).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A run (or the fastest of `--repeat`) of `n` streams: total tokens/s, the batch's step profile
/// (its caches' shares added up), the tokens (of every stream), and the context.
struct StreamsRun {
    tps: f64,
    profile: needle_model::DecodeProfile,
    tokens: Vec<u32>,
    info: needle_model::context::ContextInfo,
    context_tokens: usize,
}

/// Runs `needle bench decode`: load the context, extend the question, decode greedily; best of
/// `--repeat` runs, for each `--streams` count.
fn decode<B: needle_model::NeedleBackend>(a: DecodeBenchArgs, device: &B::Device) -> Result<()> {
    use crate::common::{Loaded, load_on, model_digest, progress_bar};
    ensure!(a.tokens > 0, "--tokens must be at least 1");
    ensure!(a.repeat > 0, "--repeat must be at least 1");
    ensure!(!a.streams.is_empty() && !a.streams.contains(&0), "--streams: counts of at least 1");
    if let Some(p) = a.json.as_ref().filter(|p| p.exists()) {
        anyhow::bail!("--json {}: the file exists (an existing file is never overwritten)", p.display());
    }
    let Loaded { model, tokenizer } = load_on::<B>(&a.model.model, a.model.weights, device)?;
    let digest = model_digest(&a.model.model)?;
    let pb = progress_bar(a.repeat * a.streams.len(), "bench decode");
    // The counts take turns, repeat after repeat, so that a slow spell of the machine falls on
    // all of them rather than on one count's runs: their ratios are what a run reports.
    let mut runs: Vec<(usize, StreamsRun)> = Vec::new();
    for _ in 0..a.repeat {
        for (i, &n) in a.streams.iter().enumerate() {
            let run = decode_streams(&a, &model, &tokenizer, &digest, n)?;
            pb.inc(1);
            if let Some((n0, first)) = runs.first() {
                ensure!(first.tokens == run.tokens, "{n} streams decoded other tokens than {n0} stream(s)");
            }
            match runs.get_mut(i) {
                None => runs.push((n, run)),
                Some((_, best)) if run.tps > best.tps => *best = run,
                Some(_) => {}
            }
        }
    }
    pb.finish_and_clear();
    let (n0, first) = &runs[0];
    for (n, r) in &runs {
        let ratio = if runs.len() > 1 { format!(" ({:.2}x {n0} stream(s))", r.tps / first.tps) } else { String::new() };
        eprintln!(
            "{}: {} tokens, selector {}, kv {} | {n} stream(s): decode {:.1} tok/s in all{ratio} (best of {}) | {}",
            a.context.display(),
            r.context_tokens,
            r.info.selector,
            r.info.kv,
            r.tps,
            a.repeat,
            crate::generate::profile_line(&r.profile)
        );
    }
    if let Some(path) = &a.json {
        let mut v = json!({
            "context": a.context, "context_tokens": first.context_tokens, "selector": first.info.selector,
            "kv": first.info.kv.to_string(), "decode_tokens": a.tokens, "repeat": a.repeat,
            "decode_tokens_per_second": first.tps, "decode_profile": first.profile, "token_ids": first.tokens,
        });
        if runs.len() > 1 || *n0 != 1 {
            v["streams"] = runs
                .iter()
                .map(|(n, r)| {
                    json!({
                        "streams": n, "decode_tokens_per_second": r.tps, "ratio": r.tps / first.tps,
                        "decode_profile": r.profile,
                    })
                })
                .collect();
        }
        crate::common::write_new(path, &serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// One run of `n` sequences decoded together from the context.
fn decode_streams<B: needle_model::NeedleBackend>(
    a: &DecodeBenchArgs,
    model: &needle_model::Llama<B>,
    tokenizer: &needle_loader::Tokenizer,
    digest: &str,
    n: usize,
) -> Result<StreamsRun> {
    use crate::common::context_question;
    use needle_model::{DecodeStats, argmax, context};
    let mut caches = Vec::with_capacity(n);
    let mut first = None;
    for _ in 0..n {
        let saved = context::load(&a.context, model, digest, a.model.weights.name(), &needle_select::parse)
            .with_context(|| format!("--context {}", a.context.display()))?;
        let mut cache = saved.cache;
        a.model.apply_kv_budget(&mut cache)?;
        let ids = context_question(tokenizer, a.question.as_deref(), &saved.info)?;
        let logits =
            if ids.is_empty() { saved.last_logits } else { model.extend(&ids, &mut cache, 512, &mut |_, _| {})? };
        // Extending may have run one-token decode steps: profile the timed steps only.
        cache.stats = Default::default();
        caches.push(cache);
        first.get_or_insert((argmax(&logits).context("empty logits")?, saved.info, saved.tokens.len() + ids.len()));
    }
    let (token, info, context_tokens) = first.context("no stream")?;
    let mut next = vec![token; n];
    let mut tokens = Vec::with_capacity(a.tokens);
    let t0 = Instant::now();
    for _ in 0..a.tokens {
        tokens.push(next[0]);
        ensure!(next.iter().all(|&t| t == next[0]), "streams from one context decoded different tokens");
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let logits =
            if n == 1 { vec![model.decode(next[0], refs[0])?] } else { model.decode_batch(&next, &mut refs)? };
        next = logits.iter().map(|l| argmax(l).context("empty logits")).collect::<Result<_>>()?;
    }
    let tps = (n * a.tokens) as f64 / t0.elapsed().as_secs_f64();
    // The caches' shares of each step add up to the batch's step.
    let mut total = DecodeStats { steps: caches[0].stats.steps, ..Default::default() };
    for c in &caches {
        let (t, s) = (&mut total.step_times, &c.stats.step_times);
        (t.step, t.weights, t.attention) = (t.step + s.step, t.weights + s.weights, t.attention + s.attention);
        (t.walk, t.insert) = (t.walk + s.walk, t.insert + s.insert);
    }
    Ok(StreamsRun { tps, profile: total.profile(), tokens, info, context_tokens })
}
