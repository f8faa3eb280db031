//! `needle prefill`: prefill a document once and save the context (KV pages, built selectors)
//! for `needle generate --context` to ask questions of.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use needle_model::context::{self, ContextInfo};
use needle_select::resolve_auto;

use crate::common::{Loaded, ModelArgs, PromptArgs, context_prompt, load, model_digest, new_cache, progress_bar};

#[derive(Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Attention selector spec the context is built for (`auto`: retrieval from 2,048 tokens).
    #[arg(long, default_value = "auto")]
    pub selector: String,
    /// Where to save the context.
    #[arg(long)]
    pub save: PathBuf,
    /// Replace an existing --save file.
    #[arg(long)]
    pub force: bool,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
}

pub fn run(a: PrefillArgs) -> Result<()> {
    if a.prompt.question.is_some() {
        bail!("--question: ask it later with `needle generate --context {} --question …`", a.save.display());
    }
    if a.save.exists() && !a.force {
        bail!("{} exists; pass --force to replace it", a.save.display());
    }
    let Loaded { model, tokenizer } = load(&a.model)?;
    let (tokens, suffix) = context_prompt(&a.prompt, &tokenizer)?;
    let spec = resolve_auto(&a.selector, tokens.len());
    let mut cache = new_cache(&model, &spec, &a.model)?;
    cache.retain_training_queries();
    a.model.apply_kv_budget(&mut cache)?;
    let t = Instant::now();
    let pb = progress_bar(tokens.len(), "prefill");
    let n = tokens.len();
    let logits = model.prefill(&tokens, &mut cache, a.chunk, &[n - 1], &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let prefill_s = t.elapsed().as_secs_f64();
    let mut info = ContextInfo::new(&model, &model_digest(&a.model.model)?, a.model.weights.name(), &spec, &cache);
    info.suffix = suffix;
    let t = Instant::now();
    let pb = progress_bar(model.config().num_hidden_layers, "save");
    context::save(&a.save, a.force, &info, &tokens, &logits, &cache, &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let bytes = std::fs::metadata(&a.save).map_or(0, |m| m.len());
    eprintln!(
        "[needle] saved {}: {n} tokens, selector {spec}, KV {} | prefill + build {prefill_s:.1}s, save {:.2}s, {:.0} MiB",
        a.save.display(),
        info.kv,
        t.elapsed().as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
