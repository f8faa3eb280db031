//! Gathered decode attention, GQA-aware, split in chunks (flash-decoding).
//!
//! One decode step: `n_q_heads` queries of one token attend, per KV head, to the rows named by
//! that head's id list (static part + selection, any order, possibly empty), each with an
//! optional additive log-weight. The result per query head is the normalised output and the
//! log-sum-exp of its scaled scores, so the host can merge it with another partial
//! ([`crate::merge`]).
//!
//! Layouts (f32, row-major):
//! * KV store ([`DeviceKv`]): `k`, `v` are `[n_rows][n_kv_heads][head_dim]`, token-major, the
//!   order a cache appends in. Row `r` of KV head `h` starts at `(r · n_kv_heads + h) · head_dim`.
//! * queries: `[n_q_heads][head_dim]`; query head `q` reads KV head `q / group`,
//!   `group = n_q_heads / n_kv_heads` (needle-core's `GqaLayout`).
//! * id lists ([`DeviceRowLists`]): CSR. `ids` concatenates the lists of the KV heads,
//!   `offsets[h]..offsets[h + 1]` is head `h`'s; `log_w`, when present, runs parallel to `ids`.
//! * outputs: `out` `[n_q_heads][head_dim]`, `lse` `[n_q_heads]`; an empty list gives a zero
//!   output and `lse = -inf`.
//!
//! Pass 1 ([`decode_partial_kernel`]): cube `(chunk, h)` takes `chunk_rows` ids of head `h` in
//! tiles of [`DECODE_TILE`] rows, one unit per row. Each key row is read once for the whole
//! query group (all `group` scores come from the same load), then an online softmax keeps the
//! running max `m`, sum `l` and unnormalised output per query. Pass 2
//! ([`decode_reduce_kernel`]) combines the chunks of each query head by log-sum-exp. No plane
//! (subgroup) operation is used: lavapipe has none.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{Result, check_len, invalid, to_u32};
use crate::gemv::f16_bits_to_f32;
use crate::util::{
    buf_len, cube_linear, empty_f32, f32_to_f16_bits, grid_1d, online_softmax_step, read_f32, upload_f32, upload_u32,
};

/// Rows per tile of pass 1, and units per cube.
pub const DECODE_TILE: usize = 64;

/// Default rows per chunk (per cube) of pass 1: long enough to amortise the per-chunk
/// write-out, short enough that a 10k-row context spreads over dozens of cubes.
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// Running max of a query before any row: finite, since WGSL forbids infinite literals.
const NEG_BIG: f32 = -3.0e38;

/// A KV store on the device, `[n_rows][n_kv_heads][head_dim]` f32 for keys and for values.
#[derive(Debug, Clone)]
pub struct DeviceKv {
    /// Keys.
    pub k: Handle,
    /// Values.
    pub v: Handle,
    /// Rows (tokens) stored.
    pub n_rows: usize,
    /// Rows the buffers have room for (`≥ n_rows`).
    pub capacity: usize,
    /// KV heads per row.
    pub n_kv_heads: usize,
    /// Numbers per head.
    pub head_dim: usize,
}

impl DeviceKv {
    /// Uploads keys and values, both `[n_rows][n_kv_heads][head_dim]`.
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        k: &[f32],
        v: &[f32],
        n_rows: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if n_kv_heads == 0 {
            return Err(invalid("n_kv_heads", "must be > 0"));
        }
        if head_dim == 0 {
            return Err(invalid("head_dim", "must be > 0"));
        }
        let n = n_rows
            .checked_mul(n_kv_heads)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(|| invalid("n_rows", "KV store size overflows"))?;
        to_u32("n_rows · n_kv_heads · head_dim", n)?;
        check_len("k", k.len(), n)?;
        check_len("v", v.len(), n)?;
        Ok(Self { k: upload_f32(client, k), v: upload_f32(client, v), n_rows, capacity: n_rows, n_kv_heads, head_dim })
    }

    /// An empty store with room for `capacity` rows, filled by [`DeviceKv::append`].
    pub fn with_capacity<R: Runtime>(
        client: &ComputeClient<R>,
        capacity: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if n_kv_heads == 0 || head_dim == 0 {
            return Err(invalid("n_kv_heads", "n_kv_heads and head_dim must be > 0"));
        }
        let n = capacity
            .checked_mul(n_kv_heads)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(|| invalid("capacity", "KV store size overflows"))?;
        to_u32("capacity · n_kv_heads · head_dim", n)?;
        Ok(Self { k: empty_f32(client, n), v: empty_f32(client, n), n_rows: 0, capacity, n_kv_heads, head_dim })
    }

    /// Elements in each buffer.
    pub(crate) fn buffer_len(&self) -> usize {
        buf_len(self.capacity * self.n_kv_heads * self.head_dim)
    }

    /// Appends rows (`k`, `v`: `[n][n_kv_heads][head_dim]`) after the stored ones, copying on
    /// the device; errors past the capacity.
    pub fn append<R: Runtime>(&mut self, client: &ComputeClient<R>, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.n_kv_heads * self.head_dim;
        if !k.len().is_multiple_of(row) {
            return Err(invalid("k", format!("length {} is not a multiple of n_kv_heads · head_dim = {row}", k.len())));
        }
        check_len("v", v.len(), k.len())?;
        let n = k.len() / row;
        if self.n_rows + n > self.capacity {
            return Err(invalid("k", format!("{} + {n} rows exceed the capacity {}", self.n_rows, self.capacity)));
        }
        if n == 0 {
            return Ok(());
        }
        let offset = self.n_rows * row;
        for (src, dst) in [(k, &self.k), (v, &self.v)] {
            let src_h = upload_f32(client, src);
            copy_words(client, &src_h, src.len(), 0, dst, self.buffer_len(), offset, src.len())?;
        }
        self.n_rows += n;
        Ok(())
    }
}

impl DeviceKv {
    /// Appends `n` rows already on the device (`k`, `v`: handles of at least
    /// `n · n_kv_heads · head_dim` f32, token-major as the store), copying on the device;
    /// errors past the capacity.
    pub fn append_device<R: Runtime>(
        &mut self,
        client: &ComputeClient<R>,
        k: &Handle,
        v: &Handle,
        n: usize,
    ) -> Result<()> {
        if self.n_rows + n > self.capacity {
            return Err(invalid("n", format!("{} + {n} rows exceed the capacity {}", self.n_rows, self.capacity)));
        }
        if n == 0 {
            return Ok(());
        }
        let count = n * self.n_kv_heads * self.head_dim;
        let offset = self.n_rows * self.n_kv_heads * self.head_dim;
        for (src, dst) in [(k, &self.k), (v, &self.v)] {
            copy_words(client, src, count, 0, dst, self.buffer_len(), offset, count)?;
        }
        self.n_rows += n;
        Ok(())
    }

    /// Grows the buffers to room for at least `capacity` rows, keeping the stored rows (copied
    /// on the device); no-op when they already have room.
    pub fn reserve<R: Runtime>(&mut self, client: &ComputeClient<R>, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        let mut grown = DeviceKv::with_capacity(client, capacity, self.n_kv_heads, self.head_dim)?;
        let count = self.n_rows * self.n_kv_heads * self.head_dim;
        if count > 0 {
            for (src, dst) in [(&self.k, &grown.k), (&self.v, &grown.v)] {
                copy_words(client, src, self.buffer_len(), 0, dst, grown.buffer_len(), 0, count)?;
            }
        }
        grown.n_rows = self.n_rows;
        *self = grown;
        Ok(())
    }
}

/// Units per cube of [`copy_kernel`].
const COPY_UNITS: u32 = 64;

/// `dst[dst_off + i] = src[src_off + i]` for `i < n` (32-bit words: f32 rows, or f16 pairs).
#[cube(launch)]
pub fn copy_kernel(src: &Array<u32>, dst: &mut Array<u32>, src_off: u32, dst_off: u32, n: u32) {
    let i = cube_linear() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n as usize {
        dst[dst_off as usize + i] = src[src_off as usize + i];
    }
}

/// Per-KV-head id lists on the device (CSR, see the module doc).
#[derive(Debug, Clone)]
pub struct DeviceRowLists {
    /// Concatenated ids (at least one element long; unused when `n_ids == 0`).
    pub ids: Handle,
    /// `n_kv_heads + 1` offsets into `ids`.
    pub offsets: Handle,
    /// Additive log-weights parallel to `ids`, if any.
    pub log_w: Option<Handle>,
    /// Total ids.
    pub n_ids: usize,
    /// Longest list: sizes the grid.
    pub max_len: usize,
    /// Lists (one per KV head).
    pub n_kv_heads: usize,
}

impl DeviceRowLists {
    /// Uploads one list per KV head, with optional log-weights (one slice per list, same
    /// lengths). Ids are checked against `n_rows`: the kernel would skip an out-of-range id.
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        lists: &[&[u32]],
        log_weights: Option<&[&[f32]]>,
        n_rows: usize,
    ) -> Result<Self> {
        let mut ids = Vec::with_capacity(lists.iter().map(|l| l.len()).sum());
        let mut offsets = Vec::with_capacity(lists.len() + 1);
        offsets.push(0u32);
        for l in lists {
            if let Some(&bad) = l.iter().find(|&&id| id as usize >= n_rows) {
                return Err(invalid("lists", format!("row id {bad} out of range for {n_rows} rows")));
            }
            ids.extend_from_slice(l);
            offsets.push(to_u32("lists (total ids)", ids.len())?);
        }
        let log_w = match log_weights {
            None => None,
            Some(ws) => {
                check_len("log_weights (lists)", ws.len(), lists.len())?;
                let mut flat = Vec::with_capacity(ids.len());
                for (w, l) in ws.iter().zip(lists) {
                    check_len("log_weights (one list)", w.len(), l.len())?;
                    if w.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                        return Err(invalid("log_weights", "NaN or +inf"));
                    }
                    flat.extend_from_slice(w);
                }
                Some(upload_f32(client, &flat))
            }
        };
        Ok(Self {
            ids: upload_u32(client, &ids),
            offsets: upload_u32(client, &offsets),
            log_w,
            n_ids: ids.len(),
            max_len: lists.iter().map(|l| l.len()).max().unwrap_or(0),
            n_kv_heads: lists.len(),
        })
    }
}

/// Attention outputs read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `[heads][head_dim]` normalised outputs.
    pub out: Vec<f32>,
    /// `[heads]` log-sum-exp of the scaled scores (`-inf` for an empty key set).
    pub lse: Vec<f32>,
}

/// Pass 1: partial softmax state of one chunk of one KV head's ids, for its whole query group.
///
/// Writes `part_o[((h · n_chunks + chunk_base + c) · group + g) · d + i]` (unnormalised output)
/// and `part_ml[(… + g) · 2 + {0, 1}]` = (running max, sum); sum 0 means the chunk saw no row.
/// `n_chunks` counts the chunks of every launch that shares the partials (one per buffer of a
/// [`KvStore`]); this launch's start at `chunk_base`. `k` and `v` are 32-bit words: f32 values,
/// or with `half` two f16 values each (low half first).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn decode_partial_kernel(
    q: &Array<f32>,
    k: &Array<u32>,
    v: &Array<u32>,
    ids: &Array<u32>,
    offsets: &Array<u32>,
    log_w: &Array<f32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    n_rows: u32,
    n_kv: u32,
    chunk_rows: u32,
    chunk_base: u32,
    n_chunks: u32,
    scale: f32,
    #[comptime] group: usize,
    #[comptime] d: usize,
    #[comptime] tile: usize,
    #[comptime] weighted: bool,
    #[comptime] half: bool,
) {
    let c = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let gd = comptime!(group * d);

    let mut q_s = SharedMemory::<f32>::new(gd);
    let mut acc = SharedMemory::<f32>::new(gd);
    let mut s_s = SharedMemory::<f32>::new(comptime!(group * tile));
    let mut row_s = SharedMemory::<u32>::new(tile);
    let mut m_s = SharedMemory::<f32>::new(group);
    let mut l_s = SharedMemory::<f32>::new(group);
    let mut f_s = SharedMemory::<f32>::new(group);

    let list_begin = offsets[h] as usize;
    let list_end = offsets[h + 1] as usize;
    let mut start = list_begin + c * chunk_rows as usize;
    if start > list_end {
        start = list_end;
    }
    let mut end = start + chunk_rows as usize;
    if end > list_end {
        end = list_end;
    }

    let q_base = h * gd;
    let mut idx = u;
    while idx < gd {
        q_s[idx] = q[q_base + idx];
        acc[idx] = 0.0;
        idx += tile;
    }
    if u < group {
        m_s[u] = NEG_BIG;
        l_s[u] = 0.0;
        f_s[u] = 0.0;
    }
    sync_cube();

    let kv_stride = n_kv as usize * d;
    let mut base = start;
    while base < end {
        // Scores: unit u takes row base + u and scores it against every query of the group.
        let r = base + u;
        let mut row = n_rows;
        if r < end {
            row = ids[r];
        }
        row_s[u] = row;
        if row < n_rows {
            let k_base = row as usize * kv_stride + h * d;
            let mut w = 0.0f32;
            if weighted {
                w = log_w[r];
            }
            // Each key element is loaded once and used for every query of the group.
            let mut dots = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                dots[g] = 0.0;
            }
            for i in 0..d {
                let kx = kv_at(k, k_base + i, half);
                #[unroll]
                for g in 0..group {
                    dots[g] += q_s[g * d + i] * kx;
                }
            }
            #[unroll]
            for g in 0..group {
                s_s[g * tile + u] = dots[g] * scale + w;
            }
        } else {
            // Past the list or an id outside the store: masked.
            #[unroll]
            for g in 0..group {
                s_s[g * tile + u] = NEG_BIG;
            }
        }
        sync_cube();

        // Online softmax: one unit per query of the group.
        let mut n_tile = end - base;
        if n_tile > tile {
            n_tile = tile;
        }
        if u < group {
            online_softmax_step(&mut s_s, &mut m_s, &mut l_s, &mut f_s, u, tile, n_tile);
        }
        sync_cube();

        // Output update: unit u owns columns u, u + tile, … for every query of the group, so
        // each value element is loaded once per group.
        let mut i = u;
        while i < d {
            let mut a = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                a[g] = acc[g * d + i] * f_s[g];
            }
            for j in 0..n_tile {
                let rj = row_s[j];
                if rj < n_rows {
                    let vx = kv_at(v, rj as usize * kv_stride + h * d + i, half);
                    #[unroll]
                    for g in 0..group {
                        a[g] += s_s[g * tile + j] * vx;
                    }
                }
            }
            #[unroll]
            for g in 0..group {
                acc[g * d + i] = a[g];
            }
            i += tile;
        }
        sync_cube();
        base += tile;
    }

    let part = (h * n_chunks as usize + chunk_base as usize + c) * group;
    let mut e = u;
    while e < gd {
        part_o[part * d + e] = acc[e];
        e += tile;
    }
    if u < group {
        part_ml[(part + u) * 2] = m_s[u];
        part_ml[(part + u) * 2 + 1] = l_s[u];
    }
}

/// Pass 2: combines the chunks of each query head by log-sum-exp into the normalised output and
/// its log-sum-exp (`neg_inf` is `-inf`, passed at run time: WGSL has no infinite literal).
#[cube(launch)]
pub fn decode_reduce_kernel(
    part_o: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_q: u32,
    n_chunks: u32,
    neg_inf: f32,
    #[comptime] group: usize,
    #[comptime] d: usize,
) {
    let hq = cube_linear();
    if hq >= n_q as usize {
        terminate!();
    }
    let h = hq / group;
    let g = hq % group;
    let nc = n_chunks as usize;
    let part0 = h * nc * group + g;

    let mut mx = f32::new(NEG_BIG);
    let mut any = false;
    for c in 0..nc {
        let p = part0 + c * group;
        if part_ml[p * 2 + 1] > 0.0 {
            any = true;
            let m = part_ml[p * 2];
            if m > mx {
                mx = m;
            }
        }
    }
    let mut total = 0.0f32;
    for c in 0..nc {
        let p = part0 + c * group;
        let l = part_ml[p * 2 + 1];
        if l > 0.0 {
            total += l * (part_ml[p * 2] - mx).exp();
        }
    }
    let mut i = UNIT_POS_X as usize;
    while i < d {
        let mut o = 0.0f32;
        if any {
            for c in 0..nc {
                let p = part0 + c * group;
                if part_ml[p * 2 + 1] > 0.0 {
                    o += part_o[p * d + i] * (part_ml[p * 2] - mx).exp();
                }
            }
            o /= total;
        }
        out[hq * d + i] = o;
        i += CUBE_DIM_X as usize;
    }
    if UNIT_POS_X == 0 {
        if any {
            lse[hq] = mx + total.ln();
        } else {
            lse[hq] = neg_inf;
        }
    }
}

/// Shared memory pass 1 needs, in bytes.
fn partial_smem_bytes(group: usize, d: usize, tile: usize) -> usize {
    4 * (2 * group * d + group * tile + tile + 3 * group)
}

/// Value `e` of a K or V buffer of 32-bit words: an f32, or with `half` the f16 in the low
/// (even `e`) or high (odd `e`) half of word `e / 2`, widened.
#[cube]
fn kv_at(buf: &Array<u32>, e: usize, #[comptime] half: bool) -> f32 {
    if half {
        let w = buf[e / 2];
        f16_bits_to_f32((w >> (((e % 2) * 16) as u32)) & 0xffff)
    } else {
        f32::reinterpret(buf[e])
    }
}

/// One K/V buffer pair pass 1 reads: `words` 32-bit words each, `slots` rows.
struct KvView<'a> {
    k: &'a Handle,
    v: &'a Handle,
    words: usize,
    slots: usize,
    half: bool,
}

/// Checks what every decode launch needs; returns the query group size.
fn check_decode<R: Runtime>(
    client: &ComputeClient<R>,
    (n_kv, d): (usize, usize),
    n_lists: usize,
    n_q_heads: usize,
    scale: f32,
    chunk_rows: usize,
) -> Result<usize> {
    if n_lists != n_kv {
        return Err(invalid("lists", format!("{n_lists} lists for {n_kv} KV heads")));
    }
    if n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv) {
        return Err(invalid("n_q_heads", format!("{n_q_heads} is not a positive multiple of {n_kv} KV heads")));
    }
    if !scale.is_finite() {
        return Err(invalid("scale", "not finite"));
    }
    if chunk_rows == 0 {
        return Err(invalid("chunk_rows", "must be > 0"));
    }
    let group = n_q_heads / n_kv;
    if group > DECODE_TILE {
        // One unit per query runs the softmax update: a cube has DECODE_TILE units.
        return Err(invalid("n_q_heads", format!("group {group} exceeds {DECODE_TILE} query heads per KV head")));
    }
    let smem = partial_smem_bytes(group, d, DECODE_TILE);
    let limit = client.properties().hardware.max_shared_memory_size;
    if smem > limit {
        return Err(invalid(
            "n_q_heads",
            format!("group {group} × head_dim {d} needs {smem} B of shared memory, the device has {limit}"),
        ));
    }
    Ok(group)
}

/// Rows per chunk and chunks for lists of at most `max_len` ids: `chunk_rows` rounded up to a
/// multiple of [`DECODE_TILE`], grown if the grid would exceed 65,535 chunks.
fn chunking(chunk_rows: usize, max_len: usize) -> (usize, usize) {
    let mut chunk = chunk_rows.div_ceil(DECODE_TILE) * DECODE_TILE;
    let max_chunks = crate::util::MAX_CUBES_PER_AXIS as usize;
    if max_len.div_ceil(chunk) > max_chunks {
        chunk = max_len.div_ceil(max_chunks).div_ceil(DECODE_TILE) * DECODE_TILE;
    }
    (chunk, max_len.div_ceil(chunk))
}

/// The partials both passes share: `n_chunks` chunks per KV head.
struct Partials {
    o: Handle,
    ml: Handle,
    n_parts: usize,
    n_chunks: usize,
}

impl Partials {
    fn new<R: Runtime>(client: &ComputeClient<R>, n_q_heads: usize, d: usize, n_chunks: usize) -> Self {
        let n_parts = n_q_heads * n_chunks;
        Self { o: empty_f32(client, n_parts * d), ml: empty_f32(client, n_parts * 2), n_parts, n_chunks }
    }
}

/// Pass 1 over one buffer pair: `n_chunks` chunks of `chunk` ids, written at `chunk_base`.
#[allow(clippy::too_many_arguments)]
fn launch_partial<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &KvView<'_>,
    q: &Handle,
    n_q_heads: usize,
    lists: &DeviceRowLists,
    scale: f32,
    (chunk, n_chunks, chunk_base): (usize, usize, usize),
    parts: &Partials,
    d: usize,
) -> Result<()> {
    let n_kv = lists.n_kv_heads;
    let group = n_q_heads / n_kv;
    // SAFETY (all `from_raw_parts`): every length is the element count the handle was made with.
    unsafe {
        decode_partial_kernel::launch::<R>(
            client,
            CubeCount::Static(to_u32("chunks", n_chunks)?, to_u32("n_kv_heads", n_kv)?, 1),
            CubeDim::new_1d(DECODE_TILE as u32),
            ArrayArg::from_raw_parts(q.clone(), n_q_heads * d),
            ArrayArg::from_raw_parts(kv.k.clone(), kv.words),
            ArrayArg::from_raw_parts(kv.v.clone(), kv.words),
            ArrayArg::from_raw_parts(lists.ids.clone(), buf_len(lists.n_ids)),
            ArrayArg::from_raw_parts(lists.offsets.clone(), n_kv + 1),
            match &lists.log_w {
                Some(w) => ArrayArg::from_raw_parts(w.clone(), buf_len(lists.n_ids)),
                // Unread placeholder: a binding must exist even when the kernel has no weights.
                None => ArrayArg::from_raw_parts(upload_f32(client, &[0.0]), 1),
            },
            ArrayArg::from_raw_parts(parts.o.clone(), parts.n_parts * d),
            ArrayArg::from_raw_parts(parts.ml.clone(), parts.n_parts * 2),
            to_u32("n_rows", kv.slots)?,
            to_u32("n_kv_heads", n_kv)?,
            to_u32("chunk_rows", chunk)?,
            to_u32("chunks", chunk_base)?,
            to_u32("chunks", parts.n_chunks)?,
            scale,
            group,
            d,
            DECODE_TILE,
            lists.log_w.is_some(),
            kv.half,
        );
    }
    Ok(())
}

/// Pass 2: the chunks of each query head combined into `out` and `lse`.
fn launch_reduce<R: Runtime>(
    client: &ComputeClient<R>,
    parts: Partials,
    n_q_heads: usize,
    group: usize,
    d: usize,
    out: &Handle,
    lse: &Handle,
) -> Result<()> {
    // SAFETY (all `from_raw_parts`): every length is the element count the handle was made with.
    unsafe {
        decode_reduce_kernel::launch::<R>(
            client,
            grid_1d("n_q_heads", n_q_heads)?,
            CubeDim::new_1d(d.next_power_of_two().clamp(32, 128) as u32),
            ArrayArg::from_raw_parts(parts.o, parts.n_parts * d),
            ArrayArg::from_raw_parts(parts.ml, parts.n_parts * 2),
            ArrayArg::from_raw_parts(out.clone(), n_q_heads * d),
            ArrayArg::from_raw_parts(lse.clone(), n_q_heads),
            to_u32("n_q_heads", n_q_heads)?,
            to_u32("chunks", parts.n_chunks)?,
            f32::NEG_INFINITY,
            group,
            d,
        );
    }
    Ok(())
}

/// Launches both passes on device buffers: `q` `[n_q_heads][head_dim]`, writing `out`
/// `[n_q_heads][head_dim]` and `lse` `[n_q_heads]`. `chunk_rows` is rounded up to a multiple of
/// [`DECODE_TILE`] (and grown if the grid would exceed 65,535 chunks).
#[allow(clippy::too_many_arguments)]
pub fn launch_decode<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &Handle,
    n_q_heads: usize,
    lists: &DeviceRowLists,
    scale: f32,
    chunk_rows: usize,
    out: &Handle,
    lse: &Handle,
) -> Result<()> {
    let d = kv.head_dim;
    let group = check_decode(client, (kv.n_kv_heads, d), lists.n_kv_heads, n_q_heads, scale, chunk_rows)?;
    let (chunk, n_chunks) = chunking(chunk_rows, lists.max_len);
    let n_chunks = n_chunks.max(1);
    let parts = Partials::new(client, n_q_heads, d, n_chunks);
    let view = KvView { k: &kv.k, v: &kv.v, words: kv.buffer_len(), slots: kv.n_rows, half: false };
    launch_partial(client, &view, q, n_q_heads, lists, scale, (chunk, n_chunks, 0), &parts, d)?;
    launch_reduce(client, parts, n_q_heads, group, d, out, lse)
}

/// How a [`KvStore`] keeps its values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvFormat {
    /// 4 bytes a value.
    #[default]
    F32,
    /// 2 bytes a value: IEEE half, rounded to nearest even (as `half::f16::from_f32`), two in a
    /// 32-bit word (WGSL's `f16` needs an extension lavapipe lacks); the kernels widen each
    /// value to f32 and accumulate in f32.
    F16,
}

impl KvFormat {
    /// Bytes a value takes on the device.
    pub fn value_bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
        }
    }

    /// 32-bit words holding `values` values (`values` even for F16).
    fn words(self, values: usize) -> usize {
        match self {
            KvFormat::F32 => values,
            KvFormat::F16 => values / 2,
        }
    }
}

/// One K/V buffer pair of a [`KvStore`].
#[derive(Debug, Clone)]
struct Segment {
    k: Handle,
    v: Handle,
    slots: usize,
}

/// KV rows on the device for decode attention: slots of `[n_kv_heads][head_dim]` values, f32
/// or f16 ([`KvFormat`]), in one K and one V buffer per segment of at most `max_segment_slots`
/// slots (a device caps the size of one buffer: wgpu's default is 128 MiB). Slot `s` lives in
/// the segment whose slots cover it; what row a slot holds is the caller's (the model's device
/// mirror maps a cache's rows to slots). Decode attention takes per-KV-head slot lists and runs
/// pass 1 once per segment the lists touch, all into one set of partials, then one reduce.
#[derive(Debug, Clone)]
pub struct KvStore {
    format: KvFormat,
    n_kv_heads: usize,
    head_dim: usize,
    max_segment_slots: usize,
    segments: Vec<Segment>,
}

impl KvStore {
    /// An empty store (no buffer yet: [`KvStore::reserve`]). F16 needs an even `head_dim`.
    pub fn new(format: KvFormat, n_kv_heads: usize, head_dim: usize, max_segment_slots: usize) -> Result<Self> {
        if n_kv_heads == 0 || head_dim == 0 {
            return Err(invalid("n_kv_heads", "n_kv_heads and head_dim must be > 0"));
        }
        if format == KvFormat::F16 && !head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", format!("{head_dim} is odd: f16 rows are stored in pairs")));
        }
        if max_segment_slots == 0 {
            return Err(invalid("max_segment_slots", "must be > 0"));
        }
        let words = format.words(n_kv_heads * head_dim);
        to_u32("max_segment_slots · row", max_segment_slots.saturating_mul(words))?;
        Ok(Self { format, n_kv_heads, head_dim, max_segment_slots, segments: Vec::new() })
    }

    /// The most slots one buffer may hold on `client`'s device (its largest storage binding).
    pub fn max_slots_per_buffer<R: Runtime>(
        client: &ComputeClient<R>,
        format: KvFormat,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        let row = (n_kv_heads * head_dim * format.value_bytes()).max(1) as u64;
        let cap = client.properties().memory.max_page_size.min(u64::from(u32::MAX));
        ((cap / row) as usize).max(1)
    }

    /// The storage format.
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Slots the buffers have room for.
    pub fn capacity(&self) -> usize {
        self.segments.iter().map(|s| s.slots).sum()
    }

    /// Slots of the first buffer (0 before any).
    pub fn first_segment_slots(&self) -> usize {
        self.segments.first().map_or(0, |s| s.slots)
    }

    /// Buffers per K (and per V).
    pub fn n_segments(&self) -> usize {
        self.segments.len()
    }

    /// Device bytes of the K and V buffers together.
    pub fn bytes(&self) -> u64 {
        (self.capacity() * self.row_words() * 4 * 2) as u64
    }

    fn row_words(&self) -> usize {
        self.format.words(self.n_kv_heads * self.head_dim)
    }

    /// Grows the buffers to room for `slots` slots, keeping what they hold: the last segment
    /// grows (copied on the device) up to the segment cap, then new segments follow. Exactly
    /// `slots`: a caller that appends amortises by asking for more (the model's mirror doubles).
    pub fn reserve<R: Runtime>(&mut self, client: &ComputeClient<R>, slots: usize) -> Result<()> {
        let rw = self.row_words();
        while self.capacity() < slots {
            let need = slots - self.capacity();
            let grow = self.segments.last().filter(|s| s.slots < self.max_segment_slots).map(|s| s.slots);
            match grow {
                Some(old) => {
                    let new = (old + need).min(self.max_segment_slots);
                    let (k, v) = (empty_f32(client, new * rw), empty_f32(client, new * rw));
                    let last = self.segments.last_mut().ok_or_else(|| invalid("slots", "no segment"))?;
                    copy_words(client, &last.k, old * rw, 0, &k, new * rw, 0, old * rw)?;
                    copy_words(client, &last.v, old * rw, 0, &v, new * rw, 0, old * rw)?;
                    *last = Segment { k, v, slots: new };
                }
                None => {
                    let new = need.min(self.max_segment_slots);
                    let (k, v) = (empty_f32(client, new * rw), empty_f32(client, new * rw));
                    self.segments.push(Segment { k, v, slots: new });
                }
            }
        }
        Ok(())
    }

    /// The segment pieces of slots `slot..slot + n`: (segment, first local slot, first of the
    /// `n`, count).
    fn pieces(&self, param: &'static str, slot: usize, n: usize) -> Result<Vec<(usize, usize, usize, usize)>> {
        if slot + n > self.capacity() {
            return Err(invalid(param, format!("slots {slot}..{} exceed the capacity {}", slot + n, self.capacity())));
        }
        let (mut out, mut base) = (Vec::new(), 0);
        for (i, s) in self.segments.iter().enumerate() {
            let (lo, hi) = (slot.max(base), (slot + n).min(base + s.slots));
            if lo < hi {
                out.push((i, lo - base, lo - slot, hi - lo));
            }
            base += s.slots;
        }
        Ok(out)
    }

    /// Writes host rows (`k`, `v`: `[n][n_kv_heads][head_dim]` f32, rounded to the format) at
    /// slots `slot..slot + n`.
    pub fn write<R: Runtime>(&mut self, client: &ComputeClient<R>, slot: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.n_kv_heads * self.head_dim;
        if !k.len().is_multiple_of(row) {
            return Err(invalid("k", format!("length {} is not a multiple of n_kv_heads · head_dim = {row}", k.len())));
        }
        check_len("v", v.len(), k.len())?;
        let n = k.len() / row;
        let rw = self.row_words();
        for (seg, local, first, count) in self.pieces("slot", slot, n)? {
            let s = &self.segments[seg];
            for (src, dst) in [(k, &s.k), (v, &s.v)] {
                let src = &src[first * row..(first + count) * row];
                let words: Vec<u32> = match self.format {
                    KvFormat::F32 => src.iter().map(|x| x.to_bits()).collect(),
                    KvFormat::F16 => src
                        .chunks_exact(2)
                        .map(|p| {
                            u32::from(half::f16::from_f32(p[0]).to_bits())
                                | (u32::from(half::f16::from_f32(p[1]).to_bits()) << 16)
                        })
                        .collect(),
                };
                let h = upload_u32(client, &words);
                copy_words(client, &h, words.len(), 0, dst, s.slots * rw, local * rw, words.len())?;
            }
        }
        Ok(())
    }

    /// Writes `n` rows already on the device (`k`, `v`: handles of at least
    /// `n · n_kv_heads · head_dim` f32, token-major) at slots `slot..slot + n`, rounded to the
    /// format on the device.
    pub fn write_device<R: Runtime>(
        &mut self,
        client: &ComputeClient<R>,
        slot: usize,
        k: &Handle,
        v: &Handle,
        n: usize,
    ) -> Result<()> {
        let (row, rw) = (self.n_kv_heads * self.head_dim, self.row_words());
        for (seg, local, first, count) in self.pieces("slot", slot, n)? {
            let s = &self.segments[seg];
            for (src, dst) in [(k, &s.k), (v, &s.v)] {
                match self.format {
                    KvFormat::F32 => {
                        copy_words(client, src, n * row, first * row, dst, s.slots * rw, local * rw, count * row)?
                    }
                    KvFormat::F16 => {
                        pack_f16(client, src, n * row, first * row, dst, s.slots * rw, local * rw, count * rw)?
                    }
                }
            }
        }
        Ok(())
    }

    /// Slots `0..n_rows` as one f32 [`DeviceKv`] (what the prefill kernel reads): the first
    /// segment's buffers themselves for F32, a widened copy for F16. Errors when the slots span
    /// more than the first segment.
    pub fn dense_f32<R: Runtime>(&self, client: &ComputeClient<R>, n_rows: usize) -> Result<DeviceKv> {
        let first = self
            .segments
            .first()
            .filter(|s| s.slots >= n_rows)
            .ok_or_else(|| invalid("n_rows", format!("{n_rows} rows do not fit in the store's first buffer")))?;
        let row = self.n_kv_heads * self.head_dim;
        let (k, v, capacity) = match self.format {
            KvFormat::F32 => (first.k.clone(), first.v.clone(), first.slots),
            KvFormat::F16 => {
                let wide = |src: &Handle| -> Result<Handle> {
                    let dst = empty_f32(client, n_rows * row);
                    widen_f16(client, src, first.slots * self.row_words(), &dst, n_rows * row)?;
                    Ok(dst)
                };
                (wide(&first.k)?, wide(&first.v)?, n_rows)
            }
        };
        Ok(DeviceKv { k, v, n_rows, capacity, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim })
    }

    /// Decode attention over per-KV-head slot lists (with optional additive log-weights), as
    /// [`launch_decode`]: `q` `[n_q_heads][head_dim]` in, `out` and `lse` written.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_decode<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        q: &Handle,
        n_q_heads: usize,
        lists: &[&[u32]],
        log_weights: Option<&[&[f32]]>,
        scale: f32,
        chunk_rows: usize,
        out: &Handle,
        lse: &Handle,
    ) -> Result<()> {
        let d = self.head_dim;
        let group = check_decode(client, (self.n_kv_heads, d), lists.len(), n_q_heads, scale, chunk_rows)?;
        if self.segments.is_empty() {
            return Err(invalid("slots", "the store has no buffer (reserve first)"));
        }
        if let Some(ws) = log_weights {
            check_len("log_weights (lists)", ws.len(), lists.len())?;
        }
        let cap = self.capacity();
        if let Some(bad) = lists.iter().flat_map(|l| l.iter()).find(|&&s| s as usize >= cap) {
            return Err(invalid("lists", format!("slot {bad} out of range for {cap} slots")));
        }
        // Each segment's share of the lists, in local slots.
        let mut launches = Vec::new();
        let (mut base, mut chunks) = (0usize, 0usize);
        for (i, s) in self.segments.iter().enumerate() {
            let range = base as u32..(base + s.slots) as u32;
            let mut local: Vec<Vec<u32>> = Vec::with_capacity(lists.len());
            let mut weights: Vec<Vec<f32>> = Vec::with_capacity(lists.len());
            for (j, l) in lists.iter().enumerate() {
                let (mut ids, mut ws) = (Vec::new(), Vec::new());
                for (e, &slot) in l.iter().enumerate() {
                    if range.contains(&slot) {
                        ids.push(slot - range.start);
                        if let Some(w) = log_weights {
                            ws.push(*w[j].get(e).ok_or_else(|| invalid("log_weights", "shorter than its list"))?);
                        }
                    }
                }
                local.push(ids);
                weights.push(ws);
            }
            let max_len = local.iter().map(Vec::len).max().unwrap_or(0);
            // Every list empty: one chunk of segment 0 still writes the empty partials.
            let last = i + 1 == self.segments.len();
            if max_len > 0 || (last && chunks == 0) {
                let (chunk, n) = chunking(chunk_rows, max_len);
                let n = n.max(1);
                launches.push((i, local, weights, chunk, n, chunks));
                chunks += n;
            }
            base += s.slots;
        }
        let parts = Partials::new(client, n_q_heads, d, chunks);
        let rw = self.row_words();
        for (i, local, weights, chunk, n, chunk_base) in launches {
            let s = &self.segments[i];
            let ids: Vec<&[u32]> = local.iter().map(Vec::as_slice).collect();
            let ws: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
            let dev = DeviceRowLists::upload(client, &ids, log_weights.map(|_| &ws[..]), s.slots)?;
            let view =
                KvView { k: &s.k, v: &s.v, words: s.slots * rw, slots: s.slots, half: self.format == KvFormat::F16 };
            launch_partial(client, &view, q, n_q_heads, &dev, scale, (chunk, n, chunk_base), &parts, d)?;
        }
        launch_reduce(client, parts, n_q_heads, group, d, out, lse)
    }
}

/// `dst[dst_off + i] = src[src_off + i]` for `i < count` (32-bit words; `src_len`, `dst_len`:
/// the handles' word counts).
#[allow(clippy::too_many_arguments)]
fn copy_words<R: Runtime>(
    client: &ComputeClient<R>,
    src: &Handle,
    src_len: usize,
    src_off: usize,
    dst: &Handle,
    dst_len: usize,
    dst_off: usize,
    count: usize,
) -> Result<()> {
    if src_off + count > src_len || dst_off + count > dst_len {
        return Err(invalid("count", format!("{count} words at {src_off} / {dst_off} exceed {src_len} / {dst_len}")));
    }
    if count == 0 {
        return Ok(());
    }
    // SAFETY: the lengths were checked against the element counts the handles were made with.
    unsafe {
        copy_kernel::launch::<R>(
            client,
            grid_1d("count", count.div_ceil(COPY_UNITS as usize))?,
            CubeDim::new_1d(COPY_UNITS),
            ArrayArg::from_raw_parts(src.clone(), buf_len(src_len)),
            ArrayArg::from_raw_parts(dst.clone(), buf_len(dst_len)),
            to_u32("offset", src_off)?,
            to_u32("offset", dst_off)?,
            to_u32("count", count)?,
        );
    }
    Ok(())
}

/// `dst[dst_off + i]` = the f16 pair of `src[src_off + 2i]`, `src[src_off + 2i + 1]` (f32, low
/// half first) for `i < words`.
#[allow(clippy::too_many_arguments)]
fn pack_f16<R: Runtime>(
    client: &ComputeClient<R>,
    src: &Handle,
    src_len: usize,
    src_off: usize,
    dst: &Handle,
    dst_len: usize,
    dst_off: usize,
    words: usize,
) -> Result<()> {
    if src_off + 2 * words > src_len || dst_off + words > dst_len {
        return Err(invalid(
            "count",
            format!("{words} f16 pairs at {src_off} / {dst_off} exceed {src_len} / {dst_len}"),
        ));
    }
    if words == 0 {
        return Ok(());
    }
    // SAFETY: the lengths were checked against the element counts the handles were made with.
    unsafe {
        pack_f16_kernel::launch::<R>(
            client,
            grid_1d("count", words.div_ceil(COPY_UNITS as usize))?,
            CubeDim::new_1d(COPY_UNITS),
            ArrayArg::from_raw_parts(src.clone(), buf_len(src_len)),
            ArrayArg::from_raw_parts(dst.clone(), buf_len(dst_len)),
            to_u32("offset", src_off)?,
            to_u32("offset", dst_off)?,
            to_u32("count", words)?,
        );
    }
    Ok(())
}

/// `dst[..n]` (f32) = the first `n` f16 values of `src` (pairs in words), `n` even.
fn widen_f16<R: Runtime>(
    client: &ComputeClient<R>,
    src: &Handle,
    src_len: usize,
    dst: &Handle,
    n: usize,
) -> Result<()> {
    let words = n / 2;
    if words > src_len {
        return Err(invalid("n_rows", format!("{n} values exceed {src_len} f16 pairs")));
    }
    if words == 0 {
        return Ok(());
    }
    // SAFETY: the lengths were checked against the element counts the handles were made with.
    unsafe {
        widen_f16_kernel::launch::<R>(
            client,
            grid_1d("count", words.div_ceil(COPY_UNITS as usize))?,
            CubeDim::new_1d(COPY_UNITS),
            ArrayArg::from_raw_parts(src.clone(), buf_len(src_len)),
            ArrayArg::from_raw_parts(dst.clone(), buf_len(n)),
            to_u32("count", words)?,
        );
    }
    Ok(())
}

/// `dst[dst_off + i] = f16(src[src_off + 2i]) | f16(src[src_off + 2i + 1]) << 16`.
#[cube(launch)]
pub fn pack_f16_kernel(src: &Array<f32>, dst: &mut Array<u32>, src_off: u32, dst_off: u32, n: u32) {
    let i = cube_linear() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n as usize {
        let s = src_off as usize + 2 * i;
        dst[dst_off as usize + i] = f32_to_f16_bits(src[s]) | (f32_to_f16_bits(src[s + 1]) << 16);
    }
}

/// `dst[2i], dst[2i + 1]` = the two f16 values of `src[i]` as f32.
#[cube(launch)]
pub fn widen_f16_kernel(src: &Array<u32>, dst: &mut Array<f32>, n: u32) {
    let i = cube_linear() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n as usize {
        let w = src[i];
        dst[2 * i] = f16_bits_to_f32(w & 0xffff);
        dst[2 * i + 1] = f16_bits_to_f32(w >> 16);
    }
}

/// Options of [`decode_attention`].
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Rows per chunk (per cube); see [`launch_decode`].
    pub chunk_rows: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { chunk_rows: DEFAULT_CHUNK_ROWS }
    }
}

/// Uploads `q` (`[n_q_heads][head_dim]`) and the lists, runs [`launch_decode`] and reads back.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &[f32],
    n_q_heads: usize,
    lists: &[&[u32]],
    log_weights: Option<&[&[f32]]>,
    scale: f32,
    opts: DecodeOptions,
) -> Result<Attention> {
    check_len("q", q.len(), n_q_heads * kv.head_dim)?;
    if q.iter().any(|x| !x.is_finite()) {
        return Err(invalid("q", "not finite"));
    }
    check_len("lists", lists.len(), kv.n_kv_heads)?;
    let dev_lists = DeviceRowLists::upload(client, lists, log_weights, kv.n_rows)?;
    let q_h = upload_f32(client, q);
    let out = empty_f32(client, n_q_heads * kv.head_dim);
    let lse = empty_f32(client, n_q_heads);
    launch_decode(client, kv, &q_h, n_q_heads, &dev_lists, scale, opts.chunk_rows, &out, &lse)?;
    Ok(Attention { out: read_f32(client, out, n_q_heads * kv.head_dim)?, lse: read_f32(client, lse, n_q_heads)? })
}
