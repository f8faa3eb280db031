// # Custom selector, end to end
//
// Runs SmolLM2-135M-Instruct with `StridedRerank` (this crate's selector) in every layer and
// KV head, and checks it against full attention:
//
// 1. Find the default model (`cargo xtask fetch-model` puts it in needle's cache).
// 2. Load the weights and tokenizer; encode a passkey prompt.
// 3. Generate greedily with full attention (`FullSelector`).
// 4. Generate with `StridedRerank` and a budget that covers the whole dynamic part: the text
//    must be identical (static part + every dynamic key = every key).
// 5. Generate with a small budget and report how much it read and whether it agreed.
//
// Run with `cargo run --release` inside examples/custom-selector.
#![allow(clippy::print_stdout)]

use std::error::Error;

use custom_selector::StridedRerankConfig;
use needle_core::{Budget, FullSelector, SelectorFactory};
use needle_model::{Cpu, GenerateConfig, Generation, KvCache, Llama, SelectionConfig, generate};

const PROMPT: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize \
it. I will quiz you about the important information there.\n\nThe grass is green. The sky is blue. The sun is \
yellow. Here we go. There and back again. The pass key is 68213. Remember it. 68213 is the pass key. The grass \
is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is green. The sky is \
blue. The sun is yellow. Here we go. There and back again. The grass is green. The sky is blue. The sun is \
yellow. Here we go. There and back again.\n\nWhat is the pass key? The pass key is";

fn run(
    model: &Llama<Cpu>,
    tok: &needle_loader::Tokenizer,
    prompt: &[u32],
    factory: &dyn SelectorFactory,
    budget: Budget,
) -> Result<Generation, Box<dyn Error>> {
    let cfg = model.config();
    let sel = SelectionConfig { budget, ..Default::default() };
    let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory, sel)?;
    let gen_cfg = GenerateConfig { max_tokens: 16, ..Default::default() };
    Ok(generate(model, tok, prompt, &mut cache, &gen_cfg, &mut |_| {}, &mut |_, _| {})?)
}

fn main() -> Result<(), Box<dyn Error>> {
    let path = needle_fetch::default_model_path()?;
    if !path.is_file() {
        return Err(format!(
            "{} is missing: run `cargo xtask fetch-model` in the needle repository (or set NEEDLE_MODEL)",
            path.display()
        )
        .into());
    }
    let ck = needle_loader::open(&path)?;
    let model = Llama::<Cpu>::load(&ck, &Default::default())?;
    let tok = ck.tokenizer()?;
    let prompt = tok.encode(PROMPT, false)?;
    println!("model {} | prompt {} tokens", path.display(), prompt.len());

    let full = run(&model, &tok, &prompt, &FullSelector, Budget::TopK(1))?;
    println!("full             : {:?}", full.text);

    let custom = StridedRerankConfig { sinks: 4, window: 32, stride: 4, oversample: 2 };
    let all = run(&model, &tok, &prompt, &custom, Budget::TopK(prompt.len()))?;
    println!("{} k=all: {:?}", custom.describe(), all.text);
    if all.tokens != full.tokens {
        return Err("a budget covering the dynamic part must reproduce full attention".into());
    }

    let small = run(&model, &tok, &prompt, &custom, Budget::TopK(16))?;
    let agree = small.tokens.iter().zip(&full.tokens).take_while(|(a, b)| a == b).count();
    println!("{} k=16  : {:?}", custom.describe(), small.text);
    println!(
        "k=16 read {:.1}% of the keys per step (attended + scored); first {agree}/{} tokens agree with full",
        100.0 * small.stats.share_touched(),
        full.tokens.len()
    );
    println!("ok: with the whole dynamic part in budget, the output is identical to full attention");
    Ok(())
}
