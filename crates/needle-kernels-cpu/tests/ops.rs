//! rms_norm / rope / silu_mul / gelu_mul against plain f64 references, on every ISA.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_kernels_cpu::ops::*;
use needle_kernels_cpu::{Error, Isa};

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(*g) - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut r = rng(6);
    for n in [576, 37, 8] {
        let rows = 5;
        let x = randn(&mut r, rows * n);
        let w = randn(&mut r, n);
        let mut want = vec![0f64; x.len()];
        for (xr, wr) in x.chunks(n).zip(want.chunks_mut(n)) {
            let ms = xr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for ((o, v), g) in wr.iter_mut().zip(xr).zip(&w) {
                *o = f64::from(*v) * inv * f64::from(*g);
            }
        }
        for isa in Isa::all_available() {
            let mut out = vec![f32::NAN; x.len()];
            rms_norm_with(isa, &x, &w, 1e-5, &mut out).unwrap();
            close(&out, &want, 1e-5, &format!("rms_norm {isa:?} n {n}"));
        }
    }
    assert!(matches!(rms_norm(&[0.0; 10], &[1.0; 3], 1e-5, &mut [0.0; 10]), Err(Error::Invalid { param: "x", .. })));
    assert!(matches!(rms_norm(&[0.0; 9], &[1.0; 3], 1e-5, &mut [0.0; 6]), Err(Error::Len { param: "out", .. })));
}

#[test]
fn rope_matches_reference() {
    let mut r = rng(7);
    let (heads, dim, t, pos0) = (3, 64, 5, 11);
    let (cos, sin) = rope_tables(10000.0, dim, 100);
    let x = randn(&mut r, t * heads * dim);
    let mut want = vec![0f64; x.len()];
    for i in 0..t {
        let p = (pos0 + i) as f64;
        for h in 0..heads {
            let b = (i * heads + h) * dim;
            for j in 0..dim / 2 {
                let a = p * 10000f64.powf(-2.0 * j as f64 / dim as f64);
                let (u, v) = (f64::from(x[b + j]), f64::from(x[b + j + dim / 2]));
                want[b + j] = u * a.cos() - v * a.sin();
                want[b + j + dim / 2] = v * a.cos() + u * a.sin();
            }
        }
    }
    for isa in Isa::all_available() {
        let mut y = x.clone();
        rope_with(isa, &mut y, heads, dim, pos0, &cos, &sin).unwrap();
        close(&y, &want, 1e-5, &format!("rope {isa:?}"));
    }
    let mut y = x.clone();
    assert!(matches!(rope(&mut y, heads, dim, 96, &cos, &sin), Err(Error::Len { param: "cos", .. })));
    assert!(matches!(rope(&mut y, heads, 63, 0, &cos, &sin), Err(Error::Invalid { param: "dim", .. })));
}

#[test]
fn silu_mul_matches_reference() {
    let mut r = rng(8);
    let mut g = randn(&mut r, 1537);
    // Far tails: e^(−g) under- and overflows there.
    g[..6].copy_from_slice(&[30.0, -30.0, 95.0, -95.0, 200.0, -200.0]);
    let u = randn(&mut r, 1537);
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(a, b)| {
            let a = f64::from(*a);
            a / (1.0 + (-a).exp()) * f64::from(*b)
        })
        .collect();
    for isa in Isa::all_available() {
        let mut y = g.clone();
        silu_mul_with(isa, &mut y, &u).unwrap();
        close(&y, &want, 1e-6, &format!("silu_mul {isa:?}"));
    }
    assert!(matches!(silu_mul(&mut [0.0; 3], &[0.0; 2]), Err(Error::Len { param: "up", .. })));
}

#[test]
fn gelu_mul_matches_the_tanh_form_in_f64() {
    let mut r = rng(9);
    // Rows of a batch (the pool splits them), with far tails where the exponential saturates.
    let mut g: Vec<f32> = randn(&mut r, 4 * 2048).iter().map(|v| 3.0 * v).collect();
    g[..6].copy_from_slice(&[30.0, -30.0, 95.0, -95.0, 200.0, -200.0]);
    let u = randn(&mut r, g.len());
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(a, b)| {
            let x = f64::from(*a);
            let v = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + v.tanh()) * f64::from(*b)
        })
        .collect();
    for isa in Isa::all_available() {
        let mut y = g.clone();
        gelu_mul_with(isa, &mut y, &u).unwrap();
        close(&y, &want, 1e-6, &format!("gelu_mul {isa:?}"));
    }
    let mut y = g.clone();
    gelu_mul(&mut y, &u).unwrap();
    close(&y, &want, 1e-6, "gelu_mul on the pool");
    assert!(matches!(gelu_mul(&mut [0.0; 3], &[0.0; 2]), Err(Error::Len { param: "up", .. })));
}
