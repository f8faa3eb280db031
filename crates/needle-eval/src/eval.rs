//! Selectors against full attention on the same model and prompts.
//!
//! - **fidelity** ([`fidelity`]): one long prompt is prefilled once; full attention then decodes
//!   greedily and every selector decodes the same tokens (teacher forcing) from a fork of the
//!   same prefill. Per step: KL of the next-token distribution against full attention, agreement
//!   of the greedy token, and — on chosen layers, per query head — recall of the true top-k keys
//!   of the dynamic part, attention mass captured, relative error of the attention output.
//!   Cost: keys touched, bytes read, time split into selection, attention and the rest.
//!   [`fidelity_of_context`] does the same from a saved context: its own selector as loaded,
//!   and others built over its pages, after an optional question.
//! - **passkey** and **RULER-style** tasks ([`run_tasks`], `needle-tasks`): each prompt is
//!   prefilled once and every selector answers from a fork; exact-match or recall-of-all scoring.
//!
//! Prefill is dense for every selector, so the selectors differ only in decode attention (sparse
//! prefill patterns are compared in [`crate::prefill`]).

use std::time::{Duration, Instant};

use needle_core::attention::{Partial, dense, scores, top_k};
use needle_core::metrics::{attention_mass, kl_divergence, recall, relative_error};
use needle_core::{RowSource, attend_selected};
use needle_loader::Tokenizer;
use needle_model::context::SavedContext;
use needle_model::{KvCache, KvDtype, Llama, NeedleBackend, SelectionConfig, argmax, compose};
use needle_tasks::{Filler, TaskSpec};
use serde::Serialize;

use crate::error::{Context, Error, Result};

/// One default spec per built-in selector (what `all` stands for in [`parse_selectors`]).
pub const ALL: &[&str] = &[
    "full",
    "streaming",
    "oracle",
    "retrieval:index=graph",
    "retrieval:index=hnsw",
    "retrieval:index=ivfpq",
    "retrieval:index=lsh",
    "quest",
    "block",
    "lsh-sample",
    "tokenselect",
];

/// Selector specs separated by `;` (specs contain commas), or `all`; each is checked.
pub fn parse_selectors(s: &str) -> Result<Vec<String>> {
    let list: Vec<String> = if s.trim() == "all" {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        s.split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    };
    if list.is_empty() {
        return Err(Error::invalid("selectors", "empty: give specs separated by `;`, or `all`"));
    }
    for spec in &list {
        needle_select::parse(spec).map_err(|e| Error::invalid("selectors", format!("`{spec}`: {e}")))?;
    }
    Ok(list)
}

/// Fidelity and cost of one selector against full attention.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityRow {
    /// Selector spec.
    pub selector: String,
    /// Steps compared.
    pub steps: usize,
    /// Mean KL(full ‖ selector) of the next-token distribution.
    pub mean_kl: f64,
    /// Largest per-step KL.
    pub max_kl: f64,
    /// Share of steps whose greedy token equals full attention's.
    pub agreement: f64,
    /// Mean recall of the true top-k dynamic keys (None when there is no dynamic part).
    pub recall: Option<f64>,
    /// Mean share of attention mass on the attended keys.
    pub mass: f64,
    /// Mean relative L2 error of the attention output.
    pub output_error: f64,
    /// Share of context keys whose full vectors were read per step.
    pub keys_touched: f64,
    /// The same on the global layers only, where the selectors choose (equal to
    /// `keys_touched` for a model without sliding-window layers).
    pub keys_touched_global: f64,
    /// Bytes of keys, values and index data read per decode step (all layers).
    pub bytes_per_step: f64,
    /// Milliseconds per step choosing keys.
    pub select_ms: f64,
    /// Milliseconds per step in decode attention.
    pub attend_ms: f64,
    /// Milliseconds per step in the rest of the model.
    pub other_ms: f64,
    /// Seconds building the selectors after prefill.
    pub build_s: f64,
}

/// One task answer of one selector.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// Selector spec.
    pub selector: String,
    /// Task spec.
    pub task: String,
    /// Prompt length in tokens.
    pub tokens: usize,
    /// Requested length.
    pub length: usize,
    /// Needle depth.
    pub depth: f64,
    /// Seed.
    pub seed: u64,
    /// Score in [0, 1].
    pub score: f64,
    /// What the model wrote.
    pub generated: String,
    /// The expected answer.
    pub answer: String,
    /// Share of keys the answer's decode steps touched (all layers; 0 when the answer took
    /// no decode step).
    pub keys_touched: f64,
    /// The same on the global layers only, where the selectors choose.
    pub keys_touched_global: f64,
}

/// Settings of [`fidelity`].
#[derive(Debug, Clone, PartialEq)]
pub struct FidelityConfig {
    /// Decode steps compared.
    pub steps: usize,
    /// Layers whose attention is compared key by key (empty: every 4th, or every global layer
    /// of a model with sliding-window layers).
    pub attn_layers: Vec<usize>,
    /// Prefill chunk size.
    pub chunk: usize,
    /// Precision of the KV pages the compared selectors decode from (the full-attention teacher
    /// and the prefill keep `f32`).
    pub kv: KvDtype,
}

impl Default for FidelityConfig {
    fn default() -> Self {
        Self { steps: 64, attn_layers: Vec::new(), chunk: 512, kv: KvDtype::F32 }
    }
}

/// Settings of [`run_tasks`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths (0 = start, 1 = end).
    pub depths: Vec<f64>,
    /// Seeds per grid cell.
    pub seeds: Vec<u64>,
    /// Most tokens generated per answer.
    pub answer_tokens: usize,
    /// Prefill chunk size.
    pub chunk: usize,
    /// Precision of the KV pages the selectors decode from (the prefill keeps `f32`).
    pub kv: KvDtype,
}

/// Prefills `tokens` densely once, keeping what forks need.
pub fn prefill_base<B: NeedleBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(KvCache<B::KvMirror>, Vec<f32>)> {
    let (factory, mut sel) = compose(needle_select::parse("full").during(|| "selector `full`".into())?);
    // `full` itself trains on nothing; the forks' selectors train on this prefill's queries.
    sel.train_positions = SelectionConfig::default().train_positions;
    let cfg = model.config();
    let mut base = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
    base.retain_training_queries();
    let last = tokens.len().saturating_sub(1);
    let logits = model.prefill(tokens, &mut base, chunk, &[last], progress).during(|| "prefill".into())?;
    Ok((base, logits))
}

/// A cache with the selector `spec` built over `base`'s prefill, its pages stored as `kv`.
pub fn fork<B: NeedleBackend>(
    model: &Llama<B>,
    base: &KvCache<B::KvMirror>,
    spec: &str,
    kv: KvDtype,
) -> Result<KvCache<B::KvMirror>> {
    let (factory, mut config) = compose(needle_select::parse(spec).during(|| format!("selector `{spec}`"))?);
    config.kv = kv;
    base.fork(factory.as_ref(), config, model.scale()).during(|| format!("building selector `{spec}`"))
}

/// The first `n` tokens of `text` from its first chapter heading on (`Chapter 1` or
/// `CHAPTER I`, else the start).
pub fn text_tokens(tok: &Tokenizer, text: &str, n: usize) -> Result<Vec<u32>> {
    let start = text.find("Chapter 1").or_else(|| text.find("CHAPTER I")).unwrap_or(0);
    let ids = tok.encode_prefix(&text[start..], n)?;
    if ids.len() < n {
        return Err(Error::invalid(
            "context_tokens",
            format!("the text has only {} tokens after its start; {n} were asked for", ids.len()),
        ));
    }
    Ok(ids)
}

/// What a run of decode steps produced.
struct Decoded {
    /// Tokens fed, one per step.
    tokens: Vec<u32>,
    /// Next-token logits after each step.
    logits: Vec<Vec<f32>>,
    /// Per step and compared query head: recall, mass, output error.
    metrics: Vec<[f64; 3]>,
    /// Wall time of the decode calls.
    wall: Duration,
}

fn first_token(logits: &[f32]) -> Result<u32> {
    argmax(logits).ok_or_else(|| Error::invalid("model", "returned empty logits"))
}

/// Decodes `steps` tokens: the teacher's tokens when given (teacher forcing), else greedy.
/// Returns per-step logits and the per-step attention metrics on `layers`.
fn decode_steps<B: NeedleBackend>(
    model: &Llama<B>,
    cache: &mut KvCache<B::KvMirror>,
    first_logits: &[f32],
    steps: usize,
    teacher: Option<&[u32]>,
    layers: &[usize],
) -> Result<Decoded> {
    cache.trace_queries(layers.to_vec()).during(|| "attn_layers".into())?;
    let (mut tokens, mut logits, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = first_token(first_logits)?;
    let mut wall = Duration::ZERO;
    for step in 0..steps {
        let feed = teacher.and_then(|t| t.get(step).copied()).unwrap_or(next);
        tokens.push(feed);
        let t = Instant::now();
        let l = model.decode(feed, cache).during(|| format!("decode step {step}"))?;
        wall += t.elapsed();
        next = first_token(&l)?;
        metrics.extend(attention_metrics(model, cache, step)?);
        logits.push(l);
    }
    Ok(Decoded { tokens, logits, metrics, wall })
}

/// Recall of the true top-k dynamic keys, attention mass captured and output error, per query
/// head of the traced layers at decode step `step` (NaN recall where there is no dynamic part).
fn attention_metrics<B: NeedleBackend>(
    model: &Llama<B>,
    cache: &KvCache<B::KvMirror>,
    step: usize,
) -> Result<Vec<[f64; 3]>> {
    let Some(trace) = cache.query_trace() else { return Ok(Vec::new()) };
    let gqa = model.gqa();
    let d = model.config().head_dim;
    let scale = model.scale();
    let row = gqa.n_q_heads * d;
    let budget = cache.config().budget.max_ids();
    let mut out = Vec::new();
    for (slot, &layer) in trace.layers.iter().enumerate() {
        // A sliding-window layer attends to its whole window: nothing selected to measure.
        if cache.layer_kind(layer) != needle_model::LayerKind::Global {
            continue;
        }
        let q_all = &trace.decode[slot][step * row..(step + 1) * row];
        for j in 0..gqa.n_kv_heads {
            let (keys, values) = (cache.keys(layer, j), cache.values(layer, j));
            let sp = cache.static_part(layer, j);
            let sel = cache.last_selection(layer, j);
            let dynamic = sp.dynamic_range(keys.len());
            let mut attended: Vec<u32> = sp.static_ids(keys.len()).collect();
            attended.extend_from_slice(&sel.ids);
            for h in gqa.group(j) {
                let q = &q_all[h * d..(h + 1) * d];
                let s = scores(q, keys, scale)?;
                let rec = if dynamic.is_empty() {
                    f64::NAN
                } else {
                    let ds = &s[dynamic.start as usize..dynamic.end as usize];
                    let truth: Vec<u32> =
                        top_k(ds, budget.min(ds.len()))?.iter().map(|(i, _)| i + dynamic.start).collect();
                    recall(&sel.ids, &truth)
                };
                let mass = attention_mass(&s, &attended)?;
                let full: Partial<f64> = dense(q, keys, values, scale)?;
                let got: Partial<f64> = attend_selected(q, keys, values, sp, sel, scale)?;
                let a: Vec<f32> = got.out.iter().map(|&x| x as f32).collect();
                let e: Vec<f32> = full.out.iter().map(|&x| x as f32).collect();
                out.push([rec, mass, relative_error(&a, &e)?]);
            }
        }
    }
    Ok(out)
}

/// Mean of the finite values, `None` when there are none.
pub fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Full attention's greedy decode, which every compared selector follows (teacher forcing).
struct Teacher<'m, B: NeedleBackend> {
    model: &'m Llama<B>,
    cfg: &'m FidelityConfig,
    layers: Vec<usize>,
    first: Vec<f32>,
    decoded: Decoded,
}

impl<'m, B: NeedleBackend> Teacher<'m, B> {
    /// Decodes `cfg.steps` greedy tokens with `full` (a full-attention cache) from `first`.
    fn new(
        model: &'m Llama<B>,
        mut full: KvCache<B::KvMirror>,
        first: Vec<f32>,
        cfg: &'m FidelityConfig,
    ) -> Result<Self> {
        // By default every 4th layer, or every global layer of a model with sliding-window layers
        // (a window layer has no selection to compare).
        let kinds = model.layer_kinds();
        let global: Vec<usize> = (0..kinds.len()).filter(|&l| kinds[l] == needle_model::LayerKind::Global).collect();
        let step = if global.len() == kinds.len() { 4 } else { 1 };
        let layers = if cfg.attn_layers.is_empty() {
            global.into_iter().step_by(step).collect()
        } else {
            cfg.attn_layers.clone()
        };
        let decoded = decode_steps(model, &mut full, &first, cfg.steps, None, &[])?;
        tracing::info!(
            "full attention: {:.1} ms per step; attention compared on layers {layers:?}",
            decoded.wall.as_secs_f64() * 1e3 / cfg.steps.max(1) as f64
        );
        Ok(Self { model, cfg, layers, first, decoded })
    }

    /// Decodes the teacher's tokens with `cache` (selector `spec`, built in `build_s` seconds)
    /// and compares.
    fn compare(&self, spec: &str, mut cache: KvCache<B::KvMirror>, build_s: f64) -> Result<FidelityRow> {
        let (model, cfg, teacher) = (self.model, self.cfg, &self.decoded);
        let Decoded { logits, metrics, wall, .. } =
            decode_steps(model, &mut cache, &self.first, cfg.steps, Some(&teacher.tokens), &self.layers)?;
        let kls =
            logits.iter().zip(&teacher.logits).map(|(q, p)| kl_divergence(p, q)).collect::<Result<Vec<_>, _>>()?;
        let agree = logits.iter().zip(&teacher.logits).filter(|(q, p)| argmax(q) == argmax(p)).count();
        let s = &cache.stats;
        let steps = s.steps.max(1) as f64;
        let ms = |x: Duration| x.as_secs_f64() * 1e3 / steps;
        let d = model.config().head_dim as f64;
        let bytes = s.select.bytes_read as f64 + s.keys_attended as f64 * d * cache.config().kv.bytes() as f64 * 2.0;
        let wall_ms = wall.as_secs_f64() * 1e3 / steps;
        Ok(FidelityRow {
            selector: spec.to_string(),
            steps: cfg.steps,
            mean_kl: mean(kls.iter().copied()).unwrap_or(0.0),
            max_kl: kls.iter().copied().fold(0.0, f64::max),
            agreement: agree as f64 / cfg.steps.max(1) as f64,
            recall: mean(metrics.iter().map(|m| m[0])),
            mass: mean(metrics.iter().map(|m| m[1])).unwrap_or(f64::NAN),
            output_error: mean(metrics.iter().map(|m| m[2])).unwrap_or(f64::NAN),
            keys_touched: s.share_touched(),
            keys_touched_global: s.share_touched_global(),
            bytes_per_step: bytes / steps,
            select_ms: ms(s.select_time),
            attend_ms: ms(s.attend_time),
            other_ms: wall_ms - ms(s.select_time) - ms(s.attend_time),
            build_s,
        })
    }
}

/// Fidelity of each selector against full attention on the prompt `tokens`.
/// `prefill(done, total)` reports prefill tokens; `selectors(done, total)` selectors finished.
pub fn fidelity<B: NeedleBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    selectors: &[String],
    cfg: &FidelityConfig,
    prefill: &mut dyn FnMut(usize, usize),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<FidelityRow>> {
    let (base, first) = prefill_base(model, tokens, cfg.chunk, prefill)?;
    tracing::info!("fidelity: {} prompt tokens, {} steps", tokens.len(), cfg.steps);
    let teacher = Teacher::new(model, fork(model, &base, "full", KvDtype::F32)?, first, cfg)?;
    let mut rows = Vec::new();
    for (i, spec) in selectors.iter().enumerate() {
        let t = Instant::now();
        let c = fork(model, &base, spec, cfg.kv)?;
        rows.push(teacher.compare(spec, c, t.elapsed().as_secs_f64())?);
        progress(i + 1, selectors.len());
    }
    Ok(rows)
}

/// Fidelity of a saved context's own selector — the cache as loaded, its index not rebuilt; the
/// row's spec ends in ` (saved)` — and of each of `selectors` built over the same pages, against
/// full attention over them. With a `question` (token ids), every cache is first extended by it
/// ([`Llama::extend`]), so the steps compared are the answer to it. `progress(done, total)`
/// counts selectors.
pub fn fidelity_of_context<B: NeedleBackend>(
    model: &Llama<B>,
    saved: SavedContext<B::KvMirror>,
    question: &[u32],
    selectors: &[String],
    cfg: &FidelityConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<FidelityRow>> {
    let SavedContext { info, last_logits, cache: mut own, .. } = saved;
    let ask = |c: &mut KvCache<B::KvMirror>, first: Vec<f32>| -> Result<Vec<f32>> {
        if question.is_empty() {
            return Ok(first);
        }
        model.extend(question, c, cfg.chunk, &mut |_, _| ()).during(|| "question".into())
    };
    tracing::info!("fidelity of a saved context: {} tokens, `{}`, {} steps", info.tokens, info.selector, cfg.steps);
    let mut full = fork(model, &own, "full", KvDtype::F32)?;
    let first = ask(&mut full, last_logits)?;
    let teacher = Teacher::new(model, full, first.clone(), cfg)?;
    let total = selectors.len() + 1;
    let mut rows = Vec::new();
    // Other selectors are built over the context's pages, before the question (as a fresh
    // prefill's are built over the prompt), then asked it.
    for (i, spec) in selectors.iter().enumerate() {
        let t = Instant::now();
        let mut c = fork(model, &own, spec, cfg.kv)?;
        let build_s = t.elapsed().as_secs_f64();
        ask(&mut c, Vec::new())?;
        rows.push(teacher.compare(spec, c, build_s)?);
        progress(i + 1, total);
    }
    ask(&mut own, Vec::new())?;
    rows.insert(0, teacher.compare(&format!("{} (saved)", info.selector), own, 0.0)?);
    progress(total, total);
    Ok(rows)
}

/// Each task of `specs` at each grid point, answered by every selector from one prefill per
/// prompt. `progress(done, total)` counts prompts.
pub fn run_tasks<B: NeedleBackend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    selectors: &[String],
    specs: &[TaskSpec],
    cfg: &TaskConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<TaskRow>> {
    score_tasks(tok, specs, cfg, progress, |tokens| {
        let (base, first) = prefill_base(model, tokens, cfg.chunk, &mut |_, _| {})?;
        selectors
            .iter()
            .map(|sel| {
                let mut c = fork(model, &base, sel, cfg.kv)?;
                let generated = answer(model, tok, &mut c, &first, cfg.answer_tokens)?;
                Ok(Answered::new(sel.clone(), generated, &c))
            })
            .collect()
    })
}

/// One variant's answer to a task prompt, with the share of keys its decode steps touched.
pub(crate) struct Answered {
    name: String,
    generated: String,
    keys_touched: f64,
    keys_touched_global: f64,
}

impl Answered {
    /// `generated` by variant `name`, decoded with `cache` (read for its decode statistics).
    pub(crate) fn new<M>(name: String, generated: String, cache: &KvCache<M>) -> Self {
        let s = &cache.stats;
        Self { name, generated, keys_touched: s.share_touched(), keys_touched_global: s.share_touched_global() }
    }
}

/// Each task of `specs` at each grid point: `answers(prompt tokens)` gives one [`Answered`] per
/// variant compared (a selector, a prefill pattern), each scored into a row.
/// `progress(done, total)` counts prompts.
pub(crate) fn score_tasks(
    tok: &Tokenizer,
    specs: &[TaskSpec],
    cfg: &TaskConfig,
    progress: &mut dyn FnMut(usize, usize),
    mut answers: impl FnMut(&[u32]) -> Result<Vec<Answered>>,
) -> Result<Vec<TaskRow>> {
    let count = |s: &str| tok.encode(s, false).map_or(0, |t| t.len());
    let points = needle_tasks::grid(&cfg.lengths, &cfg.depths, &cfg.seeds);
    let total = specs.len() * points.len();
    let mut rows = Vec::new();
    for (si, spec) in specs.iter().enumerate() {
        for (pi, &p) in points.iter().enumerate() {
            let inst = spec.instance(p, &Filler::Landmark, &count)?;
            // BOS where the vocabulary asks for one (Gemma's does; SmolLM2's does not).
            let tokens = tok.encode(&inst.prompt, true)?;
            for Answered { name, generated, keys_touched, keys_touched_global } in answers(&tokens)? {
                let score = needle_tasks::score(spec, &generated, &inst);
                tracing::info!(
                    "{} {name}: {:.2} ({:?} vs {}), {:.2}% of keys touched ({:.2}% global)",
                    inst.id,
                    score,
                    generated.trim(),
                    inst.answer,
                    100.0 * keys_touched,
                    100.0 * keys_touched_global
                );
                rows.push(TaskRow {
                    selector: name,
                    task: spec.to_string(),
                    tokens: tokens.len(),
                    length: p.length,
                    depth: p.depth,
                    seed: p.seed,
                    score,
                    generated,
                    answer: inst.answer.clone(),
                    keys_touched,
                    keys_touched_global,
                });
            }
            progress(si * points.len() + pi + 1, total);
        }
    }
    Ok(rows)
}

/// Greedy answer: up to `max` tokens, stopping at EOS or a newline after some text.
pub fn answer<B: NeedleBackend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    cache: &mut KvCache<B::KvMirror>,
    first: &[f32],
    max: usize,
) -> Result<String> {
    let mut ids = Vec::new();
    let mut next = first_token(first)?;
    for _ in 0..max {
        if tok.eos_ids().contains(&next) {
            break;
        }
        ids.push(next);
        let text = tok.decode(&ids)?;
        if text.trim_start().contains('\n') {
            break;
        }
        next = first_token(&model.decode(next, cache).during(|| "answering".into())?)?;
    }
    Ok(tok.decode(&ids)?)
}

/// Mean task score of `selector` on `task` (all tasks when `None`) at prompt `length` (all
/// lengths when `None`), over depths and seeds.
pub fn mean_score(rows: &[TaskRow], task: Option<&str>, selector: &str, length: Option<usize>) -> Option<f64> {
    mean(
        rows.iter()
            .filter(|r| {
                task.is_none_or(|t| r.task == t) && r.selector == selector && length.is_none_or(|l| r.length == l)
            })
            .map(|r| r.score),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks train on the base prefill's queries, although `full` (the base) trains on none.
    #[test]
    fn forks_of_the_base_prefill_get_training_queries() {
        let path = needle_fetch::default_model_path().unwrap();
        assert!(path.is_file(), "{} is missing: run `cargo xtask fetch-model`", path.display());
        let ck = needle_loader::open(&path).unwrap();
        let model = Llama::<needle_model::Cpu>::load(&ck, &Default::default()).unwrap();
        let tokens: Vec<u32> = (0..200).map(|i| 1000 + (i * 37) % 5000).collect();
        let (base, _) = prefill_base(&model, &tokens, 64, &mut |_, _| {}).unwrap();
        // A graph index (`qgraph` scans its codes at this size and trains on nothing).
        let fork =
            fork(&model, &base, "retrieval:index=graph,sinks=8,window=16,k=8,min_index=16", KvDtype::F16).unwrap();
        let layers = model.config().num_hidden_layers * model.gqa().n_kv_heads;
        assert!(fork.stats.build.train_queries >= 200 * layers, "{:?}", fork.stats.build);
        assert_eq!(fork.keys(0, 0).dtype(), KvDtype::F16);
    }

    #[test]
    fn selector_lists_parse_and_reject_bad_specs() {
        assert_eq!(parse_selectors("full; retrieval:index=flat,k=10").unwrap().len(), 2);
        assert_eq!(parse_selectors("all").unwrap().len(), ALL.len());
        let e = parse_selectors("full;nope").unwrap_err().to_string();
        assert!(e.contains("selectors") && e.contains("nope"), "{e}");
        assert!(parse_selectors(" ; ").is_err());
    }

    #[test]
    fn task_means_filter_by_task_selector_and_length() {
        let row = |task: &str, sel: &str, length, score| TaskRow {
            selector: sel.into(),
            task: task.into(),
            tokens: length,
            length,
            depth: 0.5,
            seed: 1,
            score,
            generated: String::new(),
            answer: String::new(),
            keys_touched: 0.0,
            keys_touched_global: 0.0,
        };
        let rows = [row("a", "full", 10, 1.0), row("a", "full", 20, 0.0), row("b", "full", 10, 0.5)];
        assert_eq!(mean_score(&rows, Some("a"), "full", None), Some(0.5));
        assert_eq!(mean_score(&rows, None, "full", Some(10)), Some(0.75));
        assert_eq!(mean_score(&rows, Some("a"), "oracle", None), None);
    }
}
