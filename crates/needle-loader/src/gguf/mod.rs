//! A GGUF reader over a memory map: header (v2, v3), metadata, tensor infos, dequantisation.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! metadata `(string key, u32 type, value)*`, tensor infos `(string name, u32 n_dims, u64 ne[n_dims],
//! u32 type, u64 offset)*`, padding to `general.alignment` (default 32), then tensor data.
//! `ne[0]` is the innermost (contiguous) dimension.

mod dequant;
mod llama;
mod types;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

pub use dequant::dequantize;
pub use llama::{gguf_to_hf, hf_to_gguf, permute_rows, permuted_heads, unpermute_rows};
pub use types::GgmlType;
pub(crate) use types::SUPPORTED_NAMES;

use crate::{Error, Result};

/// Refuse absurd counts before allocating for them (a corrupt header must not OOM us).
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;
const PREALLOC_CAP: u64 = 4096;

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// `string` (UTF-8; invalid bytes are replaced).
    String(String),
    /// `array` of any type, possibly nested.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float. An `f32` is widened through its shortest decimal form, so a stored
    /// `1e-5f32` reads as `1e-5`, not `9.99999974737875e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => format!("{v}").parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor-info table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (`ne[0]` is the row length).
    pub ne: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Row-major shape, outermost first (the reverse of `ne`).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// What a [`RawTensor`]'s bytes live in.
#[derive(Clone)]
enum Backing {
    /// A GGUF file's memory map.
    Map(Arc<Mmap>),
    /// Blocks made in memory ([`MemoryCheckpoint`](crate::MemoryCheckpoint)).
    Owned(Arc<[u8]>),
}

/// A tensor's bytes as stored in a GGUF file (whole ggml blocks, rows of `shape[last]` elements),
/// borrowed from the shared memory map, or blocks made in memory.
#[derive(Clone)]
pub struct RawTensor {
    backing: Backing,
    start: usize,
    len: usize,
    /// Element type.
    pub ty: GgmlType,
    /// Row-major shape, outermost first (linear weights `[out, in]`).
    pub shape: Vec<usize>,
    /// `Some(n_head)` when the rows are in llama.cpp's RoPE order (Q and K projections of a GGUF):
    /// within each head of `rows / n_head` rows, row `2i + s` holds Hugging Face row
    /// `s · head_dim/2 + i` (see [`unpermute_rows`]). The outputs of such a matrix are
    /// de-interleaved per head to get the Hugging Face layout.
    pub rope_heads: Option<usize>,
}

impl RawTensor {
    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::Map(m) => m,
            Backing::Owned(b) => b,
        };
        &all[self.start..self.start + self.len]
    }

    /// Drops this process's mapping of the bytes (the file's pages stay in the page cache and
    /// are mapped again if read): for a caller that made its own copy, so the file's pages no
    /// longer count against its memory. A no-op for blocks held in memory, and elsewhere than
    /// on Unix.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Backing::Map(m) = &self.backing {
            // SAFETY: a read-only map of a file: dropped pages are read again from the file.
            if let Err(e) =
                unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.start, self.len) }
            {
                tracing::debug!("madvise(DONTNEED) on a tensor's pages: {e}");
            }
        }
    }

    /// Blocks held in memory: `bytes` are whole blocks of `ty` for `shape` (checked).
    pub(crate) fn owned(bytes: Arc<[u8]>, ty: GgmlType, shape: Vec<usize>) -> Option<Self> {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        (ty.bytes_for(n) == Some(bytes.len() as u64)).then(|| Self {
            len: bytes.len(),
            backing: Backing::Owned(bytes),
            start: 0,
            ty,
            shape,
            rope_heads: None,
        })
    }
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTensor")
            .field("ty", &self.ty.name)
            .field("shape", &self.shape)
            .field("bytes", &self.len)
            .field("rope_heads", &self.rope_heads)
            .finish()
    }
}

/// A parsed, memory-mapped GGUF file. Tensor data is read lazily by [`GgufFile::tensor_f32`].
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    pub(crate) config: crate::LlamaConfig,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian cursor that turns every short read into [`Error::Truncated`].
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= self.buf.len() as u64);
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(Error::Truncated {
                path: self.path.into(),
                what: what(),
                offset: self.pos as u64,
                need: n,
                file_len: self.buf.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("{} (string length)", what()))?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value> {
        let what = || format!("metadata value of {key:?}");
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.malformed(format!("metadata value of {key:?}"), format!("bool byte {b}"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth > 8 {
                    return Err(self.malformed(format!("metadata value of {key:?}"), "arrays nested too deep".into()));
                }
                let elem = self.u32(&|| format!("array element type of {key:?}"))?;
                let n = self.u64(&|| format!("array length of {key:?}"))?;
                // Every element takes at least one byte: a count beyond the file is corrupt.
                let left = (self.buf.len() - self.pos) as u64;
                if n > left {
                    return Err(Error::Truncated {
                        path: self.path.into(),
                        what: format!("array of {n} elements in {key:?}"),
                        offset: self.pos as u64,
                        need: n,
                        file_len: self.buf.len() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n.min(PREALLOC_CAP) as usize);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => return Err(Error::UnknownValueType { path: self.path.into(), key: key.into(), type_id }),
        })
    }

    fn malformed(&self, what: String, reason: String) -> Error {
        Error::Malformed { path: self.path.into(), what, reason }
    }
}

impl GgufFile {
    /// Maps and parses `path`: header, metadata and tensor infos, checking that every tensor's
    /// data lies inside the file, then reads and validates the Llama config (including the
    /// shapes of all Llama tensors). Tensor data is not read yet.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::Truncated {
                path: path.into(),
                what: "header (magic and version)".into(),
                offset: 0,
                need: 8,
                file_len: len,
            });
        }
        // SAFETY: the map is read-only and private to this struct; like every mmap-based loader we
        // rely on the file not being truncated or rewritten while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut g = Self::parse(path.to_path_buf(), map)?;
        g.config = g.llama_config()?;
        Ok(g)
    }

    fn parse(path: PathBuf, map: Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &map[..], pos: 0, path: &path };
        let magic: [u8; 4] = c.array(&|| "header (magic)".into())?;
        if &magic != b"GGUF" {
            return Err(Error::BadMagic { path: path.clone(), found: magic });
        }
        let version_bytes: [u8; 4] = c.array(&|| "header (version)".into())?;
        let version = u32::from_le_bytes(version_bytes);
        // A big-endian file has its small version number in the high bytes.
        if version & 0xFFFF == 0 && u32::from_be_bytes(version_bytes) <= 0xFFFF {
            return Err(Error::BigEndian { path: path.clone(), version_bytes });
        }
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion { path: path.clone(), version });
        }
        let n_tensors = c.u64(&|| "header (tensor count)".into())?;
        let n_kv = c.u64(&|| "header (metadata count)".into())?;
        let file_len = map.len() as u64;
        // Counts come from the file: cap preallocation, the reads themselves stop at the end of the file.
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_CAP) as usize);
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("metadata type of {key:?}"))?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.malformed(format!("metadata key {key:?}"), "duplicate key".into()));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::BadMetadata {
                        path: path.clone(),
                        key: "general.alignment".into(),
                        reason: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };

        let mut raw = Vec::with_capacity(n_tensors.min(PREALLOC_CAP) as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor info #{i} (name)"))?;
            let n_dims = c.u32(&|| format!("tensor info {name:?} (n_dims)"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::InvalidTensorInfo {
                    path: path.clone(),
                    tensor: name,
                    dims: vec![],
                    reason: format!("{n_dims} dimensions (1..={MAX_DIMS} allowed)"),
                });
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                ne.push(c.u64(&|| format!("tensor info {name:?} (dimension {d})"))?);
            }
            let type_id = c.u32(&|| format!("tensor info {name:?} (type)"))?;
            let rel = c.u64(&|| format!("tensor info {name:?} (offset)"))?;
            raw.push((name, ne, type_id, rel));
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::new();
        for (name, ne, type_id, rel) in raw {
            let invalid = |reason: String| Error::InvalidTensorInfo {
                path: path.clone(),
                tensor: name.clone(),
                dims: ne.clone(),
                reason,
            };
            let ty = GgmlType::from_id(type_id).ok_or_else(|| Error::UnknownTensorType {
                path: path.clone(),
                tensor: name.clone(),
                type_id,
            })?;
            if ne.contains(&0) {
                return Err(invalid("a dimension is 0".into()));
            }
            let n = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| invalid("element count overflows".into()))?;
            if !ne[0].is_multiple_of(ty.block_elems as u64) {
                return Err(invalid(format!(
                    "row length {} is not a multiple of the {} block size {}",
                    ne[0], ty.name, ty.block_elems
                )));
            }
            let size = ty.bytes_for(n).ok_or_else(|| invalid("byte size overflows".into()))?;
            if !rel.is_multiple_of(alignment) {
                return Err(invalid(format!("data offset {rel} is not aligned to {alignment}")));
            }
            let offset = data_offset.checked_add(rel);
            match offset {
                Some(off) if off.checked_add(size).is_some_and(|end| end <= file_len) => {}
                _ => {
                    return Err(Error::TensorDataOutOfBounds {
                        path: path.clone(),
                        tensor: name,
                        offset: offset.unwrap_or(u64::MAX),
                        size,
                        file_len,
                    });
                }
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::Malformed {
                    path: path.clone(),
                    what: format!("tensor {name:?}"),
                    reason: "duplicate name".into(),
                });
            }
            tensors.push(TensorInfo { name, ne, ty, offset: data_offset + rel, size });
        }
        tracing::debug!(path = %path.display(), version, tensors = tensors.len(), metadata = metadata.len(), "parsed GGUF");
        Ok(Self {
            path,
            map: Arc::new(map),
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            config: placeholder_config(),
        })
    }

    /// File path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset where tensor data starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor info by GGUF name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// A tensor's stored bytes (ggml blocks) by GGUF name, sharing the file's memory map: no copy,
    /// and the view keeps the map alive after this `GgufFile` is dropped.
    pub fn tensor_blocks(&self, name: &str) -> Result<RawTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        Ok(RawTensor {
            backing: Backing::Map(Arc::clone(&self.map)),
            start: info.offset as usize,
            len: info.size as usize,
            ty: info.ty,
            shape: info.shape(),
            rope_heads: None,
        })
    }

    /// Dequantises a tensor by GGUF name into f32, in file layout (shape = reversed `ne`, no
    /// RoPE un-permutation), checking that every value is finite.
    pub fn tensor_f32(&self, name: &str) -> Result<crate::HostTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        if !info.ty.can_dequantize() {
            return Err(Error::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: name.into(),
                dtype: info.ty.name.into(),
                supported: SUPPORTED_NAMES,
            });
        }
        let n = info.n_elements() as usize;
        let mut data = vec![0f32; n];
        if !dequantize(info.ty, self.tensor_bytes(info), &mut data) {
            // Sizes were derived from the same type table at open, so this is a corrupt info.
            return Err(Error::InvalidTensorInfo {
                path: self.path.clone(),
                tensor: name.into(),
                dims: info.ne.clone(),
                reason: "data size does not match the type".into(),
            });
        }
        crate::check_finite(&self.path, name, &data)?;
        Ok(crate::HostTensor { shape: info.shape(), data })
    }

    /// Count of tensors per type, most frequent first, e.g. `Q4_1 ×210, F32 ×61, Q8_0 ×1`.
    pub fn type_summary(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for t in &self.tensors {
            match counts.iter_mut().find(|(n, _)| *n == t.ty.name) {
                Some((_, c)) => *c += 1,
                None => counts.push((t.ty.name, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect::<Vec<_>>().join(", ")
    }
}

/// Stands in until `llama_config` has run; never visible outside `GgufFile::open`.
fn placeholder_config() -> crate::LlamaConfig {
    crate::LlamaConfig {
        architecture: crate::Architecture::Llama,
        vocab_size: 0,
        hidden_size: 0,
        intermediate_size: 0,
        num_hidden_layers: 0,
        num_attention_heads: 0,
        num_key_value_heads: 0,
        head_dim: 0,
        rms_norm_eps: 0.0,
        rope_theta: 0.0,
        rope_scaling: None,
        max_position_embeddings: 0,
        tie_word_embeddings: false,
        qkv_bias: false,
        qk_norm: false,
        sliding_window: None,
        local_attention: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    }
}
