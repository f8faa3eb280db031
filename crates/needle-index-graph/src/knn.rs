//! Exact top-n keys for each training query: the bipartite query→key graph of RoarGraph.

use needle_core::{Result, attention::top_k};
use rayon::prelude::*;

use crate::dist::dot;

/// Queries scored together: each key is read once per block while the block's queries stay
/// in L1 (16 × 64 floats = 4 KiB), so memory traffic drops by the block size.
const QUERY_BLOCK: usize = 16;

/// Row-major `n_queries × n` lists of key ids, best first, `n = min(n_q, keys)`.
pub(crate) fn exact_knn(keys: &[f32], queries: &[f32], dim: usize, n_q: usize) -> Result<(Vec<u32>, usize)> {
    let n_keys = keys.len() / dim;
    let n = n_q.min(n_keys);
    let blocks: Vec<Vec<u32>> = queries
        .par_chunks(QUERY_BLOCK * dim)
        .map(|block| {
            let nb = block.len() / dim;
            let mut scores = vec![0.0f32; nb * n_keys];
            for (j, key) in keys.chunks_exact(dim).enumerate() {
                for (qi, q) in block.chunks_exact(dim).enumerate() {
                    scores[qi * n_keys + j] = dot(q, key);
                }
            }
            let mut out = Vec::with_capacity(nb * n);
            for qi in 0..nb {
                out.extend(top_k(&scores[qi * n_keys..(qi + 1) * n_keys], n)?.into_iter().map(|(id, _)| id));
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok((blocks.concat(), n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn knn_lists_are_exact() {
        let keys = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, -1.0, 0.0];
        let queries: Vec<f32> = (0..40).flat_map(|i| [(i as f32).cos(), (i as f32).sin()]).collect();
        let (lists, n) = exact_knn(&keys, &queries, 2, 2).unwrap();
        assert_eq!(n, 2);
        for (qi, q) in queries.chunks_exact(2).enumerate() {
            let s: Vec<f32> = keys.chunks_exact(2).map(|k| dot(q, k)).collect();
            let want: Vec<u32> = top_k(&s, 2).unwrap().into_iter().map(|x| x.0).collect();
            assert_eq!(&lists[qi * 2..qi * 2 + 2], &want[..]);
        }
    }
}
