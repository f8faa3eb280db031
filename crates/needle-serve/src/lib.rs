//! # needle-serve
//!
//! needle as an OpenAI-compatible HTTP server (`needle serve`): `POST /v1/chat/completions` and
//! `/v1/completions` (one JSON answer or server-sent event chunks ending in `data: [DONE]`),
//! `GET /v1/models`, `/health` and Prometheus `/metrics`.
//!
//! A long document is prefilled once for every question about it: each prompt is cut into a
//! prefix and a rest ([`prompt`]: the document and the question), the prefix is prefilled, its
//! selectors built, and the result kept in the context cache ([`cache`]: needle context files
//! under a byte limit, least recently used out, optionally kept across restarts); a later prompt
//! whose token ids extend a cached prefix loads it and only extends the rest. The computation is
//! the same either way (prefill the prefix, build, extend the rest), so greedy tokens do not
//! depend on what was cached.
//!
//! One engine thread owns the model ([`engine`]) and decodes up to `parallel` sequences
//! together, one batched step at a time (`Llama::decode_batch`: one pass over the weights for all
//! of them), admitting queued requests between steps. A full queue is answered at once (503);
//! a client that goes away has its sequence cancelled and its memory freed; a bad request gets
//! OpenAI's error object with its status and never stops the server.
#![warn(missing_docs)]

pub mod api;
pub mod cache;
pub mod engine;
mod error;
mod http;
pub mod metrics;
pub mod prompt;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use needle_model::{Cpu, KvDtype, Llama, LoadOptions, TierBudget, Weights};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use error::{ApiError, Error, Result};

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The checkpoint (a .gguf file or a Hugging Face folder).
    pub model: PathBuf,
    /// The model's name in requests and `/v1/models` (default: the file's stem).
    pub model_id: Option<String>,
    /// How weights are held.
    pub weights: Weights,
    /// KV precision.
    pub kv: KvDtype,
    /// Budget of the running sequences' KV tiers (shared: each of `parallel` gets a share).
    pub kv_budget: Option<TierBudget>,
    /// Where spill files (and the temporary context directory) go.
    pub spill_dir: PathBuf,
    /// Keep cached contexts here across restarts (else a temporary directory).
    pub context_dir: Option<PathBuf>,
    /// Most bytes of cached context files.
    pub cache_bytes: u64,
    /// Shortest prefix worth caching, in tokens.
    pub cache_min_tokens: usize,
    /// The selector when a request names none (`auto`: retrieval from 2,048 prefix tokens).
    pub selector: String,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Requests that may wait; past that a request is refused at once.
    pub queue: usize,
    /// Prefill chunk.
    pub chunk: usize,
    /// Most tokens per sequence (default: the model's trained length).
    pub max_context: Option<usize>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Start each layer's selector build during prefill.
    pub build_during_prefill: bool,
}

impl ServeConfig {
    /// Defaults for `model`.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            model_id: None,
            weights: Weights::Native,
            kv: KvDtype::default(),
            kv_budget: None,
            spill_dir: std::env::temp_dir(),
            context_dir: None,
            cache_bytes: 8 << 30,
            cache_min_tokens: 512,
            selector: "auto".into(),
            parallel: 4,
            queue: 64,
            chunk: 512,
            max_context: None,
            default_max_tokens: 256,
            build_during_prefill: true,
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: std::thread::JoinHandle<()>,
    metrics: Arc<metrics::Metrics>,
}

impl Server {
    /// Loads the model and serves on `addr` (port 0: any free one; see [`Server::addr`]).
    pub async fn start(cfg: ServeConfig, addr: SocketAddr) -> Result<Self> {
        if cfg.parallel == 0 || cfg.queue == 0 || cfg.chunk == 0 {
            return Err(Error::Invalid { name: "parallel/queue/chunk", reason: "each must be at least 1".into() });
        }
        if cfg.selector != "auto" {
            needle_select::parse(&cfg.selector)
                .map_err(|source| Error::Selector { spec: cfg.selector.clone(), source })?;
        }
        let c = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_> {
            let ck = needle_loader::open(&c.model)?;
            let model = Llama::<Cpu>::load_with(&ck, &Default::default(), &LoadOptions { weights: c.weights })?;
            let tok = ck.tokenizer()?;
            let digest = ck.digest()?;
            let weights = if c.weights == Weights::F32 { "f32" } else { "native" };
            let cache = cache::ContextCache::open(
                c.context_dir.as_deref(),
                &c.spill_dir,
                c.cache_bytes,
                c.cache_min_tokens,
                &model,
                &digest,
                weights,
            )?;
            Ok((model, tok, cache))
        })
        .await
        .map_err(|e| Error::Invalid { name: "model", reason: format!("loading thread: {e}") })??;
        let (model, tok, cache) = loaded;
        let tok = Arc::new(tok);
        let max_context = cfg.max_context.unwrap_or(model.max_positions());
        let vocab = model.config().vocab_size;
        let metrics = Arc::new(metrics::Metrics::default());
        let (jobs, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let engine_cfg = engine::EngineConfig {
            parallel: cfg.parallel,
            kv: cfg.kv,
            kv_budget: cfg.kv_budget,
            spill_dir: cfg.spill_dir.clone(),
            chunk: cfg.chunk,
            build_during_prefill: cfg.build_during_prefill,
        };
        let (t, m) = (tok.clone(), metrics.clone());
        let engine = std::thread::Builder::new()
            .name("needle-engine".into())
            .spawn(move || engine::run(model, t, cache, engine_cfg, rx, m))
            .map_err(|source| Error::Io { what: "starting the engine thread".into(), source })?;
        let model_id = cfg
            .model_id
            .clone()
            .unwrap_or_else(|| cfg.model.file_stem().map_or("needle".into(), |s| s.to_string_lossy().into_owned()));
        let state = Arc::new(http::AppState {
            jobs,
            queue: cfg.queue,
            tokenizer: tok,
            model_id,
            max_context,
            default_max_tokens: cfg.default_max_tokens,
            default_selector: cfg.selector.clone(),
            vocab,
            metrics: metrics.clone(),
            next_id: AtomicU64::new(0),
        });
        let listener =
            TcpListener::bind(addr).await.map_err(|source| Error::Io { what: format!("binding {addr}"), source })?;
        let addr = listener.local_addr().map_err(|source| Error::Io { what: "the bound address".into(), source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = http::router(state);
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!("serving on http://{addr}");
        Ok(Self { addr, stop: Some(stop), http, engine, metrics })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Stops accepting, lets open responses finish, then stops the engine (which drops every
    /// sequence, its spill files, and a temporary context directory).
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait().await
    }

    /// Serves until the server stops (after [`Server::shutdown`] from elsewhere, or an error).
    async fn wait(self) -> Result<()> {
        let served = self.http.await;
        let engine = self.engine;
        let joined = tokio::task::spawn_blocking(move || engine.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("the engine thread panicked");
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(Error::Io { what: "serving".into(), source }),
            Err(e) => Err(Error::Invalid { name: "server", reason: format!("the HTTP task failed: {e}") }),
        }
    }

    /// Serves until `signal` completes (ctrl-c, say), then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}
