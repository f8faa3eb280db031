//! [`LshIndex`]: SimHash tables on [`VectorIndex`], with candidate retrieval (search) and
//! MagicPIG importance sampling ([`LshIndex::sample`]).

use std::ops::Range;

use needle_core::attention::top_k;
use needle_core::{
    BuildStats, Error, Result, SearchParams, SearchResult, SearchStats, VectorIndex, check_batch, check_finite,
    check_len, check_search,
};
use rayon::prelude::*;

use crate::hash::{MAX_K_BITS, SimHash, dot};
use crate::prob::{angle_from_parts, ln_binomial_tail, ln_collision_at};
use crate::state::{Reader, Writer};
use crate::table::Table;

/// Default signature bits `K`.
///
/// With `K = 10` a key orthogonal to the query lands in its bucket with probability
/// `2^-10 ≈ 0.001` per table, so with 64 tables about 6 % of unrelated keys become
/// candidates, while a key at cosine 0.8 collides with probability 0.10 per table and is
/// retrieved almost surely (`u ≈ 0.999`). `K = 8` lets ~22 % of unrelated keys through.
pub const DEFAULT_K_BITS: usize = 10;
/// Default number of tables `L`: 64 signatures cost 256 bytes per key, as much as the key
/// itself at `dim = 64` in `f32`; hashing a query is `K · L · dim ≈ 41 K` multiply-adds,
/// well below scoring the candidates.
pub const DEFAULT_L_TABLES: usize = 64;
/// Largest `L` accepted.
pub const MAX_L_TABLES: usize = 4096;
/// Default seed of the hyperplanes.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// SimHash LSH index: `K`-bit signatures in `L` tables over exactly stored keys.
///
/// `search` returns the exact top-k among the keys that share a bucket with the query in at
/// least one probed table; [`LshIndex::sample`] returns those keys with MagicPIG importance
/// weights. Ids are dense (`i`-th key added has id `i`).
#[derive(Debug, Clone)]
pub struct LshIndex {
    dim: usize,
    k_bits: usize,
    l_tables: usize,
    seed: u64,
    hash: SimHash,
    tables: Vec<Table>,
    keys: Vec<f32>,
}

/// Keys drawn by [`LshIndex::sample`]: each with its inclusion probability `u` and the
/// log-weight `ln(1/u)` that makes attention over them the MagicPIG estimator.
///
/// Pass [`Sample::weighted_ids`] to `needle_core::attention::attend_weighted`: it then
/// returns `Σ e^{s_i}/u_i · v_i / Σ e^{s_i}/u_i` over the sample. Numerator and denominator
/// are unbiased (Horvitz–Thompson) estimates of the dense ones; their ratio is consistent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Sampled key ids, ascending.
    pub ids: Vec<u32>,
    /// `ln(1/u_i)`, the importance log-weight of each id.
    pub log_weights: Vec<f32>,
    /// `u_i`, the probability that the key is in the sample, in `f64`.
    pub inclusion: Vec<f64>,
    /// Tables in which the key collided with the query.
    pub collisions: Vec<u32>,
    /// Work done.
    pub stats: SearchStats,
}

impl Sample {
    /// Number of sampled keys.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when nothing was sampled.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// `(id, ln(1/u))` pairs, the input `attend_weighted` takes.
    pub fn weighted_ids(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids.iter().copied().zip(self.log_weights.iter().copied())
    }
}

impl LshIndex {
    /// An empty index with `k_bits` bits per signature (1..=32) and `l_tables` tables
    /// (1..=4096); hyperplanes drawn from `seed`.
    pub fn new(dim: usize, k_bits: usize, l_tables: usize, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        if !(1..=MAX_K_BITS).contains(&k_bits) {
            return Err(Error::invalid("k_bits", format!("{k_bits} is outside 1..={MAX_K_BITS}")));
        }
        if !(1..=MAX_L_TABLES).contains(&l_tables) {
            return Err(Error::invalid("l_tables", format!("{l_tables} is outside 1..={MAX_L_TABLES}")));
        }
        Ok(Self {
            dim,
            k_bits,
            l_tables,
            seed,
            hash: SimHash::new(dim, k_bits, l_tables, seed),
            tables: vec![Table::default(); l_tables],
            keys: Vec::new(),
        })
    }

    /// An empty index with [`DEFAULT_K_BITS`], [`DEFAULT_L_TABLES`] and [`DEFAULT_SEED`].
    pub fn with_defaults(dim: usize) -> Result<Self> {
        Self::new(dim, DEFAULT_K_BITS, DEFAULT_L_TABLES, DEFAULT_SEED)
    }

    /// Bits per signature `K`.
    pub fn k_bits(&self) -> usize {
        self.k_bits
    }
    /// Number of tables `L`.
    pub fn l_tables(&self) -> usize {
        self.l_tables
    }
    /// Seed of the hyperplanes.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Key `i` as stored.
    pub fn vector(&self, i: usize) -> Option<&[f32]> {
        self.keys.get(i * self.dim..(i + 1) * self.dim)
    }

    /// The `L` signatures (`K` low bits each) of a vector.
    pub fn signatures(&self, x: &[f32]) -> Result<Vec<u32>> {
        check_len("vector", self.dim, x.len())?;
        check_finite("vector", x)?;
        let mut sigs = vec![0u32; self.l_tables];
        self.hash.sign_into(x, &mut sigs);
        Ok(sigs)
    }

    /// MagicPIG sampling: every key that collides with `q` in at least one of the `L`
    /// tables, with log-weight `ln(1/u)`, `u = 1 − (1 − p)^L`, `p = (1 − θ/π)^K`.
    pub fn sample(&self, q: &[f32]) -> Result<Sample> {
        self.sample_min_collisions(q, 1)
    }

    /// Like [`LshIndex::sample`], keeping only keys that collide in at least `min_tables`
    /// tables (MagicPIG uses 2); then `u = P[Binomial(L, p) >= min_tables]`.
    pub fn sample_min_collisions(&self, q: &[f32], min_tables: usize) -> Result<Sample> {
        if self.is_empty() {
            return Err(Error::EmptyKeys { what: "LSH sample".into() });
        }
        if !(1..=self.l_tables).contains(&min_tables) {
            return Err(Error::invalid("min_tables", format!("{min_tables} is outside 1..={}", self.l_tables)));
        }
        check_len("query", self.dim, q.len())?;
        check_finite("query", q)?;
        let (cands, mut stats) = self.candidates(q, self.l_tables);
        let norm_q = q.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        let mut out = Sample::default();
        for (id, hits) in cands {
            if (hits as usize) < min_tables {
                continue;
            }
            let i = id as usize;
            let k = &self.keys[i * self.dim..(i + 1) * self.dim];
            // The key's norm is recomputed in f64 with the dot product (the key is read
            // anyway): exact angles near 0 matter, since p is steep there.
            let (mut d, mut kk) = (0.0f64, 0.0f64);
            for (&a, &b) in q.iter().zip(k) {
                d += f64::from(a) * f64::from(b);
                kk += f64::from(b) * f64::from(b);
            }
            let theta = angle_from_parts(d, norm_q, kk.sqrt());
            let ln_u = ln_binomial_tail(self.l_tables, ln_collision_at(theta, self.k_bits), min_tables);
            // A key that collided has u > 0 in exact arithmetic; guard the float edge
            // (near-antipodal keys) so that weights stay finite.
            let ln_u = if ln_u.is_finite() { ln_u } else { f64::from(f32::MIN_POSITIVE).ln() };
            out.ids.push(id);
            out.log_weights.push(-ln_u as f32);
            out.inclusion.push(ln_u.exp());
            out.collisions.push(hits);
            stats.full_scored += 1;
            stats.bytes_read += (self.dim * 4) as u64;
        }
        out.stats = stats;
        Ok(out)
    }

    /// Distinct ids colliding with `q` in the first `tables` tables, ascending, with their
    /// collision counts; and the cost of hashing and lookups.
    fn candidates(&self, q: &[f32], tables: usize) -> (Vec<(u32, u32)>, SearchStats) {
        let mut sigs = vec![0u32; tables];
        self.hash.sign_into(q, &mut sigs);
        let mut stats = SearchStats { bytes_read: self.hash.bytes_per_hash(tables), ..SearchStats::default() };
        let mut hits: Vec<u32> = Vec::new();
        for (table, &sig) in self.tables.iter().zip(&sigs) {
            let b = table.bucket(sig);
            stats.codes_scored += b.probes;
            // Signatures probed, the two bucket offsets, then the ids.
            stats.bytes_read += 4 * b.probes + 8 + 4 * (b.bulk.len() + b.tail.len()) as u64;
            hits.extend_from_slice(b.bulk);
            hits.extend_from_slice(b.tail);
        }
        // Sorting the concatenated buckets dedups and counts in time proportional to the
        // collisions, not to the number of keys (no n-sized visited array per query).
        hits.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::new();
        for id in hits {
            match out.last_mut() {
                Some((last, n)) if *last == id => *n += 1,
                _ => out.push((id, 1)),
            }
        }
        (out, stats)
    }

    /// Exact top-k among the candidates of one query.
    fn search_one(&self, q: &[f32], k: usize, tables: usize) -> Result<(Vec<(u32, f32)>, SearchStats)> {
        let (cands, mut stats) = self.candidates(q, tables);
        let scores: Vec<f32> = cands
            .iter()
            .map(|&(id, _)| dot(q, &self.keys[id as usize * self.dim..(id as usize + 1) * self.dim]))
            .collect();
        stats.full_scored += cands.len() as u64;
        stats.bytes_read += (cands.len() * self.dim * 4) as u64;
        let best = top_k(&scores, k.min(scores.len()))?;
        Ok((best.into_iter().map(|(j, s)| (cands[j as usize].0, s)).collect(), stats))
    }

    /// Hashes `keys` (already checked) and appends them to the tables; returns their ids.
    fn append(&mut self, keys: &[f32], n: usize) -> Result<Range<u32>> {
        let start = self.len();
        let end = start
            .checked_add(n)
            .filter(|&e| e < u32::MAX as usize)
            .ok_or_else(|| Error::invalid("keys", "more than u32::MAX - 1 keys in one index"))?;
        let sigs = self.hash.sign_batch(keys);
        let l = self.l_tables;
        if start == 0 {
            // Fresh build: each table is one sort of (signature, id) pairs, tables in parallel.
            self.tables = (0..l)
                .into_par_iter()
                .map(|t| Table::from_pairs((0..n).map(|i| u64::from(sigs[i * l + t]) << 32 | i as u64).collect()))
                .collect();
        } else {
            self.tables.par_iter_mut().enumerate().for_each(|(t, table)| {
                for i in 0..n {
                    table.push(sigs[i * l + t], (start + i) as u32);
                }
            });
        }
        self.keys.extend_from_slice(keys);
        Ok(start as u32..end as u32)
    }
}

const LSH_TAG: &[u8; 8] = b"ndl.lsh_";
const LSH_VERSION: u32 = 1;

impl LshIndex {
    /// Everything but the keys: shape and seed (checked at load), the hyperplanes the
    /// signatures were taken with, and every table (bulk and tail).
    fn save(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, LSH_TAG, LSH_VERSION);
        for v in [self.dim, self.k_bits, self.l_tables] {
            w.len(v);
        }
        w.u64(self.seed);
        w.len(self.len());
        w.f32s(self.hash.planes());
        for t in &self.tables {
            t.save(&mut w);
        }
    }

    fn load(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let mut r = Reader::new("LSH index", state, LSH_TAG, LSH_VERSION)?;
        let mut f = |name: &str| r.len(name, usize::MAX);
        let (dim, k_bits, l_tables) = (f("dim")?, f("k_bits")?, f("l_tables")?);
        let seed = r.u64("seed")?;
        if (dim, k_bits, l_tables, seed) != (self.dim, self.k_bits, self.l_tables, self.seed) {
            return Err(r.fail(
                "params",
                format!(
                    "saved as dim {dim}, LSH{k_bits}x{l_tables}, seed {seed}; this index is dim {}, {}, seed {}",
                    self.dim,
                    self.describe(),
                    self.seed
                ),
            ));
        }
        let n = r.expect_rows("n", keys, dim)?;
        let planes = r.f32s_exact("hyperplanes", l_tables * k_bits * dim)?;
        let tables =
            (0..l_tables).map(|t| Table::load(&mut r, &format!("table {t}"), n, k_bits)).collect::<Result<Vec<_>>>()?;
        r.finish()?;
        self.hash = SimHash::from_planes(dim, k_bits, l_tables, planes);
        self.tables = tables;
        self.keys = keys.to_vec();
        Ok(())
    }
}

impl VectorIndex for LshIndex {
    fn describe(&self) -> String {
        format!("LSH{}x{}", self.k_bits, self.l_tables)
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.keys.len() / self.dim
    }
    fn build(&mut self, keys: &[f32], train_queries: Option<&[f32]>) -> Result<BuildStats> {
        let t = std::time::Instant::now();
        let n = check_batch("keys", keys, self.dim)?;
        if let Some(q) = train_queries {
            check_batch("train_queries", q, self.dim)?;
        }
        self.keys.clear();
        self.tables = vec![Table::default(); self.l_tables];
        self.append(keys, n)?;
        tracing::debug!(keys = n, k_bits = self.k_bits, l_tables = self.l_tables, "built LSH tables");
        Ok(BuildStats { vectors: n, train_queries: 0, seconds: t.elapsed().as_secs_f64(), bytes: self.memory_bytes() })
    }
    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>> {
        let n = check_batch("keys", keys, self.dim)?;
        self.append(keys, n)
    }
    /// `params.effort` is the number of tables probed (`1..`, clamped to `L`; default `L`).
    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.len())?;
        let tables = match params.effort {
            None => self.l_tables,
            Some(0) => return Err(Error::invalid("effort", "tables probed must be at least 1")),
            Some(e) => e.min(self.l_tables),
        };
        let rows =
            queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, tables)).collect::<Result<Vec<_>>>()?;
        Ok(SearchResult::from_rows(k, rows))
    }
    fn memory_bytes(&self) -> usize {
        4 * self.keys.capacity() + self.hash.memory_bytes() + self.tables.iter().map(Table::memory_bytes).sum::<usize>()
    }
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        self.save(out);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        self.load(state, keys)
    }
}

/// Builds an LSH index from a factory string: `"LSH"` (defaults) or `"LSH{K}x{L}"`, e.g.
/// `"LSH10x64"`, with `1 <= K <= 32` and `1 <= L <= 4096`. The seed is [`DEFAULT_SEED`].
pub fn from_factory(dim: usize, spec: &str) -> Result<Box<dyn VectorIndex>> {
    Ok(Box::new(parse_factory(dim, spec)?))
}

/// [`from_factory`] returning the concrete type.
pub fn parse_factory(dim: usize, spec: &str) -> Result<LshIndex> {
    let bad = |why: &str| {
        Error::invalid(
            "spec",
            format!(
                "{why} in {spec:?}; valid forms: \"LSH\" (K={DEFAULT_K_BITS}, L={DEFAULT_L_TABLES}) or \
                 \"LSH{{K}}x{{L}}\" such as \"LSH10x64\", with 1 <= K <= {MAX_K_BITS} and 1 <= L <= {MAX_L_TABLES}"
            ),
        )
    };
    let rest = spec.trim().strip_prefix("LSH").ok_or_else(|| bad("missing the LSH prefix"))?;
    if rest.is_empty() {
        return LshIndex::with_defaults(dim);
    }
    let (k, l) = rest.split_once('x').ok_or_else(|| bad("missing the `x` between K and L"))?;
    let num = |s: &str, what: &str| -> Result<usize> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("{what} is not a positive integer")));
        }
        s.parse::<usize>().map_err(|_| bad(&format!("{what} is too large")))
    };
    let (k, l) = (num(k, "K")?, num(l, "L")?);
    if !(1..=MAX_K_BITS).contains(&k) || !(1..=MAX_L_TABLES).contains(&l) {
        return Err(bad(&format!("K={k}, L={l} out of range")));
    }
    LshIndex::new(dim, k, l, DEFAULT_SEED)
}

#[cfg(test)]
mod tests {
    use needle_core::{FlatIndex, NO_LABEL};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::prob::binomial_tail;
    use needle_core::synth::AttentionLike;

    /// `n` keys and `m` queries of dimension `dim`, row-major, from needle-core's generator.
    fn keys_and_queries(n: usize, m: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let g = AttentionLike::new(dim, seed);
        (g.keys(n, seed ^ 1), g.queries(m, seed ^ 2))
    }

    /// Mean recall of `got` against the exact `truth` (needle-core's per-query recall).
    fn recall(truth: &needle_core::SearchResult, got: &needle_core::SearchResult) -> f64 {
        let r = needle_core::metrics::recall_of_results(got, truth).unwrap();
        r.iter().sum::<f64>() / r.len().max(1) as f64
    }
    use crate::{collision_probability, retrieval_probability};

    fn unit_at(theta: f64, dim: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; dim];
        v[0] = theta.cos() as f32;
        v[1] = theta.sin() as f32;
        v
    }

    /// Binomial-proportion tolerance: 5 standard errors (a two-sided normal tail of 6e-7 per
    /// check) plus one count for discreteness. The seeds are fixed, so a pass is
    /// reproducible; 5σ keeps the margin honest without making the test blind.
    fn tol(p: f64, n: usize) -> f64 {
        5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1.0 / n as f64
    }

    #[test]
    fn empirical_collision_rates_match_the_formulas() {
        // 4 seeds × 4096 tables = 16384 independent hyperplane draws per pair.
        let (dim, l, seeds) = (8, 4096, 4u64);
        let q = unit_at(0.0, dim);
        for k_bits in [1, 3, 8] {
            for theta in [0.0, 0.3, std::f64::consts::FRAC_PI_4, 1.2, std::f64::consts::FRAC_PI_2, 2.5, 3.0] {
                let k = unit_at(theta, dim);
                let (mut same, mut groups_hit, mut groups_hit2, mut groups) = (0usize, 0usize, 0usize, 0usize);
                for seed in 0..seeds {
                    let idx = LshIndex::new(dim, k_bits, l, seed).unwrap();
                    let (sq, sk) = (idx.signatures(&q).unwrap(), idx.signatures(&k).unwrap());
                    let eq: Vec<bool> = sq.iter().zip(&sk).map(|(a, b)| a == b).collect();
                    same += eq.iter().filter(|&&e| e).count();
                    // Groups of 8 tables stand for an index with L = 8: checks independence.
                    for g in eq.chunks_exact(8) {
                        let c = g.iter().filter(|&&e| e).count();
                        groups += 1;
                        groups_hit += usize::from(c >= 1);
                        groups_hit2 += usize::from(c >= 2);
                    }
                }
                let n = l * seeds as usize;
                let p = collision_probability(&q, &k, k_bits);
                let rate = same as f64 / n as f64;
                assert!((rate - p).abs() <= tol(p, n), "K={k_bits} θ={theta}: rate {rate} vs p {p}");
                let u = retrieval_probability(&q, &k, k_bits, 8);
                let rate = groups_hit as f64 / groups as f64;
                assert!((rate - u).abs() <= tol(u, groups), "K={k_bits} θ={theta}: {rate} vs u {u}");
                let u2 = binomial_tail(8, p, 2);
                let rate = groups_hit2 as f64 / groups as f64;
                assert!((rate - u2).abs() <= tol(u2, groups), "K={k_bits} θ={theta}: {rate} vs u2 {u2}");
            }
        }
        // Antipodal vectors never collide; a vector always collides with itself.
        let idx = LshIndex::new(dim, 1, l, 9).unwrap();
        let minus: Vec<f32> = q.iter().map(|x| -x).collect();
        let (sq, sm) = (idx.signatures(&q).unwrap(), idx.signatures(&minus).unwrap());
        assert!(sq.iter().zip(&sm).all(|(a, b)| a != b));
    }

    /// Mean and variance of each column of `rows`.
    fn mean_var(rows: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let r = rows.len() as f64;
        let cols = rows[0].len();
        let mean: Vec<f64> = (0..cols).map(|c| rows.iter().map(|x| x[c]).sum::<f64>() / r).collect();
        let var = (0..cols).map(|c| rows.iter().map(|x| (x[c] - mean[c]).powi(2)).sum::<f64>() / (r - 1.0)).collect();
        (mean, var)
    }

    /// Horvitz–Thompson sums over many independent indexes (one seed each): per seed, the
    /// row `[Σ_S e^s v / w, Σ_S e^s / w]` with `w` from `weight(key)` (the true `u` unless a
    /// test passes a wrong one).
    fn ht_rows(
        min_tables: usize,
        k_bits: usize,
        l: usize,
        seeds: u64,
        wrong_k: Option<usize>,
    ) -> (Vec<Vec<f64>>, Vec<f64>) {
        let dim = 8;
        let (keys, queries) = keys_and_queries(48, 1, dim, 11);
        let q = &queries[..dim];
        let mut rng = StdRng::seed_from_u64(3);
        let values: Vec<f64> = (0..48 * 2).map(|_| rng.random_range(-1.0..1.0)).collect();
        let scale = 0.25;
        let s = |i: usize| (scale * f64::from(dot(q, &keys[i * dim..(i + 1) * dim]))).exp();
        let mut exact = vec![0.0; 3];
        for i in 0..48 {
            exact[0] += s(i) * values[2 * i];
            exact[1] += s(i) * values[2 * i + 1];
            exact[2] += s(i);
        }
        let rows = (0..seeds)
            .map(|seed| {
                let mut idx = LshIndex::new(dim, k_bits, l, 1000 + seed).unwrap();
                idx.build(&keys, None).unwrap();
                let smp = idx.sample_min_collisions(q, min_tables).unwrap();
                let mut row = vec![0.0; 3];
                for (j, &id) in smp.ids.iter().enumerate() {
                    let i = id as usize;
                    let w = match wrong_k {
                        None => smp.inclusion[j],
                        Some(kb) => retrieval_probability(q, &keys[i * dim..(i + 1) * dim], kb, l),
                    };
                    row[0] += s(i) * values[2 * i] / w;
                    row[1] += s(i) * values[2 * i + 1] / w;
                    row[2] += s(i) / w;
                }
                row
            })
            .collect();
        (rows, exact)
    }

    #[test]
    fn importance_weighted_sums_are_unbiased() {
        // K and L small enough that inclusion probabilities spread over (0, 1): the weights matter.
        let seeds = 3000;
        for (min_tables, k_bits, l) in [(1, 4, 6), (2, 3, 8)] {
            let (rows, exact) = ht_rows(min_tables, k_bits, l, seeds, None);
            let (mean, var) = mean_var(&rows);
            for c in 0..3 {
                // 5 standard errors of the mean, from the observed variance.
                let se = (var[c] / seeds as f64).sqrt();
                assert!(
                    (mean[c] - exact[c]).abs() <= 5.0 * se,
                    "t={min_tables} col {c}: {} vs {} (se {se})",
                    mean[c],
                    exact[c]
                );
                assert!(var[c] > 0.0);
            }
        }
        // The check has power: weights for the wrong K give a bias far beyond 5 se.
        let (rows, exact) = ht_rows(1, 4, 6, seeds, Some(3));
        let (mean, var) = mean_var(&rows);
        assert!((mean[2] - exact[2]).abs() > 5.0 * (var[2] / seeds as f64).sqrt());
    }

    #[test]
    fn sample_weights_are_log_inverse_inclusion() {
        let dim = 16;
        let (keys, queries) = keys_and_queries(300, 2, dim, 5);
        let mut idx = LshIndex::new(dim, 6, 12, 1).unwrap();
        idx.build(&keys, None).unwrap();
        let q = &queries[..dim];
        let s1 = idx.sample(q).unwrap();
        let s2 = idx.sample_min_collisions(q, 2).unwrap();
        assert!(!s1.is_empty() && s2.len() < s1.len());
        assert!(s1.ids.windows(2).all(|w| w[0] < w[1]));
        for (j, &id) in s1.ids.iter().enumerate() {
            let k = idx.vector(id as usize).unwrap();
            let u = retrieval_probability(q, k, 6, 12);
            assert!((s1.inclusion[j] - u).abs() <= 1e-9 * u);
            assert!((f64::from(s1.log_weights[j]) + u.ln()).abs() < 1e-5);
            assert!(s1.collisions[j] >= 1);
        }
        for (j, &id) in s2.ids.iter().enumerate() {
            let p = collision_probability(q, idx.vector(id as usize).unwrap(), 6);
            assert!((s2.inclusion[j] - binomial_tail(12, p, 2)).abs() <= 1e-9);
            assert!(s2.collisions[j] >= 2);
        }
        // The candidate set of search is the sample set; the stats agree.
        let r = idx.search(q, 1, &SearchParams::default()).unwrap();
        assert_eq!(r.stats.full_scored, s1.len() as u64);
        assert_eq!(s1.stats.full_scored, s1.len() as u64);
        assert!(s1.stats.codes_scored >= 12);
        assert!(s1.stats.bytes_read >= (s1.len() * dim * 4 + 6 * 12 * dim * 4) as u64);
    }

    #[test]
    fn recall_against_flat_grows_with_tables() {
        let (dim, n, m, k) = (32, 2000, 40, 10);
        let (keys, queries) = keys_and_queries(n, m, dim, 21);
        let mut flat = FlatIndex::new(dim);
        flat.build(&keys, None).unwrap();
        let truth = flat.search(&queries, k, &SearchParams::default()).unwrap();
        let mut idx = LshIndex::new(dim, 8, 32, 4).unwrap();
        idx.build(&keys, None).unwrap();
        let (mut last_recall, mut last_cands) = (0.0, 0);
        for tables in [2, 8, 32] {
            let r = idx.search(&queries, k, &SearchParams::effort(tables)).unwrap();
            let rec = recall(&truth, &r);
            let share = r.stats.full_scored as f64 / (n * m) as f64;
            assert!(rec >= last_recall && r.stats.full_scored > last_cands, "tables={tables}");
            // Hashing works only if recall beats the share of keys scanned by far: random
            // buckets of the same size would give recall ≈ share.
            assert!(rec > 2.0 * share, "tables={tables}: recall {rec} vs share {share}");
            (last_recall, last_cands) = (rec, r.stats.full_scored);
        }
        // Attention-like keys share a large offset, so SimHash sees them in a narrow cone and
        // recall is modest (see docs/benchmarks.md for LSH on real traces); broken hashing gives
        // recall ≈ share, which the ratio check above rules out at every table count.
        assert!(last_recall > 0.25, "recall {last_recall} with all 32 tables");
        // Effort beyond L is clamped to L.
        assert_eq!(
            idx.search(&queries, k, &SearchParams::effort(1000)).unwrap(),
            idx.search(&queries, k, &SearchParams::default()).unwrap()
        );
    }

    #[test]
    fn search_is_exact_top_k_among_candidates_and_pads() {
        let dim = 8;
        let (keys, queries) = keys_and_queries(400, 5, dim, 8);
        let mut idx = LshIndex::new(dim, 5, 4, 2).unwrap();
        idx.build(&keys, None).unwrap();
        for q in queries.chunks_exact(dim) {
            let cands = idx.sample(q).unwrap().ids;
            let r = idx.search(q, 7, &SearchParams::default()).unwrap();
            let mut want: Vec<(u32, f32)> =
                cands.iter().map(|&i| (i, dot(q, idx.vector(i as usize).unwrap()))).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(7);
            assert_eq!(r.labels_of(0), want.iter().map(|w| w.0).collect::<Vec<_>>());
        }
        // Few candidates: a 32-bit signature matches only (near-)duplicates. Pad like from_rows.
        let mut idx = LshIndex::new(dim, 32, 1, 2).unwrap();
        idx.build(&keys, None).unwrap();
        let r = idx.search(&keys[3 * dim..4 * dim], 5, &SearchParams::default()).unwrap();
        let got = r.labels_of(0);
        assert!(got.contains(&3) && got.len() < 5);
        assert_eq!(r.labels[4], NO_LABEL);
        assert_eq!(r.scores[4], f32::NEG_INFINITY);
    }

    #[test]
    fn inserted_keys_are_candidates_and_match_a_fresh_build() {
        let dim = 12;
        let (keys, _) = keys_and_queries(1500, 0, dim, 30);
        let (head, rest) = keys.split_at(200 * dim);
        let mut grown = LshIndex::new(dim, 6, 8, 77).unwrap();
        grown.build(head, None).unwrap();
        // One by one, past the tail-merge threshold.
        for (i, k) in rest.chunks_exact(dim).enumerate() {
            let id = 200 + i as u32;
            assert_eq!(grown.insert(k).unwrap(), id..id + 1);
            if i % 97 == 0 {
                let s = grown.sample(k).unwrap();
                let j = s.ids.iter().position(|&x| x == id).unwrap();
                assert_eq!(s.collisions[j], 8, "a key collides with itself in every table");
            }
        }
        let mut fresh = LshIndex::new(dim, 6, 8, 77).unwrap();
        fresh.build(&keys, None).unwrap();
        assert_eq!(grown.len(), fresh.len());
        let qs = &keys[..20 * dim];
        for e in [1, 8] {
            let p = SearchParams::effort(e);
            let (g, f) = (grown.search(qs, 9, &p).unwrap(), fresh.search(qs, 9, &p).unwrap());
            // Same hits; only the lookup cost differs while inserted keys sit in the tail.
            assert_eq!((g.labels, g.scores, g.stats.full_scored), (f.labels, f.scores, f.stats.full_scored));
        }
        let q = &keys[1400 * dim..1401 * dim];
        let (g, f) = (grown.sample(q).unwrap(), fresh.sample(q).unwrap());
        assert_eq!((g.ids, g.log_weights, g.collisions), (f.ids, f.log_weights, f.collisions));
        // Insert into a never-built index works too.
        let mut empty = LshIndex::new(dim, 6, 8, 77).unwrap();
        assert_eq!(empty.insert(head).unwrap(), 0..200);
        assert_eq!(empty.sample(&head[..dim]).unwrap(), {
            let mut b = LshIndex::new(dim, 6, 8, 77).unwrap();
            b.build(head, None).unwrap();
            b.sample(&head[..dim]).unwrap()
        });
    }

    #[test]
    fn zero_vectors_follow_the_convention() {
        let dim = 4;
        let keys = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0];
        let mut idx = LshIndex::new(dim, 3, 5, 1).unwrap();
        idx.build(&keys, None).unwrap();
        let zero = [0.0f32; 4];
        // A zero query collides with the zero key in every table, weight ln(1/1) = 0.
        let s = idx.sample(&zero).unwrap();
        assert_eq!((s.ids[0], s.collisions[0], s.log_weights[0]), (0, 5, 0.0));
        // Non-zero keys, if sampled, carry the orthogonal-angle probability 1 − (1 − 2^-3)^5.
        let u = 1.0 - (1.0f64 - 0.125).powi(5);
        for j in 1..s.len() {
            assert!((s.inclusion[j] - u).abs() < 1e-12);
        }
        let r = idx.search(&zero, 1, &SearchParams::default()).unwrap();
        assert_eq!(r.scores[0], 0.0);
        let s = idx.sample(&[1.0, 0.0, 0.0, 0.0]).unwrap();
        assert!(s.log_weights.iter().all(|w| w.is_finite()));
    }

    #[test]
    fn bad_input_is_rejected_with_named_errors() {
        let p = SearchParams::default();
        let mut idx = LshIndex::new(2, 4, 4, 0).unwrap();
        assert!(matches!(idx.search(&[1.0, 0.0], 1, &p), Err(Error::EmptyKeys { .. })));
        assert!(matches!(idx.sample(&[1.0, 0.0]), Err(Error::EmptyKeys { .. })));
        idx.build(&[], None).unwrap();
        assert!(matches!(idx.search(&[1.0, 0.0], 1, &p), Err(Error::EmptyKeys { .. })));
        assert!(matches!(idx.build(&[1.0, 0.0, 2.0], None), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(idx.build(&[1.0, f32::NAN], None), Err(Error::NonFinite { .. })));
        assert!(matches!(idx.build(&[1.0, 0.0], Some(&[1.0])), Err(Error::DimensionMismatch { .. })));
        idx.build(&[1.0, 0.0, 0.0, 1.0], None).unwrap();
        assert!(matches!(idx.search(&[1.0, 0.0], 3, &p), Err(Error::BudgetTooLarge { .. })));
        assert!(matches!(idx.search(&[1.0, 0.0], 0, &p), Err(Error::BudgetTooLarge { .. })));
        assert!(matches!(idx.search(&[1.0], 1, &p), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(idx.search(&[f32::NAN, 0.0], 1, &p), Err(Error::NonFinite { .. })));
        assert!(matches!(idx.sample(&[1.0, 0.0, 0.0]), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(idx.sample(&[f32::INFINITY, 0.0]), Err(Error::NonFinite { .. })));
        assert!(matches!(idx.insert(&[1.0]), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(idx.insert(&[f32::NAN, 1.0]), Err(Error::NonFinite { .. })));
        assert!(matches!(idx.signatures(&[1.0]), Err(Error::DimensionMismatch { .. })));
        let named =
            |r: Result<Sample>, name: &str| matches!(r, Err(Error::InvalidParameter { name: n, .. }) if n == name);
        assert!(named(idx.sample_min_collisions(&[1.0, 0.0], 0), "min_tables"));
        assert!(named(idx.sample_min_collisions(&[1.0, 0.0], 5), "min_tables"));
        assert!(matches!(idx.search(&[1.0, 0.0], 1, &SearchParams::effort(0)), Err(Error::InvalidParameter { .. })));
        for (dim, k, l, name) in [
            (0, 4, 4, "dim"),
            (2, 0, 4, "k_bits"),
            (2, 33, 4, "k_bits"),
            (2, 4, 0, "l_tables"),
            (2, 4, 5000, "l_tables"),
        ] {
            assert!(matches!(LshIndex::new(dim, k, l, 0), Err(Error::InvalidParameter { name: n, .. }) if n == name));
        }
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn factory_strings() {
        assert_eq!(from_factory(64, "LSH8x64").unwrap().describe(), "LSH8x64");
        assert_eq!(from_factory(64, "LSH").unwrap().describe(), format!("LSH{DEFAULT_K_BITS}x{DEFAULT_L_TABLES}"));
        assert_eq!(from_factory(16, " LSH32x1 ").unwrap().describe(), "LSH32x1");
        assert_eq!(parse_factory(16, "LSH3x7").unwrap().l_tables(), 7);
        for bad in [
            "",
            "HNSW32",
            "lsh8x64",
            "LSH8",
            "LSHx64",
            "LSH8x",
            "LSH0x4",
            "LSH33x4",
            "LSH8x0",
            "LSH8x5000",
            "LSH-1x4",
            "LSH8x64,seed=1",
            "LSH8x99999999999999999999999",
        ] {
            match from_factory(64, bad) {
                Err(Error::InvalidParameter { name, reason }) => {
                    assert_eq!(name, "spec");
                    assert!(reason.contains("LSH{K}x{L}"), "{bad}: {reason}");
                }
                other => panic!("{bad:?} gave {:?}", other.map(|i| i.describe())),
            }
        }
        assert!(matches!(from_factory(0, "LSH"), Err(Error::InvalidParameter { .. })));
    }

    #[test]
    fn same_seed_same_index_and_memory_is_counted() {
        let dim = 16;
        let (keys, queries) = keys_and_queries(500, 3, dim, 1);
        let build = |seed| {
            let mut i = LshIndex::new(dim, 7, 10, seed).unwrap();
            let st = i.build(&keys, None).unwrap();
            (i, st)
        };
        let ((a, st), (b, _), (c, _)) = (build(5), build(5), build(6));
        let p = SearchParams::default();
        assert_eq!(a.search(&queries, 5, &p).unwrap(), b.search(&queries, 5, &p).unwrap());
        assert_ne!(a.sample(&queries[..dim]).unwrap(), c.sample(&queries[..dim]).unwrap());
        assert_eq!(st.vectors, 500);
        // Keys, hyperplanes and one id per key per table, at least.
        assert!(a.memory_bytes() >= 500 * dim * 4 + 70 * dim * 4 + 500 * 10 * 4);
        assert_eq!((a.k_bits(), a.l_tables(), a.seed(), a.dim()), (7, 10, 5, dim));
    }

    #[test]
    fn state_round_trips_with_a_tail_and_rejects_bad_bytes() {
        let dim = 32;
        let (keys, queries) = keys_and_queries(3300, 8, dim, 17);
        let make = || LshIndex::new(dim, 8, 16, 3).unwrap();
        let mut built = make();
        built.build(&keys[..2000 * dim], None).unwrap();
        built.insert(&keys[2000 * dim..2300 * dim]).unwrap();
        assert!(built.tables.iter().all(|t| !t.is_tail_empty()), "the tail is part of what is saved");
        let mut state = Vec::new();
        built.save_state(&mut state).unwrap();
        let mut fresh = make();
        fresh.load_state(&state, &keys[..2300 * dim]).unwrap();
        let mut again = Vec::new();
        fresh.save_state(&mut again).unwrap();
        assert!(again == state, "save → load → save changed the bytes");
        let p = SearchParams::default();
        assert_eq!(built.search(&queries, 10, &p).unwrap(), fresh.search(&queries, 10, &p).unwrap());
        assert_eq!(
            built.sample_min_collisions(&queries[..dim], 2).unwrap(),
            fresh.sample_min_collisions(&queries[..dim], 2).unwrap()
        );
        // Enough inserts to merge the tail into the bulk.
        built.insert(&keys[2300 * dim..]).unwrap();
        fresh.insert(&keys[2300 * dim..]).unwrap();
        assert_eq!(built.search(&queries, 10, &p).unwrap(), fresh.search(&queries, 10, &p).unwrap());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        built.save_state(&mut a).unwrap();
        fresh.save_state(&mut b).unwrap();
        assert!(a == b);

        let keys = &keys[..2300 * dim];
        needle_core::state::check_damage(&state, 300, 0x853c_49e6_748f_ea9b, |s| {
            let mut idx = make();
            idx.load_state(s, keys)?;
            let _ = idx.search(&queries[..dim], 10, &p);
            let _ = idx.sample_min_collisions(&queries[..dim], 2);
            Ok(())
        });
        let mut newer = state.clone();
        newer[8] += 1;
        assert!(make().load_state(&newer, keys).unwrap_err().to_string().contains("newer"));
        let mut other = state.clone();
        other[..8].copy_from_slice(b"ndl.hnsw");
        assert!(make().load_state(&other, keys).unwrap_err().to_string().contains("another kind"));
        let e = LshIndex::new(dim, 8, 16, 4).unwrap().load_state(&state, keys).unwrap_err();
        assert!(e.to_string().contains("seed"), "{e}");
    }

    /// Load time against build time on an 8K-key head (printed with `--nocapture`; not asserted).
    #[test]
    #[allow(clippy::print_stderr)] // The timings are what this test is for.
    fn load_is_cheaper_than_build_at_8k() {
        let (keys, _) = keys_and_queries(8192, 1, 64, 5);
        let make = || LshIndex::with_defaults(64).unwrap();
        let mut idx = make();
        let t = std::time::Instant::now();
        idx.build(&keys, None).unwrap();
        let build_s = t.elapsed().as_secs_f64();
        let mut state = Vec::new();
        idx.save_state(&mut state).unwrap();
        let mut fresh = make();
        let t = std::time::Instant::now();
        fresh.load_state(&state, &keys).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        eprintln!(
            "LSH10x64 at 8192 keys: build {:.1} ms, load {:.2} ms, state {} KiB",
            build_s * 1e3,
            load_s * 1e3,
            state.len() / 1024
        );
    }
}
