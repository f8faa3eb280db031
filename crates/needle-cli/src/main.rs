//! `needle`: run a real model on a long document with retrieval attention, and measure it.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use needle_model::{Cpu, GenerateConfig, KvCache, Llama, SamplingConfig, generate, selector_from_spec};

#[derive(Parser)]
#[command(name = "needle", version, about = "Long-context inference with retrieval attention")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or a long document) and report speed and memory.
    Generate(GenerateArgs),
    /// Print the top-K next-token logits of a prompt's last position (for cross-checks).
    Logits(LogitsArgs),
    /// Fetch the default model into the cache (as `cargo xtask fetch-model`).
    FetchModel,
}

#[derive(Args)]
struct ModelArgs {
    /// `default` (SmolLM2-135M-Instruct Q4_1, fetched if absent), a .gguf file, or a Hugging Face folder.
    #[arg(long, default_value = "default")]
    model: String,
}

#[derive(Args)]
struct PromptArgs {
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt (e.g. a long document) from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Keep only the first N tokens of the prompt text (before the question is added).
    #[arg(long)]
    context_tokens: Option<usize>,
    /// A question appended after the prompt text.
    #[arg(long)]
    question: Option<String>,
    /// Wrap the prompt in the model's ChatML template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Attention selector spec, e.g. `full`.
    #[arg(long, default_value = "full")]
    selector: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the K most likely tokens when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f32>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Print one JSON object (text, token ids, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// How many top logits to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "needle=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(a) => run_generate(a),
        Command::Logits(a) => run_logits(a),
        Command::FetchModel => {
            let p = needle_fetch::ensure_default_model()?;
            eprintln!("model ready: {}", p.display());
            Ok(())
        }
    }
}

fn model_path(spec: &str) -> Result<PathBuf> {
    if spec == "default" {
        return needle_fetch::ensure_default_model().context("getting the default model");
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        bail!("model `{spec}` not found: pass `default`, a .gguf file, or a Hugging Face folder");
    }
    Ok(p)
}

struct Loaded {
    model: Llama<Cpu>,
    tokenizer: needle_loader::Tokenizer,
}

fn load(spec: &str) -> Result<Loaded> {
    let path = model_path(spec)?;
    let t = Instant::now();
    let ck = needle_loader::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let model = Llama::<Cpu>::load(&ck, &Default::default())?;
    let tokenizer = ck.tokenizer()?;
    tracing::info!("loaded {} in {:.1}s", ck.describe(), t.elapsed().as_secs_f64());
    Ok(Loaded { model, tokenizer })
}

fn prompt_tokens(p: &PromptArgs, tok: &needle_loader::Tokenizer) -> Result<Vec<u32>> {
    let text = match (&p.prompt, &p.prompt_file) {
        (Some(s), None) => s.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => bail!("give --prompt or --prompt-file"),
        (Some(_), Some(_)) => bail!("give only one of --prompt and --prompt-file"),
    };
    let mut text = text;
    if let Some(n) = p.context_tokens {
        let ids = tok.encode(&text, false)?;
        if ids.len() > n {
            text = tok.decode(&ids[..n])?;
        }
    }
    if let Some(q) = &p.question {
        text = format!("{text}\n\n{q}");
    }
    if p.chat {
        text = tok.chat_prompt(p.system.as_deref(), &text);
    }
    let ids = tok.encode(&text, p.chat)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    Ok(ids)
}

fn progress_bar(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Peak resident memory of this process in bytes (Linux), if known.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let Loaded { model, tokenizer } = load(&a.model.model)?;
    let prompt = prompt_tokens(&a.prompt, &tokenizer)?;
    let (factory, sel) = selector_from_spec(&a.selector)?;
    let cfg = model.config();
    let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
    let gen_cfg = GenerateConfig {
        max_tokens: a.max_tokens,
        sampling: SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        stop: a.stop.clone(),
        chunk: a.chunk,
    };
    if prompt.len() > model.max_positions() {
        tracing::warn!(
            "prompt of {} tokens is past the model's trained length of {}",
            prompt.len(),
            model.max_positions()
        );
    }
    let pb = progress_bar(prompt.len(), "prefill");
    let mut stdout = std::io::stdout();
    let json = a.json;
    let mut on_text = |s: &str| {
        if !json {
            let _ = write!(stdout, "{s}");
            let _ = stdout.flush();
        }
    };
    let out = generate(&model, &tokenizer, &prompt, &mut cache, &gen_cfg, &mut on_text, &mut |done, _| {
        pb.set_position(done as u64);
        if done == prompt.len() {
            pb.finish_and_clear();
        }
    })?;
    let (kv_bytes, sel_bytes) = cache.memory_bytes();
    if json {
        let v = serde_json::json!({
            "model": a.model.model,
            "selector": a.selector,
            "prompt_tokens": out.prompt_tokens,
            "text": out.text,
            "token_ids": out.tokens,
            "stop_reason": out.stop_reason,
            "prefill_seconds": out.prefill_secs,
            "decode_seconds": out.decode_secs,
            "prefill_tokens_per_second": out.prefill_tps(),
            "decode_tokens_per_second": out.decode_tps(),
            "share_of_keys_touched": out.stats.share_touched(),
            "stats": out.stats,
            "kv_cache_bytes": kv_bytes,
            "selector_bytes": sel_bytes,
            "peak_rss_bytes": peak_rss(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "\n[needle] context {} tokens | prefill {:.1} tok/s ({:.2}s) | decode {:.1} tok/s ({} tokens, {:.2}s) | selector {} | keys touched {:.1}% | KV {:.0} MiB, selector {:.1} MiB, peak RSS {}",
            out.prompt_tokens + out.tokens.len(),
            out.prefill_tps(),
            out.prefill_secs,
            out.decode_tps(),
            out.tokens.len(),
            out.decode_secs,
            a.selector,
            100.0 * out.stats.share_touched(),
            mib(kv_bytes as u64),
            mib(sel_bytes as u64),
            peak_rss().map_or("n/a".into(), |b| format!("{:.0} MiB", mib(b))),
        );
    }
    Ok(())
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let Loaded { model, tokenizer } = load(&a.model.model)?;
    let prompt = prompt_tokens(&a.prompt, &tokenizer)?;
    let (factory, sel) = selector_from_spec("full")?;
    let cfg = model.config();
    let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
    let pb = progress_bar(prompt.len(), "prefill");
    let logits =
        model.prefill(&prompt, &mut cache, a.chunk, &[prompt.len() - 1], &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let top = needle_core::attention::top_k(&logits, a.top.min(logits.len()))?;
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": prompt,
            "top": top.iter().map(|(i, l)| serde_json::json!({"id": i, "logit": l, "token": tokenizer.decode(&[*i]).unwrap_or_default()})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("prompt: {} tokens", prompt.len());
        for (i, l) in top {
            println!("{i:>6} {l:>10.4} {:?}", tokenizer.decode(&[i]).unwrap_or_default());
        }
    }
    Ok(())
}
