//! The CPU fast path of a decode step for one KV head: all of its query group's heads attend to
//! the static part plus a selection in one pass over the keys (each key row is read once for
//! the whole group), in `f32` with a stable two-pass softmax, by needle-kernels-cpu's
//! [`attend_rows`](needle_kernels_cpu::attend_rows) (SIMD picked at run time).
//! [`attend_selected`](needle_core::attend_selected), in needle-core, is its reference;
//! `tests/decode.rs` compares the two on fresh random input.
//!
//! The static part and selection of a head attend in fixed chunks of [`CHUNK`] rows (by their
//! place in the attended list), each chunk's partial merged by log-sum-exp in order: a chunk's
//! result does not depend on where its rows live or on the queries beside it, so sequences whose
//! chunk is the same rows (streams of one saved context read its map) attend it in one kernel
//! call, each row read once for all of their queries ([`attend_groups`]), with the bits each
//! sequence gets alone.
//!
//! Also the kernels' view of a core type that needle-core, which depends on no kernel crate,
//! cannot build itself: a prefill [`BlockMask`] as the block-sparse kernel's `BlockLayout`.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;

use needle_core::attention::merge_into;
use needle_core::prefill::BlockMask;
use needle_core::{Error, KvDtype, Result, Row, RowSource, Selection, StaticPart, check_finite, check_len};
use needle_kernels_cpu::BlockLayout;
use needle_kernels_cpu::attn::KvElem;

/// Rows per chunk of a head's decode attention (see the module doc): a KV page
/// ([`PAGE_SIZE`](crate::PAGE_SIZE)), the unit sequences share (a loaded context's full pages are
/// read in place from its map), and large enough that a chunk's kernel call and merge cost little.
pub const CHUNK: usize = 256;

/// Reusable buffers of [`attend_group`] so the decode hot path does not allocate.
#[derive(Debug, Default, Clone)]
pub struct GroupScratch {
    ids: Vec<u32>,
    bias: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
    /// `q8` rows of the group dequantized: keys, then values.
    wide: Vec<f32>,
    /// A chunk's partial: outputs, then each head's log-sum-exp.
    part: Vec<f32>,
    part_lse: Vec<f32>,
    /// The running log-sum-exp of each head over the chunks so far.
    lse: Vec<f32>,
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
    let all = matches!(part, Part::All);
    let weighted = picks(queries, keys, values, static_part, all, selection, &mut scratch.ids, &mut scratch.bias)?;
    let g = queries.len() / d;
    let GroupScratch { ids, bias, scores, out, wide, part: chunk, part_lse, lse: acc } = scratch;
    out.resize(g * d, 0.0); // sized only: the kernels zero it
    let bias = weighted.then_some(bias.as_slice());
    let mut bufs = Chunks { out: chunk, lse: part_lse, acc };
    let done = match (keys.dtype(), values.dtype()) {
        (KvDtype::F32, KvDtype::F32) => {
            let (k, v) = both(ids, keys, values, as_f32);
            over(part, queries, &k, &v, bias, scale, scores, out, &mut bufs)
        }
        (KvDtype::F16, KvDtype::F16) => {
            let (k, v) = both(ids, keys, values, as_f16);
            over(part, queries, &k, &v, bias, scale, scores, out, &mut bufs)
        }
        (KvDtype::Q8, KvDtype::Q8) => {
            // The kernels read f32 or f16: the few rows a step attends are widened first.
            wide.clear();
            for rows in [keys, values] {
                ids.iter().for_each(|&id| rows.row(id as usize).extend_into(wide));
            }
            let (k, v) = wide.split_at(ids.len() * d);
            let (k, v): (Vec<&[f32]>, Vec<&[f32]>) = (k.chunks_exact(d).collect(), v.chunks_exact(d).collect());
            over(part, queries, &k, &v, bias, scale, scores, out, &mut bufs)
        }
        (k, v) => return Err(Error::invalid("keys/values", format!("keys stored as {k}, values as {v}"))),
    };
    done.map_err(kernel_error)?;
    Ok(out)
}

fn kernel_error(e: needle_kernels_cpu::Error) -> Error {
    Error::InvalidParameter { name: "keys/values".into(), reason: format!("decode attention: {e}") }
}

/// Checks a head's queries and selection against its rows and lists the rows it attends into
/// `ids` (the static part first when `all`, then the selection) with their log-weights in `bias`;
/// returns whether the selection is weighted.
#[allow(clippy::too_many_arguments)]
fn picks(
    queries: &[f32],
    keys: &dyn RowSource,
    values: &dyn RowSource,
    static_part: StaticPart,
    all: bool,
    selection: &Selection,
    ids: &mut Vec<u32>,
    bias: &mut Vec<f32>,
) -> Result<bool> {
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
    let n = keys.len();
    let dynamic = static_part.dynamic_range(n);
    let weighted = !selection.log_weights.is_empty();
    if weighted {
        check_len("selection log_weights", selection.ids.len(), selection.log_weights.len())?;
    }
    ids.clear();
    bias.clear();
    if all {
        ids.extend(static_part.static_ids(n));
        bias.resize(ids.len(), 0.0);
    }
    for (i, &id) in selection.ids.iter().enumerate() {
        if !dynamic.contains(&id) {
            return Err(Error::OutOfRange {
                what: format!("selection (dynamic part {dynamic:?})"),
                id: id.into(),
                len: n,
            });
        }
        ids.push(id);
        bias.push(if weighted { selection.log_weights[i] } else { 0.0 });
    }
    Ok(weighted)
}

/// The rows of chunk `c` of a list of `n` rows.
fn chunk_range(c: usize, n: usize) -> Range<usize> {
    c * CHUNK..((c + 1) * CHUNK).min(n)
}

/// Buffers of [`over`]: a chunk's partial and the running log-sum-exp of each head.
struct Chunks<'b> {
    out: &'b mut Vec<f32>,
    lse: &'b mut Vec<f32>,
    acc: &'b mut Vec<f32>,
}

/// The kernel over gathered rows for what `part` asks: for the static part and the selection,
/// the `g` heads in `q` chunk by chunk ([`CHUNK`] rows), each chunk's partial merged into `out`
/// in order (zeros when there are no rows); for the selection alone, one pass with each head's
/// log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn over<T: KvElem>(
    part: Part<'_>,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    bufs: &mut Chunks<'_>,
) -> needle_kernels_cpu::Result<()> {
    if let Part::Selection(lse) = part {
        return needle_kernels_cpu::attend_rows_lse(q, keys, values, bias, scale, scores, out, lse);
    }
    let Some(d) = keys.first().map(|k| k.len()).filter(|&d| d > 0) else {
        out.fill(0.0);
        return Ok(());
    };
    let g = q.len() / d;
    bufs.acc.resize(g, 0.0);
    bufs.out.resize(g * d, 0.0);
    bufs.lse.resize(g, 0.0);
    for c in 0..keys.len().div_ceil(CHUNK) {
        let r = chunk_range(c, keys.len());
        let b = bias.map(|b| &b[r.clone()]);
        let (k, v) = (&keys[r.clone()], &values[r]);
        if c == 0 {
            needle_kernels_cpu::attend_rows_lse(q, k, v, b, scale, scores, out, bufs.acc)?;
        } else {
            needle_kernels_cpu::attend_rows_lse(q, k, v, b, scale, scores, bufs.out, bufs.lse)?;
            merge_heads(out, bufs.acc, bufs.out, bufs.lse, d);
        }
    }
    Ok(())
}

/// Merges each head's chunk partial (`part`, `part_lse`) into its running result.
fn merge_heads(out: &mut [f32], lse: &mut [f32], part: &[f32], part_lse: &[f32], d: usize) {
    for (h, (o, l)) in out.chunks_exact_mut(d).zip(lse.iter_mut()).enumerate() {
        merge_into(o, l, &part[h * d..(h + 1) * d], part_lse[h]);
    }
}

/// One KV head of one sequence at a decode step: its query group, its rows, what its selector
/// picked.
pub(crate) struct GroupIn<'a> {
    pub q: &'a [f32],
    pub keys: &'a dyn RowSource,
    pub values: &'a dyn RowSource,
    pub static_part: StaticPart,
    pub selection: &'a Selection,
}

/// [`attend_group`] of every group, bit for bit, in one parallel region on the kernels' pool:
/// a chunk that is the same rows in several groups (and unweighted) is attended once for all of
/// their queries. Groups of `q8` rows or weighted selections attend one by one.
pub(crate) fn attend_groups(groups: &[GroupIn<'_>], scale: f32) -> Result<Vec<Vec<f32>>> {
    let pool = needle_kernels_cpu::Pool::global();
    let plain = groups.iter().all(|g| g.selection.log_weights.is_empty());
    let same = |t: KvDtype| groups.iter().all(|g| g.keys.dtype() == t && g.values.dtype() == t);
    match groups.first().map(|g| g.keys.dtype()) {
        Some(KvDtype::F32) if plain && same(KvDtype::F32) => shared(groups, as_f32, scale),
        Some(KvDtype::F16) if plain && same(KvDtype::F16) => shared(groups, as_f16, scale),
        _ => {
            let mut scratch: Vec<GroupScratch> = vec![GroupScratch::default(); groups.len()];
            pool.map_mut(&mut scratch, |i, s| {
                let g = &groups[i];
                attend_group(g.q, g.keys, g.values, g.static_part, g.selection, scale, s).map(<[f32]>::to_vec)
            })
            .into_iter()
            .collect()
        }
    }
}

/// A chunk attended together: the groups sharing it and its position.
struct Unit {
    members: Vec<usize>,
    chunk: usize,
}

/// A task's buffers: scores, the queries of a shared chunk's groups, a partial's outputs and
/// log-sum-exps.
#[derive(Default)]
struct TaskBufs {
    scores: Vec<f32>,
    q: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

thread_local! {
    /// Each thread's [`TaskBufs`] (the decode hot path does not allocate per task).
    static TASK: RefCell<TaskBufs> = RefCell::default();
}

/// A group's key rows and value rows, in the order it attends them.
type RowLists<'r, T> = (Vec<&'r [T]>, Vec<&'r [T]>);

/// [`attend_groups`] over rows of one stored precision, unweighted.
fn shared<'r, T: KvElem>(groups: &[GroupIn<'r>], typed: fn(Row<'r>) -> &'r [T], scale: f32) -> Result<Vec<Vec<f32>>> {
    // Each group's checks and rows, in parallel.
    let mut rows: Vec<Result<RowLists<'r, T>>> = (0..groups.len()).map(|_| Ok(Default::default())).collect();
    needle_kernels_cpu::Pool::global().map_mut(&mut rows, |i, r| {
        let g = &groups[i];
        let (mut ids, mut bias) = (Vec::new(), Vec::new());
        *r = picks(g.q, g.keys, g.values, g.static_part, true, g.selection, &mut ids, &mut bias)
            .map(|_| both(&ids, g.keys, g.values, typed));
    });
    let rows: Vec<RowLists<'r, T>> = rows.into_iter().collect::<Result<_>>()?;
    let d = |i: usize| groups[i].keys.dim();
    let heads = |i: usize| groups[i].q.len() / d(i);
    let chunks = |i: usize| rows[i].0.len().div_ceil(CHUNK);
    // The same rows: chunk `c` of groups `i` and `j` has the same key and value rows (addresses).
    let same = |i: usize, j: usize, c: usize| {
        let (ri, rj) = (chunk_range(c, rows[i].0.len()), chunk_range(c, rows[j].0.len()));
        ri.len() == rj.len()
            && heads(i) == heads(j)
            && same_rows(&rows[i].0[ri.clone()], &rows[j].0[rj.clone()])
            && same_rows(&rows[i].1[ri], &rows[j].1[rj])
    };
    // Classes of groups per chunk position: a class of several is a unit, attended once.
    let mut units: Vec<Unit> = Vec::new();
    // Whether group `i`'s chunk `c` is its own (attended by the group's task): entry `first[i] + c`.
    let first: Vec<usize> = (0..groups.len()).scan(0, |n, i| Some(std::mem::replace(n, *n + chunks(i)))).collect();
    let mut owned = vec![true; (0..groups.len()).map(chunks).sum()];
    for c in 0..(0..groups.len()).map(chunks).max().unwrap_or(0) {
        let mut classes: Vec<Vec<usize>> = Vec::new();
        for i in (0..groups.len()).filter(|&i| c < chunks(i)) {
            match classes.iter_mut().find(|m| same(m[0], i, c)) {
                Some(m) => m.push(i),
                None => classes.push(vec![i]),
            }
        }
        for members in classes.into_iter().filter(|m| m.len() > 1) {
            members.iter().for_each(|&i| owned[first[i] + c] = false);
            units.push(Unit { members, chunk: c });
        }
    }
    tracing::trace!(groups = groups.len(), units = units.len(), "decode attention of several sequences");
    // Each group's chunk partials: outputs (chunk after chunk, `heads × d` each), then lse.
    let parts: Vec<Mutex<(Vec<f32>, Vec<f32>)>> = (0..groups.len())
        .map(|i| Mutex::new((vec![0f32; chunks(i) * heads(i) * d(i)], vec![0f32; chunks(i) * heads(i)])))
        .collect();
    let store = |i: usize, c: usize, out: &[f32], lse: &[f32]| {
        let (hn, dn) = (heads(i), d(i));
        let mut p = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        p.0[c * hn * dn..(c + 1) * hn * dn].copy_from_slice(out);
        p.1[c * hn..(c + 1) * hn].copy_from_slice(lse);
    };
    let failed: Mutex<Option<needle_kernels_cpu::Error>> = Mutex::new(None);
    let kernel = |q: &[f32], i: usize, c: usize, t: &mut TaskBufs| {
        let r = chunk_range(c, rows[i].0.len());
        let (hn, dn) = (q.len() / d(i), d(i));
        t.out.resize(hn * dn, 0.0);
        t.lse.resize(hn, 0.0);
        let (k, v) = (&rows[i].0[r.clone()], &rows[i].1[r]);
        let done = needle_kernels_cpu::attend_rows_lse(q, k, v, None, scale, &mut t.scores, &mut t.out, &mut t.lse);
        if let Err(e) = done {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            return false;
        }
        true
    };
    let tasks = units.len() + groups.len();
    needle_kernels_cpu::Pool::global().run(tasks, &|task| {
        TASK.with_borrow_mut(|t| {
            if let Some(u) = units.get(task) {
                let (hn, dn) = (heads(u.members[0]), d(u.members[0]));
                let mut q = std::mem::take(&mut t.q);
                q.clear();
                u.members.iter().for_each(|&i| q.extend_from_slice(groups[i].q));
                if kernel(&q, u.members[0], u.chunk, t) {
                    #[cfg(test)]
                    tests::SHARED.fetch_add(u.members.len(), std::sync::atomic::Ordering::Relaxed);
                    for (m, &i) in u.members.iter().enumerate() {
                        store(i, u.chunk, &t.out[m * hn * dn..(m + 1) * hn * dn], &t.lse[m * hn..(m + 1) * hn]);
                    }
                }
                t.q = q;
                return;
            }
            let i = task - units.len();
            for c in (0..chunks(i)).filter(|&c| owned[first[i] + c]) {
                if !kernel(groups[i].q, i, c, t) {
                    break;
                }
                store(i, c, &t.out, &t.lse);
            }
        })
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(kernel_error(e));
    }
    // Each group's partials merged in chunk order, as `over` merges them.
    let mut parts: Vec<(Vec<f32>, Vec<f32>)> =
        parts.into_iter().map(|p| p.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    Ok(needle_kernels_cpu::Pool::global().map_mut(&mut parts, |i, (outs, lses)| {
        let (hn, dn) = (heads(i), d(i));
        if chunks(i) == 0 {
            return vec![0f32; hn * dn];
        }
        let (first, rest) = outs.split_at_mut(hn * dn);
        let (lse, rest_lse) = lses.split_at_mut(hn);
        for (o, l) in rest.chunks_exact(hn * dn).zip(rest_lse.chunks_exact(hn)) {
            merge_heads(first, lse, o, l, dn);
        }
        first.to_vec()
    }))
}

/// Whether `a` and `b` are the same rows: the same addresses and lengths, in order. Compared as
/// the slices' bytes in one `memcmp` (this runs for every chunk of every group at every layer).
fn same_rows<T>(a: &[&[T]], b: &[&[T]]) -> bool {
    fn bytes<'a, T>(rows: &'a [&[T]]) -> &'a [u8] {
        // SAFETY: a slice reference is an address and a length, with no padding: every byte of
        // `rows` is initialized, and the view borrows `rows`.
        unsafe { std::slice::from_raw_parts(rows.as_ptr().cast::<u8>(), std::mem::size_of_val(rows)) }
    }
    bytes(a) == bytes(b)
}

/// The key and value rows `ids`, as slices of one stored precision.
fn both<'r, T>(
    ids: &[u32],
    keys: &'r dyn RowSource,
    values: &'r dyn RowSource,
    typed: fn(Row<'r>) -> &'r [T],
) -> RowLists<'r, T> {
    (gather(ids, keys, typed), gather(ids, values, typed))
}

/// The rows `ids` of `rows` as slices of one stored precision. Consecutive ids are taken from
/// one [`RowSource::run`] (the static part is runs of whole pages), the others one by one.
fn gather<'r, T>(ids: &[u32], rows: &'r dyn RowSource, typed: fn(Row<'r>) -> &'r [T]) -> Vec<&'r [T]> {
    let d = rows.dim().max(1);
    let mut all = Vec::with_capacity(ids.len());
    let mut rest = ids;
    while let Some(&first) = rest.first() {
        let run = typed(rows.run(first as usize));
        let n = rest
            .iter()
            .take(run.len() / d)
            .enumerate()
            .take_while(|&(j, &id)| id.wrapping_sub(first) as usize == j)
            .count();
        if n == 0 {
            // Another precision (unreachable, see `as_f32`): the kernel's length check rejects it.
            all.push(&run[..0]);
        }
        all.extend(run.chunks_exact(d).take(n));
        rest = &rest[n.max(1)..];
    }
    all
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use half::f16;

    use super::*;

    /// Group chunks attended in a shared kernel call (each member counted).
    pub(super) static SHARED: AtomicUsize = AtomicUsize::new(0);

    /// A sequence's rows: the first `base.len() / dim` rows those of a context it shares with
    /// other sequences (the same memory), then its own.
    struct Forked<'a, T> {
        base: &'a [T],
        own: Vec<T>,
        dim: usize,
    }

    trait Elem: Copy + Sync {
        const DTYPE: KvDtype;
        fn row(s: &[Self]) -> Row<'_>;
        fn from(x: f32) -> Self;
    }
    impl Elem for f32 {
        const DTYPE: KvDtype = KvDtype::F32;
        fn row(s: &[f32]) -> Row<'_> {
            Row::F32(s)
        }
        fn from(x: f32) -> f32 {
            x
        }
    }
    impl Elem for f16 {
        const DTYPE: KvDtype = KvDtype::F16;
        fn row(s: &[f16]) -> Row<'_> {
            Row::F16(s)
        }
        fn from(x: f32) -> f16 {
            f16::from_f32(x)
        }
    }

    impl<T: Elem> RowSource for Forked<'_, T> {
        fn dim(&self) -> usize {
            self.dim
        }
        fn len(&self) -> usize {
            (self.base.len() + self.own.len()) / self.dim
        }
        fn dtype(&self) -> KvDtype {
            T::DTYPE
        }
        fn row(&self, i: usize) -> Row<'_> {
            let (d, shared) = (self.dim, self.base.len() / self.dim);
            if i < shared {
                T::row(&self.base[i * d..(i + 1) * d])
            } else {
                T::row(&self.own[(i - shared) * d..(i - shared + 1) * d])
            }
        }
    }

    /// Several sequences forked from one context (each KV head's shared rows the same memory)
    /// attended together: each group's output is the bits it gets alone, whether its chunks are
    /// shared, partly shared (a selector's window moves with the sequence's length) or its own,
    /// and with a weighted selection (attended one by one).
    fn check<T: Elem>() {
        let (d, g, heads, shared) = (64, 3, 2, 2 * CHUNK + 70);
        let mut rand = crate::testutil::uniform(0x9e37_79b9);
        let bases: Vec<Vec<T>> = (0..heads).map(|_| rand(shared * d).into_iter().map(T::from).collect()).collect();
        let own_rows = [5, 70, 0, 1];
        let sources: Vec<(Forked<'_, T>, Forked<'_, T>)> = own_rows
            .iter()
            .flat_map(|&n| {
                let mut rand = crate::testutil::uniform(n as u32 + 7);
                bases
                    .iter()
                    .map(|b| {
                        let own = |r: &mut dyn FnMut(usize) -> Vec<f32>| r(n * d).into_iter().map(T::from).collect();
                        (
                            Forked { base: b, own: own(&mut rand), dim: d },
                            Forked { base: b, own: own(&mut rand), dim: d },
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let queries: Vec<Vec<f32>> = sources.iter().map(|_| rand(g * d)).collect();
        let full = StaticPart { sinks: 0, window: usize::MAX };
        let windowed = StaticPart { sinks: 4, window: 8 };
        let picks = |n: usize, weighted: bool| Selection {
            ids: (4..n.saturating_sub(8) as u32).step_by(3).collect(),
            log_weights: if weighted { vec![-0.5; (4..n.saturating_sub(8)).step_by(3).count()] } else { Vec::new() },
            ..Selection::default()
        };
        for (static_part, weighted) in [(full, false), (windowed, false), (windowed, true)] {
            let selections: Vec<Selection> = sources
                .iter()
                .map(|(k, _)| if static_part == full { Selection::default() } else { picks(k.len(), weighted) })
                .collect();
            let groups: Vec<GroupIn<'_>> = sources
                .iter()
                .zip(&queries)
                .zip(&selections)
                .map(|(((k, v), q), selection)| GroupIn { q, keys: k, values: v, static_part, selection })
                .collect();
            let before = SHARED.load(Ordering::Relaxed);
            let together = attend_groups(&groups, 0.125).unwrap();
            // Full attention: the two whole chunks of each head's shared rows, for all four
            // sequences (other tests running alongside may only add to the count).
            if static_part == full {
                assert!(
                    SHARED.load(Ordering::Relaxed) - before >= 2 * heads * own_rows.len(),
                    "{:?}: not shared",
                    T::DTYPE
                );
            }
            for (i, gr) in groups.iter().enumerate() {
                let mut scratch = GroupScratch::default();
                let alone =
                    attend_group(gr.q, gr.keys, gr.values, static_part, gr.selection, 0.125, &mut scratch).unwrap();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&together[i]),
                    bits(alone),
                    "{:?} {static_part:?} weighted {weighted}: group {i}",
                    T::DTYPE
                );
            }
        }
    }

    #[test]
    fn groups_attended_together_get_the_bits_each_gets_alone() {
        check::<f32>();
        check::<f16>();
    }

    /// `gather` gives every id the slice `row` gives it (the same memory), whatever mix of
    /// runs and scattered ids, across page ends and up to the last, partly filled page; for f32
    /// and f16 pages and for the default, row-by-row source.
    #[test]
    fn gather_takes_each_ids_own_row() {
        let ids: Vec<u32> = [0, 1, 2, 3, 4, 5, 9, 8, 10, 11, 12, 12, 3, 6, 7, 13, 0].to_vec();
        let same = |got: &[&[f32]], want: &dyn Fn(usize) -> *const f32| {
            assert_eq!(got.len(), ids.len());
            for (g, &id) in got.iter().zip(&ids) {
                assert!(std::ptr::eq(g.as_ptr(), want(id as usize)) && g.len() == 3, "row {id}");
            }
        };
        let mut paged = needle_core::PagedRows::new(3, 4).unwrap();
        let mut half = needle_core::PagedRows::with_dtype(3, 4, KvDtype::F16).unwrap();
        for i in 0..14 {
            paged.push(&[i as f32, 1.0, 2.0]).unwrap();
            half.push(&[i as f32, 1.0, 2.0]).unwrap();
        }
        same(&gather(&ids, &paged, as_f32), &|i| as_f32(paged.row(i)).as_ptr());
        let got = gather(&ids, &half, as_f16);
        for (g, &id) in got.iter().zip(&ids) {
            assert!(std::ptr::eq(g.as_ptr(), as_f16(half.row(id as usize)).as_ptr()), "f16 row {id}");
        }
        let flat: Vec<f32> = (0..14 * 3).map(|x| x as f32).collect();
        let forked = Forked { base: &flat[..5 * 3], own: flat[5 * 3..].to_vec(), dim: 3 };
        same(&gather(&ids, &forked, as_f32), &|i| as_f32(forked.row(i)).as_ptr());
    }

    /// Chunked attention equals one softmax over all the rows (the f64 reference), for lists of
    /// one chunk, several, and a partial last one.
    #[test]
    fn chunked_attention_matches_the_reference() {
        let (d, g) = (64, 3);
        let mut rand = crate::testutil::uniform(0x1234_5678);
        for n in [1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let (k, v, q) = (rand(n * d), rand(n * d), rand(g * d));
            let (keys, values) =
                (needle_core::Rows::new("k", &k, d).unwrap(), needle_core::Rows::new("v", &v, d).unwrap());
            let full = StaticPart { sinks: 0, window: usize::MAX };
            let mut scratch = GroupScratch::default();
            let out =
                attend_group(&q, &keys, &values, full, &Selection::default(), 0.2, &mut scratch).unwrap().to_vec();
            for h in 0..g {
                let want = needle_core::attention::dense::<f64>(&q[h * d..(h + 1) * d], &keys, &values, 0.2).unwrap();
                for (a, b) in out[h * d..(h + 1) * d].iter().zip(&want.out) {
                    assert!((f64::from(*a) - b).abs() < 1e-5, "n {n} head {h}: {a} vs {b}");
                }
            }
        }
    }
}
