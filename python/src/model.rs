//! Models, generation and saved contexts, driven through needle-cli's own steps
//! (`needle_cli::common`: prompt and chat template → tokens, the cache for a selector spec,
//! a context's question) and needle-model's `generate`, `Llama::prefill` and `context`, so
//! that Python gets the tokens `needle generate` prints.
//!
//! Generation runs on a worker thread and hands text pieces to the iterator through a channel;
//! the iterator waits with the GIL released. One computation runs at a time per model (the
//! model's kernels already use every core); others wait their turn.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use needle_cli::common::{self, DeviceKind, Loaded, ModelArgs, PromptArgs, WeightsArg};
use needle_model::context::{self, ContextInfo};
use needle_model::{GenerateConfig, Generation as Finished, KvCache, KvDtype, SamplingConfig, TierBudget};
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::{NeedleError, err, to_py};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Context>()?;
    m.add_class::<Generation>()?;
    m.add_function(wrap_pyfunction!(default_document, m)?)?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A loaded model, shared by its `Model`, its contexts and their generation threads.
struct Shared {
    loaded: Loaded,
    /// What `Model.load` was given (`default`, a file, a folder).
    name: String,
    /// The weights' digest a saved context is checked against.
    digest: String,
    weights: WeightsArg,
    /// One computation at a time on this model.
    busy: Mutex<()>,
}

/// How the cache of one call is made: the KV precision, its host budget and the prefill
/// pattern (the CLI's `--kv`, `--kv-budget`, `--prefill`).
#[derive(Clone)]
struct CacheOptions {
    kv: Option<KvDtype>,
    kv_budget: Option<TierBudget>,
    prefill: String,
}

impl CacheOptions {
    fn parse(kv: Option<&str>, kv_budget: Option<&str>, prefill: &str) -> PyResult<Self> {
        let kv = kv.map(|k| k.parse::<KvDtype>().map_err(|e| err(anyhow!("kv={k:?}: {e}")))).transpose()?;
        let kv_budget =
            kv_budget.map(|b| b.parse::<TierBudget>().map_err(|e| err(anyhow!("kv_budget={b:?}: {e}")))).transpose()?;
        Ok(CacheOptions { kv, kv_budget, prefill: prefill.to_string() })
    }

    fn args(&self, s: &Shared) -> ModelArgs {
        ModelArgs {
            model: s.name.clone(),
            device: DeviceKind::Cpu,
            weights: s.weights,
            kv: self.kv,
            kv_budget: self.kv_budget,
            kv_spill_dir: None,
            prefill: self.prefill.clone(),
            build_after_prefill: false,
        }
    }
}

fn prompt_args(text: String, chat: bool, system: Option<String>, context_tokens: Option<usize>) -> PromptArgs {
    PromptArgs { prompt: Some(text), prompt_file: None, document: None, context_tokens, question: None, chat, system }
}

/// What a finished generation reports (the keys of `needle generate --json`).
fn report<M>(out: &Finished, cache: &KvCache<M>, selector: &str, context_load_s: Option<f64>) -> Value {
    let (kv_bytes, sel_bytes) = cache.memory_bytes();
    let (host_bytes, disk_bytes) = cache.tier_bytes();
    json!({
        "selector": selector,
        "kv": cache.config().kv,
        "prompt_tokens": out.prompt_tokens,
        "text": out.text,
        "token_ids": out.tokens,
        "stop_reason": out.stop_reason,
        "prefill_seconds": out.prefill_secs,
        "decode_seconds": out.decode_secs,
        "prefill_tokens_per_second": out.prefill_tps(),
        "decode_tokens_per_second": out.decode_tps(),
        "share_of_keys_touched": out.stats.share_touched(),
        "stats": out.stats,
        "kv_cache_bytes": kv_bytes,
        "kv_host_bytes": host_bytes,
        "kv_disk_bytes": disk_bytes,
        "selector_bytes": sel_bytes,
        "context_load_seconds": context_load_s,
    })
}

enum Msg {
    Piece(String),
    Done(std::result::Result<Value, String>),
}

/// Runs `job` on a worker thread (after the model's earlier jobs); its text pieces and then its
/// report come back through the returned `Generation`.
fn spawn<F>(shared: Arc<Shared>, job: F) -> PyResult<Generation>
where
    F: FnOnce(&Shared, &mut dyn FnMut(&str)) -> Result<Value> + Send + 'static,
{
    let (tx, rx): (Sender<Msg>, Receiver<Msg>) = channel();
    std::thread::Builder::new()
        .name("needle-generate".into())
        .spawn(move || {
            let _turn = lock(&shared.busy);
            let pieces = tx.clone();
            // A dropped iterator stops listening; the generation still runs to its end.
            let result = job(&shared, &mut |s: &str| {
                let _ = pieces.send(Msg::Piece(s.to_string()));
            });
            let _ = tx.send(Msg::Done(result.map_err(|e| format!("{e:#}"))));
        })
        .map_err(|e| err(anyhow!("starting the generation thread: {e}")))?;
    Ok(Generation { rx: Mutex::new(rx), done: Mutex::new(None) })
}

/// A generation in progress: iterate it for the text as it forms; `result()` (or `text`,
/// `token_ids`, `stats`) waits for the end and gives what `needle generate --json` prints.
#[pyclass(frozen, module = "needle")]
pub struct Generation {
    rx: Mutex<Receiver<Msg>>,
    done: Mutex<Option<std::result::Result<Value, String>>>,
}

impl Generation {
    /// The next piece of text, `None` at the end (an error the generation ended with is
    /// raised, on every call after it too).
    fn next_piece(&self, py: Python<'_>) -> PyResult<Option<String>> {
        if let Some(done) = &*lock(&self.done) {
            return done.as_ref().map(|_| None).map_err(|e| NeedleError::new_err(e.clone()));
        }
        let msg = py.detach(|| lock(&self.rx).recv());
        match msg {
            Ok(Msg::Piece(s)) => Ok(Some(s)),
            Ok(Msg::Done(r)) => {
                let out = r.as_ref().map(|_| None).map_err(|e| NeedleError::new_err(e.clone()));
                *lock(&self.done) = Some(r);
                out
            }
            Err(_) => {
                let e = "the generation thread ended without a result".to_string();
                *lock(&self.done) = Some(Err(e.clone()));
                Err(NeedleError::new_err(e))
            }
        }
    }

    fn finished(&self, py: Python<'_>) -> PyResult<Value> {
        while self.next_piece(py)?.is_some() {}
        match &*lock(&self.done) {
            Some(Ok(v)) => Ok(v.clone()),
            Some(Err(e)) => Err(NeedleError::new_err(e.clone())),
            None => Err(err(anyhow!("generation has no result"))),
        }
    }
}

#[pymethods]
impl Generation {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.next_piece(py)
    }

    /// Waits for the end; the report as a dict: `text`, `token_ids`, `stop_reason`, timings,
    /// tokens per second, `share_of_keys_touched`, `stats`, memory.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.finished(py)?)
    }

    /// The whole generated text (waits for the end).
    #[getter]
    fn text(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.finished(py)?["text"].as_str().unwrap_or_default().to_string())
    }

    /// The generated token ids, EOS excluded (waits for the end).
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let v = self.finished(py)?;
        Ok(v["token_ids"].as_array().map_or_else(Vec::new, |a| {
            a.iter().filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
        }))
    }
}

/// A language model (Llama family: a GGUF file, a Hugging Face folder, or `"default"`,
/// SmolLM2-135M-Instruct fetched into ~/.cache/needle) on the CPU.
#[pyclass(frozen, module = "needle")]
pub struct Model {
    shared: Arc<Shared>,
}

#[pymethods]
impl Model {
    /// Loads `model` (`"default"`, `"gemma3-270m"`, a `.gguf` file or a Hugging Face folder; the
    /// built-in ones are fetched if absent, as the CLI's `--model`). `device` is
    /// `"cpu"` (this package is built for the CPU backend); `weights` is `"native"` (kept in
    /// their GGUF blocks) or `"f32"` (dequantized: the exact reference path).
    #[staticmethod]
    #[pyo3(signature = (model="default", device="cpu", weights="native"))]
    fn load(py: Python<'_>, model: &str, device: &str, weights: &str) -> PyResult<Model> {
        if device != "cpu" {
            return Err(err(anyhow!(
                "device={device:?}: this needle package is built for the CPU backend only (`cpu`); the `needle` \
                 CLI built with `--features wgpu` or `cuda` runs on a GPU"
            )));
        }
        let weights = match weights {
            "native" => WeightsArg::Native,
            "f32" => WeightsArg::F32,
            other => return Err(err(anyhow!("weights={other:?}: valid are \"native\" and \"f32\""))),
        };
        let name = model.to_string();
        let shared = py
            .detach(|| -> Result<Shared> {
                let loaded = common::load_on(&name, weights, &Default::default())?;
                let digest = common::model_digest(&name)?;
                Ok(Shared { loaded, name, digest, weights, busy: Mutex::new(()) })
            })
            .map_err(err)?;
        Ok(Model { shared: Arc::new(shared) })
    }

    /// Generates from `prompt`: an iterator of text pieces as they form (greedy unless
    /// `temperature` > 0). `selector` is a spec (`"auto"`: retrieval from 2,048 prompt tokens
    /// on, full attention below); `chat` wraps the prompt in the model's chat template.
    #[pyo3(signature = (
        prompt, max_tokens=64, selector="auto", temperature=0.0, top_k=None, top_p=None, seed=0, stop=None,
        chat=false, system=None, chunk=512, kv=None, kv_budget=None, prefill="dense"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        prompt: String,
        max_tokens: usize,
        selector: &str,
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
        system: Option<String>,
        chunk: usize,
        kv: Option<&str>,
        kv_budget: Option<&str>,
        prefill: &str,
    ) -> PyResult<Generation> {
        let cfg = gen_config(max_tokens, temperature, top_k, top_p, seed, stop, chunk);
        let opts = CacheOptions::parse(kv, kv_budget, prefill)?;
        let selector = selector.to_string();
        spawn(self.shared.clone(), move |s, on_text| {
            let Loaded { model, tokenizer } = &s.loaded;
            let prompt = common::prompt_tokens(&prompt_args(prompt, chat, system, None), tokenizer)?;
            let spec = needle_select::resolve_auto(&selector, prompt.len());
            let args = opts.args(s);
            let mut cache = common::new_cache(model, &spec, &args)?;
            args.apply_kv_budget(&mut cache)?;
            let out = needle_model::generate(model, tokenizer, &prompt, &mut cache, &cfg, on_text, &mut |_, _| {})?;
            Ok(report(&out, &cache, &spec, None))
        })
    }

    /// Prefills `document` once and builds its selectors: a `Context` to ask questions of
    /// (`ctx.ask(…)`) and to save (`ctx.save(path)`). `context_tokens` keeps the document's
    /// first N tokens; with `chat` a question asked later goes inside the chat template.
    #[pyo3(signature = (
        document, selector="auto", chat=false, system=None, context_tokens=None, chunk=512, kv=None,
        kv_budget=None, prefill="dense"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn prefill(
        &self,
        py: Python<'_>,
        document: String,
        selector: &str,
        chat: bool,
        system: Option<String>,
        context_tokens: Option<usize>,
        chunk: usize,
        kv: Option<&str>,
        kv_budget: Option<&str>,
        prefill: &str,
    ) -> PyResult<Context> {
        let opts = CacheOptions::parse(kv, kv_budget, prefill)?;
        let s = &*self.shared;
        let (dir, path, info, stats) = py
            .detach(|| -> Result<_> {
                let _turn = lock(&s.busy);
                let Loaded { model, tokenizer } = &s.loaded;
                let (tokens, suffix) =
                    common::context_prompt(&prompt_args(document, chat, system, context_tokens), tokenizer)?;
                let spec = needle_select::resolve_auto(selector, tokens.len());
                let args = opts.args(s);
                let mut cache = common::new_cache(model, &spec, &args)?;
                cache.retain_training_queries();
                args.apply_kv_budget(&mut cache)?;
                let t = Instant::now();
                let n = tokens.len();
                let logits = model.prefill(&tokens, &mut cache, chunk, &[n - 1], &mut |_, _| {})?;
                let prefill_s = t.elapsed().as_secs_f64();
                let mut info = ContextInfo::new(model, &s.digest, s.weights.name(), &spec, &cache);
                info.suffix = suffix;
                // The context lives in a file from the start: each question reads it back as
                // `needle generate --context` does, so asking never changes it.
                let dir = tempfile::Builder::new().prefix("needle-context-").tempdir()?;
                let path = dir.path().join("context.needle");
                let t = Instant::now();
                context::save(&path, false, &info, &tokens, &logits, &cache, &mut |_, _| {})?;
                let stats = json!({
                    "tokens": n,
                    "selector": spec,
                    "kv": info.kv,
                    "prefill_seconds": prefill_s,
                    "save_seconds": t.elapsed().as_secs_f64(),
                    "file_bytes": std::fs::metadata(&path).map_or(0, |m| m.len()),
                    "kv_cache_bytes": cache.memory_bytes().0,
                    "selector_bytes": cache.memory_bytes().1,
                });
                Ok((dir, path, info, stats))
            })
            .map_err(err)?;
        Ok(Context { shared: self.shared.clone(), path, info, stats: Some(stats), _dir: Some(dir) })
    }

    /// The token ids of `text` (with the model's special tokens, such as BOS, when
    /// `add_special`).
    #[pyo3(signature = (text, add_special=false))]
    fn encode(&self, text: &str, add_special: bool) -> PyResult<Vec<u32>> {
        self.shared.loaded.tokenizer.encode(text, add_special).map_err(err)
    }

    /// The text of token ids.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.shared.loaded.tokenizer.decode(&ids).map_err(err)
    }

    /// The weights' digest (what a saved context is checked against).
    #[getter]
    fn digest(&self) -> String {
        self.shared.digest.clone()
    }

    fn __repr__(&self) -> String {
        let c = self.shared.loaded.model.config();
        format!(
            "Model({:?}, {} layers, {} q / {} kv heads × {}, weights {})",
            self.shared.name,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            self.shared.weights.name()
        )
    }
}

fn gen_config(
    max_tokens: usize,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: u64,
    stop: Option<Vec<String>>,
    chunk: usize,
) -> GenerateConfig {
    GenerateConfig {
        max_tokens,
        sampling: SamplingConfig { temperature, top_k, top_p, seed },
        stop: stop.unwrap_or_default(),
        chunk,
    }
}

/// A prefilled context (a document's KV cache with its built selectors) in a context file:
/// made by `model.prefill(…)` or read by `Context.load(path, model)`. Ask it questions with
/// `ctx.ask(…)`; each starts from the saved state. The file is what `needle prefill --save`
/// writes, and `needle generate --context` reads it too.
#[pyclass(frozen, module = "needle")]
pub struct Context {
    shared: Arc<Shared>,
    path: PathBuf,
    info: ContextInfo,
    stats: Option<Value>,
    /// The temporary folder of a context not loaded from a file (removed with it).
    _dir: Option<tempfile::TempDir>,
}

#[pymethods]
impl Context {
    /// Reads the context file at `path` for `model`: a file made for another model, or a
    /// damaged one, is a `NeedleError` naming what does not match.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf, model: &Model) -> PyResult<Context> {
        let s = model.shared.clone();
        let info = py
            .detach(|| -> Result<ContextInfo> {
                let saved = context::load(&path, &s.loaded.model, &s.digest, s.weights.name(), &needle_select::parse)
                    .with_context(|| format!("loading context {}", path.display()))?;
                Ok(saved.info)
            })
            .map_err(err)?;
        Ok(Context { shared: s, path, info, stats: None, _dir: None })
    }

    /// Asks `question` of the context (after a blank line, inside the chat template when the
    /// context was prefilled with `chat=True`): an iterator of text pieces, as
    /// `Model.generate`'s.
    #[pyo3(signature = (
        question=None, max_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0, stop=None, chunk=512
    ))]
    #[allow(clippy::too_many_arguments)]
    fn ask(
        &self,
        question: Option<String>,
        max_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
        stop: Option<Vec<String>>,
        chunk: usize,
    ) -> PyResult<Generation> {
        let cfg = gen_config(max_tokens, temperature, top_k, top_p, seed, stop, chunk);
        let path = self.path.clone();
        spawn(self.shared.clone(), move |s, on_text| {
            let Loaded { model, tokenizer } = &s.loaded;
            let t = Instant::now();
            let saved = context::load(&path, model, &s.digest, s.weights.name(), &needle_select::parse)
                .with_context(|| format!("loading context {}", path.display()))?;
            let load_s = t.elapsed().as_secs_f64();
            let mut cache = saved.cache;
            let ids = common::context_question(tokenizer, question.as_deref(), &saved.info)?;
            let logits = if ids.is_empty() {
                saved.last_logits
            } else {
                model.extend(&ids, &mut cache, chunk, &mut |_, _| {})?
            };
            let n = saved.tokens.len() + ids.len();
            let out = needle_model::generate_from(
                model,
                tokenizer,
                logits,
                n,
                t.elapsed().as_secs_f64(),
                &mut cache,
                &cfg,
                on_text,
            )?;
            Ok(report(&out, &cache, &saved.info.selector, Some(load_s)))
        })
    }

    /// Saves the context to `path` (written to a temporary file beside it and renamed, so a
    /// reader never sees half a file); an existing file is replaced only with `overwrite=True`.
    #[pyo3(signature = (path, overwrite=false))]
    fn save(&self, py: Python<'_>, path: PathBuf, overwrite: bool) -> PyResult<()> {
        py.detach(|| copy_atomic(&self.path, &path, overwrite)).map_err(err)
    }

    /// Where the context file is (a temporary one until saved, for a prefilled context).
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Tokens in the context.
    #[getter]
    fn tokens(&self) -> usize {
        self.info.tokens
    }

    /// The selector spec the context was built with.
    #[getter]
    fn selector(&self) -> String {
        self.info.selector.clone()
    }

    /// The header: model digest, weights, selector, KV precision, layout, tokens.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &serde_json::to_value(&self.info).map_err(err)?)
    }

    /// What the prefill cost (`None` for a loaded context): tokens, seconds, bytes.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.stats.as_ref().map(|v| to_py(py, v)).transpose()
    }

    fn __repr__(&self) -> String {
        format!("Context({} tokens, selector {}, {})", self.info.tokens, self.info.selector, self.path.display())
    }
}

/// Copies `from` to `to` through a temporary file in `to`'s folder, fsynced and renamed.
fn copy_atomic(from: &Path, to: &Path, overwrite: bool) -> Result<()> {
    if to.exists() && !overwrite {
        bail!("{} exists; pass overwrite=True to replace it", to.display());
    }
    if to.exists() && std::fs::canonicalize(to)? == std::fs::canonicalize(from)? {
        return Ok(());
    }
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).with_context(|| format!("writing into {}", dir.display()))?;
    let mut src = std::fs::File::open(from).with_context(|| format!("reading {}", from.display()))?;
    std::io::copy(&mut src, tmp.as_file_mut()).with_context(|| format!("writing {}", to.display()))?;
    tmp.as_file().sync_all()?;
    if overwrite {
        tmp.persist(to).map_err(|e| anyhow!("saving {}: {}", to.display(), e.error))?;
    } else {
        tmp.persist_noclobber(to).map_err(|e| anyhow!("saving {}: {}", to.display(), e.error))?;
    }
    Ok(())
}

/// The text of the default document (the King James Bible, fetched into ~/.cache/needle).
#[pyfunction]
fn default_document(py: Python<'_>) -> PyResult<String> {
    py.detach(|| common::read_document("default")).map_err(err)
}
