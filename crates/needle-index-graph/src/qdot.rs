//! Integer inner products of the compact walk: 8-bit key codes against 16-bit query codes.
//!
//! A key row is `stride` signed bytes (its dimensions, zero-padded to a multiple of
//! [`CODE_ALIGN`]); a query is the same number of `i16`. Keys are widened to `i16` and multiplied
//! pairwise into `i32` lanes (`vpmaddwd`, or `vpdpwssd` with AVX-512 VNNI), so the only rounding
//! is the codes' own. One call scores one key row against a group of queries, so the row is read
//! and widened once per group.
//!
//! The level is picked once at run time ([`Level::detect`]); tests force each level through the
//! [`kernel`] of each level and compare it with [`Level::Scalar`], the reference.

/// Code rows are padded to a multiple of this many dimensions (one AVX-512 widening step).
pub(crate) const CODE_ALIGN: usize = 32;

/// Largest magnitude of a query code: with keys within ±127, `dim · 127 · QMAX` stays below
/// `i32::MAX` up to [`MAX_DIM`] dimensions.
pub(crate) const QMAX: f32 = 8191.0;

/// Widest vectors the compact codes accept (see [`QMAX`]).
pub const MAX_DIM: usize = 2048;

/// Instruction set of the code kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// Portable Rust: the reference.
    Scalar,
    /// x86-64 AVX2: 16 codes widened per step, `vpmaddwd`.
    Avx2,
    /// x86-64 AVX-512 F+BW: 32 codes widened per step, `vpmaddwd`.
    Avx512,
    /// AVX-512 with VNNI: `vpdpwssd` fuses the multiply and the accumulate.
    Avx512Vnni,
}

impl Level {
    /// The best level this CPU runs, detected once.
    pub fn detect() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Level::Avx512Vnni, Level::Avx512, Level::Avx2].into_iter().find(|l| l.available()).unwrap_or(Level::Scalar)
        })
    }

    /// Whether this CPU runs `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Level::Scalar => true,
                Level::Avx2 => has!("avx2"),
                Level::Avx512 => has!("avx512f") && has!("avx512bw"),
                Level::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Scalar
        }
    }

    /// Every level this CPU runs, scalar first (for tests and benchmarks).
    pub fn all_available() -> Vec<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Vnni].into_iter().filter(|l| l.available()).collect()
    }
}

/// A code kernel: `out[h] = Σ_d key[d] · queries[h · stride + d]` for each query `h`
/// (`out.len()` of them). `key.len()` is the stride, a multiple of [`CODE_ALIGN`]; `queries`
/// holds `out.len()` rows of it.
pub(crate) type DotsFn = fn(&[i8], &[i16], &mut [i32]);

/// The kernel of `level` (scalar when `level` is not available), so a walk resolves the level
/// once instead of per key.
pub(crate) fn kernel(level: Level) -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (each closure): handed out only after `available()` confirmed the features.
        match level {
            Level::Avx512Vnni if level.available() => return |k, q, o| unsafe { x86::dots_vnni(k, q, o) },
            Level::Avx512 if level.available() => return |k, q, o| unsafe { x86::dots_avx512(k, q, o) },
            Level::Avx2 if level.available() => return |k, q, o| unsafe { x86::dots_avx2(k, q, o) },
            _ => {}
        }
    }
    let _ = level;
    dots_scalar
}

/// Keys per block of a scan's codes (see [`ScanFn`]).
pub(crate) const SCAN_BLOCK: usize = 16;

/// A scan kernel over blocks of [`SCAN_BLOCK`] keys. A block holds `SCAN_BLOCK · stride`
/// codes laid out by dimension pair: for pair `p`, the 16 keys' codes `(2p, 2p+1)` side by side
/// (32 bytes), so one widening load gives every key of the block one lane and no sum crosses
/// lanes. Queries come as pairs too: `qpairs[h · stride/2 + p]` holds query `h`'s codes
/// `2p` (low half) and `2p+1` (high half).
///
/// `out[i] = max_h (⟨key i, query h⟩ as f32 · qscales[h]) · kscales[i]` for the
/// `out.len()` keys (whole blocks): the walk's group score, with the same float operations in
/// the same order, so a scan ranks exactly as the walk would score.
pub(crate) type ScanFn =
    fn(blocks: &[i8], stride: usize, kscales: &[f32], qpairs: &[i32], qscales: &[f32], out: &mut [f32]);

/// The scan kernel of `level` (the reference, [`scan_scalar`], where none is faster: other
/// levels, or groups of more than eight queries, one accumulator register each).
pub(crate) fn scan_kernel(level: Level, group: usize) -> ScanFn {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (each closure): handed out only after `available()` confirmed the features;
        // the bodies check the slice lengths they index.
        macro_rules! pick {
            ($f:ident) => {
                match group {
                    1 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<1>(k, s, ks, q, qs, o) },
                    2 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<2>(k, s, ks, q, qs, o) },
                    3 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<3>(k, s, ks, q, qs, o) },
                    4 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<4>(k, s, ks, q, qs, o) },
                    5 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<5>(k, s, ks, q, qs, o) },
                    6 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<6>(k, s, ks, q, qs, o) },
                    7 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<7>(k, s, ks, q, qs, o) },
                    8 => return |k, s, ks, q, qs, o| unsafe { x86::$f::<8>(k, s, ks, q, qs, o) },
                    _ => {}
                }
            };
        }
        match level {
            Level::Avx512Vnni if level.available() => pick!(scan_vnni),
            Level::Avx512 if level.available() => pick!(scan_avx512),
            Level::Avx2 if level.available() => pick!(scan_avx2),
            _ => {}
        }
    }
    let _ = (level, group);
    scan_scalar
}

/// The reference scan: one key at a time, plain integer sums over the block layout.
pub(crate) fn scan_scalar(
    blocks: &[i8],
    stride: usize,
    kscales: &[f32],
    qpairs: &[i32],
    qscales: &[f32],
    out: &mut [f32],
) {
    let pairs = stride / 2;
    for (i, o) in out.iter_mut().enumerate() {
        let block = &blocks[(i / SCAN_BLOCK) * SCAN_BLOCK * stride..];
        let lane = i % SCAN_BLOCK;
        let best = qscales.iter().enumerate().fold(f32::NEG_INFINITY, |b, (h, &s)| {
            let d: i32 = (0..pairs)
                .map(|p| {
                    let (q, k) = (qpairs[h * pairs + p], &block[p * 2 * SCAN_BLOCK + lane * 2..]);
                    k[0] as i32 * (q as i16) as i32 + k[1] as i32 * ((q >> 16) as i16) as i32
                })
                .sum();
            b.max(d as f32 * s)
        });
        *o = best * kscales[i];
    }
}

/// The reference: plain integer sums.
pub(crate) fn dots_scalar(key: &[i8], queries: &[i16], out: &mut [i32]) {
    let s = key.len();
    for (h, o) in out.iter_mut().enumerate() {
        let q = &queries[h * s..(h + 1) * s];
        *o = key.iter().zip(q).map(|(&k, &q)| k as i32 * q as i32).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Most queries one call scores with register accumulators; more go round again.
    const GROUP: usize = 8;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dots_avx2(key: &[i8], queries: &[i16], out: &mut [i32]) {
        let s = key.len();
        for (chunk, o) in out.chunks_mut(GROUP).enumerate() {
            let base = chunk * GROUP * s;
            let mut acc = [_mm256_setzero_si256(); GROUP];
            let mut d = 0;
            while d < s {
                // SAFETY: `d + 16 <= s` (strides are multiples of 32) for the key and every query row.
                let k = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(key.as_ptr().add(d) as *const __m128i)) };
                for (h, a) in acc.iter_mut().enumerate().take(o.len()) {
                    let q = unsafe { _mm256_loadu_si256(queries.as_ptr().add(base + h * s + d) as *const __m256i) };
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(k, q));
                }
                d += 16;
            }
            for (h, o) in o.iter_mut().enumerate() {
                *o = hsum256(acc[h]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn hsum256(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dots_avx512(key: &[i8], queries: &[i16], out: &mut [i32]) {
        let s = key.len();
        for (chunk, o) in out.chunks_mut(GROUP).enumerate() {
            let base = chunk * GROUP * s;
            let mut acc = [_mm512_setzero_si512(); GROUP];
            let mut d = 0;
            while d < s {
                // SAFETY: `d + 32 <= s` for the key and every query row (strides are multiples of 32).
                let k = unsafe { _mm512_cvtepi8_epi16(_mm256_loadu_si256(key.as_ptr().add(d) as *const __m256i)) };
                for (h, a) in acc.iter_mut().enumerate().take(o.len()) {
                    let q = unsafe { _mm512_loadu_si512(queries.as_ptr().add(base + h * s + d) as *const __m512i) };
                    *a = _mm512_add_epi32(*a, _mm512_madd_epi16(k, q));
                }
                d += 32;
            }
            for (h, o) in o.iter_mut().enumerate() {
                *o = _mm512_reduce_add_epi32(acc[h]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dots_vnni(key: &[i8], queries: &[i16], out: &mut [i32]) {
        let s = key.len();
        for (chunk, o) in out.chunks_mut(GROUP).enumerate() {
            let base = chunk * GROUP * s;
            let mut acc = [_mm512_setzero_si512(); GROUP];
            let mut d = 0;
            while d < s {
                // SAFETY: as in `dots_avx512`.
                let k = unsafe { _mm512_cvtepi8_epi16(_mm256_loadu_si256(key.as_ptr().add(d) as *const __m256i)) };
                for (h, a) in acc.iter_mut().enumerate().take(o.len()) {
                    let q = unsafe { _mm512_loadu_si512(queries.as_ptr().add(base + h * s + d) as *const __m512i) };
                    *a = _mm512_dpwssd_epi32(*a, k, q);
                }
                d += 32;
            }
            for (h, o) in o.iter_mut().enumerate() {
                *o = _mm512_reduce_add_epi32(acc[h]);
            }
        }
    }

    // The scan bodies hold one accumulator per query with a lane per key of the block: each
    // dimension pair is one widening load and one multiply-add per query, and nothing is
    // summed across lanes.

    /// Checks a scan's slices against its shape (the bodies read through raw pointers).
    fn scan_shape(blocks: &[i8], stride: usize, kscales: &[f32], qpairs: &[i32], g: usize, qscales: &[f32], n: usize) {
        assert!(
            n.is_multiple_of(super::SCAN_BLOCK)
                && stride.is_multiple_of(2)
                && blocks.len() >= n * stride
                && kscales.len() >= n
                && qpairs.len() >= g * (stride / 2)
                && qscales.len() == g
        );
    }

    /// Offset of the first key of `start` (a multiple of the lane count) in the blocks.
    #[inline(always)]
    fn lane_base(start: usize, stride: usize) -> usize {
        let (block, lane) = (start / super::SCAN_BLOCK, start % super::SCAN_BLOCK);
        block * super::SCAN_BLOCK * stride + lane * 2
    }

    macro_rules! scan_512 {
        ($name:ident, $features:literal, $madd:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const G: usize>(
                blocks: &[i8],
                stride: usize,
                kscales: &[f32],
                qpairs: &[i32],
                qscales: &[f32],
                out: &mut [f32],
            ) {
                let (n, pairs) = (out.len(), stride / 2);
                scan_shape(blocks, stride, kscales, qpairs, G, qscales, n);
                let (bp, qp) = (blocks.as_ptr(), qpairs.as_ptr());
                for start in (0..n).step_by(16) {
                    let base = lane_base(start, stride);
                    let mut acc = [_mm512_setzero_si512(); G];
                    for p in 0..pairs {
                        // SAFETY: the block's pair `p` is 32 bytes inside `blocks` (checked shape).
                        let k = unsafe {
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256(bp.add(base + p * 32) as *const __m256i))
                        };
                        for (h, a) in acc.iter_mut().enumerate() {
                            // SAFETY: `h · pairs + p < G · pairs <= qpairs.len()`.
                            let q = _mm512_set1_epi32(unsafe { *qp.add(h * pairs + p) });
                            *a = $madd(*a, k, q);
                        }
                    }
                    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
                    for (a, &s) in acc.into_iter().zip(qscales) {
                        best = _mm512_max_ps(best, _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s)));
                    }
                    // SAFETY: `start + 16 <= n <= kscales.len()`, and `out.len() == n`.
                    unsafe {
                        let ks = _mm512_loadu_ps(kscales.as_ptr().add(start));
                        _mm512_storeu_ps(out.as_mut_ptr().add(start), _mm512_mul_ps(best, ks));
                    }
                }
            }
        };
    }

    scan_512!(scan_vnni, "avx512f,avx512bw,avx512vnni", |a, k, q| _mm512_dpwssd_epi32(a, k, q));
    scan_512!(scan_avx512, "avx512f,avx512bw", |a, k, q| _mm512_add_epi32(a, _mm512_madd_epi16(k, q)));

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_avx2<const G: usize>(
        blocks: &[i8],
        stride: usize,
        kscales: &[f32],
        qpairs: &[i32],
        qscales: &[f32],
        out: &mut [f32],
    ) {
        let (n, pairs) = (out.len(), stride / 2);
        scan_shape(blocks, stride, kscales, qpairs, G, qscales, n);
        let (bp, qp) = (blocks.as_ptr(), qpairs.as_ptr());
        for start in (0..n).step_by(8) {
            let base = lane_base(start, stride);
            let mut acc = [_mm256_setzero_si256(); G];
            for p in 0..pairs {
                // SAFETY: 16 of the block's pair `p` bytes, inside `blocks` (checked shape).
                let k = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(base + p * 32) as *const __m128i)) };
                for (h, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `h · pairs + p < G · pairs <= qpairs.len()`.
                    let q = _mm256_set1_epi32(unsafe { *qp.add(h * pairs + p) });
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(k, q));
                }
            }
            let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
            for (a, &s) in acc.into_iter().zip(qscales) {
                best = _mm256_max_ps(best, _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s)));
            }
            // SAFETY: `start + 8 <= n <= kscales.len()`, and `out.len() == n`.
            unsafe {
                let ks = _mm256_loadu_ps(kscales.as_ptr().add(start));
                _mm256_storeu_ps(out.as_mut_ptr().add(start), _mm256_mul_ps(best, ks));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Largest group the SIMD scan kernels handle.
    const SCAN_GROUP: usize = 8;

    #[test]
    fn every_scan_kernel_scores_bit_for_bit_as_the_reference() {
        let mut rng = StdRng::seed_from_u64(0x5CA1);
        for stride in [32, 64, 96, 256] {
            let pairs = stride / 2;
            for g in [1, 2, 3, 4, 5, SCAN_GROUP, SCAN_GROUP + 1] {
                for blocks in [0, 1, 2, 9] {
                    let n = blocks * SCAN_BLOCK;
                    let codes: Vec<i8> = (0..n * stride).map(|_| rng.random_range(-127..=127)).collect();
                    let ks: Vec<f32> = (0..n).map(|_| rng.random_range(1e-3..1.0)).collect();
                    let q: Vec<i16> = (0..g * stride).map(|_| rng.random_range(-8191..=8191)).collect();
                    let qs: Vec<f32> = (0..g).map(|_| rng.random_range(1e-4..1e-2)).collect();
                    let qpairs: Vec<i32> =
                        q.chunks_exact(2).map(|c| (c[0] as u16 as u32 | ((c[1] as u16 as u32) << 16)) as i32).collect();
                    assert_eq!(qpairs.len(), g * pairs);
                    let mut want = vec![0f32; n];
                    scan_scalar(&codes, stride, &ks, &qpairs, &qs, &mut want);
                    // The reference against plain row dots: key `i`'s codes gathered from its block.
                    for i in 0..n {
                        let block = &codes[(i / SCAN_BLOCK) * SCAN_BLOCK * stride..];
                        let row: Vec<i8> = (0..stride)
                            .map(|d| block[(d / 2) * 2 * SCAN_BLOCK + (i % SCAN_BLOCK) * 2 + d % 2])
                            .collect();
                        let mut dots = vec![0i32; g];
                        dots_scalar(&row, &q, &mut dots);
                        let best = dots.iter().zip(&qs).fold(f32::NEG_INFINITY, |b, (&d, &s)| b.max(d as f32 * s));
                        assert_eq!((best * ks[i]).to_bits(), want[i].to_bits(), "reference, key {i}");
                    }
                    for level in Level::all_available() {
                        let mut got = vec![f32::NAN; n];
                        scan_kernel(level, g)(&codes, stride, &ks, &qpairs, &qs, &mut got);
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{level:?}, stride {stride}, group {g}, {n} keys");
                    }
                }
            }
        }
    }

    #[test]
    fn every_level_matches_the_scalar_reference_on_random_codes() {
        let mut rng = StdRng::seed_from_u64(0xC0DE);
        let levels = Level::all_available();
        assert!(levels.contains(&Level::Scalar));
        for stride in [32, 64, 96, 128, 256, MAX_DIM] {
            for g in [1, 3, 8, 9, 17] {
                let key: Vec<i8> = (0..stride).map(|_| rng.random_range(-127..=127)).collect();
                let q: Vec<i16> = (0..stride * g).map(|_| rng.random_range(-8191..=8191)).collect();
                // The reference in i64, so an overflow of the i32 kernels would show.
                let want: Vec<i64> = (0..g)
                    .map(|h| key.iter().zip(&q[h * stride..]).map(|(&k, &q)| k as i64 * q as i64).sum())
                    .collect();
                for &level in &levels {
                    let mut got = vec![0i32; g];
                    kernel(level)(&key, &q, &mut got);
                    let got: Vec<i64> = got.into_iter().map(i64::from).collect();
                    assert_eq!(got, want, "{level:?}, stride {stride}, {g} queries");
                }
            }
        }
        // Extremes: every product at its largest magnitude, both signs.
        for &level in &levels {
            let key = vec![-127i8; MAX_DIM];
            let q = vec![8191i16; MAX_DIM];
            let mut got = [0i32];
            kernel(level)(&key, &q, &mut got);
            assert_eq!(got[0] as i64, -127 * 8191 * MAX_DIM as i64, "{level:?}");
        }
    }
}
