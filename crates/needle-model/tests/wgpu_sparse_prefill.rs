//! Sparse prefill on the CubeCL arm (wgpu; lavapipe in CI): with a prefill pattern the device
//! attends only the key blocks the CPU path's planner chooses, and reports them through the same
//! counters. Against the dense device kernel (a pattern keeping every block), against the CPU
//! path on random inputs (the same masks, the same counts, outputs within float rounding), and
//! the default model with `vertical-slash` (the CPU path's greedy tokens and block counts).
//! `NEEDLE_SKIP_GPU_TESTS=1` skips them; `NEEDLE_PRINT_ERR=1 … -- --nocapture` prints figures.
#![cfg(feature = "wgpu")]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{Tensor, TensorData};
use common::{print_err, skip_gpu as skip};
use needle_core::GqaLayout;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern, PrefillSpec};
use needle_model::backend::plain;
use needle_model::cube::WgpuCube;
use needle_model::{Cpu, KvCache, Llama, LoadOptions, NeedleBackend, Weights, argmax, compose};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type G = WgpuCube;

/// Keeps every key block of every query block: dense attention through the sparse path.
#[derive(Debug)]
struct Every;

impl PrefillPattern for Every {
    fn describe(&self) -> String {
        "every".into()
    }
    fn block(&self) -> usize {
        32
    }
    fn choose(&self, _: &PrefillChunk<'_>, mask: &mut BlockMask) -> needle_core::Result<()> {
        mask.query_blocks().for_each(|qb| mask.add_all(qb));
        Ok(())
    }
}

static EVERY: Every = Every;

/// A one-layer cache with `n − t` random rows, then the chunk's `t` rows appended as a prefill
/// appends them; `prompt_end` is left unknown, so each chunk's last block is dense.
fn cache<M: Default>(prefill: PrefillSpec, gqa: GqaLayout, d: usize, k: &[f32], v: &[f32]) -> KvCache<M> {
    let (f, mut sel) = compose(needle_select::parse("full").unwrap());
    sel.prefill = prefill;
    let mut cache = KvCache::new(1, gqa, d, f.as_ref(), sel).unwrap();
    cache.append(0, k, v).unwrap();
    cache
}

/// Prefill attention of `q` (`[t, nq, d]`) over the cache on backend `B`: output and the
/// cache's `(kept, dense)` block counts.
fn attend<B: NeedleBackend>(cache: &mut KvCache<B::KvMirror>, q: &[f32], shape: [usize; 3]) -> (Vec<f32>, (u64, u64)) {
    let q = Tensor::<B, 3>::from_data(TensorData::new(q.to_vec(), shape), &Default::default());
    let out = plain::to_vec(B::paged_attention(cache, 0, q, 0.3).unwrap()).unwrap();
    (out, (cache.stats.prefill_blocks, cache.stats.prefill_blocks_dense))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// (query heads, KV heads, head dim, rows, chunk): a chunk at the start, one starting inside a
/// block with a partial last block, a group of 8, one query.
const SHAPES: [(usize, usize, usize, usize, usize); 4] =
    [(6, 2, 32, 150, 150), (6, 2, 32, 300, 77), (8, 1, 16, 200, 45), (4, 4, 64, 100, 1)];

#[test]
fn a_pattern_keeping_every_block_is_the_dense_device_kernel() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(31);
    for (nq, nkv, d, n, t) in SHAPES {
        let gqa = GqaLayout::new(nq, nkv).unwrap();
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (k, v, q) = (rand(n * nkv * d), rand(n * nkv * d), rand(t * nq * d));
        let (dense, none) = attend::<G>(&mut cache(PrefillSpec::DENSE, gqa, d, &k, &v), &q, [t, nq, d]);
        assert_eq!(none, (0, 0), "a dense prefill counts no blocks");
        let (every, (kept, all)) = attend::<G>(&mut cache(PrefillSpec::new(&EVERY), gqa, d, &k, &v), &q, [t, nq, d]);
        let e = max_abs_diff(&every, &dense);
        if print_err() {
            eprintln!("{nq}/{nkv} heads d {d} n {n} t {t}: every block vs dense, max |Δ| {e:e}");
        }
        // The same key tiles in the same order (blocks of 32 are whole key tiles): equal up to a
        // last-bit difference at most.
        assert!(e <= 1e-6, "{nq}/{nkv} heads d {d} n {n} t {t}: max |Δ| {e}");
        assert!(kept > 0 && kept == all, "{kept} of {all} blocks kept");
    }
}

#[test]
fn a_pattern_on_the_device_keeps_the_cpu_paths_blocks() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(32);
    for spec in ["vertical-slash:block=16,last_q=16,vertical=8,slash=8,local=1", "flex:gamma=0.5,block=16"] {
        let prefill = needle_prefill::parse(spec).unwrap();
        for (nq, nkv, d, n, t) in SHAPES {
            let gqa = GqaLayout::new(nq, nkv).unwrap();
            let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
            let (k, v, q) = (rand(n * nkv * d), rand(n * nkv * d), rand(t * nq * d));
            let (want, want_blocks) = attend::<Cpu>(&mut cache(prefill, gqa, d, &k, &v), &q, [t, nq, d]);
            let (got, got_blocks) = attend::<G>(&mut cache(prefill, gqa, d, &k, &v), &q, [t, nq, d]);
            let e = max_abs_diff(&got, &want);
            if print_err() {
                eprintln!("{spec} {nq}/{nkv} heads d {d} n {n} t {t}: {got_blocks:?} blocks, max |Δ| {e:e}");
            }
            assert_eq!(got_blocks, want_blocks, "{spec} {nq}/{nkv} heads n {n} t {t}: blocks (kept, dense)");
            assert!(e < 1e-5, "{spec} {nq}/{nkv} heads d {d} n {n} t {t}: max |Δ| {e}");
            // Random keys spread the attention out, so flex's coverage keeps most blocks there;
            // vertical-slash's few lines leave most of a long chunk out.
            if t > 100 && spec.starts_with("vertical") {
                assert!(got_blocks.0 < got_blocks.1, "{spec} n {n} t {t}: nothing skipped");
            }
        }
    }
}

/// Genesis 1:1–8 (King James Version, public domain): a prompt of three chunks and a few blocks.
const GENESIS: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and \
void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God \
said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the light \
from the darkness. And God called the light Day, and the darkness he called Night. And the evening and the morning \
were the first day. And God said, Let there be a firmament in the midst of the waters, and let it divide the waters \
from the waters. And God made the firmament, and divided the waters which were under the firmament from the waters \
which were above the firmament: and it was so. And God called the firmament Heaven. And the evening and the morning \
were the second day.";

/// Prefill of `prompt` in chunks of 64 with `prefill`, then greedy decode (`full`): the tokens,
/// the logits before each and the prefill's `(kept, dense)` block counts.
fn generate<B: NeedleBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    prefill: PrefillSpec,
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>, (u64, u64)) {
    let (f, mut sel) = compose(needle_select::parse("full").unwrap());
    sel.prefill = prefill;
    let c = model.config();
    let mut cache = KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
    let mut logits = vec![model.prefill(prompt, &mut cache, 64, &[prompt.len() - 1], &mut |_, _| {}).unwrap()];
    let blocks = (cache.stats.prefill_blocks, cache.stats.prefill_blocks_dense);
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let next = argmax(logits.last().unwrap()).unwrap();
        tokens.push(next);
        if tokens.len() < steps {
            logits.push(model.decode(next, &mut cache).unwrap());
        }
    }
    (tokens, logits, blocks)
}

#[test]
fn the_default_model_with_vertical_slash_on_wgpu_gives_the_cpu_tokens_and_blocks() {
    if skip() {
        return;
    }
    let path = needle_fetch::default_model_path().expect("model path");
    assert!(path.is_file(), "{} is missing: run `cargo xtask fetch-model`", path.display());
    let ck = needle_loader::open(&path).unwrap();
    let prompt = ck.tokenizer().unwrap().encode(GENESIS, false).unwrap();
    assert!(prompt.len() > 128, "the prompt spans several chunks and blocks: {} tokens", prompt.len());
    let prefill = needle_prefill::parse("vertical-slash:block=16,last_q=16,vertical=32,slash=32,local=1").unwrap();
    let steps = 4;

    let t0 = std::time::Instant::now();
    let gpu = Llama::<G>::load(&ck, &WgpuDevice::default()).unwrap();
    let (gpu_tokens, gpu_logits, gpu_blocks) = generate(&gpu, &prompt, prefill, steps);
    let gpu_secs = t0.elapsed().as_secs_f64();
    drop(gpu);
    // The CPU path with f32 weights computes the device's function (f32 activations on the same
    // blocks), so its queries, hence the pattern's estimates and masks, differ by rounding only.
    let cpu = Llama::<Cpu>::load_with(&ck, &Default::default(), &LoadOptions { weights: Weights::F32 }).unwrap();
    let (cpu_tokens, cpu_logits, cpu_blocks) = generate(&cpu, &prompt, prefill, steps);
    let diff = cpu_logits.iter().zip(&gpu_logits).map(|(a, b)| max_abs_diff(a, b)).fold(0f32, f32::max);
    let top = cpu_logits.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    if print_err() {
        eprintln!(
            "{} prompt tokens, {}: device {gpu_blocks:?} blocks (kept, dense), CPU {cpu_blocks:?}; max |Δlogit| \
             {diff:.3e} (largest |logit| {top:.2}); tokens {gpu_tokens:?}; wgpu load+run {gpu_secs:.1} s",
            prompt.len(),
            prefill.describe()
        );
    }
    assert_eq!(gpu_blocks, cpu_blocks, "blocks (kept, dense): device vs CPU");
    assert!(gpu_blocks.0 < gpu_blocks.1, "the pattern skipped no block: {gpu_blocks:?}");
    assert_eq!(gpu_tokens, cpu_tokens, "greedy tokens: device vs CPU");
    assert!(diff <= 1e-3 * top, "max |Δlogit| {diff} > {}", 1e-3 * top);
}
