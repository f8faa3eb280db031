//! sparse_prefill against a plain f64 block-sparse causal attention per head, and against
//! flash_prefill when every block is listed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use half::f16;
use needle_kernels_cpu::attn::{KvElem, flash_prefill_with};
use needle_kernels_cpu::sparse::sparse_prefill_with;
use needle_kernels_cpu::{BlockLayout, Error, Isa, Pages, sparse_prefill};
use rand::Rng;
use rand::rngs::StdRng;

/// Per KV head: CSR offsets and key blocks of the query blocks of a chunk.
struct Layout {
    offsets: Vec<usize>,
    blocks: Vec<u32>,
}

/// A random layout: each earlier key block with probability `p`, always the diagonal.
fn random_layout(r: &mut StdRng, block: usize, pos0: usize, t: usize, p: f64) -> Layout {
    let (mut offsets, mut blocks) = (vec![0], Vec::new());
    for qb in pos0 / block..=(pos0 + t - 1) / block {
        blocks.extend((0..qb as u32).filter(|_| r.random_bool(p)));
        blocks.push(qb as u32);
        offsets.push(blocks.len());
    }
    Layout { offsets, blocks }
}

/// Does query position `pos` of KV head layout `l` see key `j`?
fn sees(l: &Layout, block: usize, pos0: usize, pos: usize, j: usize) -> bool {
    let i = pos / block - pos0 / block;
    j <= pos && l.blocks[l.offsets[i]..l.offsets[i + 1]].contains(&((j / block) as u32))
}

#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    layouts: &[Layout],
    block: usize,
    hq: usize,
    dim: usize,
    pos0: usize,
    scale: f32,
) -> Vec<f64> {
    let t = q.len() / (hq * dim);
    let group = hq / k.len();
    let mut out = vec![0f64; q.len()];
    for i in 0..t {
        let pos = pos0 + i;
        for h in 0..hq {
            let g = h / group;
            let qr = &q[(i * hq + h) * dim..][..dim];
            let seen: Vec<usize> = (0..=pos).filter(|&j| sees(&layouts[g], block, pos0, pos, j)).collect();
            let s: Vec<f64> = seen
                .iter()
                .map(|&j| {
                    qr.iter()
                        .zip(&k[g][j * dim..(j + 1) * dim])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (&j, sj) in seen.iter().zip(&s) {
                let p = (sj - m).exp() / z;
                for d in 0..dim {
                    out[(i * hq + h) * dim + d] += p * f64::from(v[g][j * dim + d]);
                }
            }
        }
    }
    out
}

struct Case<T> {
    q: Vec<f32>,
    kt: Vec<Vec<Vec<T>>>,
    vt: Vec<Vec<Vec<T>>>,
    kf: Vec<Vec<f32>>,
    vf: Vec<Vec<f32>>,
}

impl<T: KvElem> Case<T> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        r: &mut StdRng,
        conv: fn(&[f32]) -> Vec<T>,
        back: fn(&[T]) -> Vec<f32>,
        t: usize,
        len: usize,
        hq: usize,
        hkv: usize,
        dim: usize,
        page_rows: usize,
    ) -> Self {
        let q = randn(r, t * hq * dim);
        let k: Vec<Vec<T>> = (0..hkv).map(|_| conv(&randn(r, len * dim))).collect();
        let v: Vec<Vec<T>> = (0..hkv).map(|_| conv(&randn(r, len * dim))).collect();
        let page = |x: &Vec<T>| x.chunks(page_rows * dim).map(<[T]>::to_vec).collect();
        Case {
            q,
            kf: k.iter().map(|x| back(x)).collect(),
            vf: v.iter().map(|x| back(x)).collect(),
            kt: k.iter().map(page).collect(),
            vt: v.iter().map(page).collect(),
        }
    }
}

fn check<T: KvElem>(conv: fn(&[f32]) -> Vec<T>, back: fn(&[T]) -> Vec<f32>, tol: f64) {
    let mut r = rng(13);
    // Group sizes 3, 1, 4 and 7; dims with every AVX2/NEON remainder; chunks that start and end
    // inside blocks, blocks smaller and larger than a key tile and a page, odd page sizes.
    for (hq, hkv) in [(9, 3), (4, 4), (8, 2), (7, 1)] {
        for dim in [64, 24, 20, 128] {
            for (t, pos0, block, page_rows, p) in [
                (1, 0, 16, 16, 0.5),
                (37, 0, 16, 16, 0.3),
                (70, 41, 32, 7, 0.4),
                (100, 130, 64, 256, 0.5),
                (90, 300, 128, 64, 0.6),
                (45, 200, 48, 256, 0.0),
            ] {
                let len = pos0 + t + 3;
                let c = Case::new(&mut r, conv, back, t, len, hq, hkv, dim, page_rows);
                let layouts: Vec<Layout> = (0..hkv).map(|_| random_layout(&mut r, block, pos0, t, p)).collect();
                let kr: Vec<Vec<&[T]>> = c.kt.iter().map(|ps| ps.iter().map(Vec::as_slice).collect()).collect();
                let vr: Vec<Vec<&[T]>> = c.vt.iter().map(|ps| ps.iter().map(Vec::as_slice).collect()).collect();
                let keys: Vec<Pages<'_, T>> = kr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                let values: Vec<Pages<'_, T>> = vr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
                let bl: Vec<BlockLayout<'_>> = layouts
                    .iter()
                    .map(|l| BlockLayout { block, first: pos0 / block, offsets: &l.offsets, blocks: &l.blocks })
                    .collect();
                let scale = 1.0 / (dim as f32).sqrt();
                let want = reference(&c.q, &c.kf, &c.vf, &layouts, block, hq, dim, pos0, scale);
                for isa in Isa::all_available() {
                    let mut out = vec![f32::NAN; c.q.len()];
                    sparse_prefill_with(isa, &c.q, &keys, &values, &mut out, pos0, hq, scale, &bl).unwrap();
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (f64::from(*g) - w).abs() <= tol,
                            "{isa:?} hq {hq}/{hkv} dim {dim} t {t} pos0 {pos0} block {block} pages {page_rows} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn f32_pages_match_f64_reference() {
    check::<f32>(|x| x.to_vec(), |x| x.to_vec(), 2e-5);
}

#[test]
fn f16_pages_match_f64_reference_of_the_rounded_cache() {
    check::<f16>(|x| x.iter().map(|v| f16::from_f32(*v)).collect(), |x| x.iter().map(|v| v.to_f32()).collect(), 2e-5);
}

#[test]
fn every_block_listed_is_flash_prefill() {
    let mut r = rng(21);
    for (hq, hkv, dim, t, pos0, block, page_rows) in
        [(9, 3, 64, 200, 0, 64, 256), (8, 2, 40, 77, 29, 32, 16), (3, 1, 128, 130, 500, 128, 256)]
    {
        let len = pos0 + t;
        let c = Case::<f32>::new(&mut r, |x| x.to_vec(), |x| x.to_vec(), t, len, hq, hkv, dim, page_rows);
        let dense = random_layout(&mut r, block, pos0, t, 1.0);
        let kr: Vec<Vec<&[f32]>> = c.kt.iter().map(|ps| ps.iter().map(Vec::as_slice).collect()).collect();
        let vr: Vec<Vec<&[f32]>> = c.vt.iter().map(|ps| ps.iter().map(Vec::as_slice).collect()).collect();
        let keys: Vec<Pages<'_>> = kr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
        let values: Vec<Pages<'_>> = vr.iter().map(|p| Pages { pages: p, page_rows, len, dim }).collect();
        let bl = vec![BlockLayout { block, first: pos0 / block, offsets: &dense.offsets, blocks: &dense.blocks }; hkv];
        for isa in Isa::all_available() {
            let (mut a, mut b) = (vec![f32::NAN; c.q.len()], vec![f32::NAN; c.q.len()]);
            sparse_prefill_with(isa, &c.q, &keys, &values, &mut a, pos0, hq, 0.125, &bl).unwrap();
            flash_prefill_with(isa, &c.q, &keys, &values, &mut b, pos0, hq, 0.125).unwrap();
            // The same tiles in the same order: the same floats.
            assert_eq!(a, b, "{isa:?} hq {hq}/{hkv} dim {dim} t {t} pos0 {pos0} block {block}");
        }
    }
}

#[test]
fn bad_layouts_are_errors() {
    let page = vec![0f32; 8 * 4];
    let pages = [page.as_slice()];
    let kv = [Pages { pages: &pages, page_rows: 8, len: 8, dim: 4 }];
    let q = vec![0.5f32; 6 * 4];
    let mut out = vec![0f32; q.len()];
    // Positions 2..8 in blocks of 4: query blocks 0 and 1.
    let run = |offsets: &[usize], blocks: &[u32], first: usize, block: usize, out: &mut [f32]| {
        let l = [BlockLayout { block, first, offsets, blocks }];
        sparse_prefill(&q, &kv, &kv, out, 2, 1, 1.0, &l)
    };
    let invalid = |e: Error| matches!(e, Error::Invalid { param: "layouts", .. });
    assert!(invalid(run(&[0, 1, 2], &[0, 0], 0, 4, &mut out).unwrap_err())); // no diagonal in block 1
    assert!(invalid(run(&[0, 1, 3], &[0, 1, 0], 0, 4, &mut out).unwrap_err())); // not ascending
    assert!(invalid(run(&[0, 1], &[0], 0, 4, &mut out).unwrap_err())); // one query block short
    assert!(invalid(run(&[0, 1, 3], &[0, 0, 1], 1, 4, &mut out).unwrap_err())); // wrong first block
    assert!(invalid(run(&[0, 1, 2], &[0, 1], 0, 0, &mut out).unwrap_err())); // block 0
    assert!(invalid(run(&[0, 1, 4], &[0, 0, 1], 0, 4, &mut out).unwrap_err())); // offsets past blocks
    let two = [BlockLayout { block: 4, first: 0, offsets: &[0, 1, 3], blocks: &[0, 0, 1] }; 2];
    let e = sparse_prefill(&q, &kv, &kv, &mut out, 2, 1, 1.0, &two).unwrap_err();
    assert!(matches!(e, Error::Len { param: "layouts", .. }), "{e}");
    run(&[0, 1, 3], &[0, 0, 1], 0, 4, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}
