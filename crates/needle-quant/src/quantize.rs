//! Weight quantizers: f32 rows into ggml blocks (F32, F16, Q8_0, Q4_0, Q5_0, Q5_1, IQ4_NL, Q4_K),
//! the inverse of [`dequantize_row`](crate::dequantize_row).
//!
//! They are plain round-to-nearest quantizers, for weights made in memory (random models of a
//! real shape for benchmarks and tests), not llama.cpp's error-minimising searches: a Q4_K row
//! here has the right layout and the usual bound (half a step per element), not the best
//! scales. Q5_0 and Q5_1 follow ggml's `quantize_row_q5_{0,1}_ref` step for step (same bytes);
//! IQ4_NL follows ggml's `quantize_iq4_nl` without an importance matrix (what llama-quantize
//! runs: a scale search weighted by x², seven tries either side), not the cheaper
//! `quantize_row_iq4_nl_ref` (one least-squares fit, no search); its bytes may differ from
//! ggml's where the C compiler contracts a sum into an FMA.

use half::f16;

use crate::{Error, IQ4_NL_VALUES, QuantType, Result};

/// Quantizes `x` (whole blocks of `ty`) into `out` (`ty.bytes_for(x.len())` bytes).
pub fn quantize_row(ty: QuantType, x: &[f32], out: &mut [u8]) -> Result<()> {
    let nb = ty.bytes_for("x.len()", x.len())?;
    crate::check_len("out", out.len(), nb)?;
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let f: fn(&[f32], &mut [u8]) = match ty {
        QuantType::F32 => |x, o| o.copy_from_slice(&x[0].to_le_bytes()),
        QuantType::F16 => |x, o| o.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        QuantType::Q8_0 => q8_0_block,
        QuantType::Q4_0 => q4_0_block,
        QuantType::Q5_0 => q5_0_block,
        QuantType::Q5_1 => q5_1_block,
        QuantType::IQ4_NL => iq4_nl_block,
        QuantType::Q4_K => q4_k_block,
        other => {
            return Err(Error::Invalid {
                param: "ty",
                why: format!("no quantizer for {other:?} (there are: F32, F16, Q8_0, Q4_0, Q5_0, Q5_1, IQ4_NL, Q4_K)"),
            });
        }
    };
    for (xb, ob) in x.chunks_exact(be).zip(out.chunks_exact_mut(bb)) {
        f(xb, ob);
    }
    Ok(())
}

/// Whether [`quantize_row`] handles `ty`.
pub fn can_quantize(ty: QuantType) -> bool {
    matches!(
        ty,
        QuantType::F32
            | QuantType::F16
            | QuantType::Q8_0
            | QuantType::Q4_0
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::IQ4_NL
            | QuantType::Q4_K
    )
}

fn put_f16(o: &mut [u8], at: usize, v: f32) -> f32 {
    let h = f16::from_f32(v);
    o[at..at + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

fn q8_0_block(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = put_f16(o, 0, amax / 127.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in o[2..34].iter_mut().zip(x) {
        *q = (v * id).round().clamp(-127.0, 127.0) as i8 as u8;
    }
}

/// ggml's choice: the element of largest magnitude maps to −8, so its sign sets the scale's.
fn q4_0_block(x: &[f32], o: &mut [u8]) {
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = put_f16(o, 0, max / -8.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| (v * id + 8.5).clamp(0.0, 15.0) as u8;
    for j in 0..16 {
        o[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

/// Packs 32 five-bit values ggml style: low nibbles into `o[4..20]`, bit 4 into the u32 `o[0..4]`.
fn put_q5(q: &[u8; 32], o: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        o[4 + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
        qh |= u32::from(q[j] >> 4) << j;
        qh |= u32::from(q[j + 16] >> 4) << (j + 16);
    }
    o[..4].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's reference: the largest magnitude maps to −16 and the scale's inverse is taken before
/// the f16 rounding; `trunc(v/d + 16.5)` capped at 31.
fn q5_0_block(x: &[f32], o: &mut [u8]) {
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    put_f16(o, 0, d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id + 16.5) as u8).min(31);
    }
    put_q5(&q, &mut o[2..22]);
}

/// ggml's reference: d = (max − min)/31, m = min, `trunc((v − min)/d + 0.5)` capped at 31.
fn q5_1_block(x: &[f32], o: &mut [u8]) {
    let min = x.iter().fold(f32::MAX, |m, &v| m.min(v));
    let max = x.iter().fold(f32::MIN, |m, &v| m.max(v));
    let d = (max - min) / 31.0;
    put_f16(o, 0, d);
    put_f16(o, 2, min);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (((v - min) * id + 0.5) as u8).min(31);
    }
    put_q5(&q, &mut o[4..24]);
}

/// The index of the [`IQ4_NL_VALUES`] entry nearest `v` (ggml's `best_index_int8`: ties go up).
fn iq4_nl_index(v: f32) -> u8 {
    let t = &IQ4_NL_VALUES;
    if v <= f32::from(t[0]) {
        return 0;
    }
    if v >= f32::from(t[15]) {
        return 15;
    }
    let (mut lo, mut hi) = (0usize, 15usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if v < f32::from(t[mid]) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if v - f32::from(t[hi - 1]) < f32::from(t[hi]) - v { (hi - 1) as u8 } else { hi as u8 }
}

/// ggml's `quantize_row_iq4_nl_impl` for one 32-block, `ntry = 7`, no importance weights:
/// nearest table entries for a first scale `max/127`, then 15 trial inverse scales
/// `(t + table[0])/max`, each refitted by weighted least squares (weights x²), keeping the one
/// with the smallest weighted error; the indices are then redone with the kept scale.
fn iq4_nl_block(x: &[f32], o: &mut [u8]) {
    const NTRY: i32 = 7;
    let val = |i: u8| f32::from(IQ4_NL_VALUES[usize::from(i)]);
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let mut d = 0f32;
    if max.abs() >= 1e-15 {
        let fit = |id: f32| {
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for &v in x {
                let (q, w) = (val(iq4_nl_index(id * v)), v * v);
                sumqx += w * q * v;
                sumq2 += w * q * q;
            }
            (sumqx, sumq2)
        };
        let (sumqx, sumq2) = fit(1.0 / (max / 127.0));
        d = sumqx / sumq2;
        let mut best = d * sumqx;
        for t in -NTRY..=NTRY {
            let (sumqx, sumq2) = fit((t as f32 + f32::from(IQ4_NL_VALUES[0])) / max);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
    }
    put_f16(o, 0, d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for j in 0..16 {
        o[2 + j] = iq4_nl_index(id * x[j]) | (iq4_nl_index(id * x[j + 16]) << 4);
    }
}

/// Eight sub-blocks of 32, each `x ≈ d·sc·q − dmin·m` with 6-bit `sc`, `m` and 4-bit `q`.
fn q4_k_block(x: &[f32], o: &mut [u8]) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(0f32, |m, &v| m.min(v));
        let hi = sub.iter().fold(f32::MIN, |m, &v| m.max(v));
        scale[j] = (hi - lo) / 15.0;
        min[j] = -lo;
    }
    let d = put_f16(o, 0, scale.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = put_f16(o, 2, min.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let six = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        // Round the scale up so the sub-block's range still fits 0..=15 steps.
        ls[j] = if d > 0.0 { (scale[j] / d).ceil().clamp(0.0, 63.0) as u8 } else { 0 };
        lm[j] = six(min[j], dmin);
    }
    let s = &mut o[4..16];
    s.fill(0);
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    let qs = &mut o[16..144];
    qs.fill(0);
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let step = d * f32::from(ls[j]);
        let m = dmin * f32::from(lm[j]);
        let id = if step > 0.0 { 1.0 / step } else { 0.0 };
        let (c, high) = (j / 2, j % 2 == 1);
        for (l, &v) in sub.iter().enumerate() {
            let q = ((v + m) * id).round().clamp(0.0, 15.0) as u8;
            qs[32 * c + l] |= if high { q << 4 } else { q };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dequantize_row;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        // A SplitMix64 stream: no rand dependency in this crate.
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Quantize then dequantize; every element within `bound(block)` of its input.
    fn round_trip(ty: QuantType, bound: fn(&[f32]) -> f32) {
        for seed in 0..8 {
            let scale = [1e-3f32, 0.05, 1.0, 30.0][seed as usize % 4];
            let mut x: Vec<f32> = random(1024, seed).iter().map(|v| v * scale).collect();
            if seed == 5 {
                x[..256].fill(0.0);
            }
            let mut bytes = vec![0u8; ty.bytes_for("n", x.len()).unwrap()];
            quantize_row(ty, &x, &mut bytes).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y).unwrap();
            for (xb, yb) in x.chunks(ty.block_elems().max(32)).zip(y.chunks(ty.block_elems().max(32))) {
                let b = bound(xb);
                for (a, r) in xb.iter().zip(yb) {
                    assert!((a - r).abs() <= b, "{ty:?} seed {seed}: {a} → {r}, bound {b}");
                }
            }
        }
    }

    fn amax(x: &[f32]) -> f32 {
        x.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    #[test]
    fn quantizers_invert_the_dequantizer() {
        round_trip(QuantType::F32, |_| 0.0);
        round_trip(QuantType::F16, |x| amax(x) * 1e-3);
        // Half a step, plus the f16 rounding of the scale.
        round_trip(QuantType::Q8_0, |x| amax(x) / 127.0 * 0.51 + amax(x) * 1e-3);
        // A full step at the clamped end opposite the largest magnitude, as in ggml.
        round_trip(QuantType::Q4_0, |x| amax(x) / 8.0 + amax(x) * 2e-3);
        // As Q4_0 with twice the steps.
        round_trip(QuantType::Q5_0, |x| amax(x) / 16.0 + amax(x) * 2e-3);
        // Half a step of range/31, plus the f16 rounding of d (times up to 31) and of the min.
        round_trip(QuantType::Q5_1, |x| amax(x) * 2.0 / 31.0 * 0.5 + amax(x) * 0.04);
        // The widest gap of the table (24 of 127 at the top end) at a scale near amax/127, halved,
        // with room for the fitted scale.
        round_trip(QuantType::IQ4_NL, |x| amax(x) * 0.2);
        // Steps of at most (range/15 rounded up to a 6-bit multiple of d) plus the min's rounding.
        round_trip(QuantType::Q4_K, |x| amax(x) * 2.0 / 15.0 + amax(x) * 0.05);
    }

    #[test]
    fn refuses_other_types_and_bad_lengths() {
        let x = vec![0.5f32; 256];
        let mut out = vec![0u8; 210];
        assert!(matches!(quantize_row(QuantType::Q6_K, &x, &mut out), Err(Error::Invalid { param: "ty", .. })));
        assert!(quantize_row(QuantType::Q8_0, &x[..31], &mut out).is_err());
        assert!(quantize_row(QuantType::Q8_0, &x[..32], &mut out).is_err());
        assert!(!can_quantize(QuantType::Q6_K) && can_quantize(QuantType::Q4_K));
    }
}
