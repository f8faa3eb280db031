//! RoarGraph (Chen et al., VLDB 2024), the query-aware graph RetrievalAttention
//! (arXiv 2409.10516) searches decode queries with.
//!
//! Decode queries and keys come from different distributions, so a graph whose edges join
//! keys that are close *to each other* routes queries poorly. RoarGraph instead joins keys
//! that are close *for the same queries*: the exact top-`n_q` keys of each training query form
//! a bipartite query→key graph, which is projected onto the keys (each query's best key links
//! to the rest of its list), pruned, made symmetric and made fully reachable.

use std::ops::Range;
use std::time::Instant;

use needle_core::{BuildStats, Error, Result, SearchParams, SearchResult, SearchStats, VectorIndex};
use needle_core::{check_batch, check_search};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::beam::{Adjacency, VisitedPool, Work, beam_search, beam_search_by};
use crate::cluster::{cluster_entries, spherical_kmeans};
use crate::dist::{dot, row};
use crate::graph::{FixedGraph, occlusion_prune};
use crate::knn::exact_knn;
use crate::reduce::{Codes8, Projection};
use crate::state::{Reader, Writer};

/// Extra entry points besides the best key for the mean training query: the keys that appear
/// most often among the training queries' top 10.
const HUB_ENTRIES: usize = 16;

/// Build and search settings of a [`RoarGraph`]; see `ALGO_PARAMS.md` for ranges and costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoarGraphParams {
    /// Maximum out-degree of every key.
    pub m: usize,
    /// Keys per training query in the bipartite graph (its exact top-`n_q`).
    pub n_q: usize,
    /// Beam width when linking keys during the connectivity pass and on insert.
    pub ef_construction: usize,
    /// Default beam width of a search (`SearchParams::effort` overrides it; at least `k`).
    pub ef_search: usize,
    /// Leading keys of each training query's list that are linked with all of its keys
    /// (the query's "pivots"; RoarGraph uses 1).
    pub pivots: usize,
    /// Training queries used at most; more are subsampled (the bipartite build is
    /// `O(train × keys × dim)`).
    pub max_train: usize,
    /// Seed of every random choice (subsampling), for reproducible graphs.
    pub seed: u64,
    /// Clusters of training-query directions (spherical k-means) used to pick entry points
    /// per query; 0 starts every search from the single global entry point.
    pub clusters: usize,
    /// Keys stored per cluster as entry points: those ranking highest, by rank-weighted
    /// frequency, in the training lists of the cluster's queries.
    pub entry_keys: usize,
    /// Clusters whose entry keys seed a search (the best by cosine to the query).
    pub probe: usize,
    /// Dimensions of the query-aware projection the beam walks in (0: the walk scores full
    /// vectors). The keys the walk ends with are re-ranked with their full vectors.
    pub reduce: usize,
    /// With `reduce`: percent of the beam (the best by projected score, at least `k` keys)
    /// re-ranked with full vectors.
    pub rerank: usize,
    /// With `reduce`: bits per projected coordinate the walk reads, 8 (codes with a scale per
    /// key) or 32 (`f32`).
    pub walk_bits: usize,
}

impl Default for RoarGraphParams {
    fn default() -> Self {
        Self {
            m: 32,
            n_q: 100,
            pivots: 8,
            ef_construction: 100,
            ef_search: 128,
            max_train: 16384,
            seed: 100,
            clusters: 0,
            entry_keys: 32,
            probe: 1,
            reduce: 0,
            rerank: 100,
            walk_bits: 8,
        }
    }
}

impl RoarGraphParams {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("m", self.m)?;
        positive("n_q", self.n_q)?;
        positive("pivots", self.pivots)?;
        positive("ef_construction", self.ef_construction)?;
        positive("ef_search", self.ef_search)?;
        positive("max_train", self.max_train)?;
        positive("entry_keys", self.entry_keys)?;
        positive("rerank", self.rerank)?;
        if ![8, 32].contains(&self.walk_bits) {
            return Err(Error::invalid("walk_bits", format!("{}: 8 or 32", self.walk_bits)));
        }
        if self.rerank > 100 {
            return Err(Error::invalid("rerank", format!("{}: a percent of the beam, 1..=100", self.rerank)));
        }
        positive("probe", self.probe)
    }
}

/// Ranks on either side of a key in a training list that count as its co-occurring keys.
const CHAIN: usize = 2;

pub(crate) fn positive(name: &str, v: usize) -> Result<()> {
    if v == 0 { Err(Error::invalid(name, "must be at least 1")) } else { Ok(()) }
}

/// Query-aware graph index for maximum inner product (RoarGraph).
///
/// ```
/// use needle_core::{SearchParams, VectorIndex};
/// use needle_index_graph::RoarGraph;
/// let keys: Vec<f32> = (0..200).flat_map(|i| [(i as f32).cos(), (i as f32).sin()]).collect();
/// let queries: Vec<f32> = (0..50).flat_map(|i| [(i as f32 * 0.3).cos(), 1.0]).collect();
/// let mut index = RoarGraph::new(2)?;
/// index.build(&keys, Some(&queries))?;
/// let hits = index.search(&[0.0, 1.0], 3, &SearchParams::default())?;
/// assert_eq!(hits.labels_of(0).len(), 3);
/// # Ok::<(), needle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RoarGraph {
    dim: usize,
    params: RoarGraphParams,
    data: Vec<f32>,
    graph: FixedGraph,
    /// Search starts here: the best key for the mean training query.
    entries: Vec<u32>,
    /// Unit directions of the training-query clusters, row-major `clusters × dim`.
    centroids: Vec<f32>,
    /// Entry keys of each cluster, row-major `clusters × entry_width`.
    cluster_entries: Vec<u32>,
    entry_width: usize,
    /// The walk's projection (`params.reduce > 0`) and the projected keys the walk reads.
    projection: Option<Projection>,
    walk: WalkKeys,
    visited: VisitedPool,
}

impl RoarGraph {
    /// An empty index with default parameters (`m = 32`).
    pub fn new(dim: usize) -> Result<Self> {
        Self::with_params(dim, RoarGraphParams::default())
    }

    /// An empty index with maximum degree `m` and other parameters at their defaults.
    pub fn with_m(dim: usize, m: usize) -> Result<Self> {
        Self::with_params(dim, RoarGraphParams { m, ..Default::default() })
    }

    /// An empty index with the given parameters.
    pub fn with_params(dim: usize, params: RoarGraphParams) -> Result<Self> {
        positive("dim", dim)?;
        params.validate()?;
        if params.reduce > dim {
            return Err(Error::invalid("reduce", format!("{} dimensions for vectors of {dim}", params.reduce)));
        }
        Ok(Self {
            dim,
            params,
            data: Vec::new(),
            graph: FixedGraph::new(params.m),
            entries: Vec::new(),
            centroids: Vec::new(),
            cluster_entries: Vec::new(),
            entry_width: 0,
            projection: None,
            walk: WalkKeys::None,
            visited: VisitedPool::default(),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &RoarGraphParams {
        &self.params
    }

    /// Out-neighbours of key `id` (for inspection and tests).
    pub fn neighbors(&self, id: u32) -> &[u32] {
        if (id as usize) < self.graph.len() { self.graph.get(id) } else { &[] }
    }

    /// Entry points of every search.
    pub fn entry_points(&self) -> &[u32] {
        &self.entries
    }

    fn n(&self) -> usize {
        self.data.len() / self.dim
    }

    /// Clusters used for entry points (0 when the build made none).
    pub fn n_clusters(&self) -> usize {
        self.centroids.len() / self.dim
    }

    /// Entry keys of cluster `c` (empty for an unknown cluster).
    pub fn cluster_entry_points(&self, c: usize) -> &[u32] {
        if c < self.n_clusters() {
            &self.cluster_entries[c * self.entry_width..(c + 1) * self.entry_width]
        } else {
            &[]
        }
    }

    /// Entry points for query `q`: the global entry, then the entry keys of the `probe`
    /// clusters whose direction is closest to `q`'s. Scoring the centroids counts as work.
    fn entries_for(&self, q: &[f32], work: &mut Work) -> Vec<u32> {
        let c = self.n_clusters();
        if c == 0 {
            return self.entries.clone();
        }
        work.scored += c as u64;
        let mut best: Vec<(f32, usize)> =
            self.centroids.chunks_exact(self.dim).enumerate().map(|(i, cv)| (dot(q, cv), i)).collect();
        let probe = self.params.probe.min(c);
        best.select_nth_unstable_by(probe - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        best.truncate(probe);
        best.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out = self.entries.clone();
        for &(_, ci) in &best {
            out.extend_from_slice(self.cluster_entry_points(ci));
        }
        out
    }

    fn search_one(&self, q: &[f32], k: usize, ef: usize) -> (Vec<(u32, f32)>, SearchStats) {
        let mut visited = self.visited.get(self.n());
        let mut work = Work::default();
        let entries = self.entries_for(q, &mut work);
        if ef >= k {
            let beam = beam_search(&self.graph, &self.data, self.dim, q, &entries, ef, &mut visited, &mut work, None);
            self.visited.put(visited);
            return (beam.top(k), stats(work, self.dim));
        }
        // A beam narrower than `k`: re-rank everything the search scored, exactly.
        let mut pool = Vec::new();
        beam_search(&self.graph, &self.data, self.dim, q, &entries, ef, &mut visited, &mut work, Some(&mut pool));
        self.visited.put(visited);
        let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if pool.len() > k {
            pool.select_nth_unstable_by(k - 1, better);
            pool.truncate(k);
        }
        pool.sort_unstable_by(better);
        (pool, stats(work, self.dim))
    }

    /// A walk over the projected keys, then an exact re-rank of the best `max(ef·rerank%, k)`
    /// keys it scored. Projected scores count as codes; projecting the query counts as `reduce` full
    /// inner products (it reads `reduce` rows of `dim` floats), unless the maps are the identity.
    fn search_reduced(&self, p: &Projection, q: &[f32], k: usize, ef: usize) -> (Vec<(u32, f32)>, SearchStats) {
        let mut qp = Vec::with_capacity(p.r);
        p.query_into(q, &mut qp);
        let mut visited = self.visited.get(self.n());
        let mut work = Work::default();
        let entries = self.entries_for(q, &mut work);
        let centroids = work.scored;
        work.scored = 0;
        let mut pool = Vec::new();
        let (g, pool_ref) = (&self.graph, Some(&mut pool));
        let code_bytes = match &self.walk {
            WalkKeys::F32(x) => {
                beam_search_by(g, |i| dot(&qp, row(x, p.r, i)), &entries, ef, &mut visited, &mut work, pool_ref);
                4 * p.r as u64
            }
            WalkKeys::Codes(c) => {
                beam_search_by(g, |i| c.score(&qp, i), &entries, ef, &mut visited, &mut work, pool_ref);
                p.r as u64 + 4
            }
            WalkKeys::None => 0,
        };
        self.visited.put(visited);
        let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let keep = (ef * self.params.rerank).div_ceil(100).max(k);
        if pool.len() > keep {
            pool.select_nth_unstable_by(keep - 1, better);
            pool.truncate(keep);
        }
        for c in &mut pool {
            c.1 = dot(q, row(&self.data, self.dim, c.0));
        }
        pool.sort_unstable_by(better);
        let projecting = if p.is_identity() { 0 } else { p.r as u64 };
        let full = centroids + projecting + pool.len() as u64;
        pool.truncate(k);
        let stats = SearchStats {
            full_scored: full,
            codes_scored: work.scored,
            bytes_read: full * self.dim as u64 * 4 + work.scored * code_bytes + work.links * 4,
        };
        (pool, stats)
    }

    /// Appends the walk's copies of `keys` (rows just added to `data`), when there is a projection.
    fn push_walk(&mut self, keys: &[f32]) {
        let Some(p) = &self.projection else { return };
        let mut projected = Vec::with_capacity(keys.len() / self.dim * p.r);
        p.keys_into(keys, &mut projected);
        if matches!(self.walk, WalkKeys::None) {
            self.walk =
                if self.params.walk_bits == 8 { WalkKeys::Codes(Codes8::new(p.r)) } else { WalkKeys::F32(Vec::new()) };
        }
        match &mut self.walk {
            WalkKeys::F32(x) => x.extend_from_slice(&projected),
            WalkKeys::Codes(c) => c.push(&projected),
            WalkKeys::None => {}
        }
    }

    /// Links every key not reachable from the entry points, so no key is lost to a search.
    fn repair_reachability(&mut self) {
        let n = self.n();
        let ef = self.params.ef_construction;
        // `hang_below` never orphans a reached key, so one round suffices; the second only
        // confirms (and guards against a logic slip).
        for round in 0..3 {
            let mut reached = vec![false; n];
            let mut stack = self.entries.clone();
            mark_from(&self.graph, &mut reached, &mut stack);
            if reached.iter().all(|&r| r) {
                return;
            }
            // Parents are found in parallel against the reached set frozen here; hanging a key
            // below a reached parent keeps every reached key reached, so they stay valid.
            let lost: Vec<u32> = (0..n as u32).filter(|&v| !reached[v as usize]).collect();
            let parents: Vec<Option<u32>> = if round < 2 {
                lost.par_iter()
                    .map(|&v| {
                        // The keys that score best against `v` are where a search for `v`'s
                        // direction ends up: hang `v` below the best reachable one.
                        let (hits, _) = self.search_one(row(&self.data, self.dim, v), ef, ef);
                        hits.iter().map(|h| h.0).find(|&h| h != v && reached[h as usize])
                    })
                    .collect()
            } else {
                vec![None; lost.len()]
            };
            for (&v, parent) in lost.iter().zip(parents) {
                if reached[v as usize] {
                    continue;
                }
                let parent = parent.or_else(|| {
                    (0..n as u32).find(|&p| reached[p as usize] && self.graph.get(p).len() < self.graph.degree())
                });
                let Some(parent) = parent.or(self.entries.first().copied()) else { return };
                self.hang_below(parent, v);
                stack.push(v);
                mark_from(&self.graph, &mut reached, &mut stack);
            }
        }
    }

    /// Inserts key `id` (already in `data` and `graph`) by searching for its neighbours.
    fn link_new(&mut self, id: u32) {
        let (m, ef, dim) = (self.params.m, self.params.ef_construction, self.dim);
        let (hits, _) = self.search_one(row(&self.data, dim, id), ef, ef);
        let mut cands: Vec<(u32, f32)> = hits.into_iter().filter(|h| h.0 != id).collect();
        let kept = occlusion_prune(&self.data, dim, id, &mut cands, m, true);
        self.graph.set(id, &kept);
        let mut linked_in = false;
        for &nb in &kept {
            if self.graph.try_push(nb, id) {
                linked_in = true;
                continue;
            }
            // A full list: the new key takes the last (lowest-priority) slot if it scores higher
            // against `nb` than the key there. Lists keep their query-aware links first, so those
            // survive; re-pruning the whole list instead (as the build does) costs `m²` inner
            // products per neighbour, which made a decode-time insert dearer than a search.
            let mut ids = self.graph.get(nb).to_vec();
            let base = row(&self.data, dim, nb);
            if let Some(last) = ids.last_mut()
                && dot(base, row(&self.data, dim, id)) > dot(base, row(&self.data, dim, *last))
            {
                *last = id;
                self.graph.set(nb, &ids);
                linked_in = true;
            }
        }
        if !linked_in {
            // Pruning rejected every reverse link: force one so the new key is reachable.
            let parent = kept.first().copied().or(self.entries.first().copied());
            if let Some(p) = parent {
                self.hang_below(p, id);
            }
        }
    }

    /// Links `parent → v` for a `v` nothing reachable depends on. A full row gives up its last
    /// link `u`, which moves below `v` (`parent → v → u`), so nothing reachable is lost.
    fn hang_below(&mut self, parent: u32, v: u32) {
        if self.graph.get(parent).contains(&v) || self.graph.try_push(parent, v) {
            return;
        }
        let mut links = self.graph.get(parent).to_vec();
        let Some(u) = links.pop() else { return };
        links.push(v);
        self.graph.set(parent, &links);
        if self.graph.get(v).contains(&u) || self.graph.try_push(v, u) {
            return;
        }
        let mut own = self.graph.get(v).to_vec();
        own.pop();
        own.push(u);
        self.graph.set(v, &own);
    }
}

/// What a built [`RoarGraph`] hands to the compact index ([`crate::compact`]): everything but
/// its copy of the keys.
pub(crate) struct RoarParts {
    pub graph: FixedGraph,
    pub entries: Vec<u32>,
    pub centroids: Vec<f32>,
    pub cluster_entries: Vec<u32>,
    pub entry_width: usize,
}

impl RoarGraph {
    /// The graph and entry points, dropping the keys.
    pub(crate) fn into_parts(self) -> RoarParts {
        RoarParts {
            graph: self.graph,
            entries: self.entries,
            centroids: self.centroids,
            cluster_entries: self.cluster_entries,
            entry_width: self.entry_width,
        }
    }
}

/// The keys as the projected walk reads them.
#[derive(Debug, Clone)]
enum WalkKeys {
    /// No projection.
    None,
    /// `n × reduce` floats.
    F32(Vec<f32>),
    /// `n × reduce` 8-bit codes.
    Codes(Codes8),
}

impl WalkKeys {
    fn bytes(&self) -> usize {
        match self {
            WalkKeys::None => 0,
            WalkKeys::F32(x) => x.len() * 4,
            WalkKeys::Codes(c) => c.bytes(),
        }
    }
}

/// Picks at most `m` neighbours of key `v` from `cands` (best first by co-occurrence).
///
/// RNG rule in the key space (squared L2), over the best `3·m` candidates: `c` is dropped when
/// an already kept `s` is closer to it than `v` is, since a search reaches `c` through `s`.
/// Pruning by L2 rather than inner product keeps neighbours in diverse directions; dropped
/// candidates then fill the row up to `m`, best first, so degrees stay high.
fn select(keys: &[f32], dim: usize, norms: &[f32], v: u32, cands: &[(u32, f32)], m: usize) -> Vec<u32> {
    if cands.len() <= m {
        return cands.iter().map(|c| c.0).collect();
    }
    let vv = row(keys, dim, v);
    let pool = &cands[..cands.len().min(3 * m)];
    let mut kept: Vec<u32> = Vec::with_capacity(m);
    let mut dropped: Vec<u32> = Vec::new();
    for &(c, _) in pool {
        if kept.len() >= m {
            break;
        }
        let vc = row(keys, dim, c);
        let d_vc = norms[v as usize] + norms[c as usize] - 2.0 * dot(vv, vc);
        let occluded =
            kept.iter().any(|&s| norms[s as usize] + norms[c as usize] - 2.0 * dot(row(keys, dim, s), vc) < d_vc);
        if occluded {
            dropped.push(c);
        } else {
            kept.push(c);
        }
    }
    let room = m.saturating_sub(kept.len());
    kept.extend(dropped.into_iter().take(room));
    kept
}

/// Where each key occurs in the training lists: `(query, rank)` pairs, grouped by key (CSR).
struct Occurrences {
    start: Vec<u32>,
    items: Vec<(u32, u32)>,
}

impl Occurrences {
    fn new(lists: &[u32], width: usize, n: usize) -> Self {
        let mut start = vec![0u32; n + 1];
        for &x in lists {
            start[x as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut items = vec![(0u32, 0u32); lists.len()];
        for (q, l) in lists.chunks_exact(width).enumerate() {
            for (r, &x) in l.iter().enumerate() {
                items[fill[x as usize] as usize] = (q as u32, r as u32);
                fill[x as usize] += 1;
            }
        }
        Self { start, items }
    }

    fn of(&self, v: usize) -> &[(u32, u32)] {
        &self.items[self.start[v] as usize..self.start[v + 1] as usize]
    }
}

fn mark_from(g: &FixedGraph, reached: &mut [bool], stack: &mut Vec<u32>) {
    for &s in stack.iter() {
        reached[s as usize] = true;
    }
    while let Some(u) = stack.pop() {
        for &v in g.get(u) {
            if !reached[v as usize] {
                reached[v as usize] = true;
                stack.push(v);
            }
        }
    }
}

pub(crate) fn stats(work: Work, dim: usize) -> SearchStats {
    SearchStats {
        full_scored: work.scored,
        codes_scored: 0,
        bytes_read: work.scored * (dim as u64 * 4) + work.links * 4,
    }
}

/// Up to `max` rows of `xs` (row-major, `dim` wide), chosen without replacement by `seed`.
pub(crate) fn sample_rows(xs: &[f32], dim: usize, max: usize, seed: u64) -> Vec<f32> {
    let n = xs.len() / dim;
    if n <= max {
        return xs.to_vec();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, n, max).into_vec();
    idx.sort_unstable();
    idx.iter().flat_map(|&i| xs[i * dim..(i + 1) * dim].iter().copied()).collect()
}

const ROAR_TAG: &[u8; 8] = b"ndl.roar";
const ROAR_VERSION: u32 = 1;

impl RoarGraphParams {
    pub(crate) fn save(&self, w: &mut Writer<'_>) {
        for v in [self.m, self.n_q, self.ef_construction, self.ef_search, self.pivots, self.max_train] {
            w.len(v);
        }
        w.u64(self.seed);
        for v in [self.clusters, self.entry_keys, self.probe] {
            w.len(v);
        }
    }

    pub(crate) fn load(r: &mut Reader<'_>) -> Result<Self> {
        let mut f = |name: &str| r.len(name, usize::MAX);
        let (m, n_q, ef_construction, ef_search) = (f("m")?, f("n_q")?, f("ef_construction")?, f("ef_search")?);
        let (pivots, max_train) = (f("pivots")?, f("max_train")?);
        let seed = r.u64("seed")?;
        let mut f = |name: &str| r.len(name, usize::MAX);
        let (clusters, entry_keys, probe) = (f("clusters")?, f("entry_keys")?, f("probe")?);
        Ok(Self {
            m,
            n_q,
            ef_construction,
            ef_search,
            pivots,
            max_train,
            seed,
            clusters,
            entry_keys,
            probe,
            reduce: 0,
            rerank: 100,
            walk_bits: 8,
        })
    }
}

impl RoarGraph {
    /// Everything but the keys: parameters (checked at load), the graph, entry points and
    /// cluster entries.
    fn save(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out, ROAR_TAG, ROAR_VERSION);
        self.params.save(&mut w);
        w.len(self.dim);
        w.len(self.n());
        self.graph.save(&mut w);
        w.u32s(&self.entries);
        w.f32s(&self.centroids);
        w.len(self.entry_width);
        w.u32s(&self.cluster_entries);
        // Last and only when on, so states saved before the projection existed still load.
        if let Some(p) = &self.projection {
            w.len(self.params.rerank);
            w.len(self.params.walk_bits);
            p.save(&mut w);
        }
    }

    fn load(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let mut r = Reader::new("RoarGraph index", state, ROAR_TAG, ROAR_VERSION)?;
        let mut params = RoarGraphParams::load(&mut r)?;
        let dim = self.dim;
        r.expect_dim("dim", dim)?;
        let n = r.expect_rows("n", keys, dim)?;
        let graph = FixedGraph::load(&mut r, "graph", params.m, n, n)?;
        let entries = r.u32s("entries", n)?;
        r.check_below("entries", &entries, n)?;
        let centroids = r.f32s("centroids", params.clusters.saturating_mul(dim))?;
        if !centroids.len().is_multiple_of(dim) {
            return Err(r.fail("centroids", format!("{} floats are not rows of {dim}", centroids.len())));
        }
        let entry_width = r.len("entry_width", n)?;
        let cluster_entries = r.u32s_exact("cluster_entries", (centroids.len() / dim).saturating_mul(entry_width))?;
        r.check_below("cluster_entries", &cluster_entries, n)?;
        // The re-rank share is only saved (and used) with a projection.
        let projection = if r.remaining() > 0 {
            params.rerank = r.len("rerank", 100)?;
            params.walk_bits = r.len("walk_bits", 32)?;
            Some(Projection::load(&mut r, dim)?)
        } else {
            params.rerank = self.params.rerank;
            params.walk_bits = self.params.walk_bits;
            None
        };
        params.reduce = projection.as_ref().map_or(0, |p| p.r);
        if params != self.params {
            return Err(r.fail("params", format!("saved with {params:?}, this index has {:?}", self.params)));
        }
        r.finish()?;
        self.projection = projection;
        self.walk = WalkKeys::None;
        self.push_walk(keys);
        self.data = keys.to_vec();
        self.graph = graph;
        self.entries = entries;
        self.centroids = centroids;
        self.entry_width = entry_width;
        self.cluster_entries = cluster_entries;
        self.visited = VisitedPool::default();
        Ok(())
    }
}

impl VectorIndex for RoarGraph {
    fn describe(&self) -> String {
        match self.params.reduce {
            0 => format!("RoarGraph{}", self.params.m),
            r => {
                let p = if self.params.rerank == 100 { String::new() } else { format!("p{}", self.params.rerank) };
                let f = if self.params.walk_bits == 32 { "f" } else { "" };
                format!("RoarGraph{}r{r}{p}{f}", self.params.m)
            }
        }
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
        if n == 0 {
            return Err(Error::EmptyKeys { what: "RoarGraph build keys".into() });
        }
        if n > u32::MAX as usize - 1 {
            return Err(Error::invalid("keys", "at most 2^32 - 2 keys"));
        }
        let given = match train_queries {
            Some(q) => check_batch("train_queries", q, self.dim)?,
            None => 0,
        };
        let p = self.params;
        let dim = self.dim;
        let (queries, used) = match train_queries {
            Some(q) if given > 0 => {
                let s = sample_rows(q, dim, p.max_train, p.seed);
                let used = s.len() / dim;
                (s, used)
            }
            _ => {
                tracing::warn!(
                    keys = n,
                    "RoarGraph built without training queries: using keys as queries, so the graph is not \
                     query-aware and out-of-distribution queries will scan more keys"
                );
                (sample_rows(keys, dim, p.max_train, p.seed), 0)
            }
        };
        let n_train = queries.len() / dim;
        self.data = keys.to_vec();
        self.graph = FixedGraph::new(p.m);
        self.graph.resize(n);

        // Entry point: the best key for the mean training query, where decode queries start.
        let mut mean = vec![0.0f32; dim];
        for q in queries.chunks_exact(dim) {
            mean.iter_mut().zip(q).for_each(|(m, x)| *m += x / n_train as f32);
        }
        let entry = (0..n as u32)
            .map(|i| (i, dot(&mean, row(keys, dim, i))))
            .fold((0u32, f32::NEG_INFINITY), |b, c| if c.1 > b.1 { c } else { b })
            .0;
        self.entries = vec![entry];

        // 1. Bipartite graph: exact top-n_q keys per training query.
        let t_knn = Instant::now();
        let (lists, width) = exact_knn(keys, &queries, dim, p.n_q)?;
        let knn_s = t_knn.elapsed().as_secs_f64();
        // More entry points: the keys most often among training queries' top 10 ("hubs").
        // A single entry can sit in a region a low-beam search never leaves (seen on a real
        // 32K trace: one head at recall 0 with ef <= 200, 0.998 with ef = 400).
        if width > 0 {
            let mut count = vec![0u32; n];
            for l in lists.chunks_exact(width) {
                for &k in l.iter().take(10) {
                    count[k as usize] += 1;
                }
            }
            let mut hubs: Vec<u32> = (0..n as u32).filter(|&i| count[i as usize] > 0 && i != entry).collect();
            hubs.sort_unstable_by(|a, b| count[*b as usize].cmp(&count[*a as usize]).then(a.cmp(b)));
            self.entries.extend(hubs.into_iter().take(HUB_ENTRIES));
        }

        // 2. Entry points per query direction: clusters of training queries and their keys.
        let t_cl = Instant::now();
        self.centroids.clear();
        self.cluster_entries.clear();
        self.entry_width = 0;
        if p.clusters > 0 {
            let (centroids, assign) = spherical_kmeans(&queries, dim, p.clusters, p.seed);
            let (c, e) = cluster_entries(&centroids, &assign, &lists, width, n, dim, p.entry_keys);
            if !c.is_empty() {
                self.entry_width = e.len() / (c.len() / dim);
                self.centroids = c;
                self.cluster_entries = e;
            }
        }
        let cluster_s = t_cl.elapsed().as_secs_f64();

        // 3. Projection (co-occurrence): within each query's list, the first `pivots` keys
        // and every other key are candidate neighbours of each other. A key ranks candidates by
        // how often they share lists, normalised by both keys' popularity so that keys in every
        // list (hubs) do not take every slot, then keeps a diverse subset (see `select`). Pairs
        // are counted chunk by chunk so memory stays at the distinct pairs, not all pairs.
        let t_proj = Instant::now();
        let w = p.pivots.min(width);
        let occ = Occurrences::new(&lists, width.max(1), n);
        let norms: Vec<f32> = keys.chunks_exact(dim).map(|k| dot(k, k)).collect();
        let merged: Vec<Vec<u32>> = (0..n)
            .into_par_iter()
            .map_init(
                || (vec![0u32; n], Vec::<u32>::new()),
                |(count, touched), v| {
                    // Co-occurrence counts of `v`: as a pivot of a list it pairs with the whole
                    // list; anywhere in a list it pairs with the list's pivots.
                    for &(q, r) in occ.of(v) {
                        let l = &lists[q as usize * width..(q as usize + 1) * width];
                        let others: &[u32] = if (r as usize) < w { l } else { &l[..w] };
                        for &x in others {
                            if x != v as u32 {
                                if count[x as usize] == 0 {
                                    touched.push(x);
                                }
                                count[x as usize] += 1;
                            }
                        }
                        // Keys ranked next to `v` score alike for this query: a short chain
                        // through each list keeps non-pivot keys linked to each other.
                        let r = r as usize;
                        for &x in &l[r.saturating_sub(CHAIN)..(r + CHAIN + 1).min(l.len())] {
                            if x != v as u32 {
                                if count[x as usize] == 0 {
                                    touched.push(x);
                                }
                                count[x as usize] += 1;
                            }
                        }
                        if r < w {
                            for &x in &l[..w] {
                                if x != v as u32 {
                                    count[x as usize] += 1;
                                }
                            }
                        }
                    }
                    let fv = occ.of(v).len() as f32;
                    let mut sc: Vec<(u32, f32)> = touched
                        .iter()
                        .map(|&c| (c, count[c as usize] as f32 / (fv * occ.of(c as usize).len() as f32).sqrt()))
                        .collect();
                    for &c in touched.iter() {
                        count[c as usize] = 0;
                    }
                    touched.clear();
                    // Ties (duplicate keys) go to the nearest ids, so twins form a chain
                    // instead of all pointing at the same few lowest ids.
                    let gap = |c: u32| (c as i64 - v as i64).unsigned_abs();
                    sc.sort_by(|a, b| b.1.total_cmp(&a.1).then(gap(a.0).cmp(&gap(b.0))).then(a.0.cmp(&b.0)));
                    select(keys, dim, &norms, v as u32, &sc, p.m)
                },
            )
            .collect();
        drop(lists);
        for (v, l) in merged.iter().enumerate() {
            self.graph.set(v as u32, l);
        }
        // Reverse links where rows have room: a key reached from a neighbour can step back.
        for (v, l) in merged.iter().enumerate() {
            for &u in l {
                self.graph.try_push(u, v as u32);
            }
        }
        drop(merged);
        let project_s = t_proj.elapsed().as_secs_f64();

        // 4. Connectivity: keys with spare degree (most never were a pivot) get links found by a
        // search on the projected graph with the key as query, plus the reverse links.
        let t_conn = Instant::now();
        let supply: Vec<Vec<u32>> = (0..n as u32)
            .into_par_iter()
            .map(|v| {
                if self.graph.get(v).len() >= p.m / 2 {
                    return Vec::new();
                }
                let (hits, _) = self.search_one(row(keys, dim, v), p.ef_construction, p.ef_construction);
                let mut c: Vec<(u32, f32)> = hits.into_iter().filter(|h| h.0 != v).collect();
                occlusion_prune(keys, dim, v, &mut c, p.m, true)
            })
            .collect();
        let searched = supply.iter().filter(|l| !l.is_empty()).count();
        for (v, l) in supply.iter().enumerate() {
            for &u in l {
                self.graph.try_push(v as u32, u);
                self.graph.try_push(u, v as u32);
            }
        }
        let connect_s = t_conn.elapsed().as_secs_f64();

        // 5. Every key reachable from the entry point.
        let t_rep = Instant::now();
        self.repair_reachability();

        // 6. The walk's projection, learned from the same queries.
        self.projection = None;
        self.walk = WalkKeys::None;
        if p.reduce > 0 {
            self.projection = Some(Projection::fit(keys, &queries, dim, p.reduce)?);
            self.push_walk(keys);
        }
        tracing::debug!(
            keys = n,
            train = n_train,
            knn_s,
            cluster_s,
            project_s,
            connect_s,
            connect_searched = searched,
            repair_s = t_rep.elapsed().as_secs_f64(),
            total_s = t.elapsed().as_secs_f64(),
            "RoarGraph build stages"
        );

        Ok(BuildStats {
            vectors: n,
            train_queries: used,
            seconds: t.elapsed().as_secs_f64(),
            bytes: self.memory_bytes(),
        })
    }

    fn insert(&mut self, keys: &[f32]) -> Result<Range<u32>> {
        let n_new = check_batch("keys", keys, self.dim)?;
        let start = self.n();
        if start + n_new > u32::MAX as usize - 1 {
            return Err(Error::invalid("keys", "at most 2^32 - 2 keys"));
        }
        if n_new == 0 {
            return Ok(start as u32..start as u32);
        }
        if start == 0 {
            self.build(keys, None)?;
            return Ok(0..n_new as u32);
        }
        for r in keys.chunks_exact(self.dim) {
            self.data.extend_from_slice(r);
            let id = self.graph.push_row();
            self.link_new(id);
        }
        self.push_walk(keys);
        Ok(start as u32..(start + n_new) as u32)
    }

    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.n())?;
        // An effort below `k` is a narrower beam whose scored keys are re-ranked (see `search_one`).
        let ef = params.effort.unwrap_or(self.params.ef_search).max(1);
        let rows: Vec<_> = match &self.projection {
            Some(p) => queries.par_chunks_exact(self.dim).map(|q| self.search_reduced(p, q, k, ef)).collect(),
            None => queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, ef)).collect(),
        };
        Ok(SearchResult::from_rows(k, rows))
    }

    fn memory_bytes(&self) -> usize {
        self.data.len() * 4
            + self.graph.bytes()
            + (self.entries.len() + self.cluster_entries.len() + self.centroids.len()) * 4
            + self.walk.bytes()
            + self.projection.as_ref().map_or(0, Projection::floats) * 4
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

impl Adjacency for RoarGraph {
    fn neighbors(&self, id: u32) -> &[u32] {
        self.graph.get(id)
    }
}
