//! Graph structure kept apart from vector storage (faiss's `HNSW` vs `storage`): fixed-degree
//! rows in one flat array, so a node's links are one contiguous read.

use crate::beam::Adjacency;
use needle_core::Result;

use crate::dist::{dot, row};
use crate::state::{Reader, Writer};

/// Out-links of `n` nodes, at most `degree` each, in one row-major `n × degree` array.
#[derive(Debug, Clone, Default)]
pub(crate) struct FixedGraph {
    degree: usize,
    counts: Vec<u32>,
    links: Vec<u32>,
}

impl FixedGraph {
    pub fn new(degree: usize) -> Self {
        Self { degree, counts: Vec::new(), links: Vec::new() }
    }

    pub fn degree(&self) -> usize {
        self.degree
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Appends an empty row; returns its index.
    pub fn push_row(&mut self) -> u32 {
        self.counts.push(0);
        self.links.resize(self.links.len() + self.degree, u32::MAX);
        (self.counts.len() - 1) as u32
    }

    pub fn resize(&mut self, n: usize) {
        self.counts.resize(n, 0);
        self.links.resize(n * self.degree, u32::MAX);
    }

    /// Replaces row `i` by the first `degree` of `nbrs`.
    pub fn set(&mut self, i: u32, nbrs: &[u32]) {
        let n = nbrs.len().min(self.degree);
        let s = i as usize * self.degree;
        self.links[s..s + n].copy_from_slice(&nbrs[..n]);
        self.links[s + n..s + self.degree].fill(u32::MAX);
        self.counts[i as usize] = n as u32;
    }

    /// Appends `j` to row `i` if there is room and it is not there yet; true when stored.
    pub fn try_push(&mut self, i: u32, j: u32) -> bool {
        let c = self.counts[i as usize] as usize;
        if c >= self.degree || self.get(i).contains(&j) {
            return false;
        }
        self.links[i as usize * self.degree + c] = j;
        self.counts[i as usize] += 1;
        true
    }

    #[inline]
    pub fn get(&self, i: u32) -> &[u32] {
        let s = i as usize * self.degree;
        &self.links[s..s + self.counts[i as usize] as usize]
    }

    pub fn bytes(&self) -> usize {
        (self.counts.len() + self.links.len()) * 4
    }

    /// Writes the degree, the counts and the link rows.
    pub fn save(&self, w: &mut Writer<'_>) {
        w.len(self.degree);
        w.u32s(&self.counts);
        w.u32s(&self.links);
    }

    /// Reads a graph of `rows` rows of `degree` links written by [`FixedGraph::save`]: every
    /// count at most `degree`, every link below `bound`, unused slots empty.
    pub fn load(r: &mut Reader<'_>, field: &str, degree: usize, rows: usize, bound: usize) -> Result<Self> {
        let d = r.len(field, usize::MAX)?;
        if d != degree {
            return Err(r.fail(field, format!("degree {d}, this index has {degree}")));
        }
        let counts = r.u32s_exact(field, rows)?;
        let links = r.u32s_exact(field, rows.saturating_mul(degree))?;
        for (i, (&c, row)) in counts.iter().zip(links.chunks_exact(degree.max(1))).enumerate() {
            let c = c as usize;
            if c > degree {
                return Err(r.fail(field, format!("row {i} holds {c} links, more than the degree {degree}")));
            }
            if let Some(&bad) = row[..c].iter().find(|&&x| x as usize >= bound) {
                return Err(r.fail(field, format!("row {i} links to {bad}, not below {bound}")));
            }
            if row[c..].iter().any(|&x| x != u32::MAX) {
                return Err(r.fail(field, format!("row {i} has links past its count {c}")));
            }
        }
        Ok(Self { degree, counts, links })
    }

    #[cfg(test)]
    pub fn total_links(&self) -> usize {
        self.counts.iter().map(|&c| c as usize).sum()
    }
}

impl Adjacency for FixedGraph {
    #[inline]
    fn neighbors(&self, id: u32) -> &[u32] {
        self.get(id)
    }
}

/// Occlusion pruning for inner product (the RNG rule of HNSW/NSG with `-<x,y>` as distance).
///
/// `cands` holds `(id, <base, id>)`. Walking them best first, a candidate `c` is dropped when an
/// already kept `s` is "closer" to it than the base is (`<s,c> > <base,c>`): the search reaches
/// `c` through `s` anyway. With `fill`, dropped candidates top the list up to `m` (hnswlib's
/// `keepPrunedConnections`), which keeps out-degrees high where pruning is too eager.
pub(crate) fn occlusion_prune(
    data: &[f32],
    dim: usize,
    base: u32,
    cands: &mut Vec<(u32, f32)>,
    m: usize,
    fill: bool,
) -> Vec<u32> {
    occlusion_prune_by(base, cands, m, fill, |s, c| dot(row(data, dim, s), row(data, dim, c)))
}

/// [`occlusion_prune`] with any inner product of two ids (`dot(s, c)`), e.g. over codes.
pub(crate) fn occlusion_prune_by(
    base: u32,
    cands: &mut Vec<(u32, f32)>,
    m: usize,
    fill: bool,
    dot: impl Fn(u32, u32) -> f32,
) -> Vec<u32> {
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    cands.dedup_by_key(|c| c.0);
    let mut kept: Vec<u32> = Vec::with_capacity(m);
    let mut dropped: Vec<u32> = Vec::new();
    for &(c, s_bc) in cands.iter() {
        if kept.len() >= m {
            break;
        }
        if c == base {
            continue;
        }
        if kept.iter().any(|&s| dot(s, c) > s_bc) {
            if fill {
                dropped.push(c);
            }
        } else {
            kept.push(c);
        }
    }
    if fill {
        let room = m.saturating_sub(kept.len());
        kept.extend(dropped.into_iter().take(room));
    }
    kept
}

/// Scores `ids` against node `base` for [`occlusion_prune`].
pub(crate) fn score_against(data: &[f32], dim: usize, base: u32, ids: &[u32]) -> Vec<(u32, f32)> {
    let vb = row(data, dim, base);
    ids.iter().filter(|&&c| c != base).map(|&c| (c, dot(vb, row(data, dim, c)))).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rows_hold_at_most_degree_and_no_duplicates() {
        let mut g = FixedGraph::new(2);
        g.resize(3);
        assert!(g.try_push(0, 1));
        assert!(!g.try_push(0, 1));
        assert!(g.try_push(0, 2));
        assert!(!g.try_push(0, 2));
        g.set(1, &[0, 2, 0]);
        assert_eq!(g.get(1), &[0, 2]);
        assert_eq!(g.get(2), &[] as &[u32]);
        assert_eq!(g.total_links(), 4);
    }

    #[test]
    fn pruning_drops_occluded_candidates() {
        // base 0 at (1,0); 1 is long and reaches 2 better than the base does; 3 points away.
        let data = [1.0, 0.0, 2.0, 0.5, 0.9, 0.12, 0.0, -1.0];
        let mut c = score_against(&data, 2, 0, &[1, 2, 3]);
        let kept = occlusion_prune(&data, 2, 0, &mut c, 3, false);
        assert_eq!(kept, vec![1, 3]);
        let mut c = score_against(&data, 2, 0, &[1, 2, 3]);
        assert_eq!(occlusion_prune(&data, 2, 0, &mut c, 3, true), vec![1, 3, 2]);
    }
}
