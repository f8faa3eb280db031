//! The batched decode step's linears alone, robust on a loaded machine (the minimum over
//! repeated calls): `gemv_rows` of 1 to 4 rows over the default model's matrices (SmolLM2-135M:
//! per layer q/k/v, o, gate/up and down in Q4_1, then the Q8_0 lm_head) on each ISA here.
//! `RAYON_NUM_THREADS=2 cargo run --release -p needle-kernels-cpu --example rows_timing [reps]`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use needle_kernels_cpu::{Isa, Pool, QMatrix, QuantType, gemv_rows_with};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Random blocks of `ty` with a small finite scale (and min) in every block.
fn weights(rng: &mut StdRng, ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..rows * ty.bytes_for("cols", cols).unwrap()).map(|_| rng.random()).collect();
    let offs: &[usize] = if matches!(ty, QuantType::Q4_1 | QuantType::Q5_1) { &[0, 2] } else { &[0] };
    for blk in b.chunks_exact_mut(ty.block_bytes()) {
        for &o in offs {
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    b
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let mut rng = StdRng::seed_from_u64(1);
    // (matrices sharing one input, in features, layers): one layer's groups, then the lm_head.
    let groups: [(&[usize], usize, QuantType, usize); 5] = [
        (&[576, 192, 192], 576, QuantType::Q4_1, 30),
        (&[576], 576, QuantType::Q4_1, 30),
        (&[1536, 1536], 576, QuantType::Q4_1, 30),
        (&[576], 1536, QuantType::Q4_1, 30),
        (&[49152], 576, QuantType::Q8_0, 1),
    ];
    let data: Vec<Vec<Vec<u8>>> = groups
        .iter()
        .map(|(rows, cols, ty, _)| rows.iter().map(|&r| weights(&mut rng, *ty, r, *cols)).collect())
        .collect();
    println!(
        "{} thread(s); min µs over {reps} calls per matrix group; step = 30 layers + lm_head",
        Pool::global().threads()
    );
    for isa in Isa::all_available().into_iter().filter(|&i| i != Isa::Scalar) {
        let mut one_row = 0.0;
        for t in 1..=4 {
            let mut step = 0.0;
            let mut parts = Vec::new();
            for ((rows, cols, ty, layers), bytes) in groups.iter().zip(&data) {
                let mats: Vec<QMatrix<'_>> =
                    rows.iter().zip(bytes).map(|(&r, b)| QMatrix::new(*ty, r, *cols, b).unwrap()).collect();
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-1f32..1.0)).collect();
                let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0f32; t * r]).collect();
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                    let t0 = Instant::now();
                    gemv_rows_with(isa, &mats, &x, t, &mut outs).unwrap();
                    best = best.min(t0.elapsed().as_secs_f64() * 1e6);
                }
                parts.push(format!("{best:.0}"));
                step += best * *layers as f64;
            }
            if t == 1 {
                one_row = step;
            }
            println!(
                "{isa:?} rows {t}: step {:.2} ms ({:.2}x one row's; qkv/o/gate-up/down/lm_head µs {})",
                step / 1e3,
                step / one_row,
                parts.join("/")
            );
        }
    }
}
