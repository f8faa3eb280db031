//! The batched decode step's linears alone, robust on a loaded machine (the minimum over
//! repeated steps): `gemv_rows` of 1 to 4 rows over the default model's matrices (SmolLM2-135M:
//! 30 layers of q/k/v, o, gate/up and down in Q4_1, each its own weights, then the Q8_0
//! lm_head: 77 MB a step, as the model streams them) on each ISA here.
//! `RAYON_NUM_THREADS=2 cargo run --release -p needle-kernels-cpu --example rows_timing [reps]`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use needle_kernels_cpu::{Isa, PackedRows, Pool, QMatrix, QuantType, gemv_rows_with};
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
    // (matrices sharing one input, in features, type) of one layer, then the lm_head.
    let layer: [(&[usize], usize, QuantType); 4] = [
        (&[576, 192, 192], 576, QuantType::Q4_1),
        (&[576], 576, QuantType::Q4_1),
        (&[1536, 1536], 576, QuantType::Q4_1),
        (&[576], 1536, QuantType::Q4_1),
    ];
    let head: (&[usize], usize, QuantType) = (&[49152], 576, QuantType::Q8_0);
    // Every layer its own weights, as in the model: a step streams all of them from memory.
    let groups: Vec<(&[usize], usize, QuantType)> =
        (0..30).flat_map(|_| layer.iter().copied()).chain(std::iter::once(head)).collect();
    let data: Vec<Vec<Vec<u8>>> = groups
        .iter()
        .map(|(rows, cols, ty)| rows.iter().map(|&r| weights(&mut rng, *ty, r, *cols)).collect())
        .collect();
    println!("{} thread(s); min over {reps} steps (30 layers + lm_head, distinct weights)", Pool::global().threads());
    let plain: Vec<Vec<QMatrix<'_>>> = groups
        .iter()
        .zip(&data)
        .map(|((rows, cols, ty), bytes)| {
            rows.iter().zip(bytes).map(|(&r, b)| QMatrix::new(*ty, r, *cols, b).unwrap()).collect()
        })
        .collect();
    let packs: Vec<Vec<PackedRows>> =
        plain.iter().map(|ms| ms.iter().map(|m| PackedRows::new(m).unwrap()).collect()).collect();
    let packed: Vec<Vec<QMatrix<'_>>> = plain
        .iter()
        .zip(&packs)
        .map(|(ms, ps)| ms.iter().zip(ps).map(|(m, p)| m.with_packed(p).unwrap()).collect())
        .collect();
    let runs = Isa::all_available().into_iter().filter(|&i| i != Isa::Scalar).flat_map(|isa| {
        let layouts: &[(&str, &Vec<Vec<QMatrix<'_>>>)] = if PackedRows::wanted(QuantType::Q4_1, isa) {
            &[("as stored", &plain), ("packed", &packed)]
        } else {
            &[("as stored", &plain)]
        };
        layouts.iter().map(move |&(l, m)| (isa, l, m)).collect::<Vec<_>>()
    });
    for (isa, layout, mats) in runs {
        let mut one_row = 0.0;
        for t in 1..=4 {
            let xs: Vec<Vec<f32>> = groups
                .iter()
                .map(|(_, cols, _)| (0..t * cols).map(|_| rng.random_range(-1f32..1.0)).collect())
                .collect();
            let mut ys: Vec<Vec<Vec<f32>>> =
                groups.iter().map(|(rows, ..)| rows.iter().map(|&r| vec![0f32; t * r]).collect()).collect();
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t0 = Instant::now();
                for ((m, x), y) in mats.iter().zip(&xs).zip(ys.iter_mut()) {
                    let mut outs: Vec<&mut [f32]> = y.iter_mut().map(|v| v.as_mut_slice()).collect();
                    gemv_rows_with(isa, m, x, t, &mut outs).unwrap();
                }
                best = best.min(t0.elapsed().as_secs_f64() * 1e3);
            }
            if t == 1 {
                one_row = best;
            }
            println!("{isa:?} {layout} rows {t}: step {best:.2} ms ({:.2}x one row's)", best / one_row);
        }
    }
}
