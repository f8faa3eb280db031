//! A prefilled context saved once and asked many times.
//!
//! [`save`] writes a built [`KvCache`] — every head's KV pages, every selector's built state
//! (or, for a selector that cannot save it, its training queries) — with the prompt's token ids,
//! the logits after its last token, and a header ([`ContextInfo`]: model digest, weights mode,
//! selector spec, KV precision, layout) into a needle-kv context file. [`load`] checks the header
//! against the model at hand and restores the cache without prefilling or building, so the next
//! tokens ([`Llama::extend`], then decode) come out as they would have after the original prefill.
//!
//! ```no_run
//! # use needle_model::{Cpu, KvCache, Llama, compose, context};
//! # fn f(model: &Llama<Cpu>, ck: &needle_loader::Checkpoint, doc: &[u32], question: &[u32]) -> needle_model::Result<()> {
//! let digest = ck.digest()?;
//! let (factory, sel) = compose(needle_select::parse("retrieval")?);
//! let c = model.config();
//! let mut cache = KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, factory.as_ref(), sel)?;
//! cache.retain_training_queries(); // for selectors that cannot save their state
//! let logits = model.prefill(doc, &mut cache, 512, &[doc.len() - 1], &mut |_, _| {})?;
//! let info = context::ContextInfo::new(model, &digest, "native", "retrieval", &cache);
//! context::save("doc.needle".as_ref(), false, &info, doc, &logits, &cache, &mut |_, _| {})?;
//! // Later, in another process:
//! let mut saved = context::load("doc.needle".as_ref(), model, &digest, "native", &needle_select::parse)?;
//! let next = model.extend(question, &mut saved.cache, 512, &mut |_, _| {})?;
//! # let _ = next; Ok(()) }
//! ```

use std::path::Path;

use needle_core::{KvDtype, SelectorSpec};
use needle_kv::{ContextReader, ContextWriter};
use serde::{Deserialize, Serialize};

use crate::backend::NeedleBackend;
use crate::cache::{KvCache, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::spec::compose;

/// Version of what this module writes into the container (the header and section layout).
pub const FORMAT: u32 = 1;

/// The header of a saved context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextInfo {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The needle version that wrote it.
    pub needle: String,
    /// Digest of the model's weights ([`needle_loader::Checkpoint::digest`]).
    pub model: String,
    /// How the weights were held (`native` or `f32`): the KV depends on it.
    pub weights: String,
    /// The selector spec the cache was built with.
    pub selector: String,
    /// Precision of the KV pages.
    pub kv: KvDtype,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// Rows per KV page.
    pub page_size: usize,
    /// Tokens in the context.
    pub tokens: usize,
    /// Text that follows a question asked of this context (a chat template's closing turn);
    /// empty for plain text.
    pub suffix: String,
}

impl ContextInfo {
    /// The header for `cache`, prefilled by `model` (weights digest `model_digest`, held as
    /// `weights`) with the selector `spec`.
    pub fn new<B: NeedleBackend, M>(
        model: &Llama<B>,
        model_digest: &str,
        weights: &str,
        spec: &str,
        cache: &KvCache<M>,
    ) -> Self {
        let c = model.config();
        Self {
            format: FORMAT,
            needle: env!("CARGO_PKG_VERSION").into(),
            model: model_digest.into(),
            weights: weights.into(),
            selector: spec.into(),
            kv: cache.config().kv,
            layers: c.num_hidden_layers,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            page_size: PAGE_SIZE,
            tokens: cache.len(),
            suffix: String::new(),
        }
    }
}

/// A context read back by [`load`] (`M`: the model backend's [`NeedleBackend::KvMirror`]).
pub struct SavedContext<M = ()> {
    /// Its header.
    pub info: ContextInfo,
    /// The prompt's token ids.
    pub tokens: Vec<u32>,
    /// Next-token logits after the prompt's last token.
    pub last_logits: Vec<f32>,
    /// The built cache, ready to extend or decode.
    pub cache: KvCache<M>,
}

/// Writes a prefilled context to `path` (atomically; an existing file only if `overwrite`).
/// `progress(done, total)` counts layers.
pub fn save<M: Default>(
    path: &Path,
    overwrite: bool,
    info: &ContextInfo,
    tokens: &[u32],
    last_logits: &[f32],
    cache: &KvCache<M>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if tokens.len() != cache.len() || info.tokens != cache.len() {
        return Err(Error::invalid(
            "tokens",
            format!("{} token ids and a header of {} for a cache of {} tokens", tokens.len(), info.tokens, cache.len()),
        ));
    }
    let mut w = ContextWriter::create(path, overwrite)?;
    let header = serde_json::to_vec_pretty(info).map_err(|e| Error::State(format!("context header: {e}")))?;
    w.section("info", &header)?;
    w.section("tokens", bytemuck::cast_slice(&tokens.iter().map(|t| t.to_le()).collect::<Vec<u32>>()))?;
    w.section("logits", bytemuck::cast_slice(last_logits))?;
    cache.save_heads(&mut w, progress)?;
    w.finish()?;
    Ok(())
}

/// Turns the selector spec saved in a context's header back into a selector
/// (`needle_select::parse`, or any function that knows the spec).
pub type Resolver<'a> = dyn Fn(&str) -> needle_core::Result<SelectorSpec> + 'a;

/// Reads a context saved by [`save`] for `model` (whose weights have digest `model_digest` and
/// are held as `weights`): a file made for another model, weights mode or layout is
/// [`Error::ContextMismatch`]; a damaged one a named needle-kv error. `resolve` makes the
/// selector from the spec the header names.
pub fn load<B: NeedleBackend>(
    path: &Path,
    model: &Llama<B>,
    model_digest: &str,
    weights: &str,
    resolve: &Resolver<'_>,
) -> Result<SavedContext<B::KvMirror>> {
    let r = ContextReader::open(path)?;
    let corrupt = |section: &str, reason: String| -> Error {
        needle_kv::Error::Corrupt { path: path.to_path_buf(), section: section.into(), reason }.into()
    };
    let info: ContextInfo = serde_json::from_slice(r.section("info")?).map_err(|e| corrupt("info", e.to_string()))?;
    let mismatch = |what: &'static str, file: String, expected: String| -> Result<()> {
        if file == expected {
            Ok(())
        } else {
            Err(Error::ContextMismatch { path: path.to_path_buf(), what, file, expected })
        }
    };
    mismatch("in format", info.format.to_string(), FORMAT.to_string())?;
    mismatch("for the model with digest", info.model.clone(), model_digest.into())?;
    mismatch("with weights", info.weights.clone(), weights.into())?;
    let c = model.config();
    let layout = |l, q, k, d, p| format!("{l} layers, {q} q / {k} kv heads × {d}, pages of {p}");
    mismatch(
        "with the layout",
        layout(info.layers, info.q_heads, info.kv_heads, info.head_dim, info.page_size),
        layout(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, PAGE_SIZE),
    )?;
    let words = |section: &str, bytes: &[u8], want: usize| -> Result<Vec<[u8; 4]>> {
        if bytes.len() != want * 4 {
            return Err(corrupt(section, format!("{} bytes, {} expected", bytes.len(), want * 4)));
        }
        Ok(bytes.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]).collect())
    };
    let tokens: Vec<u32> =
        words("tokens", r.section("tokens")?, info.tokens)?.into_iter().map(u32::from_le_bytes).collect();
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(corrupt("tokens", format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
    }
    let last_logits: Vec<f32> =
        words("logits", r.section("logits")?, c.vocab_size)?.into_iter().map(f32::from_le_bytes).collect();
    let (factory, mut config) = compose(resolve(&info.selector)?);
    config.kv = info.kv;
    let cache = KvCache::load_heads(
        &r,
        c.num_hidden_layers,
        model.gqa(),
        c.head_dim,
        factory.as_ref(),
        config,
        info.tokens,
        model.scale(),
    )?;
    Ok(SavedContext { info, tokens, last_logits, cache })
}
