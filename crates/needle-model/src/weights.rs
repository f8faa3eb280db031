//! Linear weights kept in their stored format: ggml blocks borrowed from a GGUF memory map (no
//! copy), or owned f32 rows (safetensors folders, tests), read by needle-kernels-cpu's
//! [`QMatrix`].

use std::sync::{Arc, OnceLock};

use needle_kernels_cpu::{Isa, PackedRows, QMatrix, QuantType, dequantize_row};
use needle_loader::RawTensor;

use crate::error::{Error, Result};

/// How [`Llama::load_with`](crate::Llama::load_with) keeps the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Weights {
    /// As stored: GGUF blocks memory-mapped (Q4_1, Q8_0, K-quants, F16, …) and multiplied by
    /// fused quantized kernels on the CPU backend; safetensors as f32. Other backends dequantize
    /// at load (plain Burn ops on f32 weights).
    #[default]
    Native,
    /// Every weight dequantized to f32 Burn parameters: the reference path for fidelity work.
    F32,
}

/// Options of [`Llama::load_with`](crate::Llama::load_with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// How the weights are kept.
    pub weights: Weights,
}

#[derive(Clone)]
enum Store {
    Map(RawTensor),
    Owned(Arc<[u8]>),
}

impl Store {
    fn bytes(&self) -> &[u8] {
        match self {
            Store::Map(r) => r.bytes(),
            Store::Owned(b) => b,
        }
    }
}

/// A `rows × cols` weight (`rows` out features, `cols` in features, Hugging Face `[out, in]`) in
/// one ggml element type, whose bytes are a view of the checkpoint's memory map or owned f32.
#[derive(Clone)]
pub struct QWeight {
    name: Arc<str>,
    store: Store,
    ty: QuantType,
    rows: usize,
    cols: usize,
    rope_heads: Option<usize>,
    /// The rows repacked, made at the first host product where this machine has the packed
    /// kernel ([`PackedRows::wanted`]); shared by clones.
    packed: Arc<OnceLock<Option<PackedRows>>>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeight")
            .field("name", &self.name)
            .field("ty", &self.ty)
            .field("shape", &[self.rows, self.cols])
            .field("mapped", &matches!(self.store, Store::Map(_)))
            .finish()
    }
}

impl QWeight {
    /// A view of GGUF blocks (`raw.shape` must be `[rows, cols]`). Rows stored in llama.cpp's
    /// RoPE order ([`RawTensor::rope_heads`]) are de-interleaved on output.
    pub fn from_raw(name: &str, raw: RawTensor) -> Result<Self> {
        let ty = QuantType::from_ggml_id(raw.ty.id).map_err(|e| Error::kernel(name, e.into()))?;
        let [rows, cols] = raw.shape[..] else {
            return Err(Error::Shape { tensor: name.into(), expected: vec![0, 0], got: raw.shape.clone() });
        };
        let rope_heads = raw.rope_heads;
        let packed = Arc::default();
        let w = Self { name: name.into(), store: Store::Map(raw), ty, rows, cols, rope_heads, packed };
        w.check()?;
        Ok(w)
    }

    /// Owned f32 weights, row-major `rows × cols`.
    pub fn from_f32(name: &str, data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let bytes: Arc<[u8]> = bytemuck::cast_slice::<f32, u8>(data).into();
        let (store, packed) = (Store::Owned(bytes), Arc::default());
        let w = Self { name: name.into(), store, ty: QuantType::F32, rows, cols, rope_heads: None, packed };
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> Result<()> {
        self.matrix()?;
        if let Some(h) = self.rope_heads
            && (h == 0 || !self.rows.is_multiple_of(h) || !(self.rows / h).is_multiple_of(2))
        {
            return Err(Error::invalid(&*self.name, format!("{} rows are not {h} heads of an even size", self.rows)));
        }
        Ok(())
    }

    /// Checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Out features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// In features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Checks that an input of `[t, cols]` fits this weight's in features, naming the weight.
    pub fn check_input(&self, [t, cols]: [usize; 2]) -> Result<()> {
        if cols == self.cols {
            return Ok(());
        }
        Err(Error::Shape {
            tensor: format!("input of {}", self.name),
            expected: vec![t, self.cols],
            got: vec![t, cols],
        })
    }

    /// Bytes of the weight as stored.
    pub fn bytes(&self) -> usize {
        self.store.bytes().len()
    }

    /// Heads whose rows are stored in llama.cpp's RoPE order (de-interleaved on output), if any.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))] // read by the CubeCL arm only
    pub(crate) fn rope_heads(&self) -> Option<usize> {
        self.rope_heads
    }

    /// The kernel's view of the bytes.
    pub fn matrix(&self) -> Result<QMatrix<'_>> {
        QMatrix::new(self.ty, self.rows, self.cols, self.store.bytes()).map_err(|e| Error::kernel(&*self.name, e))
    }

    /// [`Self::matrix`] with the rows repacked where this machine has the packed kernel (made
    /// on the first call): what every host product reads (prefill, a lone decode and a batched
    /// step), so a row's bits are the same whichever of them computes it.
    fn product_matrix(&self) -> Result<QMatrix<'_>> {
        let m = self.matrix()?;
        if !PackedRows::wanted(self.ty, Isa::detect()) {
            return Ok(m);
        }
        let packed = self.packed.get_or_init(|| {
            let packed = PackedRows::new(&m).ok();
            // Products read the copy from now on: the map's pages of these bytes can go.
            if let (Some(_), Store::Map(raw)) = (&packed, &self.store) {
                raw.release_pages();
            }
            packed
        });
        match packed {
            Some(p) => m.with_packed(p).map_err(|e| Error::kernel(&*self.name, e)),
            None => Ok(m),
        }
    }

    /// `Y = X Wᵀ` on the host for `t` tokens (`x`: `t × cols`), in the Hugging Face output order.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; t * self.rows];
        let m = self.product_matrix()?;
        m.gemm(x, t, &mut y).map_err(|e| Error::kernel(&*self.name, e))?;
        self.to_hf_order(&mut y);
        Ok(y)
    }

    /// `Y_i = X W_iᵀ` for weights sharing the input `x` (`t × cols`), e.g. a layer's q, k and v:
    /// for one token the input is quantized once and all rows run as one parallel loop
    /// ([`gemv_many`](needle_kernels_cpu::gemv_many)).
    pub fn forward_many(ws: &[&QWeight], x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
        if t != 1 {
            return ws.iter().map(|w| w.forward(x, t)).collect();
        }
        let mats = ws.iter().map(|w| w.product_matrix()).collect::<Result<Vec<_>>>()?;
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
        needle_kernels_cpu::gemv_many(&mats, x, &mut outs).map_err(|e| {
            let names: Vec<&str> = ws.iter().map(|w| w.name()).collect();
            Error::kernel(names.join(", "), e)
        })?;
        for (w, y) in ws.iter().zip(&mut ys) {
            w.to_hf_order(y);
        }
        Ok(ys)
    }

    /// `Y_i = X W_iᵀ` for `t` decode rows of different sequences, each row computed exactly as
    /// [`QWeight::forward_many`] computes one token alone (the same activation quantization and
    /// row kernel), while each weight row is read once for all rows
    /// ([`gemv_rows`](needle_kernels_cpu::gemv_rows)): a batch gives every sequence its own bits.
    pub fn forward_rows(ws: &[&QWeight], x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
        if t <= 1 {
            return Self::forward_many(ws, x, t);
        }
        let mats = ws.iter().map(|w| w.product_matrix()).collect::<Result<Vec<_>>>()?;
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; t * w.rows]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
        needle_kernels_cpu::gemv_rows(&mats, x, t, &mut outs).map_err(|e| {
            let names: Vec<&str> = ws.iter().map(|w| w.name()).collect();
            Error::kernel(names.join(", "), e)
        })?;
        for (w, y) in ws.iter().zip(&mut ys) {
            // Each row is whole heads: the rows in one pass.
            w.to_hf_order(y);
        }
        Ok(ys)
    }

    /// Outputs of rows stored in llama.cpp's RoPE order, put back in Hugging Face order.
    fn to_hf_order(&self, y: &mut [f32]) {
        if let Some(heads) = self.rope_heads {
            deinterleave(y, self.rows / heads);
        }
    }

    /// Row `r` (Hugging Face order) dequantized into `out` (`cols` floats).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(Error::invalid(&*self.name, format!("row {r} of {}", self.rows)));
        }
        let r = match self.rope_heads {
            Some(h) => {
                let d = self.rows / h;
                let (head, i) = (r / d, r % d);
                let (s, j) = (i / (d / 2), i % (d / 2));
                head * d + 2 * j + s
            }
            None => r,
        };
        let m = self.matrix()?;
        dequantize_row(self.ty, m.row_bytes(r), out).map_err(|e| Error::kernel(&*self.name, e.into()))
    }

    /// The whole weight dequantized, row-major `rows × cols` in Hugging Face order.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row(r, o)?;
        }
        Ok(out)
    }
}

/// A linear weight as a backend runs it: the host [`QWeight`] and the device copy `D` a backend
/// makes of it on first use ([`NeedleBackend::DeviceWeight`](crate::NeedleBackend::DeviceWeight);
/// `()` on host backends). Clones share the copy (the tied embedding and output head upload
/// once). `D` is the backend's associated type rather than the backend, so that a backend
/// delegating to another (`Autodiff<B>`) hands the same value on.
pub struct LinearWeight<D = ()> {
    weight: QWeight,
    device: Arc<std::sync::OnceLock<D>>,
}

impl<D> LinearWeight<D> {
    /// `weight` with no device copy yet.
    pub fn new(weight: QWeight) -> Self {
        Self { weight, device: Arc::new(std::sync::OnceLock::new()) }
    }

    /// The host weight.
    pub fn weight(&self) -> &QWeight {
        &self.weight
    }

    /// The device copy, made by `upload` on first use (a racing thread's copy may win; either
    /// is the same weight).
    pub fn device_copy(&self, upload: impl FnOnce(&QWeight) -> Result<D>) -> Result<&D> {
        if let Some(d) = self.device.get() {
            return Ok(d);
        }
        let d = upload(&self.weight)?;
        Ok(self.device.get_or_init(|| d))
    }
}

impl<D> Clone for LinearWeight<D> {
    fn clone(&self) -> Self {
        Self { weight: self.weight.clone(), device: Arc::clone(&self.device) }
    }
}

impl<D> std::fmt::Debug for LinearWeight<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearWeight")
            .field("weight", &self.weight)
            .field("on_device", &self.device.get().is_some())
            .finish()
    }
}

impl<D> From<QWeight> for LinearWeight<D> {
    fn from(weight: QWeight) -> Self {
        Self::new(weight)
    }
}

impl<D> std::ops::Deref for LinearWeight<D> {
    type Target = QWeight;
    fn deref(&self) -> &QWeight {
        &self.weight
    }
}

/// Per head of `d` outputs, llama.cpp's RoPE order (`2i + s`) → Hugging Face order (`s·d/2 + i`).
fn deinterleave(y: &mut [f32], d: usize) {
    let mut tmp = vec![0f32; d];
    for head in y.chunks_exact_mut(d) {
        let (even, odd) = tmp.split_at_mut(d / 2);
        for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(head.chunks_exact(2)) {
            (*e, *o) = (pair[0], pair[1]);
        }
        head.copy_from_slice(&tmp);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deinterleave_undoes_the_llama_cpp_permutation() {
        let (heads, d, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|i| i as f32).collect();
        let gg = needle_loader::gguf::permute_rows(&hf, heads, d, cols);
        let mut w = QWeight::from_f32("w", &gg, heads * d, cols).unwrap();
        w.rope_heads = Some(heads);
        let x = [1.0, -2.0, 0.5];
        let y = w.forward(&x, 1).unwrap();
        let want: Vec<f32> = hf.chunks(cols).map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
        assert_eq!(y, want);
        assert_eq!(w.dequantize().unwrap(), hf);
    }
}
