//! The KV cache of one generation: host-tier pages per layer and KV head, the selectors that
//! choose what each decode step attends to, and the sample of prefill queries they train on.
//!
//! Split by job: this module holds the pages (appending, the layout, the lifecycle);
//! [`tiers`] the host budget and the disk tier, [`build`] the selectors' build (the background
//! builder, forks), [`trace`] the queries kept (training sample, trace), [`decode`] the decode
//! step, [`persist`] saving and loading.

use std::time::{Duration, Instant};

use crate::decode::{GroupScratch, attend_group};
use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, FullSelector, GqaLayout, HeadId, KvDtype, PagedRows, Pages,
    RowSource, SearchStats, Selection, SelectorFactory,
};
use rayon::prelude::*;

use needle_kv::{ContextReader, ContextWriter, SpillFile, TierBudget};

use crate::background::Worker;
use crate::error::{Error, Result};

mod build;
mod decode;
mod persist;
mod tiers;
mod trace;
mod window;

use build::{EarlyBuild, EarlyBuilt};
pub use decode::{DecodeMode, DynamicPart};
use tiers::Tiers;
pub use trace::QueryTrace;
pub use window::LayerKind;
use window::Ring;

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
    /// Keys the sliding-window layers attended (their whole window), summed the same way; also
    /// counted in `keys_attended` and `keys_total`.
    pub window_keys: u64,
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
    /// Where the time of [`Llama::decode`](crate::Llama::decode) steps went (prefill and
    /// extensions not counted): what [`DecodeStats::profile`] splits. A batched step
    /// ([`Llama::decode_batch`](crate::Llama::decode_batch)) counts this sequence's share of it,
    /// so the batch's caches add up to the batch's step.
    pub step_times: StepTimes,
}

/// Wall times summed over decode steps only ([`DecodeStats::step_times`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimes {
    /// Whole steps, from the token in to the logits out.
    #[serde(serialize_with = "secs")]
    pub step: Duration,
    /// The linear layers and the output head: reading the weights. Measured on the host
    /// backends, whose ops run as they are called.
    #[serde(serialize_with = "secs")]
    pub weights: Duration,
    /// Attention over the static part and the selected keys.
    #[serde(serialize_with = "secs")]
    pub attention: Duration,
    /// The selectors choosing keys.
    #[serde(serialize_with = "secs")]
    pub walk: Duration,
    /// Inserting the keys that leave the window into the selectors.
    #[serde(serialize_with = "secs")]
    pub insert: Duration,
}

/// Where a decode step's time goes, in milliseconds per step ([`DecodeStats::profile`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DecodeProfile {
    /// Decode steps averaged over.
    pub steps: u64,
    /// A whole step.
    pub step_ms: f64,
    /// The linear layers: reading the weights.
    pub weights_ms: f64,
    /// Attention over the static part and the selected keys.
    pub attention_ms: f64,
    /// The selectors choosing keys (the index walks, for retrieval).
    pub walk_ms: f64,
    /// Inserting the keys that leave the window into the selectors.
    pub insert_ms: f64,
    /// The rest: norms, RoPE, appending K/V, embedding, logits read-back.
    pub other_ms: f64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl DecodeStats {
    /// The decode steps' time per step, split into weights, attention, walk, insert and other.
    pub fn profile(&self) -> DecodeProfile {
        let per = |d: Duration| 1e3 * d.as_secs_f64() / self.steps.max(1) as f64;
        let t = &self.step_times;
        let (step_ms, weights_ms, attention_ms) = (per(t.step), per(t.weights), per(t.attention));
        let (walk_ms, insert_ms) = (per(t.walk), per(t.insert));
        let other_ms = (step_ms - weights_ms - attention_ms - walk_ms - insert_ms).max(0.0);
        DecodeProfile { steps: self.steps, step_ms, weights_ms, attention_ms, walk_ms, insert_ms, other_ms }
    }

    /// Adds one decode step's times: `step` and `weights` measured by the caller, the rest what
    /// the cache's own timers gained since `before`.
    pub(crate) fn account_decode_step(&mut self, before: &DecodeStats, step: Duration, weights: Duration) {
        self.account_shared_step(before, step, weights, 1.0);
    }

    /// [`account_decode_step`](Self::account_decode_step) of a sequence's share of a batched
    /// step: the cache's timer gains count `concurrency` times (their share of the batch's
    /// attention wall time, when sequences attend in parallel).
    pub(crate) fn account_shared_step(
        &mut self,
        before: &DecodeStats,
        step: Duration,
        weights: Duration,
        concurrency: f64,
    ) {
        let gain = |now: Duration, then: Duration| now.saturating_sub(then).mul_f64(concurrency);
        let t = &mut self.step_times;
        t.step += step;
        t.weights += weights;
        t.attention += gain(self.attend_time, before.attend_time);
        t.walk += gain(self.select_time, before.select_time);
        t.insert += gain(self.insert_time, before.insert_time);
    }

    /// The attention, walk and insert time gained since `before`.
    pub(crate) fn attention_gain(&self, before: &DecodeStats) -> Duration {
        self.attend_time.saturating_sub(before.attend_time)
            + self.select_time.saturating_sub(before.select_time)
            + self.insert_time.saturating_sub(before.insert_time)
    }

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

    /// [`DecodeStats::share_touched`] on the global layers only, where the selectors choose
    /// (the sliding-window layers' windows left out of both counts); the same as it for a
    /// model without window layers.
    pub fn share_touched_global(&self) -> f64 {
        let total = self.keys_total - self.window_keys;
        if total == 0 {
            return 0.0;
        }
        let static_keys = self.keys_attended - self.keys_selected - self.window_keys;
        (static_keys + self.keys_selected.max(self.select.full_scored)) as f64 / total as f64
    }
}

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
    /// The device tier's bytes (`--kv-budget device=…`), for a device backend's mirror.
    device_budget: Option<u64>,
    /// Whether layers start building as soon as prefill is done with them.
    early_build: bool,
    /// The background builder holding those layers until [`KvCache::build`].
    builder: Option<Worker<EarlyBuild, EarlyBuilt>>,
    /// Per layer: the ring of a sliding-window layer, `None` for a global one ([`LayerKind`]).
    rings: Vec<Option<Ring>>,
    /// The backend's device copy of the rows.
    pub(crate) mirror: M,
    /// How a device backend runs decode attention.
    decode_mode: DecodeMode,
    /// Decode cost so far.
    pub stats: DecodeStats,
    /// The linear layers' time in the last forward pass (a decode step's weights share).
    pub(crate) last_weights_time: Duration,
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
            device_budget: None,
            early_build: true,
            builder: None,
            rings: vec![None; n_layers],
            mirror: M::default(),
            decode_mode: DecodeMode::default(),
            stats: DecodeStats::default(),
            last_weights_time: Duration::ZERO,
        })
    }

    /// Tokens held by `layer` (layers fill one after another within a forward pass).
    pub fn layer_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        if let Some(n) = self.window_len(layer) {
            return Ok(n);
        }
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
        self.heads.len().checked_sub(1).map_or(0, |l| self.layer_len(l).unwrap_or(0))
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

    /// Host bytes held by keys and values (sliding-window layers' rings included), and by
    /// selector structures.
    pub fn memory_bytes(&self) -> (usize, usize) {
        let heads = self.heads.iter().flatten();
        let (kv, sel) = heads
            .fold((0, 0), |(kv, sel), h| (kv + h.keys.bytes() + h.values.bytes(), sel + h.selector.memory_bytes()));
        (kv + self.ring_bytes(), sel)
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
        if self.push_window(layer, keys, values) {
            return Ok(());
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
            let pool = needle_kernels_cpu::Pool::global();
            pool.map_mut(&mut self.heads[layer], |j, h| push((j, h))).into_iter().collect::<Result<()>>()?;
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

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.heads.len() {
            return Err(Error::invalid("layer", format!("layer {layer} does not exist ({} layers)", self.heads.len())));
        }
        Ok(())
    }
}
