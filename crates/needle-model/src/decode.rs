//! The CPU fast path of a decode step for one KV head: all of its query group's heads attend to
//! the static part plus a selection in one pass over the keys (each key row is read once for
//! the whole group), in `f32` with a stable two-pass softmax, by needle-kernels-cpu's
//! [`attend_rows`](needle_kernels_cpu::attend_rows) (SIMD picked at run time).
//! [`attend_selected`](needle_core::attend_selected), in needle-core, is its reference;
//! `tests/decode.rs` compares the two on fresh random input.
//!
//! Also the kernels' view of a core type that needle-core, which depends on no kernel crate,
//! cannot build itself: a prefill [`BlockMask`] as the block-sparse kernel's `BlockLayout`.

use needle_core::prefill::BlockMask;
use needle_core::{Error, KvDtype, Result, Row, RowSource, Selection, StaticPart, check_finite, check_len};
use needle_kernels_cpu::BlockLayout;

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
    attend(queries, keys, values, static_part, Part::All, selection, scale, scratch)
}

/// [`attend_group`] over the selection alone (its ids checked against `static_part`'s dynamic
/// range), also writing each query head's log-sum-exp into `lse` (`g` entries; `-inf`, and a zero
/// output, where nothing was picked): the host half of a split decode step, merged exactly with
/// the static part's, attended elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn attend_selection<'s>(
    queries: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    static_part: StaticPart,
    selection: &Selection,
    scale: f32,
    scratch: &'s mut GroupScratch,
    lse: &mut [f32],
) -> Result<&'s [f32]> {
    attend(queries, keys, values, static_part, Part::Selection(lse), selection, scale, scratch)
}

/// What [`attend`] attends to.
enum Part<'l> {
    /// The static part and the selection.
    All,
    /// The selection alone, with each query head's log-sum-exp.
    Selection(&'l mut [f32]),
}

#[allow(clippy::too_many_arguments)]
fn attend<'s>(
    queries: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    static_part: StaticPart,
    part: Part<'_>,
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
    if matches!(part, Part::All) {
        scratch.ids.extend(static_part.static_ids(n));
        scratch.bias.resize(scratch.ids.len(), 0.0);
    }
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
    let (ids, scores) = (&scratch.ids, &mut scratch.scores);
    let lse = match part {
        Part::All => None,
        Part::Selection(lse) => Some(lse),
    };
    let done = match (keys.dtype(), values.dtype()) {
        (KvDtype::F32, KvDtype::F32) => {
            let (k, v) = (gather(ids, keys, as_f32), gather(ids, values, as_f32));
            rows(queries, &k, &v, bias, scale, scores, out, lse)
        }
        (KvDtype::F16, KvDtype::F16) => {
            let (k, v) = (gather(ids, keys, as_f16), gather(ids, values, as_f16));
            rows(queries, &k, &v, bias, scale, scores, out, lse)
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
            rows(queries, &k, &v, bias, scale, scores, out, lse)
        }
        (k, v) => return Err(Error::invalid("keys/values", format!("keys stored as {k}, values as {v}"))),
    };
    done.map_err(|e| Error::InvalidParameter { name: "keys/values".into(), reason: format!("decode attention: {e}") })?;
    Ok(out)
}

/// The kernel over gathered rows, with each query head's log-sum-exp when `lse` is given.
#[allow(clippy::too_many_arguments)]
fn rows<T: needle_kernels_cpu::attn::KvElem>(
    queries: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> needle_kernels_cpu::Result<()> {
    match lse {
        None => needle_kernels_cpu::attend_rows(queries, keys, values, bias, scale, scores, out),
        Some(lse) => needle_kernels_cpu::attend_rows_lse(queries, keys, values, bias, scale, scores, out, lse),
    }
}

/// The rows `ids` of `rows` as slices of one stored precision.
fn gather<'r, T>(ids: &[u32], rows: &'r dyn RowSource, typed: fn(Row<'r>) -> &'r [T]) -> Vec<&'r [T]> {
    let mut all = Vec::with_capacity(ids.len());
    rows.rows_into(ids, &mut all);
    all.into_iter().map(typed).collect()
}

// A `RowSource` stores every row at its `dtype()`, so the other arm is unreachable; an empty
// slice would still fail the kernel's length check rather than read wrong data.
fn as_f32(r: Row<'_>) -> &[f32] {
    if let Row::F32(s) = r { s } else { &[] }
}

fn as_f16(r: Row<'_>) -> &[half::f16] {
    if let Row::F16(s) = r { s } else { &[] }
}

/// `mask` as the block-sparse prefill kernel reads it (valid once
/// [`plan_chunk`](needle_core::prefill::plan_chunk) has finished it).
pub(crate) fn block_layout(mask: &BlockMask) -> BlockLayout<'_> {
    BlockLayout {
        block: mask.block(),
        first: mask.query_blocks().start,
        offsets: mask.offsets(),
        blocks: mask.blocks(),
    }
}
