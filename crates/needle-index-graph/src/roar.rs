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

use crate::beam::{Adjacency, VisitedPool, Work, beam_search};
use crate::dist::{dot, row};
use crate::graph::{FixedGraph, occlusion_prune, score_against};
use crate::knn::exact_knn;

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
}

impl Default for RoarGraphParams {
    fn default() -> Self {
        Self { m: 32, n_q: 100, pivots: 8, ef_construction: 100, ef_search: 128, max_train: 16384, seed: 100 }
    }
}

impl RoarGraphParams {
    fn validate(&self) -> Result<()> {
        positive("m", self.m)?;
        positive("n_q", self.n_q)?;
        positive("pivots", self.pivots)?;
        positive("ef_construction", self.ef_construction)?;
        positive("ef_search", self.ef_search)?;
        positive("max_train", self.max_train)
    }
}

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
        Ok(Self {
            dim,
            params,
            data: Vec::new(),
            graph: FixedGraph::new(params.m),
            entries: Vec::new(),
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

    fn search_one(&self, q: &[f32], k: usize, ef: usize) -> (Vec<(u32, f32)>, SearchStats) {
        let mut visited = self.visited.get(self.n());
        let mut work = Work::default();
        let beam = beam_search(&self.graph, &self.data, self.dim, q, &self.entries, ef, &mut visited, &mut work);
        self.visited.put(visited);
        (beam.top(k), stats(work, self.dim))
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
            for v in 0..n as u32 {
                if reached[v as usize] {
                    continue;
                }
                let parent = if round < 2 {
                    // The keys that score best against `v` are where a search for `v`'s
                    // direction ends up: hang `v` below the best reachable one.
                    let (hits, _) = self.search_one(row(&self.data, self.dim, v), ef, ef);
                    hits.iter().map(|h| h.0).find(|&h| h != v && reached[h as usize])
                } else {
                    (0..n as u32).find(|&p| reached[p as usize] && self.graph.get(p).len() < self.graph.degree())
                };
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
            let mut ids = self.graph.get(nb).to_vec();
            ids.push(id);
            let mut c = score_against(&self.data, dim, nb, &ids);
            let pruned = occlusion_prune(&self.data, dim, nb, &mut c, m, false);
            if pruned.contains(&id) {
                self.graph.set(nb, &pruned_keep_order(&ids, &pruned));
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

/// Keeps `pruned`'s members in the order they had in `ids` (query-aware links first).
fn pruned_keep_order(ids: &[u32], pruned: &[u32]) -> Vec<u32> {
    ids.iter().copied().filter(|i| pruned.contains(i)).collect()
}

/// Adds the sorted `(id, count)` list `new` into the sorted list `acc`.
fn merge_counts(acc: &mut Vec<(u32, u32)>, new: Vec<(u32, u32)>) {
    if new.is_empty() {
        return;
    }
    if acc.is_empty() {
        *acc = new;
        return;
    }
    let old = std::mem::take(acc);
    acc.reserve(old.len() + new.len());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                acc.push((a.0, a.1 + b.1));
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                acc.push(*a);
                i += 1;
            }
            (Some(a), None) => {
                acc.push(*a);
                i += 1;
            }
            (_, Some(b)) => {
                acc.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
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

/// Groups `(node, other)` pairs by node: `out[node]` lists its distinct others with counts.
fn group_pairs(mut pairs: Vec<(u32, u32)>, n: usize) -> Vec<Vec<(u32, u32)>> {
    pairs.par_sort_unstable();
    let mut out: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n];
    for (a, b) in pairs {
        let list = &mut out[a as usize];
        match list.last_mut() {
            Some(last) if last.0 == b => last.1 += 1,
            _ => list.push((b, 1)),
        }
    }
    out
}

impl VectorIndex for RoarGraph {
    fn describe(&self) -> String {
        format!("RoarGraph{}", self.params.m)
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
        let (lists, width) = exact_knn(keys, &queries, dim, p.n_q)?;

        // 2. Projection (co-occurrence): within each query's list, the first `pivots` keys
        // and every other key are candidate neighbours of each other. A key keeps the `m`
        // candidates it co-occurs with most, normalised by both keys' popularity so that keys
        // in every list (hubs) do not take every slot. Pairs are counted chunk by chunk so
        // memory stays at the distinct pairs, not all pairs.
        let w = p.pivots.min(width);
        let mut freq = vec![0u32; n];
        for &x in &lists {
            freq[x as usize] += 1;
        }
        let mut grouped: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n];
        for chunk in lists.chunks(width * 1024) {
            let pairs: Vec<(u32, u32)> = chunk
                .par_chunks(width)
                .flat_map_iter(|l| {
                    (0..w).flat_map(move |j| {
                        l.iter().filter(move |&&x| x != l[j]).flat_map(move |&x| [(x, l[j]), (l[j], x)])
                    })
                })
                .collect();
            let counted = group_pairs(pairs, n);
            grouped.par_iter_mut().zip(counted).for_each(|(acc, new)| merge_counts(acc, new));
        }
        drop(lists);
        let merged: Vec<Vec<u32>> = grouped
            .into_par_iter()
            .enumerate()
            .map(|(v, mut cands)| {
                let vv = row(keys, dim, v as u32);
                let fv = freq[v] as f32;
                let mut sc: Vec<(u32, f32, f32)> = cands
                    .drain(..)
                    .map(|(c, k)| (c, k as f32 / (fv * freq[c as usize] as f32).sqrt(), dot(vv, row(keys, dim, c))))
                    .collect();
                sc.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
                sc.truncate(p.m);
                sc.into_iter().map(|x| x.0).collect()
            })
            .collect();
        for (v, l) in merged.iter().enumerate() {
            self.graph.set(v as u32, l);
        }

        // 4. Connectivity: keys with spare degree (most never were a pivot) get links found by a
        // search on the projected graph with the key as query, plus the reverse links.
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
        for (v, l) in supply.iter().enumerate() {
            for &u in l {
                self.graph.try_push(v as u32, u);
                self.graph.try_push(u, v as u32);
            }
        }

        // 5. Every key reachable from the entry point.
        self.repair_reachability();

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
        Ok(start as u32..(start + n_new) as u32)
    }

    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.n())?;
        let ef = params.effort.unwrap_or(self.params.ef_search).max(k);
        let rows: Vec<_> = queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, ef)).collect();
        Ok(SearchResult::from_rows(k, rows))
    }

    fn memory_bytes(&self) -> usize {
        self.data.len() * 4 + self.graph.bytes() + self.entries.len() * 4 + self.visited.bytes()
    }
}

impl Adjacency for RoarGraph {
    fn neighbors(&self, id: u32) -> &[u32] {
        self.graph.get(id)
    }
}
