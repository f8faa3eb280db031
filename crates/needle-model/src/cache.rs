//! The KV cache of one generation: host-tier pages per layer and KV head, the selectors that
//! choose what each decode step attends to, and the sample of prefill queries they train on.

use std::time::{Duration, Instant};

use needle_core::decode::{GroupScratch, attend_group};
use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, FullSelector, GqaLayout, HeadId, KvDtype, PagedRows, Pages,
    RowSource, SearchStats, Selection, SelectorFactory,
};
use rayon::prelude::*;

use needle_kv::{ContextReader, ContextWriter, SpillFile, TierBudget};

use crate::background::Worker;
use crate::error::{Error, Result};

/// Rows per KV page (the unit a storage tier moves).
pub const PAGE_SIZE: usize = 256;

/// How a generation uses its selectors, and how its KV pages are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectionConfig {
    /// Dynamic-part budget of every selector.
    pub budget: Budget,
    /// The first `dense_layers` layers always attend to everything (as Quest and MagicPIG do).
    pub dense_layers: usize,
    /// At most this many prefill positions contribute training queries (evenly spaced); 0 keeps
    /// none (selectors that learn nothing from queries).
    pub train_positions: usize,
    /// Precision of the host KV pages (keys and values, prefill and decode alike).
    pub kv: KvDtype,
    /// How prefill attends: dense, or block-sparse through a pattern (`needle-prefill`).
    pub prefill: needle_core::prefill::PrefillSpec,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            budget: Budget::TopK(100),
            dense_layers: 0,
            train_positions: 4096,
            kv: KvDtype::F32,
            prefill: needle_core::prefill::PrefillSpec::DENSE,
        }
    }
}

/// Cost of the decode steps so far, summed over layers and heads.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DecodeStats {
    /// Decode steps taken.
    pub steps: u64,
    /// Keys attended (static part plus selected), summed over layers, KV heads and steps.
    pub keys_attended: u64,
    /// Keys in the context, summed the same way: the dense cost.
    pub keys_total: u64,
    /// Keys in the dynamic parts, summed the same way.
    pub keys_dynamic: u64,
    /// Keys selected from the dynamic parts, summed the same way.
    pub keys_selected: u64,
    /// What the selectors touched to choose.
    pub select: SearchStats,
    /// Wall time choosing keys. Heads run in parallel: the wall time of a layer's heads is split
    /// between choosing and attending in proportion to their per-head times.
    #[serde(serialize_with = "secs")]
    pub select_time: Duration,
    /// Wall time attending (static + selected, merged), split as above.
    #[serde(serialize_with = "secs")]
    pub attend_time: Duration,
    /// Wall time inserting the tokens that leave the window into the selectors (decode).
    #[serde(serialize_with = "secs")]
    pub insert_time: Duration,
    /// Wall time building selectors after prefill: what prefill's caller waits for.
    #[serde(serialize_with = "secs")]
    pub build_time: Duration,
    /// Time the background builder spent on layers during prefill (overlapped with the forward
    /// passes of later layers; see [`KvCache::set_build_during_prefill`]).
    #[serde(serialize_with = "secs")]
    pub build_background_time: Duration,
    /// What the selectors' builds reported, summed over heads (vectors, training queries, bytes).
    pub build: BuildStats,
    /// KV pages (keys and values counted apart) that decode attention read from the disk tier,
    /// summed over layers, heads and steps; counted only under a host budget.
    pub pages_faulted: u64,
    /// KV pages moved from RAM to the disk tier so far.
    pub pages_spilled: u64,
    /// Key blocks sparse prefill attended (`SelectionConfig::prefill` with a pattern), summed
    /// over chunks, layers and KV heads.
    pub prefill_blocks: u64,
    /// Key blocks a dense prefill of the same chunks would have attended, summed the same way
    /// (`prefill_blocks / prefill_blocks_dense` is the pattern's density).
    pub prefill_blocks_dense: u64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl DecodeStats {
    /// Share of context keys whose full vectors were read per step, over the dense cost: the
    /// static part, plus the selected keys or the keys the selector scored at full precision,
    /// whichever is more (exact scans score what they then attend).
    pub fn share_touched(&self) -> f64 {
        if self.keys_total == 0 {
            return 0.0;
        }
        let static_keys = self.keys_attended - self.keys_selected;
        (static_keys + self.keys_selected.max(self.select.full_scored)) as f64 / self.keys_total as f64
    }
}

/// What [`KvCache::decode_dynamic`] returns for one layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DynamicPart {
    /// Per KV head, the rows its selector picked (all in the dynamic part).
    pub ids: Vec<Vec<u32>>,
    /// Per KV head, additive log-weights parallel to `ids` (empty when the selector weights none).
    pub log_weights: Vec<Vec<f32>>,
    /// When the host attended: outputs `[n_q_heads × dim]` over the picked rows alone and their
    /// log-sum-exp `[n_q_heads]` (`-inf` and zeros where nothing was picked).
    pub host: Option<(Vec<f32>, Vec<f32>)>,
}

/// How a backend with a device ([`NeedleBackend::KvMirror`](crate::NeedleBackend::KvMirror)
/// not `()`: the CubeCL arm) runs a decode step's attention; host backends always attend on the
/// host and ignore it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecodeMode {
    /// Static part on the device, the selected rows on the host at the same time, one merge.
    #[default]
    Hybrid,
    /// Static part and selected rows in one gathered device pass (the host only selects).
    Device,
}

/// Below this many cached rows in a layer (all KV heads), decode attention runs on one thread.
const PAR_MIN_ROWS: usize = 2048;

struct HeadCache {
    keys: PagedRows,
    values: PagedRows,
    /// Per page: the tier clock when decode last read it (kept only under a host budget).
    last_read: Vec<u64>,
    selector: Box<dyn AttentionSelector>,
    /// Prefill queries of this head's group at sampled positions, row-major.
    train_queries: Vec<f32>,
    selection: Selection,
    scratch: GroupScratch,
}

/// Post-RoPE queries recorded for chosen layers (for `needle trace` and fidelity checks).
#[derive(Debug, Clone, Default)]
pub struct QueryTrace {
    /// The layers recorded, ascending.
    pub layers: Vec<usize>,
    /// Per recorded layer: prefill queries, row-major `positions × n_q_heads × dim`.
    pub prefill: Vec<Vec<f32>>,
    /// Per recorded layer: decode queries, row-major `steps × n_q_heads × dim`.
    pub decode: Vec<Vec<f32>>,
}

impl QueryTrace {
    fn slot(&self, layer: usize) -> Option<usize> {
        self.layers.binary_search(&layer).ok()
    }
}

/// The host budget and the disk tier pages go to past it.
struct Tiers {
    /// Bytes of pages the host tier may hold.
    host: u64,
    spill: SpillFile,
    /// Advances once per forward pass: the "time" of [`HeadCache::last_read`].
    clock: u64,
    /// Whether the budget was found too small for the pages being filled (said once).
    warned: bool,
}

/// A layer's heads handed to the background builder.
type EarlyBuild = (usize, Vec<HeadCache>);

/// What the background builder gives back: the layer's heads (always, built or not), its build
/// and the time it took.
type EarlyBuilt = (usize, Vec<HeadCache>, Result<BuildStats>, Duration);

/// Builds one head's selector over its keys and training queries, dropping the queries unless
/// `retain`.
fn build_head(layer: usize, kv_head: usize, h: &mut HeadCache, scale: f32, retain: bool) -> Result<BuildStats> {
    let ctx = BuildContext { head: HeadId { layer, kv_head }, keys: &h.keys, train_queries: &h.train_queries, scale };
    let stats = h.selector.build(&ctx)?;
    if !retain {
        h.train_queries = Vec::new();
    }
    Ok(stats)
}

/// KV cache plus selectors for one sequence. `M` is the device copy of the rows that the
/// backend running the model keeps ([`NeedleBackend::KvMirror`](crate::NeedleBackend::KvMirror),
/// `()` on the CPU): a `Llama<B>` takes a `KvCache<B::KvMirror>`. The mirror is not saved and
/// not forked; a backend rebuilds it from the host rows when it is missing or behind.
pub struct KvCache<M = ()> {
    heads: Vec<Vec<HeadCache>>,
    gqa: GqaLayout,
    head_dim: usize,
    config: SelectionConfig,
    built: bool,
    train_stride: usize,
    prompt_end: Option<usize>,
    retain_training: bool,
    trace: Option<QueryTrace>,
    tiers: Option<Tiers>,
    /// Whether layers start building as soon as prefill is done with them.
    early_build: bool,
    /// The background builder holding those layers until [`KvCache::build`].
    builder: Option<Worker<EarlyBuild, EarlyBuilt>>,
    /// The backend's device copy of the rows.
    pub(crate) mirror: M,
    /// How a device backend runs decode attention.
    decode_mode: DecodeMode,
    /// Decode cost so far.
    pub stats: DecodeStats,
}

/// One row of heads per layer, each with a selector from `factory` (full attention below
/// `config.dense_layers`) and the keys, values and training queries `state(layer, kv_head)` gives.
fn make_heads(
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    factory: &dyn SelectorFactory,
    config: &SelectionConfig,
    mut state: impl FnMut(usize, usize) -> Result<(PagedRows, PagedRows, Vec<f32>)>,
) -> Result<Vec<Vec<HeadCache>>> {
    (0..n_layers)
        .map(|layer| {
            (0..n_kv_heads)
                .map(|kv_head| {
                    let selector: Box<dyn AttentionSelector> = if layer < config.dense_layers {
                        Box::new(FullSelector)
                    } else {
                        factory.create(HeadId { layer, kv_head }, head_dim)?
                    };
                    let (keys, values, train_queries) = state(layer, kv_head)?;
                    let (selection, scratch) = (Selection::default(), GroupScratch::default());
                    Ok(HeadCache { keys, values, last_read: Vec::new(), selector, train_queries, selection, scratch })
                })
                .collect()
        })
        .collect()
}

impl<M> KvCache<M> {
    /// An empty cache for `n_layers` layers; selectors come from `factory` (layers below
    /// `config.dense_layers` get full attention).
    pub fn new(
        n_layers: usize,
        gqa: GqaLayout,
        head_dim: usize,
        factory: &dyn SelectorFactory,
        config: SelectionConfig,
    ) -> Result<Self>
    where
        M: Default,
    {
        let empty = || -> Result<_> {
            let rows = || PagedRows::with_dtype(head_dim, PAGE_SIZE, config.kv);
            Ok((rows()?, rows()?, Vec::new()))
        };
        let heads = make_heads(n_layers, gqa.n_kv_heads, head_dim, factory, &config, |_, _| empty())?;
        Ok(Self {
            heads,
            gqa,
            head_dim,
            config,
            built: false,
            train_stride: 1,
            prompt_end: None,
            retain_training: false,
            trace: None,
            tiers: None,
            early_build: true,
            builder: None,
            mirror: M::default(),
            decode_mode: DecodeMode::default(),
            stats: DecodeStats::default(),
        })
    }

    /// Whether a layer's selectors start building on a background thread as soon as the
    /// planned prompt ([`KvCache::plan_training`]) has passed that layer, while later layers
    /// compute (on by default), or all after the prefill. The built selectors are the same
    /// either way. Not under a host budget ([`KvCache::set_kv_budget`]): the budget needs every
    /// layer's pages at hand.
    pub fn set_build_during_prefill(&mut self, on: bool) {
        self.early_build = on;
    }

    /// Called once a forward pass has attended `layer` (by [`crate::cached_attention`]): when
    /// that pass ended the planned prompt, the layer's keys and training queries are final and
    /// its heads go to the background builder until [`KvCache::build`]. The last layer stays:
    /// nothing computes after it for a build to overlap.
    pub(crate) fn layer_prefilled(&mut self, layer: usize, scale: f32) -> Result<()> {
        if self.built
            || !self.early_build
            || self.tiers.is_some()
            || layer + 1 >= self.heads.len()
            || self.heads[layer].is_empty()
            || self.prompt_end != Some(self.heads[layer][0].keys.len())
        {
            return Ok(());
        }
        if self.builder.is_none() {
            let retain = self.retain_training;
            let run = move |(layer, mut row): EarlyBuild| -> EarlyBuilt {
                let t0 = Instant::now();
                let stats = row.iter_mut().enumerate().try_fold(BuildStats::default(), |mut acc, (j, h)| {
                    acc += build_head(layer, j, h, scale, retain)?;
                    Ok(acc)
                });
                (layer, row, stats, t0.elapsed())
            };
            let worker = Worker::spawn("needle-build", run)
                .map_err(|e| Error::State(format!("starting the background index builder: {e}")))?;
            self.builder = Some(worker);
        }
        let row = std::mem::take(&mut self.heads[layer]);
        if let Some(b) = &self.builder {
            b.submit((layer, row));
        }
        Ok(())
    }

    /// Holds the KV pages in RAM to `budget.host` bytes: past it, the pages decode read least
    /// recently (static parts last) move to an unnamed spill file in `dir`, at most
    /// `budget.disk` bytes, and are read back in place when a selector picks them. Applies at
    /// once and after every forward pass. A budget with no host limit removes the tiering (pages
    /// already spilled stay where they are).
    pub fn set_kv_budget(&mut self, budget: TierBudget, dir: &std::path::Path) -> Result<()> {
        let Some(host) = budget.host else {
            self.tiers = None;
            return Ok(());
        };
        let spill = SpillFile::create(dir, budget.disk)?;
        self.tiers = Some(Tiers { host, spill, clock: 0, warned: false });
        self.enforce_budget()
    }

    /// Bytes of KV pages in RAM and on the disk tier (spilled, or read in place from a loaded
    /// context file).
    pub fn tier_bytes(&self) -> (usize, usize) {
        let heads = self.heads.iter().flatten();
        heads.fold((0, 0), |(host, disk), h| {
            let (all, ram) = (h.keys.bytes() + h.values.bytes(), h.keys.host_bytes() + h.values.host_bytes());
            (host + ram, disk + all - ram)
        })
    }

    /// Spills the coldest full pages until the host tier is within its budget.
    fn enforce_budget(&mut self) -> Result<()> {
        let Some(tiers) = self.tiers.as_mut() else { return Ok(()) };
        tiers.clock += 1;
        let limit = tiers.host;
        let host: usize = self.heads.iter().flatten().map(|h| h.keys.host_bytes() + h.values.host_bytes()).sum();
        if host as u64 <= limit {
            return Ok(());
        }
        // (static part?, last read, page, layer, head): pages outside the static parts go
        // first, least recently read first, older pages first among equals.
        let mut candidates = Vec::new();
        for (layer, row) in self.heads.iter_mut().enumerate() {
            for (j, h) in row.iter_mut().enumerate() {
                let (n, ps) = (h.keys.len(), h.keys.page_size());
                h.last_read.resize(h.keys.pages().count(), 0);
                let dynamic = h.selector.static_part().dynamic_range(n);
                let (ds, de) = (dynamic.start as usize, dynamic.end as usize);
                for p in (0..h.keys.full_pages()).filter(|&p| h.keys.pages().is_host(p) || h.values.pages().is_host(p))
                {
                    let in_static = p * ps < ds || (p + 1) * ps > de;
                    candidates.push((in_static, h.last_read[p], p, layer, j));
                }
            }
        }
        candidates.sort_unstable();
        let mut over = host as u64 - limit;
        for (_, _, p, layer, j) in candidates {
            let h = &mut self.heads[layer][j];
            let page = h.keys.page_bytes() as u64;
            for rows in [&mut h.keys, &mut h.values] {
                if rows.spill_page(p, &mut tiers.spill)? {
                    self.stats.pages_spilled += 1;
                    over = over.saturating_sub(page);
                }
            }
            if over == 0 {
                return Ok(());
            }
        }
        if !std::mem::replace(&mut tiers.warned, true) {
            tracing::warn!(
                "the KV pages being filled (one per layer, KV head, keys and values) exceed the host budget of {limit} bytes by {over}"
            );
        }
        Ok(())
    }

    /// Stamps the pages decode attention read for each head of `layer` and counts those it
    /// read from the disk tier.
    fn note_reads(&mut self, layer: usize) {
        let Some(tiers) = self.tiers.as_ref() else { return };
        let mut pages: Vec<u32> = Vec::new();
        for h in &mut self.heads[layer] {
            let (n, ps) = (h.keys.len(), h.keys.page_size() as u32);
            h.last_read.resize(h.keys.pages().count(), 0);
            let dynamic = h.selector.static_part().dynamic_range(n);
            pages.clear();
            pages.extend(0..dynamic.start.div_ceil(ps));
            if (dynamic.end as usize) < n {
                pages.extend(dynamic.end / ps..=(n as u32 - 1) / ps);
            }
            pages.extend(h.selection.ids.iter().map(|id| id / ps));
            pages.sort_unstable();
            pages.dedup();
            for &p in &pages {
                h.last_read[p as usize] = tiers.clock;
                let on_disk = [&h.keys, &h.values].iter().filter(|r| !r.pages().is_host(p as usize)).count();
                self.stats.pages_faulted += on_disk as u64;
            }
        }
    }

    /// Keeps the training queries after the build, so that [`KvCache::fork`] can build other
    /// selectors over the same prefill. Call before prefill.
    pub fn retain_training_queries(&mut self) {
        self.retain_training = true;
    }

    /// A copy of this prefilled cache with fresh selectors from `factory`, built over the same
    /// keys and training queries: compares selectors without prefilling again. Pages are
    /// converted to `config.kv` when it differs (the prefill itself ran at this cache's
    /// precision). Needs
    /// [`KvCache::retain_training_queries`] before the prefill (else the selectors train on no queries).
    pub fn fork(&self, factory: &dyn SelectorFactory, config: SelectionConfig, scale: f32) -> Result<Self>
    where
        M: Default,
    {
        if !self.built {
            return Err(Error::State("fork needs a prefilled cache".into()));
        }
        if !self.retain_training {
            tracing::warn!("forking a cache that did not retain training queries: selectors train on keys only");
        }
        let heads = make_heads(self.heads.len(), self.gqa.n_kv_heads, self.head_dim, factory, &config, |l, j| {
            let h = &self.heads[l][j];
            Ok((h.keys.to_dtype(config.kv)?, h.values.to_dtype(config.kv)?, h.train_queries.clone()))
        })?;
        let mut c = KvCache {
            heads,
            gqa: self.gqa,
            head_dim: self.head_dim,
            config,
            built: false,
            train_stride: self.train_stride,
            prompt_end: self.prompt_end,
            retain_training: self.retain_training,
            trace: self.trace.as_ref().map(|t| QueryTrace {
                layers: t.layers.clone(),
                prefill: t.prefill.clone(),
                decode: vec![Vec::new(); t.layers.len()],
            }),
            tiers: None,
            early_build: self.early_build,
            builder: None,
            mirror: M::default(),
            decode_mode: self.decode_mode,
            stats: DecodeStats::default(),
        };
        c.build(scale)?;
        Ok(c)
    }

    /// Records every query of `layers` from now on (prefill and decode).
    pub fn trace_queries(&mut self, mut layers: Vec<usize>) -> Result<()> {
        layers.sort_unstable();
        layers.dedup();
        if let Some(&bad) = layers.iter().find(|&&l| l >= self.heads.len()) {
            return Err(Error::invalid("layers", format!("layer {bad} does not exist ({} layers)", self.heads.len())));
        }
        let n = layers.len();
        self.trace = Some(QueryTrace { layers, prefill: vec![Vec::new(); n], decode: vec![Vec::new(); n] });
        Ok(())
    }

    /// The queries recorded so far, if tracing.
    pub fn query_trace(&self) -> Option<&QueryTrace> {
        self.trace.as_ref()
    }

    /// True when queries of `layer` must be read back (training sample or trace).
    pub fn wants_queries(&self, layer: usize) -> bool {
        !self.built || self.trace.as_ref().is_some_and(|t| t.slot(layer).is_some())
    }

    /// Records queries of `layer` (`t × n_q_heads × dim`) for the trace and, during prefill,
    /// the training sample.
    pub fn observe_queries(&mut self, layer: usize, first_pos: usize, queries: &[f32]) {
        let built = self.built;
        if let Some(t) = self.trace.as_mut()
            && let Some(i) = t.slot(layer)
        {
            if built { &mut t.decode[i] } else { &mut t.prefill[i] }.extend_from_slice(queries);
        }
        if !built {
            self.record_queries(layer, first_pos, queries);
        }
    }

    /// Tokens held by `layer` (layers fill one after another within a forward pass).
    pub fn layer_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.heads[layer].first().map_or(0, |h| h.keys.len()))
    }

    /// Query/KV head layout the cache was made for.
    pub fn gqa(&self) -> GqaLayout {
        self.gqa
    }

    /// Floats per key and value row.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Layers held.
    pub fn n_layers(&self) -> usize {
        self.heads.len()
    }

    /// Tokens held. Read off the last layer, which fills last and never goes to the background
    /// builder.
    pub fn len(&self) -> usize {
        self.heads.last().and_then(|l| l.first()).map_or(0, |h| h.keys.len())
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once selectors were built (after prefill).
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// The selection configuration.
    pub fn config(&self) -> &SelectionConfig {
        &self.config
    }

    /// The backend's device copy of the rows ([`NeedleBackend::KvMirror`](crate::NeedleBackend::KvMirror)).
    pub fn mirror(&self) -> &M {
        &self.mirror
    }

    /// The backend's device copy of the rows, to bring up to date. A backend that reads the host
    /// rows while it writes the mirror takes it out (`std::mem::take`) and puts it back.
    pub fn mirror_mut(&mut self) -> &mut M {
        &mut self.mirror
    }

    /// How a backend with a device runs decode attention ([`DecodeMode::Hybrid`] unless set).
    pub fn set_decode_mode(&mut self, mode: DecodeMode) {
        self.decode_mode = mode;
    }

    /// The decode mode in force.
    pub fn decode_mode(&self) -> DecodeMode {
        self.decode_mode
    }

    /// Adds a sparse prefill chunk's key blocks: `attended` of `dense`.
    pub(crate) fn count_prefill_blocks(&mut self, attended: u64, dense: u64) {
        self.stats.prefill_blocks += attended;
        self.stats.prefill_blocks_dense += dense;
    }

    /// Spec of the selector serving `layer`, KV head 0.
    pub fn selector_describe(&self, layer: usize) -> String {
        self.heads.get(layer).and_then(|l| l.first()).map_or_else(String::new, |h| h.selector.describe())
    }

    /// Host bytes held by keys and values, and by selector structures.
    pub fn memory_bytes(&self) -> (usize, usize) {
        let heads = self.heads.iter().flatten();
        heads.fold((0, 0), |(kv, sel), h| (kv + h.keys.bytes() + h.values.bytes(), sel + h.selector.memory_bytes()))
    }

    /// Keys of one layer and KV head.
    pub fn keys(&self, layer: usize, kv_head: usize) -> &PagedRows {
        &self.heads[layer][kv_head].keys
    }

    /// Values of one layer and KV head.
    pub fn values(&self, layer: usize, kv_head: usize) -> &PagedRows {
        &self.heads[layer][kv_head].values
    }

    /// Plans a prefill of a prompt ending at position `prompt_len`: how prefill queries are
    /// sampled, and where a sparse prefill pattern's dense last query block is. Call before the
    /// prefill's first [`KvCache::observe_queries`].
    pub fn plan_training(&mut self, prompt_len: usize) {
        self.train_stride = prompt_len.div_ceil(self.config.train_positions.max(1)).max(1);
        self.prompt_end = Some(prompt_len);
    }

    /// The position after the planned prompt's last token ([`KvCache::plan_training`]), if known.
    pub fn prompt_end(&self) -> Option<usize> {
        self.prompt_end
    }

    /// Appends `t` tokens' keys and values (row-major `t × n_kv_heads × dim`) to `layer`.
    /// After the build, tokens leaving the window are inserted into the selectors.
    pub fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let d = self.head_dim;
        let row = self.gqa.n_kv_heads * d;
        if keys.len() != values.len() || !keys.len().is_multiple_of(row) {
            return Err(Error::invalid(
                "keys/values",
                format!(
                    "{} keys and {} values are not whole rows of n_kv_heads × dim = {row}",
                    keys.len(),
                    values.len()
                ),
            ));
        }
        let (built, n_kv) = (self.built, self.gqa.n_kv_heads);
        let push = |(j, h): (usize, &mut HeadCache)| -> Result<()> {
            for (k, v) in keys.chunks_exact(d).zip(values.chunks_exact(d)).skip(j).step_by(n_kv) {
                let before = h.selector.static_part().dynamic_range(h.keys.len());
                h.keys.push(k)?;
                h.values.push(v)?;
                if built {
                    let after = h.selector.static_part().dynamic_range(h.keys.len());
                    let joined = before.end.max(after.start)..after.end;
                    if !joined.is_empty() {
                        h.selector.insert(&h.keys, joined)?;
                    }
                }
            }
            Ok(())
        };
        // After the build, inserting into an index costs a search: the KV heads run in parallel
        // when any of them has a dynamic part to insert into (not for `full`, say).
        let t = keys.len() / row;
        let inserts = built
            && self.heads[layer].iter().any(|h| !h.selector.static_part().dynamic_range(h.keys.len() + t).is_empty());
        if inserts {
            let t0 = Instant::now();
            self.heads[layer].par_iter_mut().enumerate().try_for_each(push)?;
            self.stats.insert_time += t0.elapsed();
        } else {
            self.heads[layer].iter_mut().enumerate().try_for_each(push)?;
        }
        if let Some(tiers) = &self.tiers {
            // The previous layer's attention is done with the spilled pages it read.
            tiers.spill.release();
        }
        if layer + 1 == self.heads.len() { self.enforce_budget() } else { Ok(()) }
    }

    /// Keeps the queries of sampled prefill positions (`first_pos..first_pos + t`, row-major
    /// `t × n_q_heads × dim`) as training queries of their KV heads.
    fn record_queries(&mut self, layer: usize, first_pos: usize, queries: &[f32]) {
        if self.config.train_positions == 0 {
            return;
        }
        let d = self.head_dim;
        let row = self.gqa.n_q_heads * d;
        for (i, q) in queries.chunks_exact(row).enumerate() {
            if !(first_pos + i).is_multiple_of(self.train_stride) {
                continue;
            }
            for (j, h) in self.heads[layer].iter_mut().enumerate() {
                h.train_queries.extend_from_slice(&q[self.gqa.group(j).start * d..self.gqa.group(j).end * d]);
            }
        }
    }

    /// Builds every selector from the prefilled keys and sampled queries (parallel over heads).
    /// Layers the background builder took during prefill come back built; those it had not
    /// started are built here with the rest.
    pub fn build(&mut self, scale: f32) -> Result<()> {
        let start = Instant::now();
        let mut early = BuildStats::default();
        let mut first_err = None;
        // Layers the background builder finished; the pass below builds the rest.
        let mut ready = vec![false; self.heads.len()];
        if let Some(builder) = self.builder.take() {
            let (left, done) = builder.finish().ok_or_else(|| {
                Error::State("the background index builder panicked; this cache's selectors are lost".into())
            })?;
            for (layer, row, stats, took) in done {
                self.heads[layer] = row;
                ready[layer] = true;
                self.stats.build_background_time += took;
                match stats {
                    Ok(s) => early += s,
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            for (layer, row) in left {
                self.heads[layer] = row;
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let budget = self.config.budget;
        budget.validate(self.len())?;
        let (retain, ready) = (self.retain_training, &ready);
        let per_head: Vec<BuildStats> = self
            .heads
            .par_iter_mut()
            .enumerate()
            .filter(|(layer, _)| !ready[*layer])
            .flat_map(|(layer, row)| {
                row.par_iter_mut().enumerate().map(move |(kv_head, h)| build_head(layer, kv_head, h, scale, retain))
            })
            .collect::<Result<_>>()?;
        for s in per_head {
            self.stats.build += s;
        }
        self.stats.build += early;
        self.built = true;
        self.stats.build_time += start.elapsed();
        Ok(())
    }

    /// Decode attention of one layer: for each KV head, its selector picks dynamic-part ids
    /// for the group's queries, then each query head attends to static part + selection,
    /// merged by log-sum-exp. `q` is `n_q_heads × dim`; returns the same shape.
    pub fn attend_decode(&mut self, layer: usize, q: &[f32], scale: f32) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        if q.len() != self.gqa.n_q_heads * self.head_dim {
            return Err(Error::invalid(
                "q",
                format!(
                    "{} floats; decode attention takes n_q_heads × dim = {}",
                    q.len(),
                    self.gqa.n_q_heads * self.head_dim
                ),
            ));
        }
        if !self.built {
            return Err(Error::State("decode attention before the selectors were built (prefill first)".into()));
        }
        let (d, gqa, budget) = (self.head_dim, self.gqa, self.config.budget);
        // Select and attend per KV head in one parallel region (serial when small: waking a
        // thread costs more than a few hundred keys).
        let step = |(j, h): (usize, &mut HeadCache)| -> Result<(Vec<f32>, Duration, Duration)> {
            let qg = &q[gqa.group(j).start * d..gqa.group(j).end * d];
            let t0 = Instant::now();
            h.selector.select(qg, &h.keys, &budget, &mut h.selection)?;
            let t1 = Instant::now();
            let sp = h.selector.static_part();
            let out = attend_group(qg, &h.keys, &h.values, sp, &h.selection, scale, &mut h.scratch)?.to_vec();
            Ok((out, t1 - t0, t1.elapsed()))
        };
        let wall = Instant::now();
        let heads = &mut self.heads[layer];
        let rows: usize = heads.iter().map(|h| h.keys.len()).sum();
        let outs: Vec<_> = if rows < PAR_MIN_ROWS {
            heads.iter_mut().enumerate().map(step).collect::<Result<_>>()?
        } else {
            heads.par_iter_mut().enumerate().map(step).collect::<Result<_>>()?
        };
        let (sel, att): (Duration, Duration) = outs.iter().fold(Default::default(), |(a, b), o| (a + o.1, b + o.2));
        self.account_step(layer, wall.elapsed(), sel, att);
        Ok(outs.into_iter().flat_map(|o| o.0).collect())
    }

    /// Adds one layer's decode step to the stats (`wall` split between selection and attention
    /// as the per-head times `sel` and `att` are) and marks the pages it read.
    fn account_step(&mut self, layer: usize, wall: Duration, sel: Duration, att: Duration) {
        let s = &mut self.stats;
        let share = sel.as_secs_f64() / (sel + att).as_secs_f64().max(f64::MIN_POSITIVE);
        s.select_time += wall.mul_f64(share);
        s.attend_time += wall.mul_f64(1.0 - share);
        for h in &self.heads[layer] {
            let n = h.keys.len();
            let dynamic = h.selector.static_part().dynamic_range(n).len();
            s.keys_total += n as u64;
            s.keys_dynamic += dynamic as u64;
            s.keys_attended += (n - dynamic + h.selection.ids.len()) as u64;
            s.keys_selected += h.selection.ids.len() as u64;
            s.select += h.selection.stats;
        }
        self.note_reads(layer);
    }

    /// The host's half of a split decode step: every KV head's selector picks from its dynamic
    /// part for the query group in `q` (`[n_q_heads × dim]`), and with `attend` the host also
    /// attends to the picked rows alone, giving a partial (output and log-sum-exp) that an exact
    /// merge combines with the static part's, attended elsewhere (the CubeCL arm's device).
    pub fn decode_dynamic(&mut self, layer: usize, q: &[f32], scale: f32, attend: bool) -> Result<DynamicPart> {
        self.check_layer(layer)?;
        let (d, gqa, budget) = (self.head_dim, self.gqa, self.config.budget);
        if q.len() != gqa.n_q_heads * d {
            return Err(Error::invalid(
                "q",
                format!("{} floats; decode attention takes n_q_heads × dim = {}", q.len(), gqa.n_q_heads * d),
            ));
        }
        if !self.built {
            return Err(Error::State("decode attention before the selectors were built (prefill first)".into()));
        }
        type Head = (Vec<f32>, Vec<f32>, Duration, Duration);
        let step = |(j, h): (usize, &mut HeadCache)| -> Result<Head> {
            let qg = &q[gqa.group(j).start * d..gqa.group(j).end * d];
            let t0 = Instant::now();
            h.selector.select(qg, &h.keys, &budget, &mut h.selection)?;
            let t1 = Instant::now();
            let (mut out, mut lse) = (Vec::new(), Vec::new());
            if attend {
                let sel = &h.selection;
                let weighted = !sel.log_weights.is_empty();
                for qi in qg.chunks_exact(d) {
                    let ids = sel
                        .ids
                        .iter()
                        .enumerate()
                        .map(|(i, &id)| (id, if weighted { sel.log_weights[i] } else { 0.0 }));
                    let p = needle_core::attention::attend_weighted::<f32>(qi, &h.keys, &h.values, ids, scale)?;
                    out.extend_from_slice(&p.out);
                    lse.push(p.lse);
                }
            }
            Ok((out, lse, t1 - t0, t1.elapsed()))
        };
        let wall = Instant::now();
        let heads = &mut self.heads[layer];
        let rows: usize = heads.iter().map(|h| h.keys.len()).sum();
        let outs: Vec<Head> = if rows < PAR_MIN_ROWS {
            heads.iter_mut().enumerate().map(step).collect::<Result<_>>()?
        } else {
            heads.par_iter_mut().enumerate().map(step).collect::<Result<_>>()?
        };
        let (sel, att): (Duration, Duration) = outs.iter().fold(Default::default(), |(a, b), o| (a + o.2, b + o.3));
        self.account_step(layer, wall.elapsed(), sel, att);
        let selections = self.heads[layer].iter().map(|h| (h.selection.ids.clone(), h.selection.log_weights.clone()));
        let (ids, log_weights) = selections.unzip();
        let host = attend.then(|| {
            let (o, l): (Vec<_>, Vec<_>) = outs.into_iter().map(|o| (o.0, o.1)).unzip();
            (o.concat(), l.concat())
        });
        Ok(DynamicPart { ids, log_weights, host })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.heads.len() {
            return Err(Error::invalid("layer", format!("layer {layer} does not exist ({} layers)", self.heads.len())));
        }
        Ok(())
    }

    /// Marks the end of a decode step (for per-step averages).
    pub fn finish_step(&mut self) {
        self.stats.steps += 1;
    }

    /// The static part of the selector serving a head.
    pub fn static_part(&self, layer: usize, kv_head: usize) -> needle_core::StaticPart {
        self.heads[layer][kv_head].selector.static_part()
    }

    /// The selection a head made at the last decode step (for fidelity measurements).
    pub fn last_selection(&self, layer: usize, kv_head: usize) -> &Selection {
        &self.heads[layer][kv_head].selection
    }

    /// Writes every head's keys, values and selector state into a context file. A selector
    /// that cannot save its state ([`needle_core::Error::Unsupported`]) has its training
    /// queries written instead and is rebuilt from them at load.
    pub(crate) fn save_heads(&self, w: &mut ContextWriter, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        if !self.built {
            return Err(Error::State("saving needs a prefilled cache (its selectors built)".into()));
        }
        let mut state = Vec::new();
        for (layer, row) in self.heads.iter().enumerate() {
            for (j, h) in row.iter().enumerate() {
                write_rows(w, &section("k", layer, j), &h.keys)?;
                write_rows(w, &section("v", layer, j), &h.values)?;
                state.clear();
                match h.selector.save_state(&mut state) {
                    Ok(()) => w.section(&section("sel", layer, j), &state)?,
                    Err(needle_core::Error::Unsupported { .. }) => {
                        if h.train_queries.is_empty() && self.config.train_positions > 0 {
                            tracing::warn!(
                                "layer {layer} head {j}: `{}` cannot save its state and no training queries were retained: it will be rebuilt from keys alone",
                                h.selector.describe()
                            );
                        }
                        w.section(&section("train", layer, j), bytemuck::cast_slice(&h.train_queries))?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Writing read this layer's spilled pages through their maps: let them go.
            if let Some(tiers) = &self.tiers {
                tiers.spill.release();
            }
            progress(layer + 1, self.heads.len());
        }
        Ok(())
    }

    /// A built cache from the heads [`KvCache::save_heads`] wrote (`len` tokens, pages stored
    /// as `config.kv`), with selectors from `factory` restored from their saved state, or
    /// rebuilt from saved training queries. Heads load in parallel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_heads(
        r: &ContextReader,
        n_layers: usize,
        gqa: GqaLayout,
        head_dim: usize,
        factory: &dyn SelectorFactory,
        config: SelectionConfig,
        len: usize,
        scale: f32,
    ) -> Result<Self>
    where
        M: Default,
    {
        let mut cache = Self::new(n_layers, gqa, head_dim, factory, config)?;
        let per_head: Vec<BuildStats> = cache
            .heads
            .par_iter_mut()
            .enumerate()
            .flat_map(|(layer, row)| {
                row.par_iter_mut().enumerate().map(move |(j, h)| -> Result<BuildStats> {
                    read_rows(r, &section("k", layer, j), &mut h.keys, len)?;
                    read_rows(r, &section("v", layer, j), &mut h.values, len)?;
                    let sel = section("sel", layer, j);
                    if r.has(&sel) {
                        h.selector.load_state(r.section(&sel)?, &h.keys)?;
                        return Ok(BuildStats::default());
                    }
                    let train = r.section(&section("train", layer, j))?;
                    let floats = read_f32s(r, &section("train", layer, j), train)?;
                    let ctx = BuildContext {
                        head: HeadId { layer, kv_head: j },
                        keys: &h.keys,
                        train_queries: &floats,
                        scale,
                    };
                    Ok(h.selector.build(&ctx)?)
                })
            })
            .collect::<Result<_>>()?;
        for s in per_head {
            cache.stats.build += s;
        }
        cache.built = true;
        Ok(cache)
    }
}

/// Name of one head's section of `kind` (`k`, `v`, `sel`, `train`) in a context file.
fn section(kind: &str, layer: usize, kv_head: usize) -> String {
    format!("{kind}/{layer}/{kv_head}")
}

/// Writes the stored rows of `rows` page by page (the last page only as far as it is filled).
fn write_rows(w: &mut ContextWriter, name: &str, rows: &PagedRows) -> Result<()> {
    let (n, stride, ps) = (rows.len(), rows.stride(), rows.page_size());
    let page_bytes = rows.page_bytes();
    let filled = |i: usize| (n - i * ps).min(ps) * stride;
    match rows.pages() {
        Pages::F32(p) => w.paged_section(
            name,
            page_bytes,
            p.iter().enumerate().map(|(i, pg)| bytemuck::cast_slice(&pg[..filled(i)])),
        )?,
        Pages::F16(p) => w.paged_section(
            name,
            page_bytes,
            p.iter().enumerate().map(|(i, pg)| bytemuck::cast_slice(&pg[..filled(i)])),
        )?,
        Pages::Q8(p) => w.paged_section(name, page_bytes, p.iter().enumerate().map(|(i, pg)| &pg[..filled(i)]))?,
    }
    Ok(())
}

/// The `len` rows a section holds, in `rows`' own precision and page size, read in place
/// from the file's map (every page checked first); `rows` must be empty.
fn read_rows(r: &ContextReader, name: &str, rows: &mut PagedRows, len: usize) -> Result<()> {
    let (dim, ps) = (rows.dim(), rows.page_size());
    let pages = match rows.dtype() {
        KvDtype::F32 => Pages::F32(r.mapped_pages(name)?),
        KvDtype::F16 => Pages::F16(r.mapped_pages(name)?),
        KvDtype::Q8 => Pages::Q8(r.mapped_pages(name)?),
    };
    *rows = PagedRows::from_pages(dim, ps, pages, len).map_err(|e| corrupt(r, name, e.to_string()))?;
    Ok(())
}

/// The little-endian `f32`s of a section.
fn read_f32s(r: &ContextReader, name: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(corrupt(r, name, format!("{} bytes is not a whole number of f32s", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn corrupt(r: &ContextReader, section: &str, reason: String) -> Error {
    needle_kv::Error::Corrupt { path: r.path().to_path_buf(), section: section.into(), reason }.into()
}
