//! The CubeCL arm of [`NeedleBackend`](crate::NeedleBackend): needle-kernels-cubecl on burn's
//! `CubeBackend` (`burn::backend::Wgpu`, `burn::backend::Cuda` without burn's `fusion` feature),
//! compiled with the `wgpu` / `cuda` features only.
//!
//! - Linear weights stay in their GGUF blocks on the device (uploaded once per weight, on first
//!   use, into the [`LinearWeight`]'s device copy, a [`DeviceWeight`]; llama.cpp's RoPE row order is undone at upload by
//!   permuting whole rows) and run through the quantized kernels for every block format (the
//!   32-element ones, the K-quants, F16/BF16): the GEMV for one token (decode), the tiled GEMM
//!   for a prefill chunk (each weight tile dequantized once in shared memory for up to 32
//!   tokens); F32 weights are an f32 device matrix multiplied with Burn's matmul.
//! - Every layer's KV rows are mirrored on the device ([`DeviceCache`], token-major, in the
//!   cache's f32 or f16, over several buffers past the device's largest), held by the
//!   [`KvCache`] (its `KvMirror`) and brought up to date from the host rows before each use (the
//!   rows a prefill chunk appended, or everything after a cache was loaded or forked); a decode
//!   step copies its token's row in on the device (`decode_step_on`). Under a device budget a
//!   layer keeps its sinks and a ring of recent rows; decode attends the rest on the host and
//!   merges ([`attend_lists`]).
//! - Prefill attention is the causal flash kernel over that mirror, or with a prefill pattern
//!   the block-sparse one over the key blocks the CPU path's planner chooses (`prefill_on`); the
//!   CPU kernel (dense or sparse) when the layer's rows are not all in the device's first buffer.
//! - Decode ([`DecodeMode`], per cache: [`KvCache::set_decode_mode`]): `Hybrid` (the default) launches the device kernel over each KV
//!   head's static part (sinks + window) and, while it runs, lets the host select from the
//!   dynamic part and attend to the picked rows ([`KvCache::decode_dynamic`]); one LSE merge on
//!   the device joins the two. `Device` attends the static part and the picked rows in one
//!   gathered device pass. A layer with no dynamic part reads nothing back: its row reaches the
//!   host rows with the other such layers' in one read at the step's end (`settle`).

use std::marker::PhantomData;

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, IntElement};
use needle_core::KvDtype;
use needle_kernels_cpu::QuantType;
use needle_kernels_cubecl::cubecl::prelude::ComputeClient;
use needle_kernels_cubecl::cubecl::server::Handle;
use needle_kernels_cubecl::{DeviceKv, DeviceQMatrix, KvFormat, KvStore};

use crate::backend::{NeedleBackend, plain};
use crate::cache::{DecodeMode, DynamicPart, KvCache, LayerKind};
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

    fn decode_step(
        cache: &mut KvCache<DeviceCache<R>>,
        layer: usize,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        scale: f32,
    ) -> Result<Tensor<Self, 2>> {
        decode_step_on(cache, layer, q, k, v, scale)
    }

    fn settle_host_rows(cache: &mut KvCache<DeviceCache<R>>) -> Result<()> {
        settle(cache)
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
/// from the cache's host rows as they are appended, or by a decode step straight from the
/// device ([`NeedleBackend::decode_step`]), which may leave the host rows behind until the
/// step's end.
///
/// Rows are stored in the cache's KV precision (f32, or f16 for `--kv f16`; a q8 cache's
/// dequantized rows in f32: [`mirror_format`]) in a [`KvStore`] per layer, split into several buffers past the device's largest one. Under a
/// device budget (`--kv-budget device=…`) each layer keeps its sinks and a ring of its most
/// recent rows; rows that leave the ring are dropped from the device and attended on the host.
pub struct DeviceCache<R: CubeRuntime> {
    layers: Vec<Option<LayerRows>>,
    /// Per layer: a decode row written on the device and not yet appended to the host rows.
    pending: Vec<Option<Pending<R>>>,
    /// Slots per device buffer when set (tests force several buffers with it); else the
    /// device's largest buffer.
    segment_slots: Option<usize>,
    _runtime: PhantomData<fn() -> R>,
}

/// One layer's rows on the device and where each lives.
struct LayerRows {
    store: KvStore,
    /// Rows mirrored (the host's, plus a pending decode row).
    n_rows: usize,
    /// Under a device budget: rows below `sinks` at their own slot, later rows in a ring of
    /// `ring` slots after them (only the last `ring` rows resident). `None`: row r at slot r.
    ring: Option<(usize, usize)>,
}

impl LayerRows {
    /// The slot of row `r`, if it is on the device.
    fn slot(&self, r: usize) -> Option<usize> {
        match self.ring {
            None => (r < self.n_rows).then_some(r),
            Some((sinks, _)) if r < sinks => (r < self.n_rows).then_some(r),
            Some((sinks, ring)) => (r < self.n_rows && r + ring >= self.n_rows).then(|| sinks + (r - sinks) % ring),
        }
    }

    /// The slot row `n_rows` (the next) goes to.
    fn next_slot(&self) -> usize {
        match self.ring {
            Some((sinks, ring)) if self.n_rows >= sinks => sinks + (self.n_rows - sinks) % ring,
            _ => self.n_rows,
        }
    }

    /// Slots the layer may use at most.
    fn most_slots(&self) -> usize {
        self.ring.map_or(usize::MAX, |(sinks, ring)| sinks + ring)
    }

    /// Grows the store to hold the next `extra` rows' slots.
    fn reserve<R: CubeRuntime>(&mut self, client: &ComputeClient<R>, extra: usize) -> Result<()> {
        let want = (self.n_rows + extra).min(self.most_slots());
        let grown = want.max(2 * self.store.capacity()).min(self.most_slots());
        if want > self.store.capacity() {
            self.store.reserve(client, grown).map_err(kernel_err("KV mirror"))?;
        }
        Ok(())
    }

    /// Writes the host rows `first..first + n` (`k`, `v` token-major) that stay on the device.
    fn write_host<R: CubeRuntime>(
        &mut self,
        client: &ComputeClient<R>,
        first: usize,
        (k, v): (&[f32], &[f32]),
        row: usize,
    ) -> Result<()> {
        let end = first + k.len() / row.max(1);
        let old = self.n_rows;
        self.n_rows = end;
        // Runs of consecutive slots among the resident rows.
        let mut r = first;
        while r < end {
            let Some(s) = self.slot(r) else {
                r += 1;
                continue;
            };
            let mut e = r + 1;
            while e < end && self.slot(e) == Some(s + e - r) {
                e += 1;
            }
            let (a, b) = ((r - first) * row, (e - first) * row);
            if let Err(err) = self.store.write(client, s, &k[a..b], &v[a..b]) {
                self.n_rows = old;
                return Err(kernel_err("KV mirror")(err));
            }
            r = e;
        }
        Ok(())
    }

    /// The rows `0..n_rows` as one f32 store for the prefill kernel, when they are all on the
    /// device in order in one buffer.
    fn dense<R: CubeRuntime>(&self, client: &ComputeClient<R>) -> Result<Option<DeviceKv>> {
        if self.n_rows > self.most_slots() || self.n_rows > self.store.first_segment_slots() {
            return Ok(None);
        }
        self.store.dense_f32(client, self.n_rows).map(Some).map_err(kernel_err("KV mirror"))
    }

    /// Splits per-KV-head row lists (with optional log-weights) into the slots of the rows on
    /// the device and the rows that are not.
    fn split(&self, lists: &[Vec<u32>], log_w: Option<&[Vec<f32>]>) -> Split {
        let mut out = Split::default();
        for (j, l) in lists.iter().enumerate() {
            let (mut dev, mut dw, mut host, mut hw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (e, &r) in l.iter().enumerate() {
                let w = log_w.and_then(|w| w.get(j)?.get(e).copied()).unwrap_or(0.0);
                match self.slot(r as usize) {
                    Some(s) => {
                        dev.push(s as u32);
                        dw.push(w);
                    }
                    None => {
                        host.push(r);
                        hw.push(w);
                    }
                }
            }
            out.slots.push(dev);
            out.slot_w.push(dw);
            out.host.push(host);
            out.host_w.push(hw);
        }
        out
    }
}

/// Row lists split by where the rows are ([`LayerRows::split`]).
#[derive(Default)]
struct Split {
    slots: Vec<Vec<u32>>,
    slot_w: Vec<Vec<f32>>,
    host: Vec<Vec<u32>>,
    host_w: Vec<Vec<f32>>,
}

/// The device format of a cache's KV rows.
fn mirror_format(kv: KvDtype) -> KvFormat {
    match kv {
        KvDtype::F32 => KvFormat::F32,
        KvDtype::F16 => KvFormat::F16,
        // q8 rows dequantized (value · row scale) are f32 numbers that f16 would round.
        KvDtype::Q8 => KvFormat::F32,
    }
}

/// A decode token's device tensors whose host part (appending its row, the select step's
/// bookkeeping) waits for the step's one read-back: its layer had no dynamic part, so the host
/// had nothing to select from and the device attended every row.
struct Pending<R: CubeRuntime> {
    client: ComputeClient<R>,
    /// `[n_q_heads · dim]`, `[n_kv_heads · dim]`, `[n_kv_heads · dim]`.
    q: Handle,
    k: Handle,
    v: Handle,
    pos: usize,
    scale: f32,
}

impl<R: CubeRuntime> Default for DeviceCache<R> {
    fn default() -> Self {
        Self { layers: Vec::new(), pending: Vec::new(), segment_slots: None, _runtime: PhantomData }
    }
}

impl<R: CubeRuntime> DeviceCache<R> {
    /// Device bytes of every layer's K and V buffers.
    pub fn device_bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|l| l.store.bytes()).sum()
    }

    /// Device buffers (K and V each) of `layer`'s rows, 0 before its first use.
    pub fn buffers(&self, layer: usize) -> usize {
        self.layers.get(layer).and_then(Option::as_ref).map_or(0, |l| l.store.n_segments())
    }

    /// Splits every layer's rows into buffers of at most `slots` rows (a test knob: a device's
    /// largest buffer is otherwise the limit); the mirror is rebuilt on its next use.
    pub fn set_segment_rows(&mut self, slots: usize) {
        self.segment_slots = Some(slots.max(1));
        self.layers.clear();
    }

    /// `layer`'s device rows, first brought up to `cache`'s host length plus the layer's pending
    /// row (if any), with room for `extra` more rows.
    fn sync(
        &mut self,
        cache: &KvCache<Self>,
        layer: usize,
        extra: usize,
        client: &ComputeClient<R>,
    ) -> Result<&mut LayerRows> {
        let (host, gqa, d) = (cache.layer_len(layer)?, cache.gqa(), cache.head_dim());
        if self.layers.len() != cache.n_layers() {
            self.layers = (0..cache.n_layers()).map(|_| None).collect();
        }
        self.pending.resize_with(cache.n_layers(), || None);
        let n = host + usize::from(self.pending[layer].is_some());
        let format = mirror_format(cache.config().kv);
        let rows = &mut self.layers[layer];
        if rows.as_ref().is_some_and(|l| l.n_rows > n || l.store.format() != format) {
            *rows = None;
        }
        if rows.is_none() {
            let per_buffer = KvStore::max_slots_per_buffer(client, format, gqa.n_kv_heads, d);
            let per_buffer = self.segment_slots.map_or(per_buffer, |s| s.min(per_buffer));
            let store = KvStore::new(format, gqa.n_kv_heads, d, per_buffer).map_err(kernel_err("KV mirror"))?;
            *rows = Some(LayerRows { store, n_rows: 0, ring: ring(cache, layer, format)? });
        }
        let rows = rows.as_mut().ok_or_else(|| Error::State("device KV mirror missing".into()))?;
        if rows.n_rows < n {
            if self.pending[layer].is_some() {
                return Err(Error::State(format!("layer {layer}: the device KV mirror lost a row the host lacks")));
            }
            // Only the rows that stay on the device are read from the host.
            let first = rows.n_rows;
            let keep = |r: usize| match rows.ring {
                Some((sinks, ring)) => r < sinks || r + ring >= n,
                None => true,
            };
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            let row = gqa.n_kv_heads * d;
            for i in first..n {
                if keep(i) {
                    for j in 0..gqa.n_kv_heads {
                        needle_core::RowSource::row(cache.keys(layer, j), i).extend_into(&mut ks);
                        needle_core::RowSource::row(cache.values(layer, j), i).extend_into(&mut vs);
                    }
                } else {
                    // A row the ring drops: zeros, never written to the device.
                    ks.resize(ks.len() + row, 0.0);
                    vs.resize(vs.len() + row, 0.0);
                }
            }
            rows.reserve(client, n - first)?;
            rows.write_host(client, first, (&ks, &vs), row)?;
        }
        rows.reserve(client, extra)?;
        Ok(rows)
    }

    fn has_pending(&self) -> bool {
        self.pending.iter().any(Option::is_some)
    }
}

/// The ring of `layer`'s device rows under the cache's device budget: `(sinks, ring slots)`,
/// the budget split evenly over the layers the device attends; `None` without a budget.
fn ring<M>(cache: &KvCache<M>, layer: usize, format: KvFormat) -> Result<Option<(usize, usize)>> {
    let Some(budget) = cache.device_budget() else { return Ok(None) };
    let (gqa, d) = (cache.gqa(), cache.head_dim());
    let layers = (0..cache.n_layers()).filter(|&l| !matches!(cache.layer_kind(l), LayerKind::Window(_))).count();
    let row_bytes = (2 * gqa.n_kv_heads * d * format.value_bytes()) as u64;
    let slots = usize::try_from(budget / layers.max(1) as u64 / row_bytes).unwrap_or(usize::MAX);
    let sinks = (0..gqa.n_kv_heads).map(|j| cache.static_part(layer, j).sinks).max().unwrap_or(0);
    if slots <= sinks {
        return Err(Error::invalid(
            "--kv-budget device",
            format!(
                "{budget} bytes hold {slots} rows per layer ({layers} layers of {row_bytes} B a row); the {sinks} \
                 sinks and the newest row need {}",
                sinks + 1
            ),
        ));
    }
    Ok(Some((sinks, slots - sinks)))
}

/// Runs `f` on `layer`'s device rows, first brought up to the host cache's length (plus a
/// pending decode row) with room for `extra` more.
fn with_rows<R: CubeRuntime, T>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    extra: usize,
    client: &ComputeClient<R>,
    f: impl FnOnce(&mut LayerRows) -> Result<T>,
) -> Result<T> {
    // The mirror is taken out while it reads the host rows; an error leaves an empty one,
    // rebuilt on the next use.
    let mut mirror = std::mem::take(&mut cache.mirror);
    let out = mirror.sync(cache, layer, extra, client).and_then(f);
    cache.mirror = mirror;
    out
}

/// Appends the rows [`decode_step_on`] kept on the device to the host cache, layer by layer, after
/// one read-back of all of them; then runs each layer's host half of the step as the CPU path
/// does (queries observed, the select step over the empty dynamic part, which keeps the
/// selectors' state and the stats as they would be).
fn settle<R: CubeRuntime>(cache: &mut KvCache<DeviceCache<R>>) -> Result<()> {
    if !cache.mirror.has_pending() {
        return Ok(());
    }
    let pending: Vec<(usize, Pending<R>)> = std::mem::take(&mut cache.mirror.pending)
        .into_iter()
        .enumerate()
        .filter_map(|(l, p)| p.map(|p| (l, p)))
        .collect();
    cache.mirror.pending.resize_with(cache.n_layers(), || None);
    let (nq, kvn) = (cache.gqa().n_q_heads * cache.head_dim(), cache.gqa().n_kv_heads * cache.head_dim());
    let reads: Vec<(&Handle, usize)> =
        pending.iter().flat_map(|(_, p)| [(&p.q, nq), (&p.k, kvn), (&p.v, kvn)]).collect();
    let client = &pending.first().ok_or_else(|| Error::State("no held decode rows".into()))?.1.client;
    let host = needle_kernels_cubecl::read_f32s(client, &reads).map_err(kernel_err("KV read-back"))?;
    for ((layer, p), qkv) in pending.iter().zip(host.chunks_exact(3)) {
        cache.append(*layer, &qkv[1], &qkv[2])?;
        cache.observe_queries(*layer, p.pos, &qkv[0]);
        cache.decode_dynamic(*layer, &qkv[0], p.scale, false)?;
    }
    Ok(())
}

/// [`NeedleBackend::paged_attention`] on the device: the causal flash kernel over the layer's
/// device rows; during a prefill with a pattern (as on the CPU: not once the cache is built), the
/// block-sparse kernel over the key blocks the pattern chooses per KV head. The masks are planned
/// on the host by the CPU path's own [`plan_masks`](crate::backend::plan_masks) over the host
/// keys, from the chunk's queries read back (`t · n_q_heads · head_dim` floats); only the block
/// lists go up (per KV head, one offset per query block and one id per kept block).
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
    let qp = primitive(q);
    let client = qp.client.clone();
    let out = f32_buffer(&client, t * nh * d);
    let lse = f32_buffer(&client, t * nh);
    let Some(kv) = with_rows(cache, layer, 0, &client, |rows| rows.dense(&client))? else {
        return host_prefill(cache, layer, qp, [t, nh, d], scale);
    };
    let Some(pattern) = cache.config().prefill.pattern().filter(|_| !cache.is_built()) else {
        needle_kernels_cubecl::launch_prefill(&client, &kv, &qp.handle, nh, t, n - t, scale, &out, &lse)
            .map_err(kernel_err("prefill attention"))?;
        return Ok(wrap(&qp, out, [t, nh * d]));
    };
    let qs = needle_kernels_cubecl::read_f32s(&client, &[(&qp.handle, t * nh * d)])
        .map_err(kernel_err("query read-back"))?
        .pop()
        .ok_or_else(|| Error::State("query read-back: no buffer".into()))?;
    let masks = crate::backend::plan_masks(cache, layer, pattern, &qs, n - t, scale)?;
    let heads: Vec<(&[usize], &[u32])> = masks.iter().map(|m| (m.offsets(), m.blocks())).collect();
    let lists = needle_kernels_cubecl::DeviceBlockLists::upload(&client, pattern.block(), n - t, t, &heads)
        .map_err(kernel_err("prefill block lists"))?;
    needle_kernels_cubecl::launch_sparse_prefill(&client, &kv, &qp.handle, nh, t, n - t, scale, &lists, &out, &lse)
        .map_err(kernel_err("sparse prefill attention"))?;
    let (kept, all) = crate::backend::density(&masks);
    cache.count_prefill_blocks(kept, all);
    Ok(wrap(&qp, out, [t, nh * d]))
}

/// Prefill attention on the host (the CPU kernel over the pages) for a layer whose rows are not
/// all in the device's first buffer (a device budget below the layer's rows, or a layer past
/// one buffer): the queries read back, the output uploaded.
fn host_prefill<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    qp: CubeTensor<R>,
    [t, nh, d]: [usize; 3],
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let qs = needle_kernels_cubecl::read_f32s(&qp.client, &[(&qp.handle, t * nh * d)])
        .map_err(kernel_err("query read-back"))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::State("query read-back: no buffer".into()))?;
    let o =
        crate::backend::flex::prefill_attention(cache, layer, crate::backend::flex::from_vec(qs, [t, nh, d]), scale)?;
    let host = crate::backend::flex::read_host(&o, <[f32]>::to_vec)?;
    Ok(wrap(&qp, upload(&qp.client, &host), [t, nh * d]))
}

fn check_decode_shape<R: CubeRuntime>(
    cache: &KvCache<DeviceCache<R>>,
    name: &str,
    dims: [usize; 3],
    heads: usize,
) -> Result<()> {
    let want = [1, heads, cache.head_dim()];
    if dims != want {
        return Err(Error::Shape { tensor: name.into(), expected: want.to_vec(), got: dims.to_vec() });
    }
    Ok(())
}

/// True when no layer after `layer` attends through the device (the rest are sliding-window
/// layers, attended on the host): the step's device decode ends at `layer`.
fn last_device_layer<M>(cache: &KvCache<M>, layer: usize) -> bool {
    (layer + 1..cache.n_layers()).all(|l| matches!(cache.layer_kind(l), LayerKind::Window(_)))
}

/// [`NeedleBackend::decode_step`] on the device: the token's keys and values go into the device
/// mirror from the device tensors (no upload; rounded to f16 there for an f16 cache; a q8
/// cache's row is quantized by the host and reaches the device from there). When the layer has a dynamic part, the host
/// selects from it: queries, keys and values come back in one read (the host appends the row,
/// which may join its index, then selects). When it has none (`full`, or a context within
/// sinks + window), nothing is read back: the device attends every row, and the host's part
/// waits for one read-back of all such layers at the end of the step ([`settle`]).
fn decode_step_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    q: Tensor<Cb<R, I, BT>, 3>,
    k: Tensor<Cb<R, I, BT>, 3>,
    v: Tensor<Cb<R, I, BT>, 3>,
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let gqa = cache.gqa();
    check_decode_shape(cache, "q", q.dims(), gqa.n_q_heads)?;
    check_decode_shape(cache, "k", k.dims(), gqa.n_kv_heads)?;
    check_decode_shape(cache, "v", v.dims(), gqa.n_kv_heads)?;
    let (qp, kp, vp) = (primitive(q), primitive(k), primitive(v));
    let client = qp.client.clone();
    if cache.mirror.pending.get(layer).is_some_and(Option::is_some) {
        // A row from an earlier step that did not reach its end: the host takes it first.
        settle(cache)?;
    }
    let pos = cache.layer_len(layer)?;
    let n = pos + 1;
    // The device rounds a row as the host stores it in f32 and f16, not in q8: a q8 row reaches
    // the device from the host, dequantized.
    let device_row = cache.config().kv != KvDtype::Q8;
    // With rows off the device (a device budget) the host attends those: it needs the query.
    let all_static = device_row
        && (0..gqa.n_kv_heads).all(|j| cache.static_part(layer, j).dynamic_range(n).is_empty())
        && statics_on_device(cache, layer, n)?;
    let host = if all_static {
        None
    } else {
        let (nq, kvn) = (gqa.n_q_heads * cache.head_dim(), gqa.n_kv_heads * cache.head_dim());
        let reads = [(&qp.handle, nq), (&kp.handle, kvn), (&vp.handle, kvn)];
        Some(needle_kernels_cubecl::read_f32s(&client, &reads).map_err(kernel_err("decode read-back"))?)
    };
    if device_row {
        with_rows(cache, layer, 1, &client, |rows| {
            let slot = rows.next_slot();
            rows.store.write_device(&client, slot, &kp.handle, &vp.handle, 1).map_err(kernel_err("KV mirror"))?;
            rows.n_rows += 1;
            Ok(())
        })?;
    }
    let out = match host {
        None => {
            let held = Pending { client: client.clone(), q: qp.handle.clone(), k: kp.handle, v: vp.handle, pos, scale };
            *cache.mirror.pending.get_mut(layer).ok_or_else(|| Error::State("device KV mirror missing".into()))? =
                Some(held);
            let statics: Vec<Vec<u32>> =
                (0..gqa.n_kv_heads).map(|j| cache.static_part(layer, j).static_ids(n).collect()).collect();
            let (nh, d) = (gqa.n_q_heads, cache.head_dim());
            let (out, lse) = (f32_buffer(&client, nh * d), f32_buffer(&client, nh));
            attend_lists(cache, layer, &qp, None, (&statics, None), scale, (&out, &lse))?;
            wrap(&qp, out, [1, nh * d])
        }
        Some(qkv) => {
            cache.append(layer, &qkv[1], &qkv[2])?;
            attend_on(cache, layer, pos, qp, &qkv[0], scale)?
        }
    };
    if last_device_layer(cache, layer) {
        settle(cache)?;
    }
    Ok(out)
}

/// [`NeedleBackend::decode_attention`] (the token's row already appended on the host): the
/// queries are read back for the host's select step.
fn decode_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    q: Tensor<Cb<R, I, BT>, 3>,
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    pos: usize,
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    check_decode_shape(cache, "q", q.dims(), cache.gqa().n_q_heads)?;
    let qp = primitive(q);
    let qs = needle_kernels_cubecl::read_f32s(&qp.client, &[(&qp.handle, cache.gqa().n_q_heads * cache.head_dim())])
        .map_err(kernel_err("query read-back"))?;
    let qs = qs.into_iter().next().ok_or_else(|| Error::State("query read-back: no buffer".into()))?;
    attend_on(cache, layer, pos, qp, &qs, scale)
}

/// True when every row of `layer`'s static part at length `n` stays on the device (always,
/// without a device budget).
fn statics_on_device<R: CubeRuntime>(cache: &KvCache<DeviceCache<R>>, layer: usize, n: usize) -> Result<bool> {
    let Some((sinks, ring)) = ring(cache, layer, mirror_format(cache.config().kv))? else { return Ok(true) };
    Ok((0..cache.gqa().n_kv_heads).all(|j| {
        let dynamic = cache.static_part(layer, j).dynamic_range(n);
        let (ds, de) = (dynamic.start as usize, dynamic.end as usize);
        // Rows before the dynamic part and after it (all of them when it is empty).
        let (head, tail) = if ds == de { (0, n) } else { (ds, n - de) };
        (head <= sinks && tail <= ring) || n <= sinks + ring
    }))
}

/// Decode attention of `layer` over per-KV-head row lists (with optional log-weights) into
/// `out`/`lse`: the rows on the device by the decode kernel; rows a device budget left on the
/// host by the host's group kernel (`qs`: the queries, on the host), merged by log-sum-exp on
/// the device.
fn attend_lists<R: CubeRuntime>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    q: &CubeTensor<R>,
    qs: Option<&[f32]>,
    (lists, log_w): (&[Vec<u32>], Option<&[Vec<f32>]>),
    scale: f32,
    (out, lse): (&Handle, &Handle),
) -> Result<()> {
    let (gqa, d) = (cache.gqa(), cache.head_dim());
    let nh = gqa.n_q_heads;
    let client = q.client.clone();
    let split = with_rows(cache, layer, 0, &client, |rows| Ok(rows.split(lists, log_w)))?;
    let off = split.host.iter().any(|h| !h.is_empty());
    let (od, ld) =
        if off { (f32_buffer(&client, nh * d), f32_buffer(&client, nh)) } else { (out.clone(), lse.clone()) };
    let slots: Vec<&[u32]> = split.slots.iter().map(Vec::as_slice).collect();
    let slot_w: Vec<&[f32]> = split.slot_w.iter().map(Vec::as_slice).collect();
    with_rows(cache, layer, 0, &client, |rows| {
        let chunk = needle_kernels_cubecl::decode::DEFAULT_CHUNK_ROWS;
        let w = log_w.map(|_| &slot_w[..]);
        rows.store
            .launch_decode(&client, &q.handle, nh, &slots, w, scale, chunk, &od, &ld)
            .map_err(kernel_err("decode attention"))
    })?;
    if !off {
        return Ok(());
    }
    let qs = qs.ok_or_else(|| Error::State(format!("layer {layer}: rows off the device and no query on the host")))?;
    // The device works while the host attends the rest.
    client.flush().map_err(|e| Error::State(format!("device flush: {e:?}")))?;
    let (mut ho, mut hl) = (Vec::with_capacity(nh * d), Vec::with_capacity(nh));
    let mut scratch = crate::decode::GroupScratch::default();
    // Every row is "dynamic" here, so any id is accepted.
    let everything = needle_core::StaticPart { sinks: 0, window: 0 };
    for j in 0..gqa.n_kv_heads {
        let g = gqa.group(j);
        let weights = if log_w.is_some() { split.host_w[j].clone() } else { Vec::new() };
        let sel = needle_core::Selection { ids: split.host[j].clone(), log_weights: weights, ..Default::default() };
        let mut l = vec![0f32; g.len()];
        let o = crate::decode::attend_selection(
            &qs[g.start * d..g.end * d],
            cache.keys(layer, j),
            cache.values(layer, j),
            everything,
            &sel,
            scale,
            &mut scratch,
            &mut l,
        )?;
        ho.extend_from_slice(o);
        hl.extend_from_slice(&l);
    }
    let (ho, hl) = (upload(&client, &ho), upload(&client, &hl));
    needle_kernels_cubecl::launch_lse_merge(&client, nh, d, &od, &ld, &ho, &hl, out, lse)
        .map_err(kernel_err("LSE merge"))
}

/// The decode step's attention with the row already on the host and the queries `qs` read
/// back: the static part on the device and the host's selection, as the cache's
/// [`DecodeMode`] says.
fn attend_on<R: CubeRuntime, I: IntElement, BT: BoolElement>(
    cache: &mut KvCache<DeviceCache<R>>,
    layer: usize,
    pos: usize,
    qp: CubeTensor<R>,
    qs: &[f32],
    scale: f32,
) -> Result<Tensor<Cb<R, I, BT>, 2>> {
    let gqa = cache.gqa();
    let (nh, d) = (gqa.n_q_heads, cache.head_dim());
    let client = qp.client.clone();
    cache.observe_queries(layer, pos, qs);
    let n = cache.layer_len(layer)?;
    let statics: Vec<Vec<u32>> =
        (0..gqa.n_kv_heads).map(|j| cache.static_part(layer, j).static_ids(n).collect()).collect();
    let out = f32_buffer(&client, nh * d);
    let lse = f32_buffer(&client, nh);
    match cache.decode_mode() {
        DecodeMode::Hybrid => {
            let (o_s, l_s) = (f32_buffer(&client, nh * d), f32_buffer(&client, nh));
            attend_lists(cache, layer, &qp, Some(qs), (&statics, None), scale, (&o_s, &l_s))?;
            // Start the device now: the host's selection and attention below overlap it.
            client.flush().map_err(|e| Error::State(format!("device flush: {e:?}")))?;
            let part = cache.decode_dynamic(layer, qs, scale, true)?;
            let (ho, hl) = part.host.ok_or_else(|| Error::State("decode_dynamic: no host partial".into()))?;
            let (ho, hl) = (upload(&client, &ho), upload(&client, &hl));
            needle_kernels_cubecl::launch_lse_merge(&client, nh, d, &o_s, &l_s, &ho, &hl, &out, &lse)
                .map_err(kernel_err("LSE merge"))?;
        }
        DecodeMode::Device => {
            let DynamicPart { ids, log_weights, .. } = cache.decode_dynamic(layer, qs, scale, false)?;
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
            attend_lists(cache, layer, &qp, Some(qs), (&lists, weighted.then_some(&weights[..])), scale, (&out, &lse))?;
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
