//! `needle generate`: stream a generation and report speed, keys touched and memory.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use needle_model::NeedleBackend;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use needle_model::context;
use needle_model::{GenerateConfig, Generation, KvCache, SamplingConfig, generate, generate_from, prefill_then_extend};
use needle_select::{AUTO_RETRIEVAL_FROM, resolve_auto};

use crate::common::{
    Loaded, ModelArgs, PromptArgs, context_prompt, context_question, load_on, model_digest, new_cache, peak_rss,
    progress_bar, prompt_tokens, question_tokens,
};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Attention selector spec, e.g. `retrieval:k=100`, `full`, `quest:k=256` (see `needle eval
    /// --help`). `auto` is retrieval from 2,048 context tokens on and full attention below.
    #[arg(long, default_value = "auto")]
    pub selector: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the K most likely tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object (text, token ids, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Continue from a context saved by `needle prefill` (its selector and KV precision) and
    /// ask it --question, instead of prefilling a prompt.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file", "document", "context_tokens"])]
    pub context: Option<PathBuf>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    crate::common::on_device!(a.model.device, |B, device| run_on::<B>(a, &device))
}

fn run_on<B: NeedleBackend>(mut a: GenerateArgs, device: &B::Device) -> Result<()> {
    let Loaded { model, tokenizer } = load_on::<B>(&a.model.model, a.model.weights, device)?;
    let gen_cfg = GenerateConfig {
        max_tokens: a.max_tokens,
        sampling: SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        stop: a.stop.clone(),
        chunk: a.chunk,
    };
    if let Some(path) = a.context.clone() {
        let t = Instant::now();
        let saved =
            context::load(&path, &model, &model_digest(&a.model.model)?, a.model.weights.name(), &needle_select::parse)
                .with_context(|| format!("--context {}", path.display()))?;
        let (load_s, mut cache) = (t.elapsed().as_secs_f64(), saved.cache);
        a.model.apply_kv_budget(&mut cache)?;
        let kv = a.model.kv.map(|k| k.to_string());
        for (flag, asked, file) in [
            ("--selector", Some(&a.selector).filter(|s| *s != "auto"), saved.info.selector.clone()),
            ("--kv", kv.as_ref(), saved.info.kv.to_string()),
        ] {
            if let Some(asked) = asked.filter(|s| **s != file) {
                bail!("{flag} {asked}: the context was saved with `{file}`; prefill it again to change it");
            }
        }
        let ids = context_question(&tokenizer, a.prompt.question.as_deref(), &saved.info)?;
        let logits =
            if ids.is_empty() { saved.last_logits } else { model.extend(&ids, &mut cache, a.chunk, &mut |_, _| {})? };
        tracing::info!(
            "context {} loaded in {load_s:.2}s ({} tokens), question {} tokens",
            path.display(),
            saved.tokens.len(),
            ids.len()
        );
        a.selector = saved.info.selector;
        let n = saved.tokens.len() + ids.len();
        let mut on_text = stream_text(a.json);
        let out = generate_from(
            &model,
            &tokenizer,
            logits,
            n,
            t.elapsed().as_secs_f64(),
            &mut cache,
            &gen_cfg,
            &mut on_text,
        )?;
        return report(&a, &out, &cache, Some(load_s));
    }
    // A question after a document is the context path's computation (prefill the document,
    // build, extend with the question), so that asking directly and asking a saved context of
    // the same document give the same tokens.
    let (prompt, question) = match a.prompt.question.as_deref() {
        Some(q) => {
            let (doc, suffix) = context_prompt(&a.prompt, &tokenizer)?;
            let q = question_tokens(&tokenizer, Some(q), &suffix)?;
            (doc, q)
        }
        None => (prompt_tokens(&a.prompt, &tokenizer)?, Vec::new()),
    };
    let asked = a.selector.clone();
    a.selector = resolve_auto(&asked, prompt.len());
    if asked != a.selector {
        let why = if prompt.len() >= AUTO_RETRIEVAL_FROM { "≥" } else { "<" };
        tracing::info!("selector auto → {} ({} prompt tokens {why} {AUTO_RETRIEVAL_FROM})", a.selector, prompt.len());
    }
    let mut cache = new_cache(&model, &a.selector, &a.model)?;
    a.model.apply_kv_budget(&mut cache)?;
    let total = prompt.len() + question.len();
    if total > model.max_positions() {
        tracing::warn!("prompt of {total} tokens is past the model's trained length of {}", model.max_positions());
    }
    let pb = progress_bar(prompt.len(), "prefill");
    let mut on_text = stream_text(a.json);
    let mut progress = |done: usize, _: usize| {
        pb.set_position(done as u64);
        if done == prompt.len() {
            pb.finish_and_clear();
        }
    };
    let out = if question.is_empty() {
        generate(&model, &tokenizer, &prompt, &mut cache, &gen_cfg, &mut on_text, &mut progress)?
    } else {
        let t = Instant::now();
        let logits = prefill_then_extend(&model, &prompt, &question, &mut cache, a.chunk, &mut progress)?;
        let prefill_s = t.elapsed().as_secs_f64();
        generate_from(&model, &tokenizer, logits, total, prefill_s, &mut cache, &gen_cfg, &mut on_text)?
    };
    report(&a, &out, &cache, None)
}

/// Prints generated text as it forms (not with --json).
fn stream_text(json: bool) -> impl FnMut(&str) {
    let mut stdout = std::io::stdout();
    move |s: &str| {
        if !json {
            let _ = write!(stdout, "{s}");
            let _ = stdout.flush();
        }
    }
}

/// The closing report: one JSON object with --json, else one line on stderr.
fn report<M>(a: &GenerateArgs, out: &Generation, cache: &KvCache<M>, context_load_s: Option<f64>) -> Result<()> {
    let (kv_bytes, sel_bytes) = cache.memory_bytes();
    let (host_bytes, disk_bytes) = cache.tier_bytes();
    let faulted_per_step = out.stats.pages_faulted as f64 / out.stats.steps.max(1) as f64;
    if a.json {
        let v = serde_json::json!({
            "model": a.model.model,
            "selector": a.selector,
            "kv": cache.config().kv,
            "prompt_tokens": out.prompt_tokens,
            "text": out.text,
            "token_ids": out.tokens,
            "stop_reason": out.stop_reason,
            "prefill_seconds": out.prefill_secs,
            "decode_seconds": out.decode_secs,
            "prefill_tokens_per_second": out.prefill_tps(),
            "decode_tokens_per_second": out.decode_tps(),
            "share_of_keys_touched": out.stats.share_touched(),
            "share_of_keys_touched_global": out.stats.share_touched_global(),
            "decode_profile": out.stats.profile(),
            "stats": out.stats,
            "kv_cache_bytes": kv_bytes,
            "kv_host_bytes": host_bytes,
            "kv_disk_bytes": disk_bytes,
            "kv_budget": a.model.kv_budget.map(|b| b.to_string()),
            "pages_faulted_per_step": faulted_per_step,
            "selector_bytes": sel_bytes,
            "peak_rss_bytes": peak_rss(),
            "context_load_seconds": context_load_s,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "\n[needle] context {} tokens | prefill {:.1} tok/s ({:.2}s) | decode {:.1} tok/s ({} tokens, {:.2}s) | selector {} | keys touched {:.1}%{} | KV {} {:.0} MiB, selector {:.1} MiB, peak RSS {}",
            out.prompt_tokens + out.tokens.len(),
            out.prefill_tps(),
            out.prefill_secs,
            out.decode_tps(),
            out.tokens.len(),
            out.decode_secs,
            a.selector,
            100.0 * out.stats.share_touched(),
            if cache.has_windows() {
                format!(" ({:.1}% on the global layers)", 100.0 * out.stats.share_touched_global())
            } else {
                String::new()
            },
            cache.config().kv,
            mib(kv_bytes as u64),
            mib(sel_bytes as u64),
            peak_rss().map_or("n/a".into(), |b| format!("{:.0} MiB", mib(b))),
        );
        if out.stats.steps > 0 {
            eprintln!("[needle] {}", profile_line(&out.stats.profile()));
        }
        if out.stats.prefill_blocks_dense > 0 {
            let (kept, all) = (out.stats.prefill_blocks, out.stats.prefill_blocks_dense);
            eprintln!(
                "[needle] sparse prefill {}: {kept} of {all} key blocks attended ({:.1}%)",
                cache.config().prefill.describe(),
                100.0 * kept as f64 / all as f64
            );
        }
        if disk_bytes > 0 {
            eprintln!(
                "[needle] KV tiers: host {:.0} MiB, disk {:.0} MiB | {faulted_per_step:.1} pages read from disk per step, {} pages spilled",
                mib(host_bytes as u64),
                mib(disk_bytes as u64),
                out.stats.pages_spilled,
            );
        }
    }
    Ok(())
}

/// A decode step's time split, for the closing report of `generate` and `bench decode`.
pub(crate) fn profile_line(p: &needle_model::DecodeProfile) -> String {
    format!(
        "decode step {:.2} ms = weights {:.2} + attention {:.2} + walk {:.2} + insert {:.2} + other {:.2} (mean of {} steps)",
        p.step_ms, p.weights_ms, p.attention_ms, p.walk_ms, p.insert_ms, p.other_ms, p.steps
    )
}
