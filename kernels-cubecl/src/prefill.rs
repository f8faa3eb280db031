//! Causal prefill attention, GQA-aware, tiled flash attention (f32).
//!
//! A chunk of `t` query tokens at positions `start..start + t` attends to keys
//! `0..start + t` of a [`DeviceKv`] store (`[n_rows][n_kv_heads][head_dim]`, `n_rows ≥ start + t`);
//! query `i` sees keys `0..=start + i`. Layouts: `q` and `out` `[t][n_q_heads][head_dim]`,
//! `lse` `[t][n_q_heads]`.
//!
//! Cube `(tile, h)` holds `bq` query tokens × the `group` query heads of KV head `h` and walks
//! the keys in tiles of `bk` rows (at most [`PREFILL_KEY_TILE`]), each K/V tile staged once in
//! shared memory for all of those query rows, with an online softmax, as in flash attention;
//! keys past the last query of the tile are never visited. `bq` and `bk` shrink to fit the
//! device's shared memory. No plane operations.
//!
//! Block-sparse prefill ([`sparse_prefill_kernel`], [`launch_sparse_prefill`]): positions are cut
//! into blocks of `block` tokens and, per KV head, each query block of the chunk names the key
//! blocks it attends ([`DeviceBlockLists`], built from a prefill pattern's masks). A cube holds a
//! tile of one query block and walks only those key blocks, in key tiles, with the same key-tile
//! step as the dense kernel (`tile_keys`); the unlisted blocks are never read.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::decode::{Attention, DeviceKv};
use crate::error::{Result, invalid, to_u32};
use crate::util::{MAX_CUBES_PER_AXIS, buf_len, empty_f32, online_softmax_step, read_f32, upload_f32, upload_u32};

/// Keys per tile.
pub const PREFILL_KEY_TILE: usize = 32;

/// Units per cube.
const UNITS: usize = 64;

/// Query rows per cube at most (`bq · group`).
const MAX_ROWS: usize = 16;

/// Score of a masked (non-causal or padding) entry: far below any real score, finite for WGSL.
const MASKED: f32 = -3.0e38;

/// One cube per (query tile, KV head); see the module doc.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn prefill_kernel(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    out: &mut Array<f32>,
    lse: &mut Array<f32>,
    t: u32,
    start: u32,
    n_kv: u32,
    scale: f32,
    #[comptime] group: usize,
    #[comptime] bq: usize,
    #[comptime] d: usize,
    #[comptime] bk: usize,
    #[comptime] units: usize,
) {
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let (n_q, kv_stride) = (n_kv as usize * group, n_kv as usize * d);
    let first = CUBE_POS_X as usize * bq;
    let mut end = first + bq;
    if end > t as usize {
        end = t as usize;
    }
    let rows = comptime!(bq * group);
    let rd = comptime!(bq * group * d);
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut acc = SharedMemory::<f32>::new(rd);
    let mut s_s = SharedMemory::<f32>::new(comptime!(bq * group * bk));
    let mut k_s = SharedMemory::<f32>::new(comptime!(bk * d));
    let mut v_s = SharedMemory::<f32>::new(comptime!(bk * d));
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut l_s = SharedMemory::<f32>::new(rows);
    let mut f_s = SharedMemory::<f32>::new(rows);

    tile_begin(q, &mut q_s, &mut acc, &mut m_s, &mut l_s, &mut f_s, first, end, h, n_q, u, group, bq, d, units);
    // Keys up to the tile's last query (position start + end − 1).
    let kmax = start as usize + end;
    let mut kt = 0usize;
    while kt < kmax {
        tile_keys(
            k,
            v,
            &q_s,
            &mut acc,
            &mut s_s,
            &mut k_s,
            &mut v_s,
            &mut m_s,
            &mut l_s,
            &mut f_s,
            kt,
            kmax,
            first,
            end,
            start as usize,
            h,
            kv_stride,
            scale,
            u,
            group,
            bq,
            d,
            bk,
            units,
        );
        kt += bk;
    }
    tile_finish(out, lse, &acc, &m_s, &l_s, first, end, h, n_q, u, group, bq, d, units);
}

/// One cube per (query tile of a query block, KV head): as [`prefill_kernel`], but the cube walks
/// only the key blocks its KV head's list names for its query block (see [`DeviceBlockLists`]);
/// the other keys are never read. Cube x is `i · per_block + s`: tile `s` of the chunk's `i`-th
/// query block (a block holds `per_block` tiles of `bq` queries; tiles past the block's or the
/// chunk's end hold fewer, or none).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_prefill_kernel(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    out: &mut Array<f32>,
    lse: &mut Array<f32>,
    offsets: &Array<u32>,
    blocks: &Array<u32>,
    t: u32,
    start: u32,
    n_kv: u32,
    scale: f32,
    block: u32,
    n_qb: u32,
    per_block: u32,
    #[comptime] group: usize,
    #[comptime] bq: usize,
    #[comptime] d: usize,
    #[comptime] bk: usize,
    #[comptime] units: usize,
) {
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let (n_q, kv_stride) = (n_kv as usize * group, n_kv as usize * d);
    let (blk, st) = (block as usize, start as usize);
    let i = CUBE_POS_X as usize / per_block as usize;
    let qb = st / blk + i;
    // The query block's rows of the chunk (chunk-local), then this cube's tile of them.
    let mut lo = qb * blk;
    if lo < st {
        lo = st;
    }
    let mut hi = qb * blk + blk - st;
    if hi > t as usize {
        hi = t as usize;
    }
    let first = lo - st + (CUBE_POS_X as usize % per_block as usize) * bq;
    let mut end = first + bq;
    if end > hi {
        end = hi;
    }
    let rows = comptime!(bq * group);
    let rd = comptime!(bq * group * d);
    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut acc = SharedMemory::<f32>::new(rd);
    let mut s_s = SharedMemory::<f32>::new(comptime!(bq * group * bk));
    let mut k_s = SharedMemory::<f32>::new(comptime!(bk * d));
    let mut v_s = SharedMemory::<f32>::new(comptime!(bk * d));
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut l_s = SharedMemory::<f32>::new(rows);
    let mut f_s = SharedMemory::<f32>::new(rows);

    tile_begin(q, &mut q_s, &mut acc, &mut m_s, &mut l_s, &mut f_s, first, end, h, n_q, u, group, bq, d, units);
    let kmax = st + end;
    let list = h * (n_qb as usize + 1) + i;
    let mut a = offsets[list] as usize;
    let mut b = offsets[list + 1] as usize;
    if first >= end {
        b = a;
    }
    while a < b {
        // Block kb's keys, none past the tile's last query.
        let mut kt = blocks[a] as usize * blk;
        let mut kend = kt + blk;
        if kend > kmax {
            kend = kmax;
        }
        while kt < kend {
            tile_keys(
                k, v, &q_s, &mut acc, &mut s_s, &mut k_s, &mut v_s, &mut m_s, &mut l_s, &mut f_s, kt, kend, first, end,
                st, h, kv_stride, scale, u, group, bq, d, bk, units,
            );
            kt += bk;
        }
        a += 1;
    }
    tile_finish(out, lse, &acc, &m_s, &l_s, first, end, h, n_q, u, group, bq, d, units);
}

/// Loads the tile's query rows into `q_s` (row `r = qi · group + g`: chunk row `first + qi`,
/// query head `h · group + g`; zeros at or past `end`), clears the output and the softmax state,
/// and synchronises.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_begin(
    q: &Array<f32>,
    q_s: &mut SharedMemory<f32>,
    acc: &mut SharedMemory<f32>,
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    f_s: &mut SharedMemory<f32>,
    first: usize,
    end: usize,
    h: usize,
    n_q: usize,
    u: usize,
    #[comptime] group: usize,
    #[comptime] bq: usize,
    #[comptime] d: usize,
    #[comptime] units: usize,
) {
    let rd = comptime!(bq * group * d);
    let mut e = u;
    while e < rd {
        let r = e / d;
        let qi = first + r / group;
        let mut x = 0.0f32;
        if qi < end {
            x = q[(qi * n_q + h * group + r % group) * d + e % d];
        }
        q_s[e] = x;
        acc[e] = 0.0;
        e += units;
    }
    if u < comptime!(bq * group) {
        m_s[u] = MASKED;
        l_s[u] = 0.0;
        f_s[u] = 0.0;
    }
    sync_cube();
}

/// Folds keys `kt..min(kt + bk, kend)` of KV head `h` into the tile's rows: the K/V tile staged
/// once in shared memory for all of them, the scores (query `first + qi` at position
/// `start + first + qi` sees keys up to its own), one online-softmax step and the weighted
/// values.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_keys(
    k: &Array<f32>,
    v: &Array<f32>,
    q_s: &SharedMemory<f32>,
    acc: &mut SharedMemory<f32>,
    s_s: &mut SharedMemory<f32>,
    k_s: &mut SharedMemory<f32>,
    v_s: &mut SharedMemory<f32>,
    m_s: &mut SharedMemory<f32>,
    l_s: &mut SharedMemory<f32>,
    f_s: &mut SharedMemory<f32>,
    kt: usize,
    kend: usize,
    first: usize,
    end: usize,
    start: usize,
    h: usize,
    kv_stride: usize,
    scale: f32,
    u: usize,
    #[comptime] group: usize,
    #[comptime] bq: usize,
    #[comptime] d: usize,
    #[comptime] bk: usize,
    #[comptime] units: usize,
) {
    let rd = comptime!(bq * group * d);
    // Zeros past kend, never used: those scores are masked.
    let mut e = u;
    while e < comptime!(bk * d) {
        let kpos = kt + e / d;
        let mut kx = 0.0f32;
        let mut vx = 0.0f32;
        if kpos < kend {
            let src = kpos * kv_stride + h * d + e % d;
            kx = k[src];
            vx = v[src];
        }
        k_s[e] = kx;
        v_s[e] = vx;
        e += units;
    }
    sync_cube();

    let mut e = u;
    while e < comptime!(bq * group * bk) {
        let r = e / bk;
        let j = e % bk;
        let qi = first + r / group;
        let kpos = kt + j;
        let mut s = f32::new(MASKED);
        if qi < end && kpos < kend && kpos <= start + qi {
            let mut dot = 0.0f32;
            for i in 0..d {
                dot += q_s[r * d + i] * k_s[j * d + i];
            }
            s = dot * scale;
        }
        s_s[e] = s;
        e += units;
    }
    sync_cube();

    if u < comptime!(bq * group) {
        online_softmax_step(s_s, m_s, l_s, f_s, u, bk, bk);
    }
    sync_cube();

    let mut e = u;
    while e < rd {
        let r = e / d;
        let i = e % d;
        let mut a = acc[e] * f_s[r];
        for j in 0..bk {
            a += s_s[r * bk + j] * v_s[j * d + i];
        }
        acc[e] = a;
        e += units;
    }
    sync_cube();
}

/// Writes the tile's rows before `end`: outputs normalised, and each row's log-sum-exp.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_finish(
    out: &mut Array<f32>,
    lse: &mut Array<f32>,
    acc: &SharedMemory<f32>,
    m_s: &SharedMemory<f32>,
    l_s: &SharedMemory<f32>,
    first: usize,
    end: usize,
    h: usize,
    n_q: usize,
    u: usize,
    #[comptime] group: usize,
    #[comptime] bq: usize,
    #[comptime] d: usize,
    #[comptime] units: usize,
) {
    let rd = comptime!(bq * group * d);
    let mut e = u;
    while e < rd {
        let r = e / d;
        let qi = first + r / group;
        if qi < end {
            out[(qi * n_q + h * group + r % group) * d + e % d] = acc[e] / l_s[r];
        }
        e += units;
    }
    if u < comptime!(bq * group) {
        let qi = first + u / group;
        if qi < end {
            lse[qi * n_q + h * group + u % group] = m_s[u] + l_s[u].ln();
        }
    }
}

/// Shared memory of [`prefill_kernel`] in bytes.
fn smem_bytes(rows: usize, d: usize, bk: usize) -> usize {
    4 * (2 * rows * d + rows * bk + 3 * rows + 2 * bk * d)
}

/// `(bq, bk)`: query tokens and keys per tile for a group size and head dim within
/// `smem_limit` bytes; the largest key tile first (it sets how often the cube synchronises),
/// then the most query rows (each staged tile serves them all).
fn tiles(group: usize, d: usize, smem_limit: usize) -> Option<(usize, usize)> {
    if group > UNITS {
        return None;
    }
    let bq_max = (MAX_ROWS.max(group) / group).max(1);
    [PREFILL_KEY_TILE, 16, 8, 4]
        .into_iter()
        .find_map(|bk| (1..=bq_max).rev().find(|&bq| smem_bytes(bq * group, d, bk) <= smem_limit).map(|bq| (bq, bk)))
}

/// Checks a chunk of `t` queries from `start` against the store and returns `(group, bq, bk)`:
/// the GQA group and the tiles that fit the device's shared memory.
fn check_chunk<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    n_q_heads: usize,
    t: usize,
    start: usize,
    scale: f32,
) -> Result<(usize, usize, usize)> {
    let (n_kv, d) = (kv.n_kv_heads, kv.head_dim);
    if n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv) {
        return Err(invalid("n_q_heads", format!("{n_q_heads} is not a positive multiple of {n_kv} KV heads")));
    }
    if t == 0 {
        return Err(invalid("t", "must be > 0"));
    }
    if start + t > kv.n_rows {
        return Err(invalid("start", format!("keys 0..{} exceed the {} stored rows", start + t, kv.n_rows)));
    }
    if !scale.is_finite() {
        return Err(invalid("scale", "not finite"));
    }
    let group = n_q_heads / n_kv;
    let limit = client.properties().hardware.max_shared_memory_size;
    let (bq, bk) = tiles(group, d, limit).ok_or_else(|| {
        invalid("n_q_heads", format!("group {group} × head_dim {d} does not fit {limit} B of shared memory"))
    })?;
    Ok((group, bq, bk))
}

/// Launches causal prefill on device buffers (`q`, `out`: `t · n_q_heads · head_dim`;
/// `lse`: `t · n_q_heads`).
#[allow(clippy::too_many_arguments)]
pub fn launch_prefill<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &Handle,
    n_q_heads: usize,
    t: usize,
    start: usize,
    scale: f32,
    out: &Handle,
    lse: &Handle,
) -> Result<()> {
    let (group, bq, bk) = check_chunk(client, kv, n_q_heads, t, start, scale)?;
    let (n_kv, d) = (kv.n_kv_heads, kv.head_dim);
    let tiles = t.div_ceil(bq);
    if tiles > MAX_CUBES_PER_AXIS as usize {
        return Err(invalid("t", format!("{t} tokens in one chunk is more than this grid allows")));
    }
    let n_store = kv.buffer_len();
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        prefill_kernel::launch::<R>(
            client,
            CubeCount::Static(to_u32("t", tiles)?, to_u32("n_kv_heads", n_kv)?, 1),
            CubeDim::new_1d(UNITS as u32),
            ArrayArg::from_raw_parts(q.clone(), t * n_q_heads * d),
            ArrayArg::from_raw_parts(kv.k.clone(), n_store),
            ArrayArg::from_raw_parts(kv.v.clone(), n_store),
            ArrayArg::from_raw_parts(out.clone(), t * n_q_heads * d),
            ArrayArg::from_raw_parts(lse.clone(), t * n_q_heads),
            to_u32("t", t)?,
            to_u32("start", start)?,
            to_u32("n_kv_heads", n_kv)?,
            scale,
            group,
            bq,
            d,
            bk,
            UNITS,
        );
    }
    Ok(())
}

/// The number of query tokens in `q` (rows of `row` floats), checked finite.
fn check_queries(q: &[f32], row: usize) -> Result<usize> {
    if row == 0 || !q.len().is_multiple_of(row) {
        return Err(invalid("q", format!("length {} is not a multiple of n_q_heads · head_dim = {row}", q.len())));
    }
    if q.iter().any(|x| !x.is_finite()) {
        return Err(invalid("q", "not finite"));
    }
    Ok(q.len() / row)
}

/// Uploads the chunk's queries (`[t][n_q_heads][head_dim]`), runs [`launch_prefill`] and reads
/// back outputs `[t][n_q_heads][head_dim]` and LSEs `[t][n_q_heads]`.
pub fn prefill_attention<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &[f32],
    n_q_heads: usize,
    start: usize,
    scale: f32,
) -> Result<Attention> {
    let t = check_queries(q, n_q_heads * kv.head_dim)?;
    let qh = upload_f32(client, q);
    let out = empty_f32(client, q.len());
    let lse = empty_f32(client, t * n_q_heads);
    launch_prefill(client, kv, &qh, n_q_heads, t, start, scale, &out, &lse)?;
    Ok(Attention { out: read_f32(client, out, q.len())?, lse: read_f32(client, lse, t * n_q_heads)? })
}

/// Per KV head, the key blocks each query block of a prefill chunk attends to, on the device:
/// what [`launch_sparse_prefill`] walks. Blocks are absolute (`b` holds positions
/// `b·block..(b + 1)·block`); the chunk's `i`-th query block is `pos0 / block + i`. On the device
/// the lists are CSR over all heads: `offsets` holds `n_qb + 1` entries per KV head, indices into
/// the heads' `blocks` laid end to end.
#[derive(Debug, Clone)]
pub struct DeviceBlockLists {
    offsets: Handle,
    blocks: Handle,
    n_blocks: usize,
    block: usize,
    pos0: usize,
    t: usize,
    n_kv_heads: usize,
}

impl DeviceBlockLists {
    /// Checks and uploads one `(offsets, blocks)` pair per KV head, in the form of needle-core's
    /// `BlockMask::offsets` / `BlockMask::blocks`, for a chunk of `t` queries from position
    /// `pos0`: query block `pos0 / block + i` reads `blocks[offsets[i]..offsets[i + 1]]`, ascending,
    /// ending with the query block itself (every query sees its own key).
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        block: usize,
        pos0: usize,
        t: usize,
        heads: &[(&[usize], &[u32])],
    ) -> Result<Self> {
        if block == 0 || t == 0 {
            return Err(invalid("block", format!("block {block} and t {t} must both be at least 1")));
        }
        if heads.is_empty() {
            return Err(invalid("heads", "no KV head"));
        }
        let first = pos0 / block;
        let n_qb = (pos0 + t - 1) / block + 1 - first;
        let (mut offsets, mut blocks) = (Vec::with_capacity(heads.len() * (n_qb + 1)), Vec::new());
        for (h, &(offs, list)) in heads.iter().enumerate() {
            if offs.len() != n_qb + 1 || offs[0] != 0 || offs[n_qb] != list.len() {
                return Err(invalid(
                    "offsets",
                    format!(
                        "KV head {h}: {} offsets ending at {:?} for {n_qb} query blocks and {} key blocks",
                        offs.len(),
                        offs.last(),
                        list.len()
                    ),
                ));
            }
            let base = blocks.len();
            for (i, w) in offs.windows(2).enumerate() {
                let qb = first + i;
                let keys = list.get(w[0]..w[1]).ok_or_else(|| {
                    invalid(
                        "offsets",
                        format!("KV head {h}: query block {qb}'s offsets {}..{} are out of order", w[0], w[1]),
                    )
                })?;
                if keys.windows(2).any(|p| p[0] >= p[1]) || keys.last().is_none_or(|&kb| kb as usize != qb) {
                    return Err(invalid(
                        "blocks",
                        format!("KV head {h}: query block {qb}'s key blocks {keys:?} are not ascending up to {qb}"),
                    ));
                }
                offsets.push(to_u32("offsets", base + w[0])?);
            }
            offsets.push(to_u32("offsets", base + list.len())?);
            blocks.extend_from_slice(list);
        }
        Ok(Self {
            offsets: upload_u32(client, &offsets),
            blocks: upload_u32(client, &blocks),
            n_blocks: blocks.len(),
            block,
            pos0,
            t,
            n_kv_heads: heads.len(),
        })
    }

    /// Query blocks of the chunk.
    fn n_qb(&self) -> usize {
        (self.pos0 + self.t - 1) / self.block + 1 - self.pos0 / self.block
    }
}

/// Launches block-sparse causal prefill on device buffers (as [`launch_prefill`]): query `i` of
/// the chunk (position `start + i`) attends to the keys up to its own in the key blocks `lists`
/// names for its query block and KV head; the others are skipped, never read.
#[allow(clippy::too_many_arguments)]
pub fn launch_sparse_prefill<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &Handle,
    n_q_heads: usize,
    t: usize,
    start: usize,
    scale: f32,
    lists: &DeviceBlockLists,
    out: &Handle,
    lse: &Handle,
) -> Result<()> {
    let (group, bq, bk) = check_chunk(client, kv, n_q_heads, t, start, scale)?;
    if (lists.pos0, lists.t, lists.n_kv_heads) != (start, t, kv.n_kv_heads) {
        return Err(invalid(
            "lists",
            format!(
                "made for {} queries from {} over {} KV heads; the chunk has {t} from {start} over {}",
                lists.t, lists.pos0, lists.n_kv_heads, kv.n_kv_heads
            ),
        ));
    }
    let (n_qb, per_block) = (lists.n_qb(), lists.block.div_ceil(bq));
    let cubes = n_qb * per_block;
    if cubes > MAX_CUBES_PER_AXIS as usize {
        return Err(invalid("t", format!("{t} tokens in blocks of {} is more than this grid allows", lists.block)));
    }
    let n_store = kv.buffer_len();
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        sparse_prefill_kernel::launch::<R>(
            client,
            CubeCount::Static(to_u32("t", cubes)?, to_u32("n_kv_heads", kv.n_kv_heads)?, 1),
            CubeDim::new_1d(UNITS as u32),
            ArrayArg::from_raw_parts(q.clone(), t * n_q_heads * kv.head_dim),
            ArrayArg::from_raw_parts(kv.k.clone(), n_store),
            ArrayArg::from_raw_parts(kv.v.clone(), n_store),
            ArrayArg::from_raw_parts(out.clone(), t * n_q_heads * kv.head_dim),
            ArrayArg::from_raw_parts(lse.clone(), t * n_q_heads),
            ArrayArg::from_raw_parts(lists.offsets.clone(), buf_len(lists.n_kv_heads * (n_qb + 1))),
            ArrayArg::from_raw_parts(lists.blocks.clone(), buf_len(lists.n_blocks)),
            to_u32("t", t)?,
            to_u32("start", start)?,
            to_u32("n_kv_heads", kv.n_kv_heads)?,
            scale,
            to_u32("block", lists.block)?,
            to_u32("t", n_qb)?,
            to_u32("block", per_block)?,
            group,
            bq,
            kv.head_dim,
            bk,
            UNITS,
        );
    }
    Ok(())
}

/// Uploads the chunk's queries and the block lists (as [`DeviceBlockLists::upload`]), runs
/// [`launch_sparse_prefill`] and reads back outputs and LSEs, as [`prefill_attention`].
#[allow(clippy::too_many_arguments)]
pub fn sparse_prefill_attention<R: Runtime>(
    client: &ComputeClient<R>,
    kv: &DeviceKv,
    q: &[f32],
    n_q_heads: usize,
    start: usize,
    scale: f32,
    block: usize,
    heads: &[(&[usize], &[u32])],
) -> Result<Attention> {
    let t = check_queries(q, n_q_heads * kv.head_dim)?;
    let lists = DeviceBlockLists::upload(client, block, start, t, heads)?;
    let qh = upload_f32(client, q);
    let out = empty_f32(client, q.len());
    let lse = empty_f32(client, t * n_q_heads);
    launch_sparse_prefill(client, kv, &qh, n_q_heads, t, start, scale, &lists, &out, &lse)?;
    Ok(Attention { out: read_f32(client, out, q.len())?, lse: read_f32(client, lse, t * n_q_heads)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_shared_memory_and_prefer_big_key_tiles() {
        // WebGPU's minimum (16 KB), lavapipe (32 KB), a CUDA block (48 KB).
        for limit in [16_384, 32_768, 49_152] {
            for d in [64, 80, 96, 128] {
                for group in [1, 3, 4, 8] {
                    let (bq, bk) = tiles(group, d, limit).unwrap();
                    assert!(smem_bytes(bq * group, d, bk) <= limit, "limit {limit} d {d} group {group}");
                    assert!(bq * group <= UNITS);
                    // Nothing larger along bq fits at this bk.
                    if bq * group < MAX_ROWS.max(group) && (bq + 1) * group <= MAX_ROWS.max(group) {
                        assert!(smem_bytes((bq + 1) * group, d, bk) > limit, "limit {limit} d {d} group {group}");
                    }
                }
            }
        }
        assert_eq!(tiles(4, 64, 32_768), Some((4, 32)));
        assert_eq!(tiles(4, 128, 32_768), Some((3, 16)));
        assert_eq!(tiles(4, 128, 16_384), Some((1, 8)));
        assert_eq!(tiles(65, 64, 1 << 20), None);
        assert_eq!(tiles(1, 4096, 16_384), None);
    }
}
