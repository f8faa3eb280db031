//! Device, seeded random data, the f64 reference attention and the comparison helpers.

use std::sync::OnceLock;

use cubecl::prelude::ComputeClient;
use needle_kernels_cubecl::cubecl;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The runtime under test: wgpu (default feature), or CUDA when built with
/// `--no-default-features --features cuda`.
#[cfg(feature = "wgpu")]
pub type Client = ComputeClient<cubecl::wgpu::WgpuRuntime>;
#[cfg(not(feature = "wgpu"))]
pub type Client = ComputeClient<cubecl::cuda::CudaRuntime>;

/// The device, or `None` (test skipped) when there is none and `NEEDLE_SKIP_GPU_TESTS=1`.
/// Without the variable a missing device fails the test: a silent pass would hide a broken CI.
pub fn client() -> Option<Client> {
    // Opened once for the whole binary. CubeCL opens the device on its own thread: a missing
    // adapter panics there (its message goes to stderr) and reaches us as a dead channel.
    static OPENED: OnceLock<Result<Client, String>> = OnceLock::new();
    let opened = OPENED.get_or_init(|| {
        #[cfg(feature = "wgpu")]
        let opened = needle_kernels_cubecl::wgpu_client();
        #[cfg(not(feature = "wgpu"))]
        let opened = needle_kernels_cubecl::cuda_client();
        opened.map_err(|e| e.to_string())
    });
    match opened {
        Ok(c) => Some(c.clone()),
        Err(e) if std::env::var("NEEDLE_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") => {
            eprintln!("NEEDLE_SKIP_GPU_TESTS=1: skipping GPU test ({e})");
            None
        }
        Err(e) => panic!(
            "no GPU device ({e}; CubeCL's own panic above, from its device thread, names the cause). For wgpu install a Vulkan driver (software: `apt-get install \
             mesa-vulkan-drivers libvulkan1`) or set NEEDLE_SKIP_GPU_TESTS=1 to skip the GPU tests"
        ),
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` standard-normal-ish values (sum of uniforms, good enough for attention data).
pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.7).collect()
}

/// Value rows: normal plus 0.75, so attention outputs stay O(1) over long contexts (zero-mean
/// values average to ~0 there, and a relative error in a tiny output would hide under `tol`).
pub fn values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    normal(rng, n).into_iter().map(|x| x + 0.75).collect()
}

/// f64 attention of one query over the rows `ids` of KV head `h` in a `[rows][n_kv][d]` store.
/// Returns (output, lse); empty ids give zeros and `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn ref_attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_kv: usize,
    d: usize,
    h: usize,
    ids: &[u32],
    log_w: Option<&[f32]>,
    scale: f32,
) -> (Vec<f64>, f64) {
    let row = |buf: &'_ [f32], r: u32| -> Vec<f64> {
        let b = (r as usize * n_kv + h) * d;
        buf[b..b + d].iter().map(|&x| x as f64).collect()
    };
    let scores: Vec<f64> = ids
        .iter()
        .enumerate()
        .map(|(j, &r)| {
            let kr = row(k, r);
            let dot: f64 = q.iter().zip(&kr).map(|(&a, &b)| a as f64 * b).sum();
            dot * scale as f64 + log_w.map_or(0.0, |w| w[j] as f64)
        })
        .collect();
    let Some(m) = scores.iter().cloned().reduce(f64::max) else {
        return (vec![0.0; d], f64::NEG_INFINITY);
    };
    let mut out = vec![0.0f64; d];
    let mut sum = 0.0;
    for (&s, &r) in scores.iter().zip(ids) {
        let p = (s - m).exp();
        sum += p;
        for (o, x) in out.iter_mut().zip(row(v, r)) {
            *o += p * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= sum);
    (out, m + sum.ln())
}

/// Asserts `|got − want| ≤ tol · max(1, |want|)` elementwise, naming the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}[{i}]: want -inf, got {g}");
            continue;
        }
        let err = (g as f64 - w).abs();
        if std::env::var("NEEDLE_PRINT_ERR").is_ok() {
            eprintln!("ERR {what} {:e}", err / w.abs().max(1.0));
        }
        assert!(err <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w}, error {err:e} > {tol:e}");
    }
}
