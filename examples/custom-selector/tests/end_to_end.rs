//! `StridedRerank` inside the real model: with a budget covering the dynamic part, decode
//! logits match full attention (to float summation order) and greedy text is identical.
#![allow(clippy::unwrap_used)]

use custom_selector::StridedRerankConfig;
use needle_core::{Budget, FullSelector, SelectorFactory};
use needle_model::{Cpu, GenerateConfig, KvCache, Llama, LoadOptions, SelectionConfig, Weights, argmax, generate};

const PROMPT: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. \
The pass key is 40917. Remember it. 40917 is the pass key. The grass is green. The sky is blue. The sun is yellow. \
Here we go. There and back again. The grass is green. The sky is blue. The sun is yellow. Here we go. \
What is the pass key? The pass key is";

struct Real {
    model: Llama<Cpu>,
    tok: needle_loader::Tokenizer,
}

fn real() -> Real {
    let path = needle_fetch::default_model_path().unwrap();
    assert!(path.is_file(), "{} is missing: run `cargo xtask fetch-model` (or set NEEDLE_MODEL)", path.display());
    let ck = needle_loader::open(&path).unwrap();
    // f32 weights: the claim checked is about attention (a whole budget is full attention, up to
    // float summation order). Native quantized weights quantize activations to 8 bits, where a
    // last-bit difference can flip a rounding and move later logits far more than the attention did.
    let f32_weights = LoadOptions { weights: Weights::F32, ..Default::default() };
    Real {
        model: Llama::<Cpu>::load_with(&ck, &Default::default(), &f32_weights).unwrap(),
        tok: ck.tokenizer().unwrap(),
    }
}

fn cache(r: &Real, factory: &dyn SelectorFactory, budget: Budget) -> KvCache {
    let c = r.model.config();
    let sel = SelectionConfig { budget, ..Default::default() };
    KvCache::new(c.num_hidden_layers, r.model.gqa(), c.head_dim, factory, sel).unwrap()
}

#[test]
fn full_budget_matches_full_attention_in_the_model() {
    let r = real();
    let prompt = r.tok.encode(PROMPT, false).unwrap();
    let custom = StridedRerankConfig { sinks: 4, window: 16, stride: 4, oversample: 2 };
    assert!(prompt.len() > 40, "the prompt must leave a dynamic part: {} tokens", prompt.len());

    // Decode logits, step by step, on the same greedy path.
    let mut a = cache(&r, &FullSelector, Budget::TopK(1));
    let mut b = cache(&r, &custom, Budget::TopK(prompt.len()));
    let last = [prompt.len() - 1];
    let mut la = r.model.prefill(&prompt, &mut a, 512, &last, &mut |_, _| {}).unwrap();
    let mut lb = r.model.prefill(&prompt, &mut b, 512, &last, &mut |_, _| {}).unwrap();
    for step in 0..6 {
        let diff = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "step {step}: logits differ by {diff}");
        let (ta, tb) = (argmax(&la).unwrap(), argmax(&lb).unwrap());
        assert_eq!(ta, tb, "step {step}");
        la = r.model.decode(ta, &mut a).unwrap();
        lb = r.model.decode(tb, &mut b).unwrap();
    }
    // The selector really ran: every decode step selected the whole dynamic part.
    assert!(b.stats.keys_dynamic > 0);
    assert_eq!(b.stats.keys_attended, b.stats.keys_total);

    // And through `generate`: identical text.
    let g = GenerateConfig { max_tokens: 8, ..Default::default() };
    let full = generate(
        &r.model,
        &r.tok,
        &prompt,
        &mut cache(&r, &FullSelector, Budget::TopK(1)),
        &g,
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap();
    let ours = generate(
        &r.model,
        &r.tok,
        &prompt,
        &mut cache(&r, &custom, Budget::TopK(prompt.len())),
        &g,
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(ours.tokens, full.tokens);
    assert_eq!(ours.text, full.text);

    // A small budget still runs, reads less, and stays inside the dynamic part.
    let mut c = cache(&r, &custom, Budget::TopK(8));
    let small = generate(&r.model, &r.tok, &prompt, &mut c, &g, &mut |_| {}, &mut |_, _| {}).unwrap();
    assert_eq!(small.tokens.len(), full.tokens.len());
    assert!(small.stats.keys_attended < small.stats.keys_total);
    assert!(c.last_selection(1, 0).ids.len() <= 8);
}

#[test]
fn registered_by_name_it_runs_in_needle_generate() {
    // This crate's `needle` binary registers `strided-rerank`, then runs the needle CLI.
    let spec = "strided-rerank:stride=4,oversample=2,k=8,sinks=4,window=16";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custom-selector"))
        .args(["generate", "--prompt", PROMPT, "--selector", spec, "--max-tokens", "4", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["selector"], spec);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let share = v["share_of_keys_touched"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");

    // In this process too, after registering: the spec parses like a built-in, bad keys are named.
    custom_selector::register().unwrap();
    assert!(needle_select::parse(spec).unwrap().factory.describe().starts_with("strided-rerank:"));
    let e = needle_select::parse("strided-rerank:strid=4").unwrap_err().to_string();
    assert!(e.contains("stride") && e.contains("oversample"), "{e}");
}
