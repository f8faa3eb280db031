//! `NeedleBackend` for `Autodiff<B>` (feature `autodiff`): the inner backend's ops, forward
//! only. A random-weight model on `Autodiff<Cpu>` gives the CPU model's logits bit for bit, with
//! its weights kept in their blocks (the fused kernels run, no silent plain-op path).
#![cfg(feature = "autodiff")]
#![allow(clippy::unwrap_used)]

use burn::backend::Autodiff;
use needle_loader::{Checkpoint, LlamaConfig};
use needle_model::{Cpu, KvCache, Llama, NeedleBackend, QuantType, Weights, compose};

type Ad = Autodiff<Cpu>;

#[test]
fn autodiff_of_the_cpu_backend_runs_the_cpu_kernels() {
    assert!(<Ad as NeedleBackend>::fuses_linear());
    let mut cfg = LlamaConfig::preset("smollm2-135m").unwrap();
    (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) = (96, 64, 96, 2);
    (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (4, 2, 16);
    let ck = Checkpoint::random(&cfg, QuantType::Q8_0, 9).unwrap();
    let cpu = Llama::<Cpu>::load(&ck, &Default::default()).unwrap();
    let ad = Llama::<Ad>::load(&ck, &Default::default()).unwrap();
    assert_eq!(ad.weights(), Weights::Native);
    let prompt: Vec<u32> = (0..30).map(|i| (i * 11 % 96) as u32).collect();
    assert_eq!(greedy(&ad, &prompt), greedy(&cpu, &prompt));
}

/// The prefill's logits, then two decode steps' (tokens 5 and 7).
fn greedy<B: NeedleBackend<KvMirror = ()>>(model: &Llama<B>, prompt: &[u32]) -> Vec<f32> {
    let (f, sel) = compose(needle_select::parse("streaming:sinks=2,window=8").unwrap());
    let mut c = KvCache::new(2, model.gqa(), 16, f.as_ref(), sel).unwrap();
    let mut out = model.prefill(prompt, &mut c, 8, &[prompt.len() - 1], &mut |_, _| {}).unwrap();
    for t in [5, 7] {
        out.extend(model.decode(t, &mut c).unwrap());
    }
    out
}
