//! Sparse prefill patterns against dense prefill on the same model and prompts.
//!
//! - **fidelity** ([`prefill_fidelity`]): the prompt is prefilled densely, then full attention
//!   decodes greedily; each pattern prefills the same prompt and decodes the same tokens (teacher
//!   forcing) with full attention, so the two differ only in prefill. Per pattern: KL of the
//!   next-token distribution after the prompt, KL over the teacher-forced steps, greedy
//!   agreement, the share of key blocks attended, and prefill wall time (dense and sparse runs
//!   alternate per pattern, so both see the same machine load).
//! - **tasks** ([`prefill_tasks`]): passkey / RULER-style prompts prefilled with each pattern
//!   (decode with full attention), scored as in [`crate::eval::run_tasks`].
//! - **time** ([`prefill_times`]): prefill wall time per context length, dense and each pattern
//!   alternating.

use std::time::Instant;

use needle_core::metrics::kl_divergence;
use needle_core::prefill::PrefillSpec;
use needle_loader::Tokenizer;
use needle_model::{KvCache, Llama, NeedleBackend, argmax, compose};
use needle_tasks::TaskSpec;
use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::eval::{Answered, TaskConfig, TaskRow, answer, mean, score_tasks};

/// Prefill pattern specs separated by `;`, each checked (`dense` is the reference and is always
/// compared against; listing it is allowed).
pub fn parse_patterns(s: &str) -> Result<Vec<(String, PrefillSpec)>> {
    let list: Vec<&str> = s.split(';').map(str::trim).filter(|s| !s.is_empty()).collect();
    if list.is_empty() {
        return Err(Error::invalid("prefill", "empty: give pattern specs separated by `;`"));
    }
    list.into_iter()
        .map(|p| {
            let spec = needle_prefill::parse(p).map_err(|e| Error::invalid("prefill", format!("`{p}`: {e}")))?;
            Ok((spec.describe(), spec))
        })
        .collect()
}

/// One pattern against dense prefill on one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    /// Pattern spec (`dense` for the reference itself).
    pub pattern: String,
    /// Prompt tokens.
    pub tokens: usize,
    /// KL(dense ‖ pattern) of the next-token distribution after the prompt.
    pub first_kl: f64,
    /// Mean KL over the prompt's next token and the teacher-forced steps.
    pub mean_kl: f64,
    /// Largest of those KLs.
    pub max_kl: f64,
    /// Share of those positions whose greedy token equals dense prefill's.
    pub agreement: f64,
    /// Key blocks attended over key blocks dense causal prefill attends (1 for dense).
    pub density: f64,
    /// Prefill seconds with the pattern.
    pub prefill_s: f64,
    /// Prefill seconds of the dense run next to it.
    pub dense_s: f64,
}

/// An empty cache decoding with full attention, prefilling through `prefill`.
fn cache_for<B: NeedleBackend>(model: &Llama<B>, prefill: PrefillSpec) -> Result<KvCache<B::KvMirror>> {
    let (factory, mut sel) = compose(needle_select::parse("full").during(|| "selector `full`".into())?);
    sel.train_positions = 0;
    sel.prefill = prefill;
    let cfg = model.config();
    Ok(KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?)
}

/// What one prefill gave: the cache, the logits after the prompt, wall seconds, density.
struct Prefilled<M> {
    cache: KvCache<M>,
    logits: Vec<f32>,
    secs: f64,
    density: f64,
}

fn prefill<B: NeedleBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    spec: PrefillSpec,
    chunk: usize,
) -> Result<Prefilled<B::KvMirror>> {
    let mut cache = cache_for(model, spec)?;
    let t = Instant::now();
    let logits = model
        .prefill(tokens, &mut cache, chunk, &[tokens.len() - 1], &mut |_, _| {})
        .during(|| format!("prefill ({})", spec.describe()))?;
    let secs = t.elapsed().as_secs_f64();
    let (kept, all) = (cache.stats.prefill_blocks, cache.stats.prefill_blocks_dense);
    let density = if all == 0 { 1.0 } else { kept as f64 / all as f64 };
    Ok(Prefilled { cache, logits, secs, density })
}

/// Feeds `tokens` one by one, returning the logits after each.
fn forced<B: NeedleBackend>(
    model: &Llama<B>,
    cache: &mut KvCache<B::KvMirror>,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    tokens.iter().enumerate().map(|(i, &t)| model.decode(t, cache).during(|| format!("decode step {i}"))).collect()
}

/// Each pattern against dense prefill on `tokens`, with `steps` teacher-forced decode steps
/// after the prompt. `progress(done, total)` counts patterns.
pub fn prefill_fidelity<B: NeedleBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    patterns: &[(String, PrefillSpec)],
    steps: usize,
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PrefillRow>> {
    if tokens.is_empty() {
        return Err(Error::invalid("tokens", "the prompt is empty"));
    }
    let mut dense = prefill(model, tokens, PrefillSpec::DENSE, chunk)?;
    // The teacher: dense prefill, then greedy full-attention decoding.
    let (mut teacher, mut next) = (Vec::new(), first(&dense.logits)?);
    let mut teacher_logits = vec![dense.logits.clone()];
    for i in 0..steps {
        teacher.push(next);
        let l = model.decode(next, &mut dense.cache).during(|| format!("teacher step {i}"))?;
        next = first(&l)?;
        teacher_logits.push(l);
    }
    let mut rows = Vec::new();
    for (i, (name, spec)) in patterns.iter().enumerate() {
        // Dense timed again right before each pattern: both under the same load.
        let dense_s = prefill(model, tokens, PrefillSpec::DENSE, chunk)?.secs;
        let mut p = prefill(model, tokens, *spec, chunk)?;
        let mut logits = vec![p.logits.clone()];
        logits.extend(forced(model, &mut p.cache, &teacher)?);
        let kls = teacher_logits
            .iter()
            .zip(&logits)
            .map(|(a, b)| kl_divergence(a, b))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let agree = teacher_logits.iter().zip(&logits).filter(|(a, b)| argmax(a) == argmax(b)).count();
        tracing::info!("prefill {name}: {:.1}s (dense {dense_s:.1}s), density {:.3}", p.secs, p.density);
        rows.push(PrefillRow {
            pattern: name.clone(),
            tokens: tokens.len(),
            first_kl: kls[0],
            mean_kl: mean(kls.iter().copied()).unwrap_or(0.0),
            max_kl: kls.iter().copied().fold(0.0, f64::max),
            agreement: agree as f64 / kls.len() as f64,
            density: p.density,
            prefill_s: p.secs,
            dense_s,
        });
        progress(i + 1, patterns.len());
    }
    Ok(rows)
}

fn first(logits: &[f32]) -> Result<u32> {
    argmax(logits).ok_or_else(|| Error::invalid("model", "returned empty logits"))
}

/// Prefill wall time of one context length.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillTime {
    /// Pattern spec.
    pub pattern: String,
    /// Prompt tokens.
    pub tokens: usize,
    /// Prefill seconds with the pattern.
    pub prefill_s: f64,
    /// Prefill seconds of the dense run next to it.
    pub dense_s: f64,
    /// Key blocks attended over key blocks dense causal prefill attends.
    pub density: f64,
}

/// Prefill time of each pattern against dense at each length (the first `length` tokens of
/// `tokens`), dense and pattern alternating. `progress(done, total)` counts prefills.
pub fn prefill_times<B: NeedleBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    lengths: &[usize],
    patterns: &[(String, PrefillSpec)],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PrefillTime>> {
    let mut rows = Vec::new();
    let total = lengths.len() * patterns.len();
    for (li, &n) in lengths.iter().enumerate() {
        if n == 0 || n > tokens.len() {
            return Err(Error::invalid("lengths", format!("{n} is not in 1..={} (the text's tokens)", tokens.len())));
        }
        for (pi, (name, spec)) in patterns.iter().enumerate() {
            let dense_s = prefill(model, &tokens[..n], PrefillSpec::DENSE, chunk)?.secs;
            let p = prefill(model, &tokens[..n], *spec, chunk)?;
            tracing::info!("{n} tokens, {name}: {:.1}s vs dense {dense_s:.1}s", p.secs);
            rows.push(PrefillTime { pattern: name.clone(), tokens: n, prefill_s: p.secs, dense_s, density: p.density });
            progress(li * patterns.len() + pi + 1, total);
        }
    }
    Ok(rows)
}

/// Each task of `specs` at each grid point, prefilled with each pattern (and decoded with full
/// attention). Rows name the pattern in `selector`. `progress(done, total)` counts prompts.
pub fn prefill_tasks<B: NeedleBackend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    patterns: &[(String, PrefillSpec)],
    specs: &[TaskSpec],
    cfg: &TaskConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<TaskRow>> {
    score_tasks(tok, specs, cfg, progress, |tokens| {
        patterns
            .iter()
            .map(|(name, pattern)| {
                let mut pre = prefill(model, tokens, *pattern, cfg.chunk)?;
                let generated = answer(model, tok, &mut pre.cache, &pre.logits, cfg.answer_tokens)?;
                Ok(Answered::new(name.clone(), generated, &pre.cache))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pattern_lists_parse_and_reject_bad_specs() {
        let p = parse_patterns("dense; flex:gamma=0.95").unwrap();
        assert_eq!(
            p.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["dense", "flex:gamma=0.95,tau=0.1,block=64,local=2"]
        );
        let e = parse_patterns("flex;nope").unwrap_err().to_string();
        assert!(e.contains("prefill") && e.contains("nope"), "{e}");
        assert!(parse_patterns(" ; ").is_err());
    }

    /// Dense against sparse prefill attention of the last 2,048-query chunk of a 32K prompt on
    /// one layer of SmolLM2's shape (random queries and keys: the patterns' choices are not
    /// those of a real model), mask planning included: the attention share of the speed-up
    /// (docs/benchmarks.md §11). Slow; run with
    /// `cargo test -p needle-eval --lib -- --ignored --nocapture prefill_attention_time`.
    #[test]
    #[ignore]
    fn prefill_attention_time_at_32k() {
        use burn::tensor::{Tensor, TensorData};
        use needle_core::{FullSelector, GqaLayout};
        use needle_model::SelectionConfig;
        use needle_model::backend::flex;

        let (gqa, d, n, t) = (GqaLayout::new(9, 3).unwrap(), 64, 32768, 2048);
        let mut r = 0x2545_f491u32;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    r ^= r << 13;
                    r ^= r >> 17;
                    r ^= r << 5;
                    (r as f32 / u32::MAX as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let (k, v, q) = (rand(n * 3 * d), rand(n * 3 * d), rand(t * 9 * d));
        let specs = parse_patterns("dense;vertical-slash:vertical=64,slash=64;anchor;sale").unwrap();
        for (name, prefill) in specs {
            let config = SelectionConfig { prefill, ..SelectionConfig::default() };
            let mut cache: KvCache = KvCache::new(1, gqa, d, &FullSelector, config).unwrap();
            cache.append(0, &k, &v).unwrap();
            let qt =
                Tensor::<needle_model::Cpu, 3>::from_data(TensorData::new(q.clone(), [t, 9, d]), &Default::default());
            let t0 = Instant::now();
            flex::prefill_attention(&mut cache, 0, qt, 0.125).unwrap();
            let (kept, all) = (cache.stats.prefill_blocks, cache.stats.prefill_blocks_dense);
            let blocks = if all == 0 { 1.0 } else { kept as f64 / all as f64 };
            eprintln!("{name}: {:.3} s, blocks {:.1} %", t0.elapsed().as_secs_f64(), 100.0 * blocks);
        }
    }

    /// On the real model: a pattern that keeps every block is dense prefill (KL 0), a sparse one
    /// attends fewer blocks and stays close.
    #[test]
    fn real_model_prefill_patterns_against_dense() {
        let path = needle_fetch::default_model_path().unwrap();
        assert!(path.is_file(), "{} is missing: run `cargo xtask fetch-model`", path.display());
        let ck = needle_loader::open(&path).unwrap();
        let model = Llama::<needle_model::Cpu>::load(&ck, &Default::default()).unwrap();
        let tokens: Vec<u32> = (0..700).map(|i| 1000 + (i * 37) % 5000).collect();
        let patterns = parse_patterns("flex:gamma=1,block=32;vertical-slash:block=32,vertical=16,slash=16").unwrap();
        let rows = prefill_fidelity(&model, &tokens, &patterns, 2, 256, &mut |_, _| {}).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[1].density < 0.9, "{rows:?}");
        assert!(rows.iter().all(|r| r.mean_kl.is_finite() && r.mean_kl >= 0.0 && r.agreement > 0.0), "{rows:?}");
        assert!(rows[0].first_kl <= rows[1].first_kl + 1e-9, "{rows:?}");
    }
}
