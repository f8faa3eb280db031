//! The plain prefill tile loop: the reference the vector code is tested against, and the code
//! for head dims that are not a whole number of vectors (compiled with AVX2 enabled there).

use std::ops::Range;

use super::{Job, KvElem, TILE_K, axpy, exp_approx, key_tiles};

impl<T: KvElem> Job<'_, '_, '_, T> {
    /// # Safety
    /// Needs avx2 and fma.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        self.run_dims(i0, nq, g, spans)
    }

    /// Head dims 64 and 128 get loops of constant length; any other dim runs the general code.
    #[inline(always)]
    pub(super) fn run_dims(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        match self.dim {
            64 => self.body::<64>(i0, nq, g, spans),
            128 => self.body::<128>(i0, nq, g, spans),
            _ => self.body::<0>(i0, nq, g, spans),
        }
    }

    /// `D` is the head dim, or 0 for "read it from `self.dim`".
    #[inline(always)]
    fn body<const D: usize>(&self, i0: usize, nq: usize, g: usize, spans: &[Range<usize>]) -> Vec<f32> {
        let dim = if D == 0 { self.dim } else { D };
        let group = self.group;
        let nrows = nq * group;
        let mut m = vec![f32::NEG_INFINITY; nrows];
        let mut l = vec![0f32; nrows];
        let mut acc = vec![0f32; nrows * dim];
        // The key tile transposed (dim × TILE_K): scores of a query row against the whole tile
        // are then plain vector FMAs, no horizontal sums.
        let mut kt = vec![0f32; dim * TILE_K];
        let mut s = [0f32; TILE_K];
        let (kp, vp) = (&self.keys[g], &self.values[g]);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k0, n) in key_tiles(spans, kp.page_rows, vp.page_rows) {
            let ktile = T::as_f32(kp.rows(k0, n), &mut ks);
            let vt = T::as_f32(vp.rows(k0, n), &mut vs);
            for (j, kr) in ktile.chunks_exact(dim).enumerate() {
                for (d, v) in kr.iter().enumerate() {
                    kt[d * TILE_K + j] = *v;
                }
            }
            for i in 0..nq {
                let pos = self.pos0 + i0 + i;
                if k0 > pos {
                    continue;
                }
                let nv = n.min(pos + 1 - k0);
                for j in 0..group {
                    let h = g * group + j;
                    let qr = &self.q[((i0 + i) * self.n_q_heads + h) * dim..][..dim];
                    let r = i * group + j;
                    s.fill(0.0);
                    for (qd, ktd) in qr.iter().zip(kt.chunks_exact(TILE_K)) {
                        let qd = qd * self.scale;
                        for (sv, kv) in s.iter_mut().zip(ktd) {
                            *sv += qd * kv;
                        }
                    }
                    let mt = s[..nv].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let ar = &mut acc[r * dim..(r + 1) * dim];
                    if mt > m[r] {
                        let c = (m[r] - mt).exp();
                        l[r] *= c;
                        ar.iter_mut().for_each(|a| *a *= c);
                        m[r] = mt;
                    }
                    let mr = m[r];
                    for sv in s.iter_mut() {
                        *sv = exp_approx(*sv - mr);
                    }
                    l[r] += s[..nv].iter().sum::<f32>();
                    for (p, vr) in s[..nv].iter().zip(vt.chunks_exact(dim)) {
                        axpy(*p, vr, ar);
                    }
                }
            }
        }
        for (ar, &lr) in acc.chunks_exact_mut(dim).zip(&l) {
            let inv = 1.0 / lr;
            ar.iter_mut().for_each(|a| *a *= inv);
        }
        acc
    }
}
