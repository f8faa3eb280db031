// # LSH report
//
// Measures what the tests assert, on larger data, and prints it:
// 1. empirical SimHash collision rates against `collision_probability`;
// 2. bias and variance of the MagicPIG (Horvitz–Thompson) sums over independent seeds, and the
//    error of the weighted attention output against dense attention;
// 3. recall@10 against `FlatIndex` and the share of keys scored, for a grid of K × L on 8K
//    seeded synthetic keys of dimension 64.
//
// Run: `cargo run -p needle-index-lsh --example lsh_report` (about 2.5 min in the dev profile, 2 cores)
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use needle_core::attention::{Partial, attend_weighted, dense};
use needle_core::{FlatIndex, Rows, SearchParams, VectorIndex};
use needle_index_lsh::{LshIndex, binomial_tail, collision_probability};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// `n` keys and `m` queries of dimension `dim`, row-major, from needle-core's generator.
fn keys_and_queries(n: usize, m: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let g = needle_core::synth::AttentionLike::new(dim, seed);
    (g.keys(n, seed ^ 1), g.queries(m, seed ^ 2))
}

/// Mean per-query recall of `got` against the exact `truth`.
fn recall(truth: &needle_core::SearchResult, got: &needle_core::SearchResult) -> f64 {
    let r = needle_core::metrics::recall_of_results(got, truth).unwrap();
    r.iter().sum::<f64>() / r.len().max(1) as f64
}

fn main() -> needle_core::Result<()> {
    let dim = 64;
    collision_rates(dim)?;
    estimator(dim)?;
    recall_grid(dim)?;
    Ok(())
}

fn unit_at(theta: f64, dim: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; dim];
    v[0] = theta.cos() as f32;
    v[1] = theta.sin() as f32;
    v
}

fn collision_rates(dim: usize) -> needle_core::Result<()> {
    println!("## 1. Collision rate vs p = (1 - θ/π)^K  (16384 tables = 4 seeds × 4096, dim {dim})");
    println!("{:>3} {:>6} {:>10} {:>10} {:>8}", "K", "θ", "p", "empirical", "z");
    let q = unit_at(0.0, dim);
    for k_bits in [4, 8, 10] {
        for theta in [0.2, 0.6, 1.0, std::f64::consts::FRAC_PI_2, 2.2] {
            let k = unit_at(theta, dim);
            let mut same = 0usize;
            for seed in 0..4 {
                let idx = LshIndex::new(dim, k_bits, 4096, seed)?;
                let (a, b) = (idx.signatures(&q)?, idx.signatures(&k)?);
                same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
            }
            let n = 16384.0;
            let p = collision_probability(&q, &k, k_bits);
            let rate = same as f64 / n;
            let z = (rate - p) / (p * (1.0 - p) / n).sqrt();
            println!("{k_bits:>3} {theta:>6.3} {p:>10.5} {rate:>10.5} {z:>8.2}");
        }
    }
    Ok(())
}

fn estimator(dim: usize) -> needle_core::Result<()> {
    let (n, seeds) = (1024usize, 200u64);
    let (keys, queries) = keys_and_queries(n, 4, dim, 7);
    let mut rng = StdRng::seed_from_u64(1);
    let values: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (kr, vr) = (Rows::new("keys", &keys, dim)?, Rows::new("values", &values, dim)?);
    let scale = 1.0 / (dim as f32).sqrt();
    println!("\n## 2. MagicPIG estimator: {n} keys, dim {dim}, {seeds} independent seeds per config, 4 queries");
    println!("   HT sums Σ_S e^s v/u (numerator, value column 0) and Σ_S e^s/u (denominator):");
    println!("   rel. bias = |mean − exact|/exact, z = bias / standard error, CV = sd/exact; and the");
    println!("   ratio estimate's relative L2 error against dense attention (weighted vs unweighted).");
    println!(
        "{:>8} {:>3} {:>8} {:>10} {:>6} {:>8} {:>10} {:>6} {:>8} {:>9} {:>9}",
        "config", "t", "sampled", "den bias", "z", "den CV", "num bias", "z", "num CV", "err w", "err unw"
    );
    for (k_bits, l, t) in [(10usize, 64usize, 1usize), (10, 64, 2), (8, 32, 1), (12, 128, 2)] {
        let (mut sampled, mut den_bias, mut num_bias, mut den_z, mut num_z, mut den_cv, mut num_cv) =
            (0.0, 0.0, 0.0, 0.0f64, 0.0f64, 0.0, 0.0);
        let (mut err_w, mut err_u) = (0.0, 0.0);
        for q in queries.chunks_exact(dim) {
            let full: Partial<f64> = dense(q, &kr, &vr, scale)?;
            let e = |i: usize| {
                (f64::from(scale)
                    * keys[i * dim..(i + 1) * dim].iter().zip(q).map(|(a, b)| f64::from(a * b)).sum::<f64>())
                .exp()
            };
            let exact_den: f64 = (0..n).map(e).sum();
            let exact_num: f64 = (0..n).map(|i| e(i) * f64::from(values[i * dim])).sum();
            let (mut dens, mut nums) = (Vec::new(), Vec::new());
            for seed in 0..seeds {
                let mut idx = LshIndex::new(dim, k_bits, l, 100 + seed)?;
                idx.build(&keys, None)?;
                let s = idx.sample_min_collisions(q, t)?;
                sampled += s.len() as f64;
                let (mut d, mut nu) = (0.0, 0.0);
                for (j, &id) in s.ids.iter().enumerate() {
                    d += e(id as usize) / s.inclusion[j];
                    nu += e(id as usize) * f64::from(values[id as usize * dim]) / s.inclusion[j];
                }
                dens.push(d);
                nums.push(nu);
                let w: Partial<f64> = attend_weighted(q, &kr, &vr, s.weighted_ids(), scale)?;
                let u: Partial<f64> = attend_weighted(q, &kr, &vr, s.ids.iter().map(|&i| (i, 0.0)), scale)?;
                err_w += rel_err(&w.out, &full.out);
                err_u += rel_err(&u.out, &full.out);
            }
            let (md, sd) = mean_sd(&dens);
            let (mn, sn) = mean_sd(&nums);
            den_bias += (md - exact_den).abs() / exact_den;
            num_bias += (mn - exact_num).abs() / exact_num.abs();
            den_z = den_z.max((md - exact_den).abs() / (sd / (seeds as f64).sqrt()));
            num_z = num_z.max((mn - exact_num).abs() / (sn / (seeds as f64).sqrt()));
            den_cv += sd / exact_den;
            num_cv += sn / exact_num.abs();
        }
        let r = (queries.len() / dim) as f64;
        let runs = r * seeds as f64;
        println!(
            "{:>8} {t:>3} {:>7.1}% {:>10.4} {den_z:>6.2} {:>8.3} {:>10.4} {num_z:>6.2} {:>8.3} {:>9.4} {:>9.4}",
            format!("{k_bits}x{l}"),
            100.0 * sampled / runs / n as f64,
            den_bias / r,
            den_cv / r,
            num_bias / r,
            num_cv / r,
            err_w / runs,
            err_u / runs
        );
    }
    println!("   (z is the largest over the 4 queries. With t = 2 some keys have u ~ 1e-4: the sums are");
    println!("   heavy-tailed, 200 seeds rarely see those keys, and the sample sd underestimates the true");
    println!("   one, so z overstates. The inclusion check below tests u itself, without the weights.)");
    inclusion_check(dim, &keys, &queries[..dim])?;
    Ok(())
}

/// Per-key inclusion frequency over many seeds against `u`: a chi-square over all keys.
fn inclusion_check(dim: usize, keys: &[f32], q: &[f32]) -> needle_core::Result<()> {
    let (n, seeds) = (keys.len() / dim, 400u64);
    println!("   inclusion check, LSH10x64, {seeds} seeds: Σ (count − R·u)² / (R·u(1−u)) per key");
    for t in [1usize, 2] {
        let mut count = vec![0usize; n];
        for seed in 0..seeds {
            let mut idx = LshIndex::new(dim, 10, 64, 5000 + seed)?;
            idx.build(keys, None)?;
            for id in idx.sample_min_collisions(q, t)?.ids {
                count[id as usize] += 1;
            }
        }
        let r = seeds as f64;
        // Pearson's chi-square is only chi-square-distributed where R·u(1−u) >= 5: rarer
        // keys are pooled into one cell (observed vs expected total count).
        let (mut chi2, mut dof, mut rare_seen, mut rare_expected) = (0.0, 0usize, 0.0, 0.0);
        for (i, &c) in count.iter().enumerate() {
            let u = binomial_tail(64, collision_probability(q, &keys[i * dim..(i + 1) * dim], 10), t);
            let var = r * u * (1.0 - u);
            if var >= 5.0 {
                chi2 += (c as f64 - r * u).powi(2) / var;
                dof += 1;
            } else {
                rare_seen += c as f64;
                rare_expected += r * u;
            }
        }
        println!(
            "   t = {t}: chi² = {chi2:.1} on {dof} keys (mean {dof} if u is right; ± {:.0} only for independent keys, clustered keys widen it); {} rarer keys pooled: \
             seen {rare_seen} times, expected {rare_expected:.1}",
            (2.0 * dof as f64).sqrt(),
            n - dof
        );
    }
    Ok(())
}

fn recall_grid(dim: usize) -> needle_core::Result<()> {
    let (n, m, k) = (8192usize, 200usize, 10usize);
    let (keys, queries) = keys_and_queries(n, m, dim, 42);
    let mut flat = FlatIndex::new(dim);
    flat.build(&keys, None)?;
    let truth = flat.search(&queries, k, &SearchParams::default())?;
    println!("\n## 3. Recall@{k} vs FlatIndex: {n} keys, {m} queries, dim {dim} (needle_core::synth::AttentionLike)");
    println!("{:>9} {:>9} {:>11} {:>12} {:>10}", "K x L", "recall", "scored %", "bytes/key", "build s");
    for (k_bits, l) in
        [(6, 16), (8, 16), (8, 32), (8, 64), (10, 32), (10, 64), (10, 128), (12, 64), (12, 128), (14, 128)]
    {
        let mut idx = LshIndex::new(dim, k_bits, l, 1)?;
        let st = idx.build(&keys, None)?;
        let r = idx.search(&queries, k, &SearchParams::default())?;
        println!(
            "{:>9} {:>9.3} {:>10.2}% {:>12.1} {:>10.3}",
            format!("{k_bits}x{l}"),
            recall(&truth, &r),
            100.0 * r.stats.full_scored as f64 / (n * m) as f64,
            idx.memory_bytes() as f64 / n as f64,
            st.seconds
        );
    }
    println!("   effort sweep on LSH10x64 (tables probed):");
    let mut idx = LshIndex::new(dim, 10, 64, 1)?;
    idx.build(&keys, None)?;
    for e in [4, 8, 16, 32, 64] {
        let r = idx.search(&queries, k, &SearchParams::effort(e))?;
        println!(
            "{:>9} {:>9.3} {:>10.2}%",
            format!("effort {e}"),
            recall(&truth, &r),
            100.0 * r.stats.full_scored as f64 / (n * m) as f64
        );
    }
    Ok(())
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (m, (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt())
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}
