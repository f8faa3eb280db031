//! Dequantisation of each ggml type: against gguf-py on random blocks (fixture), against plain
//! per-element references written from the block layouts, and through quantise/dequantise.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use needle_loader::gguf::{GgmlType, dequantize};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn run(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.block_bytes * ty.block_elems;
    let mut out = vec![0f32; n];
    assert!(dequantize(ty, bytes, &mut out));
    out
}

#[test]
fn matches_gguf_py_on_random_blocks() {
    let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/gguf_reference.json")).unwrap();
    let blocks = fixture["blocks"].as_object().unwrap();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let e = &blocks[ty.name];
        let hex = e["hex"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let got = run(ty, &bytes);
        let want: Vec<f32> = e["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len(), "{}", ty.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{}[{i}]: {g} vs gguf-py {w}", ty.name);
        }
    }
}

fn f16(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Random block bytes with finite f16 scales at the given offsets.
fn random_blocks(rng: &mut StdRng, ty: GgmlType, n: usize, scale_offsets: &[usize]) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n * ty.block_bytes).map(|_| rng.random()).collect();
    for blk in b.chunks_exact_mut(ty.block_bytes) {
        for &o in scale_offsets {
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
        }
    }
    b
}

/// Q4_K element `i` of a block, straight from the layout: element i is in 64-chunk i/64, its
/// sub-block is i/32, its nibble is byte 32*(i/64) + i%32, low nibble for the first 32 of the chunk.
fn q4_k_ref(b: &[u8], i: usize) -> f32 {
    let (d, dmin, sc) = (f16(b, 0), f16(b, 2), &b[4..16]);
    let j = i / 32;
    let (s, m) = if j < 4 {
        (sc[j] & 0x3F, sc[j + 4] & 0x3F)
    } else {
        ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    };
    let byte = b[16 + 32 * (i / 64) + i % 32];
    let q = if (i % 64) < 32 { byte & 0xF } else { byte >> 4 };
    d * s as f32 * q as f32 - dmin * m as f32
}

/// Q6_K element `i`: 128-element halves; within one, quarter r = (i%128)/32 picks low/high nibble
/// of `ql` (byte l or l+32) and bit pair 2r of `qh[l]`; scale index is (i/16).
fn q6_k_ref(b: &[u8], i: usize) -> f32 {
    let (h, r, l) = (i / 128, (i % 128) / 32, i % 32);
    let ql = b[64 * h + l + if r % 2 == 1 { 32 } else { 0 }];
    let low = if r < 2 { ql & 0xF } else { ql >> 4 };
    let high = (b[128 + 32 * h + l] >> (2 * r)) & 3;
    let q = (low | (high << 4)) as i32 - 32;
    let scale = b[192 + i / 16] as i8 as f32;
    f16(b, 208) * scale * q as f32
}

#[test]
fn k_quants_match_plain_reference() {
    let mut rng = StdRng::seed_from_u64(42);
    for (ty, offs, reference) in
        [(GgmlType::Q4_K, vec![0, 2], q4_k_ref as fn(&[u8], usize) -> f32), (GgmlType::Q6_K, vec![208], q6_k_ref)]
    {
        let bytes = random_blocks(&mut rng, ty, 20, &offs);
        let got = run(ty, &bytes);
        for (bi, blk) in bytes.chunks_exact(ty.block_bytes).enumerate() {
            for i in 0..256 {
                let want = reference(blk, i);
                assert!(
                    (got[bi * 256 + i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{} block {bi} [{i}]",
                    ty.name
                );
            }
        }
    }
}

#[test]
fn legacy_quants_match_plain_reference() {
    let mut rng = StdRng::seed_from_u64(43);
    let bytes = random_blocks(&mut rng, GgmlType::Q4_1, 10, &[0, 2]);
    let got = run(GgmlType::Q4_1, &bytes);
    for (bi, b) in bytes.chunks_exact(20).enumerate() {
        for i in 0..32 {
            let q = if i < 16 { b[4 + i] & 0xF } else { b[4 + i - 16] >> 4 };
            assert_eq!(got[bi * 32 + i], f16(b, 0) * q as f32 + f16(b, 2));
        }
    }
    let bytes = random_blocks(&mut rng, GgmlType::Q4_0, 10, &[0]);
    let got = run(GgmlType::Q4_0, &bytes);
    for (bi, b) in bytes.chunks_exact(18).enumerate() {
        for i in 0..32 {
            let q = if i < 16 { b[2 + i] & 0xF } else { b[2 + i - 16] >> 4 };
            assert_eq!(got[bi * 32 + i], (q as i32 - 8) as f32 * f16(b, 0));
        }
    }
    let bytes = random_blocks(&mut rng, GgmlType::Q8_0, 10, &[0]);
    let got = run(GgmlType::Q8_0, &bytes);
    for (bi, b) in bytes.chunks_exact(34).enumerate() {
        for i in 0..32 {
            assert_eq!(got[bi * 32 + i], b[2 + i] as i8 as f32 * f16(b, 0));
        }
    }
}

#[test]
fn quantise_round_trip_within_tolerance() {
    let mut rng = StdRng::seed_from_u64(44);
    // Large enough to take the parallel path too.
    for n in [64usize, 32 * 5000] {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for (ty, id) in
            [(GgmlType::F16, 1), (GgmlType::Q8_0, 8), (GgmlType::Q4_0, 2), (GgmlType::Q4_1, 3), (GgmlType::F32, 0)]
        {
            let got = run(ty, &encode(id, &x));
            let worst = got.iter().zip(&x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= tolerance(id, 1.0), "{} n={n}: {worst}", ty.name);
        }
    }
}

#[test]
fn rejects_bad_lengths_and_unsupported_types() {
    let mut out = vec![0f32; 32];
    assert!(!dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out));
    assert!(!dequantize(GgmlType::Q4_K, &[0u8; 144], &mut out));
    let iq4_xs = GgmlType::from_id(23).unwrap();
    assert!(!iq4_xs.can_dequantize());
    assert!(!dequantize(iq4_xs, &[0u8; 136], &mut vec![0f32; 256]));
    for id in [6, 7, 13, 20] {
        assert!(GgmlType::from_id(id).unwrap().can_dequantize(), "Q5_0, Q5_1, Q5_K, IQ4_NL (id {id})");
    }
}

#[test]
fn named_types_agree_with_the_id_table() {
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert_eq!(GgmlType::from_id(ty.id), Some(ty));
        assert!(ty.can_dequantize());
    }
}
