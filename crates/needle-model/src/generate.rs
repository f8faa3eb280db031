//! Text generation: prefill, then decode with sampling, streaming text as it forms.

use std::time::Instant;

use needle_loader::Tokenizer;

use crate::backend::NeedleBackend;
use crate::cache::{DecodeStats, KvCache};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::sampling::{Sampler, SamplingConfig};

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateConfig {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingConfig,
    /// Stop when the generated text contains one of these (it is cut before the match).
    pub stop: Vec<String>,
    /// Prefill chunk size in tokens.
    pub chunk: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self { max_tokens: 64, sampling: SamplingConfig::default(), stop: Vec::new(), chunk: 512 }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    StopString,
    /// `max_tokens` reached.
    MaxTokens,
}

/// A finished generation with its timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Prefill wall time, selector build included.
    pub prefill_secs: f64,
    /// Decode wall time.
    pub decode_secs: f64,
    /// Selector and attention costs.
    pub stats: DecodeStats,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Generated tokens per second of decode (the first token comes from prefill).
    pub fn decode_tps(&self) -> f64 {
        self.stats.steps as f64 / self.decode_secs.max(1e-9)
    }
}

/// Prefills `prompt` and generates up to `cfg.max_tokens` tokens, calling `on_text` with each
/// new piece of text and `progress(done, total)` during prefill.
pub fn generate<B: NeedleBackend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    cache: &mut KvCache<B::KvMirror>,
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let t0 = Instant::now();
    let logits = model.prefill(prompt, cache, cfg.chunk, &[prompt.len() - 1], progress)?;
    generate_from(model, tokenizer, logits, prompt.len(), t0.elapsed().as_secs_f64(), cache, cfg, on_text)
}

/// Prefills `document` (building the selectors), then extends the cache with `question` when it
/// is not empty, and returns the next-token logits: the one computation of a question asked of a
/// document, whether the document is prefilled now or its context was saved and loaded
/// ([`crate::context`], then [`Llama::extend`]); both give the same tokens and logits.
pub fn prefill_then_extend<B: NeedleBackend>(
    model: &Llama<B>,
    document: &[u32],
    question: &[u32],
    cache: &mut KvCache<B::KvMirror>,
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    if document.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let logits = model.prefill(document, cache, chunk, &[document.len() - 1], progress)?;
    if question.is_empty() {
        return Ok(logits);
    }
    model.extend(question, cache, chunk, &mut |_, _| {})
}

/// Generates from a prefilled `cache` whose next-token logits are `logits` (a loaded context,
/// say); `prompt_tokens` and `prefill_secs` are what the report shows for the prompt.
#[allow(clippy::too_many_arguments)]
pub fn generate_from<B: NeedleBackend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    logits: Vec<f32>,
    prompt_tokens: usize,
    prefill_secs: f64,
    cache: &mut KvCache<B::KvMirror>,
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut logits = logits;
    let mut sampler = Sampler::new(cfg.sampling)?;
    let t1 = Instant::now();
    let mut stream = tokenizer.decode_stream();
    let (mut tokens, mut text) = (Vec::new(), String::new());
    let mut stop_reason = StopReason::MaxTokens;
    while tokens.len() < cfg.max_tokens {
        let next = sampler.sample(&logits)?;
        if tokenizer.eos_ids().contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        tokens.push(next);
        if let Some(piece) = stream.push(next)? {
            let before = text.len();
            text.push_str(&piece);
            if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                if cut > before {
                    on_text(&text[before..cut]);
                }
                text.truncate(cut);
                stop_reason = StopReason::StopString;
                break;
            }
            on_text(&piece);
        }
        if tokens.len() == cfg.max_tokens {
            break;
        }
        logits = model.decode(next, cache)?;
    }
    Ok(Generation {
        prompt_tokens,
        tokens,
        text,
        stop_reason,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        stats: cache.stats,
    })
}
