//! The search machinery both graphs share: a bounded sorted candidate pool (the "beam"), a
//! generation-stamped visited set, and best-first beam search over any adjacency.

use std::sync::Mutex;

use crate::dist::{dot, row};

/// One beam entry: a scored vector and whether its neighbours were already expanded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cand {
    pub score: f32,
    pub id: u32,
    pub expanded: bool,
}

/// Strict order of results: larger score first, ties by lower id (as `attention::top_k`).
#[inline]
pub(crate) fn better(a_score: f32, a_id: u32, b_score: f32, b_id: u32) -> bool {
    a_score > b_score || (a_score == b_score && a_id < b_id)
}

/// The best `cap` candidates seen so far, kept sorted best first.
///
/// A sorted array beats a pair of heaps here: `cap` is a few hundred, insertions are rare
/// compared with scans, and the "next unexpanded" cursor is a plain index (NSG's pool).
#[derive(Debug, Clone, Default)]
pub(crate) struct Beam {
    cap: usize,
    items: Vec<Cand>,
}

impl Beam {
    pub fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), items: Vec::with_capacity(cap.max(1) + 1) }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn items(&self) -> &[Cand] {
        &self.items
    }

    /// Worst score held once full; `-inf` while there is room.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.items.len() < self.cap { f32::NEG_INFINITY } else { self.items[self.items.len() - 1].score }
    }

    /// Inserts `(score, id)` if it ranks among the best `cap`; returns its position.
    /// Callers guarantee ids are not already present (the visited set does).
    #[inline]
    pub fn insert(&mut self, score: f32, id: u32) -> Option<usize> {
        if self.items.len() == self.cap {
            let last = self.items[self.cap - 1];
            if !better(score, id, last.score, last.id) {
                return None;
            }
        }
        let pos = self.items.partition_point(|c| better(c.score, c.id, score, id));
        self.items.insert(pos, Cand { score, id, expanded: false });
        self.items.truncate(self.cap);
        Some(pos)
    }

    /// Marks candidate `i` expanded; its id when it was not expanded before.
    #[inline]
    pub fn expand(&mut self, i: usize) -> Option<u32> {
        let c = &mut self.items[i];
        if c.expanded {
            None
        } else {
            c.expanded = true;
            Some(c.id)
        }
    }

    /// The best `k` as `(id, score)`.
    pub fn top(&self, k: usize) -> Vec<(u32, f32)> {
        self.items.iter().take(k).map(|c| (c.id, c.score)).collect()
    }
}

/// A visited set: one bit per id, cleared per search. A walk touches ids at random, and a bit
/// set of a few thousand ids stays in L1 where a word per id (a stamp that clears in O(1))
/// missed the cache on most checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Visited {
    bits: Vec<u64>,
}

impl Visited {
    /// Starts a new search over `n` ids.
    pub fn reset(&mut self, n: usize) {
        self.bits.clear();
        self.bits.resize(n.div_ceil(64), 0);
    }

    /// Marks `id`; true when it was not yet visited in this search.
    #[inline]
    pub fn insert(&mut self, id: u32) -> bool {
        let (word, bit) = (&mut self.bits[id as usize / 64], 1u64 << (id % 64));
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

/// Reusable visited sets, so concurrent searches neither allocate per query nor share one.
#[derive(Debug, Default)]
pub(crate) struct VisitedPool(Mutex<Vec<Visited>>);

impl VisitedPool {
    pub fn get(&self, n: usize) -> Visited {
        let mut v = self.0.lock().map(|mut p| p.pop()).ok().flatten().unwrap_or_default();
        v.reset(n);
        v
    }

    pub fn put(&self, v: Visited) {
        if let Ok(mut p) = self.0.lock() {
            p.push(v);
        }
    }

    pub fn bytes(&self) -> usize {
        self.0.lock().map(|p| p.iter().map(|v| v.bits.len() * 8).sum()).unwrap_or(0)
    }
}

impl Clone for VisitedPool {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Anything that lists the out-neighbours of a node.
pub(crate) trait Adjacency {
    fn neighbors(&self, id: u32) -> &[u32];
}

/// Work counters of one search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Work {
    /// Inner products computed.
    pub scored: u64,
    /// Neighbour-list entries read.
    pub links: u64,
}

/// Best-first beam search: expands the best unexpanded candidate until every candidate in the
/// beam of width `ef` is expanded. `entries` must be valid ids; they are scored here.
///
/// With `pool`, every scored `(id, score)` is also pushed there, so a caller can re-rank all
/// keys the search scored (exactly) and return more results than the beam holds.
#[allow(clippy::too_many_arguments)] // the hot path: plain arguments keep it monomorphic and simple
pub(crate) fn beam_search<G: Adjacency>(
    graph: &G,
    data: &[f32],
    dim: usize,
    query: &[f32],
    entries: &[u32],
    ef: usize,
    visited: &mut Visited,
    work: &mut Work,
    pool: Option<&mut Vec<(u32, f32)>>,
) -> Beam {
    beam_search_by(graph, |id| dot(query, row(data, dim, id)), entries, ef, visited, work, pool)
}

/// [`beam_search`] with any score of a key id (`score(id)`: larger is better), e.g. over
/// compressed copies of the keys.
pub(crate) fn beam_search_by<G: Adjacency>(
    graph: &G,
    mut score: impl FnMut(u32) -> f32,
    entries: &[u32],
    ef: usize,
    visited: &mut Visited,
    work: &mut Work,
    mut pool: Option<&mut Vec<(u32, f32)>>,
) -> Beam {
    let mut beam = Beam::new(ef);
    for &e in entries {
        if visited.insert(e) {
            work.scored += 1;
            let s = score(e);
            if let Some(p) = pool.as_deref_mut() {
                p.push((e, s));
            }
            beam.insert(s, e);
        }
    }
    let mut cur = 0;
    while cur < beam.len() {
        if beam.items[cur].expanded {
            cur += 1;
            continue;
        }
        beam.items[cur].expanded = true;
        let id = beam.items[cur].id;
        let mut next = cur + 1;
        let nbrs = graph.neighbors(id);
        work.links += nbrs.len() as u64;
        for &nb in nbrs {
            if !visited.insert(nb) {
                continue;
            }
            work.scored += 1;
            let s = score(nb);
            if let Some(p) = pool.as_deref_mut() {
                p.push((nb, s));
            }
            if s < beam.threshold() {
                continue;
            }
            if let Some(p) = beam.insert(s, nb) {
                next = next.min(p);
            }
        }
        cur = next;
    }
    beam
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted_truncated(mut xs: Vec<(u32, f32)>, cap: usize) -> Vec<(u32, f32)> {
        xs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        xs.truncate(cap);
        xs
    }

    proptest! {
        #[test]
        fn beam_equals_sort_and_truncate(
            scores in proptest::collection::vec(-4i32..4, 0..200),
            cap in 1usize..40,
        ) {
            // Few distinct scores, so ties are common and their order is checked too; the ids
            // are unique (as the visited set guarantees) but not in insertion order.
            let xs: Vec<(u32, f32)> =
                scores.iter().enumerate().map(|(i, &s)| ((i as u32 * 7919) % 1009, s as f32 * 0.5)).collect();
            let mut beam = Beam::new(cap);
            for &(id, s) in &xs {
                beam.insert(s, id);
            }
            prop_assert_eq!(beam.top(cap), sorted_truncated(xs, cap));
        }

        #[test]
        fn beam_positions_point_at_inserted(scores in proptest::collection::vec(-1000i32..1000, 1..100)) {
            let mut beam = Beam::new(10);
            for (i, &s) in scores.iter().enumerate() {
                if let Some(p) = beam.insert(s as f32, i as u32) {
                    prop_assert_eq!(beam.items()[p].id, i as u32);
                }
            }
        }
    }

    #[test]
    fn visited_marks_each_id_once_per_search() {
        let mut v = Visited::default();
        v.reset(130);
        for id in [0, 63, 64, 129] {
            assert!(v.insert(id) && !v.insert(id), "{id}");
        }
        assert!(v.insert(1));
        v.reset(70);
        assert!(v.insert(63) && v.insert(69) && !v.insert(69));
        v.reset(200);
        assert!(v.insert(199) && v.insert(129));
    }
}
