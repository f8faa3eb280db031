//! Shared by the real-model tests: the default model, loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use needle_loader::{Checkpoint, Tokenizer};
use needle_model::{Cpu, KvCache, Llama, LoadOptions, Weights, compose};

pub struct Real {
    pub ck: Checkpoint,
    pub model: Llama<Cpu>,
    pub tok: Tokenizer,
}

pub fn model_path() -> PathBuf {
    let p = needle_fetch::default_model_path().expect("model path");
    assert!(p.is_file(), "{} is missing: run `cargo xtask fetch-model` (or set NEEDLE_MODEL)", p.display());
    p
}

fn load(weights: Weights) -> Real {
    let ck = needle_loader::open(&model_path()).expect("open model");
    let model = Llama::<Cpu>::load_with(&ck, &Default::default(), &LoadOptions { weights }).expect("load model");
    let tok = ck.tokenizer().expect("tokenizer");
    Real { ck, model, tok }
}

/// The default model with every weight dequantized to f32 (the reference path).
pub fn real() -> &'static Real {
    static R: OnceLock<Real> = OnceLock::new();
    R.get_or_init(|| load(Weights::F32))
}

/// The default model with its weights as stored (Q4_1 blocks, memory-mapped) and fused kernels.
pub fn native() -> &'static Real {
    static R: OnceLock<Real> = OnceLock::new();
    R.get_or_init(|| load(Weights::Native))
}

pub fn cache(spec: &str) -> KvCache {
    let r = real();
    cache_for(&r.model, spec)
}

pub fn cache_for(model: &Llama<Cpu>, spec: &str) -> KvCache {
    let r = model;
    let (f, sel) = compose(needle_select::parse(spec).expect("spec"));
    let c = r.config();
    KvCache::new(c.num_hidden_layers, r.gqa(), c.head_dim, f.as_ref(), sel).expect("cache")
}

/// Repo root (for fixtures).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether `NEEDLE_SKIP_GPU_TESTS=1` asks the GPU tests to skip (said on stderr).
#[allow(clippy::print_stderr)]
pub fn skip_gpu() -> bool {
    let skip = std::env::var_os("NEEDLE_SKIP_GPU_TESTS").is_some_and(|v| v == "1");
    if skip {
        eprintln!("NEEDLE_SKIP_GPU_TESTS=1: skipped");
    }
    skip
}

/// Whether `NEEDLE_PRINT_ERR=1` asks the GPU tests to print their measured errors.
pub fn print_err() -> bool {
    std::env::var_os("NEEDLE_PRINT_ERR").is_some_and(|v| v == "1")
}
