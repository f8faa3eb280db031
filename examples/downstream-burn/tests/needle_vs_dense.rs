//! `TinyLm` with needle's attention against its own dense attention: `full` (and any selector
//! whose budget covers the whole dynamic part) reproduces it; a small retrieval budget runs end
//! to end and really reads a subset; bad shapes are errors.
#![allow(clippy::unwrap_used)]

use burn::tensor::Tensor;
use downstream_burn::{Greedy, TinyLm, TinyLmConfig, argmax, to_host};
use needle_model::{AttentionStep, Cpu, Error, cached_attention};

/// Largest |Δ logit| allowed between needle and the model's own attention (float summation
/// order only; measured < 1e-6 on this model).
const TOL: f32 = 5e-6;

fn model() -> TinyLm<Cpu> {
    TinyLmConfig::default().init(&Default::default())
}

/// `n` deterministic pseudo-random token ids below `vocab`.
fn prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Largest |Δ| between a greedy needle run and the dense model on the same token sequence
/// (dense is causal, so one pass over prompt + generated tokens gives every step's logits).
fn diff_to_dense(m: &TinyLm<Cpu>, prompt: &[u32], g: &Greedy) -> Vec<f32> {
    let v = m.vocab();
    let seq: Vec<u32> = prompt.iter().chain(&g.tokens[..g.steps.len()]).copied().collect();
    let dense = to_host(m.forward_dense(&seq).unwrap()).unwrap();
    let mut diffs = vec![max_diff(&g.prefill, &dense[..prompt.len() * v])];
    for (i, step) in g.steps.iter().enumerate() {
        let row = prompt.len() + i;
        diffs.push(max_diff(step, &dense[row * v..(row + 1) * v]));
    }
    diffs
}

#[test]
fn full_reproduces_dense_attention_in_prefill_and_decode() {
    let m = model();
    let v = m.vocab();
    let mut seq = prompt(48, v, 1);
    let mut cache = m.new_cache("full").unwrap();

    // Prefill: every position's logits.
    let needle = to_host(m.forward_needle(&seq, &mut cache, AttentionStep::Prefill).unwrap()).unwrap();
    let dense = to_host(m.forward_dense(&seq).unwrap()).unwrap();
    let mut worst = max_diff(&needle, &dense);
    assert!(worst < TOL, "prefill logits differ by {worst}");
    assert_eq!(cache.len(), seq.len());
    cache.build(m.scale()).unwrap();

    // Decode: one token at a time through the cache, against dense on the growing sequence.
    let mut next = argmax(&dense[dense.len() - v..]).unwrap();
    for step in 0..12 {
        seq.push(next);
        let needle = to_host(m.forward_needle(&[next], &mut cache, AttentionStep::Decode).unwrap()).unwrap();
        cache.finish_step();
        let dense = to_host(m.forward_dense(&seq).unwrap()).unwrap();
        let dense = &dense[dense.len() - v..];
        let diff = max_diff(&needle, dense);
        assert!(diff < TOL, "step {step}: logits differ by {diff}");
        assert!(dense.iter().all(|x| x.is_finite()));
        worst = worst.max(diff);
        let (a, b) = (argmax(&needle).unwrap(), argmax(dense).unwrap());
        assert_eq!(a, b, "step {step}: greedy tokens differ");
        next = a;
    }
    eprintln!("full vs dense: max |Δlogit| {worst:.2e}");
    assert_eq!(cache.len(), seq.len());
    assert_eq!(cache.stats.steps, 12);
    // Full attention: every decode step attended every key of every layer and KV head.
    assert!(cache.stats.keys_total > 0);
    assert_eq!(cache.stats.keys_attended, cache.stats.keys_total);
    assert!((cache.stats.share_touched() - 1.0).abs() < 1e-12);
}

#[test]
fn chunked_prefill_matches_one_pass() {
    let m = model();
    let v = m.vocab();
    let p = prompt(70, v, 2);
    let mut cache = m.new_cache("full").unwrap();
    let mut needle = Vec::new();
    for chunk in p.chunks(32) {
        // Each chunk attends causally to everything cached before it.
        needle.extend(to_host(m.forward_needle(chunk, &mut cache, AttentionStep::Prefill).unwrap()).unwrap());
    }
    let dense = to_host(m.forward_dense(&p).unwrap()).unwrap();
    let diff = max_diff(&needle, &dense);
    assert!(diff < TOL, "chunked prefill differs by {diff}");
}

#[test]
fn retrieval_selects_a_subset_end_to_end() {
    let m = model();
    // Retrieval scans the dynamic part exactly until it holds `min_index` keys (1024 by
    // default), and on a few hundred keys a graph search scores about as many keys as a scan:
    // the prompt is long enough for the index to pay.
    let p = prompt(1200, m.vocab(), 3);
    let spec = "retrieval:index=graph,k=16,sinks=4,window=16";
    let mut cache = m.new_cache(spec).unwrap();
    let g = m.greedy_needle(&p, 8, &mut cache).unwrap();
    assert_eq!(g.steps.len(), 8);
    assert!(g.steps.iter().flatten().all(|x| x.is_finite()), "non-finite decode logits");
    assert!(cache.selector_describe(1).starts_with("retrieval"), "{}", cache.selector_describe(1));

    let s = cache.stats;
    let share = s.share_touched();
    let diffs = diff_to_dense(&m, &p, &g);
    let worst = diffs[1..].iter().copied().fold(0.0, f32::max);
    eprintln!(
        "{spec}: keys touched {:.1}% per step, {} of {} dynamic keys selected, decode max |Δlogit| vs dense {worst:.2e}",
        100.0 * share,
        s.keys_selected,
        s.keys_dynamic
    );
    assert_eq!(s.steps, 8);
    assert!(s.keys_selected > 0, "no key was selected");
    // At most k = 16 per layer, KV head and step.
    assert!(s.keys_selected <= 16 * 8 * m.n_layers() as u64 * 2, "{s:?}");
    assert!(share < 1.0, "the retrieval read as many keys as a scan: share {share}");
    assert!(s.keys_attended < s.keys_total);
    // Prefill is dense whatever the selector.
    assert!(diffs[0] < TOL, "prefill differs by {}", diffs[0]);
    let (kv, index) = cache.memory_bytes();
    assert!(kv > 0 && index > 0, "kv {kv} B, index {index} B");
}

#[test]
fn a_budget_covering_the_dynamic_part_matches_dense() {
    let m = model();
    let p = prompt(300, m.vocab(), 4);
    // k = 300 ≥ every dynamic part (300 + 8 tokens − 4 sinks − 16 window); the cache clamps it.
    for spec in ["oracle:k=300,sinks=4,window=16", "retrieval:index=flat,k=300,sinks=4,window=16,min_index=64"] {
        let mut cache = m.new_cache(spec).unwrap();
        let g = m.greedy_needle(&p, 8, &mut cache).unwrap();
        let diffs = diff_to_dense(&m, &p, &g);
        let worst = diffs.iter().copied().fold(0.0, f32::max);
        eprintln!("{spec}: max |Δlogit| vs dense {worst:.2e}");
        assert!(worst < TOL, "{spec}: logits differ from dense by {diffs:?}");
        // Greedy tokens equal dense greedy on the same sequence.
        let seq: Vec<u32> = p.iter().chain(&g.tokens).copied().collect();
        let dense = to_host(m.forward_dense(&seq[..seq.len() - 1]).unwrap()).unwrap();
        for (i, &tok) in g.tokens.iter().enumerate() {
            let row = p.len() - 1 + i;
            assert_eq!(tok, argmax(&dense[row * m.vocab()..(row + 1) * m.vocab()]).unwrap(), "{spec}: token {i}");
        }
        // The selector ran and took the whole dynamic part.
        let s = cache.stats;
        assert!(s.keys_dynamic > 0 && s.keys_selected == s.keys_dynamic, "{spec}: {s:?}");
        assert_eq!(s.keys_attended, s.keys_total);
    }
}

#[test]
fn wrong_shapes_are_errors_not_panics() {
    let m = model();
    let mut cache = m.new_cache("full").unwrap();
    let dev = Default::default();
    let t = |dims: [usize; 3]| Tensor::<Cpu, 3>::zeros(dims, &dev);
    let s = m.scale();
    // 4 query heads, 2 KV heads, head_dim 16.
    let cases = [
        ("k", t([3, 4, 16]), t([3, 3, 16]), t([3, 2, 16])), // k with 3 KV heads
        ("v", t([3, 4, 16]), t([3, 2, 16]), t([3, 2, 8])),  // v with the wrong head dim
        ("q", t([3, 2, 16]), t([3, 2, 16]), t([3, 2, 16])), // q with KV-head count
        ("k", t([3, 4, 16]), t([2, 2, 16]), t([2, 2, 16])), // k and v for fewer tokens than q
    ];
    for (name, q, k, v) in cases {
        match cached_attention(&mut cache, 0, AttentionStep::Prefill, q, k, v, s) {
            Err(Error::Shape { tensor, .. }) => assert_eq!(tensor, name),
            other => panic!("expected a shape error naming `{name}`, got {other:?}"),
        }
    }
    let e = cached_attention(&mut cache, 7, AttentionStep::Prefill, t([1, 4, 16]), t([1, 2, 16]), t([1, 2, 16]), s);
    assert!(e.is_err(), "layer 7 of 2 was accepted");
    // Nothing was appended by the failed calls.
    assert_eq!(cache.len(), 0);
    // The model's own checks: empty and out-of-vocabulary tokens.
    assert!(matches!(m.forward_needle(&[], &mut cache, AttentionStep::Prefill), Err(Error::EmptyPrompt)));
    assert!(matches!(
        m.forward_needle(&[1, 999], &mut cache, AttentionStep::Prefill),
        Err(Error::TokenOutOfRange { id: 999, .. })
    ));
    assert_eq!(cache.len(), 0);
}

#[test]
fn a_step_that_does_not_fit_the_cache_is_an_error_not_another_attention() {
    let m = model();
    let mut cache = m.new_cache("full").unwrap();
    let p = prompt(20, m.vocab(), 3);
    // A decode (or extend) before the build: the forgotten `build` is named, nothing appended.
    for step in [AttentionStep::Decode, AttentionStep::Extend] {
        let e = m.forward_needle(&p[..1], &mut cache, step).unwrap_err();
        assert!(matches!(e, Error::State(_)) && e.to_string().contains("build"), "{step:?}: {e}");
    }
    assert_eq!(cache.len(), 0);
    m.forward_needle(&p, &mut cache, AttentionStep::Prefill).unwrap();
    // A one-token prefill step is still a prefill: dense, the cache unbuilt.
    m.forward_needle(&[1], &mut cache, AttentionStep::Prefill).unwrap();
    assert!(!cache.is_built());
    cache.build(m.scale()).unwrap();
    let n = cache.len();
    // After the build: no prefill, and a decode step is one token.
    assert!(matches!(m.forward_needle(&[2], &mut cache, AttentionStep::Prefill), Err(Error::State(_))));
    assert!(matches!(
        m.forward_needle(&[2, 3], &mut cache, AttentionStep::Decode),
        Err(Error::InvalidParameter { name, .. }) if name == "q"
    ));
    assert_eq!(cache.len(), n);
    m.forward_needle(&[2], &mut cache, AttentionStep::Decode).unwrap();
    m.forward_needle(&[3, 4], &mut cache, AttentionStep::Extend).unwrap();
    assert_eq!(cache.len(), n + 3);
}
