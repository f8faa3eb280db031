//! Decode attention alone, as a batched step meets it: `attend_rows` of 3 query heads over
//! `keys` rows of dim 64 for each of `groups` distinct KV groups (30 layers × 3 KV heads per
//! stream, the default model's), with the rows distinct per group (a step streams them from
//! memory), shared by the streams (one context's rows, as forks of it read them) or one set
//! for every group (cache-resident), on 1 or 2 threads of the kernels' pool; then the shared rows
//! attended once per chunk for every stream's query group, as needle-model's batched decode does.
//! Minimum over repeated steps.
//! `cargo run --release -p needle-kernels-cpu --example attn_timing [keys] [streams] [reps]`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use needle_kernels_cpu::{Pool, attend_rows};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn main() {
    if std::env::args().nth(4).as_deref() == Some("f16") {
        return run::<half::f16>("f16");
    }
    run::<f32>("f32");
}

fn run<T: needle_kernels_cpu::attn::KvElem + From32>(dtype: &str) {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (keys, streams, reps) = (arg(1, 512), arg(2, 4), arg(3, 20));
    let (d, g) = (64, 3);
    let groups = streams * 90;
    let mut rng = StdRng::seed_from_u64(1);
    let mut rows =
        |n: usize| -> Vec<T> { (0..n * keys * d).map(|_| T::from_f32(rng.random_range(-1f32..1.0))).collect() };
    let (kd, vd, ks, vs) = (rows(groups), rows(groups), rows(1), rows(1));
    let q: Vec<f32> = (0..g * d).map(|i| ((i as f32) * 0.37).sin()).collect();
    let mb = (2 * groups * keys * d * std::mem::size_of::<T>()) as f64 / 1e6;
    println!("{dtype}, {streams} stream(s), {keys} keys: {mb:.1} MB of K/V a step; min over {reps} steps");
    for (label, mode) in [("distinct rows", 0), ("rows shared by the streams", 1), ("one set of rows", 2)] {
        fn view<T>(data: &[T], base: usize, keys: usize, d: usize) -> Vec<&[T]> {
            (0..keys).map(|r| &data[base + r * d..base + (r + 1) * d]).collect()
        }
        let (kv, vv) = if mode == 2 { (&ks, &vs) } else { (&kd, &vd) };
        // Group `i` is layer `i / (3 streams)`, stream `i % (3 streams) / 3`, KV head `i % 3`.
        let base = |i: usize| match mode {
            0 => i * keys * d,
            1 => (i / (3 * streams) * 3 + i % 3) * keys * d,
            _ => 0,
        };
        #[allow(clippy::type_complexity)]
        let views: Vec<(Vec<&[T]>, Vec<&[T]>)> =
            (0..groups).map(|i| (view(kv, base(i), keys, d), view(vv, base(i), keys, d))).collect();
        for threads in [1, 2] {
            // Groups in layer order, a layer's groups of every stream as one parallel loop.
            let best = step_ms(threads, reps, &|pool, layer| {
                pool.run(streams * 3, &|t| {
                    let (k, v) = &views[layer * streams * 3 + t];
                    let (mut scores, mut out) = (Vec::new(), vec![0f32; g * d]);
                    attend_rows(&q, k, v, None, 0.125, &mut scores, &mut out).unwrap();
                });
            });
            println!("{label}, {threads} thread(s): {best:.2} ms a step ({:.1} GB/s)", mb / best);
        }
    }
    // The shared rows once per KV head for all the streams' query groups (needle-model attends
    // a chunk several sequences share this way), in its chunks of 256 rows (a KV page).
    let qs: Vec<f32> = (0..streams).flat_map(|_| q.iter().copied()).collect();
    for threads in [1, 2] {
        let best = step_ms(threads, reps, &|pool, layer| {
            let chunks = keys.div_ceil(CHUNK);
            pool.run(3 * chunks, &|t| {
                let (head, c) = (t / chunks, t % chunks);
                let base = (layer * 3 + head) * keys * d;
                let rows = c * CHUNK..((c + 1) * CHUNK).min(keys);
                let k: Vec<&[T]> = rows.clone().map(|r| &kd[base + r * d..base + (r + 1) * d]).collect();
                let v: Vec<&[T]> = rows.map(|r| &vd[base + r * d..base + (r + 1) * d]).collect();
                let (mut scores, mut out, mut lse) = (Vec::new(), vec![0f32; qs.len()], vec![0f32; qs.len() / d]);
                needle_kernels_cpu::attend_rows_lse(&qs, &k, &v, None, 0.125, &mut scores, &mut out, &mut lse).unwrap();
            });
        });
        let mb = (2 * 90 * keys * d * std::mem::size_of::<T>()) as f64 / 1e6;
        println!("shared rows, one call per chunk, {threads} thread(s): {best:.2} ms a step ({:.1} GB/s)", mb / best);
    }
}

/// Rows per chunk of needle-model's decode attention (`needle_model::decode::CHUNK`).
const CHUNK: usize = 256;

/// The fastest of `reps` steps on a pool of `threads`, each step `layer(pool, l)` for the 30
/// layers, in milliseconds.
fn step_ms(threads: usize, reps: usize, layer: &(dyn Fn(&Pool, usize) + Sync)) -> f64 {
    let pool = Pool::new(threads);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        (0..30).for_each(|l| layer(&pool, l));
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
    }
    best
}

/// The element from an f32.
trait From32 {
    fn from_f32(x: f32) -> Self;
}
impl From32 for f32 {
    fn from_f32(x: f32) -> f32 {
        x
    }
}
impl From32 for half::f16 {
    fn from_f32(x: f32) -> half::f16 {
        half::f16::from_f32(x)
    }
}
