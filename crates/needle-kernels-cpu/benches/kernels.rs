//! gemv per weight type at the decoder's shapes (1 and 2 threads) against a naive f32 loop, gemm
//! at t = 64, and flash prefill. `cargo bench -p needle-kernels-cpu`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use needle_kernels_cpu::attn::KvElem;
use needle_kernels_cpu::{Pages, QMatrix, QuantType, attend_rows, flash_prefill};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn weights(rng: &mut StdRng, ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        QuantType::F32 => (0..n).flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes()).collect(),
        QuantType::F16 => {
            (0..n).flat_map(|_| half::f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes()).collect()
        }
        QuantType::BF16 => {
            (0..n).flat_map(|_| half::bf16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes()).collect()
        }
        _ => {
            let mut b: Vec<u8> = (0..n / ty.block_elems() * ty.block_bytes()).map(|_| rng.random()).collect();
            let offs: &[usize] = match ty {
                QuantType::Q6_K => &[208],
                QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 | QuantType::IQ4_NL => &[0],
                _ => &[0, 2],
            };
            for blk in b.chunks_exact_mut(ty.block_bytes()) {
                for &o in offs {
                    blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                }
            }
            b
        }
    }
}

fn naive_f32(w: &[f32], x: &[f32], y: &mut [f32]) {
    for (yr, wr) in y.iter_mut().zip(w.chunks_exact(x.len())) {
        *yr = wr.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

fn gemv(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [(1536usize, 576usize), (576, 1536), (49152, 576)];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut g = c.benchmark_group(format!("gemv_{threads}t"));
        for (rows, cols) in shapes {
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1f32..1.0)).collect();
            let mut y = vec![0f32; rows];
            let wf: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1f32..1.0)).collect();
            if threads == 1 {
                g.bench_function(format!("naive_f32_{rows}x{cols}"), |b| {
                    b.iter(|| naive_f32(&wf, black_box(&x), &mut y))
                });
            }
            for ty in QuantType::ALL {
                if !cols.is_multiple_of(ty.block_elems())
                    || (rows == 49152 && ty != QuantType::Q4_1 && ty != QuantType::Q8_0)
                {
                    continue;
                }
                let w = weights(&mut rng, ty, rows, cols);
                let m = QMatrix::new(ty, rows, cols, &w).unwrap();
                g.bench_function(format!("{ty:?}_{rows}x{cols}"), |b| {
                    b.iter(|| pool.install(|| m.gemv(black_box(&x), &mut y).unwrap()))
                });
            }
        }
        g.finish();
    }
}

fn gemm(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let t = 64;
    let mut g = c.benchmark_group("gemm_t64");
    for (rows, cols) in [(1536usize, 576usize), (576, 1536)] {
        let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-1f32..1.0)).collect();
        let mut y = vec![0f32; t * rows];
        for ty in [QuantType::Q4_1, QuantType::Q8_0, QuantType::Q4_K, QuantType::Q6_K] {
            if !cols.is_multiple_of(ty.block_elems()) {
                continue;
            }
            let w = weights(&mut rng, ty, rows, cols);
            let m = QMatrix::new(ty, rows, cols, &w).unwrap();
            g.bench_function(format!("{ty:?}_{rows}x{cols}"), |b| b.iter(|| m.gemm(black_box(&x), t, &mut y).unwrap()));
        }
    }
    g.finish();
}

/// `2·hkv` KV heads of `t` random rows in pages of `page_rows`.
fn kv_pages<T>(
    rng: &mut StdRng,
    hkv: usize,
    t: usize,
    page_rows: usize,
    dim: usize,
    conv: fn(f32) -> T,
) -> Vec<Vec<Vec<T>>> {
    (0..2 * hkv)
        .map(|_| {
            (0..t.div_ceil(page_rows))
                .map(|_| (0..page_rows * dim).map(|_| conv(rng.random_range(-1f32..1.0))).collect())
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn bench_prefill<T: KvElem>(
    c: &mut Criterion,
    name: &str,
    q: &[f32],
    kv: &[Vec<Vec<T>>],
    t: usize,
    hq: usize,
    page_rows: usize,
    dim: usize,
) {
    let refs: Vec<Vec<&[T]>> = kv.iter().map(|ps| ps.iter().map(|p| p.as_slice()).collect()).collect();
    let pages: Vec<Pages<'_, T>> = refs.iter().map(|p| Pages { pages: p, page_rows, len: t, dim }).collect();
    let (k, v) = pages.split_at(kv.len() / 2);
    let q = &q[..t * hq * dim];
    let mut out = vec![0f32; q.len()];
    c.bench_function(name, |b| b.iter(|| flash_prefill(black_box(q), k, v, &mut out, 0, hq, 0.125).unwrap()));
}

fn attn(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let (hq, hkv, dim, page_rows) = (9, 3, 64, 256);
    let q: Vec<f32> = (0..2048 * hq * dim).map(|_| rng.random_range(-1f32..1.0)).collect();
    let kv = kv_pages(&mut rng, hkv, 512, page_rows, dim, |x| x);
    bench_prefill(c, "flash_prefill_t512_9x3_d64", &q, &kv, 512, hq, page_rows, dim);
    let kv = kv_pages(&mut rng, hkv, 512, page_rows, dim, half::f16::from_f32);
    bench_prefill(c, "flash_prefill_t512_9x3_d64_f16", &q, &kv, 512, hq, page_rows, dim);
    let kv = kv_pages(&mut rng, hkv, 2048, page_rows, dim, |x| x);
    bench_prefill(c, "flash_prefill_t2048_9x3_d64", &q, &kv, 2048, hq, page_rows, dim);
    // One decode step of one KV head: a group of 3 query heads over 545 gathered rows.
    let (g, m) = (3, 545);
    let rows: Vec<Vec<f32>> = (0..2 * m).map(|_| (0..dim).map(|_| rng.random_range(-1f32..1.0)).collect()).collect();
    let (kr, vr): (Vec<&[f32]>, Vec<&[f32]>) =
        (rows[..m].iter().map(|r| &r[..]).collect(), rows[m..].iter().map(|r| &r[..]).collect());
    let (mut scores, mut o) = (Vec::new(), vec![0f32; g * dim]);
    c.bench_function("attend_rows_g3_m545_d64", |b| {
        b.iter(|| attend_rows(black_box(&q[..g * dim]), &kr, &vr, None, 0.125, &mut scores, &mut o).unwrap())
    });
}

criterion_group! { name = benches; config = config(); targets = gemv, gemm, attn }
criterion_main!(benches);
