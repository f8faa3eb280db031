// # needle in your own Burn model
//
// `TinyLm` (this crate's library) is a small GQA transformer with random weights. It runs the
// same prompt three ways and compares each with the model's own dense attention:
//
// 1. `full`: needle's cache with full attention — the logits must agree to float rounding.
// 2. `oracle` with a budget covering the whole dynamic part — the same keys, so again agreement.
// 3. `retrieval` with a RoarGraph index and k = 16 — a subset of the keys each decode step.
//
// Run with `cargo run --release` inside examples/downstream-burn; arguments
// `[prompt_len [SPEC…]]` replace the prompt length (default 1200) and the specs.
#![allow(clippy::print_stdout)]

use std::error::Error;

use downstream_burn::{TinyLm, TinyLmConfig, to_host};
use needle_model::Cpu;

const STEPS: usize = 8;
const SPECS: [&str; 3] = ["full", "oracle:k=1200,sinks=4,window=16", "retrieval:index=graph,k=16,sinks=4,window=16"];

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prompt_len: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(1200);
    let specs: Vec<&str> = if args.len() > 1 { args[1..].iter().map(String::as_str).collect() } else { SPECS.to_vec() };
    let model: TinyLm<Cpu> = TinyLmConfig::default().init(&Default::default());
    let v = model.vocab();
    // A deterministic prompt (the model is untrained: any ids do).
    let prompt: Vec<u32> = (0..prompt_len).map(|i| ((i * 7919 + 13) % v) as u32).collect();
    println!("TinyLm: {} layers, vocab {v}, prompt {prompt_len} tokens, {STEPS} greedy decode steps", model.n_layers());

    for spec in specs {
        let mut cache = model.new_cache(spec)?;
        let g = model.greedy_needle(&prompt, STEPS, &mut cache)?;

        // The model's own attention on the same tokens (causal: one pass gives every step).
        let seq: Vec<u32> = prompt.iter().chain(&g.tokens[..STEPS]).copied().collect();
        let dense = to_host(model.forward_dense(&seq)?)?;
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let prefill = diff(&g.prefill, &dense[..prompt_len * v]);
        let mut decode = 0.0f32;
        let mut agree = 0;
        for (i, step) in g.steps.iter().enumerate() {
            let row = &dense[(prompt_len + i) * v..(prompt_len + i + 1) * v];
            decode = decode.max(diff(step, row));
            agree += usize::from(downstream_burn::argmax(step)? == downstream_burn::argmax(row)?);
        }
        let s = cache.stats;
        let (kv, index) = cache.memory_bytes();
        println!(
            "{spec:<60} prefill max|Δ| {prefill:.1e}  decode max|Δ| {decode:.1e}  greedy agree {agree}/{STEPS}  \
             keys touched {:.1}%  kv {kv} B  selectors {index} B",
            100.0 * s.share_touched()
        );
    }
    Ok(())
}
