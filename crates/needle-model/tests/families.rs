//! Each supported family against llama.cpp on tiny random-weight models
//! (tests/fixtures/families/, written by tests/reference/make_family_fixtures.py): the GGUF
//! loaded with its weights as stored (fused kernels) and as f32 Burn parameters, and the same
//! weights from the Hugging Face folder, which has the config.json form of each option (Llama 3
//! `rope_scaling` where the GGUF has `rope_freqs.weight`, unpermuted Q/K rows).
//!
//! Weights are F32 and llama.cpp ran with an F32 K/V cache, so the two are the same arithmetic
//! up to summation order: every logit row (prefill positions and greedy decode steps) must have
//! the same argmax and agree to [`TOL`].
//!
//! The same families as K-quant files (`<family>-q4_k_m.gguf`, `llama3-q5_k_m.gguf`, written by
//! tests/reference/make_quant_family_fixtures.py at hidden 256 and quantized by llama.cpp's own
//! quantizer, its fallbacks for rows that are not a multiple of 256 included) are checked on
//! llama.cpp's top-20 logits of every row to [`QUANT_TOL`].
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;

use common::{cache_for, repo_root};
use needle_loader::{Architecture, Checkpoint, RopeScaling};
use needle_model::{Cpu, Llama, LoadOptions, Weights, argmax};
use serde_json::Value;

/// Largest |needle − llama.cpp| allowed on any logit.
const TOL: f32 = 1e-3;

/// Largest |needle − llama.cpp| allowed on llama.cpp's top-20 logits of a quantized file: the
/// weights are the same blocks on both sides, but each side rounds activations its own way
/// before the quantized dot products.
const QUANT_TOL: f32 = 0.05;

/// The same for the file's blocks dequantized to f32 (`--weights f32`): llama.cpp's rounding
/// of the activations is then a difference of its own (measured up to 0.22, on qwen2).
const DEQUANT_TOL: f32 = 0.3;

fn dir() -> PathBuf {
    repo_root().join("tests/fixtures/families")
}

fn fixture(family: &str) -> Value {
    let p = dir().join(format!("{family}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn load(ck: &Checkpoint, weights: Weights) -> Llama<Cpu> {
    Llama::<Cpu>::load_with(ck, &Default::default(), &LoadOptions { weights }).unwrap()
}

/// Every fixture row (expected) next to needle's (got): prefill positions, then decode steps
/// fed llama.cpp's greedy tokens.
fn rows(model: &Llama<Cpu>, fx: &Value) -> Vec<(Vec<f32>, Vec<f32>)> {
    let vocab = model.config().vocab_size;
    let mut out = Vec::new();
    for p in fx["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        let pos: Vec<usize> =
            p["positions"].as_array().unwrap().iter().map(|r| r["pos"].as_u64().unwrap() as usize).collect();
        let mut cache = cache_for(model, "full");
        let logits = model.prefill(&prompt, &mut cache, 64, &pos, &mut |_, _| {}).unwrap();
        for (r, got) in p["positions"].as_array().unwrap().iter().zip(logits.chunks_exact(vocab)) {
            out.push((floats(&r["logits"]), got.to_vec()));
        }
        let greedy = ids(&p["greedy_ids"]);
        for (tok, want) in greedy.iter().zip(p["decode_logits"].as_array().unwrap()) {
            out.push((floats(want), model.decode(*tok, &mut cache).unwrap()));
        }
    }
    out
}

/// Max |Δlogit| over all rows; panics where the argmax differs.
fn compare(what: &str, rows: &[(Vec<f32>, Vec<f32>)]) -> f32 {
    let mut worst = 0f32;
    for (i, (want, got)) in rows.iter().enumerate() {
        assert_eq!(want.len(), got.len(), "{what} row {i}: vocab");
        assert_eq!(argmax(want), argmax(got), "{what} row {i}: top-1 differs");
        worst = want.iter().zip(got).fold(worst, |m, (a, b)| m.max((a - b).abs()));
    }
    worst
}

fn check_family(family: &str, arch: Architecture) -> f32 {
    let fx = fixture(family);
    let gguf = needle_loader::open(&dir().join(format!("{family}.gguf"))).unwrap();
    let hf = needle_loader::open(&dir().join(format!("{family}-hf"))).unwrap();
    assert_eq!(hf.config().architecture, arch);
    let mut worst = 0f32;
    for (name, ck, weights) in
        [("gguf native", &gguf, Weights::Native), ("gguf f32", &gguf, Weights::F32), ("hf", &hf, Weights::Native)]
    {
        let d = compare(&format!("{family} {name}"), &rows(&load(ck, weights), &fx));
        eprintln!("{family} {name}: max |Δlogit| vs llama.cpp {d:.2e}");
        assert!(d <= TOL, "{family} {name}: max |Δlogit| {d} > {TOL}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn llama3_rope_scaling_matches_llama_cpp() {
    check_family("llama3", Architecture::Llama);
    let gguf = needle_loader::open(&dir().join("llama3.gguf")).unwrap();
    let hf = needle_loader::open(&dir().join("llama3-hf")).unwrap();
    assert!(matches!(gguf.config().rope_scaling, Some(RopeScaling::FreqFactors(ref f)) if f.len() == 4));
    assert!(matches!(hf.config().rope_scaling, Some(RopeScaling::Llama3 { .. })));
    // The fixture depends on the scaling: without it the long prompt's logits move well past TOL.
    let fx = fixture("llama3");
    let mut model = load(&gguf, Weights::F32);
    let mut cfg = model.config().clone();
    cfg.rope_scaling = None;
    model = model.with_config(cfg).unwrap();
    let rows = rows(&model, &fx);
    let d = rows.iter().flat_map(|(w, g)| w.iter().zip(g).map(|(a, b)| (a - b).abs())).fold(0f32, f32::max);
    assert!(d > 100.0 * TOL, "unscaled RoPE is only {d} away: the fixture does not test the scaling");
}

#[test]
fn qwen2_biases_match_llama_cpp() {
    check_family("qwen2", Architecture::Qwen2);
    let ck = needle_loader::open(&dir().join("qwen2.gguf")).unwrap();
    assert!(ck.config().qkv_bias && ck.config().tie_word_embeddings);
}

#[test]
fn qwen3_qk_norm_matches_llama_cpp() {
    check_family("qwen3", Architecture::Qwen3);
    let c = needle_loader::open(&dir().join("qwen3.gguf")).unwrap().config().clone();
    assert!(c.qk_norm && c.head_dim * c.num_attention_heads != c.hidden_size);
}

#[test]
fn mistral_matches_llama_cpp_and_refuses_past_its_window() {
    check_family("mistral", Architecture::Mistral);
    let hf = needle_loader::open(&dir().join("mistral-hf")).unwrap();
    assert_eq!(hf.config().sliding_window, Some(4096));
    let mut model = load(&hf, Weights::F32);
    let mut cfg = model.config().clone();
    cfg.sliding_window = Some(8);
    model = model.with_config(cfg).unwrap();
    let mut cache = cache_for(&model, "full");
    assert!(model.prefill(&[1; 8], &mut cache, 4, &[7], &mut |_, _| {}).is_ok());
    let e = model.decode(3, &mut cache).unwrap_err().to_string();
    assert!(e.contains("sliding_window") && e.contains('9'), "{e}");
}

#[test]
fn safetensors_and_gguf_give_the_same_logits() {
    for family in ["llama3", "qwen2", "qwen3", "mistral"] {
        let a = needle_loader::open(&dir().join(format!("{family}.gguf"))).unwrap();
        let b = needle_loader::open(&dir().join(format!("{family}-hf"))).unwrap();
        let (ma, mb) = (load(&a, Weights::F32), load(&b, Weights::F32));
        let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 250).collect();
        let (mut ca, mut cb) = (cache_for(&ma, "full"), cache_for(&mb, "full"));
        let la = ma.prefill(&prompt, &mut ca, 16, &[0, 39], &mut |_, _| {}).unwrap();
        let lb = mb.prefill(&prompt, &mut cb, 16, &[0, 39], &mut |_, _| {}).unwrap();
        let d = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!("{family}: safetensors vs GGUF max |Δlogit| {d:.2e}");
        // Llama 3 scaling goes through two formulas (config.json's parameters in f64, the GGUF's
        // f32 factors); everything else is the same f32 arithmetic.
        assert!(d <= 1e-4, "{family}: safetensors and GGUF differ by {d}");
    }
}

#[test]
fn random_models_run_on_blocks_as_on_their_f32_weights() {
    use needle_loader::LlamaConfig;
    use needle_model::QuantType;
    for (preset, ty) in [("qwen3-8b", QuantType::Q4_K), ("qwen2.5-7b", QuantType::Q8_0), ("llama3-8b", QuantType::Q4_0)]
    {
        let mut c = LlamaConfig::preset(preset).unwrap();
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) = (300, 256, 512, 2);
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim) = (4, 2, 64);
        (c.bos_token_id, c.eos_token_ids) = (None, vec![]);
        let native = Llama::<Cpu>::random(&c, ty, 3, &Default::default()).unwrap();
        assert_eq!(native.weights(), Weights::Native);
        let reference = load(&Checkpoint::random(&c, ty, 3).unwrap(), Weights::F32);
        let prompt: Vec<u32> = (0..24).map(|i| (i * 53 + 11) % 300).collect();
        let run = |m: &Llama<Cpu>| {
            let mut cache = cache_for(m, "full");
            let mut rows = m.prefill(&prompt, &mut cache, 8, &[23], &mut |_, _| {}).unwrap();
            rows.extend(m.decode(7, &mut cache).unwrap());
            rows
        };
        let (a, b) = (run(&native), run(&reference));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!("random {preset} {ty:?}: blocks vs f32 max |Δlogit| {d:.2e} of max |logit| {scale:.2}");
        // The fused kernels quantize activations to 8 bits; that is the whole difference.
        assert!(d <= 0.03 * scale, "{preset} {ty:?}: {d} of {scale}");
        assert_eq!(run(&native), a, "the same seed gives the same model");
    }
}

/// Max |Δlogit| over llama.cpp's top-20 of every row; with `top1`, panics where the argmax
/// differs.
fn compare_top20(what: &str, rows: &[(Vec<f32>, Vec<f32>)], top1: bool) -> f32 {
    let mut worst = 0f32;
    for (i, (want, got)) in rows.iter().enumerate() {
        assert_eq!(want.len(), got.len(), "{what} row {i}: vocab");
        if top1 {
            assert_eq!(argmax(want), argmax(got), "{what} row {i}: top-1 differs");
        }
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        worst = order[..20].iter().fold(worst, |m, &j| m.max((want[j] - got[j]).abs()));
    }
    worst
}

/// A K-quant file of `family` against llama.cpp, with its blocks as stored (fused kernels:
/// top-1 equal on every row, top-20 within [`QUANT_TOL`]) and dequantized to f32 (the same
/// weights without the 8-bit activations both fused paths use, so only within
/// [`DEQUANT_TOL`], and close rows may rank differently); `types` are tensor types the file must
/// hold (the recipe's fallbacks).
fn check_quantized(stem: &str, arch: Architecture, types: &[&str]) {
    let fx = fixture(stem);
    let held: Vec<&str> =
        fx["header"]["tensor_types"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    for t in types {
        assert!(held.contains(t), "{stem}: the fixture has no {t} tensor ({held:?})");
    }
    let ck = needle_loader::open(&dir().join(format!("{stem}.gguf"))).unwrap();
    assert_eq!(ck.config().architecture, arch);
    for (name, weights, tol) in [("native", Weights::Native, QUANT_TOL), ("f32", Weights::F32, DEQUANT_TOL)] {
        let d = compare_top20(&format!("{stem} {name}"), &rows(&load(&ck, weights), &fx), weights == Weights::Native);
        eprintln!("{stem} {name}: max |Δlogit| on llama.cpp's top-20 {d:.2e}");
        assert!(d <= tol, "{stem} {name}: max |Δlogit| {d} > {tol}");
    }
}

#[test]
fn llama3_q4_k_m_matches_llama_cpp() {
    check_quantized("llama3-q4_k_m", Architecture::Llama, &["Q4_K", "Q6_K", "Q5_0", "Q8_0"]);
}

#[test]
fn llama3_q5_k_m_matches_llama_cpp() {
    check_quantized("llama3-q5_k_m", Architecture::Llama, &["Q5_K", "Q6_K", "Q5_1", "Q8_0"]);
}

#[test]
fn qwen2_q4_k_m_matches_llama_cpp() {
    check_quantized("qwen2-q4_k_m", Architecture::Qwen2, &["Q4_K", "Q6_K", "Q5_0", "Q8_0"]);
}

#[test]
fn qwen3_q4_k_m_matches_llama_cpp() {
    check_quantized("qwen3-q4_k_m", Architecture::Qwen3, &["Q4_K", "Q6_K", "Q5_0", "Q8_0"]);
}

#[test]
fn mistral_q4_k_m_matches_llama_cpp() {
    // llama.cpp converts Mistral as `llama`; without config.json's model_type it loads as Llama.
    check_quantized("mistral-q4_k_m", Architecture::Llama, &["Q4_K", "Q6_K", "Q5_0", "Q8_0"]);
}
