//! `needle eval --sweep`: decode-step attention time of one layer against context length, per
//! selector, with the speed-up over full attention measured in the same run.
//!
//! For each context length and selector spec, one selector per KV head is built the way
//! `KvCache::build` builds it (dynamic range from the selector's `StaticPart`, a strided sample
//! of the group's prefill queries as training queries). Then each test query runs the model's
//! decode path (`KvCache::attend_decode`) per KV head: clamp the budget to the dynamic part,
//! `select`, `attend_group`. Select and attention are timed apart; a row holds medians over
//! steps of the per-step sum over the layer's KV heads.
//!
//! Parallelism: decode steps run inside a one-thread rayon pool, heads one after another, so a
//! row is the single-thread cost of one layer for every selector alike (the model spreads heads
//! over rayon threads; on 2 shared cores that would mostly add noise). Builds run heads one after
//! another on the global pool, so index code that uses rayon inside a build may use its threads.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use needle_core::decode::{GroupScratch, attend_group};
use needle_core::{AttentionSelector, Budget, BuildContext, HeadId, PagedRows, RowSource, Selection, StaticPart};
use needle_model::{PAGE_SIZE, selector_from_spec};
use plotters::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

/// Selector specs swept by default (`;`-separated because a spec may hold commas).
pub const DEFAULT_SELECTORS: &str = "full;streaming;oracle;retrieval;retrieval:index=ivfpq;retrieval:index=lsh;quest";

/// Shape of SmolLM2-135M attention, used for synthetic data.
const SYNTH_SHAPE: Shape = Shape { n_q_heads: 9, n_kv_heads: 3, head_dim: 64 };

/// Arguments of the sweep (`needle eval --sweep`, or `cargo run --example sweep`).
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct SweepArgs {
    /// Context lengths in tokens, comma-separated; `K` is 1024 (`4K,8K`, or `4096`).
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "4K,8K,16K,32K,64K,128K")]
    pub contexts: Vec<usize>,
    /// Drop context lengths above this (e.g. `32K`).
    #[arg(long, value_parser = parse_tokens)]
    pub max_context: Option<usize>,
    /// Selector specs separated by `;` (a spec may hold commas), or the flag repeated.
    /// `full` is added when missing: it is the baseline of the speed-up.
    #[arg(long, value_delimiter = ';', default_value = DEFAULT_SELECTORS)]
    pub selectors: Vec<String>,
    /// Keys and queries of one layer from a `needle trace` file instead of synthetic data.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Layer of the trace to use (also the layer id the selectors are built for).
    #[arg(long, default_value_t = 15)]
    pub layer: usize,
    /// Decode steps timed per context and selector (a trace's decode queries are reused cyclically).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Training query rows per KV head (evenly strided prefill queries of its group; 0 = none).
    #[arg(long, default_value_t = 4096)]
    pub max_train: usize,
    /// Relative noise (of each dimension's std) on trace keys resampled to reach contexts past
    /// the trace's length.
    #[arg(long, default_value_t = 0.05)]
    pub noise: f32,
    /// Seed of synthetic data, of resampling and of the (always synthetic) values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// MiB read between two timed steps so each selector starts with cold caches, as in the
    /// model, where the other layers run between two steps of this one (0 = warm caches).
    #[arg(long, default_value_t = 64)]
    pub flush_mb: usize,
    /// Layers of the model, for the whole-model estimate (one layer's time × this).
    #[arg(long, default_value_t = 30)]
    pub model_layers: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw time per step and speed-up against context length here (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl Default for SweepArgs {
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
            json: None,
            plot: None,
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
    /// Keys per KV head.
    pub context: usize,
    /// The spec as given.
    pub selector: String,
    /// The factory's full spec (defaults spelled out).
    pub describe: String,
    /// Dynamic-part budget before clamping.
    pub budget: Budget,
    /// Keys attended densely per head (sinks + window, or all for `full`).
    pub static_keys: usize,
    /// Keys of the dynamic part per head.
    pub dynamic_keys: usize,
    /// Training query rows per head given to the build.
    pub train_queries: usize,
    /// Build time of the layer's selectors, summed over KV heads (seconds).
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
}

/// What the sweep measured, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// The arguments, after defaults and `--max-context`.
    pub args: SweepArgs,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Shape {
    fn group(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }
}

/// One layer of a `needle trace` file.
struct TraceLayer {
    shape: Shape,
    n_tokens: usize,
    /// `n_kv_heads × n_tokens × head_dim`.
    keys: Vec<f32>,
    n_prompt: usize,
    /// `n_prompt × n_q_heads × head_dim`.
    prefill: Vec<f32>,
    /// `n_decode × n_q_heads × head_dim`.
    decode: Vec<f32>,
}

impl TraceLayer {
    /// Reads only the tensors of `layer`; shapes come from the tensors themselves. (The CLI's
    /// `trace` module reads whole files; this module stays standalone so the example builds it.)
    fn read(path: &Path, layer: usize) -> Result<Self> {
        let buf = std::fs::read(path).with_context(|| format!("--trace: reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&buf)
            .with_context(|| format!("--trace: {} is not a safetensors file", path.display()))?;
        let name = |t: &str| format!("layer.{layer}.{t}");
        if st.tensor(&name("keys")).is_err() {
            let mut have: Vec<usize> =
                st.names().iter().filter_map(|n| n.strip_prefix("layer.")?.split_once('.')?.0.parse().ok()).collect();
            have.sort_unstable();
            have.dedup();
            let have: Vec<String> = have.iter().map(ToString::to_string).collect();
            bail!(
                "--layer {layer}: not in trace {} (traced layers: {})",
                path.display(),
                if have.is_empty() { "none".into() } else { have.join(",") }
            );
        }
        let get = |t: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let n = name(t);
            let v = st.tensor(&n).with_context(|| format!("--trace {}: missing tensor {n}", path.display()))?;
            ensure!(v.dtype() == Dtype::F32, "--trace {}: {n} is {:?}, expected F32", path.display(), v.dtype());
            ensure!(v.shape().len() == 3, "--trace {}: {n} has shape {:?}, expected 3 dims", path.display(), v.shape());
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok((v.shape().to_vec(), data))
        };
        let (ks, keys) = get("keys")?;
        let (ps, prefill) = get("prefill_queries")?;
        let (ds, decode) = get("decode_queries")?;
        let shape = Shape { n_q_heads: ps[1], n_kv_heads: ks[0], head_dim: ks[2] };
        let bad = |what: &str| anyhow!("--trace {}: layer {layer}: {what}", path.display());
        if shape.n_kv_heads == 0 || shape.head_dim == 0 || !shape.n_q_heads.is_multiple_of(shape.n_kv_heads) {
            return Err(bad(&format!("keys {ks:?} and prefill_queries {ps:?} do not form a GQA layout")));
        }
        if ps[2] != shape.head_dim || ds[1] != shape.n_q_heads || ds[2] != shape.head_dim {
            return Err(bad(&format!("shapes disagree: keys {ks:?}, prefill_queries {ps:?}, decode_queries {ds:?}")));
        }
        if ks[1] == 0 || ds[0] == 0 {
            return Err(bad("needs keys and at least one decode query"));
        }
        check_finite_all(&keys, &prefill, &decode).map_err(|w| bad(&format!("{w} holds a non-finite value")))?;
        Ok(Self { shape, n_tokens: ks[1], keys, n_prompt: ps[0], prefill, decode })
    }

    fn head_keys(&self, h: usize) -> &[f32] {
        let n = self.n_tokens * self.shape.head_dim;
        &self.keys[h * n..(h + 1) * n]
    }

    /// Query rows of KV head `h`'s group at `positions` of `rows` (`positions × n_q × d`).
    fn group_rows(&self, rows: &[f32], h: usize, positions: impl Iterator<Item = usize>, out: &mut Vec<f32>) {
        let (g, d) = (self.shape.group(), self.shape.head_dim);
        let stride = self.shape.n_q_heads * d;
        for p in positions {
            out.extend_from_slice(&rows[p * stride + h * g * d..p * stride + (h + 1) * g * d]);
        }
    }
}

fn check_finite_all(keys: &[f32], prefill: &[f32], decode: &[f32]) -> std::result::Result<(), &'static str> {
    for (what, xs) in [("keys", keys), ("prefill_queries", prefill), ("decode_queries", decode)] {
        if xs.iter().any(|x| !x.is_finite()) {
            return Err(what);
        }
    }
    Ok(())
}

/// Keys, values and queries of one layer at one context length.
struct Layer {
    shape: Shape,
    keys: Vec<PagedRows>,
    values: Vec<PagedRows>,
    /// Per KV head: training query rows (`rows × head_dim`).
    train: Vec<Vec<f32>>,
    /// `steps × n_q_heads × head_dim`.
    tests: Vec<f32>,
}

impl Layer {
    fn len(&self) -> usize {
        self.keys.first().map_or(0, RowSource::len)
    }
    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }
}

/// A small seeded generator (splitmix64); enough for test data and resampling.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// Attention-like synthetic distributions of one KV head: keys share an offset and have a few
/// outlier dimensions; queries come from a shifted distribution (the out-of-distribution gap
/// RetrievalAttention targets) with a component shared by the group's heads.
struct SynthHead {
    key_mean: Vec<f32>,
    key_std: Vec<f32>,
    query_mean: Vec<f32>,
}

impl SynthHead {
    fn new(d: usize, rng: &mut Rng) -> Self {
        let key_mean: Vec<f32> = (0..d).map(|_| 1.5 * rng.normal()).collect();
        let mut key_std = vec![1.0f32; d];
        for _ in 0..4.min(d) {
            key_std[rng.below(d)] = 4.0;
        }
        let query_mean = key_mean.iter().map(|m| -0.5 * m + rng.normal()).collect();
        Self { key_mean, key_std, query_mean }
    }
    fn key(&self, rng: &mut Rng, out: &mut Vec<f32>) {
        out.extend(self.key_mean.iter().zip(&self.key_std).map(|(m, s)| m + s * rng.normal()));
    }
    /// The `g` query rows of one position.
    fn group_queries(&self, g: usize, rng: &mut Rng, out: &mut Vec<f32>) {
        let shared: Vec<f32> = self.key_std.iter().map(|s| 0.8 * s * rng.normal()).collect();
        for _ in 0..g {
            out.extend(self.query_mean.iter().zip(&shared).map(|(m, c)| m + c + 0.6 * rng.normal()));
        }
    }
}

/// Where keys and queries come from.
enum Source {
    Synthetic { seed: u64 },
    Trace { path: PathBuf, layer: TraceLayer },
}

impl Source {
    fn shape(&self) -> Shape {
        match self {
            Source::Synthetic { .. } => SYNTH_SHAPE,
            Source::Trace { layer, .. } => layer.shape,
        }
    }

    fn describe(&self, args: &SweepArgs) -> String {
        match self {
            Source::Synthetic { seed } => format!(
                "synthetic attention-like data (seed {seed}): keys = shared offset + N(0,1) with 4 outlier \
                 dims of std 4; queries from a shifted distribution with a group-shared component; values N(0,1)"
            ),
            Source::Trace { path, layer } => format!(
                "trace {} layer {}: {} real keys per head, {} prefill and {} decode query positions; \
                 contexts past {} keys are filled by resampling real keys (not the first 64) with {}× per-dim std \
                 of Gaussian noise, kept between the real start and the real last {} keys; values are seeded \
                 Gaussian with the keys' RMS (the trace holds no values)",
                path.display(),
                args.layer,
                layer.n_tokens,
                layer.n_prompt,
                layer.decode.len() / (layer.shape.n_q_heads * layer.shape.head_dim),
                layer.n_tokens,
                args.noise,
                real_tail(layer.n_tokens)
            ),
        }
    }

    /// The layer at `n` keys per head.
    fn layer(&self, n: usize, args: &SweepArgs) -> Result<Layer> {
        let shape = self.shape();
        let (d, g) = (shape.head_dim, shape.group());
        let mut out = Layer { shape, keys: Vec::new(), values: Vec::new(), train: Vec::new(), tests: Vec::new() };
        let train_positions = if args.max_train == 0 { 0 } else { (args.max_train / g).max(1) };
        match self {
            Source::Synthetic { seed } => {
                let heads: Vec<SynthHead> =
                    (0..shape.n_kv_heads).map(|h| SynthHead::new(d, &mut Rng::new(*seed, h as u64))).collect();
                for (h, sh) in heads.iter().enumerate() {
                    let mut rng = Rng::new(*seed, 1000 + h as u64);
                    let mut keys = Vec::with_capacity(n * d);
                    for _ in 0..n {
                        sh.key(&mut rng, &mut keys);
                    }
                    out.keys.push(paged(&keys, d)?);
                    out.values.push(gaussian_rows(n, d, 1.0, &mut rng)?);
                    let mut train = Vec::with_capacity(train_positions * g * d);
                    for _ in 0..train_positions {
                        sh.group_queries(g, &mut rng, &mut train);
                    }
                    out.train.push(train);
                }
                let mut rng = Rng::new(*seed, 2000);
                for _ in 0..args.steps {
                    for sh in &heads {
                        sh.group_queries(g, &mut rng, &mut out.tests);
                    }
                }
            }
            Source::Trace { layer: t, .. } => {
                for h in 0..shape.n_kv_heads {
                    let mut rng = Rng::new(args.seed, 1000 + h as u64);
                    let keys = extend_keys(t.head_keys(h), d, n, args.noise, &mut rng);
                    let rms = (keys.iter().map(|x| f64::from(x * x)).sum::<f64>() / keys.len().max(1) as f64).sqrt();
                    out.keys.push(paged(&keys, d)?);
                    out.values.push(gaussian_rows(n, d, rms as f32, &mut rng)?);
                    // Prefill queries of positions inside this context, evenly strided.
                    let avail = t.n_prompt.min(n);
                    let stride = if train_positions == 0 { 0 } else { avail.div_ceil(train_positions).max(1) };
                    let mut train = Vec::new();
                    if stride > 0 {
                        t.group_rows(&t.prefill, h, (0..avail).step_by(stride), &mut train);
                    }
                    out.train.push(train);
                }
                let m = t.decode.len() / (shape.n_q_heads * d);
                let row = shape.n_q_heads * d;
                for s in 0..args.steps {
                    let p = s % m;
                    out.tests.extend_from_slice(&t.decode[p * row..(p + 1) * row]);
                }
            }
        }
        Ok(out)
    }
}

/// Real keys kept at the end of an extended trace context (the recent window the decode queries saw).
fn real_tail(n_real: usize) -> usize {
    (n_real / 4).min(512)
}

/// `n` rows from a head's real keys: a prefix when the trace is long enough; otherwise the real
/// keys with resampled noisy copies inserted before the last `real_tail` real rows.
fn extend_keys(real: &[f32], d: usize, n: usize, noise: f32, rng: &mut Rng) -> Vec<f32> {
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
        let r = lo + rng.below(n_real - lo);
        let src = &real[r * d..(r + 1) * d];
        out.extend(src.iter().zip(&std).map(|(&x, &s)| x + noise * s * rng.normal()));
    }
    out.extend_from_slice(&real[(n_real - tail) * d..]);
    out
}

fn paged(rows: &[f32], d: usize) -> Result<PagedRows> {
    let mut p = PagedRows::new(d, PAGE_SIZE)?;
    p.extend_from_slice(rows)?;
    Ok(p)
}

fn gaussian_rows(n: usize, d: usize, std: f32, rng: &mut Rng) -> Result<PagedRows> {
    let v: Vec<f32> = (0..n * d).map(|_| std * rng.normal()).collect();
    paged(&v, d)
}

/// A measured row plus the attention outputs of every timed step (`steps × n_q × d`, for tests).
struct Measured {
    row: SweepRow,
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    outputs: Vec<f32>,
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

/// The budget the model uses when the dynamic part is smaller than it (`KvCache::attend_decode`).
fn clamp(budget: Budget, dynamic: &Range<u32>) -> Budget {
    let n = dynamic.len();
    match budget {
        Budget::TopK(k) => Budget::TopK(k.min(n)),
        Budget::Mass { target, max } => Budget::Mass { target, max: max.min(n) },
    }
}

/// One spec's selectors over a layer, built, with what its timed steps measured so far.
struct Run {
    spec: String,
    describe: String,
    budget: Budget,
    sels: Vec<Box<dyn AttentionSelector>>,
    static_part: StaticPart,
    dynamic: Range<u32>,
    build_s: f64,
    selections: Vec<Selection>,
    scratch: Vec<GroupScratch>,
    select_ms: Vec<f64>,
    attend_ms: Vec<f64>,
    total_ms: Vec<f64>,
    /// Ids, full-precision scores, codes, bytes read, keys touched: summed over heads and steps.
    counts: [u64; 5],
    outputs: Vec<f32>,
}

impl Run {
    /// Builds one selector per KV head as `KvCache::build` does (heads one after another).
    fn build(layer: &Layer, spec: &str, args: &SweepArgs) -> Result<Self> {
        let (factory, cfg) = selector_from_spec(spec).with_context(|| format!("--selectors: `{spec}`"))?;
        let (shape, n) = (layer.shape, layer.len());
        // The model refuses budgets larger than the context before building.
        cfg.budget.validate(n).with_context(|| format!("--selectors: `{spec}` at a context of {n} keys"))?;
        let mut sels: Vec<Box<dyn AttentionSelector>> = Vec::with_capacity(shape.n_kv_heads);
        let mut build_s = 0.0;
        for (j, keys) in layer.keys.iter().enumerate() {
            let head = HeadId { layer: args.layer, kv_head: j };
            let mut sel = factory.create(head, shape.head_dim).with_context(|| format!("--selectors: `{spec}`"))?;
            let ctx = BuildContext {
                head,
                keys,
                dynamic: sel.static_part().dynamic_range(n),
                train_queries: &layer.train[j],
                scale: layer.scale(),
            };
            let t = Instant::now();
            sel.build(&ctx).with_context(|| format!("building `{spec}` for KV head {j} at {n} keys"))?;
            build_s += t.elapsed().as_secs_f64();
            sels.push(sel);
        }
        let static_part = sels.first().map(|s| s.static_part()).context("no KV heads")?;
        tracing::debug!(context = n, selector = spec, build_s, "built");
        Ok(Self {
            spec: spec.to_string(),
            describe: factory.describe(),
            budget: cfg.budget,
            dynamic: static_part.dynamic_range(n),
            static_part,
            sels,
            build_s,
            selections: (0..shape.n_kv_heads).map(|_| Selection::default()).collect(),
            scratch: (0..shape.n_kv_heads).map(|_| GroupScratch::default()).collect(),
            select_ms: Vec::new(),
            attend_ms: Vec::new(),
            total_ms: Vec::new(),
            counts: [0; 5],
            outputs: Vec::new(),
        })
    }

    /// One decode step of the layer for query row `q` (`n_q_heads × head_dim`), per KV head:
    /// clamp the budget, `select`, `attend_group` — the path of `KvCache::attend_decode`.
    fn step(&mut self, layer: &Layer, q: &[f32], timed: bool) -> Result<()> {
        let (d, g, n) = (layer.shape.head_dim, layer.shape.group(), layer.len());
        let (mut ts, mut ta) = (0.0, 0.0);
        for j in 0..self.sels.len() {
            let qg = &q[j * g * d..(j + 1) * g * d];
            let (keys, values) = (&layer.keys[j], &layer.values[j]);
            let sel = &mut self.selections[j];
            let t0 = Instant::now();
            sel.clear();
            if !self.dynamic.is_empty() {
                let budget = clamp(self.budget, &self.dynamic);
                self.sels[j].select(qg, keys, self.dynamic.clone(), &budget, sel)?;
            }
            let t1 = Instant::now();
            let out = attend_group(qg, keys, values, self.static_part, sel, layer.scale(), &mut self.scratch[j])?;
            let t2 = Instant::now();
            if timed {
                ts += (t1 - t0).as_secs_f64();
                ta += (t2 - t1).as_secs_f64();
                self.outputs.extend_from_slice(out);
                let st = sel.stats;
                let attended = (n - self.dynamic.len() + sel.ids.len()) as u64;
                for (c, x) in self.counts.iter_mut().zip([
                    sel.ids.len() as u64,
                    st.full_scored,
                    st.codes_scored,
                    st.bytes_read,
                    attended + st.full_scored,
                ]) {
                    *c += x;
                }
            }
        }
        if timed {
            self.select_ms.push(ts * 1e3);
            self.attend_ms.push(ta * 1e3);
            self.total_ms.push((ts + ta) * 1e3);
        }
        Ok(())
    }

    fn finish(self, layer: &Layer, args: &SweepArgs) -> Measured {
        let n = layer.len();
        let per = (self.total_ms.len() * self.sels.len()).max(1) as f64;
        let step_ms = median(&self.total_ms);
        let [ids, full, codes, bytes, touched] = self.counts.map(|c| c as f64 / per);
        let row = SweepRow {
            context: n,
            selector: self.spec,
            describe: self.describe,
            budget: self.budget,
            static_keys: n - self.dynamic.len(),
            dynamic_keys: self.dynamic.len(),
            train_queries: layer.train.first().map_or(0, |t| t.len() / layer.shape.head_dim),
            build_s: self.build_s,
            selector_bytes: self.sels.iter().map(|s| s.memory_bytes()).sum(),
            select_ms: median(&self.select_ms),
            attend_ms: median(&self.attend_ms),
            step_ms,
            step_min_ms: self.total_ms.iter().copied().fold(f64::INFINITY, f64::min),
            model_step_ms: step_ms * args.model_layers as f64,
            selected: ids,
            full_scored: full,
            codes_scored: codes,
            select_bytes: bytes,
            touched_pct: 100.0 * touched / n as f64,
            speedup: None,
            speedup_best: None,
        };
        Measured { row, outputs: self.outputs }
    }
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
fn measure_all(layer: &Layer, specs: &[String], args: &SweepArgs, pool: &rayon::ThreadPool) -> Result<Vec<Measured>> {
    let mut runs = Vec::with_capacity(specs.len());
    for spec in specs {
        runs.push(Run::build(layer, spec, args)?);
    }
    let row = layer.shape.n_q_heads * layer.shape.head_dim;
    let steps = layer.tests.len() / row;
    let mut flush = vec![1u64; (args.flush_mb << 20) / 8];
    pool.install(|| -> Result<()> {
        // Step 0 is a warm-up (first touch of scratch buffers and selector caches), not timed.
        for step in 0..=steps {
            let q = &layer.tests[step.saturating_sub(1) * row..][..row];
            for i in 0..runs.len() {
                let k = (i + step) % runs.len();
                evict(&mut flush);
                runs[k].step(layer, q, step > 0)?;
            }
        }
        Ok(())
    })?;
    Ok(runs.into_iter().map(|r| r.finish(layer, args)).collect())
}

/// Checked arguments: contexts ascending, selectors with `full` first.
fn plan(args: &SweepArgs) -> Result<(Vec<usize>, Vec<String>)> {
    ensure!(!args.contexts.is_empty(), "--contexts: give at least one context length");
    let mut contexts: Vec<usize> = args.contexts.clone();
    if let Some(&bad) = contexts.iter().find(|&&c| c == 0) {
        bail!("--contexts: {bad} is not a positive token count");
    }
    if let Some(max) = args.max_context {
        contexts.retain(|&c| c <= max);
        ensure!(!contexts.is_empty(), "--max-context {max}: every context length in --contexts is larger");
    }
    contexts.sort_unstable();
    contexts.dedup();
    let mut selectors: Vec<String> =
        args.selectors.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    ensure!(!selectors.is_empty(), "--selectors: give at least one selector spec (e.g. `full;retrieval`)");
    for s in &selectors {
        selector_from_spec(s).with_context(|| format!("--selectors: `{s}`"))?;
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
    ensure!(args.steps > 0, "--steps: must be at least 1");
    ensure!(args.model_layers > 0, "--model-layers: must be at least 1");
    ensure!(args.noise.is_finite() && args.noise >= 0.0, "--noise: {} is not a finite number ≥ 0", args.noise);
    Ok((contexts, selectors))
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Runs the sweep; writes nothing (see [`finish`] for the table, JSON and plot).
pub fn run(args: &SweepArgs) -> Result<SweepReport> {
    let (contexts, selectors) = plan(args)?;
    let source = match &args.trace {
        Some(path) => Source::Trace { path: path.clone(), layer: TraceLayer::read(path, args.layer)? },
        None => Source::Synthetic { seed: args.seed },
    };
    let shape = source.shape();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("one-thread pool for decode steps")?;
    let mut notes = vec![
        format!(
            "decode steps: one thread, the {} KV heads one after another; times are medians over {} steps of \
             the sum over heads (one layer); build times are summed over heads",
            shape.n_kv_heads, args.steps
        ),
        format!(
            "whole-model column = one layer × {} layers: an extrapolation (same context in every layer), not a \
             measurement of the model",
            args.model_layers
        ),
        "the context is fixed during the steps (no new key appended per step, unlike the model)".into(),
        if args.flush_mb > 0 {
            format!("caches are cold at each timed step ({} MiB read in between, untimed)", args.flush_mb)
        } else {
            "caches are warm (--flush-mb 0): selectors may find rows that the previous one read".into()
        },
        "touched = keys attended (static part + selection) + keys the selector scored at full precision, over \
         the context; the oracle scores every dynamic key, so it exceeds 100 %"
            .into(),
    ];
    if let Source::Trace { layer, .. } = &source
        && contexts.iter().any(|&c| c > layer.n_tokens)
    {
        notes.push(format!(
            "contexts above {} keys are extended by resampling real keys with noise (see `data`)",
            layer.n_tokens
        ));
    }
    let mut report = SweepReport {
        args: SweepArgs { contexts: contexts.clone(), selectors: selectors.clone(), ..args.clone() },
        data: source.describe(args),
        notes,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        decode_threads: pool.current_num_threads(),
        build_threads: rayon::current_num_threads(),
        load_before: loadavg(),
        load_after: None,
        rows: Vec::new(),
    };
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
    }
    report.load_after = loadavg();
    Ok(report)
}

/// Prints the table, then writes `--json` and `--plot` when given.
pub fn finish(args: &SweepArgs, report: &SweepReport) -> Result<()> {
    print_table(report);
    if let Some(p) = &args.json {
        let s = serde_json::to_string_pretty(report)?;
        // Results a user already has are never overwritten.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, s.as_bytes()))
            .with_context(|| format!("--json: writing {} (an existing file is never overwritten)", p.display()))?;
        tracing::info!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        plot(report, p).with_context(|| format!("--plot {}", p.display()))?;
        tracing::info!("wrote {}", p.display());
    }
    Ok(())
}

fn tokens(n: usize) -> String {
    if n.is_multiple_of(1024) { format!("{}K", n / 1024) } else { n.to_string() }
}

/// The table as Markdown (so it can be pasted into docs).
pub fn table(report: &SweepReport) -> String {
    let mut s = format!(
        "| context | selector | build s | select ms | attend ms | layer ms/step | min ms | ×{} layers ms (est.) | \
         ids | scored | touched % | vs full | vs full (min) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report.args.model_layers
    );
    for r in &report.rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.0} | {:.0} | {:.2} | {} | {} |\n",
            tokens(r.context),
            r.selector,
            r.build_s,
            r.select_ms,
            r.attend_ms,
            r.step_ms,
            r.step_min_ms,
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

/// Prints the table and the notes to stdout.
#[allow(clippy::print_stdout)] // the table is the command's output
pub fn print_table(report: &SweepReport) {
    println!("data: {}", report.data);
    for n in &report.notes {
        println!("note: {n}");
    }
    println!("{}", table(report));
    if let Some(&n) = report.contexts().last() {
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
        println!("speed-up over full at {} (median steps; fastest steps): {}", tokens(n), ratios.join(", "));
    }
}

/// Distinct, readable line colours (no yellow on white).
fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(0, 0, 0),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// Two panels against context length (log 2): one layer's decode-attention time per step, and
/// the speed-up over `full`; one line per selector.
pub fn plot(report: &SweepReport, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let contexts = report.contexts();
    ensure!(!report.rows.is_empty(), "nothing to plot: the report has no rows");
    let mut selectors: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !selectors.contains(&r.selector.as_str()) {
            selectors.push(&r.selector);
        }
    }
    let x = |n: usize| (n as f64).log2();
    let (x0, x1) = (x(contexts[0]) - 0.3, x(contexts[contexts.len() - 1]) + 0.3);
    let times: Vec<f64> = report.rows.iter().map(|r| r.step_ms).filter(|t| *t > 0.0).collect();
    let (tmin, tmax) = (times.iter().copied().fold(f64::INFINITY, f64::min), times.iter().copied().fold(0.0, f64::max));
    ensure!(tmax > 0.0, "nothing to plot: no positive step times");
    let speeds: Vec<f64> = report.rows.iter().filter_map(|r| r.speedup).filter(|s| *s > 0.0).collect();
    let smax = speeds.iter().copied().fold(1.0, f64::max);
    let smin = speeds.iter().copied().fold(1.0, f64::min);

    let root = BitMapBackend::new(path, (1500, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title, body) = root.split_vertically(50);
    let caption = format!(
        "Decode attention, one layer ({} KV heads × {} query heads, dim {}), 1 thread; medians of {} steps",
        report.n_kv_heads, report.n_q_heads, report.head_dim, report.args.steps
    );
    title.draw(&Text::new(caption, (20, 15), ("sans-serif", 24).into_font())).map_err(|e| err(&e))?;
    let (left, right) = body.split_horizontally(750);
    // Ticks only at powers of two: the contexts are powers of two by default.
    let fmt_x = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 { tokens(2f64.powf(v.round()) as usize) } else { String::new() }
    };

    let mut c = ChartBuilder::on(&left)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (tmin * 0.7..tmax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("context (keys per head)")
        .y_desc("ms per decode step (select + attend), log")
        .x_labels(contexts.len() + 1)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&|v| if *v >= 1.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, sel) in selectors.iter().enumerate() {
        let style = color(i).stroke_width(3);
        let pts: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| r.selector == *sel && r.step_ms > 0.0)
            .map(|r| (x(r.context), r.step_ms))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|e| err(&e))?
            .label(sel.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 25, y)], style));
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, style.filled()))).map_err(|e| err(&e))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut c = ChartBuilder::on(&right)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (smin * 0.7..smax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("context (keys per head)")
        .y_desc("speed-up over full, same run (log)")
        .x_labels(contexts.len() + 1)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}×") } else { format!("{v:.1}×") })
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(|e| err(&e))?;
    // The target: 10× at 128K.
    c.draw_series(LineSeries::new([(x0, 10.0), (x1, 10.0)], BLACK.mix(0.4).stroke_width(1))).map_err(|e| err(&e))?;
    for (i, sel) in selectors.iter().enumerate() {
        let style = color(i).stroke_width(3);
        let pts: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| r.selector == *sel)
            .filter_map(|r| Some((x(r.context), r.speedup.filter(|s| *s > 0.0)?)))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), style)).map_err(|e| err(&e))?;
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, style.filled()))).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(selectors: &[&str]) -> SweepArgs {
        SweepArgs {
            contexts: vec![2048],
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            steps: 3,
            max_train: 300,
            ..SweepArgs::default()
        }
    }

    fn measure(layer: &Layer, spec: &str, args: &SweepArgs) -> Measured {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        measure_all(layer, &[spec.to_string()], args, &pool).unwrap().remove(0)
    }

    #[test]
    fn end_to_end_rows_are_consistent() {
        let args = small(&["streaming", "oracle"]);
        let r = run(&args).unwrap();
        // `full` is added first as the baseline.
        let names: Vec<&str> = r.rows.iter().map(|r| r.selector.as_str()).collect();
        assert_eq!(names, ["full", "streaming", "oracle"]);
        let full = r.row(2048, "full").unwrap();
        assert!((full.touched_pct - 100.0).abs() < 1e-9, "{full:?}");
        assert_eq!((full.static_keys, full.dynamic_keys, full.full_scored), (2048, 0, 0.0));
        assert_eq!((full.speedup, full.speedup_best), (Some(1.0), Some(1.0)));
        let st = r.row(2048, "streaming").unwrap();
        let expect = 100.0 * (needle_select_defaults::SINKS + needle_select_defaults::WINDOW) as f64 / 2048.0;
        assert!((st.touched_pct - expect).abs() < 1e-9, "{} vs {expect}", st.touched_pct);
        assert_eq!(st.selected, 0.0);
        let or = r.row(2048, "oracle").unwrap();
        assert_eq!(or.selected, 100.0);
        assert_eq!(or.full_scored, or.dynamic_keys as f64);
        assert_eq!(or.train_queries, 300 / 3 * 3);
        for row in &r.rows {
            assert!(row.step_ms >= 0.0 && row.select_ms >= 0.0 && row.attend_ms >= 0.0);
            assert!(row.speedup.is_some());
            assert_eq!(row.model_step_ms, row.step_ms * 30.0);
        }
        assert!(table(&r).contains("| 2K | oracle |"));
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("s.png");
        plot(&r, &png).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    }

    /// Spelled out here so the test fails if the selector defaults change under it.
    mod needle_select_defaults {
        pub const SINKS: usize = 128;
        pub const WINDOW: usize = 512;
    }

    #[test]
    fn oracle_with_the_whole_dynamic_part_equals_full() {
        let args = small(&["full"]);
        let src = Source::Synthetic { seed: 7 };
        let layer = src.layer(2048, &args).unwrap();
        let dynamic = 2048 - 128 - 512;
        let full = measure(&layer, "full", &args);
        let or = measure(&layer, &format!("oracle:k={dynamic}"), &args);
        assert_eq!(or.row.selected, dynamic as f64);
        assert_eq!(full.outputs.len(), 3 * 9 * 64);
        let worst = full.outputs.iter().zip(&or.outputs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "max |full - oracle| = {worst}");
        // A smaller budget really changes the output (the check above is not vacuous).
        let small_k = measure(&layer, "oracle:k=10", &args);
        let diff = full.outputs.iter().zip(&small_k.outputs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff > 1e-4, "{diff}");
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let e = format!("{:#}", run(&small(&[])).unwrap_err());
        assert!(e.contains("--selectors"), "{e}");
        let e = format!("{:#}", run(&small(&[" "])).unwrap_err());
        assert!(e.contains("--selectors"), "{e}");
        let e = format!("{:#}", run(&small(&["full", "nope"])).unwrap_err());
        assert!(e.contains("--selectors") && e.contains("nope"), "{e}");
        let e = format!("{:#}", run(&small(&["oracle:k=5000"])).unwrap_err());
        assert!(e.contains("--selectors") && e.contains("oracle:k=5000"), "{e}");
        let e = format!("{:#}", run(&SweepArgs { contexts: vec![], ..small(&["full"]) }).unwrap_err());
        assert!(e.contains("--contexts"), "{e}");
        let e = format!("{:#}", run(&SweepArgs { max_context: Some(1000), ..small(&["full"]) }).unwrap_err());
        assert!(e.contains("--max-context"), "{e}");
        let e = format!("{:#}", run(&SweepArgs { steps: 0, ..small(&["full"]) }).unwrap_err());
        assert!(e.contains("--steps"), "{e}");
        assert!(parse_tokens("4K") == Ok(4096) && parse_tokens("12") == Ok(12));
        assert!(parse_tokens("0").is_err() && parse_tokens("4M").unwrap_err().contains("4M"));
    }

    /// Writes a tiny trace with `layer` (2 KV heads, 4 query heads, dim 8).
    fn write_trace(path: &Path, layer: usize, n_tokens: usize, n_prompt: usize) {
        use safetensors::tensor::TensorView;
        let (kv, q, d) = (2, 4, 8);
        let mut rng = Rng::new(3, 0);
        let mut data = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| rng.normal().to_le_bytes()).collect() };
        let tensors = [
            (format!("layer.{layer}.keys"), data(kv * n_tokens * d), vec![kv, n_tokens, d]),
            (format!("layer.{layer}.prefill_queries"), data(n_prompt * q * d), vec![n_prompt, q, d]),
            (format!("layer.{layer}.decode_queries"), data(5 * q * d), vec![5, q, d]),
        ];
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn trace_layers_are_read_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write_trace(&p, 5, 700, 695);
        let args =
            SweepArgs { trace: Some(p.clone()), layer: 9, contexts: vec![1024, 2048], ..small(&["full", "oracle"]) };
        let e = format!("{:#}", run(&args).unwrap_err());
        assert!(e.contains("--layer 9") && e.contains("traced layers: 5") && e.contains("t.safetensors"), "{e}");
        let args = SweepArgs { layer: 5, ..args };
        let r = run(&args).unwrap();
        assert_eq!((r.n_q_heads, r.n_kv_heads, r.head_dim), (4, 2, 8));
        assert!(r.data.contains("resampling") && r.notes.iter().any(|n| n.contains("700")));
        assert_eq!(r.row(2048, "oracle").unwrap().dynamic_keys, 2048 - 640);
        // Training rows: prefill positions inside the context, strided to at most 300 rows.
        assert_eq!(r.row(1024, "oracle").unwrap().train_queries, 695usize.div_ceil(695usize.div_ceil(150)) * 2);
        // The extension keeps the real start and the real tail.
        let t = TraceLayer::read(&p, 5).unwrap();
        let real = t.head_keys(1);
        let ext = extend_keys(real, 8, 2048, 0.05, &mut Rng::new(0, 0));
        assert_eq!(ext.len(), 2048 * 8);
        let tail = real_tail(700) * 8;
        assert_eq!(&ext[..8 * 100], &real[..8 * 100]);
        assert_eq!(&ext[ext.len() - tail..], &real[real.len() - tail..]);
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"nope").unwrap();
        let e = format!("{:#}", run(&SweepArgs { trace: Some(junk), ..args }).unwrap_err());
        assert!(e.contains("--trace") && e.contains("junk"), "{e}");
    }

    #[test]
    fn synthetic_layers_are_seeded() {
        let args = small(&["full"]);
        let a = Source::Synthetic { seed: 1 }.layer(300, &args).unwrap();
        let b = Source::Synthetic { seed: 1 }.layer(300, &args).unwrap();
        let c = Source::Synthetic { seed: 2 }.layer(300, &args).unwrap();
        assert_eq!(a.keys[2].row(299), b.keys[2].row(299));
        assert_ne!(a.keys[2].row(299), c.keys[2].row(299));
        assert_eq!(a.tests, b.tests);
        assert_eq!(a.tests.len(), 3 * 9 * 64);
    }
}
