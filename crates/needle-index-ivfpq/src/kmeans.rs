//! Lloyd's k-means under L2, seeded, with k-means++ or random initialisation and empty-cluster
//! repair. Used for the coarse quantizer and for each product-quantizer sub-codebook.

use needle_core::{Error, Result, check_batch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::linalg::{nearest, row_norms};

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KMeansInit {
    /// k-means++ (D² sampling): slower to start, fewer bad local minima.
    #[default]
    PlusPlus,
    /// Distinct random points of the training sample (faiss's default).
    Random,
}

/// k-means settings. `k` is a request: with fewer points than `k`, fewer centroids are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KMeans {
    /// Number of centroids wanted.
    pub k: usize,
    /// Lloyd iterations after initialisation (stops early once assignments settle).
    pub iters: usize,
    /// Initialisation.
    pub init: KMeansInit,
    /// Seed for sampling and initialisation.
    pub seed: u64,
    /// Training uses at most `k × max_points_per_centroid` points, sampled (faiss uses 256).
    pub max_points_per_centroid: usize,
}

impl KMeans {
    /// `k` centroids, 10 iterations, k-means++, seed 0, at most 256 training points per centroid.
    pub fn new(k: usize) -> Self {
        Self { k, iters: 10, init: KMeansInit::PlusPlus, seed: 0, max_points_per_centroid: 256 }
    }
}

/// A trained clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Vector dimension.
    pub dim: usize,
    /// Centroids, row-major `k × dim`.
    pub centroids: Vec<f32>,
    /// Nearest centroid of every input point.
    pub assignments: Vec<u32>,
    /// Sum of squared distances of all input points to their centroid.
    pub inertia: f64,
}

impl Clustering {
    /// Number of centroids.
    pub fn k(&self) -> usize {
        self.centroids.len() / self.dim.max(1)
    }
}

impl KMeans {
    /// Clusters `data` (row-major `n × dim`).
    pub fn fit(&self, data: &[f32], dim: usize) -> Result<Clustering> {
        let n = check_batch("kmeans data", data, dim)?;
        if n == 0 {
            return Err(Error::EmptyKeys { what: "k-means".into() });
        }
        if self.k == 0 {
            return Err(Error::invalid("k", "k-means needs at least one centroid"));
        }
        let k = self.k.min(n);
        if k < self.k {
            tracing::warn!(requested = self.k, points = n, "k-means: fewer points than centroids; training {k}");
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        // Train on a sample: beyond a few hundred points per centroid the centroids barely move.
        let cap = k.saturating_mul(self.max_points_per_centroid.max(1));
        let sample: Vec<f32> = if n > cap {
            let mut idx = rand::seq::index::sample(&mut rng, n, cap).into_vec();
            idx.sort_unstable();
            idx.iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect()
        } else {
            data.to_vec()
        };
        let ns = sample.len() / dim;
        let mut centroids = match self.init {
            KMeansInit::PlusPlus => plus_plus(&sample, dim, k, &mut rng),
            KMeansInit::Random => {
                let idx = rand::seq::index::sample(&mut rng, ns, k).into_vec();
                idx.iter().flat_map(|&i| sample[i * dim..(i + 1) * dim].iter().copied()).collect()
            }
        };
        let mut assign = vec![u32::MAX; ns];
        for _ in 0..self.iters {
            let norms = row_norms(&centroids, dim);
            let fresh: Vec<(u32, f32)> =
                sample.par_chunks_exact(dim).map(|x| nearest(x, &centroids, &norms, dim)).collect();
            let changed = fresh.iter().zip(&assign).any(|(f, &a)| f.0 != a);
            assign.iter_mut().zip(&fresh).for_each(|(a, f)| *a = f.0);
            if !changed {
                break;
            }
            let mut sums = vec![0.0f64; k * dim];
            let mut counts = vec![0usize; k];
            for (x, &a) in sample.chunks_exact(dim).zip(&assign) {
                let a = a as usize;
                counts[a] += 1;
                for (s, &v) in sums[a * dim..(a + 1) * dim].iter_mut().zip(x) {
                    *s += v as f64;
                }
            }
            for (c, (s, &cnt)) in centroids.chunks_exact_mut(dim).zip(sums.chunks_exact(dim).zip(&counts)) {
                if cnt > 0 {
                    c.iter_mut().zip(s).for_each(|(c, &s)| *c = (s / cnt as f64) as f32);
                }
            }
            repair_empty(&mut centroids, &sample, &fresh, &counts, dim);
        }
        let norms = row_norms(&centroids, dim);
        let fin: Vec<(u32, f32)> = data.par_chunks_exact(dim).map(|x| nearest(x, &centroids, &norms, dim)).collect();
        Ok(Clustering {
            dim,
            inertia: fin.iter().map(|f| f.1 as f64).sum(),
            assignments: fin.into_iter().map(|f| f.0).collect(),
            centroids,
        })
    }
}

/// k-means++: each next centroid is a point drawn with probability ∝ squared distance to the
/// nearest centroid so far. With all points equal (duplicates), it falls back to uniform draws.
fn plus_plus(sample: &[f32], dim: usize, k: usize, rng: &mut StdRng) -> Vec<f32> {
    let n = sample.len() / dim;
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&sample[first * dim..(first + 1) * dim]);
    let mut d2: Vec<f32> = vec![f32::INFINITY; n];
    for c in 1..k {
        let last = &centroids[(c - 1) * dim..c * dim];
        d2.par_iter_mut().zip(sample.par_chunks_exact(dim)).for_each(|(d, x)| {
            let dd: f32 = x.iter().zip(last).map(|(a, b)| (a - b) * (a - b)).sum();
            *d = d.min(dd);
        });
        let total: f64 = d2.iter().map(|&d| d as f64).sum();
        let pick = if total > 0.0 && total.is_finite() {
            let mut r = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, &d) in d2.iter().enumerate() {
                r -= d as f64;
                if r < 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            rng.random_range(0..n)
        };
        centroids.extend_from_slice(&sample[pick * dim..(pick + 1) * dim]);
    }
    centroids
}

/// Moves each empty centroid onto the worst-served point not yet used for a repair, which splits
/// the cluster that fits worst (deterministic, and harmless when all points coincide).
fn repair_empty(centroids: &mut [f32], sample: &[f32], fresh: &[(u32, f32)], counts: &[usize], dim: usize) {
    let empty: Vec<usize> = counts.iter().enumerate().filter(|(_, c)| **c == 0).map(|(i, _)| i).collect();
    if empty.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..fresh.len()).collect();
    order.sort_unstable_by(|&a, &b| fresh[b].1.total_cmp(&fresh[a].1).then(a.cmp(&b)));
    for (e, &p) in empty.iter().zip(order.iter()) {
        centroids[e * dim..(e + 1) * dim].copy_from_slice(&sample[p * dim..(p + 1) * dim]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `centers` with small deterministic jitter.
    fn blobs(centers: &[[f32; 2]], per: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..per {
            for c in centers {
                out.push(c[0] + rng.random_range(-0.5..0.5));
                out.push(c[1] + rng.random_range(-0.5..0.5));
            }
        }
        out
    }

    #[test]
    fn recovers_well_separated_clusters_with_both_inits() {
        let centers = [[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [-20.0, -20.0], [20.0, 20.0]];
        let data = blobs(&centers, 60, 1);
        for init in [KMeansInit::PlusPlus, KMeansInit::Random] {
            // Random init can land in a local minimum (two seeds in one blob); as faiss's `nredo`,
            // keep the best of a few seeds. k-means++ needs no retries here.
            let seeds = if init == KMeansInit::PlusPlus { 0..1 } else { 0..4 };
            let cl = seeds
                .map(|seed| KMeans { init, iters: 20, seed, ..KMeans::new(5) }.fit(&data, 2).unwrap())
                .min_by(|a, b| a.inertia.total_cmp(&b.inertia))
                .unwrap();
            // Every true centre has a centroid within the jitter.
            for c in &centers {
                let near = cl.centroids.chunks_exact(2).any(|x| (x[0] - c[0]).abs() < 0.5 && (x[1] - c[1]).abs() < 0.5);
                assert!(near, "{init:?}: no centroid near {c:?}: {:?}", cl.centroids);
            }
            // Points of the same blob share a label, different blobs do not.
            for (i, &a) in cl.assignments.iter().enumerate() {
                assert_eq!(a, cl.assignments[i % 5]);
            }
            let mut firsts: Vec<u32> = cl.assignments[..5].to_vec();
            firsts.sort_unstable();
            firsts.dedup();
            assert_eq!(firsts.len(), 5);
        }
    }

    #[test]
    fn deterministic_under_a_seed() {
        let data = blobs(&[[0.0, 0.0], [3.0, 1.0], [1.0, 4.0]], 100, 2);
        let km = KMeans { seed: 7, ..KMeans::new(8) };
        assert_eq!(km.fit(&data, 2).unwrap(), km.fit(&data, 2).unwrap());
        let other = KMeans { seed: 8, ..KMeans::new(8) }.fit(&data, 2).unwrap();
        assert_ne!(km.fit(&data, 2).unwrap().centroids, other.centroids);
    }

    #[test]
    fn degrades_and_survives_duplicates() {
        let cl = KMeans::new(10).fit(&[1.0, 2.0, 3.0, 4.0], 2).unwrap();
        assert_eq!(cl.k(), 2);
        assert_eq!(cl.inertia, 0.0);
        let dup = vec![0.5f32; 2 * 50];
        let cl = KMeans::new(4).fit(&dup, 2).unwrap();
        assert_eq!(cl.k(), 4);
        assert!(cl.centroids.iter().all(|&c| c == 0.5));
        assert!(KMeans::new(0).fit(&dup, 2).is_err());
        assert!(matches!(KMeans::new(2).fit(&[], 2), Err(Error::EmptyKeys { .. })));
        assert!(matches!(KMeans::new(2).fit(&[1.0, f32::NAN], 2), Err(Error::NonFinite { .. })));
    }
}
