//! Test-only GGUF writer, ggml-style quantisers and a tiny random Llama.
#![allow(dead_code, clippy::unwrap_used)]

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum Meta {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Element type id and elements (all of that type).
    Arr(u32, Vec<Meta>),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U8(_) => 0,
            Meta::I8(_) => 1,
            Meta::U16(_) => 2,
            Meta::I16(_) => 3,
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Arr(..) => 9,
            Meta::U64(_) => 10,
            Meta::I64(_) => 11,
            Meta::F64(_) => 12,
        }
    }

    fn write(&self, b: &mut Vec<u8>) {
        match self {
            Meta::U8(v) => b.push(*v),
            Meta::I8(v) => b.push(*v as u8),
            Meta::U16(v) => b.extend(v.to_le_bytes()),
            Meta::I16(v) => b.extend(v.to_le_bytes()),
            Meta::U32(v) => b.extend(v.to_le_bytes()),
            Meta::I32(v) => b.extend(v.to_le_bytes()),
            Meta::U64(v) => b.extend(v.to_le_bytes()),
            Meta::I64(v) => b.extend(v.to_le_bytes()),
            Meta::F32(v) => b.extend(v.to_le_bytes()),
            Meta::F64(v) => b.extend(v.to_le_bytes()),
            Meta::Bool(v) => b.push(*v as u8),
            Meta::Str(s) => write_str(b, s),
            Meta::Arr(ty, items) => {
                b.extend(ty.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.write(b);
                }
            }
        }
    }
}

pub fn s(v: &str) -> Meta {
    Meta::Str(v.into())
}

fn write_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A tensor to write: GGUF name, `ne` (innermost first), ggml type id, raw bytes.
pub struct RawTensor {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub bytes: Vec<u8>,
}

/// Where things landed in a written file, for corruption tests.
#[derive(Debug, Default)]
pub struct Layout {
    /// End of the 24-byte header.
    pub header_end: usize,
    /// End of the metadata section.
    pub meta_end: usize,
    /// End of the tensor infos.
    pub infos_end: usize,
    /// Start of tensor data.
    pub data_offset: usize,
    /// Byte position of each tensor's type field and offset field.
    pub type_pos: Vec<usize>,
    pub offset_pos: Vec<usize>,
    /// Position of the first metadata value's type field.
    pub first_meta_type_pos: usize,
}

pub const ALIGN: usize = 32;

pub fn write_gguf(version: u32, meta: &[(String, Meta)], tensors: &[RawTensor]) -> (Vec<u8>, Layout) {
    let mut b = Vec::new();
    let mut lay = Layout::default();
    b.extend(b"GGUF");
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    lay.header_end = b.len();
    for (i, (k, v)) in meta.iter().enumerate() {
        write_str(&mut b, k);
        if i == 0 {
            lay.first_meta_type_pos = b.len();
        }
        b.extend(v.type_id().to_le_bytes());
        v.write(&mut b);
    }
    lay.meta_end = b.len();
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        write_str(&mut b, &t.name);
        b.extend((t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            b.extend(d.to_le_bytes());
        }
        lay.type_pos.push(b.len());
        b.extend(t.ty.to_le_bytes());
        lay.offset_pos.push(b.len());
        b.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.bytes.len()).div_ceil(ALIGN) * ALIGN;
    }
    lay.infos_end = b.len();
    b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
    lay.data_offset = b.len();
    for (t, off) in tensors.iter().zip(offsets) {
        b.resize(lay.data_offset + off, 0);
        b.extend(&t.bytes);
    }
    (b, lay)
}

// ---- quantisers (the ggml reference algorithms, written from the block layouts) ----

pub fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect()
}

pub fn quant_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

pub fn quant_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks_exact(32) {
        // The value of largest magnitude maps to -8.
        let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
        }
    }
    out
}

pub fn quant_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks_exact(32) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
        }
    }
    out
}

/// Largest error a round trip through `ty` may add for values in `[-amp, amp]`.
pub fn tolerance(ty: u32, amp: f32) -> f32 {
    match ty {
        0 => 0.0,
        1 => amp * 1e-3,
        8 => amp / 127.0 * 0.5 + amp * 2e-3,
        // The largest value of the other sign may clamp: a full step.
        2 => amp / 8.0 * 1.02,
        3 => 2.0 * amp / 15.0 * 0.5 + amp * 2e-3,
        _ => panic!("no tolerance for type {ty}"),
    }
}

pub fn encode(ty: u32, x: &[f32]) -> Vec<u8> {
    match ty {
        0 => f32_bytes(x),
        1 => f16_bytes(x),
        2 => quant_q4_0(x),
        3 => quant_q4_1(x),
        8 => quant_q8_0(x),
        _ => panic!("no encoder for type {ty}"),
    }
}

// ---- the tiny model ----

pub const VOCAB: usize = 128;
pub const HIDDEN: usize = 64;
pub const INTER: usize = 96;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;

/// HF-layout weights `(hf_name, shape, data)` and the ggml type each is stored as in GGUF.
pub struct TinyModel {
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>, u32)>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
}

/// Byte-level vocabulary: 3 special tokens, printable ASCII (byte-level mapped), `Ġ`, and merges.
fn tiny_vocab() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    for c in 33u8..=126 {
        tokens.push((c as char).to_string());
    }
    tokens.push("Ġ".into());
    tokens.push("Ċ".into());
    let merges: Vec<(&str, &str)> = vec![
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("l", "l"),
        ("o", "r"),
        ("Ġ", "w"),
        ("Ġw", "or"),
        ("Ġwor", "l"),
        ("Ġworl", "d"),
        ("H", "e"),
        ("He", "ll"),
        ("Hell", "o"),
    ];
    let mut m = Vec::new();
    for (a, b) in merges {
        m.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    while tokens.len() < VOCAB {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    (tokens, m)
}

impl TinyModel {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let mut tensors = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, ty: u32| {
            let n = shape.iter().product();
            tensors.push((name, shape, rand(n), ty));
        };
        push("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 8);
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            // Layer 0 keeps Q/K exact (F32) so the un-permutation is checked bit for bit.
            let (tq, tk) = if l == 0 { (0, 0) } else { (3, 8) };
            push(format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], tq);
            push(format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], tk);
            push(format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 1);
            push(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 3);
            push(format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN], 8);
            push(format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN], 2);
            push(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER], 1);
            push(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0);
            push(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 0);
        }
        push("model.norm.weight".into(), vec![HIDDEN], 0);
        push("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0);
        let (tokens, merges) = tiny_vocab();
        Self { tensors, tokens, merges }
    }

    pub fn metadata(&self) -> Vec<(String, Meta)> {
        let k = |s: &str| s.to_string();
        let mut types = vec![Meta::I32(1); self.tokens.len()];
        for t in types.iter_mut().take(3) {
            *t = Meta::I32(3);
        }
        vec![
            (k("general.architecture"), s("llama")),
            (k("general.alignment"), Meta::U32(ALIGN as u32)),
            (k("llama.block_count"), Meta::U32(LAYERS as u32)),
            (k("llama.context_length"), Meta::U32(256)),
            (k("llama.embedding_length"), Meta::U32(HIDDEN as u32)),
            (k("llama.feed_forward_length"), Meta::U32(INTER as u32)),
            (k("llama.attention.head_count"), Meta::U32(HEADS as u32)),
            (k("llama.attention.head_count_kv"), Meta::U32(KV_HEADS as u32)),
            (k("llama.rope.freq_base"), Meta::F32(10_000.0)),
            (k("llama.attention.layer_norm_rms_epsilon"), Meta::F32(1e-5)),
            (k("llama.vocab_size"), Meta::U32(VOCAB as u32)),
            (k("tokenizer.ggml.model"), s("gpt2")),
            (k("tokenizer.ggml.pre"), s("smollm")),
            (k("tokenizer.ggml.tokens"), Meta::Arr(8, self.tokens.iter().map(|t| s(t)).collect())),
            (k("tokenizer.ggml.token_type"), Meta::Arr(5, types)),
            (k("tokenizer.ggml.merges"), Meta::Arr(8, self.merges.iter().map(|t| s(t)).collect())),
            (k("tokenizer.ggml.bos_token_id"), Meta::U32(1)),
            (k("tokenizer.ggml.eos_token_id"), Meta::U32(2)),
            (k("tokenizer.ggml.add_bos_token"), Meta::Bool(false)),
        ]
    }

    /// The GGUF tensors: renamed, quantised, Q/K rows permuted as llama.cpp's converter does.
    pub fn gguf_tensors(&self) -> Vec<RawTensor> {
        self.tensors
            .iter()
            .map(|(name, shape, data, ty)| {
                let gname = needle_loader::gguf::hf_to_gguf(name).unwrap();
                let data = if name.ends_with("q_proj.weight") {
                    needle_loader::gguf::permute_rows(data, HEADS, HEAD_DIM, HIDDEN)
                } else if name.ends_with("k_proj.weight") {
                    needle_loader::gguf::permute_rows(data, KV_HEADS, HEAD_DIM, HIDDEN)
                } else {
                    data.clone()
                };
                RawTensor {
                    name: gname,
                    ne: shape.iter().rev().map(|&d| d as u64).collect(),
                    ty: *ty,
                    bytes: encode(*ty, &data),
                }
            })
            .collect()
    }

    pub fn gguf_bytes(&self) -> (Vec<u8>, Layout) {
        write_gguf(3, &self.metadata(), &self.gguf_tensors())
    }

    pub fn hf_config_json(&self) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32"
        })
        .to_string()
    }

    /// A `tokenizer.json` shaped like SmolLM2's, over the tiny vocabulary.
    pub fn hf_tokenizer_json(&self) -> String {
        let vocab: serde_json::Map<String, serde_json::Value> =
            self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
        let added: Vec<_> = (0..3)
            .map(|i| serde_json::json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": self.merges}
        })
        .to_string()
    }

    /// Writes `model.gguf` and an HF folder `hf/` (single safetensors file, or `shards` files).
    pub fn write_both(&self, dir: &std::path::Path, shards: usize) -> (std::path::PathBuf, std::path::PathBuf) {
        let gguf = dir.join("model.gguf");
        std::fs::write(&gguf, self.gguf_bytes().0).unwrap();
        let hf = dir.join("hf");
        std::fs::create_dir_all(&hf).unwrap();
        std::fs::write(hf.join("config.json"), self.hf_config_json()).unwrap();
        std::fs::write(hf.join("tokenizer.json"), self.hf_tokenizer_json()).unwrap();
        let per = self.tensors.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (i, chunk) in self.tensors.chunks(per).enumerate() {
            let file = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
            };
            let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
                chunk.iter().map(|(n, s, d, _)| (n.clone(), s.clone(), f32_bytes(d))).collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
                .iter()
                .map(|(n, s, b)| {
                    (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
                })
                .collect();
            safetensors::serialize_to_file(views, None, &hf.join(&file)).unwrap();
            for (n, ..) in chunk {
                weight_map.insert(n.clone(), serde_json::json!(file));
            }
        }
        if shards > 1 {
            let idx = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(hf.join("model.safetensors.index.json"), idx.to_string()).unwrap();
        }
        (gguf, hf)
    }
}
