//! Exact log-sum-exp merge of two attention partials over disjoint key sets.
//!
//! `lse = max(a, b) + ln(e^(a − max) + e^(b − max))`,
//! `out = e^(a − lse) · out_a + e^(b − lse) · out_b`, per head; a partial with `lse = -inf`
//! (empty key set) contributes nothing, and two empty partials give a zero output and `-inf`.
//! Layouts: `o` `[heads][head_dim]`, `lse` `[heads]`, f32. The kernel never computes with an
//! infinity: empty partials are detected by comparison and skipped.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::decode::Attention;
use crate::error::{Result, check_len, invalid, to_u32};
use crate::util::{cube_linear, empty_f32, grid_1d, read_f32, upload_f32};

/// Units per cube of the merge kernel.
const MERGE_UNITS: u32 = 64;

/// Below this a log-sum-exp means "no key" (`-inf`, or a finite stand-in for it).
const EMPTY_LSE: f32 = -1.0e30;

/// One unit per output element (`heads · head_dim` of them).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn lse_merge_kernel(
    o1: &Array<f32>,
    lse1: &Array<f32>,
    o2: &Array<f32>,
    lse2: &Array<f32>,
    out: &mut Array<f32>,
    lse_out: &mut Array<f32>,
    n: u32,
    d: u32,
    neg_inf: f32,
) {
    let pos = cube_linear() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if pos >= n as usize {
        terminate!();
    }
    let head = pos / d as usize;
    // (`is_multiple_of` has no CubeCL expansion.)
    let col = pos % d as usize;
    let first = col == 0;
    let a = lse1[head];
    let b = lse2[head];
    let a_ok = a > EMPTY_LSE;
    let b_ok = b > EMPTY_LSE;
    if a_ok && b_ok {
        let mut m = a;
        if b > m {
            m = b;
        }
        let wa = (a - m).exp();
        let wb = (b - m).exp();
        let s = wa + wb;
        out[pos] = (wa * o1[pos] + wb * o2[pos]) / s;
        if first {
            lse_out[head] = m + s.ln();
        }
    } else if a_ok {
        out[pos] = o1[pos];
        if first {
            lse_out[head] = a;
        }
    } else if b_ok {
        out[pos] = o2[pos];
        if first {
            lse_out[head] = b;
        }
    } else {
        out[pos] = 0.0;
        if first {
            lse_out[head] = neg_inf;
        }
    }
}

/// Launches the merge on device buffers (`o*`, `out`: `heads · head_dim`; `lse*`: `heads`).
/// `out`/`lse_out` may not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub fn launch_lse_merge<R: Runtime>(
    client: &ComputeClient<R>,
    heads: usize,
    head_dim: usize,
    o1: &Handle,
    lse1: &Handle,
    o2: &Handle,
    lse2: &Handle,
    out: &Handle,
    lse_out: &Handle,
) -> Result<()> {
    if heads == 0 || head_dim == 0 {
        return Err(invalid("heads", "heads and head_dim must be > 0"));
    }
    let n = heads * head_dim;
    let n32 = to_u32("heads · head_dim", n)?;
    // SAFETY: every length is the element count the handle was made with.
    unsafe {
        lse_merge_kernel::launch::<R>(
            client,
            grid_1d("heads · head_dim", n.div_ceil(MERGE_UNITS as usize))?,
            CubeDim::new_1d(MERGE_UNITS),
            ArrayArg::from_raw_parts(o1.clone(), n),
            ArrayArg::from_raw_parts(lse1.clone(), heads),
            ArrayArg::from_raw_parts(o2.clone(), n),
            ArrayArg::from_raw_parts(lse2.clone(), heads),
            ArrayArg::from_raw_parts(out.clone(), n),
            ArrayArg::from_raw_parts(lse_out.clone(), heads),
            n32,
            to_u32("head_dim", head_dim)?,
            f32::NEG_INFINITY,
        );
    }
    Ok(())
}

/// Uploads two partials, merges them on the device and reads the result back.
pub fn lse_merge<R: Runtime>(
    client: &ComputeClient<R>,
    head_dim: usize,
    a: &Attention,
    b: &Attention,
) -> Result<Attention> {
    let heads = a.lse.len();
    check_len("a.out", a.out.len(), heads * head_dim)?;
    check_len("b.lse", b.lse.len(), heads)?;
    check_len("b.out", b.out.len(), heads * head_dim)?;
    for (param, l) in [("a.lse", &a.lse), ("b.lse", &b.lse)] {
        if l.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(invalid(param, "NaN or +inf"));
        }
    }
    let (o1, l1, o2, l2) = (
        upload_f32(client, &a.out),
        upload_f32(client, &a.lse),
        upload_f32(client, &b.out),
        upload_f32(client, &b.lse),
    );
    let out = empty_f32(client, heads * head_dim);
    let lse = empty_f32(client, heads);
    launch_lse_merge(client, heads, head_dim, &o1, &l1, &o2, &l2, &out, &lse)?;
    Ok(Attention { out: read_f32(client, out, heads * head_dim)?, lse: read_f32(client, lse, heads)? })
}
