//! A tiny random Llama written as GGUF (mixed F32/F16/Q8_0/Q4_0/Q4_1, Q/K permuted like
//! llama.cpp) and as a Hugging Face safetensors folder must load to the same config and tensors.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_loader::{Checkpoint, Error, open};

fn check_same(gguf: &Checkpoint, hf: &Checkpoint, model: &TinyModel) {
    assert_eq!(gguf.config(), hf.config());
    for (name, shape, data, ty) in &model.tensors {
        let a = gguf.tensor(name).unwrap();
        let b = hf.tensor(name).unwrap();
        assert_eq!(&a.shape, shape, "{name}");
        assert_eq!(&b.shape, shape, "{name}");
        assert_eq!(&b.data, data, "{name}: safetensors is exact");
        let tol = tolerance(*ty, 1.0);
        let worst = a.data.iter().zip(data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= tol, "{name} ({ty}): max error {worst} > {tol}");
        if *ty == 0 {
            assert_eq!(&a.data, data, "{name}: F32 is exact (incl. Q/K un-permutation)");
        }
    }
}

#[test]
fn gguf_and_safetensors_agree() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(7);
    let (gguf_path, hf_path) = model.write_both(dir.path(), 1);
    let g = open(&gguf_path).unwrap();
    let h = open(&hf_path).unwrap();
    let c = g.config();
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size), (VOCAB, HIDDEN, INTER));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (HEADS, KV_HEADS, HEAD_DIM));
    assert_eq!(c.rms_norm_eps, 1e-5, "f32 metadata widens to the decimal it was written as");
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, [2]);
    check_same(&g, &h, &model);
    assert!(g.describe().contains("GGUF v3"), "{}", g.describe());
    assert!(h.describe().contains("F32 ×21"), "{}", h.describe());
}

#[test]
fn sharded_safetensors_agree() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(8);
    let (gguf_path, hf_path) = model.write_both(dir.path(), 3);
    let h = open(&hf_path).unwrap();
    match &h {
        Checkpoint::Safetensors(s) => assert_eq!(s.shard_count(), 3),
        _ => panic!("expected safetensors"),
    }
    check_same(&open(&gguf_path).unwrap(), &h, &model);
}

#[test]
fn tied_embeddings_and_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = TinyModel::new(9);
    model.tensors.retain(|t| t.0 != "lm_head.weight");
    let (gguf_path, hf_path) = model.write_both(dir.path(), 1);
    let cfg = model.hf_config_json().replace("\"tie_word_embeddings\":false", "\"tie_word_embeddings\":true");
    std::fs::write(hf_path.join("config.json"), cfg).unwrap();
    std::fs::write(hf_path.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
    let g = open(&gguf_path).unwrap();
    let h = open(&hf_path).unwrap();
    assert!(g.config().tie_word_embeddings);
    assert!(h.config().tie_word_embeddings);
    assert_eq!(h.config().eos_token_ids, [2, 0]);
    for ck in [&g, &h] {
        assert!(
            matches!(ck.tensor("lm_head.weight"), Err(Error::MissingTensor { ref tensor, .. }) if tensor == "lm_head.weight")
        );
    }
}

#[test]
fn tokenizers_agree() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(10);
    let (gguf_path, hf_path) = model.write_both(dir.path(), 1);
    let tg = open(&gguf_path).unwrap().tokenizer().unwrap();
    let th = open(&hf_path).unwrap().tokenizer().unwrap();
    for text in ["Hello world", "the 2024 wor", "<|im_start|>user\nHello<|im_end|>", "a  b\n\nc"] {
        let a = tg.encode(text, false).unwrap();
        assert_eq!(a, th.encode(text, false).unwrap(), "{text}");
        assert_eq!(tg.decode(&a).unwrap(), text);
    }
    assert_eq!(
        tg.encode("Hello world", false).unwrap(),
        [tg.token_to_id("Hello").unwrap(), tg.token_to_id("Ġworld").unwrap()]
    );
    assert_eq!(tg.encode("<|im_start|>", false).unwrap(), [1]);
    assert_eq!(tg.eos_ids(), [2, 0]);
    assert_eq!(th.eos_ids(), [2, 0]);
}

#[test]
fn version_2_and_all_metadata_types() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(11);
    let mut meta = model.metadata();
    let extra = vec![
        ("t.u8", Meta::U8(200)),
        ("t.i8", Meta::I8(-5)),
        ("t.u16", Meta::U16(60_000)),
        ("t.i16", Meta::I16(-30_000)),
        ("t.i32", Meta::I32(-7)),
        ("t.u64", Meta::U64(1 << 40)),
        ("t.i64", Meta::I64(-(1 << 40))),
        ("t.f64", Meta::F64(0.125)),
        ("t.bool", Meta::Bool(true)),
        ("t.nested", Meta::Arr(9, vec![Meta::Arr(4, vec![Meta::U32(1), Meta::U32(2)]), Meta::Arr(4, vec![])])),
        ("t.empty", Meta::Arr(8, vec![])),
    ];
    meta.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    let (bytes, _) = write_gguf(2, &meta, &model.gguf_tensors());
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, bytes).unwrap();
    let Checkpoint::Gguf(g) = open(&path).unwrap() else { panic!("gguf") };
    use needle_loader::gguf::Value as V;
    assert_eq!(g.version(), 2);
    assert_eq!(g.get("t.u8"), Some(&V::U8(200)));
    assert_eq!(g.get("t.i8"), Some(&V::I8(-5)));
    assert_eq!(g.get("t.u16"), Some(&V::U16(60_000)));
    assert_eq!(g.get("t.i16"), Some(&V::I16(-30_000)));
    assert_eq!(g.get("t.i32"), Some(&V::I32(-7)));
    assert_eq!(g.get("t.u64"), Some(&V::U64(1 << 40)));
    assert_eq!(g.get("t.i64"), Some(&V::I64(-(1 << 40))));
    assert_eq!(g.get("t.f64"), Some(&V::F64(0.125)));
    assert_eq!(g.get("t.bool"), Some(&V::Bool(true)));
    assert_eq!(g.get("t.nested"), Some(&V::Array(vec![V::Array(vec![V::U32(1), V::U32(2)]), V::Array(vec![])])));
    assert_eq!(g.get("t.empty"), Some(&V::Array(vec![])));
    assert_eq!(g.get("llama.rope.freq_base"), Some(&V::F32(10_000.0)));
    assert_eq!(g.alignment(), 32);
}

#[test]
fn unpermute_inverts_permute() {
    let data: Vec<f32> = (0..(3 * 8 * 5)).map(|i| i as f32).collect();
    let p = needle_loader::gguf::permute_rows(&data, 3, 8, 5);
    assert_ne!(p, data);
    assert_eq!(needle_loader::gguf::unpermute_rows(&p, 3, 8, 5), data);
    // Within a head, GGUF row 2i+s holds HF row s*half+i: rows 0,4,1,5,2,6,3,7.
    let rows: Vec<f32> = p.chunks(5).take(8).map(|r| r[0] / 5.0).collect();
    assert_eq!(rows, [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
}

#[test]
fn safetensors_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(12);
    let (_, hf) = model.write_both(dir.path(), 1);
    let st = hf.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();

    std::fs::write(&st, &good[..good.len() - 10]).unwrap();
    let e = open(&hf).unwrap_err();
    assert!(matches!(e, Error::Safetensors { ref path, .. } if path.ends_with("model.safetensors")), "{e}");

    // An I32 tensor under a weight name: a named, unsupported dtype.
    let ints = vec![0u8; 4 * HIDDEN];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![HIDDEN], &ints).unwrap();
    safetensors::serialize_to_file([("model.norm.weight", view)], None, &st).unwrap();
    let ck = open(&hf).unwrap();
    let e = ck.tensor("model.norm.weight").unwrap_err();
    assert!(matches!(e, Error::UnsupportedTensorType { ref tensor, .. } if tensor == "model.norm.weight"), "{e}");
    assert!(matches!(ck.tensor("model.embed_tokens.weight"), Err(Error::MissingTensor { .. })));

    std::fs::remove_file(hf.join("config.json")).unwrap();
    assert!(matches!(open(&hf), Err(Error::NotACheckpoint { .. })));
    std::fs::write(hf.join("config.json"), "{\"hidden_size\": 64}").unwrap();
    assert!(matches!(open(&hf), Err(Error::Json { .. })));
}

#[test]
fn hf_config_defaults_and_llama3_scaling() {
    let json = r#"{"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "rms_norm_eps": 1e-5, "eos_token_id": [2, 3],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
    let c = needle_loader::LlamaConfig::from_hf_json(json, "config.json".as_ref()).unwrap();
    assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (4, 16, 10_000.0));
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, [2, 3]);
    assert_eq!(
        c.rope_scaling,
        Some(needle_loader::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    let bad = json.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 4, \"num_key_value_heads\": 3");
    assert!(matches!(
        needle_loader::LlamaConfig::from_hf_json(&bad, "config.json".as_ref()),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn hf_config_families_and_refusals() {
    use needle_loader::{Architecture, LlamaConfig};
    let base = r#"{"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6 EXTRA}"#;
    let parse = |extra: &str| LlamaConfig::from_hf_json(&base.replace(" EXTRA", extra), "config.json".as_ref());

    let c = parse(r#", "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false"#).unwrap();
    assert_eq!((c.architecture, c.qkv_bias, c.qk_norm, c.sliding_window), (Architecture::Qwen2, true, false, None));
    let c = parse(r#", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32, "attention_bias": false"#).unwrap();
    assert_eq!((c.architecture, c.qkv_bias, c.qk_norm, c.head_dim), (Architecture::Qwen3, false, true, 32));
    let c = parse(r#", "model_type": "mistral", "sliding_window": 4096"#).unwrap();
    assert_eq!((c.architecture, c.sliding_window), (Architecture::Mistral, Some(4096)));
    let c = parse(r#", "rope_scaling": {"type": "linear", "factor": 4.0}"#).unwrap();
    assert_eq!(c.rope_scaling, Some(needle_loader::RopeScaling::Linear { factor: 4.0 }));

    let e = parse(r#", "model_type": "gemma2""#).unwrap_err();
    assert!(matches!(e, Error::UnsupportedArchitecture { ref arch, .. } if arch == "gemma2"), "{e}");
    assert!(e.to_string().contains("qwen3"), "lists what is supported: {e}");
    let e =
        parse(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#)
            .unwrap_err();
    assert!(matches!(e, Error::UnsupportedRopeScaling { ref rope_type, .. } if rope_type == "yarn"), "{e}");
    let e = parse(r#", "model_type": "llama", "attention_bias": true"#).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn presets_and_random_checkpoints() {
    use needle_loader::LlamaConfig;
    use needle_quant::QuantType;
    for name in ["llama3-8b", "qwen2.5-7b", "qwen3-8b", "smollm2-135m"] {
        LlamaConfig::preset(name).unwrap();
    }
    assert!(matches!(LlamaConfig::preset("gpt2"), Err(Error::InvalidConfig(_))));
    // A small model: every tensor of the layout, seeded, in the asked type where rows allow it.
    let mut c = LlamaConfig::preset("qwen2.5-7b").unwrap();
    (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) = (64, 512, 256, 2);
    (c.num_attention_heads, c.num_key_value_heads, c.head_dim) = (4, 2, 128);
    (c.bos_token_id, c.eos_token_ids) = (None, vec![]);
    let a = Checkpoint::random(&c, QuantType::Q4_K, 7).unwrap();
    let b = Checkpoint::random(&c, QuantType::Q4_K, 7).unwrap();
    let other = Checkpoint::random(&c, QuantType::Q4_K, 8).unwrap();
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_ne!(a.digest().unwrap(), other.digest().unwrap());
    for (name, shape) in needle_loader::layout(&c) {
        let (x, y) = (a.tensor(&name).unwrap(), b.tensor(&name).unwrap());
        assert_eq!((x.shape.clone(), &x.data), (shape, &y.data), "{name}");
        assert_ne!(x.data, other.tensor(&name).unwrap().data, "{name}");
        let blocks = a.tensor_blocks(&name).unwrap().unwrap();
        let want = if name.ends_with(".bias") || name.contains("norm") { "F32" } else { "Q4_K" };
        assert_eq!(blocks.ty.name, want, "{name}");
    }
    assert!(a.describe().contains("Q4_K"), "{}", a.describe());
    assert!(matches!(a.tokenizer(), Err(Error::Unsupported { .. })));
}

#[test]
fn gguf_linear_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(13);
    let mut meta = model.metadata();
    meta.push(("llama.rope.scaling.type".into(), s("linear")));
    meta.push(("llama.rope.scaling.factor".into(), Meta::F32(4.0)));
    let (bytes, _) = write_gguf(3, &meta, &model.gguf_tensors());
    let path = dir.path().join("linear.gguf");
    std::fs::write(&path, bytes).unwrap();
    let c = open(&path).unwrap().config().clone();
    assert_eq!(c.rope_scaling, Some(needle_loader::RopeScaling::Linear { factor: 4.0 }));
    // A factor of 1 is no scaling (as llama.cpp reads it); a missing factor is named.
    meta.last_mut().unwrap().1 = Meta::F32(1.0);
    std::fs::write(&path, write_gguf(3, &meta, &model.gguf_tensors()).0).unwrap();
    assert_eq!(open(&path).unwrap().config().rope_scaling, None);
    meta.pop();
    std::fs::write(&path, write_gguf(3, &meta, &model.gguf_tensors()).0).unwrap();
    let e = open(&path).unwrap_err();
    assert!(matches!(e, Error::MissingMetadata { ref key, .. } if key == "llama.rope.scaling.factor"), "{e}");
}

#[test]
fn a_bos_printed_by_the_text_is_not_added_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hf) = TinyModel::new(14).write_both(dir.path(), 1);
    // tokenizer.json with a post-processor that adds BOS (id 1), as Llama 3's does.
    let path = hf.join("tokenizer.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    spec["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(&path, spec.to_string()).unwrap();
    let tok = needle_loader::Tokenizer::from_file(&path, Some(1), vec![2]).unwrap();
    let plain = tok.encode("Hello", false).unwrap();
    assert_eq!(tok.encode("Hello", true).unwrap(), [&[1][..], &plain].concat());
    let printed = tok.encode("<|im_start|>Hello", true).unwrap();
    assert_eq!(printed, [&[1][..], &plain].concat(), "one BOS, not two");
}
