//! Run-time instruction-set selection.

use std::sync::OnceLock;

/// An instruction set a kernel can run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable scalar code: the reference.
    Scalar,
    /// x86-64 AVX2 + FMA (+ F16C for half-precision conversion).
    Avx2,
    /// x86-64 AVX-512 F + BW on top of [`Isa::Avx2`]. Only the Q8_0/Q4_0/Q4_1 single-row dots
    /// and decode attention ([`crate::attend_rows`]) have AVX-512 code; every other kernel runs
    /// its AVX2 code under this ISA. Opt-in through the
    /// `*_with` kernels: [`Isa::detect`] does not pick it, as it measured 10–30 % slower than the
    /// AVX2 code on the one AVX-512 machine tried (gemv 1536×576 Q4_1: 88 µs vs 76 µs).
    Avx512,
    /// [`Isa::Avx2`] plus `vpdpbusd` on 256-bit registers, from AVX-VNNI or from AVX512-VNNI with
    /// AVX512-VL (AMD Zen 4 and Intel's AVX-512 server cores have only the latter): the Q8_0 /
    /// Q4_0 / Q4_1 / Q5_0 / Q5_1 row and multi-row dots (the decode GEMV's lane kernels) and the
    /// Q4_0 / Q4_1 / Q5_0 / Q5_1 multi-token GEMM micro-kernel do each block's integer dot in
    /// one instruction instead of two; decode attention runs its AVX-512 body where AVX-512 F is
    /// there (every AVX512-VNNI machine); everything else runs the AVX2 code. Picked by
    /// [`Isa::detect`] where present.
    AvxVnni,
    /// aarch64 NEON (Advanced SIMD, part of every aarch64 CPU). The Q8_0 / Q4_0 / Q4_1 dots and
    /// their multi-token GEMM micro-kernel, the F32 / F16 / BF16 row dots, [`crate::attend_rows`]
    /// and [`crate::flash_prefill`] have NEON code; the K-quant dots (Q4_K, Q5_K, Q6_K) and the
    /// small [`crate::ops`] run their scalar code (which the compiler vectorizes for NEON anyway).
    Neon,
    /// [`Isa::Neon`] plus the `dotprod` extension (`sdot`, Armv8.2+ and most Armv8 server and
    /// phone cores): the Q8_0 / Q4_0 / Q4_1 block dots take one instruction per 16 byte pairs
    /// instead of a widening multiply and a pairwise add; everything else runs the NEON code.
    /// Picked by [`Isa::detect`] where present.
    NeonDot,
}

impl Isa {
    /// The instruction set the kernels use by default here (x86-64: AVX-VNNI, else AVX2; aarch64:
    /// NEON with dotprod, else NEON; else scalar), detected once and cached.
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::AvxVnni, Isa::Avx2, Isa::NeonDot, Isa::Neon]
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_available(),
            Isa::Avx512 => avx2_available() && avx512_available(),
            Isa::AvxVnni => avx2_available() && avxvnni_available(),
            Isa::Neon => neon_available(),
            Isa::NeonDot => neon_available() && dotprod_available(),
        }
    }

    /// Every instruction set this machine can run, scalar first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::AvxVnni, Isa::Neon, Isa::NeonDot]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }

    /// `self` if available, else scalar: what a `*_with` kernel actually runs.
    pub(crate) fn effective(self) -> Isa {
        if self.available() { self } else { Isa::Scalar }
    }

    /// Whether the AVX2 code may run (true for AVX-512 too), after [`effective`](Self::effective).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn has_avx2(self) -> bool {
        matches!(self.effective(), Isa::Avx2 | Isa::Avx512 | Isa::AvxVnni)
    }

    /// Whether AVX-512 F code may run (after [`effective`](Self::effective)): under
    /// [`Isa::Avx512`], and under [`Isa::AvxVnni`] where the machine has AVX-512 F and BW (as
    /// every AVX512-VNNI machine has). Decode attention ([`crate::attend_rows`]) has such code.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn has_avx512f(self) -> bool {
        matches!(self.effective(), Isa::Avx512 | Isa::AvxVnni) && avx512_available()
    }

    /// Whether the NEON code may run (true for [`Isa::NeonDot`] too), after
    /// [`effective`](Self::effective).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn has_neon(self) -> bool {
        matches!(self.effective(), Isa::Neon | Isa::NeonDot)
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(target_arch = "x86_64")]
fn avxvnni_available() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
        || (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl"))
}

#[cfg(not(target_arch = "x86_64"))]
fn avxvnni_available() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

#[cfg(target_arch = "aarch64")]
fn neon_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

#[cfg(target_arch = "aarch64")]
fn dotprod_available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

#[cfg(not(target_arch = "aarch64"))]
fn neon_available() -> bool {
    false
}

#[cfg(not(target_arch = "aarch64"))]
fn dotprod_available() -> bool {
    false
}
