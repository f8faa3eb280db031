//! Corrupt GGUF files: every failure is a specific, named error, never a panic.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_loader::{Error, open};

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn truncated_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(1);
    let (bytes, lay) = model.gguf_bytes();
    let path = dir.path().join("cut.gguf");
    // Every cut through header, metadata and tensor infos, then a stride through the data.
    let mut cuts: Vec<usize> = (0..lay.data_offset + 64).chain((lay.data_offset..bytes.len()).step_by(97)).collect();
    // Shrinking one file in place is far cheaper than writing a file per cut.
    cuts.sort_unstable_by(|a, b| b.cmp(a));
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut n = 0;
    for cut in cuts {
        file.set_len(cut as u64).unwrap();
        let err = open(&path).expect_err(&format!("cut at {cut} must fail"));
        let msg = err.to_string();
        assert!(msg.contains("cut.gguf"), "error must name the file: {msg}");
        match err {
            Error::Truncated { what, offset, .. } => {
                assert!(cut < lay.infos_end, "cut {cut} past tensor infos reported as {what}");
                let region = if cut < lay.header_end {
                    "header"
                } else if cut < lay.meta_end {
                    "metadata"
                } else {
                    "tensor info"
                };
                // Array counts are checked against the bytes left, before the elements are read.
                assert!(what.contains(region) || (region == "metadata" && what.contains("array")), "cut {cut}: {what}");
                assert!(offset <= cut as u64);
            }
            Error::TensorDataOutOfBounds { tensor, .. } => {
                assert!(cut >= lay.infos_end, "cut {cut}: data error before data");
                assert!(!tensor.is_empty());
            }
            e => panic!("cut {cut}: unexpected error {e}"),
        }
        n += 1;
    }
    assert!(n > 1000, "{n} cuts");
}

#[test]
fn bad_magic_version_and_endianness() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = TinyModel::new(2).gguf_bytes();

    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    let e = open(&write(dir.path(), "magic.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::BadMagic { found, .. } if &found == b"GGML"), "{e}");

    for v in [1u32, 4, 99] {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let e = open(&write(dir.path(), "version.gguf", &b)).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { version, .. } if version == v), "{e}");
    }

    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = open(&write(dir.path(), "be.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::BigEndian { .. }), "{e}");
    assert!(e.to_string().contains("big-endian"));

    let e = open(&write(dir.path(), "empty.gguf", &[])).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
}

#[test]
fn unknown_types_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, lay) = TinyModel::new(3).gguf_bytes();

    let mut b = bytes.clone();
    b[lay.type_pos[1]..lay.type_pos[1] + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = open(&write(dir.path(), "type.gguf", &b)).unwrap_err();
    assert!(
        matches!(e, Error::UnknownTensorType { type_id: 99, ref tensor, .. } if tensor == "blk.0.attn_q.weight"),
        "{e}"
    );

    let mut b = bytes.clone();
    b[lay.first_meta_type_pos..lay.first_meta_type_pos + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = open(&write(dir.path(), "vtype.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::UnknownValueType { type_id: 77, ref key, .. } if key == "general.architecture"), "{e}");

    let last = lay.offset_pos.len() - 1;
    let mut b = bytes.clone();
    b[lay.offset_pos[last]..lay.offset_pos[last] + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let e = open(&write(dir.path(), "offset.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::TensorDataOutOfBounds { ref tensor, .. } if tensor == "output.weight"), "{e}");

    let mut b = bytes.clone();
    b[lay.offset_pos[last]..lay.offset_pos[last] + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(matches!(open(&write(dir.path(), "huge.gguf", &b)), Err(Error::TensorDataOutOfBounds { .. })));

    let mut b = bytes.clone();
    b[lay.offset_pos[last]..lay.offset_pos[last] + 8].copy_from_slice(&3u64.to_le_bytes());
    assert!(matches!(open(&write(dir.path(), "unaligned.gguf", &b)), Err(Error::InvalidTensorInfo { .. })));
}

#[test]
fn shape_missing_and_non_finite() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(4);

    // attn_v with the q shape: disagrees with head_count_kv.
    let mut ts = model.gguf_tensors();
    let v = ts.iter_mut().find(|t| t.name == "blk.1.attn_v.weight").unwrap();
    v.ne = vec![HIDDEN as u64, (HEADS * HEAD_DIM) as u64];
    v.bytes = f16_bytes(&vec![0.5; HIDDEN * HEADS * HEAD_DIM]);
    let (b, _) = write_gguf(3, &model.metadata(), &ts);
    let e = open(&write(dir.path(), "shape.gguf", &b)).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { ref tensor, ref expected, .. } if tensor == "blk.1.attn_v.weight" && expected == &[32, 64]),
        "{e}"
    );

    // A missing layer tensor is reported when asked for, by its HF name.
    let mut ts = model.gguf_tensors();
    ts.retain(|t| t.name != "blk.1.ffn_up.weight");
    let (b, _) = write_gguf(3, &model.metadata(), &ts);
    let ck = open(&write(dir.path(), "missing.gguf", &b)).unwrap();
    let e = ck.tensor("model.layers.1.mlp.up_proj.weight").unwrap_err();
    assert!(
        matches!(e, Error::MissingTensor { ref tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );

    // NaN in an F32 tensor and an infinite f16 scale in a Q8_0 block.
    let mut ts = model.gguf_tensors();
    let norm = ts.iter_mut().find(|t| t.name == "output_norm.weight").unwrap();
    norm.bytes[4 * 5..4 * 6].copy_from_slice(&f32::NAN.to_le_bytes());
    let emb = ts.iter_mut().find(|t| t.name == "token_embd.weight").unwrap();
    emb.bytes[34 * 3..34 * 3 + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    let (b, _) = write_gguf(3, &model.metadata(), &ts);
    let ck = open(&write(dir.path(), "nan.gguf", &b)).unwrap();
    let e = ck.tensor("model.norm.weight").unwrap_err();
    assert!(matches!(e, Error::NonFinite { ref tensor, index: 5, .. } if tensor == "output_norm.weight"), "{e}");
    let e = ck.tensor("model.embed_tokens.weight").unwrap_err();
    assert!(matches!(e, Error::NonFinite { ref tensor, .. } if tensor == "token_embd.weight"), "{e}");
    assert!(e.to_string().contains("nan.gguf"));
}

#[test]
fn bad_config_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new(5);
    let cases: [(&str, Meta); 3] = [
        ("llama.attention.head_count_kv", Meta::U32(3)),
        ("llama.embedding_length", s("wide")),
        ("general.architecture", s("gemma2")),
    ];
    for (key, val) in cases {
        let mut meta = model.metadata();
        meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = val;
        let (b, _) = write_gguf(3, &meta, &model.gguf_tensors());
        let e = open(&write(dir.path(), "cfg.gguf", &b)).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::InvalidConfig(_) | Error::BadMetadata { .. } | Error::UnsupportedArchitecture { .. }),
            "{msg}"
        );
        assert!(msg.contains("cfg.gguf"), "{msg}");
    }
    let mut meta = model.metadata();
    meta.push(("llama.rope.scaling.type".into(), s("yarn")));
    let (b, _) = write_gguf(3, &meta, &model.gguf_tensors());
    let e = open(&write(dir.path(), "yarn.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::UnsupportedRopeScaling { ref rope_type, .. } if rope_type == "yarn"), "{e}");
    assert!(e.to_string().contains("llama3"), "the error lists what is supported: {e}");
    let mut meta = model.metadata();
    meta.retain(|(k, _)| k != "llama.block_count");
    let (b, _) = write_gguf(3, &meta, &model.gguf_tensors());
    let e = open(&write(dir.path(), "nokey.gguf", &b)).unwrap_err();
    assert!(matches!(e, Error::MissingMetadata { ref key, .. } if key == "llama.block_count"), "{e}");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Random byte changes in the header, metadata and tensor infos: opening, reading every
        /// tensor and building the tokenizer may fail, but only with an error.
        #[test]
        fn random_header_corruption_never_panics(edits in proptest::collection::vec((0usize..1 << 20, any::<u8>()), 1..5)) {
            let model = TinyModel::new(6);
            let (mut bytes, lay) = model.gguf_bytes();
            for (pos, val) in edits {
                let pos = pos % (lay.infos_end + 32);
                bytes[pos] = val;
            }
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "fuzz.gguf", &bytes);
            if let Ok(ck) = open(&path) {
                for (name, ..) in &model.tensors {
                    let _ = ck.tensor(name);
                }
                if let Ok(tok) = ck.tokenizer() {
                    let ids = tok.encode("Hello world 12", true).unwrap_or_default();
                    let _ = tok.decode(&ids);
                }
                let _ = ck.describe();
            }
        }
    }
}
