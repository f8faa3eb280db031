//! [`NeedleBackend`]: the few fused ops a decoder needs, as a Burn backend extension (the
//! pattern of burn's `examples/custom-cubecl-kernel`): a linear on weights kept in their GGUF
//! blocks, causal prefill attention over the [`KvCache`]'s pages, decode attention through its
//! selectors, RMSNorm, rotate-half RoPE, SiLU·up, and reading a tensor on the host.
//!
//! Which implementation runs is chosen at build time, by type:
//! - [`Flex`] (= [`Cpu`](crate::Cpu)): needle-kernels-cpu on Flex's host buffers. Inputs are
//!   read in place when contiguous; outputs are fresh buffers wrapped without a copy. Linear
//!   weights stay in their blocks (memory-mapped), prefill attention reads the cache's pages in
//!   place (no copy of the cache, no GQA expansion).
//! - burn's `CubeBackend<R, f32, I, BT>` (`Wgpu` and `Cuda` without burn's fusion; features
//!   `wgpu`, `cuda`): needle-kernels-cubecl (module `cube`): linear weights stay in their blocks
//!   on the device ([`NeedleBackend::DeviceWeight`]), prefill and decode attention run over a
//!   device copy of the cache's rows ([`NeedleBackend::KvMirror`]), decode as a hybrid step
//!   (device static part, host selection, one merge); norms, RoPE and SiLU are Burn ops.
//! - `Autodiff<B>` (feature `autodiff`): `B`'s ops on the inner tensors. Inference only: the
//!   results are new leaves, so no gradient flows through these ops (train with the plain ops
//!   of your own layers instead).
//! - any other backend: [`plain_backend!`](crate::plain_backend) gives it the [`plain`] Burn-op
//!   implementations in one line (linear weights are dequantized to f32 parameters at load,
//!   [`NeedleBackend::fuses_linear`] is false). The [`plain`] ops are also the reference the
//!   fast paths are tested against.
//!
//! Generic code (the model, [`cached_attention`](crate::cached_attention), generation) is
//! bounded on `B: NeedleBackend`, so mixing backends is a type error, and a backend without an
//! implementation does not compile rather than silently taking a slow path.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use needle_core::Pages as CachePages;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern, plan_chunk};
use needle_kernels_cpu::attn::KvElem;
use needle_kernels_cpu::{BlockLayout, Pages, flash_prefill, ops, sparse_prefill};
use needle_kv::PageBuf;
use rayon::prelude::*;

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::weights::{LinearWeight, QWeight};

/// A Burn backend with needle's fused decoder ops. Implemented for [`Flex`], burn's CubeCL
/// backends (features `wgpu`, `cuda`) and `Autodiff<B>` (feature `autodiff`); any other
/// backend gets the plain Burn-op version with [`plain_backend!`](crate::plain_backend).
pub trait NeedleBackend: Backend {
    /// The device copy of a linear weight (`()` on host backends), made on first use and held
    /// by the model beside the host [`QWeight`] ([`LinearWeight`]).
    type DeviceWeight: Send + Sync + std::fmt::Debug + 'static;

    /// The device copy of a cache's KV rows (`()` on host backends), held by the cache
    /// ([`KvCache<Self::KvMirror>`](KvCache)) and rebuilt from its host rows when behind.
    type KvMirror: Default + Send + 'static;

    /// True when [`NeedleBackend::qlinear`] multiplies the stored blocks directly (the model then
    /// keeps weights quantized); false when weights should be dequantized to f32 at load.
    fn fuses_linear() -> bool;

    /// `x · Wᵀ`: `x` is `[t, w.cols()]`, the result `[t, w.rows()]`.
    fn qlinear(x: Tensor<Self, 2>, w: &LinearWeight<Self::DeviceWeight>) -> Result<Tensor<Self, 2>>;

    /// `x · W_iᵀ` for several weights sharing the input `x` (`[t, cols]`), e.g. a layer's q, k
    /// and v: one call so a backend can quantize the input once and run one parallel loop.
    fn qlinear_many(x: Tensor<Self, 2>, ws: &[&LinearWeight<Self::DeviceWeight>]) -> Result<Vec<Tensor<Self, 2>>>;

    /// RMSNorm of each row of `x` (`[t, n]`) scaled by `w` (`[1, n]`).
    fn fused_rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 2>, eps: f32) -> Result<Tensor<Self, 2>>;

    /// Rotate-half RoPE of `x` (`[t, heads, dim]`) with `cos`/`sin` tables `[t, dim/2]` (row `i`
    /// for the position of token `i`; see [`Rope::half_tables`](crate::Rope::half_tables)).
    fn fused_rope(x: Tensor<Self, 3>, cos: &Tensor<Self, 2>, sin: &Tensor<Self, 2>) -> Result<Tensor<Self, 3>>;

    /// `silu(gate) ⊙ up`, both `[t, n]`.
    fn fused_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Result<Tensor<Self, 2>>;

    /// `gelu(gate) ⊙ up` (Gemma's GeGLU, GELU in its tanh form), both `[t, n]`. The default is
    /// [`plain::gelu_mul`]'s Burn ops; the CPU backend runs one vectorized kernel.
    fn fused_gelu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Result<Tensor<Self, 2>> {
        Ok(plain::gelu_mul(gate, up))
    }

    /// Causal attention of the last `t` tokens of `layer` in `cache` (their keys and values are
    /// already appended) with queries `q` (`[t, n_q_heads, dim]`, after RoPE); query head `h`
    /// reads KV head `h / group`. Returns `[t, n_q_heads · dim]`. A sparse prefill pattern's
    /// block counts go to the cache's stats.
    fn paged_attention(
        cache: &mut KvCache<Self::KvMirror>,
        layer: usize,
        q: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>>;

    /// One decode step's attention of `layer` through the cache's selectors (static part +
    /// selection, merged exactly), the token's keys and values already appended; `q` is
    /// `[1, n_q_heads, dim]` at position `pos`. Returns `[1, n_q_heads · dim]`.
    fn decode_attention(
        cache: &mut KvCache<Self::KvMirror>,
        layer: usize,
        pos: usize,
        q: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>>;

    /// One decode step of `layer` as [`cached_attention`](crate::cached_attention) runs it for
    /// [`AttentionStep::Decode`](crate::AttentionStep::Decode): appends the token's keys and
    /// values (`k`, `v`: `[1, n_kv_heads, dim]`, after RoPE) to the cache, then
    /// [`decode_attention`](Self::decode_attention). The default reads `k` and `v` to the host
    /// first. A device backend may keep them on the device and append them to the host rows
    /// later in the step, once for all layers; after the step's last layer the host rows are
    /// complete ([`settle_host_rows`](Self::settle_host_rows) completes them earlier).
    fn decode_step(
        cache: &mut KvCache<Self::KvMirror>,
        layer: usize,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>> {
        let pos = cache.layer_len(layer)?;
        Self::with_host(k, |ks| Self::with_host(v, |vs| cache.append(layer, ks, vs)))???;
        Self::decode_attention(cache, layer, pos, q, scale)
    }

    /// Appends to the host rows whatever [`decode_step`](Self::decode_step) has kept on the
    /// device so far (nothing on host backends).
    fn settle_host_rows(_cache: &mut KvCache<Self::KvMirror>) -> Result<()> {
        Ok(())
    }

    /// Calls `f` with the values of `t` (row-major f32) on the host: in place when the backend
    /// holds them there contiguously, else read back.
    fn with_host<const D: usize, R>(t: Tensor<Self, D>, f: impl FnOnce(&[f32]) -> R) -> Result<R>;

    /// `x` (`[n, cols]`: one decode row per sequence of a batch) through the weights `ws`, each
    /// row computed exactly as [`qlinear`](Self::qlinear) (one weight) or
    /// [`qlinear_many`](Self::qlinear_many) computes a lone decode row, so that a batch gives every
    /// sequence the bits it gets alone ([`Llama::decode_batch`](crate::Llama::decode_batch)).
    /// The default runs the rows one by one; the CPU backend reads each weight once for all rows.
    fn qlinear_rows(x: Tensor<Self, 2>, ws: &[&LinearWeight<Self::DeviceWeight>]) -> Result<Vec<Tensor<Self, 2>>> {
        let n = x.dims()[0];
        let mut per: Vec<Vec<Tensor<Self, 2>>> = vec![Vec::with_capacity(n); ws.len()];
        for i in 0..n {
            let row = x.clone().narrow(0, i, 1);
            let ys = if let [w] = ws { vec![Self::qlinear(row, w)?] } else { Self::qlinear_many(row, ws)? };
            for (p, y) in per.iter_mut().zip(ys) {
                p.push(y);
            }
        }
        Ok(per.into_iter().map(|ys| Tensor::cat(ys, 0)).collect())
    }

    /// Decode attention of `layer` for one new token per sequence of a batch: row `i` of `q`
    /// (`[n, n_q_heads, dim]`), `k` and `v` (`[n, n_kv_heads, dim]`, after RoPE) goes to and
    /// through `caches[i]` exactly as [`cached_attention`](crate::cached_attention) with
    /// [`AttentionStep::Decode`](crate::AttentionStep::Decode) takes a lone decode token.
    /// Returns `[n, n_q_heads · dim]`. The default runs the rows one by one; the CPU backend reads
    /// the tensors once and runs the sequences in parallel ([`crate::attention::host_decode_rows`]).
    fn decode_attention_rows(
        caches: &mut [&mut KvCache<Self::KvMirror>],
        layer: usize,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>> {
        use crate::attention::{AttentionStep, cached_attention};
        let mut outs = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let row = |t: &Tensor<Self, 3>| t.clone().narrow(0, i, 1);
            outs.push(cached_attention(cache, layer, AttentionStep::Decode, row(&q), row(&k), row(&v), scale)?);
        }
        Ok(Tensor::cat(outs, 0))
    }
}

impl NeedleBackend for Flex {
    type DeviceWeight = ();
    type KvMirror = ();

    fn fuses_linear() -> bool {
        true
    }

    fn qlinear(x: Tensor<Flex, 2>, w: &LinearWeight) -> Result<Tensor<Flex, 2>> {
        flex::qlinear(x, w.weight())
    }

    fn qlinear_many(x: Tensor<Flex, 2>, ws: &[&LinearWeight]) -> Result<Vec<Tensor<Flex, 2>>> {
        let ws: Vec<&QWeight> = ws.iter().map(|w| w.weight()).collect();
        flex::qlinear_many(x, &ws)
    }

    fn qlinear_rows(x: Tensor<Flex, 2>, ws: &[&LinearWeight]) -> Result<Vec<Tensor<Flex, 2>>> {
        let ws: Vec<&QWeight> = ws.iter().map(|w| w.weight()).collect();
        flex::qlinear_rows(x, &ws)
    }

    fn fused_rms_norm(x: Tensor<Flex, 2>, w: &Tensor<Flex, 2>, eps: f32) -> Result<Tensor<Flex, 2>> {
        flex::rms_norm(x, w, eps)
    }

    fn fused_rope(x: Tensor<Flex, 3>, cos: &Tensor<Flex, 2>, sin: &Tensor<Flex, 2>) -> Result<Tensor<Flex, 3>> {
        flex::rope(x, cos, sin)
    }

    fn fused_silu_mul(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Result<Tensor<Flex, 2>> {
        flex::silu_mul(gate, up)
    }

    fn fused_gelu_mul(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Result<Tensor<Flex, 2>> {
        flex::gelu_mul(gate, up)
    }

    fn paged_attention(cache: &mut KvCache, layer: usize, q: Tensor<Flex, 3>, scale: f32) -> Result<Tensor<Flex, 2>> {
        flex::prefill_attention(cache, layer, q, scale)
    }

    fn decode_attention(
        cache: &mut KvCache,
        layer: usize,
        pos: usize,
        q: Tensor<Flex, 3>,
        scale: f32,
    ) -> Result<Tensor<Flex, 2>> {
        host_decode::<Flex>(cache, layer, pos, q, scale)
    }

    fn with_host<const D: usize, R>(t: Tensor<Flex, D>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        flex::read_host(&t, f)
    }

    fn decode_attention_rows(
        caches: &mut [&mut KvCache],
        layer: usize,
        q: Tensor<Flex, 3>,
        k: Tensor<Flex, 3>,
        v: Tensor<Flex, 3>,
        scale: f32,
    ) -> Result<Tensor<Flex, 2>> {
        let [n, nh, d] = q.dims();
        let out = flex::read_host(&q, |qs| {
            flex::read_host(&k, |ks| {
                flex::read_host(&v, |vs| crate::attention::host_decode_rows(caches, layer, qs, ks, vs, scale))
            })
        })????;
        Ok(flex::from_vec(out, [n, nh * d]))
    }
}

/// [`NeedleBackend::decode_attention`] on the host: the queries read with `B::with_host` (in
/// place on Flex), the cache's selectors and host attention, the output sent back to `q`'s
/// device. Every host backend's decode, and the reference of the device arms.
pub fn host_decode<B: NeedleBackend>(
    cache: &mut KvCache<B::KvMirror>,
    layer: usize,
    pos: usize,
    q: Tensor<B, 3>,
    scale: f32,
) -> Result<Tensor<B, 2>> {
    let [_, nh, d] = q.dims();
    let device = q.device();
    let out = B::with_host(q, |qs| {
        cache.observe_queries(layer, pos, qs);
        cache.attend_decode(layer, qs, scale)
    })??;
    Ok(Tensor::from_data(TensorData::new(out, [1, nh * d]), &device))
}

/// Gives backend types the plain Burn-op [`NeedleBackend`] ([`plain`]; weights dequantized to
/// f32 at load, attention over a copy of the cache, decode on the host): a backend type of your
/// crate becomes usable with [`Llama`](crate::Llama) and
/// [`cached_attention`](crate::cached_attention) in one line. Rust's orphan rule allows it for
/// backend types your crate defines (needle-model implements the extension for burn's own
/// backends it knows).
///
/// ```ignore
/// needle_model::plain_backend!(MyBackend);
/// ```
#[macro_export]
macro_rules! plain_backend {
    ($($backend:ty),+ $(,)?) => {$(
        impl $crate::NeedleBackend for $backend {
            type DeviceWeight = ();
            type KvMirror = ();

            fn fuses_linear() -> bool {
                false
            }

            fn qlinear(
                x: $crate::backend::__burn::tensor::Tensor<Self, 2>,
                w: &$crate::LinearWeight,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 2>> {
                $crate::backend::plain::qlinear(x, w.weight())
            }

            fn qlinear_many(
                x: $crate::backend::__burn::tensor::Tensor<Self, 2>,
                ws: &[&$crate::LinearWeight],
            ) -> $crate::Result<::std::vec::Vec<$crate::backend::__burn::tensor::Tensor<Self, 2>>> {
                ws.iter().map(|w| $crate::backend::plain::qlinear(x.clone(), w.weight())).collect()
            }

            fn fused_rms_norm(
                x: $crate::backend::__burn::tensor::Tensor<Self, 2>,
                w: &$crate::backend::__burn::tensor::Tensor<Self, 2>,
                eps: f32,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 2>> {
                Ok($crate::backend::plain::rms_norm(x, w, eps))
            }

            fn fused_rope(
                x: $crate::backend::__burn::tensor::Tensor<Self, 3>,
                cos: &$crate::backend::__burn::tensor::Tensor<Self, 2>,
                sin: &$crate::backend::__burn::tensor::Tensor<Self, 2>,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 3>> {
                Ok($crate::backend::plain::rope(x, cos, sin))
            }

            fn fused_silu_mul(
                gate: $crate::backend::__burn::tensor::Tensor<Self, 2>,
                up: $crate::backend::__burn::tensor::Tensor<Self, 2>,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 2>> {
                Ok($crate::backend::plain::silu_mul(gate, up))
            }

            fn paged_attention(
                cache: &mut $crate::KvCache,
                layer: usize,
                q: $crate::backend::__burn::tensor::Tensor<Self, 3>,
                scale: f32,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 2>> {
                $crate::backend::plain::prefill_attention(cache, layer, q, scale)
            }

            fn decode_attention(
                cache: &mut $crate::KvCache,
                layer: usize,
                pos: usize,
                q: $crate::backend::__burn::tensor::Tensor<Self, 3>,
                scale: f32,
            ) -> $crate::Result<$crate::backend::__burn::tensor::Tensor<Self, 2>> {
                $crate::backend::host_decode::<Self>(cache, layer, pos, q, scale)
            }

            fn with_host<const D: usize, R>(
                t: $crate::backend::__burn::tensor::Tensor<Self, D>,
                f: impl FnOnce(&[f32]) -> R,
            ) -> $crate::Result<R> {
                Ok(f(&$crate::backend::plain::to_vec(t)?))
            }
        }
    )+};
}

/// The burn crate the [`plain_backend!`](crate::plain_backend) expansion names (so a caller
/// needs no `burn` of its own in scope).
#[doc(hidden)]
pub use burn as __burn;

/// `Autodiff<B>` runs `B`'s ops on the inner tensors: forward only (the outputs are new leaves
/// of the graph; nothing is differentiated through needle's ops).
#[cfg(feature = "autodiff")]
mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;

    use super::*;

    impl<B: NeedleBackend, C: CheckpointStrategy> NeedleBackend for Autodiff<B, C> {
        type DeviceWeight = B::DeviceWeight;
        type KvMirror = B::KvMirror;

        fn fuses_linear() -> bool {
            B::fuses_linear()
        }

        fn qlinear(x: Tensor<Self, 2>, w: &LinearWeight<B::DeviceWeight>) -> Result<Tensor<Self, 2>> {
            B::qlinear(x.inner(), w).map(Tensor::from_inner)
        }

        fn qlinear_many(x: Tensor<Self, 2>, ws: &[&LinearWeight<B::DeviceWeight>]) -> Result<Vec<Tensor<Self, 2>>> {
            Ok(B::qlinear_many(x.inner(), ws)?.into_iter().map(Tensor::from_inner).collect())
        }

        fn fused_rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 2>, eps: f32) -> Result<Tensor<Self, 2>> {
            B::fused_rms_norm(x.inner(), &w.clone().inner(), eps).map(Tensor::from_inner)
        }

        fn fused_rope(x: Tensor<Self, 3>, cos: &Tensor<Self, 2>, sin: &Tensor<Self, 2>) -> Result<Tensor<Self, 3>> {
            B::fused_rope(x.inner(), &cos.clone().inner(), &sin.clone().inner()).map(Tensor::from_inner)
        }

        fn fused_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Result<Tensor<Self, 2>> {
            B::fused_silu_mul(gate.inner(), up.inner()).map(Tensor::from_inner)
        }

        fn paged_attention(
            cache: &mut KvCache<B::KvMirror>,
            layer: usize,
            q: Tensor<Self, 3>,
            scale: f32,
        ) -> Result<Tensor<Self, 2>> {
            B::paged_attention(cache, layer, q.inner(), scale).map(Tensor::from_inner)
        }

        fn decode_attention(
            cache: &mut KvCache<B::KvMirror>,
            layer: usize,
            pos: usize,
            q: Tensor<Self, 3>,
            scale: f32,
        ) -> Result<Tensor<Self, 2>> {
            B::decode_attention(cache, layer, pos, q.inner(), scale).map(Tensor::from_inner)
        }

        fn with_host<const D: usize, R>(t: Tensor<Self, D>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
            B::with_host(t.inner(), f)
        }
    }
}

/// The Flex implementations: needle-kernels-cpu on Flex's host buffers.
pub mod flex {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorPrimitive;

    use super::*;

    fn primitive<const D: usize>(t: &Tensor<Flex, D>) -> FlexTensor {
        // O(1): clones the Arc of the buffer.
        t.clone().into_primitive().tensor()
    }

    /// Calls `f` with `t`'s f32 values, in place when contiguous f32 (else converted once).
    pub fn read_host<const D: usize, R>(t: &Tensor<Flex, D>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let p = primitive(t);
        if let Some(s) = p.as_slice::<f32>() {
            return Ok(f(s));
        }
        Ok(f(&super::plain::to_vec(t.clone())?))
    }

    /// A Flex tensor owning `data` (no copy).
    pub fn from_vec<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(TensorData::new(data, shape))))
    }

    /// [`NeedleBackend::qlinear`] with [`QMatrix::gemm`](needle_kernels_cpu::QMatrix::gemm).
    pub fn qlinear(x: Tensor<Flex, 2>, w: &QWeight) -> Result<Tensor<Flex, 2>> {
        let [t, _] = x.dims();
        w.check_input(x.dims())?;
        let y = read_host(&x, |xs| w.forward(xs, t))??;
        Ok(from_vec(y, [t, w.rows()]))
    }

    /// [`NeedleBackend::qlinear_many`] with [`QWeight::forward_many`].
    pub fn qlinear_many(x: Tensor<Flex, 2>, ws: &[&QWeight]) -> Result<Vec<Tensor<Flex, 2>>> {
        let [t, _] = x.dims();
        ws.iter().try_for_each(|w| w.check_input(x.dims()))?;
        let ys = read_host(&x, |xs| QWeight::forward_many(ws, xs, t))??;
        Ok(ys.into_iter().zip(ws).map(|(y, w)| from_vec(y, [t, w.rows()])).collect())
    }

    /// [`NeedleBackend::qlinear_rows`] with [`QWeight::forward_rows`].
    pub fn qlinear_rows(x: Tensor<Flex, 2>, ws: &[&QWeight]) -> Result<Vec<Tensor<Flex, 2>>> {
        let [t, _] = x.dims();
        ws.iter().try_for_each(|w| w.check_input(x.dims()))?;
        let ys = read_host(&x, |xs| QWeight::forward_rows(ws, xs, t))??;
        Ok(ys.into_iter().zip(ws).map(|(y, w)| from_vec(y, [t, w.rows()])).collect())
    }

    /// [`NeedleBackend::fused_rms_norm`] with [`ops::rms_norm`].
    pub fn rms_norm(x: Tensor<Flex, 2>, w: &Tensor<Flex, 2>, eps: f32) -> Result<Tensor<Flex, 2>> {
        let dims = x.dims();
        let mut out = vec![0f32; dims[0] * dims[1]];
        read_host(&x, |xs| read_host(w, |ws| ops::rms_norm(xs, ws, eps, &mut out)))??
            .map_err(|e| Error::kernel("rms_norm", e))?;
        Ok(from_vec(out, dims))
    }

    /// [`NeedleBackend::fused_rope`] with [`ops::rope`].
    pub fn rope(x: Tensor<Flex, 3>, cos: &Tensor<Flex, 2>, sin: &Tensor<Flex, 2>) -> Result<Tensor<Flex, 3>> {
        let [t, h, d] = x.dims();
        if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
            return Err(Error::Shape {
                tensor: "rope cos/sin".into(),
                expected: vec![t, d / 2],
                got: cos.dims().to_vec(),
            });
        }
        let mut out = read_host(&x, <[f32]>::to_vec)?;
        read_host(cos, |c| read_host(sin, |s| ops::rope(&mut out, h, d, 0, c, s)))??
            .map_err(|e| Error::kernel("rope", e))?;
        Ok(from_vec(out, [t, h, d]))
    }

    /// [`NeedleBackend::fused_silu_mul`] with [`ops::silu_mul`].
    pub fn silu_mul(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Result<Tensor<Flex, 2>> {
        gated(gate, up, "silu_mul", ops::silu_mul)
    }

    /// [`NeedleBackend::fused_gelu_mul`] with [`ops::gelu_mul`].
    pub fn gelu_mul(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Result<Tensor<Flex, 2>> {
        gated(gate, up, "gelu_mul", ops::gelu_mul)
    }

    /// `op(gate) ⊙ up` by a kernel of needle-kernels-cpu, in a copy of `gate`.
    fn gated(
        gate: Tensor<Flex, 2>,
        up: Tensor<Flex, 2>,
        name: &str,
        op: fn(&mut [f32], &[f32]) -> needle_kernels_cpu::Result<()>,
    ) -> Result<Tensor<Flex, 2>> {
        let dims = gate.dims();
        if up.dims() != dims {
            return Err(Error::Shape { tensor: "up".into(), expected: dims.to_vec(), got: up.dims().to_vec() });
        }
        let mut g = read_host(&gate, <[f32]>::to_vec)?;
        read_host(&up, |u| op(&mut g, u))?.map_err(|e| Error::kernel(name, e))?;
        Ok(from_vec(g, dims))
    }

    /// [`NeedleBackend::paged_attention`] with [`flash_prefill`] over the cache's pages, read
    /// in place; during a prefill with a pattern (`SelectionConfig::prefill`), with
    /// [`sparse_prefill`] over the key blocks the pattern chooses per KV head. Chunks fed to a
    /// built cache (`Llama::extend`: a question after a document) stay dense.
    pub fn prefill_attention<M: Default>(
        cache: &mut KvCache<M>,
        layer: usize,
        q: Tensor<Flex, 3>,
        scale: f32,
    ) -> Result<Tensor<Flex, 2>> {
        let [t, nh, d] = q.dims();
        let n = cache.layer_len(layer)?;
        let (gqa, hd) = (cache.gqa(), cache.head_dim());
        if [nh, d] != [gqa.n_q_heads, hd] || t > n {
            return Err(Error::Shape {
                tensor: "q".into(),
                expected: vec![t.min(n), gqa.n_q_heads, hd],
                got: vec![t, nh, d],
            });
        }
        let pages = |values: bool| -> Vec<&CachePages> {
            (0..gqa.n_kv_heads)
                .map(|j| if values { cache.values(layer, j) } else { cache.keys(layer, j) }.pages())
                .collect()
        };
        let (kp, vp) = (pages(false), pages(true));
        let page_rows = cache.keys(layer, 0).page_size();
        let mut out = vec![0f32; t * nh * d];
        let shape = PageShape { page_rows, len: n, dim: d };
        let pattern = cache.config().prefill.pattern().filter(|_| !cache.is_built());
        let pattern_on = pattern.is_some();
        let run = |qs: &[f32]| -> Result<(u64, u64)> {
            let masks = pattern.map(|p| plan_masks(cache, layer, p, qs, n - t, scale)).transpose()?;
            let blocks = masks.as_deref().map_or((0, 0), density);
            let layouts: Option<Vec<BlockLayout<'_>>> =
                masks.as_ref().map(|m| m.iter().map(crate::decode::block_layout).collect());
            let layouts = layouts.as_deref();
            match kp.first() {
                Some(CachePages::F16(_)) => {
                    prefill_typed(qs, &kp, &vp, as_f16, shape, &mut out, n - t, nh, scale, layouts)
                }
                Some(CachePages::Q8(_)) => {
                    // The prefill kernels read f32 or f16: this layer's q8 pages are widened
                    // for the chunk.
                    let (kw, vw) = (widen_q8(&kp, d), widen_q8(&vp, d));
                    let (kw, vw): (Vec<&CachePages>, Vec<&CachePages>) = (kw.iter().collect(), vw.iter().collect());
                    prefill_typed(qs, &kw, &vw, as_f32, shape, &mut out, n - t, nh, scale, layouts)
                }
                _ => prefill_typed(qs, &kp, &vp, as_f32, shape, &mut out, n - t, nh, scale, layouts),
            }
            .map_err(|e| Error::kernel("prefill attention", e))?;
            Ok(blocks)
        };
        let (attended, dense) = read_host(&q, run)??;
        if pattern_on {
            cache.count_prefill_blocks(attended, dense);
        }
        Ok(from_vec(out, [t, nh * d]))
    }
}

/// Key blocks attended and key blocks a dense causal prefill would attend, summed over `masks`
/// (what [`KvCache::count_prefill_blocks`] adds up).
pub(crate) fn density(masks: &[BlockMask]) -> (u64, u64) {
    masks.iter().map(BlockMask::density).fold((0, 0), |(a, b), (kept, all)| (a + kept as u64, b + all as u64))
}

/// The pattern's block mask of each of `layer`'s KV heads for a chunk of `queries` (positions
/// `pos0..`), the heads in parallel. Every backend's sparse prefill plans through it.
pub(crate) fn plan_masks<M>(
    cache: &KvCache<M>,
    layer: usize,
    pattern: &dyn PrefillPattern,
    queries: &[f32],
    pos0: usize,
    scale: f32,
) -> Result<Vec<BlockMask>> {
    let (gqa, dim, prompt_end) = (cache.gqa(), cache.head_dim(), cache.prompt_end());
    let keys: Vec<&needle_core::PagedRows> = (0..gqa.n_kv_heads).map(|j| cache.keys(layer, j)).collect();
    let masks = keys
        .par_iter()
        .enumerate()
        .map(|(kv_head, &keys)| {
            let chunk = PrefillChunk {
                layer,
                kv_head,
                queries,
                n_q_heads: gqa.n_q_heads,
                heads: gqa.group(kv_head),
                dim,
                pos0,
                keys,
                scale,
                prompt_end,
            };
            plan_chunk(pattern, &chunk)
        })
        .collect::<needle_core::Result<Vec<_>>>()?;
    Ok(masks)
}

/// Rows per page, rows in all and elements per row of one layer's cached pages.
#[derive(Clone, Copy)]
struct PageShape {
    page_rows: usize,
    len: usize,
    dim: usize,
}

/// [`flash_prefill`] (or [`sparse_prefill`] over `layouts`, one per KV head) over cached pages of
/// one stored precision `T` (`pick` yields no pages for a head stored otherwise, which then fails
/// the kernel's length check).
#[allow(clippy::too_many_arguments)]
fn prefill_typed<'a, T: KvElem + bytemuck::Pod>(
    queries: &[f32],
    keys: &[&'a CachePages],
    values: &[&'a CachePages],
    pick: fn(&'a CachePages) -> &'a [PageBuf<T>],
    shape: PageShape,
    out: &mut [f32],
    first_pos: usize,
    n_q_heads: usize,
    scale: f32,
    layouts: Option<&[BlockLayout<'_>]>,
) -> std::result::Result<(), needle_kernels_cpu::Error> {
    let slices = |heads: &[&'a CachePages]| -> Vec<Vec<&'a [T]>> {
        heads.iter().map(|p| pick(p).iter().map(|b| &b[..]).collect()).collect()
    };
    let (ks, vs) = (slices(keys), slices(values));
    let PageShape { page_rows, len, dim } = shape;
    let k: Vec<Pages<'_, T>> = ks.iter().map(|pages| Pages { pages, page_rows, len, dim }).collect();
    let v: Vec<Pages<'_, T>> = vs.iter().map(|pages| Pages { pages, page_rows, len, dim }).collect();
    match layouts {
        Some(l) => sparse_prefill(queries, &k, &v, out, first_pos, n_q_heads, scale, l),
        None => flash_prefill(queries, &k, &v, out, first_pos, n_q_heads, scale),
    }
}

fn as_f32(p: &CachePages) -> &[PageBuf<f32>] {
    if let CachePages::F32(v) = p { v } else { &[] }
}

/// `q8` pages (rows of `dim` numbers) as `f32` pages of the same rows.
fn widen_q8(heads: &[&CachePages], dim: usize) -> Vec<CachePages> {
    let stride = needle_core::KvDtype::Q8.row_bytes(dim);
    let widen = |page: &PageBuf<u8>| -> PageBuf<f32> {
        let mut rows = Vec::with_capacity(page.len() / stride * dim);
        page.chunks_exact(stride).for_each(|r| needle_core::Row::Q8(r).extend_into(&mut rows));
        PageBuf::host(rows.into_boxed_slice())
    };
    heads
        .iter()
        .map(|p| CachePages::F32(if let CachePages::Q8(v) = p { v.iter().map(widen).collect() } else { Vec::new() }))
        .collect()
}

fn as_f16(p: &CachePages) -> &[PageBuf<half::f16>] {
    if let CachePages::F16(v) = p { v } else { &[] }
}

/// The plain Burn-op implementations: what [`plain_backend!`](crate::plain_backend) gives a
/// backend, and the reference the Flex and CubeCL kernels are tested against.
pub mod plain {
    use burn::tensor::activation::silu;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use needle_core::RowSource;

    use super::*;

    /// Reads a tensor back to the host as `f32`.
    pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
        t.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| Error::Data(format!("{e:?}")))
    }

    /// `x · Wᵀ` with `W` dequantized to f32 on every call (slow: the model dequantizes once at
    /// load instead on backends without fused linears).
    pub fn qlinear<B: Backend>(x: Tensor<B, 2>, w: &QWeight) -> Result<Tensor<B, 2>> {
        let wt = Tensor::<B, 2>::from_data(TensorData::new(w.dequantize()?, [w.rows(), w.cols()]), &x.device());
        Ok(x.matmul(wt.transpose()))
    }

    /// RMSNorm with Burn ops.
    pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>, eps: f32) -> Tensor<B, 2> {
        let ms = x.clone().square().mean_dim(1);
        x * ms.add_scalar(eps).sqrt().recip() * w.clone()
    }

    /// Rotate-half RoPE with Burn ops on `[t, heads, dim]` and half tables `[t, dim/2]`.
    pub fn rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        let [t, h, d] = x.dims();
        let full = |c: &Tensor<B, 2>| Tensor::cat(vec![c.clone(), c.clone()], 1).reshape([t, 1, d]).expand([t, h, d]);
        rope_full(x, &full(cos), &full(sin))
    }

    /// Rotate-half RoPE with full tables `[t, heads, dim]` (halves repeated).
    pub fn rope_full<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        let [t, h, d] = x.dims();
        let x1 = x.clone().slice([0..t, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..t, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * cos.clone().expand([t, h, d]) + rotated * sin.clone().expand([t, h, d])
    }

    /// `silu(gate) ⊙ up` with Burn ops.
    pub fn silu_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
        silu(gate) * up
    }

    /// `gelu(gate) ⊙ up` with Burn ops, GELU in its tanh form,
    /// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (ggml's `gelu`; llama.cpp's CPU build reads
    /// it from a table of f16 values).
    pub fn gelu_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        let x = gate;
        let inner = (x.clone() + x.clone() * x.clone() * x.clone() * 0.044_715) * SQRT_2_OVER_PI;
        x * (inner.tanh() + 1.0) * 0.5 * up
    }

    /// Causal attention with Burn's attention op over a copy of the layer's cache, each KV head
    /// repeated over its query group.
    pub fn prefill_attention<B: Backend, M>(
        cache: &KvCache<M>,
        layer: usize,
        q: Tensor<B, 3>,
        scale: f32,
    ) -> Result<Tensor<B, 2>> {
        let [t, nh, d] = q.dims();
        let n = cache.layer_len(layer)?;
        if t > n {
            return Err(Error::Shape { tensor: "q".into(), expected: vec![n, nh, d], got: vec![t, nh, d] });
        }
        let device = q.device();
        let q4 = q.reshape([1, t, nh, d]).swap_dims(1, 2);
        let (k4, v4) = (cached::<B, M>(cache, layer, false, &device), cached::<B, M>(cache, layer, true, &device));
        // Burn's attention applies 1/√d by default; a different scale is folded into q.
        let default_scale = 1.0 / (d as f32).sqrt();
        let q4 = if (scale - default_scale).abs() > f32::EPSILON * default_scale {
            q4.mul_scalar(scale / default_scale)
        } else {
            q4
        };
        // Burn's causal mask is aligned to the last key: query i sees keys 0..=n - t + i.
        let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        Ok(attention(q4, k4, v4, None, None, opts).swap_dims(1, 2).reshape([t, nh * d]))
    }

    /// Keys or values of one layer from the host cache as `[1, n_q_heads, n, dim]`.
    fn cached<B: Backend, M>(cache: &KvCache<M>, layer: usize, values: bool, device: &B::Device) -> Tensor<B, 4> {
        let (gqa, d) = (cache.gqa(), cache.head_dim());
        let n = cache.keys(layer, 0).len();
        let kvh = gqa.n_kv_heads;
        let mut data = Vec::with_capacity(kvh * n * d);
        for j in 0..kvh {
            let rows = if values { cache.values(layer, j) } else { cache.keys(layer, j) };
            for i in 0..n {
                rows.row(i).extend_into(&mut data);
            }
        }
        let t: Tensor<B, 4> = Tensor::from_data(TensorData::new(data, [1, kvh, n, d]), device);
        let g = gqa.group_size();
        t.unsqueeze_dim::<5>(2).expand([1, kvh, g, n, d]).reshape([1, kvh * g, n, d])
    }
}

// A backend needle-model has no arm for, given the plain ops in one line (the test below).
#[cfg(test)]
crate::plain_backend!(burn::backend::NdArray);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use needle_core::prefill::PrefillSpec;
    use needle_core::{FullSelector, GqaLayout, KvDtype};

    use super::*;
    use crate::cache::SelectionConfig;

    /// Marks nothing (`all` false) or every block: sinks, diagonal and the last block only, or dense.
    #[derive(Debug)]
    struct Fixed {
        all: bool,
    }

    impl PrefillPattern for Fixed {
        fn describe(&self) -> String {
            format!("fixed:{}", self.all)
        }
        fn block(&self) -> usize {
            32
        }
        fn choose(&self, _: &PrefillChunk<'_>, mask: &mut BlockMask) -> needle_core::Result<()> {
            if self.all {
                mask.query_blocks().for_each(|qb| mask.add_all(qb));
            }
            Ok(())
        }
    }

    static ALL: Fixed = Fixed { all: true };
    static NONE: Fixed = Fixed { all: false };

    #[test]
    fn a_prefill_pattern_routes_the_chunk_through_the_sparse_kernel() {
        let (gqa, d, pos0, t) = (GqaLayout::new(6, 2).unwrap(), 16, 100, 200);
        for kv in [KvDtype::F32, KvDtype::F16] {
            let mut rand = crate::testutil::uniform(0x9e37_79b9u32);
            let (k, v, q) = (rand((pos0 + t) * 2 * d), rand((pos0 + t) * 2 * d), rand(t * 6 * d));
            let run = |prefill: PrefillSpec| -> (Vec<f32>, (u64, u64)) {
                let config = SelectionConfig { kv, prefill, ..SelectionConfig::default() };
                let mut cache: KvCache = KvCache::new(1, gqa, d, &FullSelector, config).unwrap();
                cache.append(0, &k, &v).unwrap();
                let q = Tensor::<Flex, 3>::from_data(TensorData::new(q.clone(), [t, 6, d]), &Default::default());
                let out = plain::to_vec(flex::prefill_attention(&mut cache, 0, q, 0.3).unwrap()).unwrap();
                (out, (cache.stats.prefill_blocks, cache.stats.prefill_blocks_dense))
            };
            let (dense, none) = run(PrefillSpec::DENSE);
            assert_eq!(none, (0, 0), "{kv}: a dense prefill counts no sparse blocks");
            let (all, (kept, of)) = run(PrefillSpec::new(&ALL));
            assert_eq!(all, dense, "{kv}: every block is dense prefill");
            assert_eq!(kept, of, "{kv}: every block attended");
            let (sparse, (kept, of)) = run(PrefillSpec::new(&NONE));
            assert!(kept > 0 && of > kept, "{kv}: {kept} of {of} blocks");
            let row = 6 * d;
            // Positions 288..300 are the chunk's last query block: dense; position 200 (block 6)
            // saw only blocks 0 and 6.
            assert_eq!(sparse[(288 - pos0) * row..], dense[(288 - pos0) * row..], "{kv}");
            assert_ne!(sparse[(200 - pos0) * row..][..row], dense[(200 - pos0) * row..][..row], "{kv}");
        }
    }

    /// The plain ops on another backend (NdArray, through `plain_backend!`) against Flex's
    /// kernels: prefill and decode attention through a cache, and a random-weight model end to
    /// end (f32 weights: `fuses_linear` is false there).
    #[test]
    fn plain_backend_gives_another_backend_the_reference_ops() {
        use burn::backend::NdArray;
        use needle_loader::LlamaConfig;

        use crate::{AttentionStep, Llama, LoadOptions, Weights, cached_attention};

        assert!(!<NdArray as NeedleBackend>::fuses_linear());
        let (gqa, d, n) = (GqaLayout::new(4, 2).unwrap(), 16, 40);
        let mut rand = crate::testutil::uniform(0x1234_5678u32);
        let (k, v, q) = (rand(n * 2 * d), rand(n * 2 * d), rand(n * 4 * d));
        let (k1, v1, q1) = (rand(2 * d), rand(2 * d), rand(4 * d));
        fn run<B: NeedleBackend<KvMirror = ()>>(
            kv: [&[f32]; 4],
            q: [&[f32]; 2],
            gqa: GqaLayout,
            d: usize,
        ) -> (Vec<f32>, Vec<f32>) {
            let dev = Default::default();
            let t = |x: &[f32], h: usize| {
                Tensor::<B, 3>::from_data(TensorData::new(x.to_vec(), [x.len() / h / d, h, d]), &dev)
            };
            let config = SelectionConfig { budget: needle_core::Budget::TopK(8), ..SelectionConfig::default() };
            let mut cache: KvCache = KvCache::new(1, gqa, d, &FullSelector, config).unwrap();
            let pre = cached_attention::<B>(
                &mut cache,
                0,
                AttentionStep::Prefill,
                t(q[0], 4),
                t(kv[0], 2),
                t(kv[1], 2),
                0.25,
            )
            .unwrap();
            cache.build(0.25).unwrap();
            let dec =
                cached_attention::<B>(&mut cache, 0, AttentionStep::Decode, t(q[1], 4), t(kv[2], 2), t(kv[3], 2), 0.25)
                    .unwrap();
            (plain::to_vec(pre).unwrap(), plain::to_vec(dec).unwrap())
        }
        let want = run::<Flex>([&k, &v, &k1, &v1], [&q, &q1], gqa, d);
        let got = run::<NdArray>([&k, &v, &k1, &v1], [&q, &q1], gqa, d);
        for (name, a, b) in [("prefill", &want.0, &got.0), ("decode", &want.1, &got.1)] {
            let e = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(e < 1e-4, "{name}: max |Δ| {e}");
        }

        let mut cfg = LlamaConfig::preset("smollm2-135m").unwrap();
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (64, 32, 48, 2);
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 8);
        let ck = needle_loader::Checkpoint::random(&cfg, needle_kernels_cpu::QuantType::Q8_0, 3).unwrap();
        let f32_weights = LoadOptions { weights: Weights::F32 };
        let cpu = Llama::<Flex>::load_with(&ck, &Default::default(), &f32_weights).unwrap();
        let other = Llama::<NdArray>::load(&ck, &Default::default()).unwrap();
        assert_eq!(other.weights(), Weights::F32, "a plain backend dequantizes at load");
        let prompt: Vec<u32> = (0..9).map(|i| (i * 7 % 64) as u32).collect();
        let logits = |m: &dyn Fn(&mut KvCache) -> Vec<f32>| {
            let config = SelectionConfig { budget: needle_core::Budget::TopK(4), ..SelectionConfig::default() };
            let mut c: KvCache = KvCache::new(2, GqaLayout::new(4, 2).unwrap(), 8, &FullSelector, config).unwrap();
            m(&mut c)
        };
        let a = logits(&|c| cpu.prefill(&prompt, c, 4, &[8], &mut |_, _| {}).unwrap());
        let b = logits(&|c| other.prefill(&prompt, c, 4, &[8], &mut |_, _| {}).unwrap());
        let e = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(e < 1e-3, "model logits: max |Δ| {e}");
    }
}
