//! [`IvfPqIndex`]: coarse k-means lists, residual product quantization, asymmetric LUT scoring of
//! the probed lists, and exact re-rank of a shortlist with the stored full vectors.
//!
//! Lists are Voronoi cells under L2 (k-means on the keys), not "largest inner product" cells:
//! assigning by inner product sends most keys to the few centroids of largest norm and leaves
//! lists badly unbalanced. With L2 cells the residual `r = k − c` is small, so for a query
//! `q·k = q·c + q·r`; lists are probed by `q·c` and codes store `r`. For inner products the
//! residual table `q_j · centroid` does not depend on the list, so one table serves every probe.

use std::collections::BinaryHeap;
use std::ops::Range;

use needle_core::{
    BuildStats, Error, Result, SearchParams, SearchResult, SearchStats, VectorIndex, attention::top_k, check_batch,
    check_search,
};
use rayon::prelude::*;

use crate::invlists::InvertedLists;
use crate::kmeans::{KMeans, KMeansInit};
use crate::linalg::{dot, nearest, row_norms};
use crate::pq::{ProductQuantizer, lut_score};
use crate::state::{Reader, Writer};
use crate::transform::QueryTransform;

/// Fewer keys per list than this and the coarse quantizer shrinks (lists of one or two keys
/// cost a centroid each and prune nothing).
const MIN_KEYS_PER_LIST: usize = 8;

/// Construction parameters with their defaults; see `ALGO_PARAMS.md` for ranges and memory.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IvfPqParams {
    /// Coarse lists (1 = no IVF, plain PQ scan).
    pub nlist: usize,
    /// PQ subspaces; must divide `dim`. Code size is `m` bytes.
    pub m: usize,
    /// Bits per sub-code, 1..=8 (`2^nbits` centroids per subspace).
    pub nbits: usize,
    /// Lists probed per query unless `SearchParams::effort` says otherwise.
    pub nprobe: usize,
    /// Shortlist of `rerank × k` candidates re-scored exactly; 0 returns PQ estimates unranked.
    pub rerank: usize,
    /// Fit the codebooks to the training queries' second moment when queries are given.
    pub query_aware: bool,
    /// Ridge for query-aware training, relative to the mean eigenvalue of `E[q qᵀ]`.
    pub qa_reg: f32,
    /// Lloyd iterations for both coarse and PQ k-means.
    pub kmeans_iters: usize,
    /// Seed of every random choice in training.
    pub seed: u64,
}

impl Default for IvfPqParams {
    fn default() -> Self {
        Self {
            nlist: 256,
            m: 16,
            nbits: 8,
            nprobe: 16,
            rerank: 8,
            query_aware: true,
            qa_reg: 0.05,
            kmeans_iters: 10,
            seed: 0,
        }
    }
}

impl IvfPqParams {
    /// Defaults with `nlist` lists and `m` subspaces.
    pub fn new(nlist: usize, m: usize) -> Self {
        Self { nlist, m, ..Self::default() }
    }

    /// Checks every parameter against `dim`.
    pub fn validate(&self, dim: usize) -> Result<()> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        if self.nlist == 0 {
            return Err(Error::invalid("nlist", "must be at least 1 (1 = no IVF)"));
        }
        if self.nprobe == 0 {
            return Err(Error::invalid("nprobe", "must be at least 1"));
        }
        if !(self.qa_reg.is_finite() && self.qa_reg > 0.0) {
            return Err(Error::invalid("qa_reg", format!("must be finite and > 0, got {}", self.qa_reg)));
        }
        ProductQuantizer::new(dim, self.m, self.nbits).map(|_| ())
    }

    /// Factory-syntax description: `"IVF256,PQ16"`, `"PQ16"` when `nlist == 1`, `x<nbits>` unless 8.
    pub fn describe(&self) -> String {
        let pq = if self.nbits == 8 { format!("PQ{}", self.m) } else { format!("PQ{}x{}", self.m, self.nbits) };
        if self.nlist == 1 { pq } else { format!("IVF{},{pq}", self.nlist) }
    }
}

/// Which space the codes live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TrainingMode {
    /// Not built yet.
    Untrained,
    /// Codebooks fitted to the keys alone (L2 reconstruction error).
    Plain,
    /// Codebooks fitted in the query-weighted metric of the training queries.
    QueryAware,
}

/// IVF + PQ maximum-inner-product index with exact re-rank. Ids are dense in insertion order.
#[derive(Debug, Clone)]
pub struct IvfPqIndex {
    dim: usize,
    params: IvfPqParams,
    transform: Option<QueryTransform>,
    /// Coarse centroids in the (possibly transformed) code space, `nlist_eff × dim`.
    coarse: Vec<f32>,
    coarse_norms: Vec<f32>,
    pq: ProductQuantizer,
    lists: InvertedLists,
    /// Full vectors in the caller's space, for exact re-rank.
    vectors: Vec<f32>,
}

/// Scored candidate ordered so that a `BinaryHeap` of them is a min-heap by score (ties: larger
/// id evicted first), i.e. the shortlist's weakest entry sits on top.
#[derive(Clone, Copy, PartialEq)]
struct Cand(f32, u32);
impl Eq for Cand {}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl IvfPqIndex {
    /// An empty index for `dim`-float vectors; fails on invalid parameters.
    pub fn new(dim: usize, params: IvfPqParams) -> Result<Self> {
        params.validate(dim)?;
        Ok(Self {
            dim,
            params,
            transform: None,
            coarse: Vec::new(),
            coarse_norms: Vec::new(),
            pq: ProductQuantizer::new(dim, params.m, params.nbits)?,
            lists: InvertedLists::default(),
            vectors: Vec::new(),
        })
    }

    /// An empty index with [`IvfPqParams::default`].
    pub fn with_defaults(dim: usize) -> Result<Self> {
        Self::new(dim, IvfPqParams::default())
    }

    /// An empty index from a factory string (`"IVF256,PQ16"`, `"IVF1024,PQ32x8"`, `"PQ16"`);
    /// other parameters keep their defaults.
    pub fn from_factory(dim: usize, spec: &str) -> Result<Self> {
        Self::new(dim, crate::factory::parse(spec)?)
    }

    /// The construction parameters.
    pub fn params(&self) -> &IvfPqParams {
        &self.params
    }
    /// Changes the default `nprobe` used when a search gives no effort.
    pub fn set_nprobe(&mut self, nprobe: usize) -> Result<()> {
        if nprobe == 0 {
            return Err(Error::invalid("nprobe", "must be at least 1"));
        }
        self.params.nprobe = nprobe;
        Ok(())
    }
    /// Changes the shortlist factor (`rerank × k` candidates re-scored exactly; 0 = off).
    pub fn set_rerank(&mut self, rerank: usize) {
        self.params.rerank = rerank;
    }
    /// Lists actually built (≤ `nlist` when there were few keys); 0 before a build.
    pub fn nlist_effective(&self) -> usize {
        self.lists.nlist()
    }
    /// The product quantizer.
    pub fn pq(&self) -> &ProductQuantizer {
        &self.pq
    }
    /// The inverted lists.
    pub fn lists(&self) -> &InvertedLists {
        &self.lists
    }
    /// How the codebooks were trained.
    pub fn mode(&self) -> TrainingMode {
        match (self.pq.is_trained(), &self.transform) {
            (false, _) => TrainingMode::Untrained,
            (true, None) => TrainingMode::Plain,
            (true, Some(_)) => TrainingMode::QueryAware,
        }
    }
    /// True once built.
    pub fn is_trained(&self) -> bool {
        self.pq.is_trained()
    }

    fn to_code_space<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>, is_query: bool) -> &'a [f32] {
        match &self.transform {
            None => x,
            Some(t) => {
                buf.resize(self.dim, 0.0);
                if is_query {
                    t.map_query(x, buf)
                } else {
                    t.map_key(x, buf)
                }
                buf
            }
        }
    }

    /// Assigns, encodes and stores `keys` (already validated) with ids from `first`.
    fn add_encoded(&mut self, keys: &[f32], first: u32) {
        let (dim, m) = (self.dim, self.pq.m());
        let encoded: Vec<(u32, Vec<u8>)> = keys
            .par_chunks_exact(dim)
            .map_init(
                || (Vec::new(), vec![0.0f32; dim]),
                |(buf, resid), k| {
                    let kt = self.to_code_space(k, buf, false);
                    let (l, _) = nearest(kt, &self.coarse, &self.coarse_norms, dim);
                    let c = &self.coarse[l as usize * dim..(l as usize + 1) * dim];
                    resid.iter_mut().zip(kt.iter().zip(c)).for_each(|(r, (a, b))| *r = a - b);
                    let mut code = vec![0u8; m];
                    self.pq.encode_into(resid, &mut code);
                    (l, code)
                },
            )
            .collect();
        for (i, (l, code)) in encoded.iter().enumerate() {
            self.lists.push(*l as usize, first + i as u32, code);
        }
        self.vectors.extend_from_slice(keys);
    }

    fn check_capacity(&self, add: usize) -> Result<()> {
        // u32::MAX is NO_LABEL, so ids stop one short of it.
        if self.len().saturating_add(add) >= u32::MAX as usize {
            return Err(Error::BudgetTooLarge {
                what: "ids (u32)".into(),
                budget: self.len() + add,
                available: u32::MAX as usize - 1,
            });
        }
        Ok(())
    }

    /// PQ estimate of `q·k` for every stored id, in id order: what the LUT scan ranks by, before
    /// re-rank. For measuring estimation error.
    pub fn estimated_scores(&self, query: &[f32]) -> Result<Vec<f32>> {
        self.check_built("estimated_scores")?;
        needle_core::check_len("query", self.dim, query.len())?;
        needle_core::check_finite("query", query)?;
        let mut buf = Vec::new();
        let qt = self.to_code_space(query, &mut buf, true);
        let ksub = self.pq.ksub();
        let mut table = vec![0.0f32; self.pq.m() * ksub];
        self.pq.ip_table_into(qt, &mut table);
        let mut out = vec![0.0f32; self.len()];
        for l in 0..self.lists.nlist() {
            let base = dot(qt, &self.coarse[l * self.dim..(l + 1) * self.dim]);
            for (&id, code) in self.lists.ids(l).iter().zip(self.lists.codes(l).chunks_exact(self.pq.m())) {
                out[id as usize] = base + lut_score(&table, ksub, code);
            }
        }
        Ok(out)
    }

    /// The approximation of vector `id` that its code stands for, in the caller's space.
    pub fn reconstruct(&self, id: u32) -> Result<Vec<f32>> {
        self.check_built("reconstruct")?;
        let m = self.pq.m();
        for l in 0..self.lists.nlist() {
            if let Some(p) = self.lists.ids(l).iter().position(|&x| x == id) {
                let mut rec = vec![0.0f32; self.dim];
                self.pq.decode_into(&self.lists.codes(l)[p * m..(p + 1) * m], &mut rec);
                rec.iter_mut().zip(&self.coarse[l * self.dim..(l + 1) * self.dim]).for_each(|(r, c)| *r += c);
                return Ok(match &self.transform {
                    None => rec,
                    Some(t) => {
                        let mut out = vec![0.0f32; self.dim];
                        t.unmap_key(&rec, &mut out);
                        out
                    }
                });
            }
        }
        Err(Error::OutOfRange { what: "reconstruct id".into(), id: id as u64, len: self.len() })
    }

    fn check_built(&self, op: &str) -> Result<()> {
        if self.is_trained() { Ok(()) } else { Err(Error::EmptyKeys { what: format!("{op} (index not built)") }) }
    }

    fn search_one(&self, q: &[f32], k: usize, nprobe: usize) -> Result<(Vec<(u32, f32)>, SearchStats)> {
        let (dim, m, ksub) = (self.dim, self.pq.m(), self.pq.ksub());
        let mut buf = Vec::new();
        let qt = self.to_code_space(q, &mut buf, true);
        let coarse: Vec<f32> = self.coarse.chunks_exact(dim).map(|c| dot(qt, c)).collect();
        let probes = top_k(&coarse, nprobe.min(coarse.len()))?;
        let mut table = vec![0.0f32; m * ksub];
        self.pq.ip_table_into(qt, &mut table);

        let short = if self.params.rerank == 0 { k } else { k.saturating_mul(self.params.rerank) };
        let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(short + 1);
        let mut codes_scored = 0u64;
        for &(l, base) in &probes {
            let l = l as usize;
            let ids = self.lists.ids(l);
            codes_scored += ids.len() as u64;
            for (&id, code) in ids.iter().zip(self.lists.codes(l).chunks_exact(m)) {
                let s = base + lut_score(&table, ksub, code);
                if heap.len() < short {
                    heap.push(Cand(s, id));
                } else if let Some(mut worst) = heap.peek_mut()
                    && Cand(s, id) < *worst
                {
                    *worst = Cand(s, id);
                }
            }
        }
        let mut stats = SearchStats {
            full_scored: 0,
            codes_scored,
            // Coarse centroids + codebooks (table build) + transform + ids and codes of probed lists.
            bytes_read: (self.coarse.len() * 4 + self.pq.codebook_bytes()) as u64
                + self.transform.as_ref().map_or(0, |_| (dim * dim * 4) as u64)
                + codes_scored * (m as u64 + 4),
        };
        let mut cands: Vec<(u32, f32)> = heap.into_iter().map(|c| (c.1, c.0)).collect();
        if self.params.rerank == 0 {
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cands.truncate(k);
            return Ok((cands, stats));
        }
        let exact: Vec<f32> =
            cands.iter().map(|&(id, _)| dot(q, &self.vectors[id as usize * dim..(id as usize + 1) * dim])).collect();
        stats.full_scored = exact.len() as u64;
        stats.bytes_read += (exact.len() * dim * 4) as u64;
        let best = top_k(&exact, k.min(exact.len()))?;
        Ok((best.into_iter().map(|(i, s)| (cands[i as usize].0, s)).collect(), stats))
    }
}

const IVFPQ_TAG: &[u8; 8] = b"ndl.ivpq";
const IVFPQ_VERSION: u32 = 1;

impl IvfPqIndex {
    /// Everything but the full vectors: parameters (those that shape the build are checked at
    /// load; `nprobe` and `rerank` are restored), the query transform, coarse centroids, PQ
    /// codebooks and the lists' ids and codes. Centroid norms are recomputed at load.
    fn save(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, IVFPQ_TAG, IVFPQ_VERSION);
        let p = &self.params;
        for v in [self.dim, p.nlist, p.m, p.nbits, p.kmeans_iters, p.nprobe, p.rerank] {
            w.len(v);
        }
        w.bool(p.query_aware);
        w.f32(p.qa_reg);
        w.u64(p.seed);
        w.len(self.len());
        w.bool(self.is_trained());
        if !self.is_trained() {
            return;
        }
        match &self.transform {
            None => w.bool(false),
            Some(t) => {
                w.bool(true);
                let (k, q) = t.maps();
                w.f32s(k);
                w.f32s(q);
            }
        }
        w.f32s(&self.coarse);
        w.len(self.pq.ksub());
        w.f32s(self.pq.centroids());
        let nl = self.lists.nlist();
        let lens: Vec<u32> = (0..nl).map(|l| self.lists.list_len(l) as u32).collect();
        w.u32s(&lens);
        let ids: Vec<u32> = (0..nl).flat_map(|l| self.lists.ids(l).iter().copied()).collect();
        w.u32s(&ids);
        let codes: Vec<u8> = (0..nl).flat_map(|l| self.lists.codes(l).iter().copied()).collect();
        w.bytes(&codes);
    }

    fn load(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let mut r = Reader::new("IVF-PQ index", state, IVFPQ_TAG, IVFPQ_VERSION)?;
        let mut f = |name: &str| r.len(name, usize::MAX);
        let (dim, nlist, m, nbits, iters) = (f("dim")?, f("nlist")?, f("m")?, f("nbits")?, f("kmeans_iters")?);
        let (nprobe, rerank) = (f("nprobe")?, f("rerank")?);
        let (query_aware, qa_reg, seed) = (r.bool("query_aware")?, r.f32("qa_reg")?, r.u64("seed")?);
        let p = self.params;
        let saved = IvfPqParams { nlist, m, nbits, nprobe, rerank, query_aware, qa_reg, kmeans_iters: iters, seed };
        let shaping = IvfPqParams { nprobe: p.nprobe, rerank: p.rerank, ..saved };
        if dim != self.dim || shaping != p {
            return Err(r.fail(
                "params",
                format!("saved with {saved:?} at dim {dim}, this index has {p:?} at dim {}", self.dim),
            ));
        }
        if nprobe == 0 {
            return Err(r.fail("nprobe", "must be at least 1"));
        }
        let n = check_batch("keys", keys, dim)?;
        let saved_n = r.len("n", usize::MAX)?;
        if saved_n != n {
            return Err(r.fail("n", format!("{saved_n} vectors saved, {n} key rows given")));
        }
        if !r.bool("trained")? {
            if n != 0 {
                return Err(r.fail("trained", format!("an untrained index cannot hold {n} vectors")));
            }
            r.finish()?;
            *self = Self::new(dim, saved)?;
            return Ok(());
        }
        let transform = if r.bool("transform")? {
            let key_map = r.f32s_exact("transform key map", dim * dim)?;
            let query_map = r.f32s_exact("transform query map", dim * dim)?;
            Some(QueryTransform::from_maps(dim, key_map, query_map))
        } else {
            None
        };
        let coarse = r.f32s("coarse centroids", nlist.saturating_mul(dim))?;
        if coarse.is_empty() || !coarse.len().is_multiple_of(dim) {
            return Err(
                r.fail("coarse centroids", format!("{} floats are not 1..={nlist} rows of {dim}", coarse.len()))
            );
        }
        let nl = coarse.len() / dim;
        let ksub = r.len("ksub", 1 << nbits)?;
        if ksub == 0 {
            return Err(r.fail("ksub", "a trained quantizer has at least one centroid per subspace"));
        }
        let centroids = r.f32s_exact("pq centroids", ksub * dim)?;
        let lens = r.u32s_exact("list lengths", nl)?;
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        if total != n as u64 {
            return Err(r.fail("list lengths", format!("lists hold {total} entries for {n} vectors")));
        }
        let ids = r.u32s_exact("list ids", n)?;
        r.check_below("list ids", &ids, n)?;
        let codes = r.bytes_exact("codes", n * m)?;
        if let Some(i) = codes.iter().position(|&c| c as usize >= ksub) {
            return Err(r.fail("codes", format!("byte {i} is {}, not below ksub = {ksub}", codes[i])));
        }
        r.finish()?;
        let (mut list_ids, mut list_codes) = (Vec::with_capacity(nl), Vec::with_capacity(nl));
        let mut at = 0;
        for &l in &lens {
            let l = l as usize;
            list_ids.push(ids[at..at + l].to_vec());
            list_codes.push(codes[at * m..(at + l) * m].to_vec());
            at += l;
        }
        let pq = ProductQuantizer::new(dim, m, nbits)?.with_centroids(ksub, centroids);
        *self = Self {
            dim,
            params: saved,
            transform,
            coarse_norms: row_norms(&coarse, dim),
            coarse,
            pq,
            lists: InvertedLists::from_parts(m, list_ids, list_codes),
            vectors: keys.to_vec(),
        };
        Ok(())
    }
}

impl VectorIndex for IvfPqIndex {
    fn describe(&self) -> String {
        self.params.describe()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.vectors.len() / self.dim
    }

    fn build(&mut self, keys: &[f32], train_queries: Option<&[f32]>) -> Result<BuildStats> {
        let t0 = std::time::Instant::now();
        let n = check_batch("keys", keys, self.dim)?;
        if n == 0 {
            return Err(Error::EmptyKeys { what: "IVF-PQ build".into() });
        }
        let nq = match train_queries {
            Some(q) => check_batch("train_queries", q, self.dim)?,
            None => 0,
        };
        let p = self.params;
        let dim = self.dim;
        self.vectors.clear();
        self.check_capacity(n)?;
        self.transform = match train_queries {
            Some(q) if p.query_aware && nq > 0 => Some(QueryTransform::fit(q, dim, p.qa_reg)?),
            _ => {
                if p.query_aware {
                    tracing::warn!("IVF-PQ: query_aware is set but no training queries were given; training plain");
                }
                None
            }
        };
        let mut buf = Vec::new();
        let kt: Vec<f32> = match &self.transform {
            None => keys.to_vec(),
            Some(_) => keys.chunks_exact(dim).flat_map(|k| self.to_code_space(k, &mut buf, false).to_vec()).collect(),
        };

        let nlist = p.nlist.min((n / MIN_KEYS_PER_LIST).max(1));
        if nlist < p.nlist {
            tracing::warn!(nlist = p.nlist, keys = n, "IVF-PQ: too few keys for nlist; using {nlist} lists");
        }
        let assignments: Vec<u32>;
        if nlist == 1 {
            // One list centred on the mean: the residuals are the centred keys.
            let mut mean = vec![0.0f64; dim];
            for k in kt.chunks_exact(dim) {
                mean.iter_mut().zip(k).for_each(|(m, &v)| *m += v as f64);
            }
            self.coarse = mean.iter().map(|&v| (v / n as f64) as f32).collect();
            assignments = vec![0; n];
        } else {
            let km = KMeans {
                k: nlist,
                iters: p.kmeans_iters,
                init: KMeansInit::PlusPlus,
                seed: p.seed,
                max_points_per_centroid: 256,
            };
            let cl = km.fit(&kt, dim)?;
            self.coarse = cl.centroids;
            assignments = cl.assignments;
        }
        self.coarse_norms = row_norms(&self.coarse, dim);
        let resid: Vec<f32> = kt
            .par_chunks_exact(dim)
            .zip(assignments.par_iter())
            .flat_map_iter(|(k, &a)| {
                let c = &self.coarse[a as usize * dim..(a as usize + 1) * dim];
                k.iter().zip(c).map(|(x, y)| x - y).collect::<Vec<_>>()
            })
            .collect();
        let mut pq = ProductQuantizer::new(dim, p.m, p.nbits)?;
        pq.train(&resid, p.kmeans_iters, p.seed.wrapping_add(1))?;
        self.pq = pq;
        self.lists = InvertedLists::new(self.coarse.len() / dim, p.m);
        let mut codes = vec![0u8; n * p.m];
        codes.par_chunks_exact_mut(p.m).zip(resid.par_chunks_exact(dim)).for_each(|(c, r)| self.pq.encode_into(r, c));
        for (i, (&a, c)) in assignments.iter().zip(codes.chunks_exact(p.m)).enumerate() {
            self.lists.push(a as usize, i as u32, c);
        }
        self.vectors = keys.to_vec();
        Ok(BuildStats {
            vectors: n,
            train_queries: if self.transform.is_some() { nq } else { 0 },
            seconds: t0.elapsed().as_secs_f64(),
            bytes: self.memory_bytes(),
        })
    }

    /// Adds keys to the trained lists (nearest coarse centroid, encoded residual, full vector
    /// kept). On a never-built index this builds from `keys` without queries instead.
    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>> {
        let n = check_batch("keys", keys, self.dim)?;
        if !self.is_trained() {
            if n == 0 {
                return Ok(0..0);
            }
            self.build(keys, None)?;
            return Ok(0..n as u32);
        }
        self.check_capacity(n)?;
        let first = self.len() as u32;
        self.add_encoded(keys, first);
        Ok(first..first + n as u32)
    }

    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.len())?;
        let nprobe = params.effort.unwrap_or(self.params.nprobe);
        if nprobe == 0 {
            return Err(Error::invalid("effort (nprobe)", "must be at least 1"));
        }
        let rows =
            queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, nprobe)).collect::<Result<Vec<_>>>()?;
        Ok(SearchResult::from_rows(k, rows))
    }

    fn memory_bytes(&self) -> usize {
        self.vectors.len() * 4
            + self.lists.memory_bytes()
            + (self.coarse.len() + self.coarse_norms.len()) * 4
            + self.pq.memory_bytes()
            + self.transform.as_ref().map_or(0, QueryTransform::memory_bytes)
    }
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        self.save(out);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        self.load(state, keys)
    }
}

#[cfg(test)]
mod tests;
