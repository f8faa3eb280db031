//! Causal prefill attention, GQA-aware, tiled flash attention (f32).
//!
//! A chunk of `t` query tokens at positions `start..start + t` attends to keys
//! `0..start + t` of a [`DeviceKv`] store (`[n_rows][n_kv_heads][head_dim]`, `n_rows ≥ start + t`);
//! query `i` sees keys `0..=start + i`. Layouts: `q` and `out` `[t][n_q_heads][head_dim]`,
//! `lse` `[t][n_q_heads]`.
//!
//! Cube `(tile, h)` holds `bq` query tokens × the `group` query heads of KV head `h` (so each
//! key row is read once for all of them) and walks the keys in tiles of [`PREFILL_KEY_TILE`]
//! with an online softmax, as in flash attention; keys past the last query of the tile are
//! never visited. No plane operations.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::decode::{Attention, DeviceKv};
use crate::error::{Result, invalid, to_u32};
use crate::util::{MAX_CUBES_PER_AXIS, empty_f32, read_f32, upload_f32};

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
    let qt = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let rows = comptime!(bq * group);
    let rd = comptime!(bq * group * d);
    let n_q = n_kv as usize * group;
    let kv_stride = n_kv as usize * d;
    let tq = t as usize;
    let first = qt * bq;

    let mut q_s = SharedMemory::<f32>::new(rd);
    let mut acc = SharedMemory::<f32>::new(rd);
    let mut s_s = SharedMemory::<f32>::new(comptime!(bq * group * bk));
    let mut m_s = SharedMemory::<f32>::new(rows);
    let mut l_s = SharedMemory::<f32>::new(rows);
    let mut f_s = SharedMemory::<f32>::new(rows);

    // Row r = qi · group + g: query token first + qi, query head h · group + g.
    let mut e = u;
    while e < rd {
        let r = e / d;
        let i = e % d;
        let qi = first + r / group;
        let mut x = 0.0f32;
        if qi < tq {
            x = q[(qi * n_q + h * group + r % group) * d + i];
        }
        q_s[e] = x;
        acc[e] = 0.0;
        e += units;
    }
    if u < rows {
        m_s[u] = MASKED;
        l_s[u] = 0.0;
        f_s[u] = 0.0;
    }
    sync_cube();

    // Keys up to the last query of the tile (position start + min(first + bq, t) − 1).
    let mut last_q = first + bq;
    if last_q > tq {
        last_q = tq;
    }
    let kmax = start as usize + last_q;
    let mut kt = 0usize;
    while kt < kmax {
        let mut e = u;
        while e < comptime!(bq * group * bk) {
            let r = e / bk;
            let j = e % bk;
            let qi = first + r / group;
            let kpos = kt + j;
            let mut s = f32::new(MASKED);
            if qi < tq && kpos <= start as usize + qi {
                let kb = kpos * kv_stride + h * d;
                let mut dot = 0.0f32;
                for i in 0..d {
                    dot += q_s[r * d + i] * k[kb + i];
                }
                s = dot * scale;
            }
            s_s[e] = s;
            e += units;
        }
        sync_cube();

        if u < rows {
            let m_old = m_s[u];
            let mut mx = m_old;
            for j in 0..bk {
                let s = s_s[u * bk + j];
                if s > mx {
                    mx = s;
                }
            }
            let l_old = l_s[u];
            let mut f = 0.0f32;
            if l_old > 0.0 {
                f = (m_old - mx).exp();
            }
            let mut sum = 0.0f32;
            for j in 0..bk {
                let s = s_s[u * bk + j];
                let mut p = 0.0f32;
                if s > -1.0e38 {
                    p = (s - mx).exp();
                }
                s_s[u * bk + j] = p;
                sum += p;
            }
            m_s[u] = mx;
            l_s[u] = l_old * f + sum;
            f_s[u] = f;
        }
        sync_cube();

        let mut e = u;
        while e < rd {
            let r = e / d;
            let i = e % d;
            let mut a = acc[e] * f_s[r];
            for j in 0..bk {
                let p = s_s[r * bk + j];
                let kpos = kt + j;
                if p > 0.0 && kpos < kmax {
                    a += p * v[kpos * kv_stride + h * d + i];
                }
            }
            acc[e] = a;
            e += units;
        }
        sync_cube();
        kt += bk;
    }

    let mut e = u;
    while e < rd {
        let r = e / d;
        let qi = first + r / group;
        if qi < tq {
            let l = l_s[r];
            out[(qi * n_q + h * group + r % group) * d + e % d] = acc[e] / l;
        }
        e += units;
    }
    if u < rows {
        let qi = first + u / group;
        if qi < tq {
            lse[qi * n_q + h * group + u % group] = m_s[u] + l_s[u].ln();
        }
    }
}

/// Query tokens per cube for a group size and head dim, within `smem_limit` bytes.
fn tile_queries(group: usize, d: usize, smem_limit: usize) -> Option<usize> {
    let rows_max = MAX_ROWS.max(group);
    (1..=rows_max / group)
        .rev()
        .find(|&bq| 4 * (2 * bq * group * d + bq * group * PREFILL_KEY_TILE + 3 * bq * group) <= smem_limit)
        .filter(|&bq| bq * group <= UNITS)
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
    let bq = tile_queries(group, d, limit).ok_or_else(|| {
        invalid("n_q_heads", format!("group {group} × head_dim {d} does not fit {limit} B of shared memory"))
    })?;
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
            PREFILL_KEY_TILE,
            UNITS,
        );
    }
    Ok(())
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
    let row = n_q_heads * kv.head_dim;
    if row == 0 || !q.len().is_multiple_of(row) {
        return Err(invalid("q", format!("length {} is not a multiple of n_q_heads · head_dim = {row}", q.len())));
    }
    if q.iter().any(|x| !x.is_finite()) {
        return Err(invalid("q", "not finite"));
    }
    let t = q.len() / row;
    let qh = upload_f32(client, q);
    let out = empty_f32(client, q.len());
    let lse = empty_f32(client, t * n_q_heads);
    launch_prefill(client, kv, &qh, n_q_heads, t, start, scale, &out, &lse)?;
    Ok(Attention { out: read_f32(client, out, q.len())?, lse: read_f32(client, lse, t * n_q_heads)? })
}
