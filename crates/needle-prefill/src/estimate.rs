//! What the patterns estimate from: the exact attention of the chunk's last queries (MInference's
//! `last_q`, FlexPrefill's last query block), summed into vertical (per key), slash (per offset
//! `pos − key`) and per-key-block totals, one set per query head of the group.

use needle_core::prefill::PrefillChunk;

/// The last queries' attention of one query head, summed three ways. Each of the `rows` query
/// rows contributes a distribution (sum 1), so every total sums to `rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadStats {
    /// Query rows summed.
    pub rows: usize,
    /// `vertical[j]`: attention on key `j`.
    pub vertical: Vec<f64>,
    /// `slash[o]`: attention on the keys `o` positions before their query.
    pub slash: Vec<f64>,
    /// `blocks[b]`: attention on key block `b`.
    pub blocks: Vec<f64>,
}

/// [`HeadStats`] of every head of the chunk's group, from its last `last_q` query rows (fewer
/// when the chunk is shorter) over all the keys they see.
pub fn last_queries(chunk: &PrefillChunk<'_>, last_q: usize, block: usize) -> Vec<HeadStats> {
    let (t, dim) = (chunk.t(), chunk.dim);
    let rows = last_q.clamp(1, t);
    let first = t - rows;
    let n = chunk.pos0 + t;
    let (h0, g) = (chunk.heads.start, chunk.heads.len());
    // Row `r` is query row `first + r / g` of head `h0 + r % g`, at position `pos(r)`.
    let nr = rows * g;
    let pos = |r: usize| chunk.pos0 + first + r / g;
    // Qᵀ (dim × rows, scaled) and scores Sᵀ (keys × rows): each key row is read once and its
    // scores against every row are plain vector FMAs (the layout of the flash prefill kernel).
    let mut qt = vec![0f32; dim * nr];
    for r in 0..nr {
        for (d, &x) in chunk.query(first + r / g, h0 + r % g).iter().enumerate() {
            qt[d * nr + r] = x * chunk.scale;
        }
    }
    let mut st = vec![0f32; n * nr];
    let mut k = vec![0f32; dim];
    for (j, sj) in st.chunks_exact_mut(nr).enumerate() {
        k.iter_mut().zip(chunk.keys.row(j).iter()).for_each(|(a, b)| *a = b);
        for (&kd, q) in k.iter().zip(qt.chunks_exact(nr)) {
            sj.iter_mut().zip(q).for_each(|(a, b)| *a += kd * b);
        }
    }
    // Keys after `open` are in the future of some rows: masked there.
    let open = chunk.pos0 + first;
    for (j, sj) in st.chunks_exact_mut(nr).enumerate().skip(open + 1) {
        sj.iter_mut().enumerate().filter(|(r, _)| j > pos(*r)).for_each(|(_, x)| *x = f32::NEG_INFINITY);
    }
    let mut m = vec![f32::NEG_INFINITY; nr];
    for sj in st.chunks_exact(nr) {
        m.iter_mut().zip(sj).for_each(|(a, &b)| *a = a.max(b));
    }
    let mut z = vec![0f32; nr];
    for sj in st.chunks_exact_mut(nr) {
        for ((x, &mr), zr) in sj.iter_mut().zip(&m).zip(z.iter_mut()) {
            *x = (*x - mr).exp();
            *zr += *x;
        }
    }
    let inv: Vec<f32> = z.iter().map(|&x| 1.0 / x).collect();
    let mut out: Vec<HeadStats> = (0..g)
        .map(|_| HeadStats { rows, vertical: vec![0.0; n], slash: vec![0.0; n], blocks: vec![0.0; n.div_ceil(block)] })
        .collect();
    let mut col = vec![0f32; g];
    for (j, sj) in st.chunks_exact(nr).enumerate() {
        col.fill(0.0);
        for (r, (&x, &iz)) in sj.iter().zip(&inv).enumerate() {
            let p = x * iz;
            col[r % g] += p;
            if p > 0.0 {
                out[r % g].slash[pos(r) - j] += f64::from(p);
            }
        }
        for (hs, &c) in out.iter_mut().zip(&col) {
            hs.vertical[j] += f64::from(c);
            hs.blocks[j / block] += f64::from(c);
        }
    }
    out
}

/// The fewest ids (largest scores first) whose scores sum to at least `gamma` of the total.
pub fn cumulative(scores: &[f64], gamma: f64) -> Vec<usize> {
    let total: f64 = scores.iter().sum();
    let mut ids: Vec<usize> = (0..scores.len()).collect();
    ids.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let (mut acc, mut keep) = (0.0, 0);
    while keep < ids.len() && acc < gamma * total {
        acc += scores[ids[keep]];
        keep += 1;
    }
    ids.truncate(keep);
    ids
}

/// The `k` ids with the largest scores (ties to the lower id).
pub fn top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..scores.len()).collect();
    ids.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    ids.truncate(k);
    ids
}

/// Marks, for every query block of the chunk, the key blocks holding a chosen vertical key or
/// crossed by a chosen slash (offset `o`: keys `pos − o` of the block's positions `pos`).
pub fn mark_vertical_slash(
    mask: &mut needle_core::prefill::BlockMask,
    verticals: &[usize],
    slashes: &[usize],
    pos0: usize,
    t: usize,
) {
    let block = mask.block();
    for qb in mask.query_blocks() {
        // The block's positions within the chunk (the first and last blocks may be partial).
        let (lo, hi) = ((qb * block).max(pos0), ((qb + 1) * block).min(pos0 + t) - 1);
        for &j in verticals {
            if j <= hi {
                mask.add(qb, j / block);
            }
        }
        for &o in slashes {
            if o <= hi {
                for kb in lo.saturating_sub(o) / block..=(hi - o) / block {
                    mask.add(qb, kb);
                }
            }
        }
    }
}

/// Jensen–Shannon divergence (natural log) of two distributions (normalized here).
pub fn js_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<f64>().max(f64::MIN_POSITIVE), q.iter().sum::<f64>().max(f64::MIN_POSITIVE));
    let kl = |a: f64, m: f64| if a > 0.0 { a * (a / m).ln() } else { 0.0 };
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (a / sp, b / sq);
            let m = 0.5 * (a + b);
            0.5 * kl(a, m) + 0.5 * kl(b, m)
        })
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use needle_core::prefill::BlockMask;
    use needle_core::{Rows, attention};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn last_query_totals_match_the_reference_attention_weights() {
        let mut r = StdRng::seed_from_u64(3);
        let (dim, hq, t, pos0, block) = (8, 6, 11, 40, 16);
        let keys: Vec<f32> = (0..(pos0 + t) * dim).map(|_| r.random_range(-1.0..1.0)).collect();
        let q: Vec<f32> = (0..t * hq * dim).map(|_| r.random_range(-1.0..1.0)).collect();
        let rows = Rows::new("keys", &keys, dim).unwrap();
        let chunk = PrefillChunk {
            layer: 0,
            kv_head: 1,
            queries: &q,
            n_q_heads: hq,
            heads: 3..6,
            dim,
            pos0,
            keys: &rows,
            scale: 0.4,
            prompt_end: None,
        };
        let got = last_queries(&chunk, 4, block);
        assert_eq!(got.len(), 3);
        for (g, h) in got.iter().zip(3..6) {
            let (mut v, mut s, mut b) = (vec![0f64; pos0 + t], vec![0f64; pos0 + t], vec![0f64; 4]);
            for i in t - 4..t {
                let pos = pos0 + i;
                let seen = Rows::new("k", &keys[..(pos + 1) * dim], dim).unwrap();
                let sc = attention::scores(chunk.query(i, h), &seen, 0.4).unwrap();
                let m = sc.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let z: f64 = sc.iter().map(|&x| f64::from(x - m).exp()).sum();
                for (j, &x) in sc.iter().enumerate() {
                    let p = f64::from(x - m).exp() / z;
                    (v[j], s[pos - j], b[j / block]) = (v[j] + p, s[pos - j] + p, b[j / block] + p);
                }
            }
            for (a, e) in [(&g.vertical, &v), (&g.slash, &s), (&g.blocks, &b)] {
                assert!(a.iter().zip(e.iter()).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} vs {e:?}");
            }
            assert!((g.vertical.iter().sum::<f64>() - 4.0).abs() < 1e-5);
        }
    }

    #[test]
    fn cumulative_takes_the_fewest_largest() {
        assert_eq!(cumulative(&[0.1, 0.5, 0.3, 0.1], 0.75), [1, 2]);
        assert_eq!(cumulative(&[0.1, 0.5, 0.3, 0.1], 0.8), [1, 2]);
        assert_eq!(cumulative(&[0.1, 0.5, 0.3, 0.1], 0.85), [1, 2, 0]);
        assert_eq!(cumulative(&[0.0, 0.0], 0.9), Vec::<usize>::new());
        assert_eq!(top(&[0.1, 0.5, 0.3, 0.5], 2), [1, 3]);
    }

    #[test]
    fn slashes_and_verticals_mark_the_blocks_they_cross() {
        // Positions 64..128 in blocks of 16: query blocks 4..8.
        let mut m = BlockMask::new(16, 64, 64).unwrap();
        mark_vertical_slash(&mut m, &[3, 100], &[20], 64, 64);
        // Block 4 (positions 64..=79) sees key 3 (block 0) and keys 44..=59 (blocks 2, 3).
        assert_eq!(m.key_blocks(4), [0, 2, 3]);
        // Block 6 (96..=111): key 3, key 100 (block 6), keys 76..=91 (blocks 4, 5).
        assert_eq!(m.key_blocks(6), [0, 6, 4, 5]);
    }

    #[test]
    fn js_divergence_is_zero_for_equal_and_ln2_for_disjoint() {
        assert!(js_divergence(&[1.0, 2.0], &[2.0, 4.0]).abs() < 1e-12);
        assert!((js_divergence(&[1.0, 0.0], &[0.0, 3.0]) - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
