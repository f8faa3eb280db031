//! The GPU figures in one run (`cargo xtask test-gpu --build-only` bundles it; docs/benchmarks.md
//! §14): a random-weight model of a real shape on the CubeCL arm (CUDA with the `cuda` feature,
//! else wgpu), prefill and decode tokens/s against context length for full attention and
//! retrieval, and the effective bandwidth of the device's decode-attention kernel on the bytes
//! it reads (a retrieval step's gathered rows and a full step's), next to the device's own read
//! bandwidth measured by a reduction over a large buffer, and the quantized linear kernels alone
//! on layer 0's q_proj and up_proj: the GEMV (one token), one GEMV launch per token of a prefill
//! chunk (the prefill path before the tiled GEMM) and the tiled GEMM over the chunk; the prefill
//! attention kernels alone on a chunk at the end of each context: dense against block-sparse
//! (every block, and a pattern-like 10% mask). Prints one line per figure and writes
//! them as JSON (`--json`, a new file).
//!
//! ```sh
//! cargo run -p needle-model --features wgpu --example gpu_bench -- --small
//! gpu_bench --shape llama3-8b --layers 4 --contexts 4096,16384,32768 --json out.json
//! ```
//! Options: `--shape` (a config preset), `--layers` (the preset's first layers; default 4),
//! `--quant` (q4_0, q8_0, q4_k, f16; default q4_0), `--contexts`, `--decode` (tokens per run),
//! `--chunk` (prefill chunk), `--retrieval` (the retrieval selector's spec), `--budget-s` (no
//! new run starts past it), `--seed`, `--small` (lavapipe sizes: a two-KV-head model, short
//! contexts), `--json PATH`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn main() {
    eprintln!("gpu_bench needs needle-model's `wgpu` or `cuda` feature");
    std::process::exit(2);
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn main() {
    if let Err(e) = bench::main() {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod bench {
    use std::error::Error;
    use std::path::PathBuf;
    use std::time::Instant;

    use burn::tensor::Tensor;
    use burn::tensor::backend::BackendTypes;
    use needle_kernels_cubecl::cubecl::prelude::ComputeClient;
    use needle_kernels_cubecl::{DeviceKv, DeviceQMatrix, DeviceRowLists, launch_decode, launch_gemm, launch_gemv};
    use needle_loader::{Checkpoint, LlamaConfig};
    use needle_model::{KvCache, Llama, QWeight, QuantType, argmax, compose};
    use serde_json::{Value, json};

    #[cfg(feature = "cuda")]
    type G = needle_model::cube::CudaCube;
    #[cfg(feature = "cuda")]
    type Rt = needle_kernels_cubecl::cubecl::cuda::CudaRuntime;
    #[cfg(not(feature = "cuda"))]
    type G = needle_model::cube::WgpuCube;
    #[cfg(not(feature = "cuda"))]
    type Rt = needle_kernels_cubecl::cubecl::wgpu::WgpuRuntime;

    type Res<T> = Result<T, Box<dyn Error>>;

    struct Args {
        shape: String,
        layers: usize,
        quant: QuantType,
        contexts: Vec<usize>,
        decode: usize,
        chunk: usize,
        retrieval: String,
        budget_s: f64,
        seed: u64,
        small: bool,
        json: Option<PathBuf>,
    }

    fn parse() -> Res<Args> {
        let mut a = Args {
            shape: "llama3-8b".into(),
            layers: 4,
            quant: QuantType::Q4_0,
            contexts: vec![4096, 16_384, 32_768],
            decode: 16,
            chunk: 2048,
            retrieval: "retrieval".into(),
            budget_s: 200.0,
            seed: 7,
            small: false,
            json: None,
        };
        let mut it = std::env::args().skip(1);
        let mut contexts_given = false;
        while let Some(flag) = it.next() {
            if flag == "--small" {
                a.small = true;
                continue;
            }
            let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--shape" => a.shape = val,
                "--layers" => a.layers = val.parse()?,
                "--quant" => {
                    a.quant = match val.to_ascii_lowercase().as_str() {
                        "q4_0" => QuantType::Q4_0,
                        "q8_0" => QuantType::Q8_0,
                        "q4_k" => QuantType::Q4_K,
                        "f16" => QuantType::F16,
                        other => return Err(format!("--quant {other:?}: q4_0, q8_0, q4_k or f16").into()),
                    }
                }
                "--contexts" => {
                    a.contexts = val.split(',').map(str::parse).collect::<Result<_, _>>()?;
                    contexts_given = true;
                }
                "--decode" => a.decode = val.parse()?,
                "--chunk" => a.chunk = val.parse()?,
                "--retrieval" => a.retrieval = val,
                "--budget-s" => a.budget_s = val.parse()?,
                "--seed" => a.seed = val.parse()?,
                "--json" => a.json = Some(val.into()),
                other => return Err(format!("unknown option {other}").into()),
            }
        }
        if a.small && !contexts_given {
            a.contexts = vec![1024, 2048];
        }
        if a.small {
            a.decode = a.decode.min(4);
            a.chunk = a.chunk.min(256);
        }
        if a.contexts.iter().any(|&c| c < 2) || a.layers == 0 || a.chunk == 0 {
            return Err("--contexts must be ≥ 2 each, --layers and --chunk ≥ 1".into());
        }
        if let Some(p) = a.json.as_ref().filter(|p| p.exists()) {
            return Err(format!("--json {}: the file exists (never overwritten)", p.display()).into());
        }
        Ok(a)
    }

    /// The preset with `layers` layers; `small` cuts it to two KV heads at the real GQA ratio
    /// and head size, and a 1,024-wide MLP and vocabulary.
    fn config(a: &Args) -> Res<LlamaConfig> {
        let mut c = LlamaConfig::preset(&a.shape)?;
        c.num_hidden_layers = a.layers.min(c.num_hidden_layers);
        if a.small {
            let ratio = c.num_attention_heads / c.num_key_value_heads;
            c.num_key_value_heads = c.num_key_value_heads.min(2);
            c.num_attention_heads = ratio * c.num_key_value_heads;
            c.hidden_size = c.num_attention_heads * c.head_dim;
            c.intermediate_size = 1024;
            c.vocab_size = 1024;
        }
        c.bos_token_id = None;
        c.eos_token_ids.clear();
        c.validate()?;
        Ok(c)
    }

    /// SplitMix64: the same tokens and rows for a seed.
    fn splitmix(s: &mut u64) -> u64 {
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Prefill `context` random tokens through `spec`, then decode greedily.
    fn model_run(model: &Llama<G>, a: &Args, context: usize, spec: &str) -> Res<Value> {
        let cfg = model.config();
        let (factory, sel) = compose(needle_select::parse(spec)?);
        let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
        let mut s = a.seed ^ context as u64;
        let prompt: Vec<u32> = (0..context).map(|_| (splitmix(&mut s) % cfg.vocab_size as u64) as u32).collect();
        let t0 = Instant::now();
        let logits = model.prefill(&prompt, &mut cache, a.chunk, &[context - 1], &mut |_, _| {})?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut next = argmax(&logits).ok_or("empty logits")?;
        // One untimed step: the decode kernels compile on first use.
        next = argmax(&model.decode(next, &mut cache)?).ok_or("empty logits")?;
        cache.stats = Default::default();
        let t0 = Instant::now();
        for _ in 0..a.decode {
            next = argmax(&model.decode(next, &mut cache)?).ok_or("empty logits")?;
        }
        let decode_s = t0.elapsed().as_secs_f64();
        let st = &cache.stats;
        let share = if st.keys_total > 0 { st.keys_attended as f64 / st.keys_total as f64 } else { 1.0 };
        let v = json!({
            "context": context, "selector": spec, "prefill_seconds": prefill_s,
            "prefill_tokens_per_second": context as f64 / prefill_s,
            "decode_tokens": a.decode, "decode_seconds": decode_s,
            "decode_tokens_per_second": a.decode as f64 / decode_s,
            "keys_attended_share": share,
            "select_seconds": st.select_time.as_secs_f64(), "attend_seconds": st.attend_time.as_secs_f64(),
        });
        println!(
            "model {} ×{} layers, context {context}, {spec}: prefill {:.1} tok/s, decode {:.2} tok/s, keys attended {:.2}%",
            a.shape,
            cfg.num_hidden_layers,
            context as f64 / prefill_s,
            a.decode as f64 / decode_s,
            100.0 * share
        );
        Ok(v)
    }

    /// Seconds per call of `f`, over `iters` calls after one warm-up; `sync` waits for the device.
    fn time(iters: usize, mut f: impl FnMut() -> Res<()>, sync: impl Fn() -> Res<()>) -> Res<f64> {
        f()?;
        sync()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        sync()?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    /// The decode-attention kernel alone over `n` rows of one layer: a retrieval step's rows
    /// (128 sinks, a 512 window, 100 picked ids scattered over the rest, per KV head) and every
    /// row (full attention). Bandwidth = K and V bytes of the rows read (plus the ids) / time.
    fn attention_bandwidth(client: &ComputeClient<Rt>, cfg: &LlamaConfig, n: usize, iters: usize) -> Res<Value> {
        let (nq, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let mut s = 99u64;
        let mut rnd = |len: usize| -> Vec<f32> {
            (0..len).map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
        };
        let (k, v, q) = (rnd(n * nkv * d), rnd(n * nkv * d), rnd(nq * d));
        let kv = DeviceKv::upload(client, &k, &v, n, nkv, d)?;
        drop((k, v));
        let qh = client.create_from_slice(f32_bytes(&q));
        let out = client.empty(nq * d * 4);
        let lse = client.empty(nq * 4);
        let mut s = 5u64;
        let (sinks, window, picked) = (128.min(n / 4), 512.min(n / 4), 100);
        let sparse: Vec<Vec<u32>> = (0..nkv)
            .map(|_| {
                let mut ids: Vec<u32> = (0..sinks as u32).chain((n - window) as u32..n as u32).collect();
                let span = (n - window - sinks) as u64;
                let mut p: Vec<u32> = (0..picked.min(span as usize))
                    .map(|_| sinks as u32 + (splitmix(&mut s) % span.max(1)) as u32)
                    .collect();
                p.sort_unstable();
                p.dedup();
                ids.extend(p);
                ids
            })
            .collect();
        let all: Vec<Vec<u32>> = (0..nkv).map(|_| (0..n as u32).collect()).collect();
        let sync = || -> Res<()> {
            client.read_one(lse.clone()).map_err(|e| format!("read back: {e:?}"))?;
            Ok(())
        };
        let mut res = serde_json::Map::new();
        for (name, lists) in [("sparse", &sparse), ("full", &all)] {
            let refs: Vec<&[u32]> = lists.iter().map(Vec::as_slice).collect();
            let dl = DeviceRowLists::upload(client, &refs, None, n)?;
            let rows: usize = lists.iter().map(Vec::len).sum();
            let bytes = rows * d * 4 * 2 + rows * 4 + nq * d * 4;
            let chunk = needle_kernels_cubecl::decode::DEFAULT_CHUNK_ROWS;
            let secs = time(
                iters,
                || {
                    launch_decode(client, &kv, &qh, nq, &dl, 0.088, chunk, &out, &lse)?;
                    Ok(())
                },
                sync,
            )?;
            let gbps = bytes as f64 / secs / 1e9;
            println!(
                "decode attention kernel, {n} rows, {nq}q/{nkv}kv×{d}, {name}: {rows} rows read, {:.1} µs, {gbps:.1} GB/s",
                secs * 1e6
            );
            res.insert(
                name.into(),
                json!({"rows_read": rows, "bytes": bytes, "seconds": secs, "gigabytes_per_second": gbps}),
            );
        }
        res.insert("context".into(), json!(n));
        Ok(Value::Object(res))
    }

    /// The prefill attention kernels alone on the last `t` queries of `n` rows of one layer (blocks
    /// of 64): the dense kernel, the block-sparse one with every block listed (its overhead) and
    /// with a pattern-like mask (the first block, the two local ones and 10% of the others, drawn
    /// per query block and KV head). Speed-up = the dense kernel's time / the sparse one's.
    fn prefill_kernels(client: &ComputeClient<Rt>, cfg: &LlamaConfig, n: usize, t: usize, iters: usize) -> Res<Value> {
        let (nq, nkv, d, block) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 64);
        let (t, mut s) = (t.min(n), 77u64);
        let start = n - t;
        let mut rnd = |len: usize| -> Vec<f32> {
            (0..len).map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
        };
        let (k, v, q) = (rnd(n * nkv * d), rnd(n * nkv * d), rnd(t * nq * d));
        let kv = DeviceKv::upload(client, &k, &v, n, nkv, d)?;
        drop((k, v));
        let qh = client.create_from_slice(f32_bytes(&q));
        let (out, lse) = (client.empty(t * nq * d * 4), client.empty(t * nq * 4));
        let sync = || -> Res<()> {
            client.read_one(lse.clone()).map_err(|e| format!("read back: {e:?}"))?;
            Ok(())
        };
        let dense = time(
            iters,
            || Ok(needle_kernels_cubecl::launch_prefill(client, &kv, &qh, nq, t, start, 0.088, &out, &lse)?),
            sync,
        )?;
        println!(
            "prefill attention kernel, {t} queries after {start} rows, {nq}q/{nkv}kv×{d}: dense {:.1} µs",
            dense * 1e6
        );
        let mut res = json!({"context": n, "queries": t, "block": block, "dense_seconds": dense});
        let mut s = 13u64;
        for (name, share) in [("every", 1.0), ("sparse", 0.1)] {
            let heads: Vec<(Vec<usize>, Vec<u32>)> = (0..nkv)
                .map(|_| {
                    let (mut offsets, mut blocks) = (vec![0], Vec::new());
                    for qb in start / block..=(n - 1) / block {
                        let keep = |kb: usize, s: &mut u64| {
                            kb == 0 || kb + 2 > qb || (splitmix(s) % 1000) as f64 <= 1000.0 * share
                        };
                        blocks.extend((0..=qb).filter(|&kb| keep(kb, &mut s)).map(|kb| kb as u32));
                        offsets.push(blocks.len());
                    }
                    (offsets, blocks)
                })
                .collect();
            let refs: Vec<(&[usize], &[u32])> = heads.iter().map(|(o, b)| (&o[..], &b[..])).collect();
            let lists = needle_kernels_cubecl::DeviceBlockLists::upload(client, block, start, t, &refs)?;
            let kept: usize = heads.iter().map(|(_, b)| b.len()).sum();
            let all = nkv * (start / block..=(n - 1) / block).map(|qb| qb + 1).sum::<usize>();
            let secs = time(
                iters,
                || {
                    needle_kernels_cubecl::launch_sparse_prefill(
                        client, &kv, &qh, nq, t, start, 0.088, &lists, &out, &lse,
                    )?;
                    Ok(())
                },
                sync,
            )?;
            println!(
                "  block-sparse, {name}: {kept} of {all} key blocks, {:.1} µs, {:.2}× the dense kernel's speed",
                secs * 1e6,
                dense / secs
            );
            res[name] = json!({"blocks_kept": kept, "blocks_dense": all, "seconds": secs, "speedup": dense / secs});
        }
        Ok(res)
    }

    /// The quantized linear kernels alone on `name` (its blocks as the model holds them): the
    /// GEMV of one token, `t` GEMV launches (one per token: the prefill path before the tiled
    /// GEMM) and the tiled GEMM of `t` tokens; GFLOP/s on `2·rows·cols` per token and the GEMV's
    /// GB/s on the weight bytes.
    fn linear_kernels(client: &ComputeClient<Rt>, ck: &Checkpoint, name: &str, t: usize, iters: usize) -> Res<Value> {
        let raw = ck.tensor_blocks(name)?.ok_or_else(|| format!("{name}: no blocks"))?;
        let w = QWeight::from_raw(name, raw)?;
        let (rows, cols) = (w.rows(), w.cols());
        if w.ty() == QuantType::F32 {
            return Err(format!("{name} is F32: no block kernel").into());
        }
        let m = w.matrix()?;
        let bytes: Vec<u8> = (0..rows).flat_map(|r| m.row_bytes(r).iter().copied()).collect();
        let dq = DeviceQMatrix::upload(client, w.ty(), rows, cols, &bytes)?;
        let mut s = 3u64;
        let x: Vec<f32> = (0..t * cols).map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
        let xh = client.create_from_slice(f32_bytes(&x));
        let y = client.empty(t * rows * 4);
        // Waits for the queued launches without reading `y` back (a chunk's output is megabytes).
        let sync = || -> Res<()> {
            needle_kernels_cubecl::cubecl::future::block_on(client.sync()).map_err(|e| format!("sync: {e:?}"))?;
            Ok(())
        };
        let gemv_s = time(iters, || Ok(launch_gemv(client, &dq, &xh, &y)?), sync)?;
        let per_token_s = time(
            iters.div_ceil(t).max(2),
            || {
                for _ in 0..t {
                    launch_gemv(client, &dq, &xh, &y)?;
                }
                Ok(())
            },
            sync,
        )?;
        let gemm_s = time(iters.div_ceil(t).max(2), || Ok(launch_gemm(client, &dq, &xh, &y, t)?), sync)?;
        let flop = 2.0 * (rows * cols) as f64;
        let gflops = |secs: f64, tokens: usize| flop * tokens as f64 / secs / 1e9;
        println!(
            "linear {name} {rows}×{cols} {:?}: GEMV {:.1} µs ({:.1} GB/s of weights); {t} tokens: one GEMV per token {:.1} GFLOP/s, tiled GEMM {:.1} GFLOP/s ({:.2}×)",
            w.ty(),
            gemv_s * 1e6,
            bytes.len() as f64 / gemv_s / 1e9,
            gflops(per_token_s, t),
            gflops(gemm_s, t),
            per_token_s / gemm_s
        );
        Ok(json!({
            "weight": name, "rows": rows, "cols": cols, "type": format!("{:?}", w.ty()), "weight_bytes": bytes.len(),
            "tokens": t, "gemv_seconds": gemv_s, "gemv_per_token_seconds": per_token_s, "gemm_seconds": gemm_s,
            "gemm_gflops": gflops(gemm_s, t), "gemm_speedup_over_gemv_per_token": per_token_s / gemm_s,
        }))
    }

    fn f32_bytes(x: &[f32]) -> &[u8] {
        bytemuck::cast_slice(x)
    }

    /// The device's read bandwidth as a reduction over `n` f32 sees it (burn's sum kernel).
    fn read_bandwidth(device: &<G as BackendTypes>::Device, n: usize, iters: usize) -> Res<f64> {
        let x = Tensor::<G, 1>::ones([n], device);
        let secs = time(
            iters,
            || {
                let _ = x.clone().sum();
                Ok(())
            },
            || {
                x.clone().slice(0..1).into_data();
                Ok(())
            },
        )?;
        Ok((n * 4) as f64 / secs / 1e9)
    }

    pub fn main() -> Res<()> {
        let a = parse()?;
        let start = Instant::now();
        let cfg = config(&a)?;
        let device = <G as BackendTypes>::Device::default();
        let client = needle_kernels_cubecl::open_client::<Rt>(&device)?;
        let read_gbps = read_bandwidth(&device, if a.small { 1 << 22 } else { 1 << 28 }, if a.small { 3 } else { 20 })?;
        println!("device read bandwidth (a sum over a buffer): {read_gbps:.1} GB/s");
        let mut kernels = Vec::new();
        for &n in &a.contexts {
            let k = attention_bandwidth(&client, &cfg, n, if a.small { 2 } else { 50 })?;
            if let Some(g) = k["sparse"]["gigabytes_per_second"].as_f64() {
                println!("  sparse decode attention at {n}: {:.0}% of the read bandwidth", 100.0 * g / read_gbps);
            }
            kernels.push(k);
        }
        let mut prefill = Vec::new();
        for &n in &a.contexts {
            prefill.push(prefill_kernels(&client, &cfg, n, a.chunk, if a.small { 2 } else { 20 })?);
        }
        let t0 = Instant::now();
        let ck = Checkpoint::random(&cfg, a.quant, a.seed)?;
        let model = Llama::<G>::load(&ck, &device)?;
        let build_s = t0.elapsed().as_secs_f64();
        println!(
            "model {}: {} layers, hidden {}, {}q/{}kv×{}, vocab {}, {:?} weights ({:.2} GiB), made in {build_s:.1} s",
            a.shape,
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.vocab_size,
            a.quant,
            model.weight_bytes() as f64 / (1u64 << 30) as f64
        );
        let mut linears = Vec::new();
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"] {
            linears.push(linear_kernels(&client, &ck, name, a.chunk.min(512), if a.small { 4 } else { 200 })?);
        }
        drop(ck);
        let mut runs = Vec::new();
        let mut skipped = Vec::new();
        for &context in &a.contexts {
            for spec in ["full", a.retrieval.as_str()] {
                if start.elapsed().as_secs_f64() > a.budget_s {
                    skipped.push(json!({"context": context, "selector": spec}));
                    continue;
                }
                runs.push(model_run(&model, &a, context, spec)?);
            }
        }
        for &context in &a.contexts {
            let tps = |spec: &str| {
                runs.iter()
                    .find(|r| r["context"] == context && r["selector"] == spec)
                    .and_then(|r| r["decode_tokens_per_second"].as_f64())
            };
            if let (Some(f), Some(r)) = (tps("full"), tps(&a.retrieval)) {
                println!("decode at {context}: {} / full = {:.2}×", a.retrieval, r / f);
            }
        }
        if !skipped.is_empty() {
            println!("skipped past --budget-s {}: {skipped:?}", a.budget_s);
        }
        let v = json!({
            "runtime": std::any::type_name::<Rt>(), "shape": a.shape, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "quant": format!("{:?}", a.quant),
            "weight_bytes": model.weight_bytes(), "build_seconds": build_s, "small": a.small,
            "read_gigabytes_per_second": read_gbps, "attention_kernel": kernels, "prefill_kernel": prefill, "linear_kernels": linears, "model": runs,
            "skipped": skipped, "seconds": start.elapsed().as_secs_f64(),
        });
        if let Some(path) = &a.json {
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(&v)?)?;
            std::fs::rename(&tmp, path)?;
            println!("wrote {}", path.display());
        }
        Ok(())
    }
}
