//! The entry point a Burn model routes its attention through: one call per layer that appends
//! the new keys and values to needle's [`KvCache`] and attends to the cache — causal and dense
//! during prefill, through the cache's selectors (static part + selection, merged by
//! log-sum-exp) at decode. [`Llama`](crate::Llama) uses it for every layer; a model of your own
//! does the same (see `examples/downstream-burn` and docs/burn-integration.md).

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Tensor, TensorData};
use needle_core::RowSource;

use crate::cache::KvCache;
use crate::error::{Error, Result};

/// Reads a tensor back to the host as `f32`.
pub(crate) fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| Error::Data(format!("{e:?}")))
}

/// Attention of `layer` for `t` new tokens through `cache`.
///
/// `q` is `[t, n_q_heads, head_dim]`, `k` and `v` are `[t, n_kv_heads, head_dim]`, all after
/// RoPE (keys are stored as given). The new tokens take positions `cache.layer_len(layer)..`;
/// their keys and values are appended to the cache first, so each query sees itself.
/// When the cache is built (after [`KvCache::build`]) and `t == 1`, this is a decode step through
/// the selectors; otherwise it is causal dense attention over everything cached for the layer
/// (prefill). Returns `[t, n_q_heads * head_dim]`.
///
/// Errors name the tensor whose shape disagrees with the cache's layout.
pub fn cached_attention<B: Backend>(
    cache: &mut KvCache,
    layer: usize,
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    scale: f32,
) -> Result<Tensor<B, 2>> {
    let gqa = cache.gqa();
    let d = cache.head_dim();
    let [t, nh, qd] = q.dims();
    for (name, dims, heads) in [("q", q.dims(), gqa.n_q_heads), ("k", k.dims(), gqa.n_kv_heads), ("v", v.dims(), gqa.n_kv_heads)] {
        if dims != [t, heads, d] {
            return Err(Error::Shape { tensor: name.into(), expected: vec![t, heads, d], got: dims.to_vec() });
        }
    }
    debug_assert_eq!((nh, qd), (gqa.n_q_heads, d));
    let device = q.device();
    let pos0 = cache.layer_len(layer)?;
    cache.append(layer, &to_vec(k)?, &to_vec(v)?)?;
    let decode = t == 1 && cache.is_built();
    let q_host = if decode || cache.wants_queries(layer) { Some(to_vec(q.clone())?) } else { None };
    if let Some(qh) = &q_host {
        cache.observe_queries(layer, pos0, qh);
    }
    if let (true, Some(qh)) = (decode, &q_host) {
        let out = cache.attend_decode(layer, qh, scale)?;
        return Ok(Tensor::from_data(TensorData::new(out, [1, nh * d]), &device));
    }
    let q4 = q.reshape([1, t, nh, d]).swap_dims(1, 2);
    let (k4, v4) = (cached::<B>(cache, layer, false, &device), cached::<B>(cache, layer, true, &device));
    // Burn's attention applies 1/√d by default; a different scale is folded into q.
    let default_scale = 1.0 / (d as f32).sqrt();
    let q4 = if (scale - default_scale).abs() > f32::EPSILON * default_scale { q4.mul_scalar(scale / default_scale) } else { q4 };
    let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
    Ok(attention(q4, k4, v4, None, None, opts).swap_dims(1, 2).reshape([t, nh * d]))
}

/// Keys or values of one layer from the host cache as `[1, n_q_heads, n, dim]`, each KV head
/// repeated over its query group.
fn cached<B: Backend>(cache: &KvCache, layer: usize, values: bool, device: &B::Device) -> Tensor<B, 4> {
    let (gqa, d) = (cache.gqa(), cache.head_dim());
    let n = cache.keys(layer, 0).len();
    let kvh = gqa.n_kv_heads;
    let mut data = Vec::with_capacity(kvh * n * d);
    for j in 0..kvh {
        let rows = if values { cache.values(layer, j) } else { cache.keys(layer, j) };
        for i in 0..n {
            data.extend_from_slice(rows.row(i));
        }
    }
    let t: Tensor<B, 4> = Tensor::from_data(TensorData::new(data, [1, kvh, n, d]), device);
    let g = gqa.group_size();
    t.unsqueeze_dim::<5>(2).expand([1, kvh, g, n, d]).reshape([1, kvh * g, n, d])
}
