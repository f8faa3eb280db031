//! Small fused decoder ops: RMSNorm, rotate-half RoPE, SiLU(gate)·up.
//!
//! These are memory-bound single passes written so LLVM vectorizes them; the `*_with` variants
//! compile the same loops under AVX2+FMA when that ISA is picked.

use crate::{Error, Isa, Result, check_len};

macro_rules! dispatch {
    ($isa:expr, $generic:ident, $avx2:ident, ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if $isa.has_avx2() {
            // SAFETY: `has_avx2()` means avx2 and fma were detected on this CPU.
            unsafe { $avx2($($arg),*) };
            return Ok(());
        }
        let _ = $isa;
        $generic($($arg),*)
    }};
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w` for each row `r` of `x` (rows of `w.len()`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    rms_norm_with(Isa::detect(), x, w, eps, out)
}

/// [`rms_norm`] on a given ISA.
pub fn rms_norm_with(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    if w.is_empty() || !x.len().is_multiple_of(w.len()) {
        return Err(Error::Invalid {
            param: "x",
            why: format!("length {} is not rows × w.len() = {}", x.len(), w.len()),
        });
    }
    check_len("out", out.len(), x.len())?;
    dispatch!(isa, rms_norm_generic, rms_norm_avx2, (x, w, eps, out));
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_generic(x, w, eps, out)
}

#[inline(always)]
fn rms_norm_generic(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut lanes = [0f32; 8];
        let c = xr.chunks_exact(8);
        let rem = c.remainder();
        for v in c {
            for k in 0..8 {
                lanes[k] += v[k] * v[k];
            }
        }
        let ss = lanes.iter().sum::<f32>() + rem.iter().map(|v| v * v).sum::<f32>();
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// cos/sin tables for [`rope`]: `n_pos × dim/2` each, angle `pos · theta^(−2j/dim)`.
pub fn rope_tables(theta: f32, dim: usize, n_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = dim / 2;
    let inv: Vec<f64> = (0..half).map(|j| f64::from(theta).powf(-2.0 * j as f64 / dim as f64)).collect();
    let mut cos = Vec::with_capacity(n_pos * half);
    let mut sin = Vec::with_capacity(n_pos * half);
    for p in 0..n_pos {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE in place on `x` = `t × heads × dim` for positions `pos0..pos0 + t`:
/// `(x₁, x₂) ← (x₁·cos − x₂·sin, x₂·cos + x₁·sin)` with `x₁ = x[..dim/2]`, `x₂ = x[dim/2..]`.
/// `cos`/`sin` are `n_pos × dim/2` (see [`rope_tables`]) with `n_pos ≥ pos0 + t`.
pub fn rope(x: &mut [f32], heads: usize, dim: usize, pos0: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
    rope_with(Isa::detect(), x, heads, dim, pos0, cos, sin)
}

/// [`rope`] on a given ISA.
pub fn rope_with(
    isa: Isa,
    x: &mut [f32],
    heads: usize,
    dim: usize,
    pos0: usize,
    cos: &[f32],
    sin: &[f32],
) -> Result<()> {
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::Invalid { param: "dim", why: format!("{dim} is not a positive even number") });
    }
    let row = heads * dim;
    if row == 0 || !x.len().is_multiple_of(row) {
        return Err(Error::Invalid { param: "x", why: format!("length {} is not t × heads × dim", x.len()) });
    }
    let t = x.len() / row;
    let need = (pos0 + t) * (dim / 2);
    if cos.len() < need {
        return Err(Error::Len { param: "cos", got: cos.len(), expected: need });
    }
    check_len("sin", sin.len(), cos.len())?;
    dispatch!(isa, rope_generic, rope_avx2, (x, heads, dim, pos0, cos, sin));
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_avx2(x: &mut [f32], heads: usize, dim: usize, pos0: usize, cos: &[f32], sin: &[f32]) {
    rope_generic(x, heads, dim, pos0, cos, sin)
}

#[inline(always)]
fn rope_generic(x: &mut [f32], heads: usize, dim: usize, pos0: usize, cos: &[f32], sin: &[f32]) {
    let half = dim / 2;
    for (i, tok) in x.chunks_exact_mut(heads * dim).enumerate() {
        let c = &cos[(pos0 + i) * half..(pos0 + i + 1) * half];
        let s = &sin[(pos0 + i) * half..(pos0 + i + 1) * half];
        for head in tok.chunks_exact_mut(dim) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), c), s) in x1.iter_mut().zip(x2.iter_mut()).zip(c).zip(s) {
                let (u, v) = (*a, *b);
                *a = u * c - v * s;
                *b = v * c + u * s;
            }
        }
    }
}

/// `gate ← silu(gate) ⊙ up`, with `silu(g) = g / (1 + e^(−g))` (the exponential the attention
/// kernels' softmax uses: it vectorizes, where a library `expf` is one call per element).
/// A batch's gate (several rows) is split over the kernels' [`Pool`](crate::Pool): each element's
/// arithmetic is the same wherever it runs, so the split does not change a bit.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    on_pool(gate, up, silu_mul_with)
}

/// [`silu_mul`] on a given ISA.
pub fn silu_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) -> Result<()> {
    check_len("up", up.len(), gate.len())?;
    dispatch!(isa, silu_mul_generic, silu_mul_avx2, (gate, up));
    Ok(())
}

/// `gate ← gelu(gate) ⊙ up` (GeGLU), GELU in its tanh form
/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (ggml's `gelu`, Gemma's), computed as
/// `x / (1 + e^(−2v))` with `v` the tanh's argument (the same function: `(1 + tanh v)/2 = σ(2v)`)
/// and the vectorizing exponential of [`silu_mul`], where a library `tanhf` is one call per
/// element. Split over the pool as [`silu_mul`] is.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    on_pool(gate, up, gelu_mul_with)
}

/// [`gelu_mul`] on a given ISA.
pub fn gelu_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) -> Result<()> {
    check_len("up", up.len(), gate.len())?;
    dispatch!(isa, gelu_mul_generic, gelu_mul_avx2, (gate, up));
    Ok(())
}

/// Below this many elements an element-wise op runs on the calling thread (a one-token gate).
const PAR_MIN_ELEMENTWISE: usize = 4096;

/// `op` over `gate` and `up`, split by element over the pool from [`PAR_MIN_ELEMENTWISE`] on.
fn on_pool(gate: &mut [f32], up: &[f32], op: fn(Isa, &mut [f32], &[f32]) -> Result<()>) -> Result<()> {
    let isa = Isa::detect();
    if gate.len() < PAR_MIN_ELEMENTWISE {
        return op(isa, gate, up);
    }
    check_len("up", up.len(), gate.len())?;
    let pool = crate::Pool::global();
    let part = gate.len().div_ceil(pool.threads()).next_multiple_of(16);
    let mut parts: Vec<&mut [f32]> = gate.chunks_mut(part).collect();
    pool.map_mut(&mut parts, |i, g| op(isa, g, &up[i * part..i * part + g.len()])).into_iter().collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_generic(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    gelu_mul_generic(gate, up)
}

#[inline(always)]
fn gelu_mul_generic(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let v = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        *g = x / (1.0 + crate::attn::exp_approx(-2.0 * v)) * u;
    }
}

#[inline(always)]
fn silu_mul_generic(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + crate::attn::exp_approx(-*g)) * u;
    }
}
