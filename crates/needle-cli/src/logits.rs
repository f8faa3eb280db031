//! `needle logits`: the top-K next-token logits of a prompt's last position (or of chosen
//! positions, `--at`).

use anyhow::{Result, bail};
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
    /// Positions (0-based, BOS included) whose next-token logits to print, comma-separated;
    /// default the last. One prefill serves them all (comparing a long prompt at several depths).
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<usize>,
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
    let at = if a.at.is_empty() { vec![prompt.len() - 1] } else { a.at.clone() };
    if let Some(p) = at.iter().find(|&&p| p >= prompt.len()) {
        bail!("--at {p} is past the {}-token prompt", prompt.len());
    }
    let mut cache = new_cache(&model, "full", &a.model)?;
    let pb = progress_bar(prompt.len(), "prefill");
    let logits = model.prefill(&prompt, &mut cache, a.chunk, &at, &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let vocab = logits.len() / at.len();
    let mut rows = Vec::with_capacity(at.len());
    for (&pos, row) in at.iter().zip(logits.chunks_exact(vocab)) {
        rows.push((pos, needle_core::attention::top_k(row, a.top.min(vocab))?));
    }
    if a.json {
        let top_json = |top: &[(u32, f32)]| {
            top.iter()
                .map(|(i, l)| serde_json::json!({"id": i, "logit": l, "token": tokenizer.decode(&[*i]).unwrap_or_default()}))
                .collect::<Vec<_>>()
        };
        let mut v = serde_json::json!({
            "prompt_ids": prompt,
            "top": top_json(&rows[rows.len() - 1].1),
        });
        if !a.at.is_empty() {
            v["at"] = rows.iter().map(|(p, top)| serde_json::json!({"position": p, "top": top_json(top)})).collect();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("prompt: {} tokens", prompt.len());
        for (pos, top) in &rows {
            if !a.at.is_empty() {
                println!("position {pos}:");
            }
            for (i, l) in top {
                println!("{i:>6} {l:>10.4} {:?}", tokenizer.decode(&[*i]).unwrap_or_default());
            }
        }
    }
    Ok(())
}
