//! # needle-index-graph
//!
//! Graph indexes for maximum-inner-product search on [`needle_core::VectorIndex`]:
//!
//! - [`RoarGraph`]: the query-aware graph of RoarGraph (Chen et al., VLDB 2024) that
//!   RetrievalAttention (arXiv 2409.10516) uses for decode-time key retrieval. Built from the
//!   keys *and* a sample of prefill queries, it reaches high recall while scoring a few percent
//!   of the keys, even though decode queries and keys come from different distributions.
//! - [`CompactGraph`]: the same graph walked over 8-bit key codes with SIMD, `u16` links and
//!   no copy of the keys (the caller re-ranks with its own), one walk per GQA group; below a
//!   few ten thousand keys no graph at all, a scan of every code.
//! - [`Hnsw`]: a plain HNSW over the keys alone, the baseline that measures what
//!   query-awareness buys.
//! - [`from_factory`]: builds either (or the exact `Flat` scan) from `"RoarGraph32"`,
//!   `"HNSW16"`, `"Flat"`.
//!
//! Both keep the graph apart from vector storage, as fixed-degree link rows in one flat
//! array, and search with a best-first beam (`ef_search`, the `SearchParams::effort` knob)
//! over a generation-stamped visited set. Builds run in parallel with rayon and are
//! deterministic for a seed. Parameters, ranges and memory costs: `ALGO_PARAMS.md`.
//!
//! ## Usage
//! ```
//! use needle_core::SearchParams;
//! use needle_index_graph::from_factory;
//! let keys: Vec<f32> = (0..500).flat_map(|i| [(i as f32).sin(), (i as f32 * 0.7).cos(), 1.0]).collect();
//! let prefill_queries: Vec<f32> = (0..200).flat_map(|i| [(i as f32).cos(), 0.5, -1.0]).collect();
//! let mut index = from_factory(3, "RoarGraph16")?;
//! index.build(&keys, Some(&prefill_queries))?;
//! let hits = index.search(&[0.2, 0.9, -1.0], 10, &SearchParams::effort(32))?;
//! assert_eq!(hits.labels_of(0).len(), 10);
//! assert!(hits.stats.full_scored < 500);
//! let ids = index.insert(&[5.0, 5.0, 0.0])?;
//! assert_eq!(ids, 500..501);
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod beam;
mod cluster;
mod compact;
mod dist;
mod graph;
mod hnsw;
mod knn;
mod qdot;
mod reduce;
mod roar;
use needle_core::state;
#[cfg(test)]
mod tests;

pub use compact::{
    CompactGraph, CompactGraphParams, DEFAULT_COMPACT_EF_CONSTRUCTION, DEFAULT_COMPACT_TRAIN, DEFAULT_PATIENCE,
    DEFAULT_SCAN_BELOW,
};
pub use hnsw::{Hnsw, HnswParams};
pub use qdot::{Level, MAX_DIM};
pub use roar::{RoarGraph, RoarGraphParams};

use needle_core::{Error, FlatIndex, Result, VectorIndex};

/// Valid factory strings, for error messages.
const FACTORY_FORMS: &str = "\"RoarGraph<m>\" (e.g. \"RoarGraph32\"), \"RoarGraph<m>q8[s<patience>][x<keys>]\" (a walk over 8-bit codes of the keys with no copy of them, or below <keys> keys at build a scan of every code, e.g. \"RoarGraph32q8\", \"RoarGraph32q8x0\": always a walk), \"RoarGraph<m>r<dims>[p<percent>][f]\" (a walk over 8-bit codes of <dims> projected dimensions (f: f32), <percent> of the beam re-ranked, e.g. \"RoarGraph32r16p50\"), \"HNSW<m>\" (e.g. \"HNSW16\"), \"Flat\"";

/// Builds an empty index from a factory string: `"RoarGraph<m>"`, `"RoarGraph<m>r<dims>"` (the
/// beam walks in `dims` projected dimensions, see `ALGO_PARAMS.md`), `"HNSW<m>"` (`m` = maximum
/// degree, other parameters at their defaults) or `"Flat"` (exact scan).
///
/// Unknown strings give [`Error::InvalidParameter`] naming `spec` and listing the valid forms.
pub fn from_factory(dim: usize, spec: &str) -> Result<Box<dyn VectorIndex>> {
    let s = spec.trim();
    if s == "Flat" {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        return Ok(Box::new(FlatIndex::new(dim)));
    }
    let parse_m = |digits: &str| -> Result<usize> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid("spec", format!("`{spec}` is not a known index; valid forms: {FACTORY_FORMS}")));
        }
        digits.parse::<usize>().map_err(|e| {
            Error::invalid("spec", format!("`{spec}`: a number out of range ({e}); valid forms: {FACTORY_FORMS}"))
        })
    };
    if let Some(rest) = s.strip_prefix("RoarGraph") {
        if let Some((m, tail)) = rest.split_once("q8") {
            let (tail, scan_below) = match tail.split_once('x') {
                Some((t, x)) => (t, parse_m(x)?),
                None => (tail, DEFAULT_SCAN_BELOW),
            };
            let patience = match tail.strip_prefix('s') {
                Some(p) => parse_m(p)?,
                None if tail.is_empty() => DEFAULT_PATIENCE,
                None => {
                    parse_m(tail).and(Err(Error::invalid("spec", format!("`{spec}`: valid forms: {FACTORY_FORMS}"))))?
                }
            };
            let graph = RoarGraphParams { m: parse_m(m)?, ..CompactGraphParams::default().graph };
            let params = CompactGraphParams { graph, patience, scan_below };
            return Ok(Box::new(CompactGraph::with_params(dim, params)?));
        }
        // A trailing `f`: the walk reads f32 projections instead of 8-bit codes.
        let (rest, walk_bits) = match rest.strip_suffix('f') {
            Some(r) if r.contains('r') => (r, 32),
            _ => (rest, 8),
        };
        let (m, reduce, rerank) = match rest.split_once('r') {
            Some((m, r)) => match r.split_once('p') {
                Some((r, p)) => (parse_m(m)?, parse_m(r)?, parse_m(p)?),
                None => (parse_m(m)?, parse_m(r)?, 100),
            },
            None => (parse_m(rest)?, 0, 100),
        };
        if reduce == 0 && rest.contains('r') {
            return Err(Error::invalid(
                "spec",
                format!("`{spec}`: the projected dimensions must be at least 1; valid forms: {FACTORY_FORMS}"),
            ));
        }
        let params = RoarGraphParams { m, reduce, rerank, walk_bits, ..Default::default() };
        return Ok(Box::new(RoarGraph::with_params(dim, params)?));
    }
    if let Some(rest) = s.strip_prefix("HNSW") {
        return Ok(Box::new(Hnsw::with_m(dim, parse_m(rest)?)?));
    }
    Err(Error::invalid("spec", format!("`{spec}` is not a known index; valid forms: {FACTORY_FORMS}")))
}
