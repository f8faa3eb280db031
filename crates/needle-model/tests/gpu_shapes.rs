//! Random-weight models of real shapes on the CubeCL arm (CUDA with the `cuda` feature, else
//! wgpu) against the CPU f32 path: Llama-3-8B, Qwen2.5-7B and Gemma 3 attention shapes (their
//! head size, GQA ratio, QKV bias, QK norm, sliding-window layers), two layers each, a prompt
//! prefilled in chunks, then decode steps through `full` and a top-k selector in both decode
//! modes. The CPU's greedy tokens are fed to both, so one near-tie cannot make the runs diverge;
//! every step's logits must agree within float rounding and the top-1 wherever the CPU's margin
//! is clear of that rounding.
//!
//! `NEEDLE_GPU_SHAPES=real` keeps the real hidden and MLP widths (the default on CUDA, in the
//! `cargo xtask test-gpu` bundle); `small` (the default on wgpu, where CI runs it on lavapipe)
//! keeps the head size and GQA ratio with fewer heads. The vocabulary is cut to 512 either way
//! (the output head is one more GEMV). `NEEDLE_SKIP_GPU_TESTS=1` skips them;
//! `NEEDLE_PRINT_ERR=1 … -- --nocapture` prints the figures.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use burn::tensor::backend::BackendTypes;
use common::skip_gpu as skip;
use needle_loader::{Checkpoint, LlamaConfig, LocalAttention};
use needle_model::{Cpu, DecodeMode, KvCache, Llama, LoadOptions, NeedleBackend, QuantType, Weights, argmax, compose};

/// The arm under test: CUDA when built with `cuda`, else wgpu.
#[cfg(feature = "cuda")]
type G = needle_model::cube::CudaCube;
#[cfg(not(feature = "cuda"))]
type G = needle_model::cube::WgpuCube;

const REAL_DEFAULT: bool = cfg!(feature = "cuda");

fn real() -> bool {
    match std::env::var("NEEDLE_GPU_SHAPES").as_deref() {
        Ok("real") => true,
        Ok("small") => false,
        _ => REAL_DEFAULT,
    }
}

/// `preset` cut to two layers and a 512-token vocabulary; `small` keeps two KV heads (one for
/// Gemma, which has one) at the real GQA ratio and head size, the hidden width their product.
fn shape(preset: &str, small: bool) -> LlamaConfig {
    let mut c = LlamaConfig::preset(preset).unwrap();
    c.num_hidden_layers = 2;
    c.vocab_size = 512;
    c.bos_token_id = None;
    c.eos_token_ids.clear();
    if let Some(la) = &mut c.local_attention {
        // Layer 0 a sliding-window layer (a window the prompt overruns), layer 1 global.
        *la = LocalAttention { window: 16, pattern: 2, ..*la };
    }
    if small {
        let ratio = c.num_attention_heads / c.num_key_value_heads;
        c.num_key_value_heads = c.num_key_value_heads.min(2);
        c.num_attention_heads = ratio * c.num_key_value_heads;
        c.hidden_size = c.num_attention_heads * c.head_dim;
        c.intermediate_size = 1024;
    }
    c.validate().unwrap();
    c
}

/// Prefill `prompt` in chunks of 16, then feed `tokens` one decode step each: the logits before
/// each fed token and after the last.
fn run<B: NeedleBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    tokens: &[u32],
    spec: &str,
    mode: DecodeMode,
) -> Vec<Vec<f32>> {
    let (f, sel) = compose(needle_select::parse(spec).unwrap());
    let c = model.config();
    let mut cache = KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
    cache.set_decode_mode(mode);
    let mut out = vec![model.prefill(prompt, &mut cache, 16, &[prompt.len() - 1], &mut |_, _| {}).unwrap()];
    for &t in tokens {
        out.push(model.decode(t, &mut cache).unwrap());
    }
    out
}

/// The CPU path's greedy tokens after the prompt (`steps` of them).
fn greedy(model: &Llama<Cpu>, prompt: &[u32], steps: usize, spec: &str) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (f, sel) = compose(needle_select::parse(spec).unwrap());
    let c = model.config();
    let mut cache = KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
    let mut logits = vec![model.prefill(prompt, &mut cache, 16, &[prompt.len() - 1], &mut |_, _| {}).unwrap()];
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let t = argmax(logits.last().unwrap()).unwrap();
        tokens.push(t);
        logits.push(model.decode(t, &mut cache).unwrap());
    }
    (logits, tokens)
}

fn margin(l: &[f32]) -> f32 {
    let best = argmax(l).unwrap() as usize;
    let second = l.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &v)| v).fold(f32::MIN, f32::max);
    l[best] - second
}

fn check(preset: &str, ty: QuantType) {
    if skip() {
        return;
    }
    let small = !real();
    let cfg = shape(preset, small);
    let ck = Checkpoint::random(&cfg, ty, 17).unwrap();
    let cpu = Llama::<Cpu>::load_with(&ck, &Default::default(), &LoadOptions { weights: Weights::F32 }).unwrap();
    let dev = Llama::<G>::load(&ck, &<G as BackendTypes>::Device::default()).unwrap();
    drop(ck);
    // 40 tokens: three prefill chunks, past Gemma's 16-token window.
    let prompt: Vec<u32> = (0..40).map(|i| ((i * 131 + 7) % cfg.vocab_size) as u32).collect();
    let steps = 4;
    for spec in ["full", "oracle:k=8,sinks=4,window=8"] {
        let (want, tokens) = greedy(&cpu, &prompt, steps, spec);
        for mode in [DecodeMode::Hybrid, DecodeMode::Device] {
            let got = run(&dev, &prompt, &tokens, spec, mode);
            assert_eq!(got.len(), want.len());
            let top = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
            let e = want.iter().flatten().zip(got.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(got.iter().flatten().all(|x| x.is_finite()), "{preset} {spec} {mode:?}: a non-finite logit");
            if std::env::var_os("NEEDLE_PRINT_ERR").is_some_and(|v| v == "1") {
                eprintln!(
                    "{preset} ({}; {ty:?}) {spec} {mode:?}: max |Δlogit| {e:.3e}, largest |logit| {top:.2} \
                     (relative {:.2e}); smallest CPU top-1 margin {:.3}",
                    if small { "small" } else { "real widths" },
                    e / top,
                    want.iter().map(|l| margin(l)).fold(f32::MAX, f32::min)
                );
            }
            // f32 on both sides, sums in another order: rounding only.
            let tol = 2e-4 * top;
            assert!(e <= tol, "{preset} {spec} {mode:?}: max |Δlogit| {e} > {tol} (largest {top})");
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                if margin(a) > 2.0 * tol {
                    assert_eq!(argmax(a), argmax(b), "{preset} {spec} {mode:?}: top-1 at step {i}");
                }
            }
        }
    }
}

#[test]
fn llama3_8b_shape_on_the_device_matches_the_cpu() {
    // Q4_K: the K-quant most 8B GGUFs use.
    check("llama3-8b", QuantType::Q4_K);
}

#[test]
fn qwen2_5_7b_shape_on_the_device_matches_the_cpu() {
    // Seven query heads per KV head, QKV bias.
    check("qwen2.5-7b", QuantType::Q8_0);
}

#[test]
fn gemma3_shape_on_the_device_matches_the_cpu() {
    // Head size 256, QK norm, a sliding-window layer and a global one.
    check("gemma3-270m", QuantType::Q4_0);
}
