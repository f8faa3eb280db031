//! `needle calibrate`: rank heads by how much attention they put outside sinks + window on a
//! calibration text, and write a per-head policy (DuoAttention / RazorAttention idea): the
//! heads that look far back get retrieval, the rest streaming.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use needle_core::HeadId;
use needle_core::attention::scores;
use needle_model::NeedleBackend;

use crate::common::{ModelArgs, PromptArgs, load_on, new_cache, progress_bar, prompt_tokens, write_new};

/// Arguments of `needle calibrate`.
#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Sink tokens of the static part the mass is measured outside of.
    #[arg(long, default_value_t = 128)]
    pub sinks: usize,
    /// Window of the static part.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// The last this many prompt positions are the calibration queries.
    #[arg(long, default_value_t = 128)]
    pub queries: usize,
    /// Share of KV heads that get retrieval.
    #[arg(long, default_value_t = 0.5)]
    pub retrieval_share: f64,
    /// Spec for retrieval heads.
    #[arg(long, default_value = "retrieval")]
    pub retrieval: String,
    /// Spec for the other heads.
    #[arg(long, default_value = "streaming")]
    pub streaming: String,
    /// Where to write the policy (JSON; never overwritten unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing policy file.
    #[arg(long)]
    pub force: bool,
}

/// Runs `needle calibrate`.
pub fn run(a: CalibrateArgs) -> Result<()> {
    crate::common::on_device!(a.model.device, |B, device| run_on::<B>(a, &device))
}

fn run_on<B: NeedleBackend>(a: CalibrateArgs, device: &B::Device) -> Result<()> {
    let loaded = load_on::<B>(&a.model.model, a.model.weights, device)?;
    let model = &loaded.model;
    let tokens = prompt_tokens(&a.prompt, &loaded.tokenizer)?;
    let n = tokens.len();
    if n <= a.sinks + a.window {
        bail!("the calibration prompt has {n} tokens: it needs more than --sinks + --window = {}", a.sinks + a.window);
    }
    let (layers, gqa, d) = (model.config().num_hidden_layers, model.gqa(), model.config().head_dim);
    let mut cache = new_cache(model, "full", &a.model)?;
    cache.trace_queries((0..layers).collect())?;
    let pb = progress_bar(n, "prefill");
    model.prefill(&tokens, &mut cache, 512, &[n - 1], &mut |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let trace = cache.query_trace().context("query trace missing")?;
    let first = n.saturating_sub(a.queries).max(a.sinks + a.window);
    let row = gqa.n_q_heads * d;
    let mut outside = Vec::new();
    for layer in 0..layers {
        // A sliding-window layer has no selector to choose: the policy covers global layers.
        if cache.layer_kind(layer) != needle_model::LayerKind::Global {
            continue;
        }
        let qs = &trace.prefill[layer];
        for j in 0..gqa.n_kv_heads {
            let keys = cache.keys(layer, j);
            let mut sum = 0.0;
            let mut count = 0usize;
            for p in first..n {
                for h in gqa.group(j) {
                    let q = &qs[p * row + h * d..p * row + (h + 1) * d];
                    // Causal: position p sees keys 0..=p; the static part is relative to p.
                    let s = scores(q, keys, model.scale())?;
                    let s = &s[..=p];
                    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                    let w: Vec<f64> = s.iter().map(|&x| (x as f64 - max).exp()).collect();
                    let total: f64 = w.iter().sum();
                    let dynamic: f64 = w[a.sinks..p + 1 - a.window].iter().sum();
                    sum += dynamic / total;
                    count += 1;
                }
            }
            outside.push((HeadId { layer, kv_head: j }, sum / count.max(1) as f64));
        }
    }
    let policy = needle_select::rank_heads(&outside, a.retrieval_share, &a.retrieval, &a.streaming)?;
    let json = policy.to_json()?;
    if a.force {
        std::fs::write(&a.out, &json).with_context(|| format!("writing {}", a.out.display()))?;
    } else {
        write_new(&a.out, &json)?;
    }
    let mut ranked = outside.clone();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
    println!(
        "attention mass outside {} sinks + {} window (mean over the last {} positions and each group's heads):",
        a.sinks,
        a.window,
        n - first
    );
    for (h, m) in &ranked {
        let chosen = policy.heads.iter().any(|r| r.layer == h.layer && r.kv_head == h.kv_head);
        println!(
            "  layer {:>2} kv {} {:>6.2}% {}",
            h.layer,
            h.kv_head,
            100.0 * m,
            if chosen { &a.retrieval } else { &a.streaming }
        );
    }
    println!("wrote {} ({} retrieval heads of {})", a.out.display(), policy.heads.len(), outside.len());
    Ok(())
}
