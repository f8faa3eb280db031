//! [`CompactGraph`]: the RoarGraph walk over compact codes, with no copy of the keys.
//!
//! A decode-time walk of [`RoarGraph`] scores about a thousand keys at full precision, each a
//! random read of `4·dim` bytes, so it is bound by memory latency, not arithmetic. This index
//! keeps the same graph but reads far less per key:
//!
//! - keys as 8-bit codes with a scale per key (`dim` bytes, one cache line at `dim = 64`, on a
//!   64-byte aligned grid) scored against 16-bit query codes with SIMD ([`crate::qdot`]);
//! - links as `u16` while the index holds fewer than 65,535 keys (`u32` beyond);
//! - before a node's neighbours are scored, every unvisited neighbour's code line is
//!   prefetched, so their misses overlap instead of queueing;
//! - one walk serves a whole GQA group ([`VectorIndex::search_group`]): a key's score is the
//!   group's best, `max_h q_h·k`, from one read of its code;
//! - a walk may start from the previous step's hits (`seeds`) and stops once `patience`
//!   expansions in a row have not changed its best `k` ([`CompactGraphParams::patience`]).
//!
//! - below [`CompactGraphParams::scan_below`] keys at build there is no graph at all: every
//!   search scores all the codes in order ([`DEFAULT_SCAN_BELOW`]). A sequential scan of a few
//!   thousand 64-byte rows costs less than a walk's random reads, and it needs no build.
//!
//! The index returns code scores; the full-precision re-rank belongs to the caller, which holds
//! the real keys (needle-select's retrieval selector re-ranks its candidates from the KV cache).
//! A node's neighbours' codes are not copied next to its links (DiskANN's layout): at `m = 32`
//! that would cost `32·dim` bytes per key, several times the KV cache it indexes.

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use needle_core::{BuildStats, Error, Result, SearchParams, SearchResult, SearchStats, VectorIndex};
use needle_core::{check_batch, check_search};
use rayon::prelude::*;

use crate::beam::{Beam, Visited, VisitedPool, Work};
use crate::dist::dot;
use crate::graph::{FixedGraph, occlusion_prune_by};
use crate::qdot::{CODE_ALIGN, DotsFn, Level, MAX_DIM, QMAX, SCAN_BLOCK, kernel, scan_kernel};
use crate::roar::{RoarGraph, RoarGraphParams, RoarParts, positive};
use crate::state::{Reader, Writer};
use needle_core::kit::prefetch;

/// Training queries a compact build uses at most by default: a random sample (the exact k-NN of
/// the training queries is most of the build; see docs/benchmarks.md for the recall it keeps).
pub const DEFAULT_COMPACT_TRAIN: usize = 4096;

/// The beam of the build's own searches (linking keys the projection left with few links,
/// repairing reachability) and of inserts. The query-aware links come from the training
/// queries, not from these searches; a narrow beam keeps recall and costs a third less build
/// (docs/benchmarks.md §21).
pub const DEFAULT_COMPACT_EF_CONSTRUCTION: usize = 24;

/// Default early stop: expansions in a row that leave the best `k` unchanged.
pub const DEFAULT_PATIENCE: usize = 0;

/// Keys below which a build makes no graph and every search scans all the codes: the scan
/// reads them in order and scores each exactly (by its code), and up to about this size it
/// costs less than a walk, whose reads are random (docs/benchmarks.md §22).
pub const DEFAULT_SCAN_BELOW: usize = 16_384;

/// Settings of a [`CompactGraph`]: the graph's (see [`RoarGraphParams`]; `reduce` must be 0)
/// and the walk's early stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactGraphParams {
    /// How the graph is built and its default beam (`ef_search`).
    pub graph: RoarGraphParams,
    /// A walk stops after this many expansions in a row that changed none of its best `k`
    /// (0: it runs until every beam entry is expanded, as [`RoarGraph`]'s).
    pub patience: usize,
    /// A build over fewer keys makes no graph: searches scan every code (0: always a graph).
    /// Decided once, at build; inserts keep the mode.
    pub scan_below: usize,
}

impl Default for CompactGraphParams {
    fn default() -> Self {
        Self {
            graph: RoarGraphParams {
                max_train: DEFAULT_COMPACT_TRAIN,
                ef_construction: DEFAULT_COMPACT_EF_CONSTRUCTION,
                ..Default::default()
            },
            patience: DEFAULT_PATIENCE,
            scan_below: DEFAULT_SCAN_BELOW,
        }
    }
}

/// Link ids of one width: `u16` or `u32`, with the largest value marking an empty slot.
trait LinkId: Copy + Send + Sync + 'static {
    const NONE: Self;
    fn id(self) -> u32;
    fn of(id: u32) -> Self;
}

impl LinkId for u16 {
    const NONE: Self = u16::MAX;
    #[inline(always)]
    fn id(self) -> u32 {
        self as u32
    }
    #[inline(always)]
    fn of(id: u32) -> Self {
        id as u16
    }
}

impl LinkId for u32 {
    const NONE: Self = u32::MAX;
    #[inline(always)]
    fn id(self) -> u32 {
        self
    }
    #[inline(always)]
    fn of(id: u32) -> Self {
        id
    }
}

/// Keys held while `u16` links can address them (`u16::MAX` marks an empty slot).
const U16_KEYS: usize = u16::MAX as usize;

/// Fixed-degree link rows (`n × m`, empty slots at the end of a row).
#[derive(Debug, Clone)]
enum Links {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Links {
    fn with_capacity(n: usize, m: usize) -> Self {
        if n < U16_KEYS { Links::U16(Vec::with_capacity(n * m)) } else { Links::U32(Vec::with_capacity(n * m)) }
    }

    /// Appends `rows` empty rows, growing the allocation by exactly that.
    fn push_rows(&mut self, rows: usize, m: usize) {
        match self {
            Links::U16(v) => {
                v.reserve_exact(rows * m);
                v.resize(v.len() + rows * m, u16::NONE)
            }
            Links::U32(v) => {
                v.reserve_exact(rows * m);
                v.resize(v.len() + rows * m, u32::NONE)
            }
        }
    }

    /// Switches to `u32` ids once `n` keys no longer fit `u16`.
    fn widen_for(&mut self, n: usize) {
        if let Links::U16(v) = self
            && n >= U16_KEYS
        {
            *self = Links::U32(v.iter().map(|&x| if x == u16::NONE { u32::NONE } else { x as u32 }).collect());
        }
    }

    fn row(&self, i: u32, m: usize) -> Vec<u32> {
        fn read<L: LinkId>(v: &[L], i: u32, m: usize) -> Vec<u32> {
            v[i as usize * m..(i as usize + 1) * m]
                .iter()
                .take_while(|&&x| x.id() != L::NONE.id())
                .map(|x| x.id())
                .collect()
        }
        match self {
            Links::U16(v) => read(v, i, m),
            Links::U32(v) => read(v, i, m),
        }
    }

    fn set(&mut self, i: u32, ids: &[u32], m: usize) {
        fn write<L: LinkId>(v: &mut [L], i: u32, ids: &[u32], m: usize) {
            let row = &mut v[i as usize * m..(i as usize + 1) * m];
            let n = ids.len().min(m);
            for (slot, &x) in row.iter_mut().zip(&ids[..n]) {
                *slot = L::of(x);
            }
            row[n..].fill(L::NONE);
        }
        match self {
            Links::U16(v) => write(v, i, ids, m),
            Links::U32(v) => write(v, i, ids, m),
        }
    }

    /// Appends `j` to row `i` if there is room and it is not there yet; true when stored.
    fn try_push(&mut self, i: u32, j: u32, m: usize) -> bool {
        let mut row = self.row(i, m);
        if row.len() >= m || row.contains(&j) {
            return false;
        }
        row.push(j);
        self.set(i, &row, m);
        true
    }

    fn bytes(&self) -> usize {
        match self {
            Links::U16(v) => v.capacity() * 2,
            Links::U32(v) => v.capacity() * 4,
        }
    }

    fn width(&self) -> u64 {
        match self {
            Links::U16(_) => 2,
            Links::U32(_) => 4,
        }
    }
}

/// 8-bit key codes on a 64-byte aligned grid, `stride` bytes a row, and their scales.
#[derive(Debug, Clone, Default)]
struct Codes {
    stride: usize,
    n: usize,
    /// Backing bytes; row 0 starts at `off`, the first 64-byte aligned byte.
    buf: Vec<i8>,
    off: usize,
    scales: Vec<f32>,
}

impl Codes {
    fn new(dim: usize) -> Self {
        Self { stride: dim.next_multiple_of(CODE_ALIGN), ..Default::default() }
    }

    #[inline(always)]
    fn row(&self, i: u32) -> &[i8] {
        let s = self.off + i as usize * self.stride;
        &self.buf[s..s + self.stride]
    }

    #[inline(always)]
    fn prefetch(&self, i: u32) {
        prefetch(self.buf.as_ptr().wrapping_add(self.off + i as usize * self.stride) as *const u8, self.stride);
        // The scale lives in its own array: a second line to fetch.
        prefetch(self.scales.as_ptr().wrapping_add(i as usize) as *const u8, 4);
    }

    /// Appends the codes of `rows` (row-major, `dim` wide): `c = round(x / s)`, `s = max|x| / 127`.
    fn push(&mut self, rows: &[f32], dim: usize) {
        let add = rows.len() / dim;
        let need = self.off + (self.n + add) * self.stride;
        if need > self.buf.len() {
            // Exactly the rows needed: inserts come in batches (the selector's tail), so a copy
            // per batch is cheap and the memory stays what `bytes` promises.
            let rows_cap = self.n + add;
            let mut buf = vec![0i8; rows_cap * self.stride + 64];
            let off = buf.as_ptr().align_offset(64).min(64);
            let used = self.n * self.stride;
            buf[off..off + used].copy_from_slice(&self.buf[self.off..self.off + used]);
            self.buf = buf;
            self.off = off;
        }
        self.scales.reserve_exact(add);
        for x in rows.chunks_exact(dim) {
            let start = self.off + self.n * self.stride;
            self.scales.push(code_key(x, &mut self.buf[start..start + dim]));
            self.n += 1;
        }
    }

    /// The code estimate of `<key a, key b>`.
    fn key_dot(&self, a: u32, b: u32) -> f32 {
        let d: i32 = self.row(a).iter().zip(self.row(b)).map(|(&x, &y)| x as i32 * y as i32).sum();
        d as f32 * self.scales[a as usize] * self.scales[b as usize]
    }

    /// The decoded key `i`, `dim` floats.
    fn decode(&self, i: u32, dim: usize) -> Vec<f32> {
        let s = self.scales[i as usize];
        self.row(i)[..dim].iter().map(|&c| c as f32 * s).collect()
    }

    fn bytes(&self) -> usize {
        self.buf.capacity() + self.scales.capacity() * 4
    }
}

/// Codes `x` into `out` (`c = round(x / s)`, `s = max|x| / 127`) and returns the scale `s`.
fn code_key(x: &[f32], out: &mut [i8]) -> f32 {
    let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = if m > 0.0 { m / 127.0 } else { 1.0 };
    for (c, v) in out.iter_mut().zip(x) {
        *c = (v / s).round().clamp(-127.0, 127.0) as i8;
    }
    s
}

/// The codes of an index with no graph, laid out for the scan kernels: blocks of
/// [`SCAN_BLOCK`] keys by dimension pair (see [`crate::qdot::ScanFn`]), the same codes and
/// scales as [`Codes`] holds for a walk; a block's unused lanes have zero codes and scale.
///
/// The whole blocks of the keys it was built or loaded with are a [`ScanBase`] shared by every
/// index holding the same codes (the sequences of one context, each loading it), so sequences
/// decoding together scan one copy; keys added later (and the last, partly filled block) are
/// the index's own.
#[derive(Debug, Clone, Default)]
struct ScanCodes {
    stride: usize,
    n: usize,
    base: Arc<ScanBase>,
    /// Keys `base.n..n`, in blocks counted from `base.n`.
    blocks: Vec<i8>,
    scales: Vec<f32>,
}

/// Whole blocks of scan codes: keys `0..n`.
#[derive(Debug, Default, PartialEq)]
struct ScanBase {
    n: usize,
    blocks: Vec<i8>,
    scales: Vec<f32>,
}

impl ScanCodes {
    /// The codes of `keys` (row-major, `dim` wide), their whole blocks shared ([`ScanBase`])
    /// with any other index holding the same ones; the last, partly filled block is this index's
    /// own.
    fn shared(keys: &[f32], dim: usize) -> Self {
        let mut codes = Self { stride: dim.next_multiple_of(CODE_ALIGN), ..Default::default() };
        codes.push(keys, dim);
        let whole = codes.n / SCAN_BLOCK * SCAN_BLOCK;
        let (mut blocks, mut scales) = (std::mem::take(&mut codes.blocks), std::mem::take(&mut codes.scales));
        codes.blocks = blocks.split_off(whole * codes.stride);
        codes.scales = scales.split_off(whole);
        blocks.shrink_to_fit();
        scales.shrink_to_fit();
        codes.base = intern(ScanBase { n: whole, blocks, scales });
        codes
    }

    /// Appends the codes of `rows` (row-major, `dim` wide), growing by whole blocks.
    fn push(&mut self, rows: &[f32], dim: usize) {
        let first = self.base.n;
        let keys = (self.n - first + rows.len() / dim).next_multiple_of(SCAN_BLOCK);
        self.blocks.reserve_exact((keys * self.stride).saturating_sub(self.blocks.len()));
        self.blocks.resize(keys * self.stride, 0);
        self.scales.reserve_exact(keys.saturating_sub(self.scales.len()));
        self.scales.resize(keys, 0.0);
        let mut row = vec![0i8; self.stride];
        for x in rows.chunks_exact(dim) {
            let i = self.n - first;
            self.scales[i] = code_key(x, &mut row[..dim]);
            let (block, lane) = (i / SCAN_BLOCK, i % SCAN_BLOCK);
            let base = block * SCAN_BLOCK * self.stride + lane * 2;
            for (p, pair) in row.chunks_exact(2).enumerate() {
                self.blocks[base + p * 2 * SCAN_BLOCK..][..2].copy_from_slice(pair);
            }
            self.n += 1;
        }
    }

    /// The two runs of blocks a scan reads in key order: (first key, blocks, scales, keys).
    fn parts(&self) -> [(usize, &[i8], &[f32], usize); 2] {
        let b = &self.base;
        [(0, &b.blocks[..], &b.scales[..], b.n), (b.n, &self.blocks[..], &self.scales[..], self.n - b.n)]
    }

    fn bytes(&self) -> usize {
        self.base.blocks.capacity()
            + self.base.scales.capacity() * 4
            + self.blocks.capacity()
            + self.scales.capacity() * 4
    }
}

/// The one shared copy of `base`: an equal [`ScanBase`] that another index still holds, else
/// `base` itself, remembered (weakly) for the next.
fn intern(base: ScanBase) -> Arc<ScanBase> {
    static HELD: Mutex<Vec<(u64, Weak<ScanBase>)>> = Mutex::new(Vec::new());
    if base.n == 0 {
        return Arc::new(base);
    }
    let hash = fingerprint(&base);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|(_, w)| w.strong_count() > 0);
    if let Some(same) = held.iter().filter(|(h, _)| *h == hash).find_map(|(_, w)| w.upgrade().filter(|b| **b == base)) {
        return same;
    }
    let base = Arc::new(base);
    held.push((hash, Arc::downgrade(&base)));
    base
}

/// A cheap hash of a base: its keys' scales (one per key, and equal bases are confirmed by
/// comparing everything).
fn fingerprint(base: &ScanBase) -> u64 {
    let scales = base.scales.iter().map(|s| u64::from(s.to_bits()));
    scales.fold(base.n as u64, |h, x| (h.rotate_left(5) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A group of queries as 16-bit codes (`g × stride`) and their scales.
struct QueryCodes {
    g: usize,
    codes: Vec<i16>,
    scales: Vec<f32>,
}

impl QueryCodes {
    fn new(queries: &[f32], dim: usize, stride: usize) -> Self {
        let g = queries.len() / dim;
        let mut codes = vec![0i16; g * stride];
        let mut scales = Vec::with_capacity(g);
        for (h, q) in queries.chunks_exact(dim).enumerate() {
            let m = q.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if m > 0.0 { m / QMAX } else { 1.0 };
            for (c, v) in codes[h * stride..h * stride + dim].iter_mut().zip(q) {
                *c = (v / s).round().clamp(-QMAX, QMAX) as i16;
            }
            scales.push(s);
        }
        Self { g, codes, scales }
    }
}

/// The group's code score of key `id`: its best `q_h·k` over the group (`dots` holds one `i32`
/// per query). The scan kernels ([`crate::qdot::ScanFn`]) compute the same float operations in
/// the same order, so a scan ranks as a walk scores.
#[inline(always)]
fn group_score(dots_fn: DotsFn, codes: &Codes, q: &QueryCodes, dots: &mut [i32], id: u32) -> f32 {
    dots_fn(codes.row(id), &q.codes, dots);
    let best = dots.iter().zip(&q.scales).fold(f32::NEG_INFINITY, |b, (&d, &s)| b.max(d as f32 * s));
    best * codes.scales[id as usize]
}

/// `(id, score)` as one integer whose ascending order is the result's: score descending
/// (`f32::total_cmp`'s order, flipped), then id ascending.
#[inline(always)]
fn rank_key(id: u32, score: f32) -> u64 {
    let b = score.to_bits();
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (u64::from(!ascending) << 32) | u64::from(id)
}

/// The `(id, score)` of a [`rank_key`].
#[inline(always)]
fn from_rank_key(key: u64) -> (u32, f32) {
    let ascending = !((key >> 32) as u32);
    let b = if ascending >> 31 == 1 { ascending & 0x7fff_ffff } else { !ascending };
    (key as u32, f32::from_bits(b))
}

/// Most queries a group walk scores from one stack buffer; larger groups use the heap.
const STACK_GROUP: usize = 16;

/// Query-aware graph (RoarGraph's) walked over 8-bit codes; see the [module docs](self).
///
/// ```
/// use needle_core::{SearchParams, VectorIndex};
/// use needle_index_graph::CompactGraph;
/// let dim = 64;
/// let vector = |i: usize, f: f32| -> Vec<f32> { (0..dim).map(|d| ((i * dim + d) as f32 * f).sin()).collect() };
/// let keys: Vec<f32> = (0..300).flat_map(|i| vector(i, 0.37)).collect();
/// let queries: Vec<f32> = (0..60).flat_map(|i| vector(i, 0.11)).collect();
/// let mut index = CompactGraph::new(dim)?;
/// index.build(&keys, Some(&queries))?;
/// // One walk for a group of two queries, ranked by each key's better score.
/// let group = [vector(7, 0.5), vector(8, 0.5)].concat();
/// let hits = index.search_group(&group, 5, &SearchParams::default(), &[])?;
/// assert_eq!(hits.labels_of(0).len(), 5);
/// assert!(index.memory_bytes() < keys.len() * 4, "less than the keys in f32");
/// # Ok::<(), needle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CompactGraph {
    dim: usize,
    params: CompactGraphParams,
    codes: Codes,
    links: Links,
    entries: Vec<u32>,
    centroids: Vec<f32>,
    cluster_entries: Vec<u32>,
    entry_width: usize,
    /// No graph: every search scans these codes (see [`CompactGraphParams::scan_below`]);
    /// `codes` and `links` are then empty.
    scan: Option<ScanCodes>,
    level: Level,
    visited: VisitedPool,
}

impl CompactGraph {
    /// An empty index with default parameters (`m = 32`).
    pub fn new(dim: usize) -> Result<Self> {
        Self::with_params(dim, CompactGraphParams::default())
    }

    /// An empty index with the given parameters.
    pub fn with_params(dim: usize, params: CompactGraphParams) -> Result<Self> {
        positive("dim", dim)?;
        params.graph.validate()?;
        if dim > MAX_DIM {
            return Err(Error::invalid("dim", format!("{dim}: compact codes hold at most {MAX_DIM} dimensions")));
        }
        if params.graph.reduce != 0 {
            return Err(Error::invalid("reduce", "a compact graph walks codes of every dimension; reduce must be 0"));
        }
        if params.graph.m >= U16_KEYS {
            return Err(Error::invalid("m", format!("{}: at most {}", params.graph.m, U16_KEYS - 1)));
        }
        Ok(Self {
            dim,
            params,
            codes: Codes::new(dim),
            links: Links::U16(Vec::new()),
            entries: Vec::new(),
            centroids: Vec::new(),
            cluster_entries: Vec::new(),
            entry_width: 0,
            scan: None,
            level: Level::detect(),
            visited: VisitedPool::default(),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &CompactGraphParams {
        &self.params
    }

    /// Runs the code kernels at `level` instead of the detected one (tests and benchmarks);
    /// an unavailable level is an error naming it.
    pub fn set_level(&mut self, level: Level) -> Result<()> {
        if !level.available() {
            return Err(Error::invalid("level", format!("{level:?} is not supported by this CPU")));
        }
        self.level = level;
        Ok(())
    }

    /// Out-neighbours of key `id` (for inspection and tests).
    pub fn neighbors(&self, id: u32) -> Vec<u32> {
        if self.scan.is_none() && (id as usize) < self.codes.n {
            self.links.row(id, self.params.graph.m)
        } else {
            Vec::new()
        }
    }

    /// Entry points of every search.
    pub fn entry_points(&self) -> &[u32] {
        &self.entries
    }

    /// True when the index holds no graph and searches scan every code.
    pub fn is_scan(&self) -> bool {
        self.scan.is_some()
    }

    /// Whether both indexes scan one shared copy of their first codes.
    #[cfg(test)]
    pub(crate) fn shares_scan_codes_with(&self, other: &CompactGraph) -> bool {
        match (&self.scan, &other.scan) {
            (Some(a), Some(b)) => a.base.n > 0 && Arc::ptr_eq(&a.base, &b.base),
            _ => false,
        }
    }

    fn n(&self) -> usize {
        self.scan.as_ref().map_or(self.codes.n, |c| c.n)
    }

    fn n_clusters(&self) -> usize {
        self.centroids.len() / self.dim
    }

    /// Entry points for a group: the global ones, each query's `probe` nearest clusters' entry
    /// keys, then `seeds` (those below `n`).
    fn entries_for(&self, queries: &[f32], seeds: &[u32], work: &mut Work) -> Vec<u32> {
        let mut out = self.entries.clone();
        let c = self.n_clusters();
        if c > 0 {
            let probe = self.params.graph.probe.min(c);
            for q in queries.chunks_exact(self.dim) {
                work.scored += c as u64;
                let mut best: Vec<(f32, usize)> =
                    self.centroids.chunks_exact(self.dim).enumerate().map(|(i, cv)| (dot(q, cv), i)).collect();
                best.select_nth_unstable_by(probe - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, ci) in &best[..probe] {
                    out.extend_from_slice(&self.cluster_entries[ci * self.entry_width..(ci + 1) * self.entry_width]);
                }
            }
        }
        let n = self.n() as u32;
        out.extend(seeds.iter().copied().filter(|&s| s < n));
        out
    }

    /// One walk for the group `q`; with `pool`, every scored key is pushed there too.
    #[allow(clippy::too_many_arguments)] // the hot path: plain arguments keep it monomorphic
    fn walk<L: LinkId>(
        &self,
        links: &[L],
        q: &QueryCodes,
        entries: &[u32],
        ef: usize,
        k: usize,
        patience: usize,
        visited: &mut Visited,
        work: &mut Work,
        mut pool: Option<&mut Vec<(u32, f32)>>,
    ) -> Beam {
        let m = self.params.graph.m;
        let (dots_fn, codes) = (kernel(self.level), &self.codes);
        let mut stack = [0i32; STACK_GROUP];
        let mut heap = Vec::new();
        let dots: &mut [i32] = if q.g <= STACK_GROUP {
            &mut stack[..q.g]
        } else {
            heap.resize(q.g, 0);
            &mut heap
        };
        let mut score = |id: u32| -> f32 { group_score(dots_fn, codes, q, dots, id) };
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
        let top = k.min(ef).max(1);
        let mut fresh: Vec<u32> = Vec::with_capacity(m);
        let (mut cur, mut stale) = (0, 0);
        while cur < beam.len() {
            let Some(id) = beam.expand(cur) else {
                cur += 1;
                continue;
            };
            let row = &links[id as usize * m..(id as usize + 1) * m];
            fresh.clear();
            for &l in row {
                if l.id() == L::NONE.id() {
                    break;
                }
                let nb = l.id();
                if visited.insert(nb) {
                    codes.prefetch(nb);
                    fresh.push(nb);
                }
            }
            work.links += row.len() as u64;
            // The next node to expand is usually the next in the beam: fetch its links now.
            if let Some(c) = beam.items().get(cur + 1) {
                prefetch(links.as_ptr().wrapping_add(c.id as usize * m) as *const u8, m * size_of::<L>());
            }
            let mut next = cur + 1;
            let mut improved = false;
            for &nb in &fresh {
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
                    improved |= p < top;
                }
            }
            if patience > 0 {
                stale = if improved { 0 } else { stale + 1 };
                if stale >= patience {
                    break;
                }
            }
            cur = next;
        }
        beam
    }

    /// The best `k` of all the codes for the group `q`, best first (ties: lower id first).
    ///
    /// Rows are read in order; a candidate list of up to `4k` is cut back to `k` whenever it
    /// fills, so after the first few hundred keys almost every score only meets the threshold.
    fn scan_all(&self, codes: &ScanCodes, q: &QueryCodes, k: usize) -> Vec<(u32, f32)> {
        const BLOCK: usize = 16 * SCAN_BLOCK;
        let (scan, stride) = (scan_kernel(self.level, q.g), codes.stride);
        // Each query's codes as pairs, the layout the kernels broadcast from.
        let qpairs: Vec<i32> =
            q.codes.chunks_exact(2).map(|c| (c[0] as u16 as u32 | ((c[1] as u16 as u32) << 16)) as i32).collect();
        let k = k.max(1);
        // Candidates as one `u64` each, ordered as the result is (see `rank_key`): selecting
        // and sorting plain integers costs a fraction of comparing pairs. Until the first cut
        // the threshold is -inf and every key enters; a list of 4k between cuts keeps cuts few.
        let mut best: Vec<u64> = Vec::with_capacity(4 * k);
        let mut threshold = f32::NEG_INFINITY;
        let mut scores = [0f32; BLOCK];
        // Keys in order: the shared blocks, then the index's own.
        for (first, blocks, scales, n) in codes.parts() {
            for start in (0..n).step_by(BLOCK) {
                let rows = BLOCK.min(n - start);
                // Whole blocks: the last one's unused lanes are scored and never read.
                let lanes = rows.next_multiple_of(SCAN_BLOCK);
                let blocks = &blocks[start * stride..(start + lanes) * stride];
                scan(blocks, stride, &scales[start..start + lanes], &qpairs, &q.scales, &mut scores[..lanes]);
                let start = first + start;
                for (c, chunk) in scores[..rows].chunks(16).enumerate() {
                    // Most chunks hold no key above the threshold: one vector compare skips them.
                    // (Equal scores rank by id, so a later key equal to the threshold never enters.)
                    if !chunk.iter().fold(false, |any, &s| any | (s > threshold)) {
                        continue;
                    }
                    for (i, &s) in chunk.iter().enumerate() {
                        if s > threshold {
                            best.push(rank_key((start + c * 16 + i) as u32, s));
                            if best.len() == best.capacity() {
                                best.select_nth_unstable(k - 1);
                                best.truncate(k);
                                threshold = from_rank_key(best[k - 1]).1;
                            }
                        }
                    }
                }
            }
        }
        if best.len() > k {
            best.select_nth_unstable(k - 1);
            best.truncate(k);
        }
        best.sort_unstable();
        best.into_iter().map(from_rank_key).collect()
    }

    /// The best `k` of one group walk (or scan) by code score, with the work it did.
    fn search_one(&self, queries: &[f32], k: usize, ef: usize, seeds: &[u32]) -> (Vec<(u32, f32)>, SearchStats) {
        let q = QueryCodes::new(queries, self.dim, self.codes.stride);
        if let Some(codes) = &self.scan {
            let n = codes.n as u64;
            let stats = SearchStats { full_scored: 0, codes_scored: n, bytes_read: n * (codes.stride as u64 + 4) };
            return (self.scan_all(codes, &q, k), stats);
        }
        let mut work = Work::default();
        let entries = self.entries_for(queries, seeds, &mut work);
        let centroid_dots = work.scored;
        work.scored = 0;
        let mut visited = self.visited.get(self.n());
        let patience = self.params.patience;
        let narrow = ef < k;
        let mut pool = Vec::new();
        let pool_ref = if narrow { Some(&mut pool) } else { None };
        let beam = match &self.links {
            Links::U16(l) => self.walk(l, &q, &entries, ef, k, patience, &mut visited, &mut work, pool_ref),
            Links::U32(l) => self.walk(l, &q, &entries, ef, k, patience, &mut visited, &mut work, pool_ref),
        };
        self.visited.put(visited);
        let hits = if narrow {
            // A beam narrower than `k`: everything the walk scored, best first.
            let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if pool.len() > k {
                pool.select_nth_unstable_by(k - 1, better);
                pool.truncate(k);
            }
            pool.sort_unstable_by(better);
            pool
        } else {
            beam.top(k)
        };
        let stats = SearchStats {
            full_scored: centroid_dots,
            codes_scored: work.scored,
            bytes_read: work.scored * (self.codes.stride as u64 + 4)
                + work.links * self.links.width()
                + centroid_dots * self.dim as u64 * 4,
        };
        (hits, stats)
    }

    /// Takes a built graph's links and entry points and codes `keys`.
    fn adopt(&mut self, parts: RoarParts, keys: &[f32]) {
        let n = keys.len() / self.dim;
        let m = self.params.graph.m;
        self.codes = Codes::new(self.dim);
        self.codes.push(keys, self.dim);
        let mut links = Links::with_capacity(n, m);
        links.push_rows(n, m);
        for i in 0..n as u32 {
            links.set(i, parts.graph.get(i), m);
        }
        self.links = links;
        self.entries = parts.entries;
        self.centroids = parts.centroids;
        self.cluster_entries = parts.cluster_entries;
        self.entry_width = parts.entry_width;
        self.scan = None;
        self.visited = VisitedPool::default();
    }

    /// Codes `keys` and holds no graph: every search scans them.
    fn adopt_scan(&mut self, keys: &[f32]) {
        self.scan = Some(ScanCodes::shared(keys, self.dim));
        self.codes = Codes::new(self.dim);
        self.links = Links::U16(Vec::new());
        self.entries = Vec::new();
        self.centroids = Vec::new();
        self.cluster_entries = Vec::new();
        self.entry_width = 0;
        self.visited = VisitedPool::default();
    }

    /// Links key `id` (already coded, with an empty row) by a walk for its own decoded vector.
    fn link_new(&mut self, id: u32) {
        let (m, ef) = (self.params.graph.m, self.params.graph.ef_construction);
        let x = self.codes.decode(id, self.dim);
        let (hits, _) = self.search_one(&x, ef, ef, &[]);
        let mut cands: Vec<(u32, f32)> = hits.into_iter().filter(|h| h.0 != id).collect();
        let kept = occlusion_prune_by(id, &mut cands, m, true, |s, c| self.codes.key_dot(s, c));
        self.links.set(id, &kept, m);
        let mut linked_in = false;
        for &nb in &kept {
            if self.links.try_push(nb, id, m) {
                linked_in = true;
                continue;
            }
            // A full row: the new key takes its last (lowest-priority) slot if it scores higher
            // against `nb` than the key there, as `RoarGraph::link_new` does.
            let mut ids = self.links.row(nb, m);
            if let Some(last) = ids.last_mut()
                && self.codes.key_dot(nb, id) > self.codes.key_dot(nb, *last)
            {
                *last = id;
                self.links.set(nb, &ids, m);
                linked_in = true;
            }
        }
        if !linked_in && let Some(p) = kept.first().copied().or(self.entries.first().copied()) {
            self.hang_below(p, id);
        }
    }

    /// Links `parent → v` for a `v` nothing reachable depends on (see `RoarGraph::hang_below`).
    fn hang_below(&mut self, parent: u32, v: u32) {
        let m = self.params.graph.m;
        if self.links.row(parent, m).contains(&v) || self.links.try_push(parent, v, m) {
            return;
        }
        let mut links = self.links.row(parent, m);
        let Some(u) = links.pop() else { return };
        links.push(v);
        self.links.set(parent, &links, m);
        if self.links.row(v, m).contains(&u) || self.links.try_push(v, u, m) {
            return;
        }
        let mut own = self.links.row(v, m);
        own.pop();
        own.push(u);
        self.links.set(v, &own, m);
    }

    /// Loads a state saved by an index that held no graph (see [`SCAN_TAG`]).
    fn load_scan(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        let mut r = Reader::new("compact RoarGraph index (code scan)", state, SCAN_TAG, SCAN_VERSION)?;
        let graph = RoarGraphParams::load(&mut r)?;
        let patience = r.len("patience", usize::MAX)?;
        let scan_below = r.len("scan_below", usize::MAX)?;
        let params = CompactGraphParams { graph, patience, scan_below };
        self.check_saved(&mut r, &params, keys)?;
        r.finish()?;
        self.params = params;
        self.adopt_scan(keys);
        Ok(())
    }

    /// The checks both state formats share, after their parameters: the degree and the
    /// patience (what the factory string names; the rest only say how the index was built, so
    /// a state saved before a default changed still loads and keeps its own), the dimension,
    /// and the key count against `keys`, which it returns.
    fn check_saved(&self, r: &mut Reader<'_>, params: &CompactGraphParams, keys: &[f32]) -> Result<usize> {
        if (params.graph.m, params.patience) != (self.params.graph.m, self.params.patience) {
            return Err(r.fail("params", format!("saved with {params:?}, this index has {:?}", self.params)));
        }
        r.expect_dim("dim", self.dim)?;
        r.expect_rows("n", keys, self.dim)
    }

    fn to_fixed(&self) -> FixedGraph {
        let m = self.params.graph.m;
        let mut g = FixedGraph::new(m);
        g.resize(self.n());
        for i in 0..self.n() as u32 {
            g.set(i, &self.links.row(i, m));
        }
        g
    }
}

const COMPACT_TAG: &[u8; 8] = b"ndl.rgq8";
const COMPACT_VERSION: u32 = 1;
/// The state of an index that holds no graph (its own format: nothing but the parameters).
const SCAN_TAG: &[u8; 8] = b"ndl.rgqs";
const SCAN_VERSION: u32 = 1;

impl VectorIndex for CompactGraph {
    fn describe(&self) -> String {
        let p = &self.params;
        let s = if p.patience == DEFAULT_PATIENCE { String::new() } else { format!("s{}", p.patience) };
        let x = if p.scan_below == DEFAULT_SCAN_BELOW { String::new() } else { format!("x{}", p.scan_below) };
        format!("RoarGraph{}q8{s}{x}", p.graph.m)
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
        if n < self.params.scan_below {
            self.adopt_scan(keys);
            let seconds = t.elapsed().as_secs_f64();
            return Ok(BuildStats { vectors: n, train_queries: 0, seconds, bytes: self.memory_bytes() });
        }
        let mut graph = RoarGraph::with_params(self.dim, self.params.graph)?;
        let stats = graph.build(keys, train_queries)?;
        self.adopt(graph.into_parts(), keys);
        Ok(BuildStats {
            vectors: stats.vectors,
            train_queries: stats.train_queries,
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
        if let Some(codes) = &mut self.scan {
            codes.push(keys, self.dim);
            return Ok(start as u32..(start + n_new) as u32);
        }
        // Codes and empty rows for the whole batch first (one allocation each); a key not yet
        // linked has no in-links, so the walks linking the earlier ones never reach it.
        self.codes.push(keys, self.dim);
        self.links.widen_for(self.codes.n);
        self.links.push_rows(n_new, self.params.graph.m);
        for id in start..start + n_new {
            self.link_new(id as u32);
        }
        Ok(start as u32..(start + n_new) as u32)
    }

    fn search(&self, queries: &[f32], k: usize, params: &SearchParams) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.n())?;
        let ef = params.effort.unwrap_or(self.params.graph.ef_search).max(1);
        let rows: Vec<_> = queries.par_chunks_exact(self.dim).map(|q| self.search_one(q, k, ef, &[])).collect();
        Ok(SearchResult::from_rows(k, rows))
    }

    fn search_group(&self, queries: &[f32], k: usize, params: &SearchParams, seeds: &[u32]) -> Result<SearchResult> {
        check_search(queries, self.dim, k, self.n())?;
        let ef = params.effort.unwrap_or(self.params.graph.ef_search).max(1);
        Ok(SearchResult::from_rows(k, vec![self.search_one(queries, k, ef, seeds)]))
    }

    fn memory_bytes(&self) -> usize {
        self.codes.bytes()
            + self.scan.as_ref().map_or(0, ScanCodes::bytes)
            + self.links.bytes()
            + (self.entries.len() + self.cluster_entries.len() + self.centroids.len()) * 4
            + self.visited.bytes()
    }

    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        if self.scan.is_some() {
            let mut w = Writer::new(out, SCAN_TAG, SCAN_VERSION);
            self.params.graph.save(&mut w);
            w.len(self.params.patience);
            w.len(self.params.scan_below);
            w.len(self.dim);
            w.len(self.n());
            return Ok(());
        }
        let mut w = Writer::new(out, COMPACT_TAG, COMPACT_VERSION);
        self.params.graph.save(&mut w);
        w.len(self.params.patience);
        w.len(self.dim);
        w.len(self.n());
        self.to_fixed().save(&mut w);
        w.u32s(&self.entries);
        w.f32s(&self.centroids);
        w.len(self.entry_width);
        w.u32s(&self.cluster_entries);
        Ok(())
    }

    fn load_state(&mut self, state: &[u8], keys: &[f32]) -> Result<()> {
        if state.starts_with(SCAN_TAG) {
            return self.load_scan(state, keys);
        }
        let mut r = Reader::new("compact RoarGraph index", state, COMPACT_TAG, COMPACT_VERSION)?;
        let graph_params = RoarGraphParams::load(&mut r)?;
        let patience = r.len("patience", usize::MAX)?;
        // The threshold only decides the mode at build; a saved graph stays one.
        let params = CompactGraphParams { graph: graph_params, patience, scan_below: self.params.scan_below };
        let n = self.check_saved(&mut r, &params, keys)?;
        self.params = params;
        let dim = self.dim;
        let graph = FixedGraph::load(&mut r, "graph", params.graph.m, n, n)?;
        let entries = r.u32s("entries", n)?;
        r.check_below("entries", &entries, n)?;
        let centroids = r.f32s("centroids", params.graph.clusters.saturating_mul(dim))?;
        if !centroids.len().is_multiple_of(dim) {
            return Err(r.fail("centroids", format!("{} floats are not rows of {dim}", centroids.len())));
        }
        let entry_width = r.len("entry_width", n)?;
        let cluster_entries = r.u32s_exact("cluster_entries", (centroids.len() / dim).saturating_mul(entry_width))?;
        r.check_below("cluster_entries", &cluster_entries, n)?;
        r.finish()?;
        self.adopt(RoarParts { graph, entries, centroids, cluster_entries, entry_width }, keys);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state saved with other build parameters (an older default) loads, keeps them, and
    /// searches as the saved index did; another degree is refused.
    #[test]
    fn a_state_built_with_other_build_parameters_loads() {
        let dim = 16;
        let keys: Vec<f32> = (0..400 * dim).map(|i| ((i * 37 % 101) as f32 * 0.37).sin()).collect();
        let queries: Vec<f32> = (0..80 * dim).map(|i| ((i * 13 % 97) as f32 * 0.21).cos()).collect();
        let old = CompactGraphParams {
            graph: RoarGraphParams { ef_construction: 100, max_train: 64, ..CompactGraphParams::default().graph },
            patience: DEFAULT_PATIENCE,
            scan_below: 0,
        };
        let mut saved = CompactGraph::with_params(dim, old).unwrap();
        saved.build(&keys, Some(&queries)).unwrap();
        let mut state = Vec::new();
        saved.save_state(&mut state).unwrap();
        let mut loaded =
            CompactGraph::with_params(dim, CompactGraphParams { scan_below: 0, ..Default::default() }).unwrap();
        loaded.load_state(&state, &keys).unwrap();
        assert_eq!(loaded.params(), &old);
        let p = SearchParams::default();
        let q = &queries[..dim];
        assert_eq!(loaded.search(q, 10, &p).unwrap().labels, saved.search(q, 10, &p).unwrap().labels);
        let other_m = CompactGraphParams { graph: RoarGraphParams { m: 16, ..old.graph }, ..old };
        let mut refused = CompactGraph::with_params(dim, other_m).unwrap();
        assert!(refused.load_state(&state, &keys).is_err());
    }

    #[test]
    fn rank_keys_order_as_the_results_and_round_trip() {
        let scores = [f32::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-30, 2.25, 7.0, f32::MAX, f32::INFINITY];
        let mut pairs: Vec<(u32, f32)> =
            scores.iter().enumerate().flat_map(|(i, &s)| [(i as u32, s), (100 - i as u32, s)]).collect();
        let mut keys: Vec<u64> = pairs.iter().map(|&(id, s)| rank_key(id, s)).collect();
        for (&k, &(id, s)) in keys.iter().zip(&pairs) {
            let back = from_rank_key(k);
            assert_eq!((back.0, back.1.to_bits()), (id, s.to_bits()));
        }
        keys.sort_unstable();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let sorted: Vec<u64> = pairs.iter().map(|&(id, s)| rank_key(id, s)).collect();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn links_widen_to_u32_keeping_every_row() {
        let m = 3;
        let mut l = Links::with_capacity(4, m);
        l.push_rows(4, m);
        l.set(0, &[1, 2], m);
        l.set(2, &[0, 1, 3], m);
        assert!(l.try_push(0, 3, m) && !l.try_push(0, 3, m) && !l.try_push(2, 0, m));
        let rows: Vec<Vec<u32>> = (0..4).map(|i| l.row(i, m)).collect();
        assert_eq!(rows, [vec![1, 2, 3], vec![], vec![0, 1, 3], vec![]]);
        assert_eq!((l.width(), l.bytes()), (2, 4 * m * 2));
        l.widen_for(U16_KEYS - 1);
        assert_eq!(l.width(), 2, "still addressable with u16");
        l.widen_for(U16_KEYS);
        assert_eq!(l.width(), 4);
        assert_eq!((0..4).map(|i| l.row(i, m)).collect::<Vec<_>>(), rows);
        // Ids past u16 are stored whole.
        l.push_rows(1, m);
        l.set(4, &[70_000, 1], m);
        assert_eq!(l.row(4, m), [70_000, 1]);
    }
}
