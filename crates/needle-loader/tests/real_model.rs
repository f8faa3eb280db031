//! Tests on the real SmolLM2-135M-Instruct Q4_1 GGUF, against values gguf-py computed
//! (`tests/reference/make_gguf_fixture.py` → `tests/fixtures/gguf_reference.json`).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use needle_loader::{Checkpoint, GgufFile, open};
use serde_json::Value;

/// `$NEEDLE_MODEL`, else the cache `cargo xtask fetch-model` fills.
fn model_path() -> PathBuf {
    let p = needle_fetch::default_model_path().unwrap();
    assert!(p.is_file(), "model not found at {} (set $NEEDLE_MODEL or run `cargo xtask fetch-model`)", p.display());
    p
}

fn reference() -> Value {
    let text = include_str!("fixtures/gguf_reference.json");
    serde_json::from_str(text).expect("fixture parses")
}

fn gguf(ck: &Checkpoint) -> &GgufFile {
    match ck {
        Checkpoint::Gguf(g) => g,
        _ => panic!("expected GGUF"),
    }
}

#[test]
fn config_matches_metadata() {
    let ck = open(&model_path()).unwrap();
    let c = ck.config();
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
}

#[test]
fn header_tensor_count_and_types() {
    let r = reference();
    let m = &r["model"];
    let ck = open(&model_path()).unwrap();
    let g = gguf(&ck);
    assert_eq!(g.version() as u64, m["version"].as_u64().unwrap());
    assert_eq!(g.tensor_infos().len() as u64, m["tensor_count"].as_u64().unwrap());
    for (ty, n) in m["type_counts"].as_object().unwrap() {
        let got = g.tensor_infos().iter().filter(|t| t.ty.name == ty).count();
        assert_eq!(got as u64, n.as_u64().unwrap(), "{ty}");
    }
    let d = ck.describe();
    assert!(d.contains("Q4_1 ×210, F32 ×61, Q8_0 ×1"), "{d}");
    assert!(d.contains("GGUF v3"), "{d}");
    assert!(matches!(ck.tensor("lm_head.weight"), Err(needle_loader::Error::MissingTensor { .. })));
}

fn check_samples(what: &str, data: &[f32], samples: &Value) {
    for s in samples.as_array().unwrap() {
        let i = s[0].as_u64().unwrap() as usize;
        let want = s[1].as_f64().unwrap() as f32;
        // Same formula in f32; allow the last bit for fused multiply-add differences.
        assert!((data[i] - want).abs() <= 1e-6 * want.abs().max(1e-3), "{what}[{i}]: {} vs gguf-py {want}", data[i]);
    }
}

#[test]
fn dequantised_values_match_gguf_py() {
    let r = reference();
    let ck = open(&model_path()).unwrap();
    let g = gguf(&ck);
    for (name, e) in r["model"]["tensors"].as_object().unwrap() {
        let t = g.tensor_f32(name).unwrap();
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(g.tensor_info(name).unwrap().ty.name, e["type"].as_str().unwrap());
        check_samples(name, &t.data, &e["file_layout"]);
        let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
        let want = e["sum"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-6 * want.abs().max(1.0), "{name} sum {sum} vs {want}");
        if let Some(hf) = e.get("hf_layout") {
            let hf_name = needle_loader::gguf::gguf_to_hf(name).unwrap();
            let t = ck.tensor(&hf_name).unwrap();
            check_samples(&hf_name, &t.data, hf);
        }
    }
}

#[test]
fn all_tensors_load_with_hf_names() {
    let ck = open(&model_path()).unwrap();
    let c = ck.config().clone();
    // Every layer for a few leaves keeps this fast in debug builds; layer 0 gets all of them.
    let leaves = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ];
    for leaf in leaves {
        let t = ck.tensor(&format!("model.layers.0.{leaf}")).unwrap();
        assert_eq!(Some(t.shape), c.expected_shape(&format!("model.layers.0.{leaf}")));
    }
    for l in 0..c.num_hidden_layers {
        ck.tensor(&format!("model.layers.{l}.self_attn.k_proj.weight")).unwrap();
    }
    assert_eq!(ck.tensor("model.norm.weight").unwrap().shape, [576]);
    assert_eq!(ck.tensor("model.embed_tokens.weight").unwrap().shape, [49152, 576]);
}

#[test]
fn tokenizer_vocab_and_round_trip() {
    let r = reference();
    let ck = open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    for (id, s) in r["model"]["tokens"].as_object().unwrap() {
        let id: u32 = id.parse().unwrap();
        assert_eq!(tok.token_to_id(s.as_str().unwrap()), Some(id), "{s}");
    }
    // The config's eos, then <|endoftext|> which llama.cpp also treats as end of generation.
    assert_eq!(tok.eos_ids(), &[2, 0]);
    let prompt = tok.chat_prompt(Some("You are terse."), "What is 2+2?");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    // SmolLM2's own template (in the GGUF) adds its default system prompt when there is none.
    assert_eq!(
        tok.chat_prompt(None, "Hi"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), prompt);
    // add_bos_token is false in this GGUF.
    assert_eq!(tok.encode("Hello", true).unwrap(), tok.encode("Hello", false).unwrap());
    // Digits are split one by one (the "smollm" pre-tokenizer).
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5, "{digits:?}");
    for text in [
        "Hello, world!",
        "  leading spaces\tand\ttabs\n\nnew lines",
        "naïve café – “quotes” 日本語 🦀",
        "x = a[3] + 42;",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let mut stream = tok.decode_stream();
        let mut out = String::new();
        for &id in &ids {
            if let Some(s) = stream.push(id).unwrap() {
                assert!(!s.contains('\u{FFFD}'), "partial character emitted for {text:?}: {s:?}");
                out.push_str(&s);
            }
        }
        assert_eq!(out, text);
    }
    // The crab is four bytes over several byte-level tokens: nothing comes out until the last.
    let crab = tok.encode("🦀", false).unwrap();
    assert!(crab.len() > 1, "{crab:?}");
    let mut stream = tok.decode_stream();
    let outs: Vec<_> = crab.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert!(outs[..outs.len() - 1].iter().all(Option::is_none), "{outs:?}");
    assert_eq!(outs.last().unwrap().as_deref(), Some("🦀"));
    // Special-token text stays text when special parsing is off.
    let plain = tok.encode_with("<|im_start|>", false, false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
}

#[test]
fn encode_prefix_equals_the_head_of_the_whole_encoding() {
    let ck = open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    // A long text of varied words, numbers, punctuation and multi-byte characters.
    let words = ["the", "ark", "naïve", "café", "1611", "Genesis:", "“quoted”", "日本語", "and\n", "  spaced", "🦀"];
    let text: String = (0..30_000usize).map(|i| words[(i * 7 + i / 13) % words.len()]).collect::<Vec<_>>().join(" ");
    let whole = tok.encode(&text, false).unwrap();
    assert!(whole.len() > 20_000, "{}", whole.len());
    for n in [0, 1, 7, 500, 4_000, 19_999, whole.len(), whole.len() + 10] {
        let head = tok.encode_prefix(&text, n).unwrap();
        assert_eq!(head, whole[..n.min(whole.len())], "n = {n}");
    }
}

/// `tests/fixtures/tokenizer_cases.json` at the repository root: llama.cpp's ids on this GGUF.
#[test]
fn tokenizer_matches_llama_cpp_cases() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let ck = open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case.get("special").and_then(Value::as_bool).unwrap_or(false);
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode_with(text, false, special).unwrap();
        if got != want {
            failures.push(format!("{text:?} (special={special}): got {got:?}, llama.cpp {want:?}"));
            continue;
        }
        let detok = case.get("detokenized").and_then(Value::as_str).unwrap_or(text);
        let back = tok.decode(&got).unwrap();
        if back != detok {
            failures.push(format!("{text:?}: decodes to {back:?}, llama.cpp {detok:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
