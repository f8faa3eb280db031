//! `needle trace`: record vectors of the real model for index benchmarks (the file format and
//! the recording are `needle_eval::trace`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use needle_eval::trace::record;

use crate::common::{Loaded, ModelArgs, PromptArgs, load, model_path, progress_bar, prompt_tokens};

/// Arguments of `needle trace`.
#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Greedy-decoded tokens after the prompt (their queries are the test queries).
    #[arg(long, default_value_t = 64)]
    pub generate: usize,
    /// Layers to record, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5,15,25")]
    pub layers: Vec<usize>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
}

/// Runs `needle trace`.
pub fn run(a: TraceArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to overwrite it", a.out.display());
    }
    if let Some(kv) = a.model.kv.filter(|&k| k != needle_model::KvDtype::F32) {
        bail!("--kv {kv}: traces record the f32 keys of a full-attention run; drop --kv");
    }
    let Loaded { model, tokenizer } = load(&a.model)?;
    let prompt = prompt_tokens(&a.prompt, &tokenizer)?;
    if prompt.len() > model.max_positions() {
        tracing::warn!(
            "prompt of {} tokens is past the model's trained length of {} (RoPE extrapolates)",
            prompt.len(),
            model.max_positions()
        );
    }
    let (pp, pd) = (progress_bar(prompt.len(), "prefill"), progress_bar(a.generate, "decode"));
    let mut rec =
        record(&model, &prompt, &a.layers, a.generate, a.chunk, &mut |d, _| pp.set_position(d as u64), &mut |d, _| {
            pd.set_position(d as u64)
        })?;
    pp.finish_and_clear();
    pd.finish_and_clear();
    let info = &mut rec.trace.info;
    info.insert("model".into(), model_path(&a.model.model)?.display().to_string());
    info.insert("model_spec".into(), a.model.model.clone());
    let source = a.prompt.prompt_file.as_ref().map_or_else(|| "--prompt".into(), |p| p.display().to_string());
    info.insert("source".into(), source);
    info.insert("context_tokens".into(), a.prompt.context_tokens.map_or("all".into(), |n| n.to_string()));
    info.insert("generated_text".into(), tokenizer.decode(&rec.generated).unwrap_or_default());
    rec.trace.write(&a.out, a.force)?;
    tracing::info!(
        "wrote {} ({} prompt + {} generated tokens, layers {:?}, prefill {:.1}s, decode {:.1}s)",
        a.out.display(),
        rec.trace.n_prompt,
        rec.trace.n_generated,
        a.layers,
        rec.prefill_secs,
        rec.decode_secs
    );
    Ok(())
}
