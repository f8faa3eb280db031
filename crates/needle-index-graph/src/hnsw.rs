//! HNSW (Malkov & Yashunin, 2016) with inner-product distance: the key-only baseline that
//! shows what query-awareness buys. Field names follow hnswlib's `hnswalg.h`.

use std::ops::Range;
use std::time::Instant;

use needle_core::{BuildStats, Error, Result, SearchParams, SearchResult, SearchStats, VectorIndex};
use needle_core::{check_batch, check_search};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::beam::{Adjacency, Beam, Visited, VisitedPool, Work, beam_search};
use crate::dist::{dot, row};
use crate::graph::{FixedGraph, occlusion_prune, score_against};
use crate::roar::{positive, stats};
use crate::state::{Reader, Writer};

/// Highest layer a node may get (probability `m^-16`: never reached in practice).
const MAX_LEVEL: usize = 16;
/// Largest group of nodes linked in parallel against the same frozen graph.
const MAX_BATCH: usize = 256;

/// Build and search settings of an [`Hnsw`] index, named as in hnswlib.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HnswParams {
    /// Links per node on upper layers; layer 0 allows `2·m` (`maxM0_`).
    pub m: usize,
    /// Beam width while inserting.
    pub ef_construction: usize,
    /// Default beam width of a search on layer 0 (`SearchParams::effort` overrides; at least `k`).
    pub ef_search: usize,
    /// Seed of the random level assignment.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self { m: 16, ef_construction: 200, ef_search: 64, seed: 100 }
    }
}

/// Hierarchical navigable small-world graph for maximum inner product.
///
/// Construction is deterministic for a seed although parallel: nodes are linked in batches
/// that search the graph as it was before the batch (plus an exact scan inside the batch),
/// then all link updates are applied in id order.
#[derive(Debug, Clone)]
pub struct Hnsw {
    dim: usize,
    params: HnswParams,
    /// `1 / ln(m)`: scale of the exponential level distribution.
    mult: f64,
    /// Maximum links on layer 0.
    max_m0: usize,
    data: Vec<f32>,
    levels: Vec<u8>,
    level0: FixedGraph,
    /// First row in `upper` of each node with level ≥ 1; its layer `l` row is `offset + l - 1`.
    upper_offset: Vec<u32>,
    upper: FixedGraph,
    enterpoint_node: Option<u32>,
    max_level: usize,
    level_rng: StdRng,
    visited: VisitedPool,
}

/// One layer of the hierarchy, seen as a plain graph.
struct Layer<'a> {
    h: &'a Hnsw,
    level: usize,
}

impl Adjacency for Layer<'_> {
    #[inline]
    fn neighbors(&self, id: u32) -> &[u32] {
        self.h.links(id, self.level)
    }
}

impl Hnsw {
    /// An empty index with the given parameters (hnswlib's constructor, minus `max_elements`).
    pub fn new(dim: usize, params: HnswParams) -> Result<Self> {
        positive("dim", dim)?;
        positive("ef_construction", params.ef_construction)?;
        positive("ef_search", params.ef_search)?;
        if params.m < 2 {
            return Err(Error::invalid("m", "must be at least 2"));
        }
        Ok(Self {
            dim,
            params,
            mult: 1.0 / (params.m as f64).ln(),
            max_m0: 2 * params.m,
            data: Vec::new(),
            levels: Vec::new(),
            level0: FixedGraph::new(2 * params.m),
            upper_offset: Vec::new(),
            upper: FixedGraph::new(params.m),
            enterpoint_node: None,
            max_level: 0,
            level_rng: StdRng::seed_from_u64(params.seed),
            visited: VisitedPool::default(),
        })
    }

    /// An empty index with `m` links per node and other parameters at their defaults.
    pub fn with_m(dim: usize, m: usize) -> Result<Self> {
        Self::new(dim, HnswParams { m, ..Default::default() })
    }

    /// The parameters in use.
    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// Highest layer in the hierarchy.
    pub fn max_level(&self) -> usize {
        self.max_level
    }

    fn n(&self) -> usize {
        self.data.len() / self.dim
    }

    #[inline]
    fn links(&self, id: u32, level: usize) -> &[u32] {
        if level == 0 { self.level0.get(id) } else { self.upper.get(self.upper_offset[id as usize] + level as u32 - 1) }
    }

    fn set_links(&mut self, id: u32, level: usize, nbrs: &[u32]) {
        if level == 0 {
            self.level0.set(id, nbrs);
        } else {
            let r = self.upper_offset[id as usize] + level as u32 - 1;
            self.upper.set(r, nbrs);
        }
    }

    fn cap(&self, level: usize) -> usize {
        if level == 0 { self.max_m0 } else { self.params.m }
    }

    fn random_level(&mut self) -> u8 {
        let u: f64 = self.level_rng.random::<f64>();
        let l = (-(1.0 - u).ln() * self.mult).floor();
        (l as usize).min(MAX_LEVEL) as u8
    }

    /// Greedy walk on one upper layer towards larger inner product (hnswlib's descent).
    fn greedy(&self, q: &[f32], mut cur: u32, mut cur_s: f32, level: usize, work: &mut Work) -> (u32, f32) {
        loop {
            let mut changed = false;
            let nbrs = self.links(cur, level);
            work.links += nbrs.len() as u64;
            for &nb in nbrs {
                work.scored += 1;
                let s = dot(q, row(&self.data, self.dim, nb));
                if s > cur_s {
                    (cur, cur_s, changed) = (nb, s, true);
                }
            }
            if !changed {
                return (cur, cur_s);
            }
        }
    }

    fn layer_search(&self, q: &[f32], eps: &[u32], ef: usize, level: usize, v: &mut Visited, w: &mut Work) -> Beam {
        v.reset(self.n());
        beam_search(&Layer { h: self, level }, &self.data, self.dim, q, eps, ef, v, w, None)
    }

    /// Neighbours of new node `i` on each of its layers, from the graph frozen before the
    /// batch `batch` plus an exact scan of the batch itself.
    fn plan(&self, i: u32, batch: Range<u32>, entry: u32) -> Vec<Vec<u32>> {
        let (dim, m) = (self.dim, self.params.m);
        let q = row(&self.data, dim, i);
        let li = self.levels[i as usize] as usize;
        let mut work = Work::default();
        let mut visited = self.visited.get(self.n());
        let mut cur = (entry, dot(q, row(&self.data, dim, entry)));
        for l in (li + 1..=self.max_level).rev() {
            cur = self.greedy(q, cur.0, cur.1, l, &mut work);
        }
        let mut eps = vec![cur.0];
        let mut out = vec![Vec::new(); li + 1];
        for l in (0..=li).rev() {
            let mut cands: Vec<(u32, f32)> = Vec::new();
            if l <= self.max_level {
                let beam = self.layer_search(q, &eps, self.params.ef_construction, l, &mut visited, &mut work);
                cands.extend(beam.items().iter().map(|c| (c.id, c.score)));
                eps = cands.iter().map(|c| c.0).collect();
            }
            for j in batch.clone() {
                if j != i && self.levels[j as usize] as usize >= l {
                    cands.push((j, dot(q, row(&self.data, dim, j))));
                }
            }
            out[l] = occlusion_prune(&self.data, dim, i, &mut cands, m, true);
        }
        self.visited.put(visited);
        out
    }

    /// Links nodes `start..end` (already in `data` and `levels`) into the hierarchy.
    fn add_range(&mut self, start: u32, end: u32) {
        let mut s = start;
        if self.enterpoint_node.is_none() && s < end {
            self.enterpoint_node = Some(s);
            self.max_level = self.levels[s as usize] as usize;
            s += 1;
        }
        while s < end {
            let Some(entry) = self.enterpoint_node else { return };
            // Small batches while the graph is small, so early nodes still see each other.
            let e = (s + (s / 8).clamp(1, MAX_BATCH as u32)).min(end);
            let plans: Vec<Vec<Vec<u32>>> = (s..e).into_par_iter().map(|i| self.plan(i, s..e, entry)).collect();
            let mut rev: Vec<(u32, u8, u32)> = Vec::new();
            for (i, plan) in (s..e).zip(&plans) {
                for (l, nbrs) in plan.iter().enumerate() {
                    self.set_links(i, l, nbrs);
                    rev.extend(nbrs.iter().map(|&t| (t, l as u8, i)));
                }
            }
            rev.par_sort_unstable();
            rev.dedup();
            let groups: Vec<&[(u32, u8, u32)]> = rev.chunk_by(|a, b| a.0 == b.0 && a.1 == b.1).collect();
            let updates: Vec<(u32, usize, Vec<u32>)> = groups
                .par_iter()
                .filter_map(|g| {
                    let (t, l) = (g[0].0, g[0].1 as usize);
                    let mut ids = self.links(t, l).to_vec();
                    let before = ids.len();
                    ids.extend(g.iter().map(|x| x.2).filter(|&x| x != t));
                    ids.sort_unstable();
                    ids.dedup();
                    if ids.len() == before {
                        return None;
                    }
                    if ids.len() > self.cap(l) {
                        let mut c = score_against(&self.data, self.dim, t, &ids);
                        ids = occlusion_prune(&self.data, self.dim, t, &mut c, self.cap(l), true);
                    }
                    Some((t, l, ids))
                })
                .collect();
            for (t, l, ids) in updates {
                self.set_links(t, l, &ids);
            }
            for i in s..e {
                let li = self.levels[i as usize] as usize;
                if li > self.max_level {
                    self.max_level = li;
                    self.enterpoint_node = Some(i);
                }
            }
            s = e;
        }
    }

    fn search_one(&self, q: &[f32], k: usize, ef: usize) -> (Vec<(u32, f32)>, SearchStats) {
        let Some(entry) = self.enterpoint_node else { return (Vec::new(), SearchStats::default()) };
        let mut work = Work { scored: 1, links: 0 };
        let mut cur = (entry, dot(q, row(&self.data, self.dim, entry)));
        for l in (1..=self.max_level).rev() {
            cur = self.greedy(q, cur.0, cur.1, l, &mut work);
        }
        let mut visited = self.visited.get(self.n());
        let beam = self.layer_search(q, &[cur.0], ef, 0, &mut visited, &mut work);
        self.visited.put(visited);
        (beam.top(k), stats(work, self.dim))
    }
}

const HNSW_TAG: &[u8; 8] = b"ndl.hnsw";
const HNSW_VERSION: u32 = 1;

impl Hnsw {
    /// Everything but the keys: parameters (checked at load), levels, both graphs and the
    /// entry point. The level generator is not written: it has drawn once per node, so the
    /// load replays that many draws from the seed (and checks them against the levels).
    fn save(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, HNSW_TAG, HNSW_VERSION);
        let p = self.params;
        for v in [p.m, p.ef_construction, p.ef_search, self.dim] {
            w.len(v);
        }
        w.u64(p.seed);
        w.bytes(&self.levels);
        self.level0.save(&mut w);
        self.upper.save(&mut w);
        w.u32(self.enterpoint_node.unwrap_or(u32::MAX));
        w.len(self.max_level);
    }

    fn load(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let mut r = Reader::new("HNSW index", state, HNSW_TAG, HNSW_VERSION)?;
        let mut f = |name: &str| r.len(name, usize::MAX);
        let (m, ef_construction, ef_search, dim) = (f("m")?, f("ef_construction")?, f("ef_search")?, f("dim")?);
        let params = HnswParams { m, ef_construction, ef_search, seed: r.u64("seed")? };
        if params != self.params || dim != self.dim {
            return Err(r.fail(
                "params",
                format!("saved with {params:?} at dim {dim}, this index has {:?} at dim {}", self.params, self.dim),
            ));
        }
        let n = check_batch("keys", keys, self.dim)?;
        let levels = r.bytes_exact("levels", n)?.to_vec();
        // The generator's draws are the levels: replaying them restores its state.
        let mut fresh = Self::new(self.dim, self.params)?;
        for (i, &l) in levels.iter().enumerate() {
            if fresh.random_level() != l {
                return Err(r.fail("levels", format!("node {i} has level {l}, not the one its seed draws")));
            }
        }
        let mut upper_offset = Vec::with_capacity(n);
        let mut rows = 0usize;
        for &l in &levels {
            upper_offset.push(rows as u32);
            rows += l as usize;
        }
        let level0 = FixedGraph::load(&mut r, "level0", 2 * m, n, n)?;
        let upper = FixedGraph::load(&mut r, "upper", m, rows, n)?;
        // A link on layer `l` must reach a node that has layer `l`, or the walk reads another
        // node's row.
        for (v, &lv) in levels.iter().enumerate() {
            for l in 1..=lv as usize {
                let row = upper.get(upper_offset[v] + l as u32 - 1);
                if let Some(&bad) = row.iter().find(|&&u| (levels[u as usize] as usize) < l) {
                    return Err(
                        r.fail("upper", format!("node {v} links on layer {l} to node {bad}, which has no such layer"))
                    );
                }
            }
        }
        let ep = r.u32("enterpoint")?;
        let max_level = r.len("max_level", MAX_LEVEL)?;
        let top = levels.iter().copied().max().map_or(0, usize::from);
        let enterpoint_node = match ep {
            u32::MAX if n == 0 => None,
            e if (e as usize) < n && levels[e as usize] as usize == max_level && max_level == top => Some(e),
            e => {
                return Err(
                    r.fail("enterpoint", format!("node {e} at max_level {max_level} does not fit the {n} levels"))
                );
            }
        };
        r.finish()?;
        *self = Self { data: keys.to_vec(), levels, level0, upper_offset, upper, enterpoint_node, max_level, ..fresh };
        Ok(())
    }
}

impl VectorIndex for Hnsw {
    fn describe(&self) -> String {
        format!("HNSW{}", self.params.m)
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.n()
    }

    fn build(&mut self, keys: &[f32], train_queries: Option<&[f32]>) -> Result<BuildStats> {
        let t = Instant::now();
        let n = check_batch("keys", keys, self.dim)?;
        if let Some(q) = train_queries {
            // Not used (HNSW is the key-only baseline), but bad input is still an error.
            check_batch("train_queries", q, self.dim)?;
        }
        if n == 0 {
            return Err(Error::EmptyKeys { what: "HNSW build keys".into() });
        }
        *self = Self::new(self.dim, self.params)?;
        self.insert(keys)?;
        Ok(BuildStats { vectors: n, train_queries: 0, seconds: t.elapsed().as_secs_f64(), bytes: self.memory_bytes() })
    }

    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>> {
        let n_new = check_batch("keys", keys, self.dim)?;
        let start = self.n();
        if start + n_new > u32::MAX as usize - 1 {
            return Err(Error::invalid("keys", "at most 2^32 - 2 keys"));
        }
        self.data.extend_from_slice(keys);
        for _ in 0..n_new {
            let l = self.random_level();
            self.levels.push(l);
            self.upper_offset.push(self.upper.len() as u32);
            for _ in 0..l {
                self.upper.push_row();
            }
        }
        self.level0.resize(start + n_new);
        self.add_range(start as u32, (start + n_new) as u32);
        Ok(start as u32..(start + n_new) as u32)
    }

    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.n())?;
        let ef = params.effort.unwrap_or(self.params.ef_search).max(k);
        let rows: Vec<_> = queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, ef)).collect();
        Ok(SearchResult::from_rows(k, rows))
    }

    fn memory_bytes(&self) -> usize {
        self.data.len() * 4
            + self.levels.len()
            + self.upper_offset.len() * 4
            + self.level0.bytes()
            + self.upper.bytes()
            + self.visited.bytes()
    }
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        self.save(out);
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        self.load(state, keys)
    }
}
