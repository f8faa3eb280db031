//! Q5_0, Q5_1 and IQ4_NL against an independent implementation: fixtures written by gguf-py's
//! numpy quantizer and dequantizer (tests/reference/make_block_fixtures.py).
#![allow(clippy::unwrap_used)]

use needle_quant::{QuantType, dequantize_row, quantize_row};
use serde_json::Value;

struct Fixture {
    input: Option<Vec<f32>>,
    bytes: Vec<u8>,
    output: Vec<f32>,
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32)).collect()
}

fn load(name: &str) -> Fixture {
    let path = format!("{}/tests/fixtures/blocks_{name}.json", env!("CARGO_MANIFEST_DIR"));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hex = doc["bytes"].as_str().unwrap();
    let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let input = if doc["input"].is_null() { None } else { Some(floats(&doc["input"])) };
    Fixture { input, bytes, output: floats(&doc["output"]) }
}

const CASES: [(QuantType, &str); 3] =
    [(QuantType::Q5_0, "q5_0"), (QuantType::Q5_1, "q5_1"), (QuantType::IQ4_NL, "iq4_nl")];

#[test]
fn dequantize_row_reproduces_gguf_py_bit_for_bit() {
    for (ty, name) in CASES {
        let f = load(name);
        assert_eq!(f.bytes.len(), f.output.len() / 32 * ty.block_bytes(), "{name}");
        let mut got = vec![0f32; f.output.len()];
        dequantize_row(ty, &f.bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&f.output).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} element {i}: {g} vs gguf-py {w}");
        }
    }
}

/// Q5_0 and Q5_1 round exactly as ggml's reference quantizers (which gguf-py copies): same bytes.
#[test]
fn q5_quantizers_give_gguf_py_bytes() {
    for (ty, name) in &CASES[..2] {
        let f = load(name);
        let x = f.input.unwrap();
        let mut got = vec![0u8; f.bytes.len()];
        quantize_row(*ty, &x, &mut got).unwrap();
        for (blk, (g, w)) in got.chunks(ty.block_bytes()).zip(f.bytes.chunks(ty.block_bytes())).enumerate() {
            assert_eq!(g, w, "{name} block {blk}");
        }
    }
}

/// IQ4_NL has no gguf-py quantizer: needle's must at least invert the fixture's dequantizer
/// within the table's widest half-gap (plus the fitted scale's slack) on the Q5_0 inputs.
#[test]
fn iq4_nl_quantizer_round_trips_within_the_table_gap() {
    let x = load("q5_0").input.unwrap();
    let mut bytes = vec![0u8; x.len() / 32 * 18];
    quantize_row(QuantType::IQ4_NL, &x, &mut bytes).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize_row(QuantType::IQ4_NL, &bytes, &mut y).unwrap();
    for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err: f32 = xb.iter().zip(yb).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err <= amax * 0.2, "max error {err} for amax {amax}");
        // Errors average far below the bound on Gaussian inputs (the table is dense near zero).
        let rms = (xb.iter().zip(yb).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 32.0).sqrt();
        assert!(rms <= amax * 0.06, "rms error {rms} for amax {amax}");
    }
}
