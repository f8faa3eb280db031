//! Block formats: ids and sizes, and Q5_K (which the loader's gguf-py fixture does not cover)
//! against a per-element reference read straight from the layout.
#![allow(clippy::unwrap_used)]

use needle_quant::{Error, QuantType, dequantize_row};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn ids_and_sizes_follow_ggml() {
    let table = [
        (QuantType::F32, 0, 1, 4),
        (QuantType::F16, 1, 1, 2),
        (QuantType::Q4_0, 2, 32, 18),
        (QuantType::Q4_1, 3, 32, 20),
        (QuantType::Q5_0, 6, 32, 22),
        (QuantType::Q5_1, 7, 32, 24),
        (QuantType::IQ4_NL, 20, 32, 18),
        (QuantType::Q8_0, 8, 32, 34),
        (QuantType::Q4_K, 12, 256, 144),
        (QuantType::Q5_K, 13, 256, 176),
        (QuantType::Q6_K, 14, 256, 210),
        (QuantType::BF16, 30, 1, 2),
    ];
    for (ty, id, be, bb) in table {
        assert_eq!((ty.ggml_id(), ty.block_elems(), ty.block_bytes()), (id, be, bb), "{ty:?}");
        assert_eq!(QuantType::from_ggml_id(id).unwrap(), ty);
    }
    assert_eq!(table.len(), QuantType::ALL.len());
    // Q2_K: not supported.
    assert_eq!(QuantType::from_ggml_id(10), Err(Error::UnsupportedType(10)));
}

fn f16(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Element `i` of a Q5_K block: sub-block j = i/32 with 6-bit scale/min j, low 4 bits in byte
/// 32·(i/64) + i%32 of `qs` (low nibble in the first half of the 64-chunk), bit 4 = bit j of qh[i%32].
fn q5_k_ref(b: &[u8], i: usize) -> f32 {
    let (d, dmin, sc, qh, qs) = (f16(b, 0), f16(b, 2), &b[4..16], &b[16..48], &b[48..176]);
    let j = i / 32;
    let (s, m) = if j < 4 {
        (sc[j] & 0x3F, sc[j + 4] & 0x3F)
    } else {
        ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    };
    let byte = qs[32 * (i / 64) + i % 32];
    let lo = if (i % 64) < 32 { byte & 0xF } else { byte >> 4 };
    let q = lo | (((qh[i % 32] >> j) & 1) << 4);
    d * s as f32 * q as f32 - dmin * m as f32
}

#[test]
fn q5_k_matches_layout_reference() {
    let mut r = StdRng::seed_from_u64(9);
    let n = 256 * 5;
    // Random bytes (every bit pattern) with finite f16 scales `d` and `dmin`.
    let mut w: Vec<u8> = (0..n / 256 * 176).map(|_| r.random()).collect();
    for blk in w.chunks_exact_mut(176) {
        for o in [0, 2] {
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(r.random_range(-0.1f32..0.1)).to_le_bytes());
        }
    }
    let mut got = vec![0f32; n];
    dequantize_row(QuantType::Q5_K, &w, &mut got).unwrap();
    for (blk, (b, g)) in w.chunks(176).zip(got.chunks(256)).enumerate() {
        for (i, v) in g.iter().enumerate() {
            let want = q5_k_ref(b, i);
            assert!((v - want).abs() <= 1e-6 * want.abs().max(1e-3), "block {blk}[{i}]: {v} vs {want}");
        }
    }
}

#[test]
fn dequantize_row_rejects_bad_lengths() {
    let mut out = vec![0f32; 64];
    assert!(matches!(dequantize_row(QuantType::Q4_K, &[0; 144], &mut out), Err(Error::NotBlockMultiple { .. })));
    assert!(matches!(dequantize_row(QuantType::Q8_0, &[0; 67], &mut out), Err(Error::Len { param: "bytes", .. })));
}
