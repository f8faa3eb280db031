//! The Flex `NeedleBackend` ops (needle-kernels-cpu) against the plain Burn-op implementations.
#![allow(clippy::unwrap_used)]

mod common;

use burn::tensor::{Tensor, TensorData};
use needle_core::{GqaLayout, KvDtype, RowSource};
use needle_model::backend::{flex, plain};
use needle_model::{Cpu, KvCache, LinearWeight, NeedleBackend, QWeight, compose};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

fn max_diff<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (plain::to_vec(a).unwrap(), plain::to_vec(b).unwrap());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn rms_norm_rope_silu_match_burn_ops() {
    let mut rng = StdRng::seed_from_u64(7);
    let (t, h, d) = (5, 3, 8);
    let x = tensor(rand_vec(&mut rng, t * h * d), [t, h * d]);
    let w = tensor(rand_vec(&mut rng, h * d), [1, h * d]);
    let e = max_diff(flex::rms_norm(x.clone(), &w, 1e-5).unwrap(), plain::rms_norm(x.clone(), &w, 1e-5));
    assert!(e < 1e-5, "rms_norm {e}");
    let x3 = x.clone().reshape([t, h, d]);
    let cos = tensor(rand_vec(&mut rng, t * d / 2), [t, d / 2]);
    let sin = tensor(rand_vec(&mut rng, t * d / 2), [t, d / 2]);
    let e = max_diff(flex::rope(x3.clone(), &cos, &sin).unwrap(), plain::rope(x3, &cos, &sin));
    assert!(e < 1e-5, "rope {e}");
    let up = tensor(rand_vec(&mut rng, t * h * d), [t, h * d]);
    let e = max_diff(flex::silu_mul(x.clone(), up.clone()).unwrap(), plain::silu_mul(x, up));
    assert!(e < 1e-5, "silu_mul {e}");
}

#[test]
fn f32_linear_matches_matmul_and_dispatch_picks_flex() {
    let mut rng = StdRng::seed_from_u64(8);
    let (t, rows, cols) = (3, 10, 64);
    let w = rand_vec(&mut rng, rows * cols);
    let q = QWeight::from_f32("w", &w, rows, cols).unwrap();
    let x = tensor(rand_vec(&mut rng, t * cols), [t, cols]);
    let want = x.clone().matmul(tensor(w, [rows, cols]).transpose());
    let e = max_diff(flex::qlinear(x.clone(), &q).unwrap(), want.clone());
    assert!(e < 1e-4, "qlinear {e}");
    assert!(<Cpu as NeedleBackend>::fuses_linear());
    let e = max_diff(<Cpu as NeedleBackend>::qlinear(x.clone(), &LinearWeight::new(q.clone())).unwrap(), want.clone());
    assert!(e < 1e-4, "dispatched qlinear {e}");
    let e = max_diff(plain::qlinear(x, &q).unwrap(), want);
    assert!(e < 1e-5, "plain qlinear {e}");
}

#[test]
fn paged_prefill_attention_matches_burn_attention_across_chunks_at_each_kv_precision() {
    for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
        let mut rng = StdRng::seed_from_u64(9);
        let (gqa, d) = (GqaLayout::new(6, 2).unwrap(), 16);
        let (factory, mut sel) = compose(needle_select::parse("full").unwrap());
        sel.kv = kv;
        let mut cache: KvCache = KvCache::new(1, gqa, d, factory.as_ref(), sel).unwrap();
        // Two chunks, the second crossing a page (256 rows).
        for t in [200, 100] {
            let k = rand_vec(&mut rng, t * 2 * d);
            let v = rand_vec(&mut rng, t * 2 * d);
            cache.append(0, &k, &v).unwrap();
            assert_eq!(cache.keys(0, 1).dtype(), kv);
            let q = tensor(rand_vec(&mut rng, t * 6 * d), [t, 6, d]);
            let scale = 0.3;
            let a = flex::prefill_attention(&mut cache, 0, q.clone(), scale).unwrap();
            let b = plain::prefill_attention(&cache, 0, q, scale).unwrap();
            let e = max_diff(a, b);
            assert!(e < 1e-4, "{kv}, chunk of {t}: {e}");
        }
    }
}

/// The real model's Q4_1 and Q8_0 weights through the fused kernels against their f32
/// dequantization: the gap is the 8-bit activation quantization alone (~0.5% of the output).
#[test]
fn real_quantized_linears_match_their_dequantization() {
    let r = common::real();
    let mut rng = StdRng::seed_from_u64(10);
    for name in
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"]
    {
        let raw = r.ck.tensor_blocks(name).unwrap().unwrap();
        let w = QWeight::from_raw(name, raw).unwrap();
        let f = r.ck.tensor(name).unwrap();
        assert_eq!(w.dequantize().unwrap(), f.data, "{name}: dequantization");
        let t = 2;
        let x = rand_vec(&mut rng, t * w.cols());
        let y = w.forward(&x, t).unwrap();
        let mut worst = 0f32;
        let mut norm = 0f32;
        for (tok, yr) in y.chunks_exact(w.rows()).enumerate() {
            for (row, &got) in yr.iter().enumerate() {
                let wr = &f.data[row * w.cols()..(row + 1) * w.cols()];
                let want: f32 = wr.iter().zip(&x[tok * w.cols()..]).map(|(a, b)| a * b).sum();
                worst = worst.max((got - want).abs());
                norm = norm.max(want.abs());
            }
        }
        eprintln!("{name} ({:?}): max |Δ| {worst:.3e} of max |y| {norm:.3}", w.ty());
        assert!(worst < 0.02 * norm, "{name}: fused {worst} vs f32 (max |y| {norm})");
    }
}
