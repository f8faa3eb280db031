//! SALE (arXiv 2505.24179, 2025, "SALE: Low-bit Estimation for Efficient Sparse Attention in
//! Long-context LLM Prefilling"): the key blocks of each query block are chosen from a cheap
//! 4-bit estimate of `Q·Kᵀ`, by their **relative attention score** — their estimated attention
//! mass relative to the mass of the part that is always attended. As built here, per KV head:
//!
//! 1. **Quantization.** The keys (positions `0..pos0 + t`) are smoothed — the mean key of the
//!    chunk's keys is subtracted, which shifts every score of a query row by the same amount and
//!    so changes no softmax ratio, but removes the channels' common offset that would otherwise
//!    eat the 4-bit range — then every row is cut into groups of `group` values, each quantized
//!    to signed 4-bit integers `−7..=7` (symmetric, scale `max|x| / 7`, one `i8` per value). The
//!    scored queries are quantized the same way. A score estimate is, per group, an integer dot
//!    product times the two groups' scales, summed over the groups, times the softmax scale.
//! 2. **Scored queries.** Of each query block, every `stride`-th query and the block's last one,
//!    for every query head of the group; each is estimated against every key it may select.
//! 3. **Relative attention score.** For a scored query row `i` at position `p`, the anchor set is
//!    what is always attended: the first block (sinks) and the local window (`local` blocks, the
//!    diagonal one included) up to `p`. With `m_i` the largest estimated score over the anchor
//!    set and `A_i = Σ_anchor exp(ŝ_ij − m_i)`, a candidate key block `B` (every block between
//!    the sinks and the local window) scores `r_i(B) = Σ_{j∈B} exp(ŝ_ij − m_i) / A_i`. The block
//!    is attended when `r_i(B) ≥ tau` for **any** scored row of the block (any query head): the
//!    KV head's mask is the union over its query heads. Since `A_i` is part of row `i`'s softmax
//!    denominator, `r_i(B)` bounds from above the attention weight block `B` would get: a skipped
//!    block carries less than `tau` of the weight of every scored row (up to the estimate's
//!    error), and less than `tau` times the sinks-and-window mass.
//!
//! The cost is at most `⌈block / stride⌉ + 1` scored queries per query head and query block
//! (5 of 64 by default), each against the keys before its window, in 4-bit integers, and a
//! candidate block's scan stops once one row reaches `tau`. The exact attention reads all
//! `block` queries, in `f32`, twice (`Q·Kᵀ` and `P·V`). The paper estimates every query on
//! 4-bit tensor cores; the stride keeps the estimate well below the attention's cost on CPUs,
//! where integer and float dot products run at about the same speed. Its cost and fidelity on
//! the real model are in `docs/benchmarks.md` §11.
//!
//! `tau = 0.005` by default: a skipped block held under 0.5 % of the sinks-and-window mass for
//! every scored query. On flat (random) attention it keeps nearly every block, as it should.

use needle_core::Result;
use needle_core::prefill::{BlockMask, PrefillChunk, PrefillPattern};

/// `sale:tau=0.005,stride=16,group=32,block=64,local=2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    /// Relative attention score (a candidate block's estimated mass over the sinks-and-window
    /// mass, per scored query row) from which a block is attended. `0` keeps every block.
    pub tau: f32,
    /// Every `stride`-th query of a block is scored (the block's last one always).
    pub stride: usize,
    /// Values per quantization scale (groups of the head dim; `group ≥ dim` is one scale per row).
    pub group: usize,
    /// Tokens per block.
    pub block: usize,
    /// Blocks of the local window, the diagonal one included: each query sees at least the
    /// `(local − 1)·block` tokens before its own block.
    pub local: usize,
}

impl Default for Sale {
    fn default() -> Self {
        Self { tau: 0.005, stride: 16, group: 32, block: 64, local: 2 }
    }
}

/// The largest 4-bit magnitude used: values are symmetric in `−LEVELS..=LEVELS` (`−8` is left
/// out so that rounding is the same on both sides).
const LEVELS: f32 = 7.0;

/// Rows of `dim` numbers quantized to signed 4-bit integers (one `i8` each, in `−7..=7`), with
/// one `f32` scale per group of `group` numbers of a row (the last group may be shorter): number
/// `d` of row `i` is about `values[i·dim + d] · scales[i·groups + d / group]`, within half a
/// scale.
#[derive(Debug, Clone)]
pub(crate) struct Quant4 {
    dim: usize,
    group: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl Quant4 {
    /// No rows yet, `dim ≥ 1` numbers a row, scales over groups of `group` (clamped to `1..=dim`).
    pub(crate) fn new(dim: usize, group: usize) -> Self {
        let dim = dim.max(1);
        Self { dim, group: group.clamp(1, dim), values: Vec::new(), scales: Vec::new() }
    }

    fn groups(&self) -> usize {
        self.dim.div_ceil(self.group)
    }

    /// Forgets the rows (keeps the memory).
    pub(crate) fn clear(&mut self) {
        self.values.clear();
        self.scales.clear();
    }

    /// Quantizes `row` (`dim` numbers) as a new row, less `shift` (`dim` numbers) when given.
    pub(crate) fn push(&mut self, row: &[f32], shift: Option<&[f32]>) {
        debug_assert_eq!(row.len(), self.dim);
        for (i, g) in row.chunks(self.group).enumerate() {
            let at = i * self.group;
            let x = |d: usize| g[d] - shift.map_or(0.0, |s| s[at + d]);
            let max = (0..g.len()).fold(0f32, |m, d| m.max(x(d).abs()));
            let scale = max / LEVELS;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            self.scales.push(scale);
            // `as` saturates (and maps NaN to 0): always within the i8 range, here −7..=7.
            self.values.extend((0..g.len()).map(|d| (x(d) * inv).round() as i8));
        }
    }

    /// The 4-bit estimate of row `i`'s dot product with row `j` of `other` (same `dim`, `group`):
    /// per group an integer dot product times the two scales.
    pub(crate) fn dot(&self, i: usize, other: &Quant4, j: usize) -> f32 {
        let (dim, ng) = (self.dim, self.groups());
        let (a, b) = (&self.values[i * dim..][..dim], &other.values[j * dim..][..dim]);
        let (sa, sb) = (&self.scales[i * ng..][..ng], &other.scales[j * ng..][..ng]);
        a.chunks(self.group)
            .zip(b.chunks(self.group))
            .zip(sa.iter().zip(sb))
            .map(|((x, y), (p, q))| {
                // |u·v| ≤ 49 per term, so a group's sum never overflows an i32: wrapping
                // arithmetic is exact, and vectorizes where overflow checks are on (tests).
                let n =
                    x.iter().zip(y).fold(0i32, |n, (&u, &v)| n.wrapping_add(i32::from(u).wrapping_mul(i32::from(v))));
                n as f32 * p * q
            })
            .sum()
    }
}

impl Sale {
    /// The chunk's keys (positions `0..pos0 + t`), less their mean, in 4 bits.
    fn keys(&self, chunk: &PrefillChunk<'_>) -> Quant4 {
        let (n, dim) = (chunk.pos0 + chunk.t(), chunk.dim);
        let mut row = Vec::with_capacity(dim);
        let mut sum = vec![0f64; dim];
        for j in 0..n {
            row.clear();
            chunk.keys.row(j).extend_into(&mut row);
            sum.iter_mut().zip(&row).for_each(|(s, &x)| *s += f64::from(x));
        }
        let mean: Vec<f32> = sum.iter().map(|&s| (s / n.max(1) as f64) as f32).collect();
        let mut keys = Quant4::new(dim, self.group);
        keys.values.reserve(n * dim);
        for j in 0..n {
            row.clear();
            chunk.keys.row(j).extend_into(&mut row);
            keys.push(&row, Some(&mean));
        }
        keys
    }

    /// The scored query positions of the query block `lo..hi`: every `stride`-th and the last.
    fn scored(&self, lo: usize, hi: usize) -> Vec<usize> {
        let mut rows: Vec<usize> = (lo..hi).step_by(self.stride.max(1)).collect();
        if rows.last() != Some(&(hi - 1)) {
            rows.push(hi - 1);
        }
        rows
    }
}

impl PrefillPattern for Sale {
    fn describe(&self) -> String {
        format!(
            "sale:tau={},stride={},group={},block={},local={}",
            self.tau, self.stride, self.group, self.block, self.local
        )
    }

    fn block(&self) -> usize {
        self.block
    }

    fn local_blocks(&self) -> usize {
        self.local
    }

    fn choose(&self, chunk: &PrefillChunk<'_>, mask: &mut BlockMask) -> Result<()> {
        let (b, pos0, n) = (self.block, chunk.pos0, chunk.pos0 + chunk.t());
        // The candidates of query block `qb` are the key blocks `1..win(qb)`: after the sinks,
        // before the local window.
        let win = |qb: usize| (qb + 1).saturating_sub(self.local.max(1)).max(1);
        if mask.query_blocks().all(|qb| win(qb) <= 1) {
            return Ok(());
        }
        let keys = self.keys(chunk);
        let mut queries = Quant4::new(chunk.dim, self.group);
        let mut at = Vec::new();
        for qb in mask.query_blocks().filter(|&qb| win(qb) > 1) {
            let (lo, hi) = ((qb * b).max(pos0), ((qb + 1) * b).min(n));
            // Row `r`: the query at position `at[r]` of one head of the group.
            queries.clear();
            at.clear();
            for p in self.scored(lo, hi) {
                for h in chunk.heads.clone() {
                    queries.push(chunk.query(p - pos0, h), None);
                    at.push(p);
                }
            }
            let score = |r: usize, j: usize| queries.dot(r, &keys, j) * chunk.scale;
            // The anchor set's largest score `m` and mass `z` (relative to `m`), per row, online.
            let (mut m, mut z) = (vec![f32::NEG_INFINITY; at.len()], vec![0f32; at.len()]);
            for j in (0..b).chain(win(qb) * b..hi) {
                for (r, (mr, zr)) in m.iter_mut().zip(z.iter_mut()).enumerate().filter(|(r, _)| j <= at[*r]) {
                    let s = score(r, j);
                    if s > *mr {
                        *zr = *zr * (*mr - s).exp() + 1.0;
                        *mr = s;
                    } else {
                        *zr += (s - *mr).exp();
                    }
                }
            }
            let need: Vec<f32> = z.iter().map(|&zr| self.tau * zr).collect();
            let mut mass = vec![0f32; at.len()];
            for kb in 1..win(qb) {
                mass.fill(0.0);
                for j in kb * b..(kb + 1) * b {
                    mass.iter_mut().zip(&m).enumerate().for_each(|(r, (a, &mr))| *a += (score(r, j) - mr).exp());
                    // Decided as soon as one row's mass reaches its threshold.
                    if mass.iter().zip(&need).any(|(a, t)| a >= t) {
                        mask.add(qb, kb);
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use needle_core::Rows;
    use needle_core::prefill::plan_chunk;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn normal(r: &mut StdRng) -> f32 {
        // Sum of uniforms: near-Gaussian, with tails enough for the test.
        (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>()
    }

    #[test]
    fn four_bit_dot_is_within_the_quantization_bound() {
        // Fresh inputs every run (the bound holds for any input); the seed is in the message.
        let seed: u64 = rand::random();
        let mut r = StdRng::seed_from_u64(seed);
        for (dim, group) in [(64, 32), (64, 64), (80, 32), (128, 16), (7, 3), (64, 1)] {
            let (mut qs, mut ks) = (Quant4::new(dim, group), Quant4::new(dim, group));
            let mut rows = Vec::new();
            for i in 0..40 {
                // Some rows with outlier channels, some scaled up, one all zero.
                let mut q: Vec<f32> = (0..dim).map(|_| 3.0 * normal(&mut r)).collect();
                let mut k: Vec<f32> = (0..dim).map(|_| normal(&mut r) + 0.5).collect();
                if i % 3 == 0 {
                    q[r.random_range(0..dim)] *= 20.0;
                    k[r.random_range(0..dim)] -= 10.0;
                }
                if i == 7 {
                    k.fill(0.0);
                }
                qs.push(&q, None);
                ks.push(&k, None);
                rows.push((q, k));
            }
            assert_eq!((qs.values.len(), ks.scales.len()), (40 * dim, 40 * dim.div_ceil(group)));
            assert!(qs.values.iter().chain(&ks.values).all(|v| (-7..=7).contains(v)));
            let (mut err, mut room) = (0f64, 0f64);
            for (i, (q, _)) in rows.iter().enumerate() {
                for (j, (_, k)) in rows.iter().enumerate() {
                    let exact: f64 = q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    let got = f64::from(qs.dot(i, &ks, j));
                    // Per group, with steps s = max|x| / 7, q = q̃ + e_q and k = k̃ + e_k where
                    // |e| ≤ s / 2: q·k − q̃·k̃ = q·e_k + e_q·k̃, at most
                    // ‖q‖₁ s_k / 2 + (‖k‖₁ + n s_k / 2) s_q / 2.
                    let bound: f64 = q
                        .chunks(group)
                        .zip(k.chunks(group))
                        .map(|(qg, kg)| {
                            let l1 = |v: &[f32]| v.iter().map(|x| f64::from(x.abs())).sum::<f64>();
                            let step = |v: &[f32]| v.iter().fold(0f64, |m, x| m.max(f64::from(x.abs()))) / 7.0;
                            let (sq, sk, n) = (step(qg), step(kg), qg.len() as f64);
                            l1(qg) * sk / 2.0 + (l1(kg) + n * sk / 2.0) * sq / 2.0
                        })
                        .sum();
                    // f32 rounding of the scales and sums.
                    let slack = 1e-5 * (1.0 + bound + exact.abs());
                    assert!(
                        (got - exact).abs() <= bound + slack,
                        "seed {seed}, dim {dim}, group {group}, rows {i}·{j}: {got} vs {exact}, bound {bound}"
                    );
                    if j == 7 {
                        assert_eq!(got, 0.0, "a zero key");
                    }
                    (err, room) = (err + (got - exact).abs(), room + bound);
                }
            }
            // Rounding errors mostly cancel: the typical error is well inside the worst case.
            assert!(err < 0.5 * room, "seed {seed}, dim {dim}, group {group}: {err} vs {room}");
        }
    }

    const DIM: usize = 64;
    const HQ: usize = 4;
    const N: usize = 2048;
    const POS0: usize = 1024;
    /// Key blocks whose keys align with every query.
    const PLANTED: [usize; 3] = [4, 9, 13];
    /// A key block aligned with the queries of query blocks 24.. only.
    const LATE: usize = 7;

    fn unit(r: &mut StdRng, v: impl IntoIterator<Item = f32>) -> Vec<f32> {
        let v: Vec<f32> = v.into_iter().map(|x| x + 1e-3 * normal(r)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn random_unit(r: &mut StdRng) -> Vec<f32> {
        let e: Vec<f32> = (0..DIM).map(|_| normal(r)).collect();
        unit(r, e)
    }

    /// Random keys of norm ½, key 0 (the sink) along `w`, the planted blocks' keys near `w`, block
    /// `LATE`'s near `w2`; queries `150·unit(w + 0.3·noise)`, plus `w2` from block 24 on:
    /// the sink scores 13–18 (scaled logits) where an unrelated key scores about ±1.2, as in
    /// trained heads.
    fn planted(seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut r = StdRng::seed_from_u64(seed);
        let (w, w2) = (random_unit(&mut r), random_unit(&mut r));
        let mut keys = Vec::with_capacity(N * DIM);
        for j in 0..N {
            let e = random_unit(&mut r);
            let k = match j / 64 {
                _ if j == 0 => w.clone(),
                b if PLANTED.contains(&b) => unit(&mut r, w.iter().zip(&e).map(|(a, b)| a + 0.5 * b)),
                LATE => unit(&mut r, w2.iter().zip(&e).map(|(a, b)| a + 0.5 * b)),
                _ => e.iter().map(|x| 0.5 * x).collect(),
            };
            keys.extend(k);
        }
        let mut q = Vec::with_capacity((N - POS0) * HQ * DIM);
        for p in POS0..N {
            for _ in 0..HQ {
                let e = random_unit(&mut r);
                let late = if p >= 24 * 64 { 1.0 } else { 0.0 };
                let v = unit(&mut r, (0..DIM).map(|d| w[d] + late * w2[d] + 0.3 * e[d]));
                q.extend(v.iter().map(|x| 150.0 * x));
            }
        }
        (keys, q)
    }

    /// The relative attention score of key block `kb` for query block `qb`, exactly (f64, no
    /// quantization, no smoothing): the largest over the scored rows of query heads 2..4.
    fn exact_relative(s: &Sale, keys: &[f32], q: &[f32], qb: usize, kb: usize) -> f64 {
        let scale = 1.0 / (DIM as f64).sqrt();
        let (lo, hi) = (qb * 64, (qb + 1) * 64);
        let mut best = 0f64;
        for p in s.scored(lo, hi) {
            for h in 2..4 {
                let qv = &q[((p - POS0) * HQ + h) * DIM..][..DIM];
                let sc = |j: usize| {
                    scale * qv.iter().zip(&keys[j * DIM..][..DIM]).map(|(&a, &b)| f64::from(a * b)).sum::<f64>()
                };
                let anchor: Vec<f64> = (0..64).chain((qb + 1 - s.local) * 64..=p).map(sc).collect();
                let m = anchor.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = anchor.iter().map(|&x| (x - m).exp()).sum();
                let b: f64 = (kb * 64..(kb + 1) * 64).map(|j| (sc(j) - m).exp()).sum();
                best = best.max(b / z);
            }
        }
        best
    }

    #[test]
    fn planted_blocks_are_selected_and_most_others_skipped() {
        let sale = Sale::default();
        for seed in [1, 2] {
            let (keys, q) = planted(seed);
            let rows = Rows::new("keys", &keys, DIM).unwrap();
            let chunk = PrefillChunk {
                layer: 0,
                kv_head: 1,
                queries: &q,
                n_q_heads: HQ,
                heads: 2..4,
                dim: DIM,
                pos0: POS0,
                keys: &rows,
                scale: 1.0 / (DIM as f32).sqrt(),
                prompt_end: None,
            };
            let m = plan_chunk(&sale, &chunk).unwrap();
            let (mut skipped, mut others) = (0, 0);
            // Query blocks 16..32; the last (31) is dense.
            for qb in 16..31 {
                let kb = m.key_blocks(qb);
                for p in PLANTED {
                    assert!(kb.contains(&(p as u32)), "seed {seed}, block {qb}: {kb:?}");
                }
                assert_eq!(kb.contains(&(LATE as u32)), qb >= 24, "seed {seed}, block {qb}: {kb:?}");
                // The same rule on exact scores: clear cases agree.
                for c in 1..qb - 1 {
                    let rel = exact_relative(&sale, &keys, &q, qb, c);
                    let got = kb.contains(&(c as u32));
                    assert!(
                        got || rel < 8.0 * f64::from(sale.tau),
                        "seed {seed}: block {c} for {qb} skipped at relative score {rel}"
                    );
                    assert!(
                        !got || rel > f64::from(sale.tau) / 8.0,
                        "seed {seed}: block {c} for {qb} kept at relative score {rel}"
                    );
                    if !PLANTED.contains(&c) && c != LATE {
                        others += 1;
                        skipped += usize::from(!got);
                    }
                }
            }
            assert!(skipped * 10 >= others * 9, "seed {seed}: skipped {skipped} of {others} unplanted blocks");
            let (kept, all) = m.density();
            assert!(kept * 10 < all * 4, "seed {seed}: {kept} of {all} blocks");
        }
    }

    #[test]
    fn tau_zero_is_dense_and_a_huge_tau_keeps_only_what_is_always_attended() {
        let (keys, q) = planted(3);
        let rows = Rows::new("keys", &keys, DIM).unwrap();
        let chunk = PrefillChunk {
            layer: 0,
            kv_head: 0,
            queries: &q,
            n_q_heads: HQ,
            heads: 0..2,
            dim: DIM,
            pos0: POS0,
            keys: &rows,
            scale: 0.125,
            prompt_end: None,
        };
        let density = |tau: f32| plan_chunk(&Sale { tau, ..Sale::default() }, &chunk).unwrap().density();
        let all = density(0.0);
        assert_eq!(all.0, all.1);
        // Sinks and 2 local blocks per query block, and the dense last one.
        assert_eq!(density(1e30).0, 15 * 3 + 32);
        let (a, b, c) = (density(0.5).0, density(0.005).0, density(1e-5).0);
        assert!(a <= b && b <= c && c <= all.0, "{a} {b} {c}");
    }
}
