//! Product quantization: `m` subspaces of `dim / m` contiguous dimensions, each with its own
//! k-means codebook of up to `2^nbits` centroids; a vector becomes `m` one-byte codes.
//!
//! Inner products against codes are scored asymmetrically: per query, a table holds the inner
//! product of each query sub-vector with each sub-centroid, and a code's score is the sum of `m`
//! table entries (no decoding).

use needle_core::{Error, Result, check_batch, check_len};
use rayon::prelude::*;

use crate::kmeans::{KMeans, KMeansInit};
use crate::linalg::{dot, nearest, row_norms};

/// A product quantizer for vectors of `dim` floats.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductQuantizer {
    dim: usize,
    m: usize,
    nbits: usize,
    dsub: usize,
    /// Centroids per subspace actually trained (≤ `2^nbits`; fewer with few training points).
    ksub: usize,
    /// `m × ksub × dsub`.
    centroids: Vec<f32>,
    /// Squared norms of the sub-centroids, `m × ksub`, for fast L2 encoding.
    norms: Vec<f32>,
}

impl ProductQuantizer {
    /// An untrained quantizer; `dim` must be a multiple of `m`, and `1 <= nbits <= 8`.
    pub fn new(dim: usize, m: usize, nbits: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        if m == 0 || !dim.is_multiple_of(m) {
            return Err(Error::invalid("m", format!("must divide dim = {dim} (got m = {m})")));
        }
        if !(1..=8).contains(&nbits) {
            return Err(Error::invalid("nbits", format!("must be 1..=8 (one byte per code), got {nbits}")));
        }
        Ok(Self { dim, m, nbits, dsub: dim / m, ksub: 0, centroids: Vec::new(), norms: Vec::new() })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of subspaces, which is also the code size in bytes.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Bits per sub-code requested.
    pub fn nbits(&self) -> usize {
        self.nbits
    }
    /// Centroids per subspace actually trained (0 before training).
    pub fn ksub(&self) -> usize {
        self.ksub
    }
    /// Dimensions per subspace.
    pub fn dsub(&self) -> usize {
        self.dsub
    }
    /// True once trained.
    pub fn is_trained(&self) -> bool {
        self.ksub > 0
    }
    /// Bytes held by the codebooks.
    pub fn memory_bytes(&self) -> usize {
        (self.centroids.len() + self.norms.len()) * 4
    }
    /// Bytes of the sub-centroids alone: what building one distance table reads.
    pub fn codebook_bytes(&self) -> usize {
        self.centroids.len() * 4
    }
    /// The `ksub × dsub` codebook of subspace `j`.
    pub fn codebook(&self, j: usize) -> &[f32] {
        let s = self.ksub * self.dsub;
        &self.centroids[j * s..(j + 1) * s]
    }

    /// Trains the `m` codebooks on `data` (row-major `n × dim`) with `iters` Lloyd iterations.
    pub fn train(&mut self, data: &[f32], iters: usize, seed: u64) -> Result<()> {
        let n = check_batch("pq training data", data, self.dim)?;
        if n == 0 {
            return Err(Error::EmptyKeys { what: "product quantizer training".into() });
        }
        let want = 1usize << self.nbits;
        let ksub = want.min(n);
        if ksub < want {
            tracing::warn!(points = n, requested = want, "pq: fewer training points than centroids; using {ksub}");
        }
        let (dim, dsub) = (self.dim, self.dsub);
        let books: Vec<Result<Vec<f32>>> = (0..self.m)
            .into_par_iter()
            .map(|j| {
                let sub: Vec<f32> =
                    data.chunks_exact(dim).flat_map(|x| x[j * dsub..(j + 1) * dsub].iter().copied()).collect();
                // Random init as in faiss: 256 centroids × m subspaces make k-means++ the bottleneck.
                let km = KMeans {
                    k: ksub,
                    iters,
                    init: KMeansInit::Random,
                    seed: seed.wrapping_add(j as u64 * 0x9E37_79B9),
                    max_points_per_centroid: 256,
                };
                let mut c = km.fit(&sub, dsub)?.centroids;
                // Duplicate-heavy data can yield fewer distinct centroids than ksub: pad by repeating.
                c.resize(ksub * dsub, 0.0);
                Ok(c)
            })
            .collect();
        let mut centroids = Vec::with_capacity(self.m * ksub * dsub);
        for b in books {
            centroids.extend(b?);
        }
        self.norms = row_norms(&centroids, dsub);
        self.centroids = centroids;
        self.ksub = ksub;
        Ok(())
    }

    /// Sub-centroids, `m × ksub × dsub` (empty before training).
    pub(crate) fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// A trained quantizer from its sub-centroids (`m × ksub × dsub`, `ksub >= 1`); the norms
    /// are recomputed as training computes them.
    pub(crate) fn with_centroids(mut self, ksub: usize, centroids: Vec<f32>) -> Self {
        self.norms = row_norms(&centroids, self.dsub);
        self.centroids = centroids;
        self.ksub = ksub;
        self
    }

    fn check_trained(&self) -> Result<()> {
        if self.is_trained() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                operation: "encoding before training".into(),
                implementation: "ProductQuantizer".into(),
            })
        }
    }

    /// Writes the code of `x` into `code` (`m` bytes). No checks: callers validate.
    #[inline]
    pub(crate) fn encode_into(&self, x: &[f32], code: &mut [u8]) {
        let s = self.ksub * self.dsub;
        for (j, c) in code.iter_mut().enumerate() {
            let sub = &x[j * self.dsub..(j + 1) * self.dsub];
            let books = &self.centroids[j * s..(j + 1) * s];
            let norms = &self.norms[j * self.ksub..(j + 1) * self.ksub];
            *c = nearest(sub, books, norms, self.dsub).0 as u8;
        }
    }

    /// Writes the reconstruction of `code` into `out` (`dim` floats). No checks.
    #[inline]
    pub(crate) fn decode_into(&self, code: &[u8], out: &mut [f32]) {
        let s = self.ksub * self.dsub;
        for (j, (&c, o)) in code.iter().zip(out.chunks_exact_mut(self.dsub)).enumerate() {
            let at = j * s + c as usize * self.dsub;
            o.copy_from_slice(&self.centroids[at..at + self.dsub]);
        }
    }

    /// Codes of a batch (row-major `n × dim`), `n × m` bytes.
    pub fn encode(&self, xs: &[f32]) -> Result<Vec<u8>> {
        self.check_trained()?;
        check_batch("vectors to encode", xs, self.dim)?;
        let mut codes = vec![0u8; xs.len() / self.dim * self.m];
        codes.par_chunks_exact_mut(self.m).zip(xs.par_chunks_exact(self.dim)).for_each(|(c, x)| self.encode_into(x, c));
        Ok(codes)
    }

    /// Reconstructions of a batch of codes (`n × m` bytes), row-major `n × dim`.
    pub fn decode(&self, codes: &[u8]) -> Result<Vec<f32>> {
        self.check_trained()?;
        if !codes.len().is_multiple_of(self.m) {
            return Err(Error::DimensionMismatch {
                what: format!("codes (rows of m = {})", self.m),
                expected: codes.len().div_ceil(self.m) * self.m,
                got: codes.len(),
            });
        }
        if let Some(i) = codes.iter().position(|&c| c as usize >= self.ksub) {
            return Err(Error::OutOfRange { what: "pq sub-code".into(), id: codes[i] as u64, len: self.ksub });
        }
        let mut out = vec![0.0f32; codes.len() / self.m * self.dim];
        for (c, o) in codes.chunks_exact(self.m).zip(out.chunks_exact_mut(self.dim)) {
            self.decode_into(c, o);
        }
        Ok(out)
    }

    /// Fills `table` (`m × ksub`) with inner products of the query's sub-vectors with every
    /// sub-centroid. No checks.
    #[inline]
    pub(crate) fn ip_table_into(&self, q: &[f32], table: &mut [f32]) {
        let s = self.ksub * self.dsub;
        for (j, row) in table.chunks_exact_mut(self.ksub).enumerate() {
            let sub = &q[j * self.dsub..(j + 1) * self.dsub];
            let books = &self.centroids[j * s..(j + 1) * s];
            for (t, c) in row.iter_mut().zip(books.chunks_exact(self.dsub)) {
                *t = dot(sub, c);
            }
        }
    }

    /// The asymmetric distance table of a query for inner products: `m × ksub` entries.
    pub fn ip_table(&self, q: &[f32]) -> Result<Vec<f32>> {
        self.check_trained()?;
        check_len("query", self.dim, q.len())?;
        needle_core::check_finite("query", q)?;
        let mut t = vec![0.0f32; self.m * self.ksub];
        self.ip_table_into(q, &mut t);
        Ok(t)
    }

    /// Score of one code against a table from [`ProductQuantizer::ip_table`]: the inner product of
    /// the query with the decoded vector, summed in subspace order.
    #[inline]
    pub fn lut_score(&self, table: &[f32], code: &[u8]) -> f32 {
        lut_score(table, self.ksub, code)
    }
}

/// Sum of one table entry per subspace; the inner loop of every IVF-PQ search.
#[inline]
pub(crate) fn lut_score(table: &[f32], ksub: usize, code: &[u8]) -> f32 {
    let mut s = 0.0f32;
    for (row, &c) in table.chunks_exact(ksub).zip(code) {
        s += row[c as usize];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gaussian_like(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        // Correlated dims so that finer subspaces genuinely help.
        (0..n)
            .flat_map(|_| {
                let base: f32 = rng.random_range(-1.0..1.0);
                (0..dim).map(|i| base * (1.0 + i as f32 * 0.1) + rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>()
            })
            .collect()
    }

    fn mse(pq: &ProductQuantizer, xs: &[f32]) -> f64 {
        let rec = pq.decode(&pq.encode(xs).unwrap()).unwrap();
        xs.iter().zip(&rec).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn reconstruction_error_falls_with_more_subspaces() {
        let dim = 16;
        let train = gaussian_like(1500, dim, 3);
        let test = gaussian_like(300, dim, 4);
        let mut errs = Vec::new();
        for m in [1, 2, 4, 8] {
            let mut pq = ProductQuantizer::new(dim, m, 6).unwrap();
            pq.train(&train, 8, 0).unwrap();
            errs.push(mse(&pq, &test));
        }
        for w in errs.windows(2) {
            assert!(w[1] < w[0] * 0.9, "error did not fall: {errs:?}");
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        assert!(matches!(ProductQuantizer::new(10, 3, 8), Err(Error::InvalidParameter { name, .. }) if name == "m"));
        assert!(matches!(ProductQuantizer::new(8, 2, 9), Err(Error::InvalidParameter { name, .. }) if name == "nbits"));
        let pq = ProductQuantizer::new(4, 2, 8).unwrap();
        assert!(matches!(pq.encode(&[0.0; 4]), Err(Error::Unsupported { .. })));
        let mut pq = ProductQuantizer::new(4, 2, 8).unwrap();
        pq.train(&[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0], 5, 0).unwrap();
        assert_eq!(pq.ksub(), 2);
        assert!(pq.decode(&[0, 2]).is_err());
        assert!(pq.encode(&[0.0; 3]).is_err());
        assert!(pq.ip_table(&[f32::NAN, 0.0, 0.0, 0.0]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn lut_score_equals_inner_product_with_decoded(seed in any::<u64>(), m in prop::sample::select(vec![1usize, 2, 4, 8])) {
            let dim = 16;
            let train = gaussian_like(300, dim, seed);
            let mut pq = ProductQuantizer::new(dim, m, 5).unwrap();
            pq.train(&train, 3, seed).unwrap();
            let fresh = gaussian_like(20, dim, seed ^ 0xABCD);
            let q = gaussian_like(1, dim, seed.wrapping_add(1));
            let codes = pq.encode(&fresh).unwrap();
            let dec = pq.decode(&codes).unwrap();
            let table = pq.ip_table(&q).unwrap();
            for (c, d) in codes.chunks_exact(m).zip(dec.chunks_exact(dim)) {
                let exact: f32 = q.iter().zip(d).map(|(a, b)| a * b).sum();
                let lut = pq.lut_score(&table, c);
                prop_assert!((lut - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "lut {lut} vs {exact}");
            }
        }
    }
}
