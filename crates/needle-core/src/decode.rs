//! The CPU fast path of a decode step for one KV head: all of its query group's heads attend to
//! the static part plus a selection in one pass over the keys (each key row is read once for
//! the whole group), in `f32` with a stable two-pass softmax, by needle-kernels-cpu's
//! [`attend_rows`](needle_kernels_cpu::attend_rows) (SIMD picked at run time). [`attend_selected`] is its
//! reference; `tests/decode.rs` compares the two on fresh random input.
//!
//! [`attend_selected`]: crate::attend_selected

use crate::error::{Error, Result, check_finite, check_len};
use crate::kv::{KvDtype, Row, RowSource};
use crate::selector::{Selection, StaticPart};

/// Reusable buffers of [`attend_group`] so the decode hot path does not allocate.
#[derive(Debug, Default, Clone)]
pub struct GroupScratch {
    ids: Vec<u32>,
    bias: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
    /// `q8` rows of the group dequantized: keys, then values.
    wide: Vec<f32>,
}

/// Inner product of two slices (the shorter length wins): the one `dot` of needle, used by the
/// decode path, the selectors and the index crates.
///
/// Eight independent accumulators break the add dependency chain, so the loop runs at SIMD
/// width without `-ffast-math`-style reassociation (and vectorises fully at `dim = 64`); they
/// are summed pairwise. Its rounding differs from a sequential sum in the last bits.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Attention of `g` query heads (`queries`, row-major `g × dim`) sharing one KV head over the
/// static part and `selection`; returns the outputs (`g × dim`, held in `scratch`). Equal to
/// merging dense attention over the static part with (weighted) sparse attention over the selection.
pub fn attend_group<'s>(
    queries: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    static_part: StaticPart,
    selection: &Selection,
    scale: f32,
    scratch: &'s mut GroupScratch,
) -> Result<&'s [f32]> {
    let d = keys.dim();
    if d == 0 || !queries.len().is_multiple_of(d) {
        return Err(Error::DimensionMismatch {
            what: "group queries (rows of dim)".into(),
            expected: d,
            got: queries.len(),
        });
    }
    check_len("values (rows)", keys.len(), values.len())?;
    check_finite("group queries", queries)?;
    let g = queries.len() / d;
    let n = keys.len();
    let dynamic = static_part.dynamic_range(n);
    let weighted = !selection.log_weights.is_empty();
    if weighted {
        check_len("selection log_weights", selection.ids.len(), selection.log_weights.len())?;
    }
    scratch.ids.clear();
    scratch.bias.clear();
    scratch.ids.extend(static_part.static_ids(n));
    scratch.bias.resize(scratch.ids.len(), 0.0);
    for (i, &id) in selection.ids.iter().enumerate() {
        if !dynamic.contains(&id) {
            return Err(Error::OutOfRange {
                what: format!("selection (dynamic part {dynamic:?})"),
                id: id.into(),
                len: n,
            });
        }
        scratch.ids.push(id);
        scratch.bias.push(if weighted { selection.log_weights[i] } else { 0.0 });
    }
    let out = &mut scratch.out;
    out.resize(g * d, 0.0); // sized only: attend_rows zeroes it
    let bias = weighted.then_some(scratch.bias.as_slice());
    let ids = &scratch.ids;
    let done = match (keys.dtype(), values.dtype()) {
        (KvDtype::F32, KvDtype::F32) => {
            let (k, v) = (gather(ids, keys, as_f32), gather(ids, values, as_f32));
            needle_kernels_cpu::attend_rows(queries, &k, &v, bias, scale, &mut scratch.scores, out)
        }
        (KvDtype::F16, KvDtype::F16) => {
            let (k, v) = (gather(ids, keys, as_f16), gather(ids, values, as_f16));
            needle_kernels_cpu::attend_rows(queries, &k, &v, bias, scale, &mut scratch.scores, out)
        }
        (KvDtype::Q8, KvDtype::Q8) => {
            // The kernels read f32 or f16: the few rows a step attends are widened first.
            let wide = &mut scratch.wide;
            wide.clear();
            for rows in [keys, values] {
                ids.iter().for_each(|&id| rows.row(id as usize).extend_into(wide));
            }
            let (k, v) = wide.split_at(ids.len() * d);
            let (k, v): (Vec<&[f32]>, Vec<&[f32]>) = (k.chunks_exact(d).collect(), v.chunks_exact(d).collect());
            needle_kernels_cpu::attend_rows(queries, &k, &v, bias, scale, &mut scratch.scores, out)
        }
        (k, v) => return Err(Error::invalid("keys/values", format!("keys stored as {k}, values as {v}"))),
    };
    done.map_err(|e| Error::InvalidParameter { name: "keys/values".into(), reason: format!("decode attention: {e}") })?;
    Ok(out)
}

/// The rows `ids` of `rows` as slices of one stored precision.
fn gather<'r, T>(ids: &[u32], rows: &'r dyn RowSource, typed: fn(Row<'r>) -> &'r [T]) -> Vec<&'r [T]> {
    ids.iter().map(|&id| typed(rows.row(id as usize))).collect()
}

// A `RowSource` stores every row at its `dtype()`, so the other arm is unreachable; an empty
// slice would still fail the kernel's length check rather than read wrong data.
fn as_f32(r: Row<'_>) -> &[f32] {
    if let Row::F32(s) = r { s } else { &[] }
}

fn as_f16(r: Row<'_>) -> &[half::f16] {
    if let Row::F16(s) = r { s } else { &[] }
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn dot_matches_f64_for_all_tail_lengths_and_takes_the_shorter_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            assert!((f64::from(dot(&a, &b)) - exact).abs() < 1e-5, "n={n}");
            if n > 3 {
                assert_eq!(dot(&a, &b[..3]), dot(&a[..3], &b[..3]), "n={n}");
            }
        }
    }
}
