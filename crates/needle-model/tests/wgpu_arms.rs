//! The CubeCL arm of `NeedleBackend` on wgpu (lavapipe in CI) against the CPU references on
//! fresh random inputs: the quantized linear from GGUF blocks (and F32 weights' matmul),
//! causal prefill attention over the cache's rows, decode attention through selectors in both
//! decode modes, and random-weight models end to end. `NEEDLE_SKIP_GPU_TESTS=1` skips them.
#![cfg(feature = "wgpu")]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{Tensor, TensorData};
use common::skip_gpu as skip;
use needle_core::{GqaLayout, RowSource};
use needle_loader::{Checkpoint, LlamaConfig};
use needle_model::backend::plain;
use needle_model::cube::WgpuCube;
use needle_model::{
    AttentionStep, Cpu, DecodeMode, KvCache, KvDtype, LinearWeight, Llama, NeedleBackend, QWeight, QuantType,
    TierBudget, argmax, cached_attention, compose,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type G = WgpuCube;

/// The cache a model on `G` takes (its rows mirrored on the device).
type GpuCache = KvCache<<G as NeedleBackend>::KvMirror>;

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn gpu<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<G, D> {
    Tensor::from_data(TensorData::new(data, shape), &WgpuDevice::default())
}

/// A small model config of the Llama family: 2 layers, 6 query heads over 2 KV heads of 32.
fn tiny() -> LlamaConfig {
    let mut c = LlamaConfig::preset("smollm2-135m").unwrap();
    c.vocab_size = 300;
    c.hidden_size = 192;
    c.intermediate_size = 256;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 6;
    c.num_key_value_heads = 2;
    c.head_dim = 32;
    c
}

#[test]
fn the_cube_arm_serves_burns_wgpu_type_and_keeps_weights_in_blocks() {
    // `needle --device wgpu` runs `burn::backend::Wgpu`: the CubeCL arm's type, checked at
    // compile time (with burn's `fusion` feature it would be another type, without the arm).
    fn same<T>(_: std::marker::PhantomData<T>, _: std::marker::PhantomData<T>) {}
    same(std::marker::PhantomData::<burn::backend::Wgpu>, std::marker::PhantomData::<G>);
    assert!(<burn::backend::Wgpu as NeedleBackend>::fuses_linear());
}

#[test]
fn quantized_linear_on_the_device_matches_the_dequantized_weight() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(1);
    // Block kernels for the quantized types and F16; F32 goes through Burn's matmul.
    for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_K, QuantType::F16, QuantType::F32] {
        let ck = Checkpoint::random(&tiny(), ty, 11).unwrap();
        // Random checkpoints come in these block types (Q4_1, the default model's, is covered by
        // tests/wgpu_model.rs); q_proj carries llama.cpp's RoPE row order only in GGUF files.
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"] {
            let w: LinearWeight<_> = QWeight::from_raw(name, ck.tensor_blocks(name).unwrap().unwrap()).unwrap().into();
            let (rows, cols) = (w.rows(), w.cols());
            let deq = w.dequantize().unwrap();
            // One token: the GEMV; 5 and 40: the tiled GEMM (8- and 32-token tiles).
            for t in [1, 5, 40] {
                let x = rand_vec(&mut rng, t * cols);
                let got = plain::to_vec(<G as NeedleBackend>::qlinear(gpu(x.clone(), [t, cols]), &w).unwrap()).unwrap();
                assert_eq!(got.len(), t * rows);
                for (i, xi) in x.chunks_exact(cols).enumerate() {
                    for (r, wr) in deq.chunks_exact(cols).enumerate() {
                        let want: f64 = wr.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = wr.iter().zip(xi).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let e = (got[i * rows + r] as f64 - want).abs();
                        assert!(e <= 2e-6 * mag + 1e-6, "{ty:?} {name} t {t} token {i} row {r}: |Δ| {e:e}");
                    }
                }
            }
        }
    }
    // A wrong input width is an error naming the weight.
    let w: LinearWeight<_> = QWeight::from_f32("w", &[0.0; 64], 2, 32).unwrap().into();
    let err = <G as NeedleBackend>::qlinear(gpu(vec![0.0; 33], [1, 33]), &w).unwrap_err();
    assert!(err.to_string().contains("input of w"), "{err}");
}

/// A cache of one layer holding `n` random rows, selectors of `spec` built.
fn filled_cache<M: Default>(spec: &str, gqa: GqaLayout, d: usize, k: &[f32], v: &[f32]) -> KvCache<M> {
    let (f, sel) = compose(needle_select::parse(spec).unwrap());
    let mut cache = KvCache::new(1, gqa, d, f.as_ref(), sel).unwrap();
    cache.append(0, k, v).unwrap();
    cache
}

#[test]
fn prefill_attention_on_the_device_matches_the_cpu_kernel() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(2);
    for (nq, nkv, d, n, t) in [(6, 2, 32, 90, 90), (6, 2, 32, 200, 37), (4, 4, 64, 50, 1), (8, 1, 16, 70, 9)] {
        let gqa = GqaLayout::new(nq, nkv).unwrap();
        let (k, v) = (rand_vec(&mut rng, n * nkv * d), rand_vec(&mut rng, n * nkv * d));
        let q = rand_vec(&mut rng, t * nq * d);
        let mut host: KvCache = filled_cache("full", gqa, d, &k, &v);
        let mut cache: GpuCache = filled_cache("full", gqa, d, &k, &v);
        let scale = 0.3;
        let want = plain::to_vec(
            <Cpu as NeedleBackend>::paged_attention(
                &mut host,
                0,
                Tensor::from_data(TensorData::new(q.clone(), [t, nq, d]), &Default::default()),
                scale,
            )
            .unwrap(),
        )
        .unwrap();
        let got =
            plain::to_vec(<G as NeedleBackend>::paged_attention(&mut cache, 0, gpu(q, [t, nq, d]), scale).unwrap())
                .unwrap();
        let e = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(e < 1e-5, "{nq}/{nkv} heads d {d} n {n} t {t}: max |Δ| {e}");
    }
}

#[test]
fn decode_attention_on_the_device_matches_the_host_in_both_modes() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(3);
    let (nq, nkv, d, n) = (6, 2, 32, 700);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let (k, v) = (rand_vec(&mut rng, (n + 1) * nkv * d), rand_vec(&mut rng, (n + 1) * nkv * d));
    let q = rand_vec(&mut rng, nq * d);
    let row = nkv * d;
    // Full attention (no dynamic part), a static part alone, a top-k selection, and weighted
    // samples (log-weights).
    for spec in ["full", "streaming:sinks=4,window=64", "oracle:k=40,sinks=4,window=64", "lsh-sample:sinks=4,window=64"]
    {
        let scale = 0.2;
        let host = {
            let mut c: KvCache = filled_cache(spec, gqa, d, &k[..n * row], &v[..n * row]);
            c.build(scale).unwrap();
            c.append(0, &k[n * row..], &v[n * row..]).unwrap();
            c.attend_decode(0, &q, scale).unwrap()
        };
        for mode in [DecodeMode::Hybrid, DecodeMode::Device] {
            let mut c: GpuCache = filled_cache(spec, gqa, d, &k[..n * row], &v[..n * row]);
            c.set_decode_mode(mode);
            c.build(scale).unwrap();
            c.append(0, &k[n * row..], &v[n * row..]).unwrap();
            let got = plain::to_vec(
                <G as NeedleBackend>::decode_attention(&mut c, 0, n, gpu(q.clone(), [1, nq, d]), scale).unwrap(),
            )
            .unwrap();
            let e = got.iter().zip(&host).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(e < 2e-5, "{spec} {mode:?}: max |Δ| {e}");
            if spec.starts_with("oracle") {
                assert!(c.stats.keys_selected > 0, "{spec} {mode:?}: the host selected");
            }
        }
    }
}

#[test]
fn a_loaded_cache_is_mirrored_to_the_device_on_first_use() {
    if skip() {
        return;
    }
    // The device mirror is rebuilt from the host rows whenever it is behind: a cache filled on
    // the host (as a loaded context is) decodes on the device as on the host.
    let mut rng = StdRng::seed_from_u64(4);
    let (nq, nkv, d, n) = (4, 2, 64, 300);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let row = nkv * d;
    let (k, v) = (rand_vec(&mut rng, (n + 2) * row), rand_vec(&mut rng, (n + 2) * row));
    let mut c: GpuCache = filled_cache("full", gqa, d, &k[..n * row], &v[..n * row]);
    c.build(0.125).unwrap();
    let mut outs = Vec::new();
    for step in 0..2 {
        let r = (n + step) * row..(n + step + 1) * row;
        c.append(0, &k[r.clone()], &v[r]).unwrap();
        let q = rand_vec(&mut rng, nq * d);
        let got = plain::to_vec(
            <G as NeedleBackend>::decode_attention(&mut c, 0, n + step, gpu(q.clone(), [1, nq, d]), 0.125).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = (0..(n + step + 1) as u32).collect();
        for h in 0..nq {
            let j = gqa.kv_head_of(h);
            let p = needle_core::attention::attend::<f64>(
                &q[h * d..(h + 1) * d],
                c.keys(0, j) as &dyn RowSource,
                c.values(0, j),
                ids.iter().copied(),
                0.125,
            )
            .unwrap();
            for (a, b) in got[h * d..(h + 1) * d].iter().zip(&p.out) {
                assert!((*a as f64 - b).abs() < 1e-5, "step {step} head {h}");
            }
        }
        outs.push(got);
    }
    assert_ne!(outs[0], outs[1]);
}

/// Prefill (`step(cache, None)`), then 4 greedy decode steps: the logits of each.
/// One step of [`greedy_logits`]: the prefill (`None`) or the decode of a token.
type Step<'a, M> = &'a dyn Fn(&mut KvCache<M>, Option<u32>) -> Vec<f32>;

fn greedy_logits<M: Default>(step: Step<'_, M>, spec: &str, mode: DecodeMode) -> Vec<Vec<f32>> {
    let (f, sel) = compose(needle_select::parse(spec).unwrap());
    let mut cache = KvCache::new(2, GqaLayout::new(6, 2).unwrap(), 32, f.as_ref(), sel).unwrap();
    cache.set_decode_mode(mode);
    let mut out = vec![step(&mut cache, None)];
    for _ in 0..4 {
        let next = argmax(out.last().unwrap()).unwrap();
        out.push(step(&mut cache, Some(next)));
    }
    out
}

#[test]
fn random_weight_models_on_wgpu_match_the_cpu() {
    if skip() {
        return;
    }
    let cfg = tiny();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 300) as u32).collect();
    for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_K] {
        for mode in [DecodeMode::Hybrid, DecodeMode::Device] {
            let cpu = Llama::<Cpu>::load_with(
                &Checkpoint::random(&cfg, ty, 5).unwrap(),
                &Default::default(),
                &needle_model::LoadOptions { weights: needle_model::Weights::F32 },
            )
            .unwrap();
            let dev = Llama::<G>::random(&cfg, ty, 5, &WgpuDevice::default()).unwrap();
            for spec in ["full", "oracle:k=4,sinks=2,window=8"] {
                let cpu_step = |c: &mut KvCache, t: Option<u32>| match t {
                    None => cpu.prefill(&prompt, c, 7, &[prompt.len() - 1], &mut |_, _| {}).unwrap(),
                    Some(t) => cpu.decode(t, c).unwrap(),
                };
                let dev_step = |c: &mut GpuCache, t: Option<u32>| match t {
                    None => dev.prefill(&prompt, c, 7, &[prompt.len() - 1], &mut |_, _| {}).unwrap(),
                    Some(t) => dev.decode(t, c).unwrap(),
                };
                let want = greedy_logits(&cpu_step, spec, mode);
                let got = greedy_logits(&dev_step, spec, mode);
                let top = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
                let e =
                    want.iter().flatten().zip(got.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // Against the f32 CPU path only float rounding differs.
                assert!(e <= 1e-4 * top.max(1.0), "{ty:?} {mode:?} {spec}: max |Δlogit| {e} (largest {top})");
                for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(argmax(a), argmax(b), "{ty:?} {mode:?} {spec}: top-1 at step {i}");
                }
            }
        }
    }
}

/// Every host row of `cache`, layer by layer, KV head by KV head: keys then values.
fn host_rows<M>(cache: &KvCache<M>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for l in 0..cache.n_layers() {
        for j in 0..cache.gqa().n_kv_heads {
            for rows in [cache.keys(l, j), cache.values(l, j)] {
                let mut v = Vec::new();
                for i in 0..rows.len() {
                    RowSource::row(rows, i).extend_into(&mut v);
                }
                out.push(v);
            }
        }
    }
    out
}

/// A decode step on the device keeps a layer's new row on the device when the host has no
/// dynamic part to select from (`full`; a context within sinks + window) and hands the rows of
/// all such layers to the host once, at the step's last layer: the host rows, the selectors'
/// inserts and the stats end each step as the CPU path's do. `oracle:…,window=22` after a
/// 23-token prompt has no dynamic part at the first step and one from the second on (whose
/// append inserts into the selector), so both kinds of step, and the switch, run.
#[test]
fn decode_rows_reach_the_host_once_per_step_as_on_the_cpu() {
    if skip() {
        return;
    }
    let cfg = tiny();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 41 % 300) as u32).collect();
    let ty = QuantType::Q8_0;
    let cpu = Llama::<Cpu>::load_with(
        &Checkpoint::random(&cfg, ty, 9).unwrap(),
        &Default::default(),
        &needle_model::LoadOptions { weights: needle_model::Weights::F32 },
    )
    .unwrap();
    let dev = Llama::<G>::random(&cfg, ty, 9, &WgpuDevice::default()).unwrap();
    for (spec, mode) in [
        ("oracle:k=3,sinks=2,window=22", DecodeMode::Hybrid),
        ("oracle:k=3,sinks=2,window=22", DecodeMode::Device),
        ("full", DecodeMode::Hybrid),
    ] {
        fn new<M: Default>(spec: &str, mode: DecodeMode) -> KvCache<M> {
            let (f, sel) = compose(needle_select::parse(spec).unwrap());
            let mut c = KvCache::new(2, GqaLayout::new(6, 2).unwrap(), 32, f.as_ref(), sel).unwrap();
            c.set_decode_mode(mode);
            c
        }
        let (mut hc, mut dc): (KvCache, GpuCache) = (new(spec, mode), new(spec, mode));
        let last = prompt.len() - 1;
        let mut want = cpu.prefill(&prompt, &mut hc, 8, &[last], &mut |_, _| {}).unwrap();
        let mut got = dev.prefill(&prompt, &mut dc, 8, &[last], &mut |_, _| {}).unwrap();
        for step in 0..4 {
            let next = argmax(&want).unwrap();
            assert_eq!(argmax(&got), Some(next), "{spec} {mode:?}: top-1 before step {step}");
            want = cpu.decode(next, &mut hc).unwrap();
            got = dev.decode(next, &mut dc).unwrap();
            let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let e = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(e <= 1e-4 * top.max(1.0), "{spec} {mode:?} step {step}: max |Δlogit| {e}");
            for l in 0..2 {
                assert_eq!(dc.layer_len(l).unwrap(), hc.layer_len(l).unwrap(), "{spec} {mode:?} step {step} layer {l}");
            }
            for (a, b) in host_rows(&hc).iter().zip(&host_rows(&dc)) {
                assert_eq!(a.len(), b.len(), "{spec} {mode:?} step {step}: host rows");
                let e = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(e < 1e-4, "{spec} {mode:?} step {step}: host rows differ by {e}");
            }
            let (s, t) = (&hc.stats, &dc.stats);
            let counts = |s: &needle_model::DecodeStats| {
                (s.keys_total, s.keys_dynamic, s.keys_attended, s.keys_selected, s.steps)
            };
            assert_eq!(counts(s), counts(t), "{spec} {mode:?} step {step}: stats");
        }
        if spec.starts_with("oracle") {
            assert!(dc.stats.keys_selected > 0, "{spec} {mode:?}: the host selected");
        }
    }
}

/// The rows a device decode step keeps back stay off the host until the step's last layer (or
/// until a chunk needs the host rows), and arrive intact.
#[test]
fn a_device_decode_step_holds_its_rows_until_the_last_layer() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(11);
    let (nq, nkv, d, n, layers) = (4, 2, 32, 40, 3);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let (f, sel) = compose(needle_select::parse("full").unwrap());
    let mut c: GpuCache = KvCache::new(layers, gqa, d, f.as_ref(), sel).unwrap();
    let scale = 0.17;
    let mut fed: Vec<Vec<f32>> = vec![Vec::new(); layers];
    let mut attend = |c: &mut GpuCache, l: usize, t: usize, step: AttentionStep, fed: &mut Vec<Vec<f32>>| {
        let (q, k) = (rand_vec(&mut rng, t * nq * d), rand_vec(&mut rng, t * nkv * d));
        fed[l].extend_from_slice(&k);
        let v = k.iter().map(|x| x * 0.5).collect::<Vec<_>>();
        cached_attention(c, l, step, gpu(q, [t, nq, d]), gpu(k, [t, nkv, d]), gpu(v, [t, nkv, d]), scale).unwrap()
    };
    for l in 0..layers {
        attend(&mut c, l, n, AttentionStep::Prefill, &mut fed);
    }
    c.build(scale).unwrap();
    // A whole step: layers 0 and 1 wait for layer 2.
    for l in 0..layers {
        attend(&mut c, l, 1, AttentionStep::Decode, &mut fed);
        let want = if l + 1 == layers { n + 1 } else { n };
        assert_eq!(c.layer_len(l).unwrap(), want, "layer {l} after its decode");
    }
    assert!((0..layers).all(|l| c.layer_len(l).unwrap() == n + 1));
    // Half a step, then a chunk of two tokens: the held rows go first.
    attend(&mut c, 0, 1, AttentionStep::Decode, &mut fed);
    assert_eq!(c.layer_len(0).unwrap(), n + 1, "held back");
    attend(&mut c, 0, 2, AttentionStep::Extend, &mut fed);
    assert_eq!(c.layer_len(0).unwrap(), n + 4);
    // And settle_host_rows alone.
    attend(&mut c, 1, 1, AttentionStep::Decode, &mut fed);
    <G as NeedleBackend>::settle_host_rows(&mut c).unwrap();
    assert_eq!(c.layer_len(1).unwrap(), n + 2);
    for (l, fed) in fed.iter().enumerate() {
        let mut keys = Vec::new();
        for i in 0..c.layer_len(l).unwrap() {
            for j in 0..nkv {
                RowSource::row(c.keys(l, j), i).extend_into(&mut keys);
            }
        }
        assert_eq!(&keys, fed, "layer {l}: host keys in order");
    }
}

/// Times one layer's hybrid decode step against its two halves run alone: the device's static
/// part (kernel, read back) and the host's selection + attention of the picked rows. Prints
/// the medians; `hybrid < device + host` is overlap. Ignored (a timing, not a check): run with
/// `cargo test -p needle-model --features wgpu --test wgpu_arms -- --ignored --nocapture overlap`.
/// `NEEDLE_OVERLAP_ROWS` sets the context (default 32,768 rows).
#[test]
#[ignore]
fn hybrid_decode_overlap() {
    use needle_kernels_cubecl::{DecodeOptions, DeviceKv, decode_attention, wgpu_client};
    use std::time::Instant;
    let n: usize = std::env::var("NEEDLE_OVERLAP_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(32_768);
    // One layer of Llama-3-8B's attention shape: 32 query heads over 8 KV heads of 128.
    let (nq, nkv, d) = (32, 8, 128);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let row = nkv * d;
    let mut rng = StdRng::seed_from_u64(6);
    let (k, v) = (rand_vec(&mut rng, (n + 1) * row), rand_vec(&mut rng, (n + 1) * row));
    // The retrieval frame (128 sinks, 512 window) with an exact top-100 over the dynamic part:
    // the host scans every dynamic key, as a flat index would.
    let spec = "oracle:k=100,sinks=128,window=512";
    let scale = 1.0 / (d as f32).sqrt();
    let mut c: GpuCache = filled_cache(spec, gqa, d, &k[..n * row], &v[..n * row]);
    c.build(scale).unwrap();
    c.append(0, &k[n * row..], &v[n * row..]).unwrap();
    let statics: Vec<Vec<u32>> = (0..nkv).map(|j| c.static_part(0, j).static_ids(n + 1).collect()).collect();
    let lists: Vec<&[u32]> = statics.iter().map(Vec::as_slice).collect();
    let client = wgpu_client().unwrap();
    let kv = DeviceKv::upload(&client, &k, &v, n + 1, nkv, d).unwrap();
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (mut dev, mut host, mut hybrid) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..12 {
        let q = rand_vec(&mut rng, nq * d);
        let t = Instant::now();
        decode_attention(&client, &kv, &q, nq, &lists, None, scale, DecodeOptions::default()).unwrap();
        let t_dev = t.elapsed().as_secs_f64();
        let t = Instant::now();
        c.decode_dynamic(0, &q, scale, true).unwrap();
        let t_host = t.elapsed().as_secs_f64();
        let qt = gpu(q, [1, nq, d]);
        // The query is on the device before the clock starts, as after the q projection.
        let qt = Tensor::<G, 3>::from_data(qt.into_data(), &WgpuDevice::default());
        let t = Instant::now();
        plain::to_vec(<G as NeedleBackend>::decode_attention(&mut c, 0, n, qt, scale).unwrap()).unwrap();
        let t_hyb = t.elapsed().as_secs_f64();
        // The first steps compile kernels and fill the device mirror.
        if i >= 2 {
            dev.push(t_dev);
            host.push(t_host);
            hybrid.push(t_hyb);
        }
    }
    let (dv, hs, hy) = (median(dev), median(host), median(hybrid));
    eprintln!(
        "hybrid decode, one layer, {n} rows, 32q/8kv×128, {spec}: device static part alone {:.2} ms, \
         host selection + retrieved rows alone {:.2} ms, sum {:.2} ms, hybrid step {:.2} ms (overlap saves {:.2} ms)",
        dv * 1e3,
        hs * 1e3,
        (dv + hs) * 1e3,
        hy * 1e3,
        (dv + hs - hy) * 1e3
    );
}

/// The device mirror's configurations the tests below run through: KV precision, a device
/// budget (bytes, all layers) and a forced buffer size (rows per device buffer).
const KVS: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8];

/// A one-layer cache of `n` random rows in `kv`, selectors of `spec`, with an optional device
/// budget and buffer size.
fn kv_cache<M: Default>(spec: &str, kv: KvDtype, gqa: GqaLayout, d: usize, k: &[f32], v: &[f32]) -> KvCache<M> {
    let (f, mut sel) = compose(needle_select::parse(spec).unwrap());
    sel.kv = kv;
    let mut cache = KvCache::new(1, gqa, d, f.as_ref(), sel).unwrap();
    cache.append(0, k, v).unwrap();
    cache
}

fn device_budget(c: &mut GpuCache, bytes: Option<u64>, rows_per_buffer: Option<usize>) {
    if let Some(b) = bytes {
        c.set_kv_budget(TierBudget { device: Some(b), host: None, disk: None }, &std::env::temp_dir()).unwrap();
    }
    if let Some(r) = rows_per_buffer {
        c.mirror_mut().set_segment_rows(r);
    }
}

/// Decode on the device in f32, f16 and q8 KV, whole, under a device budget smaller than the
/// context (the rows off the device attended on the host and merged), and split over small
/// buffers, against the host's decode of the same cache; two steps, so the ring of recent rows
/// wraps. The device's bytes stay within the budget.
#[test]
fn decode_in_every_kv_precision_under_a_device_budget_and_over_small_buffers_matches_the_host() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(21);
    let (nq, nkv, d, n) = (6, 2, 32, 600);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let row = nkv * d;
    let (k, v) = (rand_vec(&mut rng, (n + 2) * row), rand_vec(&mut rng, (n + 2) * row));
    let qs = [rand_vec(&mut rng, nq * d), rand_vec(&mut rng, nq * d)];
    // 120,000 B: 234 rows in f32 (K and V of 2 heads × 32), 468 in f16: fewer than the 602.
    let budget = 120_000;
    let scale = 0.2;
    for kv in KVS {
        for spec in
            ["full", "streaming:sinks=4,window=64", "oracle:k=40,sinks=4,window=64", "lsh-sample:sinks=4,window=64"]
        {
            let mut host: KvCache = kv_cache(spec, kv, gqa, d, &k[..n * row], &v[..n * row]);
            host.build(scale).unwrap();
            let mut want = Vec::new();
            for (s, q) in qs.iter().enumerate() {
                let r = (n + s) * row..(n + s + 1) * row;
                host.append(0, &k[r.clone()], &v[r]).unwrap();
                want.push(host.attend_decode(0, q, scale).unwrap());
            }
            for mode in [DecodeMode::Hybrid, DecodeMode::Device] {
                for (bytes, rows) in [(None, None), (Some(budget), None), (None, Some(70)), (Some(budget), Some(50))] {
                    let what = format!("{kv:?} {spec} {mode:?} budget {bytes:?} rows/buffer {rows:?}");
                    let mut c: GpuCache = kv_cache(spec, kv, gqa, d, &k[..n * row], &v[..n * row]);
                    c.set_decode_mode(mode);
                    device_budget(&mut c, bytes, rows);
                    c.build(scale).unwrap();
                    for (s, q) in qs.iter().enumerate() {
                        let r = (n + s) * row..(n + s + 1) * row;
                        c.append(0, &k[r.clone()], &v[r]).unwrap();
                        let got = plain::to_vec(
                            <G as NeedleBackend>::decode_attention(&mut c, 0, n + s, gpu(q.clone(), [1, nq, d]), scale)
                                .unwrap(),
                        )
                        .unwrap();
                        let e = got.iter().zip(&want[s]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        assert!(e < 2e-5, "{what} step {s}: max |Δ| {e}");
                    }
                    let dev = c.mirror().device_bytes();
                    if let Some(b) = bytes {
                        assert!(dev <= b, "{what}: {dev} device bytes over the budget {b}");
                    }
                    // f16 rows take half the bytes of f32 (q8 is mirrored in f32).
                    let per_row = if kv == KvDtype::F16 { 2 * row as u64 } else { 4 * row as u64 };
                    assert!(dev >= per_row * 2 * 200, "{what}: {dev} bytes hold fewer rows than the window");
                    if bytes.is_none() {
                        assert!(dev >= per_row * 2 * (n as u64 + 2), "{what}: every row on the device");
                    }
                    if let Some(r) = rows {
                        assert!(c.mirror().buffers(0) >= 4, "{what}: {r} rows per buffer");
                    }
                }
            }
        }
    }
}

/// Prefill attention in every KV precision, whole on the device (f16 widened for the kernel),
/// and on the host when a device budget or small buffers leave the layer off the device,
/// against the CPU kernel over the same cache.
#[test]
fn prefill_in_every_kv_precision_and_past_the_device_budget_matches_the_cpu_kernel() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(22);
    let (nq, nkv, d, n, t) = (6, 2, 32, 200, 37);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let (k, v) = (rand_vec(&mut rng, n * nkv * d), rand_vec(&mut rng, n * nkv * d));
    let q = rand_vec(&mut rng, t * nq * d);
    let scale = 0.3;
    for kv in KVS {
        let mut host: KvCache = kv_cache("full", kv, gqa, d, &k, &v);
        let want = plain::to_vec(
            <Cpu as NeedleBackend>::paged_attention(
                &mut host,
                0,
                Tensor::from_data(TensorData::new(q.clone(), [t, nq, d]), &Default::default()),
                scale,
            )
            .unwrap(),
        )
        .unwrap();
        for (bytes, rows) in [(None, None), (Some(40_000), None), (None, Some(64))] {
            let mut c: GpuCache = kv_cache("full", kv, gqa, d, &k, &v);
            device_budget(&mut c, bytes, rows);
            let got = plain::to_vec(
                <G as NeedleBackend>::paged_attention(&mut c, 0, gpu(q.clone(), [t, nq, d]), scale).unwrap(),
            )
            .unwrap();
            let e = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(e < 1e-5, "{kv:?} budget {bytes:?} rows/buffer {rows:?}: max |Δ| {e}");
            if let Some(b) = bytes {
                assert!(c.mirror().device_bytes() <= b, "{kv:?}: over the budget");
            }
        }
    }
}

/// A device budget too small for the sinks and the newest row is refused, naming the option.
#[test]
fn a_device_budget_below_the_sinks_is_refused() {
    if skip() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(23);
    let (nq, nkv, d, n) = (4, 2, 32, 100);
    let gqa = GqaLayout::new(nq, nkv).unwrap();
    let (k, v) = (rand_vec(&mut rng, n * nkv * d), rand_vec(&mut rng, n * nkv * d));
    let mut c: GpuCache = kv_cache("streaming:sinks=4,window=16", KvDtype::F32, gqa, d, &k, &v);
    device_budget(&mut c, Some(4 * 512), None);
    c.build(0.2).unwrap();
    let q = rand_vec(&mut rng, nq * d);
    let e = <G as NeedleBackend>::decode_attention(&mut c, 0, n - 1, gpu(q, [1, nq, d]), 0.2).unwrap_err().to_string();
    assert!(e.contains("--kv-budget device") && e.contains("sinks"), "{e}");
}

/// Random-weight models in f16 and q8 KV, whole on the device, under a device budget smaller
/// than the context and over small buffers: the same greedy tokens as the CPU path with the
/// same KV precision, logits within float rounding, both decode modes.
#[test]
fn random_weight_models_in_f16_and_q8_kv_and_under_a_device_budget_match_the_cpu() {
    if skip() {
        return;
    }
    let cfg = tiny();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 300) as u32).collect();
    let ty = QuantType::Q8_0;
    let cpu = Llama::<Cpu>::load_with(
        &Checkpoint::random(&cfg, ty, 5).unwrap(),
        &Default::default(),
        &needle_model::LoadOptions { weights: needle_model::Weights::F32 },
    )
    .unwrap();
    let dev = Llama::<G>::random(&cfg, ty, 5, &WgpuDevice::default()).unwrap();
    // 2 layers × 12 rows of 512 B (f32; 24 rows in f16) against 23 + 5 tokens.
    let budget = 2 * 12 * 512;
    fn new<M: Default>(spec: &str, kv: KvDtype, mode: DecodeMode) -> KvCache<M> {
        let (f, mut sel) = compose(needle_select::parse(spec).unwrap());
        sel.kv = kv;
        let mut c = KvCache::new(2, GqaLayout::new(6, 2).unwrap(), 32, f.as_ref(), sel).unwrap();
        c.set_decode_mode(mode);
        c
    }
    for kv in [KvDtype::F16, KvDtype::Q8, KvDtype::F32] {
        for spec in ["full", "oracle:k=4,sinks=2,window=8"] {
            for mode in [DecodeMode::Hybrid, DecodeMode::Device] {
                for (bytes, rows) in [(None, None), (Some(budget), None), (None, Some(5))] {
                    if kv == KvDtype::F32 && bytes.is_none() && rows.is_none() {
                        continue; // random_weight_models_on_wgpu_match_the_cpu
                    }
                    let what = format!("{kv:?} {spec} {mode:?} budget {bytes:?} rows/buffer {rows:?}");
                    let (mut hc, mut dc): (KvCache, GpuCache) = (new(spec, kv, mode), new(spec, kv, mode));
                    device_budget(&mut dc, bytes.map(|b| b as u64), rows);
                    let last = prompt.len() - 1;
                    let mut want = cpu.prefill(&prompt, &mut hc, 7, &[last], &mut |_, _| {}).unwrap();
                    let mut got = dev.prefill(&prompt, &mut dc, 7, &[last], &mut |_, _| {}).unwrap();
                    for step in 0..5 {
                        let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let e = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        assert!(e <= 1e-4 * top.max(1.0), "{what} step {step}: max |Δlogit| {e} (largest {top})");
                        let next = argmax(&want).unwrap();
                        assert_eq!(argmax(&got), Some(next), "{what}: top-1 at step {step}");
                        want = cpu.decode(next, &mut hc).unwrap();
                        got = dev.decode(next, &mut dc).unwrap();
                    }
                    if let Some(b) = bytes {
                        let used = dc.mirror().device_bytes();
                        assert!(used <= b as u64, "{what}: {used} device bytes over {b}");
                    }
                    if rows.is_some() {
                        assert!(dc.mirror().buffers(0) > 1, "{what}: several buffers");
                    }
                }
            }
        }
    }
}
