//! Per-query entry points: training queries clustered by direction (spherical k-means), each
//! cluster remembering the keys its queries rank highest. A search scores the centroids, picks
//! the closest clusters and starts from their keys, which are usually already among the
//! query's best, so the beam spends its budget near the answer instead of walking to it.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::knn::all_scores;

/// Lloyd iterations of the spherical k-means (it converges enough for routing in a few).
const ITERS: usize = 6;

/// Unit centroids (`c × dim`) and the cluster of each query (`None` for a zero query).
pub(crate) fn spherical_kmeans(queries: &[f32], dim: usize, c: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let t = queries.len() / dim;
    let c = c.min(t);
    if c == 0 {
        return (Vec::new(), Vec::new());
    }
    let unit: Vec<f32> = queries.chunks_exact(dim).flat_map(normalized).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut idx = rand::seq::index::sample(&mut rng, t, c).into_vec();
    idx.sort_unstable();
    let mut centroids: Vec<f32> = idx.iter().flat_map(|&i| unit[i * dim..(i + 1) * dim].iter().copied()).collect();
    let mut assign = vec![0u32; t];
    for it in 0..=ITERS {
        let scores: Vec<f32> = unit.par_chunks(256 * dim).flat_map_iter(|qs| all_scores(&centroids, qs, dim)).collect();
        for (a, row) in assign.iter_mut().zip(scores.chunks_exact(c)) {
            *a = argmax(row) as u32;
        }
        if it == ITERS {
            break;
        }
        let mut sums = vec![0.0f32; c * dim];
        for (q, &a) in unit.chunks_exact(dim).zip(&assign) {
            let s = &mut sums[a as usize * dim..(a as usize + 1) * dim];
            s.iter_mut().zip(q).for_each(|(x, y)| *x += y);
        }
        for (ci, s) in sums.chunks_exact(dim).enumerate() {
            if s.iter().any(|&x| x != 0.0) {
                centroids[ci * dim..(ci + 1) * dim].copy_from_slice(&normalized(s));
            }
        }
    }
    (centroids, assign)
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let len = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if len > 0.0 { v.iter().map(|x| x / len).collect() } else { v.to_vec() }
}

/// For each cluster, the `width` keys with the highest rank-weighted frequency in its
/// queries' lists (`lists` is `t × list_len`, best first). Clusters without queries are
/// dropped: returns the kept centroids and their entry rows (`clusters × width`).
pub(crate) fn cluster_entries(
    centroids: &[f32],
    assign: &[u32],
    lists: &[u32],
    list_len: usize,
    n_keys: usize,
    dim: usize,
    width: usize,
) -> (Vec<f32>, Vec<u32>) {
    let c = centroids.len() / dim;
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); c];
    for (q, &a) in assign.iter().enumerate() {
        members[a as usize].push(q as u32);
    }
    let width = width.min(n_keys).min(list_len.max(1));
    let rows: Vec<Option<Vec<u32>>> = members
        .par_iter()
        .map_init(
            || (vec![0u32; n_keys], Vec::<u32>::new()),
            |(weight, touched), qs| {
                if qs.is_empty() || list_len == 0 {
                    return None;
                }
                for &q in qs {
                    let l = &lists[q as usize * list_len..(q as usize + 1) * list_len];
                    for (rank, &k) in l.iter().enumerate() {
                        if weight[k as usize] == 0 {
                            touched.push(k);
                        }
                        weight[k as usize] += (list_len - rank) as u32;
                    }
                }
                let mut ranked: Vec<(u32, u32)> = touched.iter().map(|&k| (weight[k as usize], k)).collect();
                for &k in touched.iter() {
                    weight[k as usize] = 0;
                }
                touched.clear();
                ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                ranked.truncate(width);
                Some(ranked.into_iter().map(|x| x.1).collect())
            },
        )
        .collect();
    let mut kept_c = Vec::new();
    let mut entries = Vec::new();
    for (ci, row) in rows.into_iter().enumerate() {
        if let Some(r) = row.filter(|r| r.len() == width) {
            kept_c.extend_from_slice(&centroids[ci * dim..(ci + 1) * dim]);
            entries.extend(r);
        }
    }
    (kept_c, entries)
}
