//! The entry point a Burn model routes its attention through: one call per layer that appends
//! the new keys and values to needle's [`KvCache`] and attends to the cache — causal and dense
//! during prefill, through the cache's selectors (static part + selection, merged by
//! log-sum-exp) at decode, as the caller's [`AttentionStep`] says. [`Llama`](crate::Llama) uses it for every layer; a model of your own
//! does the same (see `examples/downstream-burn` and docs/burn-integration.md).

use burn::tensor::{Tensor, TensorData};

use crate::backend::NeedleBackend;
use crate::cache::{KvCache, LayerKind};
use crate::error::{Error, Result};

/// What a [`cached_attention`] call is, in the cache's lifecycle: prefill while the cache is
/// not built, then (after [`KvCache::build`]) decode steps and dense chunks. Said by the
/// caller, never guessed from the shapes: a call that does not fit the cache's state is an
/// error ([`Error::State`]) rather than another kind of attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionStep {
    /// A chunk of the prompt (any number of tokens), before the build: causal dense attention
    /// (or the prefill pattern's), the queries sampled for the selectors' training.
    Prefill,
    /// One token after the build: the static part and what the selectors pick, merged exactly.
    Decode,
    /// A chunk (any number of tokens) after the build, e.g. a question after a saved document
    /// ([`Llama::extend`](crate::Llama::extend)): causal dense attention; the tokens that leave
    /// the window join the selectors as decode tokens do.
    Extend,
}

/// Attention of `layer` for `t` new tokens through `cache`, as `step` says.
///
/// `q` is `[t, n_q_heads, head_dim]`, `k` and `v` are `[t, n_kv_heads, head_dim]`, all after
/// RoPE (keys are stored as given). The new tokens take positions `cache.layer_len(layer)..`;
/// their keys and values are appended to the cache first, so each query sees itself.
/// Returns `[t, n_q_heads * head_dim]`.
///
/// The lifecycle: [`AttentionStep::Prefill`] chunks until the prompt is in, then
/// [`KvCache::build`], then [`AttentionStep::Decode`] steps (one token) or
/// [`AttentionStep::Extend`] chunks. A prefill after the build, a decode or extend before it
/// (a forgotten `build`) or a decode of several tokens is an error, and nothing is appended.
///
/// Before a prefill, call [`KvCache::plan_training`] with the prompt length so that only a
/// strided sample of prefill queries is kept as the selectors' training queries (without it
/// every position's queries are kept), and so that each layer's selectors start building in the
/// background once the prompt has passed it ([`KvCache::set_build_during_prefill`]).
///
/// Runs on the backend's [`NeedleBackend`] ops: on the CPU backend the tensors are read in place
/// and prefill attention reads the cache's pages without copying them.
///
/// A sliding-window layer ([`LayerKind::Window`]) attends densely, on the host, to the window
/// ending at each query, whatever the step; its rows go to the layer's ring.
///
/// Errors name the tensor whose shape disagrees with the cache's layout.
pub fn cached_attention<B: NeedleBackend>(
    cache: &mut KvCache<B::KvMirror>,
    layer: usize,
    step: AttentionStep,
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    scale: f32,
) -> Result<Tensor<B, 2>> {
    let gqa = cache.gqa();
    let d = cache.head_dim();
    let [t, ..] = q.dims();
    for (name, dims, heads) in
        [("q", q.dims(), gqa.n_q_heads), ("k", k.dims(), gqa.n_kv_heads), ("v", v.dims(), gqa.n_kv_heads)]
    {
        if dims != [t, heads, d] {
            return Err(Error::Shape { tensor: name.into(), expected: vec![t, heads, d], got: dims.to_vec() });
        }
    }
    check_step(cache, step, t)?;
    let window = matches!(cache.layer_kind(layer), LayerKind::Window(_));
    match step {
        AttentionStep::Decode if !window => return B::decode_step(cache, layer, q, k, v, scale),
        AttentionStep::Decode => {}
        // A chunk reads and appends host rows: rows a device decode kept back join them first.
        _ => B::settle_host_rows(cache)?,
    }
    if let LayerKind::Window(_) = cache.layer_kind(layer) {
        let (device, n_out) = (q.device(), gqa.n_q_heads * d);
        let out = B::with_host(q, |qs| {
            B::with_host(k, |ks| B::with_host(v, |vs| window_step(cache, layer, qs, ks, vs, scale)))
        })????;
        return Ok(Tensor::from_data(TensorData::new(out, [t, n_out]), &device));
    }
    let pos0 = cache.layer_len(layer)?;
    B::with_host(k, |ks| B::with_host(v, |vs| cache.append(layer, ks, vs)))???;
    if cache.wants_queries(layer) {
        B::with_host(q.clone(), |qs| cache.observe_queries(layer, pos0, qs))?;
    }
    let out = B::paged_attention(cache, layer, q, scale)?;
    cache.layer_prefilled(layer, scale)?;
    Ok(out)
}

/// The lifecycle rules of a step of `t` tokens: prefill before the build, decode (one token) and
/// extend after it.
fn check_step<M>(cache: &KvCache<M>, step: AttentionStep, t: usize) -> Result<()> {
    match (step, cache.is_built()) {
        (AttentionStep::Prefill, true) => {
            return Err(Error::State(
                "a prefill step on a built cache: after KvCache::build, feed tokens as Decode or Extend steps".into(),
            ));
        }
        (AttentionStep::Decode | AttentionStep::Extend, false) => {
            return Err(Error::State(format!(
                "a {step:?} step on a cache whose selectors are not built: call KvCache::build after the prefill"
            )));
        }
        (AttentionStep::Decode, true) if t != 1 => {
            return Err(Error::invalid(
                "q",
                format!("a decode step attends one token, not {t}: feed a chunk as an Extend step"),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// A sliding-window layer's step, any kind: dense over the ring and the new rows, on the host;
/// then the rows join the ring.
fn window_step<M>(
    cache: &mut KvCache<M>,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> Result<Vec<f32>> {
    let out = cache.attend_window(layer, q, k, v, scale)?;
    cache.append(layer, k, v)?;
    Ok(out)
}

/// [`cached_attention`]'s decode step of one token on the host: `q` (`n_q_heads × dim`), `k` and
/// `v` (`n_kv_heads × dim`) appended to and attended through `cache`, as the CPU backend runs it.
fn host_decode_step<M>(
    cache: &mut KvCache<M>,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> Result<Vec<f32>> {
    check_step(cache, AttentionStep::Decode, 1)?;
    if let LayerKind::Window(_) = cache.layer_kind(layer) {
        return window_step(cache, layer, q, k, v, scale);
    }
    let pos0 = cache.layer_len(layer)?;
    cache.append(layer, k, v)?;
    cache.observe_queries(layer, pos0, q);
    cache.attend_decode(layer, q, scale)
}

/// Decode attention of one new token per sequence on the host (the CPU backend's
/// [`NeedleBackend::decode_attention_rows`]): row `i` of `q` (`n × n_q_heads × dim`), `k` and `v`
/// (`n × n_kv_heads × dim`) through `caches[i]`, each exactly as a lone decode step; the
/// sequences run in parallel on the kernels' [`Pool`](needle_kernels_cpu::Pool) (each cache
/// is its own). Returns `n × n_q_heads × dim`, row after row.
pub(crate) fn host_decode_rows<M: Send>(
    caches: &mut [&mut KvCache<M>],
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> Result<Vec<f32>> {
    let n = caches.len();
    let Some(first) = caches.first() else { return Ok(Vec::new()) };
    let (gqa, d) = (first.gqa(), first.head_dim());
    let (qn, kn) = (gqa.n_q_heads * d, gqa.n_kv_heads * d);
    for (name, got, row) in [("q", q.len(), qn), ("k", k.len(), kn), ("v", v.len(), kn)] {
        if got != n * row {
            return Err(Error::Shape { tensor: name.into(), expected: vec![n, row], got: vec![got] });
        }
    }
    if let Some(i) = caches.iter().position(|c| c.gqa() != gqa || c.head_dim() != d) {
        return Err(Error::invalid(
            "caches",
            format!("sequence {i}'s cache has another head layout than sequence 0's"),
        ));
    }
    let pool = needle_kernels_cpu::Pool::global();
    // Sequences share rows only where they read one context's pages (its first row among them):
    // otherwise each attends alone, in one parallel region.
    let shared = caches.iter().enumerate().any(|(i, a)| {
        let first = a.first_row_addr(layer);
        first.is_some() && caches[..i].iter().any(|b| b.first_row_addr(layer) == first)
    });
    if !shared || caches.iter().any(|c| matches!(c.layer_kind(layer), LayerKind::Window(_))) {
        let outs = pool.map_mut(caches, |i, cache| {
            let (qi, ki, vi) = (&q[i * qn..(i + 1) * qn], &k[i * kn..(i + 1) * kn], &v[i * kn..(i + 1) * kn]);
            host_decode_step(cache, layer, qi, ki, vi, scale)
        });
        let mut out = Vec::with_capacity(n * qn);
        for o in outs {
            out.extend_from_slice(&o?);
        }
        return Ok(out);
    }
    // Each sequence appends and selects, in parallel; then one region attends for all of them
    // (rows they share read once), each as its lone step would.
    let selected = pool.map_mut(caches, |i, cache| {
        let (qi, ki, vi) = (&q[i * qn..(i + 1) * qn], &k[i * kn..(i + 1) * kn], &v[i * kn..(i + 1) * kn]);
        check_step(cache, AttentionStep::Decode, 1)?;
        let pos0 = cache.layer_len(layer)?;
        cache.append(layer, ki, vi)?;
        cache.observe_queries(layer, pos0, qi);
        cache.select_decode(layer, qi, scale)
    });
    selected.into_iter().collect::<Result<Vec<()>>>()?;
    KvCache::attend_decode_many(caches, layer, q, scale)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use needle_core::{FullSelector, GqaLayout};

    use super::*;
    use crate::Cpu;
    use crate::cache::SelectionConfig;

    fn t(n: usize, heads: usize, seed: f32) -> Tensor<Cpu, 3> {
        let data: Vec<f32> = (0..n * heads * 8).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        Tensor::from_data(TensorData::new(data, [n, heads, 8]), &Default::default())
    }

    /// Each step that does not fit the cache's state is an error and appends nothing; the
    /// steps that fit run.
    #[test]
    fn misused_steps_are_errors_and_append_nothing() {
        let config = SelectionConfig { budget: needle_core::Budget::TopK(2), ..SelectionConfig::default() };
        let mut cache: KvCache = KvCache::new(1, GqaLayout::new(4, 2).unwrap(), 8, &FullSelector, config).unwrap();
        let step = |c: &mut KvCache, s: AttentionStep, n: usize| {
            cached_attention(c, 0, s, t(n, 4, 1.0), t(n, 2, 2.0), t(n, 2, 3.0), 0.3)
        };
        // Before the build: a one-token decode (the forgotten `build`) and an extend.
        for s in [AttentionStep::Decode, AttentionStep::Extend] {
            assert!(matches!(step(&mut cache, s, 1), Err(Error::State(_))), "{s:?} before the build");
        }
        assert_eq!(cache.len(), 0);
        step(&mut cache, AttentionStep::Prefill, 6).unwrap();
        step(&mut cache, AttentionStep::Prefill, 1).unwrap();
        assert_eq!(cache.len(), 7);
        cache.build(0.3).unwrap();
        // After it: a prefill, and a decode of two tokens.
        assert!(matches!(step(&mut cache, AttentionStep::Prefill, 1), Err(Error::State(_))));
        assert!(matches!(step(&mut cache, AttentionStep::Decode, 2), Err(Error::InvalidParameter { .. })));
        assert_eq!(cache.len(), 7);
        step(&mut cache, AttentionStep::Decode, 1).unwrap();
        step(&mut cache, AttentionStep::Extend, 3).unwrap();
        assert_eq!(cache.len(), 11);
        assert_eq!(cache.stats.keys_total, 8 * 2, "one decode step over 8 keys, 2 KV heads");
    }
}
