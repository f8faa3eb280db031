//! A prefilled context saved once and asked many times.
//!
//! [`save`] writes a built [`KvCache`] — every head's KV pages, every selector's built state
//! (or, for a selector that cannot save it, its training queries), every sliding-window layer's
//! ring — with the prompt's token ids,
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
use crate::cache::{KvCache, LayerKind, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::spec::compose;

/// Version of what this module writes into the container (the header and section layout).
/// Version 2 added sliding-window layers (their rings, [`ContextInfo::windows`]); version 1
/// files, whose layers are all global, still load.
pub const FORMAT: u32 = 2;

/// The oldest [`FORMAT`] [`load`] reads.
pub const OLDEST_FORMAT: u32 = 1;

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
    /// Per layer: the window of a sliding-window layer, whose ring the file keeps in place of
    /// pages and selector ([`LayerKind::Window`]), 0 for a global layer. Empty (every layer
    /// global) in format-1 files.
    #[serde(default)]
    pub windows: Vec<usize>,
}

impl ContextInfo {
    /// What each layer of the saved cache attends to.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        (0..self.layers)
            .map(|l| match self.windows.get(l) {
                Some(&w) if w > 0 => LayerKind::Window(w),
                _ => LayerKind::Global,
            })
            .collect()
    }
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
            windows: cache
                .layer_kinds()
                .iter()
                .map(|k| match k {
                    LayerKind::Window(w) => *w,
                    LayerKind::Global => 0,
                })
                .collect(),
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
    if !(OLDEST_FORMAT..=FORMAT).contains(&info.format) {
        mismatch("in format", info.format.to_string(), format!("{OLDEST_FORMAT} to {FORMAT}"))?;
    }
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
    let kinds = info.layer_kinds();
    let shown = |k: &[LayerKind]| format!("{k:?}");
    mismatch("with the layer kinds", shown(&kinds), shown(&model.layer_kinds()))?;
    let (factory, mut config) = compose(resolve(&info.selector)?);
    config.kv = info.kv;
    let cache =
        KvCache::load_heads(&r, &kinds, model.gqa(), c.head_dim, factory.as_ref(), config, info.tokens, model.scale())?;
    Ok(SavedContext { info, tokens, last_logits, cache })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use needle_loader::{Architecture, Checkpoint, LlamaConfig, LocalAttention};

    use super::*;
    use crate::{Cpu, KvDtype, QuantType, argmax};

    /// A random-weight model: Gemma 3's layout (two 16-position window layers to one global,
    /// twice) when `gemma`, else a small Llama (every layer global).
    fn tiny(gemma: bool) -> Llama<Cpu> {
        let base = LlamaConfig::preset(if gemma { "gemma3-270m" } else { "smollm2-135m" }).unwrap();
        let mut c = LlamaConfig {
            vocab_size: 300,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 6,
            num_attention_heads: 4,
            num_key_value_heads: if gemma { 1 } else { 2 },
            head_dim: 32,
            ..base
        };
        if gemma {
            assert_eq!(c.architecture, Architecture::Gemma3);
            c.local_attention = Some(LocalAttention { window: 16, pattern: 3, rope_theta: 10_000.0 });
            c.query_pre_attn_scalar = Some(32.0);
        }
        Llama::load(&Checkpoint::random(&c, QuantType::Q8_0, 11).unwrap(), &Default::default()).unwrap()
    }

    fn prefilled(model: &Llama<Cpu>, spec: &str, kv: KvDtype, doc: &[u32]) -> (KvCache, Vec<f32>) {
        let (f, mut sel) = compose(needle_select::parse(spec).unwrap());
        sel.kv = kv;
        let c = model.config();
        let mut cache = KvCache::new(c.num_hidden_layers, model.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
        cache.retain_training_queries();
        let logits = model.prefill(doc, &mut cache, 32, &[doc.len() - 1], &mut |_, _| {}).unwrap();
        (cache, logits)
    }

    /// A question, then greedy decode steps: the ids and every logit row.
    fn ask(model: &Llama<Cpu>, cache: &mut KvCache, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
        let question: Vec<u32> = (0..10).map(|i| 40 + i * 13).collect();
        let mut logits = model.extend(&question, cache, 8, &mut |_, _| {}).unwrap();
        let (mut ids, mut rows) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let next = argmax(&logits).unwrap();
            ids.push(next);
            rows.push(logits);
            logits = model.decode(next, cache).unwrap();
        }
        (ids, rows)
    }

    fn doc(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 3 + (i * 37 + i * i) % 290).collect()
    }

    /// A Gemma-shaped context saved with its window layers' rings (the window long passed, so
    /// the rings have wrapped) continues bit for bit as the cache it was saved from.
    #[test]
    fn a_context_with_window_layers_continues_exactly_as_the_saved_cache() {
        let model = tiny(true);
        let dir = tempfile::tempdir().unwrap();
        let doc = doc(150);
        for (spec, kv) in [
            ("retrieval:sinks=4,window=16,k=8,min_index=16", KvDtype::F32),
            ("quest:sinks=4,window=16,k=16", KvDtype::F16),
            ("full", KvDtype::Q8),
        ] {
            let (mut cache, logits) = prefilled(&model, spec, kv, &doc);
            let info = ContextInfo::new(&model, "digest", "native", spec, &cache);
            assert_eq!(info.windows, [16, 16, 0, 16, 16, 0]);
            let path = dir.path().join(format!("{kv}.needle"));
            save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
            let (want_ids, want_rows) = ask(&model, &mut cache, 6);
            let mut saved = load(&path, &model, "digest", "native", &needle_select::parse).unwrap();
            assert_eq!((&saved.info, &saved.tokens, &saved.last_logits), (&info, &doc, &logits));
            assert_eq!(saved.cache.layer_kinds(), model.layer_kinds());
            assert_eq!(saved.cache.len(), doc.len());
            let (ids, rows) = ask(&model, &mut saved.cache, 6);
            assert_eq!(ids, want_ids, "{spec} ({kv}): greedy tokens after loading");
            assert_eq!(rows, want_rows, "{spec} ({kv}): logits after loading are bit-identical");
        }
    }

    /// A ring of the wrong size is a named error, and so is a file whose layer kinds are not the
    /// model's.
    #[test]
    fn damaged_rings_and_other_layer_kinds_are_named_errors() {
        let model = tiny(true);
        let dir = tempfile::tempdir().unwrap();
        let doc = doc(40);
        let (cache, logits) = prefilled(&model, "full", KvDtype::F32, &doc);
        let info = ContextInfo::new(&model, "digest", "native", "full", &cache);
        // A header that says layer 0 is global: its pages are not in the file.
        let mut other = info.clone();
        other.windows[0] = 0;
        let p = dir.path().join("kinds.needle");
        save(&p, false, &other, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
        let e = load(&p, &model, "digest", "native", &needle_select::parse).err().unwrap().to_string();
        assert!(e.contains("layer kinds"), "{e}");
        // A ring cut short: written by hand, the rest as `save` writes it.
        let p = dir.path().join("ring.needle");
        let mut w = ContextWriter::create(&p, false).unwrap();
        w.section("info", &serde_json::to_vec(&info).unwrap()).unwrap();
        w.section("tokens", bytemuck::cast_slice(&doc)).unwrap();
        w.section("logits", bytemuck::cast_slice(&logits)).unwrap();
        w.section("ring/0", &[0u8; 64]).unwrap();
        w.finish().unwrap();
        let e = load(&p, &model, "digest", "native", &needle_select::parse).err().unwrap().to_string();
        assert!(e.contains("ring/0") && e.contains("floats for the ring"), "{e}");
    }

    /// A file of format 1 (no `windows` in its header: every layer global) still loads and
    /// continues exactly.
    #[test]
    fn format_1_contexts_still_load() {
        let model = tiny(false);
        let doc = doc(120);
        let spec = "retrieval:sinks=4,window=16,k=8,min_index=16";
        let (mut cache, logits) = prefilled(&model, spec, KvDtype::F32, &doc);
        let mut header = serde_json::to_value(ContextInfo::new(&model, "digest", "native", spec, &cache)).unwrap();
        header["format"] = 1.into();
        header.as_object_mut().unwrap().remove("windows");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v1.needle");
        let mut w = ContextWriter::create(&p, false).unwrap();
        w.section("info", &serde_json::to_vec(&header).unwrap()).unwrap();
        w.section("tokens", bytemuck::cast_slice(&doc)).unwrap();
        w.section("logits", bytemuck::cast_slice(&logits)).unwrap();
        cache.save_heads(&mut w, &mut |_, _| {}).unwrap();
        w.finish().unwrap();
        let (want_ids, want_rows) = ask(&model, &mut cache, 6);
        let mut saved = load(&p, &model, "digest", "native", &needle_select::parse).unwrap();
        assert_eq!((saved.info.format, saved.info.windows.len()), (1, 0));
        let (ids, rows) = ask(&model, &mut saved.cache, 6);
        assert_eq!((ids, rows), (want_ids, want_rows));
    }
}
