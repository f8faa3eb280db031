//! The engine: one thread owns the model and runs every sequence. Between decode steps it
//! admits queued requests (up to `parallel` running sequences): each is prefilled — or its
//! prefix loaded from the context cache — and extended with the rest of its prompt, giving its
//! first token at once. Then one batched step ([`Llama::decode_batch`]: one pass over the
//! weights for all rows) advances every running sequence by a token. A sequence whose client
//! went away is dropped before the next step, and its KV memory with it.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use needle_loader::{DecodeStream, Tokenizer};
use needle_model::{Cpu, KvCache, KvDtype, Llama, Sampler, SamplingConfig, TierBudget, compose};
use tokio::sync::mpsc::UnboundedSender;

use crate::cache::ContextCache;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prompt::Prompt;

/// Why a sequence ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request's handler, in order: `Started`, `Text`…, then `Finished`
/// (or `Failed` at any point).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt is in.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Of which taken from the context cache.
        cached_tokens: usize,
    },
    /// Generated text.
    Text(String),
    /// Generation ended.
    Finished {
        /// Why.
        reason: Finish,
        /// Tokens generated.
        completion_tokens: usize,
        /// Their ids (EOS excluded).
        token_ids: Vec<u32>,
        /// The selector the sequence ran with (`auto` resolved).
        selector: String,
    },
    /// The request failed.
    Failed(ApiError),
}

/// A request for the engine.
pub struct Job {
    /// The cut prompt.
    pub prompt: Prompt,
    /// Selector spec (`auto` resolved by the prefix length).
    pub selector: String,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingConfig,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Where its events go; closed when the client went away.
    pub events: UnboundedSender<Event>,
}

/// The engine's settings.
pub struct EngineConfig {
    /// Sequences decoded together.
    pub parallel: usize,
    /// KV precision of every sequence.
    pub kv: KvDtype,
    /// The budget shared by the running sequences (each gets `1/parallel` of each tier).
    pub kv_budget: Option<TierBudget>,
    /// Where spill files go.
    pub spill_dir: std::path::PathBuf,
    /// Prefill chunk.
    pub chunk: usize,
    /// Start each layer's selector build during prefill.
    pub build_during_prefill: bool,
}

/// One running sequence.
struct Seq<'t> {
    job: Job,
    cache: KvCache,
    sampler: Sampler,
    stream: DecodeStream<'t>,
    generated: Vec<u32>,
    selector: String,
    text: String,
    /// Bytes of `text` sent.
    sent: usize,
    last: u32,
}

/// Runs until every sender of `jobs` is gone (the server shut down).
pub fn run(
    model: Llama<Cpu>,
    tok: Arc<Tokenizer>,
    mut cache: ContextCache,
    cfg: EngineConfig,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let tok: &Tokenizer = &tok;
    let mut running: Vec<Seq<'_>> = Vec::new();
    metrics.cache_entries.store(cache.len() as u64, std::sync::atomic::Ordering::Relaxed);
    metrics.cache_bytes.store(cache.bytes(), std::sync::atomic::Ordering::Relaxed);
    loop {
        // Admit between steps; wait only when nothing runs.
        while running.len() < cfg.parallel {
            let job = if running.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            metrics.queue_depth.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if job.events.is_closed() {
                Metrics::add(&metrics.cancelled, 1);
                continue;
            }
            let events = job.events.clone();
            match admit(&model, tok, &mut cache, &cfg, &metrics, job) {
                Ok(Some(seq)) => running.push(seq),
                Ok(None) => {}
                Err(e) => {
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
        let before = running.len();
        running.retain(|s| !s.job.events.is_closed());
        publish(&metrics, &running);
        Metrics::add(&metrics.cancelled, (before - running.len()) as u64);
        if running.is_empty() {
            continue;
        }
        let t = Instant::now();
        let tokens: Vec<u32> = running.iter().map(|s| s.last).collect();
        let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|s| &mut s.cache).collect();
        match model.decode_batch(&tokens, &mut caches) {
            Ok(logits) => {
                Metrics::add(&metrics.decode_micros, t.elapsed().as_micros() as u64);
                Metrics::add(&metrics.decode_tokens, tokens.len() as u64);
                Metrics::add(&metrics.decode_steps, 1);
                let mut next = Vec::with_capacity(running.len());
                for (mut s, l) in running.drain(..).zip(logits) {
                    if s.advance(tok, &l) {
                        next.push(s);
                    }
                }
                running = next;
            }
            Err(e) => {
                tracing::error!("decode step failed: {e}");
                for s in running.drain(..) {
                    let _ = s.job.events.send(Event::Failed(ApiError::internal(format!("decode failed: {e}"))));
                }
            }
        }
        publish(&metrics, &running);
    }
}

/// Running sequences and their KV tiers, for `/metrics`.
fn publish(metrics: &Metrics, running: &[Seq<'_>]) {
    use std::sync::atomic::Ordering::Relaxed;
    let (host, disk) = running.iter().map(|s| s.cache.tier_bytes()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    metrics.kv_host_bytes.store(host as u64, Relaxed);
    metrics.kv_disk_bytes.store(disk as u64, Relaxed);
    metrics.running.store(running.len() as u64, Relaxed);
}

/// The prompt in: from the cache when a prefix of it is there, else prefilled (and cached);
/// then the first token. `None` when the sequence already ended at its first token.
fn admit<'t>(
    model: &Llama<Cpu>,
    tok: &'t Tokenizer,
    cache: &mut ContextCache,
    cfg: &EngineConfig,
    metrics: &Metrics,
    job: Job,
) -> Result<Option<Seq<'t>>, ApiError> {
    let t = Instant::now();
    let internal = |e: needle_model::Error| ApiError::internal(e.to_string());
    let spec = needle_select::resolve_auto(&job.selector, job.prompt.prefix.len());
    let ids = job.prompt.ids();
    let budget = cfg.kv_budget.map(|b| {
        let share = |x: Option<u64>| x.map(|x| x / cfg.parallel as u64);
        TierBudget { device: share(b.device), host: share(b.host), disk: share(b.disk) }
    });
    let apply_budget = |kv: &mut KvCache| -> Result<(), ApiError> {
        match budget {
            Some(b) => kv.set_kv_budget(b, &cfg.spill_dir).map_err(internal),
            None => Ok(()),
        }
    };
    let mut from_cache = None;
    if let Some(hit) = cache.lookup(&ids, &spec, cfg.kv) {
        match cache.load(&hit.path, model) {
            Ok(saved) => from_cache = Some((saved, hit.tokens)),
            Err(e) => {
                tracing::warn!("context cache: {} failed to load ({e}); prefilling again", hit.path.display());
                cache.forget(&hit.path);
            }
        }
    }
    let (mut kv, logits, cached) = match from_cache {
        Some((saved, n)) => {
            let mut kv = saved.cache;
            apply_budget(&mut kv)?;
            let rest = &ids[n..];
            let logits = if rest.is_empty() {
                saved.last_logits
            } else {
                model.extend(rest, &mut kv, cfg.chunk, &mut |_, _| {}).map_err(internal)?
            };
            Metrics::add(&metrics.cache_hits, 1);
            Metrics::add(&metrics.cached_tokens, n as u64);
            (kv, logits, n)
        }
        None => {
            let prefix = &job.prompt.prefix;
            let (factory, mut sel) =
                compose(needle_select::parse(&spec).map_err(|e| ApiError::invalid("selector", e.to_string()))?);
            sel.kv = cfg.kv;
            let c = model.config();
            let mut kv =
                KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, factory.as_ref(), sel).map_err(internal)?;
            kv.set_build_during_prefill(cfg.build_during_prefill);
            let keep = cache.wants(prefix.len());
            if keep {
                kv.retain_training_queries();
            }
            apply_budget(&mut kv)?;
            let logits =
                model.prefill(prefix, &mut kv, cfg.chunk, &[prefix.len() - 1], &mut |_, _| {}).map_err(internal)?;
            if keep && let Err(e) = cache.insert(model, &spec, prefix, &logits, &kv) {
                tracing::warn!("context cache: saving a prefix of {} tokens: {e}", prefix.len());
            }
            metrics.cache_entries.store(cache.len() as u64, std::sync::atomic::Ordering::Relaxed);
            metrics.cache_bytes.store(cache.bytes(), std::sync::atomic::Ordering::Relaxed);
            let logits = if job.prompt.rest.is_empty() {
                logits
            } else {
                model.extend(&job.prompt.rest, &mut kv, cfg.chunk, &mut |_, _| {}).map_err(internal)?
            };
            Metrics::add(&metrics.cache_misses, 1);
            (kv, logits, 0)
        }
    };
    Metrics::add(&metrics.prompt_tokens, (ids.len() - cached) as u64);
    Metrics::add(&metrics.prompt_micros, t.elapsed().as_micros() as u64);
    kv.stats = Default::default();
    let sampler = Sampler::new(job.sampling).map_err(|e| ApiError::invalid("temperature", e.to_string()))?;
    let _ = job.events.send(Event::Started { prompt_tokens: ids.len(), cached_tokens: cached });
    let mut seq = Seq {
        job,
        cache: kv,
        sampler,
        stream: tok.decode_stream(),
        generated: Vec::new(),
        selector: spec,
        text: String::new(),
        sent: 0,
        last: 0,
    };
    Ok(seq.advance(tok, &logits).then_some(seq))
}

impl Seq<'_> {
    /// Samples the next token from `logits` and sends what text is final. False when the
    /// sequence ended (its `Finished` or `Failed` sent).
    fn advance(&mut self, tok: &Tokenizer, logits: &[f32]) -> bool {
        let next = match self.sampler.sample(logits) {
            Ok(t) => t,
            Err(e) => return self.fail(ApiError::internal(format!("sampling: {e}"))),
        };
        if tok.eos_ids().contains(&next) {
            return self.finish(Finish::Stop);
        }
        self.generated.push(next);
        self.last = next;
        match self.stream.push(next) {
            Ok(Some(piece)) => self.text.push_str(&piece),
            Ok(None) => {}
            Err(e) => return self.fail(ApiError::internal(format!("detokenizing: {e}"))),
        }
        if let Some(cut) = self.job.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            return self.finish(Finish::Stop);
        }
        // Text that could still begin a stop string is held back until it cannot.
        let hold = self.job.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        let mut safe = self.text.len().saturating_sub(hold).max(self.sent);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > self.sent {
            let _ = self.job.events.send(Event::Text(self.text[self.sent..safe].to_string()));
            self.sent = safe;
        }
        if self.generated.len() >= self.job.max_tokens {
            return self.finish(Finish::Length);
        }
        true
    }

    fn finish(&mut self, reason: Finish) -> bool {
        if self.text.len() > self.sent {
            let _ = self.job.events.send(Event::Text(self.text[self.sent..].to_string()));
            self.sent = self.text.len();
        }
        let _ = self.job.events.send(Event::Finished {
            reason,
            completion_tokens: self.generated.len(),
            token_ids: std::mem::take(&mut self.generated),
            selector: std::mem::take(&mut self.selector),
        });
        false
    }

    fn fail(&mut self, e: ApiError) -> bool {
        let _ = self.job.events.send(Event::Failed(e));
        false
    }
}
