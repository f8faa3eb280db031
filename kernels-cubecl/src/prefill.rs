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

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::decode::{Attention, DeviceKv};
use crate::error::{Result, invalid, to_u32};
use crate::util::{MAX_CUBES_PER_AXIS, empty_f32, online_softmax_step, read_f32, upload_f32};

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
    let mut k_s = SharedMemory::<f32>::new(comptime!(bk * d));
    let mut v_s = SharedMemory::<f32>::new(comptime!(bk * d));
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
        // Stage the key and value tile (zeros past kmax, never used: those scores are masked).
        let mut e = u;
        while e < comptime!(bk * d) {
            let kpos = kt + e / d;
            let mut kx = 0.0f32;
            let mut vx = 0.0f32;
            if kpos < kmax {
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
            if qi < tq && kpos <= start as usize + qi {
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

        if u < rows {
            online_softmax_step(&mut s_s, &mut m_s, &mut l_s, &mut f_s, u, bk, bk);
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
    let (bq, bk) = tiles(group, d, limit).ok_or_else(|| {
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
            bk,
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
