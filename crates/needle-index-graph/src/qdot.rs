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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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
