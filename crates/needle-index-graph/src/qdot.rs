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

/// A scan kernel: `out[i] = max_h (⟨key i, query h⟩ as f32 · qscales[h]) · kscales[i]` for the
/// `out.len()` key rows of `keys` (`stride` codes each), against `qscales.len()` queries (rows of
/// `queries`): the group score of the walk for every row of a block, computed with the same
/// float operations in the same order, so a scan ranks exactly as the walk would score.
pub(crate) type ScanFn =
    fn(keys: &[i8], stride: usize, kscales: &[f32], queries: &[i16], qscales: &[f32], out: &mut [f32]);

/// The scan kernel of `level` (the reference, [`scan_scalar`], where none is faster: other
/// levels, or groups of more than four queries, which would not fit the registers).
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

/// The reference scan: one row at a time, plain integer sums.
pub(crate) fn scan_scalar(
    keys: &[i8],
    stride: usize,
    kscales: &[f32],
    queries: &[i16],
    qscales: &[f32],
    out: &mut [f32],
) {
    let mut dots = vec![0i32; qscales.len()];
    for (i, o) in out.iter_mut().enumerate() {
        dots_scalar(&keys[i * stride..(i + 1) * stride], queries, &mut dots);
        let best = dots.iter().zip(qscales).fold(f32::NEG_INFINITY, |b, (&d, &s)| b.max(d as f32 * s));
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

    // The scan bodies score four keys at a time: each key's products accumulate in its own
    // vector per query, and the four vectors are summed across lanes together (two
    // unpack-and-add rounds leave each 128-bit block holding the four keys' partial sums), a
    // few instructions a key instead of a full horizontal sum each.

    /// Four keys' per-lane sums, one vector each, to their four totals.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn reduce4_512(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        let abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        let y = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64::<1>(abcd));
        _mm_add_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256::<1>(y))
    }

    #[target_feature(enable = "avx2")]
    fn reduce4_256(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
        let ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
        let abcd = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
        _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256::<1>(abcd))
    }

    /// The scores of four keys from their totals per query: `max_h (t_h as f32 · qs_h) · ks`.
    #[target_feature(enable = "avx2")]
    fn scores4<const G: usize>(totals: [__m128i; G], qscales: &[f32], kscales: __m128) -> __m128 {
        let mut best = _mm_set1_ps(f32::NEG_INFINITY);
        for (t, &s) in totals.into_iter().zip(qscales) {
            best = _mm_max_ps(best, _mm_mul_ps(_mm_cvtepi32_ps(t), _mm_set1_ps(s)));
        }
        _mm_mul_ps(best, kscales)
    }

    macro_rules! scan_body {
        ($name:ident, $features:literal, $vec:ty, $zero:expr, $step:expr, $widen:expr, $acc:expr, $reduce:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const G: usize>(
                keys: &[i8],
                stride: usize,
                kscales: &[f32],
                queries: &[i16],
                qscales: &[f32],
                out: &mut [f32],
            ) {
                let n = out.len();
                assert!(
                    stride.is_multiple_of($step)
                        && keys.len() >= n * stride
                        && kscales.len() >= n
                        && queries.len() >= G * stride
                        && qscales.len() == G
                );
                let (kp, qp) = (keys.as_ptr(), queries.as_ptr());
                let mut i = 0;
                while i + 4 <= n {
                    let mut acc: [[$vec; 4]; G] = [[$zero; 4]; G];
                    let mut d = 0;
                    while d < stride {
                        for j in 0..4 {
                            // SAFETY: `(i + j) * stride + d + $step <= n * stride <= keys.len()`.
                            let k = unsafe { $widen(kp.add((i + j) * stride + d)) };
                            for (h, a) in acc.iter_mut().enumerate() {
                                // SAFETY: `h * stride + d + $step <= G * stride <= queries.len()`.
                                let q = unsafe { (qp.add(h * stride + d) as *const $vec).read_unaligned() };
                                a[j] = $acc(a[j], k, q);
                            }
                        }
                        d += $step;
                    }
                    let totals: [__m128i; G] =
                        std::array::from_fn(|h| $reduce(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
                    // SAFETY: `i + 4 <= n <= kscales.len()`, and `out.len() == n`.
                    let ks = unsafe { _mm_loadu_ps(kscales.as_ptr().add(i)) };
                    unsafe { _mm_storeu_ps(out.as_mut_ptr().add(i), scores4::<G>(totals, qscales, ks)) };
                    i += 4;
                }
                if i < n {
                    super::scan_scalar(&keys[i * stride..], stride, &kscales[i..], queries, qscales, &mut out[i..]);
                }
            }
        };
    }

    scan_body!(
        scan_vnni,
        "avx512f,avx512bw,avx512vnni",
        __m512i,
        _mm512_setzero_si512(),
        32,
        |p: *const i8| _mm512_cvtepi8_epi16((p as *const __m256i).read_unaligned()),
        |a, k, q| _mm512_dpwssd_epi32(a, k, q),
        reduce4_512
    );
    scan_body!(
        scan_avx512,
        "avx512f,avx512bw",
        __m512i,
        _mm512_setzero_si512(),
        32,
        |p: *const i8| _mm512_cvtepi8_epi16((p as *const __m256i).read_unaligned()),
        |a, k, q| _mm512_add_epi32(a, _mm512_madd_epi16(k, q)),
        reduce4_512
    );
    scan_body!(
        scan_avx2,
        "avx2",
        __m256i,
        _mm256_setzero_si256(),
        16,
        |p: *const i8| _mm256_cvtepi8_epi16((p as *const __m128i).read_unaligned()),
        |a, k, q| _mm256_add_epi32(a, _mm256_madd_epi16(k, q)),
        reduce4_256
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Largest group the SIMD scan kernels keep in registers.
    const SCAN_GROUP: usize = 4;

    #[test]
    fn every_scan_kernel_scores_bit_for_bit_as_the_reference() {
        let mut rng = StdRng::seed_from_u64(0x5CA1);
        for stride in [32, 64, 96, 256] {
            for g in 1..=SCAN_GROUP + 1 {
                for n in [0, 1, 3, 4, 7, 64, 133] {
                    let keys: Vec<i8> = (0..n * stride).map(|_| rng.random_range(-127..=127)).collect();
                    let ks: Vec<f32> = (0..n).map(|_| rng.random_range(1e-3..1.0)).collect();
                    let q: Vec<i16> = (0..g * stride).map(|_| rng.random_range(-8191..=8191)).collect();
                    let qs: Vec<f32> = (0..g).map(|_| rng.random_range(1e-4..1e-2)).collect();
                    let mut want = vec![0f32; n];
                    scan_scalar(&keys, stride, &ks, &q, &qs, &mut want);
                    for level in Level::all_available() {
                        let mut got = vec![f32::NAN; n];
                        scan_kernel(level, g)(&keys, stride, &ks, &q, &qs, &mut got);
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
