//! The Burn model on the real SmolLM2 weights against references: an f64 forward pass written
//! here in plain Rust, its own chunked and incremental paths, and llama.cpp's logits
//! (fixtures from tests/reference/make_fixtures.py).
#![allow(clippy::unwrap_used)]

mod common;

use common::{cache, real};
use needle_model::{Error, argmax};
use rayon::prelude::*;

/// Plain f64 Llama forward over HF-layout weights, one token at a time with a KV cache.
struct Reference {
    cfg: needle_loader::LlamaConfig,
    w: std::collections::HashMap<String, Vec<f32>>,
}

impl Reference {
    fn new() -> Self {
        let r = real();
        let cfg = r.ck.config().clone();
        let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
        for i in 0..cfg.num_hidden_layers {
            for s in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                names.push(format!("model.layers.{i}.{s}"));
            }
        }
        let w = names.into_iter().map(|n| (n.clone(), r.ck.tensor(&n).expect("tensor").data)).collect();
        Self { cfg, w }
    }

    fn matvec(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = &self.w[name];
        w.par_chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()).collect()
    }

    fn norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.cfg.rms_norm_eps).sqrt();
        x.iter().zip(&self.w[name]).map(|(v, &g)| v * r * g as f64).collect()
    }

    fn rope(&self, x: &mut [f64], pos: usize) {
        let d = self.cfg.head_dim;
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let a = pos as f64 / self.cfg.rope_theta.powf(2.0 * i as f64 / d as f64);
                let (x1, x2) = (head[i], head[i + d / 2]);
                head[i] = x1 * a.cos() - x2 * a.sin();
                head[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }

    /// Logits after each token of `tokens`.
    fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.cfg;
        let (d, h, nh, nkv) = (c.head_dim, c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
        let g = nh / nkv;
        let mut kc: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.num_hidden_layers];
        let mut vc: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.num_hidden_layers];
        let embed = &self.w["model.embed_tokens.weight"];
        let mut out = Vec::new();
        for (pos, &t) in tokens.iter().enumerate() {
            let mut x: Vec<f64> = embed[t as usize * h..(t as usize + 1) * h].iter().map(|&v| v as f64).collect();
            for l in 0..c.num_hidden_layers {
                let p = |s: &str| format!("model.layers.{l}.{s}");
                let hn = self.norm(&p("input_layernorm.weight"), &x);
                let mut q = self.matvec(&p("self_attn.q_proj.weight"), &hn);
                let mut k = self.matvec(&p("self_attn.k_proj.weight"), &hn);
                let v = self.matvec(&p("self_attn.v_proj.weight"), &hn);
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                kc[l].push(k);
                vc[l].push(v);
                let mut attn = vec![0.0; nh * d];
                for qh in 0..nh {
                    let j = qh / g;
                    let qv = &q[qh * d..(qh + 1) * d];
                    let s: Vec<f64> = kc[l]
                        .iter()
                        .map(|k| {
                            qv.iter().zip(&k[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (p_, v) in e.iter().zip(&vc[l]) {
                        for i in 0..d {
                            attn[qh * d + i] += p_ / z * v[j * d + i];
                        }
                    }
                }
                let o = self.matvec(&p("self_attn.o_proj.weight"), &attn);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let hn = self.norm(&p("post_attention_layernorm.weight"), &x);
                let gate = self.matvec(&p("mlp.gate_proj.weight"), &hn);
                let up = self.matvec(&p("mlp.up_proj.weight"), &hn);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let down = self.matvec(&p("mlp.down_proj.weight"), &act);
                x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
            let xn = self.norm("model.norm.weight", &x);
            out.push(self.matvec("model.embed_tokens.weight", &xn));
        }
        out
    }
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

#[test]
fn matches_an_f64_reference_forward_pass() {
    let r = real();
    assert!(r.ck.config().tie_word_embeddings, "SmolLM2 ties its output head");
    let tokens = r.tok.encode("The capital of France is", false).unwrap();
    let reference = Reference::new().logits(&tokens);
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let got = r.model.prefill(&tokens, &mut cache("full"), 512, &positions, &mut |_, _| {}).unwrap();
    let vocab = r.model.config().vocab_size;
    for (p, want) in reference.iter().enumerate() {
        let row = &got[p * vocab..(p + 1) * vocab];
        // f32 accumulation over 30 layers vs f64: logits of magnitude ~20 agree to ~1e-3.
        let diff = max_abs_diff(row, want);
        assert!(diff < 5e-3, "position {p}: max |Δlogit| {diff}");
        let best = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        assert_eq!(argmax(row), Some(best), "position {p}");
    }
}

/// The first `n` tokens of Genesis in the default document (fetched by `needle-fetch`, as the
/// README's main job does: nothing beside the checkout is read).
fn prompt(n: usize) -> Vec<u32> {
    let doc = needle_fetch::ensure_default_document().expect("default document");
    let text = std::fs::read_to_string(&doc).unwrap();
    let start = text.find("In the beginning God created").unwrap();
    let ids = real().tok.encode(&text[start..start + 20 * n], false).unwrap();
    ids[..n].to_vec()
}

#[test]
fn chunked_prefill_equals_one_chunk() {
    let r = real();
    let tokens = prompt(70);
    let positions = [0, 13, 40, 69];
    let one = r.model.prefill(&tokens, &mut cache("full"), 512, &positions, &mut |_, _| {}).unwrap();
    let chunked = r.model.prefill(&tokens, &mut cache("full"), 16, &positions, &mut |_, _| {}).unwrap();
    let diff = one.iter().zip(&chunked).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "max |Δlogit| {diff}");
}

#[test]
fn decode_steps_equal_prefill() {
    let r = real();
    let tokens = prompt(40);
    let n = tokens.len();
    let full = r.model.prefill(&tokens, &mut cache("full"), 512, &[n - 3, n - 2, n - 1], &mut |_, _| {}).unwrap();
    let mut c = cache("full");
    let vocab = r.model.config().vocab_size;
    let first = r.model.prefill(&tokens[..n - 2], &mut c, 512, &[n - 3], &mut |_, _| {}).unwrap();
    let d1 = r.model.decode(tokens[n - 2], &mut c).unwrap();
    let d2 = r.model.decode(tokens[n - 1], &mut c).unwrap();
    for (i, row) in [first, d1, d2].iter().enumerate() {
        let want = &full[i * vocab..(i + 1) * vocab];
        let diff = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "step {i}: max |Δlogit| {diff}");
    }
    assert_eq!(c.stats.steps, 2);
    assert_eq!(c.len(), n);
}

#[test]
fn bad_input_is_a_named_error() {
    let r = real();
    assert!(matches!(r.model.prefill(&[], &mut cache("full"), 512, &[], &mut |_, _| {}), Err(Error::EmptyPrompt)));
    let vocab = r.model.config().vocab_size as u32;
    assert!(matches!(
        r.model.prefill(&[1, vocab], &mut cache("full"), 512, &[], &mut |_, _| {}),
        Err(Error::TokenOutOfRange { .. })
    ));
    assert!(matches!(r.model.decode(1, &mut cache("full")), Err(Error::State(_))));
    assert!(r.model.prefill(&[1, 2], &mut cache("full"), 0, &[], &mut |_, _| {}).is_err());
    assert!(r.model.prefill(&[1, 2], &mut cache("full"), 512, &[2], &mut |_, _| {}).is_err());
}

/// Decode logits after `steps` greedy steps with a selector, against full attention.
fn decode_logits(spec: &str, tokens: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let r = real();
    let mut c = cache(spec);
    let mut logits = r.model.prefill(tokens, &mut c, 128, &[tokens.len() - 1], &mut |_, _| {}).unwrap();
    let mut out = vec![logits.clone()];
    let mut next = argmax(&logits).unwrap();
    for _ in 0..steps {
        logits = r.model.decode(next, &mut c).unwrap();
        next = argmax(&logits).unwrap();
        out.push(logits.clone());
    }
    out
}

#[test]
fn selectors_with_a_budget_covering_the_dynamic_part_equal_full_attention() {
    // 300 tokens, 8 sinks + 32 window: 260 dynamic keys at prefill, growing by one per step.
    let tokens = prompt(300);
    let full = decode_logits("full", &tokens, 4);
    for spec in [
        "retrieval:index=flat,k=300,sinks=8,window=32,min_index=0",
        "oracle:k=300,sinks=8,window=32",
        "quest:k=300,sinks=8,window=32",
    ] {
        let got = decode_logits(spec, &tokens, 4);
        for (step, (a, b)) in got.iter().zip(&full).enumerate() {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-3, "{spec} step {step}: max |Δlogit| {diff}");
        }
    }
    // Streaming drops the dynamic part: it must differ (the test can fail).
    let streaming = decode_logits("streaming:sinks=8,window=32", &tokens, 1);
    let diff = streaming[1].iter().zip(&full[1]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-2, "streaming equals full attention ({diff}): the dynamic part was not dropped");
}

#[test]
fn a_forked_cache_decodes_like_a_fresh_prefill() {
    let r = real();
    let tokens = prompt(200);
    let spec = "oracle:k=60,sinks=8,window=32";
    let fresh = decode_logits(spec, &tokens, 2);
    let mut base = cache("full");
    base.retain_training_queries();
    let first = r.model.prefill(&tokens, &mut base, 128, &[tokens.len() - 1], &mut |_, _| {}).unwrap();
    let (factory, config) = needle_model::compose(needle_select::parse(spec).unwrap());
    let mut forked = base.fork(factory.as_ref(), config, r.model.scale()).unwrap();
    assert_eq!(forked.len(), base.len());
    let mut got = vec![first];
    let mut next = argmax(&got[0]).unwrap();
    for _ in 0..2 {
        let l = r.model.decode(next, &mut forked).unwrap();
        next = argmax(&l).unwrap();
        got.push(l);
    }
    for (step, (a, b)) in got.iter().zip(&fresh).enumerate() {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "step {step}: max |Δlogit| {diff}");
    }
    // The base cache is untouched by the fork's decoding.
    assert_eq!(base.len(), tokens.len());
}
