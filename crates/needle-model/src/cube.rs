//! The CubeCL arm of [`NeedleBackend`](crate::NeedleBackend): needle-kernels-cubecl on burn's
//! `CubeBackend` (`burn::backend::Wgpu`, `burn::backend::Cuda` without burn's `fusion` feature),
//! compiled with the `wgpu` / `cuda` features only.
//!
//! - Linear weights stay in their GGUF blocks on the device (uploaded once per weight, on first
//!   use, into the [`LinearWeight`]'s device copy, a [`DeviceWeight`]; llama.cpp's RoPE row order is undone at upload by
//!   permuting whole rows) and run through the quantized GEMV kernel, one GEMV per token, for
//!   every block format (the 32-element ones, the K-quants, F16/BF16); F32 weights are an f32
//!   device matrix multiplied with Burn's matmul.
//! - Every layer's KV rows are mirrored on the device ([`DeviceCache`], token-major, f32), held
//!   by the [`KvCache`] (its `KvMirror`) and brought up to date from the host rows before each use (the rows
//!   a step appended, or everything after a cache was loaded or forked).
//! - Prefill attention is the causal flash kernel over that mirror (dense: a sparse prefill
//!   pattern applies on the CPU backend only).
//! - Decode ([`DecodeMode`], per cache: [`KvCache::set_decode_mode`]): `Hybrid` (the default) launches the device kernel over each KV
//!   head's static part (sinks + window) and, while it runs, lets the host select from the
//!   dynamic part and attend to the picked rows ([`KvCache::decode_dynamic`]); one LSE merge on
//!   the device joins the two. `Device` attends the static part and the picked rows in one
//!   gathered device pass.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, IntElement};
use needle_kernels_cpu::QuantType;
use needle_kernels_cubecl::cubecl::prelude::ComputeClient;
use needle_kernels_cubecl::cubecl::server::Handle;
use needle_kernels_cubecl::{DeviceKv, DeviceQMatrix, DeviceRowLists};

use crate::backend::{NeedleBackend, plain};
use crate::cache::{DecodeMode, DynamicPart, KvCache};
use crate::error::{Error, Result};
use crate::weights::{LinearWeight, QWeight};

/// burn's wgpu backend as `burn::backend::Wgpu` names it without the `fusion` feature.
#[cfg(feature = "wgpu")]
pub type WgpuCube = CubeBackend<needle_kernels_cubecl::cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// burn's CUDA backend as `burn::backend::Cuda` names it without the `fusion` feature.
#[cfg(feature = "cuda")]
pub type CudaCube = CubeBackend<needle_kernels_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

type Cb<R, I, BT> = CubeBackend<R, f32, I, BT>;

/// The CubeCL arm: quantized linears and attention on the device, norms, RoPE and SiLU as Burn
/// ops there.
impl<R: CubeRuntime, I: IntElement, BT: BoolElement> NeedleBackend for CubeBackend<R, f32, I, BT> {
    type DeviceWeight = DeviceWeight<R>;
    type KvMirror = DeviceCache<R>;

    fn fuses_linear() -> bool {
        true
    }

    fn qlinear(x: Tensor<Self, 2>, w: &LinearWeight<DeviceWeight<R>>) -> Result<Tensor<Self, 2>> {
        qlinear_on(x, w)
    }

    fn qlinear_many(x: Tensor<Self, 2>, ws: &[&LinearWeight<DeviceWeight<R>>]) -> Result<Vec<Tensor<Self, 2>>> {
        ws.iter().map(|w| qlinear_on(x.clone(), w)).collect()
    }

    fn fused_rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 2>, eps: f32) -> Result<Tensor<Self, 2>> {
        Ok(plain::rms_norm(x, w, eps))
    }

    fn fused_rope(x: Tensor<Self, 3>, cos: &Tensor<Self, 2>, sin: &Tensor<Self, 2>) -> Result<Tensor<Self, 3>> {
        Ok(plain::rope(x, cos, sin))
    }

    fn fused_silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Result<Tensor<Self, 2>> {
        Ok(plain::silu_mul(gate, up))
    }

    fn paged_attention(
        cache: &mut KvCache<DeviceCache<R>>,
        layer: usize,
        q: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>> {
        prefill_on(q, cache, layer, scale)
    }

    fn decode_attention(
        cache: &mut KvCache<DeviceCache<R>>,
        layer: usize,
        pos: usize,
        q: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>> {
        decode_on(q, cache, layer, pos, scale)
    }

    fn with_host<const D: usize, T>(t: Tensor<Self, D>, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
        Ok(f(&plain::to_vec(t)?))
    }
}

fn kernel_err(what: &str) -> impl FnOnce(needle_kernels_cubecl::Error) -> Error + '_ {
    move |e| Error::State(format!("{what} on the device: {e}"))
}

/// `t`'s device tensor, contiguous.
fn primitive<R: CubeRuntime, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<Cb<R, I, BT>, D>,
) -> CubeTensor<R> {
    let p = t.into_primitive().tensor();
    if p.is_contiguous() { p } else { into_contiguous(p) }
}

/// A contiguous f32 tensor over `handle`.
fn wrap<R: CubeRuntime, I: IntElement, BT: BoolElement, const D: usize>(
    like: &CubeTensor<R>,
    handle: Handle,
    shape: [usize; D],
) -> Tensor<Cb<R, I, BT>, D> {
    let t =
        CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), Shape::from(shape), handle, DType::F32);
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn f32_buffer<R: CubeRuntime>(client: &ComputeClient<R>, n: usize) -> Handle {
    client.empty(n.max(1) * size_of::<f32>())
}

fn upload<R: CubeRuntime>(client: &ComputeClient<R>, data: &[f32]) -> Handle {
    // WebGPU rejects zero-sized bindings.
    client.create_from_slice(bytemuck::cast_slice(if data.is_empty() { &[0.0f32][..] } else { data }))
}

/// A linear weight on the device (the CubeCL arm's [`NeedleBackend::DeviceWeight`]).
pub struct DeviceWeight<R: CubeRuntime>(DeviceWeightKind<R>);

impl<R: CubeRuntime> std::fmt::Debug for DeviceWeight<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            DeviceWeightKind::Blocks(_) => "DeviceWeight::Blocks",
            DeviceWeightKind::Dense(_) => "DeviceWeight::Dense",
        })
    }
}

enum DeviceWeightKind<R: CubeRuntime> {
    /// The GGUF blocks, rows in Hugging Face order.
    Blocks(DeviceQMatrix),
    /// Transposed, `[cols, rows]` f32 (F32 weights).
    Dense(Box<CubeTensor<R>>),
}

fn upload_weight<R: CubeRuntime>(like: &CubeTensor<R>, w: &QWeight) -> Result<DeviceWeight<R>> {
    let (rows, cols) = (w.rows(), w.cols());
    if w.ty() != QuantType::F32 {
        let m = w.matrix()?;
        let mut bytes = Vec::with_capacity(w.bytes());
        for r in 0..rows {
            bytes.extend_from_slice(m.row_bytes(stored_row(r, rows, w.rope_heads())));
        }
        let q = DeviceQMatrix::upload(&like.client, w.ty(), rows, cols, &bytes).map_err(kernel_err(w.name()))?;
        return Ok(DeviceWeight(DeviceWeightKind::Blocks(q)));
    }
    let hf = w.dequantize()?;
    let mut t = vec![0f32; rows * cols];
    for (r, row) in hf.chunks_exact(cols.max(1)).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            t[c * rows + r] = x;
        }
    }
    let h = upload(&like.client, &t);
    let shape = Shape::from([cols, rows]);
    Ok(DeviceWeight(DeviceWeightKind::Dense(Box::new(CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        h,
        DType::F32,
    )))))
}

/// The stored row holding Hugging Face output row `r`: llama.cpp keeps each of `heads` heads of
/// a q/k projection interleaved (`2i + s`), Hugging Face halved (`s·d/2 + i`).
fn stored_row(r: usize, rows: usize, heads: Option<usize>) -> usize {
    let Some(heads) = heads else { return r };
    let d = rows / heads;
    let (head, o) = (r / d, r % d);
    let (s, i) = (o / (d / 2), o % (d / 2));
    head * d + 2 * i + s
}

fn qlinear_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    x: Tensor<Cb<R, I, BT>, 2>,
    w: &LinearWeight<DeviceWeight<R>>,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let [t, _] = x.dims();
    w.check_input(x.dims())?;
    let xp = primitive(x);
    match &w.device_copy(|w| upload_weight(&xp, w))?.0 {
        DeviceWeightKind::Blocks(m) => {
            let y = f32_buffer(&xp.client, t * w.rows());
            needle_kernels_cubecl::launch_gemm(&xp.client, m, &xp.handle, &y, t).map_err(kernel_err(w.name()))?;
            Ok(wrap(&xp, y, [t, w.rows()]))
        }
        DeviceWeightKind::Dense(wt) => {
            let x = Tensor::<Cb<R, I, BT>, 2>::from_primitive(TensorPrimitive::Float(xp));
            Ok(x.matmul(Tensor::from_primitive(TensorPrimitive::Float((**wt).clone()))))
        }
    }
}

/// Every layer's KV rows on one device (the CubeCL arm's [`NeedleBackend::KvMirror`]), filled
/// from the cache's host rows as they are appended.
pub struct DeviceCache<R> {
    layers: Vec<Option<DeviceKv>>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R> Default for DeviceCache<R> {
    fn default() -> Self {
        Self { layers: Vec::new(), _runtime: PhantomData }
    }
}

impl<R: CubeRuntime> DeviceCache<R> {
    /// `layer`'s device rows, first brought up to `cache`'s length.
    fn sync(&mut self, cache: &KvCache<Self>, layer: usize, client: &ComputeClient<R>) -> Result<&DeviceKv> {
        let (n, gqa, d) = (cache.layer_len(layer)?, cache.gqa(), cache.head_dim());
        if self.layers.len() != cache.n_layers() {
            self.layers = (0..cache.n_layers()).map(|_| None).collect();
        }
        let kv = &mut self.layers[layer];
        if kv.as_ref().is_some_and(|kv| kv.n_rows > n) {
            *kv = None;
        }
        if kv.is_none() {
            *kv = Some(DeviceKv::with_capacity(client, n.max(1), gqa.n_kv_heads, d).map_err(kernel_err("KV mirror"))?);
        }
        let kv = kv.as_mut().ok_or_else(|| Error::State("device KV mirror missing".into()))?;
        if kv.n_rows < n {
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for i in kv.n_rows..n {
                for j in 0..gqa.n_kv_heads {
                    needle_core::RowSource::row(cache.keys(layer, j), i).extend_into(&mut ks);
                    needle_core::RowSource::row(cache.values(layer, j), i).extend_into(&mut vs);
                }
            }
            if n > kv.capacity {
                kv.reserve(client, n.max(2 * kv.capacity)).map_err(kernel_err("KV mirror"))?;
            }
            kv.append(client, &ks, &vs).map_err(kernel_err("KV mirror"))?;
        }
        Ok(kv)
    }
}

/// Runs `f` on `layer`'s device rows, first brought up to the host cache's length.
fn with_rows<R: CubeRuntime, T>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    client: &ComputeClient<R>,
    f: impl FnOnce(&DeviceKv) -> Result<T>,
) -> Result<T> {
    // The mirror is taken out while it reads the host rows; an error leaves an empty one,
    // rebuilt on the next use.
    let mut mirror = std::mem::take(&mut cache.mirror);
    let out = mirror.sync(cache, layer, client).and_then(f);
    cache.mirror = mirror;
    out
}

static DENSE_PREFILL_SAID: AtomicBool = AtomicBool::new(false);

fn prefill_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    q: Tensor<Cb<R, I, BT>, 3>,
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let [t, nh, d] = q.dims();
    let n = cache.layer_len(layer)?;
    let gqa = cache.gqa();
    if [nh, d] != [gqa.n_q_heads, cache.head_dim()] || t > n || t == 0 {
        return Err(Error::Shape {
            tensor: "q".into(),
            expected: vec![t.min(n), gqa.n_q_heads, cache.head_dim()],
            got: vec![t, nh, d],
        });
    }
    if cache.config().prefill.pattern().is_some() && !DENSE_PREFILL_SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!("sparse prefill patterns run on the CPU backend only: this GPU prefill attends densely");
    }
    let qp = primitive(q);
    let out = f32_buffer(&qp.client, t * nh * d);
    let lse = f32_buffer(&qp.client, t * nh);
    with_rows(cache, layer, &qp.client, |kv| {
        needle_kernels_cubecl::launch_prefill(&qp.client, kv, &qp.handle, nh, t, n - t, scale, &out, &lse)
            .map_err(kernel_err("prefill attention"))
    })?;
    Ok(wrap(&qp, out, [t, nh * d]))
}

fn decode_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    q: Tensor<Cb<R, I, BT>, 3>,
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    pos: usize,
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let [t, nh, d] = q.dims();
    let gqa = cache.gqa();
    if [t, nh, d] != [1, gqa.n_q_heads, cache.head_dim()] {
        return Err(Error::Shape {
            tensor: "q".into(),
            expected: vec![1, gqa.n_q_heads, cache.head_dim()],
            got: vec![t, nh, d],
        });
    }
    let qp = primitive(q);
    let client = qp.client.clone();
    // The host selects with the queries: the one read-back of the step.
    let qs = plain::to_vec(Tensor::<Cb<R, I, BT>, 3>::from_primitive(TensorPrimitive::Float(qp.clone())))?;
    cache.observe_queries(layer, pos, &qs);
    let n = cache.layer_len(layer)?;
    let statics: Vec<Vec<u32>> =
        (0..gqa.n_kv_heads).map(|j| cache.static_part(layer, j).static_ids(n).collect()).collect();
    let out = f32_buffer(&client, nh * d);
    let lse = f32_buffer(&client, nh);
    let launch =
        |kv: &DeviceKv, lists: &[&[u32]], log_w: Option<&[&[f32]]>, out: &Handle, lse: &Handle| -> Result<()> {
            let lists =
                DeviceRowLists::upload(&client, lists, log_w, kv.n_rows).map_err(kernel_err("decode id lists"))?;
            needle_kernels_cubecl::launch_decode(
                &client,
                kv,
                &qp.handle,
                nh,
                &lists,
                scale,
                needle_kernels_cubecl::decode::DEFAULT_CHUNK_ROWS,
                out,
                lse,
            )
            .map_err(kernel_err("decode attention"))
        };
    match cache.decode_mode() {
        DecodeMode::Hybrid => {
            let (o_s, l_s) = (f32_buffer(&client, nh * d), f32_buffer(&client, nh));
            let static_lists: Vec<&[u32]> = statics.iter().map(Vec::as_slice).collect();
            with_rows(cache, layer, &client, |kv| launch(kv, &static_lists, None, &o_s, &l_s))?;
            // Start the device now: the host's selection and attention below overlap it.
            client.flush().map_err(|e| Error::State(format!("device flush: {e:?}")))?;
            let part = cache.decode_dynamic(layer, &qs, scale, true)?;
            let (ho, hl) = part.host.ok_or_else(|| Error::State("decode_dynamic: no host partial".into()))?;
            let (ho, hl) = (upload(&client, &ho), upload(&client, &hl));
            needle_kernels_cubecl::launch_lse_merge(&client, nh, d, &o_s, &l_s, &ho, &hl, &out, &lse)
                .map_err(kernel_err("LSE merge"))?;
        }
        DecodeMode::Device => {
            let DynamicPart { ids, log_weights, .. } = cache.decode_dynamic(layer, &qs, scale, false)?;
            let weighted = log_weights.iter().any(|w| !w.is_empty());
            let lists: Vec<Vec<u32>> = statics.iter().zip(&ids).map(|(s, p)| [&s[..], &p[..]].concat()).collect();
            let weights: Vec<Vec<f32>> = statics
                .iter()
                .zip(&ids)
                .zip(&log_weights)
                .map(|((s, p), w)| {
                    let mut v = vec![0f32; s.len()];
                    if w.is_empty() {
                        v.resize(s.len() + p.len(), 0.0)
                    } else {
                        v.extend_from_slice(w)
                    }
                    v
                })
                .collect();
            let lists_r: Vec<&[u32]> = lists.iter().map(Vec::as_slice).collect();
            let weights_r: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
            with_rows(cache, layer, &client, |kv| {
                launch(kv, &lists_r, weighted.then_some(&weights_r[..]), &out, &lse)
            })?;
        }
    }
    Ok(wrap(&qp, out, [1, nh * d]))
}

#[cfg(test)]
mod tests {
    use super::stored_row;

    #[test]
    fn stored_rows_undo_the_llama_cpp_rope_order() {
        // Two heads of 4: HF rows (h, s, i) ↔ stored h·4 + 2i + s.
        let got: Vec<usize> = (0..8).map(|r| stored_row(r, 8, Some(2))).collect();
        assert_eq!(got, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!((0..5).map(|r| stored_row(r, 5, None)).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    }
}
