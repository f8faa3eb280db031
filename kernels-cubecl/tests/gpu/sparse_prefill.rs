//! Block-sparse causal prefill against the f64 reference of block-masked attention: query `i`
//! of the chunk (position `start + i`, query block `b`) sees the keys up to its own in the key
//! blocks its KV head's list names for `b`, and nothing else.

use needle_kernels_cubecl::{DeviceKv, Error, prefill_attention, sparse_prefill_attention};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::{assert_close, client, normal, ref_attend, rng, values};
use crate::decode::{TOL, TOL_LARGE};

/// Which key blocks a query block keeps besides its own (the diagonal, always kept).
#[derive(Clone, Copy, Debug)]
enum Mask {
    /// The diagonal alone.
    Empty,
    /// Every block: dense.
    Full,
    /// Each earlier block with probability 1/3 (different per KV head).
    Random,
}

/// Per KV head, `(offsets, blocks)` over the query blocks of `t` positions from `start`.
fn lists(r: &mut StdRng, mask: Mask, n_kv: usize, block: usize, start: usize, t: usize) -> Vec<(Vec<usize>, Vec<u32>)> {
    let qbs = start / block..(start + t - 1) / block + 1;
    (0..n_kv)
        .map(|_| {
            let (mut offsets, mut blocks) = (vec![0], Vec::new());
            for qb in qbs.clone() {
                for kb in 0..qb {
                    let keep = match mask {
                        Mask::Empty => false,
                        Mask::Full => true,
                        Mask::Random => r.random_range(0..3) == 0,
                    };
                    if keep {
                        blocks.push(kb as u32);
                    }
                }
                blocks.push(qb as u32);
                offsets.push(blocks.len());
            }
            (offsets, blocks)
        })
        .collect()
}

struct Case {
    t: usize,
    start: usize,
    n_kv: usize,
    group: usize,
    d: usize,
    block: usize,
}

fn check(seed: u64, c: &Case, mask: Mask, q_gain: f32) {
    let Some(client) = client() else { return };
    let mut r = rng(seed);
    let Case { t, start, n_kv, group, d, block } = *c;
    let n_rows = start + t + 5; // rows past the chunk exist and must stay unseen
    let n_q = n_kv * group;
    let k = normal(&mut r, n_rows * n_kv * d);
    let v = values(&mut r, n_rows * n_kv * d);
    let q: Vec<f32> = normal(&mut r, t * n_q * d).into_iter().map(|x| x * q_gain).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let heads = lists(&mut r, mask, n_kv, block, start, t);
    let refs: Vec<(&[usize], &[u32])> = heads.iter().map(|(o, b)| (&o[..], &b[..])).collect();
    let kv = DeviceKv::upload(&client, &k, &v, n_rows, n_kv, d).unwrap();
    let got = sparse_prefill_attention(&client, &kv, &q, n_q, start, scale, block, &refs).unwrap();
    let first = start / block;
    for i in 0..t {
        let pos = start + i;
        let qb = pos / block - first;
        for (h, (offsets, blocks)) in heads.iter().enumerate() {
            let kept = &blocks[offsets[qb]..offsets[qb + 1]];
            let ids: Vec<u32> = (0..=pos as u32).filter(|&j| kept.contains(&(j / block as u32))).collect();
            for hq in h * group..(h + 1) * group {
                let row = i * n_q + hq;
                let (out, lse) = ref_attend(&q[row * d..(row + 1) * d], &k, &v, n_kv, d, h, &ids, None, scale);
                let what = format!(
                    "seed {seed} {mask:?} t {t} start {start} group {group} d {d} block {block}: token {i} head {hq}"
                );
                let tol = if q_gain > 1.0 { TOL_LARGE } else { TOL };
                assert_close(&format!("{what} out"), &got.out[row * d..(row + 1) * d], &out, tol);
                assert_close(&format!("{what} lse"), &got.lse[row..row + 1], &[lse], tol);
            }
        }
    }
}

/// Partial first and last blocks, GQA groups 1 to 4, blocks smaller than, equal to and not a
/// multiple of the key tile, a chunk inside one block.
const CASES: [Case; 5] = [
    Case { t: 37, start: 0, n_kv: 2, group: 3, d: 64, block: 16 },
    Case { t: 50, start: 45, n_kv: 2, group: 4, d: 80, block: 32 },
    Case { t: 70, start: 13, n_kv: 3, group: 1, d: 64, block: 8 },
    Case { t: 9, start: 100, n_kv: 1, group: 2, d: 96, block: 64 },
    Case { t: 40, start: 30, n_kv: 2, group: 3, d: 64, block: 48 },
];

#[test]
fn sparse_prefill_matches_the_block_masked_reference() {
    let mut seed = 300;
    for case in &CASES {
        for mask in [Mask::Empty, Mask::Full, Mask::Random, Mask::Random] {
            seed += 1;
            check(seed, case, mask, 1.0);
        }
    }
}

#[test]
fn sparse_prefill_is_stable_for_large_magnitude_scores() {
    check(399, &Case { t: 30, start: 70, n_kv: 1, group: 3, d: 64, block: 16 }, Mask::Random, 200.0);
}

#[test]
fn sparse_prefill_with_every_block_is_the_dense_kernel() {
    let Some(c) = client() else { return };
    let mut r = rng(398);
    let (t, start, n_kv, group, d, block) = (45, 60, 2, 3, 64, 32);
    let n_rows = start + t;
    let k = normal(&mut r, n_rows * n_kv * d);
    let v = values(&mut r, n_rows * n_kv * d);
    let q = normal(&mut r, t * n_kv * group * d);
    let kv = DeviceKv::upload(&c, &k, &v, n_rows, n_kv, d).unwrap();
    let heads = lists(&mut r, Mask::Full, n_kv, block, start, t);
    let refs: Vec<(&[usize], &[u32])> = heads.iter().map(|(o, b)| (&o[..], &b[..])).collect();
    let sparse = sparse_prefill_attention(&c, &kv, &q, n_kv * group, start, 0.125, block, &refs).unwrap();
    let dense = prefill_attention(&c, &kv, &q, n_kv * group, start, 0.125).unwrap();
    // Key tiles of 32 line up with blocks of 32: the same tiles in the same order.
    assert_eq!(sparse.out, dense.out);
    assert_eq!(sparse.lse, dense.lse);
}

#[test]
fn sparse_prefill_rejects_bad_block_lists() {
    let Some(c) = client() else { return };
    let d = 64;
    let kv = DeviceKv::upload(&c, &[0.0; 40 * 64], &[0.0; 40 * 64], 40, 1, d).unwrap();
    let q = [0.0f32; 20 * 64];
    // 20 queries from 10 in blocks of 8: query blocks 1..=3.
    let run = |offsets: &[usize], blocks: &[u32]| {
        sparse_prefill_attention(&c, &kv, &q, 1, 10, 1.0, 8, &[(offsets, blocks)]).unwrap_err()
    };
    let param = |e: Error| match e {
        Error::Invalid { param, .. } => param,
        e => panic!("{e}"),
    };
    assert_eq!(param(run(&[0, 1, 2], &[1, 2])), "offsets", "one query block short");
    assert_eq!(param(run(&[0, 1, 2, 4], &[1, 2, 3])), "offsets", "past the blocks");
    assert_eq!(param(run(&[0, 1, 2, 3], &[1, 2, 2])), "blocks", "no diagonal");
    assert_eq!(param(run(&[0, 1, 2, 4], &[1, 2, 3, 3])), "blocks", "not ascending");
    assert_eq!(param(run(&[0, 1, 1, 2], &[1, 3])), "blocks", "an empty list");
    assert_eq!(param(run(&[0, 1, 2, 4], &[1, 2, 4, 3])), "blocks", "a future block");
    let ok = sparse_prefill_attention(&c, &kv, &q, 1, 10, 1.0, 8, &[(&[0, 1, 2, 3], &[1, 2, 3])]);
    assert!(ok.is_ok());
    let err = sparse_prefill_attention(&c, &kv, &q, 1, 30, 1.0, 8, &[(&[0, 1, 2, 3], &[1, 2, 3])]).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}
