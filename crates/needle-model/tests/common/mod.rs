//! Shared by the real-model tests: the default model, loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use needle_loader::{Checkpoint, Tokenizer};
use needle_model::{Cpu, KvCache, Llama, selector_from_spec};

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

pub fn real() -> &'static Real {
    static R: OnceLock<Real> = OnceLock::new();
    R.get_or_init(|| {
        let ck = needle_loader::open(&model_path()).expect("open model");
        let model = Llama::<Cpu>::load(&ck, &Default::default()).expect("load model");
        let tok = ck.tokenizer().expect("tokenizer");
        Real { ck, model, tok }
    })
}

pub fn cache(spec: &str) -> KvCache {
    let r = real();
    let (f, sel) = selector_from_spec(spec).expect("spec");
    let c = r.model.config();
    KvCache::new(c.num_hidden_layers, r.model.gqa(), c.head_dim, f.as_ref(), sel).expect("cache")
}

/// Repo root (for fixtures).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
