//! `StridedRerank` inside the real model: with a budget covering the dynamic part, decode
//! logits match full attention (to float summation order) and greedy text is identical; named
//! by its spec after `register`, it runs as the factory built by hand does.
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

fn cache_for(r: &Real, factory: &dyn SelectorFactory, budget: Budget) -> KvCache {
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
    let mut a = cache_for(&r, &FullSelector, Budget::TopK(1));
    let mut b = cache_for(&r, &custom, Budget::TopK(prompt.len()));
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
        &mut cache_for(&r, &FullSelector, Budget::TopK(1)),
        &g,
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap();
    let ours = generate(
        &r.model,
        &r.tok,
        &prompt,
        &mut cache_for(&r, &custom, Budget::TopK(prompt.len())),
        &g,
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(ours.tokens, full.tokens);
    assert_eq!(ours.text, full.text);

    // A small budget still runs, reads less, and stays inside the dynamic part.
    let mut c = cache_for(&r, &custom, Budget::TopK(8));
    let small = generate(&r.model, &r.tok, &prompt, &mut c, &g, &mut |_| {}, &mut |_, _| {}).unwrap();
    assert_eq!(small.tokens.len(), full.tokens.len());
    assert!(small.stats.keys_attended < small.stats.keys_total);
    assert!(c.last_selection(1, 0).ids.len() <= 8);
}

#[test]
fn registered_by_name_it_runs_in_the_model() {
    custom_selector::register().unwrap();
    assert!(custom_selector::register().is_err(), "the name is taken once registered");
    // The spec's defaults are the built-ins' static part.
    let d = needle_select::parse("strided-rerank").unwrap();
    assert!(d.factory.describe().contains(&format!(
        "sinks={},window={}",
        needle_select::DEFAULT_SINKS,
        needle_select::DEFAULT_WINDOW
    )));
    let e = needle_select::parse("strided-rerank:strid=4").unwrap_err().to_string();
    assert!(e.contains("strid") && e.contains("stride") && e.contains("oversample"), "{e}");

    // What the spec names is what the model runs: a small budget reads less than everything and
    // stays within it, as the factory built by hand does.
    let r = real();
    let prompt = r.tok.encode(PROMPT, false).unwrap();
    let spec = needle_select::parse("strided-rerank:stride=4,oversample=2,k=8,sinks=4,window=16").unwrap();
    assert_eq!(spec.budget, Budget::TopK(8));
    let (factory, sel) = needle_model::compose(spec);
    let c = r.model.config();
    let mut cache = KvCache::new(c.num_hidden_layers, r.model.gqa(), c.head_dim, factory.as_ref(), sel).unwrap();
    let g = GenerateConfig { max_tokens: 4, ..Default::default() };
    let out = generate(&r.model, &r.tok, &prompt, &mut cache, &g, &mut |_| {}, &mut |_, _| {}).unwrap();
    assert_eq!(out.tokens.len(), 4);
    assert!(out.stats.keys_attended < out.stats.keys_total);
    assert!(cache.last_selection(1, 0).ids.len() <= 8);
    let by_hand = StridedRerankConfig { sinks: 4, window: 16, stride: 4, oversample: 2 };
    let mut same = cache_for(&r, &by_hand, Budget::TopK(8));
    let again = generate(&r.model, &r.tok, &prompt, &mut same, &g, &mut |_| {}, &mut |_, _| {}).unwrap();
    assert_eq!(again.tokens, out.tokens);
}
