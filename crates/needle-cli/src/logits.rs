//! `needle logits`: the top-K next-token logits of a prompt's last position.

use anyhow::Result;
use clap::Args;
use needle_model::NeedleBackend;

use crate::common::{Loaded, ModelArgs, PromptArgs, load_on, new_cache, progress_bar, prompt_tokens};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// How many top logits to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    crate::common::on_device!(a.model.device, |B, device| run_on::<B>(a, &device))
}

fn run_on<B: NeedleBackend>(a: LogitsArgs, device: &B::Device) -> Result<()> {
    let Loaded { model, tokenizer } = load_on::<B>(&a.model.model, a.model.weights, device)?;
    let prompt = prompt_tokens(&a.prompt, &tokenizer)?;
    let mut cache = new_cache(&model, "full", &a.model)?;
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
