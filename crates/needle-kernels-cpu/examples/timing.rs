//! Quick gemv timing that is robust on a loaded machine: the minimum over many calls.
//! `cargo run --release -p needle-kernels-cpu --example timing [threads]`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use needle_kernels_cpu::{Isa, QMatrix, QuantType};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn min_us(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64() * 1e6);
    }
    best
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    println!("isa {:?}, {threads} thread(s); min µs over repeated calls", Isa::detect());
    for (rows, cols) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let reps = if rows > 10000 { 30 } else { 300 };
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1f32..1.0)).collect();
        let mut y = vec![0f32; rows];
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1f32..1.0)).collect();
        let naive = min_us(reps, || {
            for (yr, wr) in y.iter_mut().zip(wf.chunks_exact(cols)) {
                *yr = wr.iter().zip(black_box(&x)).map(|(a, b)| a * b).sum();
            }
        });
        print!("{rows}x{cols}: naive f32 {naive:.1}");
        for ty in [QuantType::Q4_1, QuantType::Q4_0, QuantType::Q8_0, QuantType::F16, QuantType::Q4_K, QuantType::Q6_K]
        {
            if !cols.is_multiple_of(ty.block_elems()) {
                continue;
            }
            let mut w: Vec<u8> = (0..rows * ty.bytes_for("cols", cols).unwrap()).map(|_| rng.random()).collect();
            if ty == QuantType::F16 {
                w = (0..rows * cols)
                    .flat_map(|_| half::f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
                    .collect();
            }
            let m = QMatrix::new(ty, rows, cols, &w).unwrap();
            print!(" | {ty:?}");
            for isa in Isa::all_available().into_iter().rev() {
                let r = if isa == Isa::Scalar { reps / 10 + 1 } else { reps };
                let us = pool.install(|| min_us(r, || m.gemv_with(isa, black_box(&x), &mut y).unwrap()));
                print!(" {isa:?} {us:.1}");
            }
        }
        println!();
    }
    let (rows, cols, t) = (1536usize, 576usize, 64usize);
    let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-1f32..1.0)).collect();
    let mut y = vec![0f32; t * rows];
    for ty in [QuantType::Q4_1, QuantType::Q8_0] {
        let w: Vec<u8> = (0..rows * ty.bytes_for("cols", cols).unwrap()).map(|_| rng.random()).collect();
        let m = QMatrix::new(ty, rows, cols, &w).unwrap();
        let g = pool.install(|| min_us(20, || m.gemm(black_box(&x), t, &mut y).unwrap()));
        let v = pool.install(|| {
            min_us(20, || {
                for tok in 0..t {
                    m.gemv(&x[tok * cols..(tok + 1) * cols], &mut y[tok * rows..(tok + 1) * rows]).unwrap();
                }
            })
        });
        println!("gemm t={t} {ty:?} {rows}x{cols}: {g:.0} µs (t gemv calls: {v:.0} µs)");
    }
}
