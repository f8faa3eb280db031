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
