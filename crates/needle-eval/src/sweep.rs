//! Decode-step attention time of one layer against context length, per selector, with the
//! speed-up over full attention measured in the same run.
//!
//! For each context length and selector spec, a one-layer [`KvCache`] is filled the way the
//! model fills it (`plan_training`, `append` of the context's keys and values,
//! `observe_queries` of the prefill queries, `build`), then each timed decode step runs the
//! model's decode path: `append` of the new token's key and value (selectors get the tokens
//! leaving the window), `attend_decode` (per KV head: clamp the budget to the dynamic part,
//! `select`, `attend_group`) and `finish_step`. Select and attention times are the cache's own
//! [`needle_model::DecodeStats`]; a row holds medians over steps of one layer's step.
//!
//! Parallelism: decode steps run inside a one-thread rayon pool, so the cache's heads run one
//! after another and a row is the single-thread cost of one layer for every selector alike (the
//! model spreads heads over rayon threads; on 2 shared cores that would mostly add noise).
//! Builds run on the global pool, heads in parallel, as in the model.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use needle_core::attention::Partial;
use needle_core::synth::{AttentionLike, gaussian};
use needle_core::{AttentionSelector, Budget, GqaLayout, HeadId, SelectorFactory, attend_selected};
use needle_model::{DecodeStats, KvCache, compose};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::trace::Trace;

/// Selector specs swept by default.
pub const DEFAULT_SELECTORS: &str = "full;streaming;oracle;retrieval;retrieval:index=ivfpq;retrieval:index=lsh;quest";

/// Shape of SmolLM2-135M attention, used for synthetic data: (query heads, KV heads, head dim).
const SYNTH_SHAPE: (usize, usize, usize) = (9, 3, 64);

/// What to sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepConfig {
    /// Context lengths in tokens.
    pub contexts: Vec<usize>,
    /// Drop context lengths above this.
    pub max_context: Option<usize>,
    /// Selector specs; `full` is added first when missing (it is the baseline of the speed-up).
    pub selectors: Vec<String>,
    /// Keys and queries of one layer from a `needle trace` file instead of synthetic data.
    pub trace: Option<PathBuf>,
    /// Layer of the trace to use (also the layer id the selectors are built for).
    pub layer: usize,
    /// Decode steps timed per context and selector (a trace's decode queries are reused cyclically).
    pub steps: usize,
    /// Training query rows per KV head (evenly strided prefill queries of its group; 0 = none).
    pub max_train: usize,
    /// Relative noise (of each dimension's std) on trace keys resampled to reach contexts past
    /// the trace's length.
    pub noise: f32,
    /// Seed of synthetic data, of resampling and of the (always synthetic) values.
    pub seed: u64,
    /// MiB read between two timed steps so each selector starts with cold caches, as in the
    /// model, where the other layers run between two steps of this one (0 = warm caches).
    pub flush_mb: usize,
    /// Layers of the model, for the whole-model estimate (one layer's time × this).
    pub model_layers: usize,
    /// Compare every decode output with `needle_core::attend_selected` in f64 over the same
    /// selection (after the step's timing; slow). The largest difference is in each row.
    pub verify: bool,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            contexts: vec![4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10],
            max_context: None,
            selectors: DEFAULT_SELECTORS.split(';').map(String::from).collect(),
            trace: None,
            layer: 15,
            steps: 32,
            max_train: 4096,
            noise: 0.05,
            seed: 0,
            flush_mb: 64,
            model_layers: 30,
            verify: false,
        }
    }
}

/// Parses a token count: `4096`, `4K`, `4k` (×1024).
pub fn parse_tokens(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.strip_suffix(['K', 'k']) {
        Some(n) => (n, 1024),
        None => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a positive token count (e.g. 4096 or 4K)"))
}

/// One measured (context, selector) pair.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// Keys per KV head when the selectors were built (each step appends one more).
    pub context: usize,
    /// The spec as given.
    pub selector: String,
    /// The factory's full spec (defaults spelled out).
    pub describe: String,
    /// Dynamic-part budget before clamping.
    pub budget: Budget,
    /// Keys attended densely per head at the build (sinks + window, or all for `full`).
    pub static_keys: usize,
    /// Keys of the dynamic part per head at the build.
    pub dynamic_keys: usize,
    /// Training query rows per head given to the build.
    pub train_queries: usize,
    /// Wall time of `KvCache::build` for the layer (heads in parallel), seconds.
    pub build_s: f64,
    /// Bytes held by the layer's selectors.
    pub selector_bytes: usize,
    /// Median over steps of the select time, summed over KV heads (ms).
    pub select_ms: f64,
    /// Median over steps of the `attend_group` time, summed over KV heads (ms).
    pub attend_ms: f64,
    /// Median over steps of select + attend: one layer's decode attention (ms).
    pub step_ms: f64,
    /// Fastest step (ms), a hint of the noise on a shared machine.
    pub step_min_ms: f64,
    /// Median over steps of `KvCache::append` of the new token (inserts into the selectors), ms.
    pub append_ms: f64,
    /// `step_ms` × model layers: an extrapolation, not a measurement of the model.
    pub model_step_ms: f64,
    /// Ids selected per head and step (mean).
    pub selected: f64,
    /// Full-precision keys the selector scored per head and step (mean).
    pub full_scored: f64,
    /// Compressed codes (PQ codes, hashes, page bounds) scored per head and step (mean).
    pub codes_scored: f64,
    /// Bytes the selector read per head and step (mean).
    pub select_bytes: f64,
    /// Keys whose full vectors were read (attended + scored by the selector) over the context, %.
    pub touched_pct: f64,
    /// `full`'s `step_ms` at this context over this row's (same run).
    pub speedup: Option<f64>,
    /// The same ratio of fastest steps. Less exposed to load from other processes, but for
    /// selectors whose work varies by query the fastest step is also the easiest query, so this
    /// overstates them; `speedup` is the headline.
    pub speedup_best: Option<f64>,
    /// With `verify`: the largest |output − `attend_selected` in f64| over steps and heads.
    pub max_output_error: Option<f64>,
}

/// What the sweep measured, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// The configuration, after defaults and `max_context`.
    pub args: SweepConfig,
    /// Where keys and queries came from.
    pub data: String,
    /// Caveats a reader needs (extrapolations, resampling, parallelism).
    pub notes: Vec<String>,
    /// Query heads.
    pub n_q_heads: usize,
    /// KV heads (one selector each).
    pub n_kv_heads: usize,
    /// Floats per vector.
    pub head_dim: usize,
    /// Threads of the timed decode steps.
    pub decode_threads: usize,
    /// Threads the builds could use.
    pub build_threads: usize,
    /// `/proc/loadavg` before and after, when readable.
    pub load_before: Option<String>,
    /// See `load_before`.
    pub load_after: Option<String>,
    /// One row per context and selector, contexts ascending, selectors in the order given.
    pub rows: Vec<SweepRow>,
}

impl SweepReport {
    /// The row of `selector` (as given) at `context`.
    pub fn row(&self, context: usize, selector: &str) -> Option<&SweepRow> {
        self.rows.iter().find(|r| r.context == context && r.selector == selector)
    }

    /// Context lengths measured, ascending.
    pub fn contexts(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.rows.iter().map(|r| r.context).collect();
        c.dedup();
        c
    }
}

/// Keys, values and queries of one layer at one context length.
struct Layer {
    gqa: GqaLayout,
    dim: usize,
    /// Keys before the first decode step.
    context: usize,
    /// `(context + steps + 1) × n_kv_heads × dim`: the context, then one token per decode step
    /// (the first is the untimed warm-up).
    keys: Vec<f32>,
    /// Same shape as `keys`.
    values: Vec<f32>,
    /// Prefill query positions given to the cache (`positions × n_q_heads × dim`), and the
    /// prompt length they are sampled from.
    train: Vec<f32>,
    train_of: usize,
    /// `steps × n_q_heads × dim`.
    tests: Vec<f32>,
}

impl Layer {
    fn scale(&self) -> f32 {
        1.0 / (self.dim as f32).sqrt()
    }
    /// Row `t` of the keys or values (all KV heads).
    fn token<'a>(&self, xs: &'a [f32], t: usize) -> &'a [f32] {
        let row = self.gqa.n_kv_heads * self.dim;
        &xs[t * row..(t + 1) * row]
    }
}

/// Interleaves per-head rows (`heads[j]`: `n × dim`) into `n × n_kv_heads × dim`.
fn interleave(heads: &[Vec<f32>], dim: usize) -> Vec<f32> {
    let n = heads.first().map_or(0, |h| h.len() / dim);
    let mut out = Vec::with_capacity(n * heads.len() * dim);
    for t in 0..n {
        for h in heads {
            out.extend_from_slice(&h[t * dim..(t + 1) * dim]);
        }
    }
    out
}

/// Where keys and queries come from.
enum Source {
    Synthetic { seed: u64 },
    Trace { path: PathBuf, trace: Trace },
}

impl Source {
    fn shape(&self) -> Result<(GqaLayout, usize)> {
        let (q, kv, d) = match self {
            Source::Synthetic { .. } => SYNTH_SHAPE,
            Source::Trace { trace, .. } => (trace.n_q_heads, trace.n_kv_heads, trace.head_dim),
        };
        Ok((GqaLayout::new(q, kv)?, d))
    }

    fn describe(&self, args: &SweepConfig) -> String {
        match self {
            Source::Synthetic { seed } => format!(
                "synthetic attention-like data (seed {seed}, `needle_core::synth::AttentionLike`, one generator per \
                 KV head): clustered keys around a shared offset with outlier channels; queries from their own \
                 clusters and offset, a cluster shared by a GQA group's heads; values N(0,1)"
            ),
            Source::Trace { path, trace } => format!(
                "trace {} layer {}: {} real keys per head, {} prefill and {} decode query positions; \
                 contexts past {} keys are filled by resampling real keys (not the first 64) with {}× per-dim std \
                 of Gaussian noise, kept between the real start and the real last {} keys; values are seeded \
                 Gaussian with the keys' RMS (the trace holds no values)",
                path.display(),
                args.layer,
                trace.n_tokens(),
                trace.n_prompt,
                trace.n_generated,
                trace.n_tokens(),
                args.noise,
                real_tail(trace.n_tokens())
            ),
        }
    }

    /// The layer at `n` keys per head, with `args.steps + 1` decode tokens after them.
    fn layer(&self, n: usize, args: &SweepConfig) -> Result<Layer> {
        let (gqa, d) = self.shape()?;
        let g = gqa.group_size();
        let total = n + args.steps + 1;
        let train_positions = if args.max_train == 0 { 0 } else { (args.max_train / g).max(1) };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let (train, train_of, tests);
        match self {
            Source::Synthetic { seed } => {
                let gens: Vec<AttentionLike> =
                    (0..gqa.n_kv_heads).map(|h| AttentionLike::new(d, seed.wrapping_add(h as u64))).collect();
                for (h, generator) in gens.iter().enumerate() {
                    let s = seed.wrapping_mul(1000).wrapping_add(h as u64);
                    keys.push(generator.keys(total, s));
                    values.push(gaussian(total * d, 1.0, s ^ 0x5EED));
                }
                // Query rows `positions × n_q_heads × dim`: each KV head's group from its generator.
                let queries = |positions: usize, salt: u64| -> Vec<f32> {
                    let per: Vec<Vec<f32>> = gens
                        .iter()
                        .enumerate()
                        .map(|(h, generator)| generator.group_queries(positions, g, seed ^ salt ^ ((h as u64) << 8)))
                        .collect();
                    interleave(&per, g * d)
                };
                train = queries(train_positions, 0x7A11);
                train_of = train_positions;
                tests = queries(args.steps, 0x7E57);
            }
            Source::Trace { trace, .. } => {
                let l = trace.layer(args.layer)?;
                let mut rng = StdRng::seed_from_u64(args.seed);
                for h in 0..gqa.n_kv_heads {
                    let k = extend_keys(trace.keys(l, h), d, total, args.noise, &mut rng);
                    let rms = (k.iter().map(|x| f64::from(x * x)).sum::<f64>() / k.len().max(1) as f64).sqrt();
                    values.push(gaussian(total * d, rms as f32, args.seed ^ 0x5EED ^ h as u64));
                    keys.push(k);
                }
                // Prefill queries of positions inside this context; the cache samples them evenly.
                train_of = trace.n_prompt.min(n);
                let row = gqa.n_q_heads * d;
                train = if train_positions == 0 { Vec::new() } else { l.prefill_queries[..train_of * row].to_vec() };
                let m = trace.n_generated;
                tests =
                    (0..args.steps).flat_map(|s| l.decode_queries[(s % m) * row..][..row].iter().copied()).collect();
            }
        }
        Ok(Layer {
            gqa,
            dim: d,
            context: n,
            keys: interleave(&keys, d),
            values: interleave(&values, d),
            train,
            train_of,
            tests,
        })
    }
}

/// Real keys kept at the end of an extended trace context (the recent window the decode queries saw).
fn real_tail(n_real: usize) -> usize {
    (n_real / 4).min(512)
}

/// `n` rows from a head's real keys: a prefix when the trace is long enough; otherwise the real
/// keys with resampled noisy copies inserted before the last `real_tail` real rows.
fn extend_keys(real: &[f32], d: usize, n: usize, noise: f32, rng: &mut StdRng) -> Vec<f32> {
    let n_real = real.len() / d;
    if n <= n_real {
        return real[..n * d].to_vec();
    }
    // Per-dimension std, so the noise is relative to each dimension's spread.
    let mut mean = vec![0.0f64; d];
    let mut sq = vec![0.0f64; d];
    for r in real.chunks_exact(d) {
        for (i, &x) in r.iter().enumerate() {
            mean[i] += f64::from(x);
            sq[i] += f64::from(x) * f64::from(x);
        }
    }
    let std: Vec<f32> = mean
        .iter()
        .zip(&sq)
        .map(|(m, s)| {
            let m = m / n_real as f64;
            (s / n_real as f64 - m * m).max(0.0).sqrt() as f32
        })
        .collect();
    // The first tokens are attention sinks with unusual keys; copies of them would not be realistic.
    let lo = 64.min(n_real / 2);
    let tail = real_tail(n_real);
    let mut out = Vec::with_capacity(n * d);
    out.extend_from_slice(&real[..(n_real - tail) * d]);
    for _ in 0..n - n_real {
        let r = rng.random_range(lo..n_real);
        let src = &real[r * d..(r + 1) * d];
        out.extend(src.iter().zip(&std).map(|(&x, &s)| x + noise * s * rng.sample::<f32, _>(StandardNormal)));
    }
    out.extend_from_slice(&real[(n_real - tail) * d..]);
    out
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// A factory whose selectors believe they serve layer `layer` (the sweep's cache has one layer).
struct AtLayer<'a> {
    inner: &'a dyn SelectorFactory,
    layer: usize,
}

impl SelectorFactory for AtLayer<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn create(&self, head: HeadId, dim: usize) -> needle_core::Result<Box<dyn AttentionSelector>> {
        self.inner.create(HeadId { layer: self.layer, ..head }, dim)
    }
}

/// One spec's one-layer cache, built, with what its timed steps measured so far.
struct Run {
    spec: String,
    describe: String,
    budget: Budget,
    cache: KvCache,
    static_keys: usize,
    dynamic: Range<u32>,
    select_ms: Vec<f64>,
    attend_ms: Vec<f64>,
    append_ms: Vec<f64>,
    total_ms: Vec<f64>,
    /// Timed steps' stats, summed.
    timed: DecodeStats,
    /// The outputs of every timed step (`steps × n_q_heads × dim`).
    outputs: Vec<f32>,
    max_error: Option<f64>,
}

impl Run {
    /// Fills and builds a one-layer cache as the model's prefill does.
    fn build(layer: &Layer, spec: &str, args: &SweepConfig) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::invalid("selectors", format!("`{spec}`: {e}"));
        let (factory, mut cfg) = compose(needle_select::parse(spec).map_err(|e| bad(&e))?);
        // The one layer measured is a sparse one, whatever the spec's dense first layers are.
        cfg.dense_layers = 0;
        cfg.train_positions = if args.max_train == 0 { 1 } else { (args.max_train / layer.gqa.group_size()).max(1) };
        let n = layer.context;
        cfg.budget.validate(n).map_err(|e| bad(&format!("at a context of {n} keys: {e}")))?;
        let at = AtLayer { inner: factory.as_ref(), layer: args.layer };
        let mut cache = KvCache::new(1, layer.gqa, layer.dim, &at, cfg).map_err(|e| bad(&e))?;
        cache.plan_training(layer.train_of.max(1));
        let row = layer.gqa.n_kv_heads * layer.dim;
        cache.append(0, &layer.keys[..n * row], &layer.values[..n * row])?;
        if !layer.train.is_empty() {
            cache.observe_queries(0, 0, &layer.train);
        }
        cache.build(layer.scale()).map_err(|e| bad(&format!("building at {n} keys: {e}")))?;
        let sp = cache.static_part(0, 0);
        let dynamic = sp.dynamic_range(n);
        tracing::debug!(context = n, selector = spec, build_s = cache.stats.build_time.as_secs_f64(), "built");
        Ok(Self {
            spec: spec.to_string(),
            describe: factory.describe(),
            budget: cfg.budget,
            static_keys: n - dynamic.len(),
            dynamic,
            cache,
            select_ms: Vec::new(),
            attend_ms: Vec::new(),
            append_ms: Vec::new(),
            total_ms: Vec::new(),
            timed: DecodeStats::default(),
            outputs: Vec::new(),
            max_error: None,
        })
    }

    /// Decode step `step` (0 is the untimed warm-up): append token `context + step`, attend
    /// with query row `q` (`n_q_heads × head_dim`), finish the step.
    fn step(&mut self, layer: &Layer, step: usize, q: &[f32], verify: bool) -> Result<()> {
        let t = layer.context + step;
        let before = self.cache.stats;
        let t0 = Instant::now();
        self.cache.append(0, layer.token(&layer.keys, t), layer.token(&layer.values, t))?;
        let appended = t0.elapsed();
        let out = self.cache.attend_decode(0, q, layer.scale())?;
        self.cache.finish_step();
        if step == 0 {
            return Ok(());
        }
        let after = self.cache.stats;
        let (sel, att) = (after.select_time - before.select_time, after.attend_time - before.attend_time);
        self.select_ms.push(sel.as_secs_f64() * 1e3);
        self.attend_ms.push(att.as_secs_f64() * 1e3);
        self.total_ms.push((sel + att).as_secs_f64() * 1e3);
        self.append_ms.push(appended.as_secs_f64() * 1e3);
        let s = &mut self.timed;
        s.steps += 1;
        s.keys_attended += after.keys_attended - before.keys_attended;
        s.keys_total += after.keys_total - before.keys_total;
        s.keys_dynamic += after.keys_dynamic - before.keys_dynamic;
        s.keys_selected += after.keys_selected - before.keys_selected;
        s.select.full_scored += after.select.full_scored - before.select.full_scored;
        s.select.codes_scored += after.select.codes_scored - before.select.codes_scored;
        s.select.bytes_read += after.select.bytes_read - before.select.bytes_read;
        if verify {
            let err = self.verify(layer, q, &out)?;
            self.max_error = Some(self.max_error.unwrap_or(0.0).max(err));
        }
        self.outputs.extend_from_slice(&out);
        Ok(())
    }

    /// Largest |out − attend_selected (f64)| of this step, over the selection each head made.
    fn verify(&self, layer: &Layer, q: &[f32], out: &[f32]) -> Result<f64> {
        let d = layer.dim;
        let mut worst = 0.0f64;
        for j in 0..layer.gqa.n_kv_heads {
            let (keys, values) = (self.cache.keys(0, j), self.cache.values(0, j));
            let (sp, sel) = (self.cache.static_part(0, j), self.cache.last_selection(0, j));
            for h in layer.gqa.group(j) {
                let exact: Partial<f64> =
                    attend_selected(&q[h * d..(h + 1) * d], keys, values, sp, sel, layer.scale())?;
                for (a, e) in out[h * d..(h + 1) * d].iter().zip(&exact.out) {
                    worst = worst.max((f64::from(*a) - e).abs());
                }
            }
        }
        Ok(worst)
    }

    fn finish(self, layer: &Layer, args: &SweepConfig) -> Measured {
        let n = layer.context;
        let s = self.timed;
        let per = (s.steps as usize * layer.gqa.n_kv_heads).max(1) as f64;
        let step_ms = median(&self.total_ms);
        let row = SweepRow {
            context: n,
            selector: self.spec,
            describe: self.describe,
            budget: self.budget,
            static_keys: self.static_keys,
            dynamic_keys: self.dynamic.len(),
            train_queries: train_rows(layer, args),
            build_s: self.cache.stats.build_time.as_secs_f64(),
            selector_bytes: self.cache.memory_bytes().1,
            select_ms: median(&self.select_ms),
            attend_ms: median(&self.attend_ms),
            step_ms,
            step_min_ms: self.total_ms.iter().copied().fold(f64::INFINITY, f64::min),
            append_ms: median(&self.append_ms),
            model_step_ms: step_ms * args.model_layers as f64,
            selected: s.keys_selected as f64 / per,
            full_scored: s.select.full_scored as f64 / per,
            codes_scored: s.select.codes_scored as f64 / per,
            select_bytes: s.select.bytes_read as f64 / per,
            touched_pct: if s.keys_total == 0 {
                0.0
            } else {
                100.0 * (s.keys_attended + s.select.full_scored) as f64 / s.keys_total as f64
            },
            speedup: None,
            speedup_best: None,
            max_output_error: self.max_error,
        };
        Measured { row, outputs: self.outputs, timed: s }
    }
}

/// Training query rows per head the cache keeps: the sampled positions × the group size.
fn train_rows(layer: &Layer, args: &SweepConfig) -> usize {
    if layer.train.is_empty() || args.max_train == 0 {
        return 0;
    }
    let positions = layer.train.len() / (layer.gqa.n_q_heads * layer.dim);
    let stride = layer.train_of.div_ceil((args.max_train / layer.gqa.group_size()).max(1)).max(1);
    positions.div_ceil(stride) * layer.gqa.group_size()
}

/// A measured row, the outputs of every timed step (`steps × n_q × d`) and the timed steps' stats.
struct Measured {
    row: SweepRow,
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    outputs: Vec<f32>,
    #[cfg_attr(not(test), allow(dead_code))]
    timed: DecodeStats,
}

/// Touches one word per cache line of `buf`, pushing the layer's keys, values and indexes out
/// of the caches (otherwise a selector could find rows warm that the previous one read).
fn evict(buf: &mut [u64]) {
    let mut acc = 0u64;
    for x in buf.iter_mut().step_by(8) {
        *x = x.wrapping_add(1);
        acc = acc.wrapping_add(*x);
    }
    std::hint::black_box(acc);
}

/// Builds every spec over `layer`, then times the decode steps on `pool` with the specs
/// interleaved step by step (in a rotating order), so that load from other processes on a
/// shared machine falls on every selector alike rather than on whichever ran during a burst.
fn measure_all(layer: &Layer, specs: &[String], args: &SweepConfig, pool: &rayon::ThreadPool) -> Result<Vec<Measured>> {
    let mut runs = Vec::with_capacity(specs.len());
    for spec in specs {
        runs.push(Run::build(layer, spec, args)?);
    }
    let row = layer.gqa.n_q_heads * layer.dim;
    let steps = layer.tests.len() / row;
    let mut flush = vec![1u64; (args.flush_mb << 20) / 8];
    pool.install(|| -> Result<()> {
        // Step 0 is a warm-up (first touch of scratch buffers and selector caches), not timed.
        for step in 0..=steps {
            let q = &layer.tests[step.saturating_sub(1) * row..][..row];
            for i in 0..runs.len() {
                let k = (i + step) % runs.len();
                evict(&mut flush);
                runs[k].step(layer, step, q, args.verify)?;
            }
        }
        Ok(())
    })?;
    Ok(runs.into_iter().map(|r| r.finish(layer, args)).collect())
}

/// Checked arguments: contexts ascending, selectors with `full` first.
fn plan(args: &SweepConfig) -> Result<(Vec<usize>, Vec<String>)> {
    if args.contexts.is_empty() {
        return Err(Error::invalid("contexts", "give at least one context length"));
    }
    let mut contexts: Vec<usize> = args.contexts.clone();
    if let Some(&bad) = contexts.iter().find(|&&c| c == 0) {
        return Err(Error::invalid("contexts", format!("{bad} is not a positive token count")));
    }
    if let Some(max) = args.max_context {
        contexts.retain(|&c| c <= max);
        if contexts.is_empty() {
            return Err(Error::invalid("max_context", format!("{max}: every context length in contexts is larger")));
        }
    }
    contexts.sort_unstable();
    contexts.dedup();
    let mut selectors: Vec<String> =
        args.selectors.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if selectors.is_empty() {
        return Err(Error::invalid("selectors", "give at least one selector spec (e.g. `full;retrieval`)"));
    }
    for s in &selectors {
        needle_select::parse(s).map_err(|e| Error::invalid("selectors", format!("`{s}`: {e}")))?;
    }
    selectors.dedup();
    let is_full = |s: &String| s == "full" || s == "dense";
    match selectors.iter().position(is_full) {
        Some(i) => {
            let f = selectors.remove(i);
            selectors.insert(0, f);
        }
        None => selectors.insert(0, "full".into()),
    }
    if args.steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if args.model_layers == 0 {
        return Err(Error::invalid("model_layers", "must be at least 1"));
    }
    if !(args.noise.is_finite() && args.noise >= 0.0) {
        return Err(Error::invalid("noise", format!("{} is not a finite number ≥ 0", args.noise)));
    }
    Ok((contexts, selectors))
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Runs the sweep; writes nothing. `progress(done, total)` counts (context, selector) rows.
pub fn run(args: &SweepConfig, progress: &mut dyn FnMut(usize, usize)) -> Result<SweepReport> {
    let (contexts, selectors) = plan(args)?;
    let source = match &args.trace {
        Some(path) => {
            let trace = Trace::read_layers(path, Some(&[args.layer]))?;
            if trace.n_tokens() == 0 || trace.n_generated == 0 {
                return Err(Error::trace(path, "needs keys and at least one decode query"));
            }
            Source::Trace { path: path.clone(), trace }
        }
        None => Source::Synthetic { seed: args.seed },
    };
    let (gqa, head_dim) = source.shape()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::invalid("threads", format!("one-thread pool for decode steps: {e}")))?;
    let mut notes = vec![
        format!(
            "decode steps: one thread, the {} KV heads one after another (KvCache::attend_decode in a one-thread \
             pool); times are medians over {} steps of the sum over heads (one layer); build times are the wall \
             time of KvCache::build, heads in parallel",
            gqa.n_kv_heads, args.steps
        ),
        format!(
            "whole-model column = one layer × {} layers: an extrapolation (same context in every layer), not a \
             measurement of the model",
            args.model_layers
        ),
        "each step appends one token (KvCache::append, timed apart as append_ms), as the model does".into(),
        if args.flush_mb > 0 {
            format!("caches are cold at each timed step ({} MiB read in between, untimed)", args.flush_mb)
        } else {
            "caches are warm (flush_mb 0): selectors may find rows that the previous one read".into()
        },
        "touched = keys attended (static part + selection) + keys the selector scored at full precision, over \
         the context; the oracle scores every dynamic key, so it exceeds 100 %"
            .into(),
    ];
    if let Source::Trace { trace, .. } = &source
        && contexts.iter().any(|&c| c + args.steps + 1 > trace.n_tokens())
    {
        notes.push(format!(
            "contexts above {} keys are extended by resampling real keys with noise (see `data`)",
            trace.n_tokens()
        ));
    }
    let mut report = SweepReport {
        args: SweepConfig { contexts: contexts.clone(), selectors: selectors.clone(), ..args.clone() },
        data: source.describe(args),
        notes,
        n_q_heads: gqa.n_q_heads,
        n_kv_heads: gqa.n_kv_heads,
        head_dim,
        decode_threads: pool.current_num_threads(),
        build_threads: rayon::current_num_threads(),
        load_before: loadavg(),
        load_after: None,
        rows: Vec::new(),
    };
    let total = contexts.len() * selectors.len();
    for &n in &contexts {
        let t = Instant::now();
        let layer = source.layer(n, args)?;
        tracing::info!(context = n, secs = t.elapsed().as_secs_f64(), "layer data ready");
        let first = report.rows.len();
        for m in measure_all(&layer, &selectors, args, &pool)? {
            let r = &m.row;
            tracing::info!(
                context = n,
                selector = %r.selector,
                build_s = r.build_s,
                select_ms = r.select_ms,
                attend_ms = r.attend_ms,
                touched_pct = r.touched_pct,
                "measured"
            );
            report.rows.push(m.row);
        }
        let rows = &mut report.rows[first..];
        let full = rows.first().map(|r| (r.step_ms, r.step_min_ms)).filter(|&(t, m)| t > 0.0 && m > 0.0);
        for r in rows.iter_mut() {
            r.speedup = full.map(|(f, _)| f / r.step_ms.max(1e-9));
            r.speedup_best = full.map(|(_, f)| f / r.step_min_ms.max(1e-9));
        }
        progress(report.rows.len(), total);
    }
    report.load_after = loadavg();
    Ok(report)
}

/// `4K` for multiples of 1024, else the number.
pub fn tokens(n: usize) -> String {
    if n.is_multiple_of(1024) { format!("{}K", n / 1024) } else { n.to_string() }
}

/// The table as Markdown (so it can be pasted into docs).
pub fn table(report: &SweepReport) -> String {
    let mut s = format!(
        "| context | selector | build s | select ms | attend ms | layer ms/step | min ms | append ms | ×{} layers ms (est.) | \
         ids | scored | touched % | vs full | vs full (min) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report.args.model_layers
    );
    for r in &report.rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.0} | {:.0} | {:.2} | {} | {} |\n",
            tokens(r.context),
            r.selector,
            r.build_s,
            r.select_ms,
            r.attend_ms,
            r.step_ms,
            r.step_min_ms,
            r.append_ms,
            r.model_step_ms,
            r.selected,
            r.full_scored,
            r.touched_pct,
            r.speedup.map_or("–".into(), |x| format!("{x:.1}×")),
            r.speedup_best.map_or("–".into(), |x| format!("{x:.1}×")),
        );
    }
    s
}

/// The speed-up line of the largest context: `selector N× (min M×)`, comma-separated.
pub fn speedup_summary(report: &SweepReport) -> Option<String> {
    let n = *report.contexts().last()?;
    let ratios: Vec<String> = report
        .args
        .selectors
        .iter()
        .skip(1) // `full` itself
        .filter_map(|s| {
            let r = report.row(n, s)?;
            Some(format!("{s} {:.1}× (min {:.1}×)", r.speedup?, r.speedup_best?))
        })
        .collect();
    Some(format!("speed-up over full at {} (median steps; fastest steps): {}", tokens(n), ratios.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(selectors: &[&str]) -> SweepConfig {
        SweepConfig {
            contexts: vec![2048],
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            steps: 3,
            max_train: 300,
            flush_mb: 0,
            verify: true,
            ..SweepConfig::default()
        }
    }

    fn measure(layer: &Layer, spec: &str, args: &SweepConfig) -> Measured {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        measure_all(layer, &[spec.to_string()], args, &pool).unwrap().remove(0)
    }

    /// Spelled out here so the test fails if the selector defaults change under it.
    const SINKS: usize = 128;
    const WINDOW: usize = 512;

    #[test]
    fn end_to_end_rows_match_the_reference_and_the_counts() {
        let args = small(&["streaming", "oracle", "retrieval"]);
        let mut calls = Vec::new();
        let r = run(&args, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls, vec![(4, 4)]);
        // `full` is added first as the baseline.
        let names: Vec<&str> = r.rows.iter().map(|r| r.selector.as_str()).collect();
        assert_eq!(names, ["full", "streaming", "oracle", "retrieval"]);
        // Every decode output through the cache equals the exact f64 reference over the
        // selection the cache made.
        for row in &r.rows {
            let err = row.max_output_error.unwrap();
            assert!(err < 1e-4, "{}: |decode − attend_selected| = {err}", row.selector);
        }
        // Timed step s (1..=3) attends over 2048 + s + 1 keys per head.
        let contexts: Vec<f64> = (1..=3).map(|s| (2048 + s + 1) as f64).collect();
        let full = r.row(2048, "full").unwrap();
        assert!((full.touched_pct - 100.0).abs() < 1e-9, "{full:?}");
        assert_eq!((full.static_keys, full.dynamic_keys, full.full_scored, full.selected), (2048, 0, 0.0, 0.0));
        let st = r.row(2048, "streaming").unwrap();
        let expect = 100.0 * 3.0 * (SINKS + WINDOW) as f64 / contexts.iter().sum::<f64>();
        assert!((st.touched_pct - expect).abs() < 1e-9, "{} vs {expect}", st.touched_pct);
        assert_eq!((st.static_keys, st.selected, st.full_scored), (SINKS + WINDOW, 0.0, 0.0));
        // The oracle scores every dynamic key of each step (the dynamic part grows by one per
        // step) and selects its budget.
        let or = r.row(2048, "oracle").unwrap();
        assert_eq!(or.selected, 100.0);
        let dynamic: f64 = contexts.iter().map(|c| c - (SINKS + WINDOW) as f64).sum::<f64>() / 3.0;
        assert_eq!(or.full_scored, dynamic);
        assert_eq!(or.dynamic_keys, 2048 - SINKS - WINDOW);
        // 300 training rows per head at most: 100 positions × a group of 3.
        assert_eq!(or.train_queries, 300);
        let re = r.row(2048, "retrieval").unwrap();
        assert!(re.full_scored > 0.0 && re.full_scored < or.full_scored, "{re:?}");
        for row in &r.rows {
            assert_eq!(row.model_step_ms, row.step_ms * 30.0);
        }
        assert!(table(&r).contains("| 2K | oracle |"));
        assert!(speedup_summary(&r).unwrap().contains("oracle"));
    }

    #[test]
    fn oracle_with_the_whole_dynamic_part_equals_full() {
        let args = small(&["full"]);
        let src = Source::Synthetic { seed: 7 };
        let layer = src.layer(2048, &args).unwrap();
        // The dynamic part grows by one key per step (4 steps with the warm-up).
        let dynamic = 2048 - SINKS - WINDOW + 4;
        let full = measure(&layer, "full", &args);
        let or = measure(&layer, &format!("oracle:k={dynamic}"), &args);
        assert_eq!(or.timed.keys_selected, or.timed.keys_dynamic);
        assert_eq!(full.outputs.len(), 3 * 9 * 64);
        let worst = full.outputs.iter().zip(&or.outputs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "max |full - oracle| = {worst}");
        // A smaller budget really changes the output (the check above is not vacuous).
        let small_k = measure(&layer, "oracle:k=10", &args);
        let diff = full.outputs.iter().zip(&small_k.outputs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff > 1e-4, "{diff}");
    }

    #[test]
    fn bad_arguments_name_the_field() {
        let err = |a: SweepConfig| run(&a, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err(small(&[])).contains("selectors"));
        assert!(err(small(&[" "])).contains("selectors"));
        let e = err(small(&["full", "nope"]));
        assert!(e.contains("selectors") && e.contains("nope"), "{e}");
        let e = err(small(&["oracle:k=5000"]));
        assert!(e.contains("selectors") && e.contains("oracle:k=5000"), "{e}");
        assert!(err(SweepConfig { contexts: vec![], ..small(&["full"]) }).contains("contexts"));
        assert!(err(SweepConfig { max_context: Some(1000), ..small(&["full"]) }).contains("max_context"));
        assert!(err(SweepConfig { steps: 0, ..small(&["full"]) }).contains("steps"));
        assert!(parse_tokens("4K") == Ok(4096) && parse_tokens("12") == Ok(12));
        assert!(parse_tokens("0").is_err() && parse_tokens("4M").unwrap_err().contains("4M"));
    }

    #[test]
    fn trace_layers_are_read_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        // 2 KV heads, 6 query heads, dim 4; 700 keys per head.
        Trace::synthetic(&[5], 695, 5).write(&p, false).unwrap();
        let args =
            SweepConfig { trace: Some(p.clone()), layer: 9, contexts: vec![1024, 2048], ..small(&["full", "oracle"]) };
        let e = run(&args, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("layer 9") && e.contains("traced layers: 5") && e.contains("t.safetensors"), "{e}");
        let args = SweepConfig { layer: 5, ..args };
        let r = run(&args, &mut |_, _| {}).unwrap();
        assert_eq!((r.n_q_heads, r.n_kv_heads, r.head_dim), (6, 2, 4));
        assert!(r.data.contains("resampling") && r.notes.iter().any(|n| n.contains("700")));
        assert_eq!(r.row(2048, "oracle").unwrap().dynamic_keys, 2048 - SINKS - WINDOW);
        // Training rows: prefill positions inside the context, strided to at most 100 positions.
        assert_eq!(r.row(1024, "oracle").unwrap().train_queries, 695usize.div_ceil(695usize.div_ceil(100)) * 3);
        for row in &r.rows {
            assert!(row.max_output_error.unwrap() < 1e-4, "{row:?}");
        }
        // The extension keeps the real start and the real tail.
        let t = Trace::read(&p).unwrap();
        let real = t.keys(&t.layers[0], 1);
        let ext = extend_keys(real, 4, 2048, 0.05, &mut StdRng::seed_from_u64(0));
        assert_eq!(ext.len(), 2048 * 4);
        let tail = real_tail(700) * 4;
        assert_eq!(&ext[..4 * 100], &real[..4 * 100]);
        assert_eq!(&ext[ext.len() - tail..], &real[real.len() - tail..]);
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"nope").unwrap();
        let e = run(&SweepConfig { trace: Some(junk), ..args }, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("junk"), "{e}");
    }

    #[test]
    fn synthetic_layers_are_seeded() {
        let args = small(&["full"]);
        let a = Source::Synthetic { seed: 1 }.layer(300, &args).unwrap();
        let b = Source::Synthetic { seed: 1 }.layer(300, &args).unwrap();
        let c = Source::Synthetic { seed: 2 }.layer(300, &args).unwrap();
        assert_eq!(a.keys, b.keys);
        assert_ne!(a.keys, c.keys);
        assert_eq!(a.tests, b.tests);
        assert_eq!(a.tests.len(), 3 * 9 * 64);
        assert_eq!(a.keys.len(), (300 + 3 + 1) * 3 * 64);
    }
}
