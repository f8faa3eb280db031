//! The patterns on seeded synthetic attention with a planted vertical line and a planted slash:
//! the blocks holding them are chosen, far unrelated blocks are not.
#![allow(clippy::unwrap_used)]

use needle_core::Rows;
use needle_core::prefill::{BlockMask, PrefillChunk, plan_chunk};
use needle_prefill::{Flex, VerticalSlash, parse};
use rand::{Rng, SeedableRng, rngs::StdRng};

const DIM: usize = 64;
const HQ: usize = 2;
const N: usize = 1024;
const POS0: usize = 512;
/// Key 200 (block 3) is attended by every query; query `i` attends key `i − 300`.
const VERTICAL: usize = 200;
const SLASH: usize = 300;

fn unit(r: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// With `sink`, key 0 is the vertical line's direction too (an attention sink).
fn data(seed: u64, sink: bool) -> (Vec<f32>, Vec<f32>) {
    let mut r = StdRng::seed_from_u64(seed);
    let dirs: Vec<Vec<f32>> = (0..N).map(|_| unit(&mut r)).collect();
    let u = unit(&mut r);
    let mut keys: Vec<f32> = dirs.concat();
    keys[VERTICAL * DIM..(VERTICAL + 1) * DIM].copy_from_slice(&u);
    if sink {
        keys[..DIM].copy_from_slice(&u);
    }
    let mut q = Vec::new();
    for i in 0..N - POS0 {
        let pos = POS0 + i;
        for _ in 0..HQ {
            q.extend(dirs[pos - SLASH].iter().zip(&u).map(|(a, b)| 100.0 * a + 100.0 * b));
        }
    }
    (keys, q)
}

fn mask(pattern: &str, seed: u64) -> BlockMask {
    mask_with(pattern, seed, false)
}

fn mask_with(pattern: &str, seed: u64, sink: bool) -> BlockMask {
    let (keys, q) = data(seed, sink);
    let rows = Rows::new("keys", &keys, DIM).unwrap();
    let chunk = PrefillChunk {
        layer: 0,
        kv_head: 0,
        queries: &q,
        n_q_heads: HQ,
        heads: 0..HQ,
        dim: DIM,
        pos0: POS0,
        keys: &rows,
        scale: 1.0 / (DIM as f32).sqrt(),
        prompt_end: None,
    };
    plan_chunk(parse(pattern).unwrap().pattern().unwrap(), &chunk).unwrap()
}

#[test]
fn vertical_slash_finds_the_planted_line_and_diagonal() {
    for seed in [1, 2] {
        let m = mask("vertical-slash:vertical=1,slash=1", seed);
        // Query block 12 (positions 768..832): sink 0, vertical key 200 (block 3), keys
        // 468..532 (blocks 7, 8), the local window 11 and 12.
        assert_eq!(m.key_blocks(12), [0, 3, 7, 8, 11, 12], "seed {seed}");
        // The chunk's last query block is dense.
        assert_eq!(m.key_blocks(15).len(), 16);
    }
}

#[test]
fn anchor_finds_the_planted_stripes_and_grows_with_theta() {
    // The anchor is the sink's score (as in trained models); random keys score far below it.
    let m = mask_with("anchor:theta=4", 5, true);
    for qb in 8..15 {
        let kb = m.key_blocks(qb);
        let diag = (qb * 64 - SLASH) / 64;
        assert!(kb.contains(&3) && kb.contains(&(diag as u32)), "block {qb}: {kb:?}");
        assert!(kb.len() <= 7, "block {qb}: {kb:?}");
    }
    let (few, many) =
        (mask_with("anchor:theta=1", 5, true).density(), mask_with("anchor:theta=100", 5, true).density());
    assert!(few.0 < many.0 && many.0 == many.1, "{few:?} {many:?}");
}

#[test]
fn sale_finds_the_planted_line_and_diagonal_and_grows_as_tau_falls() {
    // The sink scores as the vertical line does: relative to it, the line's and the slash's
    // blocks score about 1. Random keys score ±2.2 (scaled logits) against the line's 12.5: a
    // random block holds from a few thousandths to a few hundredths of the sink's mass, so the
    // default tau (0.005) keeps most of them, as it should for attention that flat.
    for seed in [5, 6] {
        let m = mask_with("sale:tau=0.1", seed, true);
        for qb in 8..15 {
            let kb = m.key_blocks(qb);
            let diag = (qb * 64 - SLASH) / 64;
            assert!(kb.contains(&3) && kb.contains(&(diag as u32)), "seed {seed}, block {qb}: {kb:?}");
            assert!(kb.len() <= 7, "seed {seed}, block {qb}: {kb:?}");
        }
    }
    let density = |s: &str| mask_with(s, 5, true).density();
    let (few, mid, all) = (density("sale:tau=0.5"), density("sale:tau=0.1"), density("sale:tau=0"));
    assert!(few.0 <= mid.0 && mid.0 < all.0 && all.0 == all.1, "{few:?} {mid:?} {all:?}");
}

#[test]
fn flex_keeps_the_planted_blocks_and_grows_with_gamma() {
    let m = mask("flex:gamma=0.9", 3);
    for qb in 8..15 {
        let kb = m.key_blocks(qb);
        let diag = (qb * 64 - SLASH) / 64;
        assert!(kb.contains(&3) && kb.contains(&(diag as u32)), "block {qb}: {kb:?}");
    }
    let density = |s: &str| {
        let (kept, all) = mask(s, 3).density();
        kept as f64 / all as f64
    };
    let (lo, mid, hi) = (density("flex:gamma=0.3"), density("flex:gamma=0.9"), density("flex:gamma=1"));
    assert!(lo <= mid && mid <= hi, "{lo} {mid} {hi}");
    // The last queries also see the slash as vertical keys 660..724 (blocks 10, 11) and the
    // vertical line as slash offsets 760..824 (blocks 0, 1 of block 12): blocks no line crosses
    // stay out.
    assert!(m.key_blocks(12).iter().all(|b| ![2, 4, 5, 6, 9].contains(b)), "{:?}", m.key_blocks(12));
}

#[test]
fn flex_divergence_is_small_when_pooling_is_faithful() {
    // Keys and queries all near one direction: the pooled estimate is the truth.
    let mut r = StdRng::seed_from_u64(9);
    let u = unit(&mut r);
    let keys: Vec<f32> =
        (0..N).flat_map(|_| u.iter().map(|x| x + 0.01 * r.random_range(-1.0f32..1.0)).collect::<Vec<_>>()).collect();
    let q: Vec<f32> = (0..(N - POS0) * HQ).flat_map(|_| u.clone()).collect();
    let rows = Rows::new("keys", &keys, DIM).unwrap();
    let chunk = PrefillChunk {
        layer: 0,
        kv_head: 0,
        queries: &q,
        n_q_heads: HQ,
        heads: 0..HQ,
        dim: DIM,
        pos0: POS0,
        keys: &rows,
        scale: 0.125,
        prompt_end: None,
    };
    let d = Flex::default().divergences(&chunk);
    assert!(d.iter().all(|&x| x < 0.1), "{d:?}");
    let (keys, q) = data(4, false);
    let rows = Rows::new("keys", &keys, DIM).unwrap();
    let planted = PrefillChunk { queries: &q, keys: &rows, ..chunk };
    assert!(Flex::default().divergences(&planted).iter().all(|&x| x > 0.1), "a slash is not what pooling sees");
    let _ = VerticalSlash::default();
}
