//! Decode attention of a query group over gathered rows ([`attend_rows`], [`attend_rows_lse`]):
//! the checks, the scalar body (the reference, and the code for head dims the vectors do not
//! divide), the vector body written once over [`Lanes`] for AVX2 and NEON, and an AVX-512 body
//! (`x86_512`) that keeps a block of scores and of outputs in registers.

use super::lanes::{Lanes, LoadLanes};
use super::{KvElem, axpy, dot8, exp_approx};
use crate::{Error, Isa, Result, check_len};

/// Decode attention of `g` query heads sharing one KV head over gathered rows: `q` is `g × dim`
/// (row-major), `keys[j]` / `values[j]` are the rows attended (any positions, each `dim`
/// elements), `bias[j]` (when given) is added to row `j`'s scores after scaling (log-weights of a
/// sampled selection). `out` (`g × dim`) receives `softmax(scale · q·kᵀ + bias) · V` per head;
/// with no rows it is zero. `scores` is reusable scratch. Each key and value row is read once for
/// the whole group; the softmax is two-pass (exact max, then exponentials).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows<T: KvElem>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<()> {
    attend_rows_with(Isa::detect(), q, keys, values, bias, scale, scores, out)
}

/// [`attend_rows`] that also writes each query head's log-sum-exp of its scaled, biased scores
/// (natural log; `-inf` and a zero output when there are no rows) into `lse` (`g` entries), so
/// partial attentions over disjoint row sets can be merged exactly.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_lse<T: KvElem>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    attend_rows_lse_with(Isa::detect(), q, keys, values, bias, scale, scores, out, lse)
}

/// [`attend_rows_lse`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_lse_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    // With no rows there is no `dim` to derive `g` from: `lse` must still split `q` evenly.
    if keys.is_empty() && !q.is_empty() && (lse.is_empty() || !q.len().is_multiple_of(lse.len())) {
        return Err(Error::Invalid {
            param: "lse",
            why: format!("length {} does not divide the query length {}", lse.len(), q.len()),
        });
    }
    attend(isa, q, keys, values, bias, scale, scores, out, Some(lse))
}

/// [`attend_rows`] on a given ISA (scalar when `isa` is not available here).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<()> {
    attend(isa, q, keys, values, bias, scale, scores, out, None)
}

/// The checks and dispatch of [`attend_rows_with`] and [`attend_rows_lse_with`] (`lse` given:
/// one entry per head, checked here once `dim` is known).
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_len("out", out.len(), q.len())?;
    check_len("values", values.len(), keys.len())?;
    if let Some(b) = bias {
        check_len("bias", b.len(), keys.len())?;
    }
    out.fill(0.0);
    let Some(dim) = keys.first().map(|k| k.len()) else {
        if let Some(l) = lse {
            l.fill(f32::NEG_INFINITY);
        }
        return Ok(());
    };
    if dim == 0 || !q.len().is_multiple_of(dim) {
        return Err(Error::Invalid { param: "q", why: format!("length {} is not a multiple of dim {dim}", q.len()) });
    }
    if let Some(r) = keys.iter().chain(values).find(|r| r.len() != dim) {
        return Err(Error::Invalid {
            param: "keys/values",
            why: format!("a row has {} elements, expected {dim}", r.len()),
        });
    }
    if let Some(l) = lse.as_deref() {
        check_len("lse", l.len(), q.len() / dim)?;
    }
    let rows = Rows { q, keys, values, bias, scale, dim };
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512f() && dim.is_multiple_of(x86_512::DIMS) && x86_512::takes::<T>() {
        // SAFETY: `has_avx512f()` means avx512f (with avx2, fma and f16c) was detected here.
        unsafe { rows.run_avx512(scores, out, lse) };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2()` means avx2 and fma were detected on this CPU.
        unsafe { rows.run_avx2(scores, out, lse) };
        return Ok(());
    }
    #[cfg(target_arch = "aarch64")]
    if isa.has_neon() {
        // SAFETY: `has_neon()` means neon was detected on this CPU.
        unsafe { rows.run_neon(scores, out, lse) };
        return Ok(());
    }
    let _ = isa;
    rows.run_dims(scores, out, lse);
    Ok(())
}

struct Rows<'a, T> {
    q: &'a [f32],
    keys: &'a [&'a [T]],
    values: &'a [&'a [T]],
    bias: Option<&'a [f32]>,
    scale: f32,
    dim: usize,
}

impl<T: KvElem> Rows<'_, T> {
    /// # Safety
    /// Needs avx2, fma and f16c.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        use std::any::TypeId;
        if self.dim.is_multiple_of(8) {
            let (k, v) = (self.keys as *const [&[T]], self.values as *const [&[T]]);
            // SAFETY (both casts): `T` is exactly the type cast to (equal type ids), so the slices
            // are reinterpreted as themselves; the features are those of this fn.
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                let (k, v) = unsafe { (&*(k as *const [&[f32]]), &*(v as *const [&[f32]])) };
                return unsafe { avx2(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
            if TypeId::of::<T>() == TypeId::of::<half::f16>() {
                let (k, v) = unsafe { (&*(k as *const [&[half::f16]]), &*(v as *const [&[half::f16]])) };
                return unsafe { avx2(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
        }
        self.run_dims(scores, out, lse)
    }

    /// [`x86_512::attend`] for the types it [`takes`](x86_512::takes) (the plain body otherwise).
    ///
    /// # Safety
    /// Needs avx2, fma, f16c and avx512f; `dim` a multiple of [`x86_512::DIMS`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_avx512(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        use std::any::TypeId;
        let (k, v) = (self.keys as *const [&[T]], self.values as *const [&[T]]);
        // SAFETY (both casts): `T` is exactly the type cast to (equal type ids), so the slices are
        // reinterpreted as themselves; the features and `dim` per this fn's contract.
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            let (k, v) = unsafe { (&*(k as *const [&[f32]]), &*(v as *const [&[f32]])) };
            return unsafe { x86_512::attend(self.q, k, v, self.bias, self.scale, scores, out, lse) };
        }
        if TypeId::of::<T>() == TypeId::of::<half::f16>() {
            let (k, v) = unsafe { (&*(k as *const [&[half::f16]]), &*(v as *const [&[half::f16]])) };
            return unsafe { x86_512::attend(self.q, k, v, self.bias, self.scale, scores, out, lse) };
        }
        self.run_dims(scores, out, lse)
    }

    /// # Safety
    /// Needs neon.
    #[cfg(target_arch = "aarch64")]
    unsafe fn run_neon(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        use std::any::TypeId;
        if self.dim.is_multiple_of(4) {
            let (k, v) = (self.keys as *const [&[T]], self.values as *const [&[T]]);
            // SAFETY (both casts): `T` is exactly the type cast to (equal type ids), so the slices
            // are reinterpreted as themselves; neon per this fn's contract.
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                let (k, v) = unsafe { (&*(k as *const [&[f32]]), &*(v as *const [&[f32]])) };
                return unsafe { neon(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
            if TypeId::of::<T>() == TypeId::of::<half::f16>() {
                let (k, v) = unsafe { (&*(k as *const [&[half::f16]]), &*(v as *const [&[half::f16]])) };
                return unsafe { neon(self.q, k, v, self.bias, self.scale, scores, out, lse) };
            }
        }
        self.run_dims(scores, out, lse)
    }

    #[inline(always)]
    fn run_dims(&self, scores: &mut Vec<f32>, out: &mut [f32], lse: Option<&mut [f32]>) {
        match self.dim {
            64 => self.body::<64>(scores, out, lse),
            128 => self.body::<128>(scores, out, lse),
            _ => self.body::<0>(scores, out, lse),
        }
    }

    /// `D` is the head dim, or 0 for "read it from `self.dim`".
    #[inline(always)]
    fn body<const D: usize>(&self, scores: &mut Vec<f32>, out: &mut [f32], mut lse: Option<&mut [f32]>) {
        let dim = if D == 0 { self.dim } else { D };
        let (m, g) = (self.keys.len(), self.q.len() / dim);
        // Head-major scores (`g × m`), so the softmax runs over contiguous rows.
        scores.clear();
        scores.resize(g * m, 0.0);
        let mut conv = Vec::new();
        for (j, k) in self.keys.iter().enumerate() {
            let k = T::as_f32(k, &mut conv);
            let b = self.bias.map_or(0.0, |b| b[j]);
            for h in 0..g {
                scores[h * m + j] = dot8(&self.q[h * dim..(h + 1) * dim], &k[..dim]) * self.scale + b;
            }
        }
        for (h, s) in scores.chunks_exact_mut(m).enumerate() {
            let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            s.iter_mut().for_each(|x| *x = exp_approx(*x - mx));
            let sum = s.iter().sum::<f32>();
            let inv = 1.0 / sum;
            s.iter_mut().for_each(|x| *x *= inv);
            if let Some(l) = lse.as_deref_mut() {
                l[h] = mx + sum.ln();
            }
        }
        for (j, v) in self.values.iter().enumerate() {
            let v = T::as_f32(v, &mut conv);
            for h in 0..g {
                axpy(scores[h * m + j], &v[..dim], &mut out[h * dim..(h + 1) * dim]);
            }
        }
    }
}

/// [`simd`] on AVX2 `f32x8` lanes.
///
/// # Safety
/// Needs avx2, fma and f16c; the shapes of [`simd`] hold.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<T: LoadLanes<std::arch::x86_64::__m256>>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    // SAFETY: the features and shapes per this fn's contract.
    unsafe { simd(q, keys, values, bias, scale, scores, out, lse) }
}

/// [`simd`] on NEON `f32x4` lanes.
///
/// # Safety
/// Needs neon; the shapes of [`simd`] hold.
#[cfg(target_arch = "aarch64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
unsafe fn neon<T: LoadLanes<std::arch::aarch64::float32x4_t>>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    // SAFETY: the features and shapes per this fn's contract.
    unsafe { simd(q, keys, values, bias, scale, scores, out, lse) }
}

/// [`attend_rows`] after its checks, on `L` lanes: every row has `dim` elements, `dim` a multiple
/// of `L::N`, `q` and `out` are `g × dim` (`out` zeroed), `bias` has one entry per row, `lse`
/// (when given) one per head.
///
/// # Safety
/// `L`'s instruction set is enabled in the caller (this fn is inlined into it); the shapes above
/// hold.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn simd<L: Lanes, T: LoadLanes<L>>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    bias: Option<&[f32]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) {
    let m = keys.len();
    let dim = keys[0].len();
    let (g, cn) = (q.len() / dim, dim / L::N);
    scores.clear();
    scores.resize(g * m, 0.0);
    // Eight keys at a time for every head (the 8 rows stay in L1 across heads): eight
    // accumulators, then one reduction into 8 scores.
    let mut j = 0;
    while j + 8 <= m {
        for h in 0..g {
            let qh = &q[h * dim..(h + 1) * dim];
            // SAFETY (the block): rows and `qh` have `dim` = N·cn elements; `bias` (when given)
            // and row `h` of `scores` have `m ≥ j + 8` entries.
            unsafe {
                let mut acc = [L::zero(); 8];
                for c in 0..cn {
                    let qv = L::load(qh.as_ptr().add(L::N * c));
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = qv.mul_add(T::load(keys[j + u].as_ptr().add(L::N * c)), *a);
                    }
                }
                L::sums8(&acc, scale, bias.map(|b| b.as_ptr().add(j)), scores.as_mut_ptr().add(h * m + j));
            }
        }
        j += 8;
    }
    for jj in j..m {
        for h in 0..g {
            let qh = &q[h * dim..(h + 1) * dim];
            // SAFETY (the block): as above.
            unsafe {
                let mut a = L::zero();
                for c in 0..cn {
                    a = L::load(qh.as_ptr().add(L::N * c)).mul_add(T::load(keys[jj].as_ptr().add(L::N * c)), a);
                }
                scores[h * m + jj] = a.hsum() * scale + bias.map_or(0.0, |b| b[jj]);
            }
        }
    }
    // SAFETY: the instruction set per this fn's contract.
    unsafe { softmax_rows::<L>(scores, m, lse) };
    // One pass over the value rows: each row is added into every head's output (in L1, zeroed by
    // the caller); the dim/N chunks of a row are independent FMAs.
    for (j, v) in values.iter().enumerate() {
        for h in 0..g {
            let o = out[h * dim..(h + 1) * dim].as_mut_ptr();
            // SAFETY (the block): value rows and each head's output have `dim` elements.
            unsafe {
                let p = L::splat(scores[h * m + j]);
                for c in 0..cn {
                    p.mul_add(T::load(v.as_ptr().add(L::N * c)), L::load(o.add(L::N * c))).store(o.add(L::N * c));
                }
            }
        }
    }
}

/// [`softmax`] of each `m`-score row of `scores` (one per head), each head's log-sum-exp into
/// `lse` when given.
///
/// # Safety
/// `L`'s instruction set, as [`simd`].
#[inline(always)]
unsafe fn softmax_rows<L: Lanes>(scores: &mut [f32], m: usize, mut lse: Option<&mut [f32]>) {
    for (h, srow) in scores.chunks_exact_mut(m).enumerate() {
        // SAFETY: the instruction set per this fn's contract.
        let (mx, sum) = unsafe { softmax::<L>(srow) };
        if let Some(l) = lse.as_deref_mut() {
            l[h] = mx + sum.ln();
        }
    }
}

/// In-place softmax of `s` with [`Lanes::exp`], `N` lanes at a time; returns the max and the sum
/// of the exponentials (for the log-sum-exp).
///
/// # Safety
/// `L`'s instruction set, as [`simd`].
#[inline(always)]
unsafe fn softmax<L: Lanes>(s: &mut [f32]) -> (f32, f32) {
    let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let (mut sum, mut i) = (0f32, 0);
    // SAFETY (the block): `i + N ≤ s.len()` for every access.
    unsafe {
        let (mv, mut acc) = (L::splat(mx), L::zero());
        while i + L::N <= s.len() {
            let e = L::load(s.as_ptr().add(i)).sub(mv).exp();
            e.store(s.as_mut_ptr().add(i));
            acc = acc.add(e);
            i += L::N;
        }
        sum += acc.hsum();
    }
    for x in &mut s[i..] {
        *x = exp_approx(*x - mx);
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
    (mx, sum)
}

/// The AVX-512 body, register-blocked where the AVX2 one ([`simd`]) streams through memory: a
/// head's dots with sixteen keys stay in sixteen registers and are reduced together into one
/// vector of sixteen scores (no horizontal sum per key), the sixteen key rows staying in L1 for
/// every head of the group; and the outputs of up to four heads over 64 dims stay in registers
/// across every value row (AVX2's sixteen registers hold neither, so its output rows are loaded
/// and stored once per value row). The value pass is the AVX2 one's arithmetic (the same fused
/// multiply-adds in the same order); the key dots sum in another order. A head's arithmetic is
/// the same whatever the heads beside it.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use std::arch::x86_64::*;

    /// Head dims this body takes: multiples of one output block (four 16-lane vectors).
    pub(super) const DIMS: usize = 64;
    /// Keys per block of the key dots: one accumulator each (16 registers), reduced into the 16
    /// lanes of one score vector.
    const KEYS: usize = 16;
    /// Keys per half block: a pair of heads' dots with eight keys fill the sixteen registers.
    const HALF: usize = KEYS / 2;
    /// Query heads per register block of the value pass: 4 heads × 64 dims in 16 registers.
    const PV_HEADS: usize = 4;

    /// Whether this body takes rows of `T` (`f32` and `f16`).
    pub(super) fn takes<T: 'static>() -> bool {
        use std::any::TypeId;
        [TypeId::of::<f32>(), TypeId::of::<half::f16>()].contains(&TypeId::of::<T>())
    }

    /// Sixteen stored elements as `f32` lanes.
    pub(super) trait Load16: Copy {
        /// # Safety
        /// `p` has 16 readable elements; avx512f (and f16c) enabled in the caller.
        unsafe fn load16(p: *const Self) -> __m512;

        /// Whether rows are converted to be read as `f32` ([`Load16::row_f32`] needs a tile).
        const CONVERTED: bool = true;

        /// `row` as `f32`: in place for `f32`, else converted into `buf` (`row.len()` floats).
        ///
        /// # Safety
        /// `row.len()` is a multiple of 16; avx512f (and f16c) enabled in the caller.
        #[inline(always)]
        unsafe fn row_f32(row: &[Self], buf: &mut [f32]) -> *const f32 {
            let buf = &mut buf[..row.len()];
            for c in (0..row.len()).step_by(16) {
                // SAFETY: `c + 16 <= row.len() == buf.len()`; the features per the contract.
                unsafe { _mm512_storeu_ps(buf.as_mut_ptr().add(c), Self::load16(row.as_ptr().add(c))) };
            }
            buf.as_ptr()
        }
    }

    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller's contract.
            unsafe { _mm512_loadu_ps(p) }
        }

        const CONVERTED: bool = false;

        #[inline(always)]
        unsafe fn row_f32(row: &[f32], _buf: &mut [f32]) -> *const f32 {
            row.as_ptr()
        }
    }

    impl Load16 for half::f16 {
        #[inline(always)]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            // SAFETY: the caller's contract (16 halves are 32 bytes).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
    }

    /// [`super::simd`]'s contract on AVX-512, `dim` a multiple of [`DIMS`].
    ///
    /// # Safety
    /// Needs avx2, fma, f16c and avx512f; the shapes of [`super::simd`] hold and `dim` is a
    /// multiple of [`DIMS`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn attend<T: Load16>(
        q: &[f32],
        keys: &[&[T]],
        values: &[&[T]],
        bias: Option<&[f32]>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) {
        let (m, dim) = (keys.len(), keys[0].len());
        let g = q.len() / dim;
        // The scores (`g × m`), then (where rows are converted) a block of keys as f32.
        let tile_len = if T::CONVERTED { KEYS * dim } else { 0 };
        scores.clear();
        scores.resize(g * m + tile_len, 0.0);
        let (scores, tile) = scores.split_at_mut(g * m);
        let job = Job { q, keys, values, bias, scale, m, dim };
        // SAFETY (the block): the features per this fn's contract; every head block stays below
        // `g`, every dim block below `dim`, as the shapes guarantee.
        unsafe {
            job.dots(g, scores, tile);
            super::softmax_rows::<__m256>(scores, m, lse);
            for h0 in (0..g).step_by(PV_HEADS) {
                for c0 in (0..dim).step_by(DIMS) {
                    match g - h0 {
                        1 => job.weigh::<1>(h0, c0, scores, out),
                        2 => job.weigh::<2>(h0, c0, scores, out),
                        3 => job.weigh::<3>(h0, c0, scores, out),
                        _ => job.weigh::<PV_HEADS>(h0, c0, scores, out),
                    }
                }
            }
        }
    }

    /// Asks for every cache line of `row` ahead of its use.
    ///
    /// # Safety
    /// Needs sse (always there on x86-64).
    #[inline(always)]
    unsafe fn prefetch_row<T>(row: &[T]) {
        let (p, bytes) = (row.as_ptr().cast::<i8>(), std::mem::size_of_val(row));
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch of an address inside `row` (it never faults anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }

    /// Lane `u` of the result is the sum of `acc[u]`'s sixteen lanes: a tree of pairwise
    /// shuffles and adds, each level halving the vectors.
    ///
    /// # Safety
    /// Needs avx512f.
    #[inline(always)]
    unsafe fn sum16(acc: &[__m512; 16]) -> __m512 {
        // Plain loops, not closures: a closure does not inherit the caller's target features, so
        // intrinsics inside it would become calls.
        // SAFETY (the block): register shuffles and adds, the features per this fn's contract.
        unsafe {
            // Within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] (keys 2i, 2i+1).
            let mut l1 = [_mm512_setzero_ps(); 8];
            for (i, x) in l1.iter_mut().enumerate() {
                let (a, b) = (acc[2 * i], acc[2 * i + 1]);
                *x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            }
            // Within each 128-bit lane: one partial of each of keys 4i..4i + 4.
            let mut l2 = [_mm512_setzero_ps(); 4];
            for (i, x) in l2.iter_mut().enumerate() {
                let (a, b) = (l1[2 * i], l1[2 * i + 1]);
                *x = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
            }
            // 128-bit lanes: [keys 8i..8i+4 twice, keys 8i+4..8i+8 twice] (two partials each),
            // then all sixteen keys in order.
            let mut l3 = [_mm512_setzero_ps(); 2];
            for (i, x) in l3.iter_mut().enumerate() {
                *x = pair_lanes(l2[2 * i], l2[2 * i + 1]);
            }
            pair_lanes(l3[0], l3[1])
        }
    }

    /// `[a.0 + a.1, a.2 + a.3, b.0 + b.1, b.2 + b.3]` of the 128-bit lanes of `a` and `b`.
    ///
    /// # Safety
    /// Needs avx512f.
    #[inline(always)]
    unsafe fn pair_lanes(a: __m512, b: __m512) -> __m512 {
        // SAFETY: register shuffles and an add, the features per this fn's contract.
        unsafe {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        }
    }

    struct Job<'a, T> {
        q: &'a [f32],
        keys: &'a [&'a [T]],
        values: &'a [&'a [T]],
        bias: Option<&'a [f32]>,
        scale: f32,
        m: usize,
        dim: usize,
    }

    impl<T: Load16> Job<'_, T> {
        /// Scores of the `g` heads against every key into `scores` (head-major, scaled, biased),
        /// [`KEYS`] keys at a time: each head's sixteen dots in sixteen registers, reduced into one
        /// vector. A last block of fewer keys repeats its last row in the missing places (their
        /// scores are not stored), so every key's arithmetic is that of a full block.
        ///
        /// # Safety
        /// As [`attend`]; `scores` has `g × m` entries, `tile` `KEYS × dim` where rows are
        /// converted ([`Load16::CONVERTED`]).
        #[inline(always)]
        unsafe fn dots(&self, g: usize, scores: &mut [f32], tile: &mut [f32]) {
            let (m, dim) = (self.m, self.dim);
            let q = self.q.as_ptr();
            // SAFETY (the block): key rows, tile rows and query heads have `dim` elements, read
            // in whole 16-lane chunks below `dim`; bias and score rows have `m` entries, read and
            // written below `m` (masked to the block's `n` keys).
            unsafe {
                let scale = _mm512_set1_ps(self.scale);
                for j in (0..m).step_by(KEYS) {
                    let n = KEYS.min(m - j);
                    // The next block's rows: picked rows are scattered, out of the prefetchers' sight.
                    for row in self.keys.get(j + KEYS..m.min(j + 2 * KEYS)).unwrap_or(&[]) {
                        prefetch_row(row);
                    }
                    let mut rows = [std::ptr::null::<f32>(); KEYS];
                    for (u, r) in rows.iter_mut().enumerate() {
                        let tile_row = tile.get_mut(u * dim..).unwrap_or_default();
                        *r = T::row_f32(self.keys.get_unchecked(j + u.min(n - 1)), tile_row);
                    }
                    let mask: __mmask16 = if n == KEYS { !0 } else { (1 << n) - 1 };
                    let bias = match self.bias {
                        Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(j)),
                        None => _mm512_setzero_ps(),
                    };
                    // Heads in pairs over half a block: each key row loaded once for both.
                    let mut h = 0;
                    while h + 2 <= g {
                        for half in 0..2 {
                            let first = half * HALF;
                            if first < n {
                                self.pair(
                                    h,
                                    &rows[first..first + HALF],
                                    j + first,
                                    (n - first).min(HALF),
                                    bias,
                                    scale,
                                    scores,
                                );
                            }
                        }
                        h += 2;
                    }
                    for h in h..g {
                        let qh = q.add(h * dim);
                        let mut acc = [_mm512_setzero_ps(); KEYS];
                        for c0 in (0..dim).step_by(DIMS) {
                            let mut qv = [_mm512_setzero_ps(); 4];
                            for (i, x) in qv.iter_mut().enumerate() {
                                *x = _mm512_loadu_ps(qh.add(c0 + 16 * i));
                            }
                            for (a, row) in acc.iter_mut().zip(&rows) {
                                for (i, qc) in qv.iter().enumerate() {
                                    *a = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(row.add(c0 + 16 * i)), *a);
                                }
                            }
                        }
                        let s = _mm512_add_ps(_mm512_mul_ps(sum16(&acc), scale), bias);
                        _mm512_mask_storeu_ps(scores.as_mut_ptr().add(h * m + j), mask, s);
                    }
                }
            }
        }

        /// Scores of heads `h` and `h + 1` against the [`HALF`] key rows `rows` (keys `j..j + n`
        /// stored, the rest repeats): the sixteen dots of a pair in sixteen registers, each
        /// summed exactly as [`Job::dots`] sums a lone head's (the same multiply-adds in the same
        /// order, the same reduction), so a head's scores do not depend on its pairing. `bias`
        /// holds the block's sixteen biases.
        ///
        /// # Safety
        /// As [`Job::dots`]; `h + 1 < g`, `j + n ≤ m`, `n ≤ HALF`.
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        unsafe fn pair(
            &self,
            h: usize,
            rows: &[*const f32],
            j: usize,
            n: usize,
            bias: __m512,
            scale: __m512,
            scores: &mut [f32],
        ) {
            let (m, dim) = (self.m, self.dim);
            // SAFETY (the block): as in `dots`: query heads `h`, `h + 1` and the rows have `dim`
            // elements, read in 16-lane chunks below `dim`; score rows `m` entries, written at
            // `j..j + n`.
            unsafe {
                let (qa, qb) = (self.q.as_ptr().add(h * dim), self.q.as_ptr().add((h + 1) * dim));
                let mut acc = [_mm512_setzero_ps(); KEYS];
                for c0 in (0..dim).step_by(DIMS) {
                    let (mut qva, mut qvb) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
                    for (i, (a, b)) in qva.iter_mut().zip(qvb.iter_mut()).enumerate() {
                        (*a, *b) = (_mm512_loadu_ps(qa.add(c0 + 16 * i)), _mm512_loadu_ps(qb.add(c0 + 16 * i)));
                    }
                    for (u, row) in rows.iter().enumerate() {
                        for (i, (a, b)) in qva.iter().zip(&qvb).enumerate() {
                            let k = _mm512_loadu_ps(row.add(c0 + 16 * i));
                            acc[u] = _mm512_fmadd_ps(*a, k, acc[u]);
                            acc[HALF + u] = _mm512_fmadd_ps(*b, k, acc[HALF + u]);
                        }
                    }
                }
                // Lanes `u` and `HALF + u` are key `j + u` of either head: its bias in both (the
                // block's biases start at a multiple of KEYS, so the half's at `j % KEYS`).
                let idx = _mm512_add_epi32(
                    _mm512_set1_epi32((j % KEYS) as i32),
                    _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                );
                let bias = _mm512_permutexvar_ps(idx, bias);
                let mut s = [0f32; KEYS];
                _mm512_storeu_ps(s.as_mut_ptr(), _mm512_add_ps(_mm512_mul_ps(sum16(&acc), scale), bias));
                scores[h * m + j..h * m + j + n].copy_from_slice(&s[..n]);
                scores[(h + 1) * m + j..(h + 1) * m + j + n].copy_from_slice(&s[HALF..HALF + n]);
            }
        }

        /// `out` of heads `h0..h0 + H`, dims `c0..c0 + DIMS`: the value rows weighted by the
        /// heads' probabilities, summed in registers.
        ///
        /// # Safety
        /// As [`attend`]; `h0 + H ≤ g`, `c0 + DIMS ≤ dim`, `scores` holds the probabilities.
        #[inline(always)]
        unsafe fn weigh<const H: usize>(&self, h0: usize, c0: usize, scores: &[f32], out: &mut [f32]) {
            let (m, dim) = (self.m, self.dim);
            // SAFETY (the block): value rows have `dim ≥ c0 + DIMS` elements; score rows `m`
            // entries; output rows `dim` floats.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 4]; H];
                for (j, v) in self.values.iter().enumerate() {
                    if let Some(next) = self.values.get(j + 8) {
                        prefetch_row(&next[c0..c0 + DIMS]);
                    }
                    let mut vv = [_mm512_setzero_ps(); 4];
                    for (i, x) in vv.iter_mut().enumerate() {
                        *x = T::load16(v.as_ptr().add(c0 + 16 * i));
                    }
                    for (h, a) in acc.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(*scores.get_unchecked((h0 + h) * m + j));
                        for i in 0..4 {
                            a[i] = _mm512_fmadd_ps(p, vv[i], a[i]);
                        }
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add((h0 + h) * dim + c0);
                    for (i, x) in a.iter().enumerate() {
                        _mm512_storeu_ps(o.add(16 * i), *x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use half::f16;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::super::KvElem;
    use super::super::lanes::LoadLanes;
    use super::Rows;

    /// The shared vector body on one-lane `f32` "vectors" (any head dim) against the plain body,
    /// log-sum-exp included: checks the algorithm every ISA compiles, on any machine.
    fn check<T: KvElem + LoadLanes<f32>>(conv: fn(f32) -> T) {
        let mut r = StdRng::seed_from_u64(4);
        for g in [1, 3] {
            for dim in [5, 16] {
                for m in [1, 8, 13] {
                    for biased in [false, true] {
                        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| r.random_range(-1.0..1.0)).collect() };
                        let q = rand(g * dim);
                        let bias = rand(m);
                        let rows = |v: Vec<f32>| -> Vec<Vec<T>> {
                            v.chunks(dim).map(|c| c.iter().map(|x| conv(*x)).collect()).collect()
                        };
                        let (kt, vt) = (rows(rand(m * dim)), rows(rand(m * dim)));
                        let keys: Vec<&[T]> = kt.iter().map(Vec::as_slice).collect();
                        let values: Vec<&[T]> = vt.iter().map(Vec::as_slice).collect();
                        let bias = biased.then_some(bias.as_slice());
                        let job = Rows { q: &q, keys: &keys, values: &values, bias, scale: 0.4, dim };
                        let (mut want, mut want_lse, mut s) = (vec![0f32; g * dim], vec![0f32; g], Vec::new());
                        job.run_dims(&mut s, &mut want, Some(&mut want_lse));
                        let (mut got, mut got_lse) = (vec![0f32; g * dim], vec![0f32; g]);
                        // SAFETY: `f32` lanes need no instruction set; the shapes are built above.
                        unsafe {
                            super::simd::<f32, T>(&q, &keys, &values, bias, 0.4, &mut s, &mut got, Some(&mut got_lse))
                        };
                        let pairs = got.iter().zip(&want).chain(got_lse.iter().zip(&want_lse));
                        for (i, (a, b)) in pairs.enumerate() {
                            assert!((a - b).abs() <= 1e-5, "g {g} dim {dim} m {m} bias {biased} [{i}]: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_lanes_match_the_plain_body() {
        check::<f32>(|x| x);
        check::<f16>(f16::from_f32);
    }
}
