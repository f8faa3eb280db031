//! The entry point a Burn model routes its attention through: one call per layer that appends
//! the new keys and values to needle's [`KvCache`] and attends to the cache — causal and dense
//! during prefill, through the cache's selectors (static part + selection, merged by
//! log-sum-exp) at decode. [`Llama`](crate::Llama) uses it for every layer; a model of your own
//! does the same (see `examples/downstream-burn` and docs/burn-integration.md).

use burn::tensor::Tensor;

use crate::backend::NeedleBackend;
use crate::cache::KvCache;
use crate::error::{Error, Result};

/// Attention of `layer` for `t` new tokens through `cache`.
///
/// `q` is `[t, n_q_heads, head_dim]`, `k` and `v` are `[t, n_kv_heads, head_dim]`, all after
/// RoPE (keys are stored as given). The new tokens take positions `cache.layer_len(layer)..`;
/// their keys and values are appended to the cache first, so each query sees itself.
/// When the cache is built (after [`KvCache::build`]) and `t == 1`, this is a decode step through
/// the selectors; otherwise it is causal dense attention over everything cached for the layer
/// (prefill). Returns `[t, n_q_heads * head_dim]`.
///
/// Before a prefill, call [`KvCache::plan_training`] with the prompt length so that only a
/// strided sample of prefill queries is kept as the selectors' training queries (without it
/// every position's queries are kept), and so that each layer's selectors start building in the
/// background once the prompt has passed it ([`KvCache::set_build_during_prefill`]).
///
/// Runs on the backend's [`NeedleBackend`] ops: on the CPU backend the tensors are read in place
/// and prefill attention reads the cache's pages without copying them.
///
/// Errors name the tensor whose shape disagrees with the cache's layout.
pub fn cached_attention<B: NeedleBackend>(
    cache: &mut KvCache<B::KvMirror>,
    layer: usize,
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
    let pos0 = cache.layer_len(layer)?;
    B::with_host(k, |ks| B::with_host(v, |vs| cache.append(layer, ks, vs)))???;
    if t == 1 && cache.is_built() {
        return B::decode_attention(cache, layer, pos0, q, scale);
    }
    if cache.wants_queries(layer) {
        B::with_host(q.clone(), |qs| cache.observe_queries(layer, pos0, qs))?;
    }
    let out = B::paged_attention(cache, layer, q, scale)?;
    cache.layer_prefilled(layer, scale)?;
    Ok(out)
}
