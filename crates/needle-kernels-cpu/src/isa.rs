//! Run-time instruction-set selection.

use std::sync::OnceLock;

/// An instruction set a kernel can run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar code: the reference.
    Scalar,
    /// x86-64 AVX2 + FMA (+ F16C for half-precision conversion).
    Avx2,
}

impl Isa {
    /// The best instruction set of this machine, detected once and cached.
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| if Isa::Avx2.available() { Isa::Avx2 } else { Isa::Scalar })
    }

    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_available(),
        }
    }

    /// Every instruction set this machine can run, scalar first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2].into_iter().filter(|i| i.available()).collect()
    }

    /// `self` if available, else scalar: what a `*_with` kernel actually runs.
    pub(crate) fn effective(self) -> Isa {
        if self.available() { self } else { Isa::Scalar }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}
