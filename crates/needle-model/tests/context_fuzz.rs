//! The context-file reader under mutation: real files (KV pages, a RoarGraph's saved state,
//! tokens, logits) flipped, cut, shifted, overwritten and extended at random. A load either fails
//! with a named error or, when only unchecked bytes changed (the padding between sections), yields
//! exactly what was saved; it never panics. `NEEDLE_FUZZ_CASES` sets the number of cases (CI
//! runs the default, a bounded few seconds).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use needle_model::context::{self, ContextInfo};
use needle_model::{KvCache, KvDtype, compose};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const SPEC: &str = "retrieval:sinks=8,window=32,k=16";
const DIGEST: &str = "fuzz";

struct Saved {
    bytes: Vec<u8>,
    tokens: Vec<u32>,
    logits: Vec<f32>,
    _dir: tempfile::TempDir,
}

/// One real context file, written once per test binary.
fn saved() -> &'static Saved {
    static S: OnceLock<Saved> = OnceLock::new();
    S.get_or_init(|| {
        let r = common::native();
        let m = &r.model;
        let text: String = (0..120).map(|i| format!("Verse {i}: the wheel turns {} times. ", i * 11 % 53)).collect();
        let tokens = r.tok.encode(&text, false).unwrap()[..300].to_vec();
        let (f, mut sel) = compose(needle_select::parse(SPEC).unwrap());
        sel.kv = KvDtype::F16;
        let c = m.config();
        let mut cache = KvCache::new(c.num_hidden_layers, m.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
        let logits = m.prefill(&tokens, &mut cache, 128, &[tokens.len() - 1], &mut |_, _| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.needle");
        let info = ContextInfo::new(m, DIGEST, "native", SPEC, &cache);
        context::save(&path, false, &info, &tokens, &logits, &cache, &mut |_, _| {}).unwrap();
        Saved { bytes: std::fs::read(&path).unwrap(), tokens, logits, _dir: dir }
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Cut { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Overwrite { at: usize, bytes: Vec<u8> },
    Append { bytes: Vec<u8> },
}

/// Positions are drawn in [0, 1) and scaled to the file, so every region gets hit.
fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = 0.0..1.0f64;
    let bytes = prop::collection::vec(any::<u8>(), 1..64);
    prop_oneof![
        (pos.clone(), 0..8u8).prop_map(|(p, bit)| Mutation::Flip { at: p.to_bits() as usize, bit }),
        pos.clone().prop_map(|p| Mutation::Cut { len: p.to_bits() as usize }),
        (pos.clone(), bytes.clone()).prop_map(|(p, bytes)| Mutation::Insert { at: p.to_bits() as usize, bytes }),
        (pos.clone(), 1..4096usize).prop_map(|(p, len)| Mutation::Remove { at: p.to_bits() as usize, len }),
        (pos, bytes.clone()).prop_map(|(p, bytes)| Mutation::Overwrite { at: p.to_bits() as usize, bytes }),
        bytes.prop_map(|bytes| Mutation::Append { bytes }),
    ]
}

/// `at` holds an f64's bits in [0, 1): a position in a file of `n` bytes.
fn scale(at: usize, n: usize) -> usize {
    ((f64::from_bits(at as u64) * n as f64) as usize).min(n.saturating_sub(1))
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } => bytes[scale(*at, n)] ^= 1 << bit,
        Mutation::Cut { len } => bytes.truncate(scale(*len, n)),
        Mutation::Insert { at, bytes: b } => {
            let at = scale(*at, n);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = scale(*at, n);
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::Overwrite { at, bytes: b } => {
            let at = scale(*at, n);
            let end = (at + b.len()).min(n);
            bytes[at..end].copy_from_slice(&b[..end - at]);
        }
        Mutation::Append { bytes: b } => bytes.extend_from_slice(b),
    }
}

#[test]
fn mutated_context_files_fail_with_named_errors_or_load_what_was_saved() {
    let s = saved();
    let m = &common::native().model;
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("mutated.needle");
    let cases = std::env::var("NEEDLE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let (errors, loads) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    runner
        .run(&prop::collection::vec(mutation(), 1..4), |mutations| {
            let mut bytes = s.bytes.clone();
            mutations.iter().for_each(|m| apply(&mut bytes, m));
            std::fs::write(&path, &bytes).unwrap();
            match context::load(&path, m, DIGEST, "native", &needle_select::parse) {
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("mutated.needle"), "the error names the file: {msg}");
                    errors.set(errors.get() + 1);
                }
                Ok(loaded) => {
                    prop_assert_eq!(&loaded.tokens, &s.tokens, "a file that loads holds what was saved");
                    prop_assert_eq!(&loaded.last_logits, &s.logits);
                    loads.set(loads.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    let (errors, loads) = (errors.get(), loads.get());
    assert!(errors > cases as usize / 2, "most mutations are caught ({errors} errors, {loads} loads)");
}
