//! The llama-bpe and qwen2 pre-tokenizers and SentencePiece against llama.cpp's tokenizer on the
//! tiny family vocabularies (tests/fixtures/families/, from
//! tests/reference/make_family_fixtures.py). The BPE merges only apply where the pre-tokenizer
//! keeps the parts together (digit runs, contractions, whitespace runs, a two-byte character),
//! so the ids show how text was split; the SentencePiece vocabulary (mistral) has pieces of
//! competing scores and falls back to byte tokens for what it lacks.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families")
}

#[test]
fn llama_bpe_and_qwen2_split_as_llama_cpp_does() {
    let mut by_family = Vec::new();
    for family in ["llama3", "qwen2", "qwen3", "mistral"] {
        let fx: Value =
            serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{family}.json"))).unwrap()).unwrap();
        let tok = needle_loader::open(&dir().join(format!("{family}.gguf"))).unwrap().tokenizer().unwrap();
        let cases = fx["tokenizer"].as_array().unwrap();
        assert!(cases.len() > 20);
        let mut ids_all = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let got = tok.encode_with(text, false, false).unwrap();
            assert_eq!(got, want, "{family} {text:?}");
            assert_eq!(tok.decode(&got).unwrap(), text, "{family} {text:?}");
            ids_all.push(got);
        }
        by_family.push(ids_all);
    }
    // The cases tell the two pre-tokenizers apart (digits: up to three together, or one by one).
    assert_ne!(by_family[0], by_family[1]);
}
