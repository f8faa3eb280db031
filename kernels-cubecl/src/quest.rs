//! Quest page scoring and a deterministic top-k.
//!
//! Page scoring: a page of keys is summarised per KV head by its element-wise minimum and
//! maximum key; `Σ_i max(q_i·min_i, q_i·max_i)` bounds `q·k` from above for every key of the
//! page. With GQA the score of a page for KV head `h` is the maximum of that bound over the
//! query heads of `h`'s group (selection is per KV head). Layouts: `page_min`, `page_max`
//! `[n_pages][n_kv_heads][head_dim]` (appended page by page, like the KV store), `q`
//! `[n_q_heads][head_dim]`, scores `[n_kv_heads][n_pages]`.
//!
//! Top-k: per row of a `[n_rows][n]` score matrix, the ids of the `k` largest scores, best
//! first, ties to the smaller id: exactly the order of a stable sort by descending score
//! (needle-core's `top_k`). Each element's rank is counted directly (`O(n²)` compares per row,
//! fine for page counts in the thousands; a radix select would be the step for whole-key top-k
//! over very long rows). Scores must not be NaN.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{Result, check_len, invalid, to_u32};
use crate::util::{MAX_CUBES_PER_AXIS, cube_linear, empty_f32, grid_1d, read_f32, read_u32, upload_f32};

/// Units per cube of both kernels.
const UNITS: u32 = 64;

/// One unit per (KV head, page).
#[cube(launch)]
pub fn quest_scores_kernel(
    q: &Array<f32>,
    page_min: &Array<f32>,
    page_max: &Array<f32>,
    scores: &mut Array<f32>,
    n_pages: u32,
    n_kv: u32,
    #[comptime] group: usize,
    #[comptime] d: usize,
) {
    let pos = cube_linear() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let np = n_pages as usize;
    let nkv = n_kv as usize;
    if pos >= np * nkv {
        terminate!();
    }
    let h = pos / np;
    let p = pos % np;
    let b = (p * nkv + h) * d;
    let mut best = f32::new(-3.0e38);
    for g in 0..group {
        let qb = (h * group + g) * d;
        let mut s = 0.0f32;
        for i in 0..d {
            let qi = q[qb + i];
            let lo = qi * page_min[b + i];
            let hi = qi * page_max[b + i];
            if lo > hi {
                s += lo;
            } else {
                s += hi;
            }
        }
        if s > best {
            best = s;
        }
    }
    scores[pos] = best;
}

/// One cube per row; unit `u` ranks elements `u, u + UNITS, …` against the whole row.
#[cube(launch)]
pub fn top_k_kernel(scores: &Array<f32>, ids: &mut Array<u32>, n_rows: u32, n: u32, k: u32) {
    let row = cube_linear();
    if row >= n_rows as usize {
        terminate!();
    }
    let nn = n as usize;
    let base = row * nn;
    let mut i = UNIT_POS_X as usize;
    while i < nn {
        let si = scores[base + i];
        let mut rank = 0u32;
        for j in 0..nn {
            let sj = scores[base + j];
            if sj > si || (sj == si && j < i) {
                rank += 1;
            }
        }
        if rank < k {
            ids[row * k as usize + rank as usize] = i as u32;
        }
        i += CUBE_DIM_X as usize;
    }
}

/// Launches page scoring on device buffers; see the module doc for layouts.
#[allow(clippy::too_many_arguments)]
pub fn launch_quest_scores<R: Runtime>(
    client: &ComputeClient<R>,
    q: &Handle,
    n_q_heads: usize,
    page_min: &Handle,
    page_max: &Handle,
    n_pages: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &Handle,
) -> Result<()> {
    if n_kv_heads == 0 || head_dim == 0 || n_pages == 0 {
        return Err(invalid("n_pages", "n_pages, n_kv_heads and head_dim must be > 0"));
    }
    if !n_q_heads.is_multiple_of(n_kv_heads) || n_q_heads == 0 {
        return Err(invalid("n_q_heads", format!("{n_q_heads} is not a positive multiple of {n_kv_heads}")));
    }
    let group = n_q_heads / n_kv_heads;
    let n_bounds = n_pages * n_kv_heads * head_dim;
    to_u32("n_pages · n_kv_heads · head_dim", n_bounds)?;
    let n_out = n_pages * n_kv_heads;
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        quest_scores_kernel::launch::<R>(
            client,
            grid_1d("n_pages · n_kv_heads", n_out.div_ceil(UNITS as usize))?,
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(q.clone(), n_q_heads * head_dim),
            ArrayArg::from_raw_parts(page_min.clone(), n_bounds),
            ArrayArg::from_raw_parts(page_max.clone(), n_bounds),
            ArrayArg::from_raw_parts(scores.clone(), n_out),
            to_u32("n_pages", n_pages)?,
            to_u32("n_kv_heads", n_kv_heads)?,
            group,
            head_dim,
        );
    }
    Ok(())
}

/// Uploads queries and page bounds, scores the pages, reads back `[n_kv_heads][n_pages]`.
#[allow(clippy::too_many_arguments)]
pub fn quest_scores<R: Runtime>(
    client: &ComputeClient<R>,
    q: &[f32],
    n_q_heads: usize,
    page_min: &[f32],
    page_max: &[f32],
    n_pages: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>> {
    check_len("q", q.len(), n_q_heads * head_dim)?;
    check_len("page_min", page_min.len(), n_pages * n_kv_heads * head_dim)?;
    check_len("page_max", page_max.len(), n_pages * n_kv_heads * head_dim)?;
    let (qh, mn, mx) = (upload_f32(client, q), upload_f32(client, page_min), upload_f32(client, page_max));
    let out = empty_f32(client, n_pages * n_kv_heads);
    launch_quest_scores(client, &qh, n_q_heads, &mn, &mx, n_pages, n_kv_heads, head_dim, &out)?;
    read_f32(client, out, n_pages * n_kv_heads)
}

/// Launches top-k on device buffers: `scores` `[n_rows][n]` f32 → `ids` `[n_rows][k]` u32.
pub fn launch_top_k<R: Runtime>(
    client: &ComputeClient<R>,
    scores: &Handle,
    n_rows: usize,
    n: usize,
    k: usize,
    ids: &Handle,
) -> Result<()> {
    if k == 0 || k > n {
        return Err(invalid("k", format!("{k} must be in 1..={n}")));
    }
    if n_rows == 0 || n_rows > (MAX_CUBES_PER_AXIS as usize).pow(2) {
        return Err(invalid("n_rows", format!("{n_rows} rows")));
    }
    let total = n_rows.checked_mul(n).ok_or_else(|| invalid("n", "overflows"))?;
    to_u32("n_rows · n", total)?;
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        top_k_kernel::launch::<R>(
            client,
            grid_1d("n_rows", n_rows)?,
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(scores.clone(), total),
            ArrayArg::from_raw_parts(ids.clone(), n_rows * k),
            to_u32("n_rows", n_rows)?,
            to_u32("n", n)?,
            to_u32("k", k)?,
        );
    }
    Ok(())
}

/// Uploads `scores` (`[n_rows][n]`), runs [`launch_top_k`], reads back `[n_rows][min(k, n)]`
/// ids. `k == 0` or `n == 0` gives empty rows without touching the device.
pub fn top_k<R: Runtime>(
    client: &ComputeClient<R>,
    scores: &[f32],
    n_rows: usize,
    n: usize,
    k: usize,
) -> Result<Vec<u32>> {
    check_len("scores", scores.len(), n_rows * n)?;
    if scores.iter().any(|s| s.is_nan()) {
        return Err(invalid("scores", "NaN"));
    }
    let k = k.min(n);
    if k == 0 || n_rows == 0 {
        return Ok(Vec::new());
    }
    let sh = upload_f32(client, scores);
    let ids = client.empty(n_rows * k * size_of::<u32>());
    launch_top_k(client, &sh, n_rows, n, k, &ids)?;
    read_u32(client, ids, n_rows * k)
}
