//! A saved context continues exactly as the cache it was saved from, on the real model; a file
//! for another model or a damaged one is a named error.
#![allow(clippy::unwrap_used)]

mod common;

use std::ops::Range;
use std::path::Path;

use needle_core::kit::{begin_select, group_max, keep_top};
use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, HeadId, RowSource, Selection, SelectorFactory, StaticPart,
};
use needle_model::context::{self, ContextInfo};
use needle_model::{Error, KvCache, KvDtype, argmax, compose};

fn text_tokens(n: usize) -> Vec<u32> {
    let text: String = (0..n).map(|i| format!("Line {i}: the river passes stone {}. ", i * 7 % 101)).collect();
    let ids = common::native().tok.encode(&text, false).unwrap();
    ids[..n].to_vec()
}

fn new_cache(spec: &str, kv: KvDtype) -> KvCache {
    let m = &common::native().model;
    let (f, mut sel) = compose(needle_select::parse(spec).unwrap());
    sel.kv = kv;
    let c = m.config();
    let mut cache = KvCache::new(c.num_hidden_layers, m.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
    cache.retain_training_queries();
    cache
}

/// The question, then `steps` greedy tokens: their ids and every logit row.
fn ask(cache: &mut KvCache, question: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let m = &common::native().model;
    let mut logits = m.extend(question, cache, 64, &mut |_, _| {}).unwrap();
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let next = argmax(&logits).unwrap();
        ids.push(next);
        rows.push(logits);
        logits = m.decode(next, cache).unwrap();
    }
    (ids, rows)
}

fn save_then_compare(spec: &str, kv: KvDtype, dir: &Path) {
    let r = common::native();
    let digest = r.ck.digest().unwrap();
    let doc = text_tokens(700);
    let mut cache = new_cache(spec, kv);
    let logits = r.model.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
    let path = dir.join(format!("{}-{kv}.needle", spec.replace([':', ',', '='], "_")));
    let info = ContextInfo::new(&r.model, &digest, "native", spec, &cache);
    context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
    let question = r.tok.encode(" Question: what passes stone 14? Answer:", false).unwrap();
    let (want_ids, want_logits) = ask(&mut cache, &question, 8);
    let mut saved = context::load(&path, &r.model, &digest, "native", &needle_select::parse).unwrap();
    assert_eq!((saved.info.clone(), &saved.tokens, &saved.last_logits), (info, &doc, &logits));
    assert_eq!(saved.cache.config().kv, kv);
    let (ids, rows) = ask(&mut saved.cache, &question, 8);
    assert_eq!(ids, want_ids, "{spec} ({kv}): greedy tokens after loading");
    assert_eq!(rows, want_logits, "{spec} ({kv}): logits after loading are bit-identical");
}

#[test]
fn a_loaded_context_continues_exactly_as_the_saved_cache() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, kv) in [
        ("retrieval:sinks=16,window=64,k=32", KvDtype::F32),
        ("quest:sinks=16,window=64,k=64", KvDtype::F16),
        ("full", KvDtype::F16),
        ("quest:sinks=16,window=64,k=64", KvDtype::Q8),
    ] {
        save_then_compare(spec, kv, dir.path());
    }
}

#[test]
fn building_during_prefill_gives_the_selectors_a_build_after_prefill_gives() {
    let r = common::native();
    let doc = text_tokens(700);
    let question = r.tok.encode(" Question: what passes stone 14? Answer:", false).unwrap();
    let layers = r.model.config().num_hidden_layers;
    for spec in ["retrieval:sinks=16,window=64,k=32", "quest:sinks=16,window=64,k=64"] {
        let run = |early: bool| {
            let mut cache = new_cache(spec, KvDtype::F32);
            cache.set_build_during_prefill(early);
            r.model.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
            let background = cache.stats.build_background_time;
            let b = cache.stats.build;
            let build = (b.vectors, b.train_queries, b.bytes);
            let (ids, rows) = ask(&mut cache, &question, 6);
            let picked: Vec<Vec<u32>> = (0..layers)
                .flat_map(|l| (0..cache.gqa().n_kv_heads).map(move |j| (l, j)))
                .map(|(l, j)| cache.last_selection(l, j).ids.clone())
                .collect();
            (background, build, ids, rows, picked)
        };
        let (bg_after, build_after, ids_after, rows_after, picked_after) = run(false);
        let (bg_early, build_early, ids_early, rows_early, picked_early) = run(true);
        assert_eq!(bg_after, std::time::Duration::ZERO, "{spec}: nothing builds in the background when off");
        assert!(bg_early > std::time::Duration::ZERO, "{spec}: layers built in the background during the last chunk");
        assert_eq!(build_early, build_after, "{spec}: the same builds, summed over heads");
        assert!(picked_after.iter().any(|p| !p.is_empty()), "{spec}: the selectors picked keys");
        assert_eq!(picked_early, picked_after, "{spec}: every head picks the same keys");
        assert_eq!(ids_early, ids_after, "{spec}: greedy tokens");
        assert_eq!(rows_early, rows_after, "{spec}: logits are bit-identical");
    }
}

/// Top-k by group score plus a bias towards the mean training query: built from training
/// queries, with no saved state (the default `save_state`), so loading rebuilds it from the
/// training queries the file keeps.
struct MeanBias {
    mean: Vec<f32>,
    cands: Vec<(u32, f32)>,
}

impl AttentionSelector for MeanBias {
    fn describe(&self) -> String {
        "mean-bias".into()
    }
    fn static_part(&self) -> StaticPart {
        StaticPart { sinks: 8, window: 32 }
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> needle_core::Result<BuildStats> {
        let d = ctx.keys.dim();
        let n = (ctx.train_queries.len() / d).max(1) as f32;
        self.mean = vec![0.0; d];
        for q in ctx.train_queries.chunks_exact(d) {
            self.mean.iter_mut().zip(q).for_each(|(m, x)| *m += x / n);
        }
        assert!(self.mean.iter().any(|&x| x != 0.0), "built from training queries");
        Ok(BuildStats::default())
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> needle_core::Result<()> {
        Ok(())
    }
    fn select(
        &mut self,
        queries: &[f32],
        keys: &dyn RowSource,
        budget: &Budget,
        out: &mut Selection,
    ) -> needle_core::Result<()> {
        let d = keys.dim();
        let Some(step) = begin_select(self.static_part(), queries, d, keys, budget, out)? else { return Ok(()) };
        self.cands.clear();
        for p in step.dynamic.clone() {
            let k = keys.row(p as usize);
            self.cands.push((p, group_max(queries, d, k) + 0.1 * k.dot(&self.mean)));
        }
        keep_top(&mut self.cands, step.budget.max_ids());
        out.ids.extend(self.cands.iter().map(|c| c.0));
        Ok(())
    }
}

struct MeanBiasFactory;

impl SelectorFactory for MeanBiasFactory {
    fn describe(&self) -> String {
        "mean-bias".into()
    }
    fn create(&self, _head: HeadId, _dim: usize) -> needle_core::Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(MeanBias { mean: Vec::new(), cands: Vec::new() }))
    }
}

#[test]
fn a_selector_without_saved_state_is_rebuilt_from_its_training_queries() {
    needle_select::register_selector("mean-bias", "test: top-k biased to the mean training query", |o| {
        o.spec(Box::new(MeanBiasFactory), Budget::TopK(16))
    })
    .unwrap();
    save_then_compare("mean-bias", KvDtype::F32, tempfile::tempdir().unwrap().path());
}

#[test]
fn contexts_for_another_model_or_damaged_files_are_named_errors() {
    let r = common::native();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctx.needle");
    let doc = text_tokens(300);
    let mut cache = new_cache("full", KvDtype::F32);
    let logits = r.model.prefill(&doc, &mut cache, 128, &[doc.len() - 1], &mut |_, _| {}).unwrap();
    let info = ContextInfo::new(&r.model, "0123456789abcdef", "native", "full", &cache);
    context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
    let again = context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {});
    assert!(matches!(again, Err(Error::Kv(needle_kv::Error::Exists { .. }))));
    let load = |p: &Path, digest: &str, weights: &str| {
        context::load(p, &r.model, digest, weights, &needle_select::parse).err().unwrap()
    };
    assert!(
        matches!(load(&path, "fedcba9876543210", "native"), Error::ContextMismatch { what, .. } if what.contains("model"))
    );
    assert!(matches!(load(&path, "0123456789abcdef", "f32"), Error::ContextMismatch { what: "with weights", .. }));
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.needle");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(&bad, "0123456789abcdef", "native"), Error::Kv(needle_kv::Error::Truncated { .. })));
    // A flipped bit inside the first layer's keys: the error names that section.
    let mut flipped = bytes.clone();
    let at = bytes.windows(4).position(|w| w == b"info").unwrap_or(0).max(4096);
    flipped[at] ^= 0x10;
    std::fs::write(&bad, &flipped).unwrap();
    let e = load(&bad, "0123456789abcdef", "native").to_string();
    assert!(e.contains("bad.needle") && e.contains("corrupt"), "{e}");
    // The selector comes from the resolver the caller hands over, asked for the saved spec.
    let asked = std::cell::RefCell::new(Vec::new());
    let refuse = |spec: &str| -> needle_core::Result<needle_model::SelectorSpec> {
        asked.borrow_mut().push(spec.to_string());
        Err(needle_core::Error::invalid("selector", format!("`{spec}` is not known here")))
    };
    let e = context::load(&path, &r.model, "0123456789abcdef", "native", &refuse).err().unwrap().to_string();
    assert!(e.contains("`full` is not known here"), "{e}");
    assert_eq!(asked.into_inner(), ["full"]);
}

/// A question asked directly of a document (`prefill_then_extend`: prefill the document, build,
/// extend with the question) is the saved-context path's computation: the same logits after the
/// question and the same greedy tokens, bit for bit.
#[test]
fn a_question_asked_directly_is_the_saved_context_path_bit_for_bit() {
    let r = common::native();
    let digest = r.ck.digest().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc = text_tokens(600);
    let question = r.tok.encode("\n\nQuestion: what passes stone 14? Answer:", false).unwrap();
    let spec = "retrieval:sinks=16,window=64,k=32";
    let mut direct = new_cache(spec, KvDtype::F32);
    let want = needle_model::prefill_then_extend(&r.model, &doc, &question, &mut direct, 256, &mut |_, _| {}).unwrap();
    let mut cache = new_cache(spec, KvDtype::F32);
    let logits = r.model.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
    let path = dir.path().join("doc.needle");
    let info = ContextInfo::new(&r.model, &digest, "native", spec, &cache);
    context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
    let mut saved = context::load(&path, &r.model, &digest, "native", &needle_select::parse).unwrap();
    let got = r.model.extend(&question, &mut saved.cache, 256, &mut |_, _| {}).unwrap();
    assert_eq!(got, want, "logits after the question");
    let (mut a, mut b) = (want, got);
    for step in 0..6 {
        let (ta, tb) = (argmax(&a).unwrap(), argmax(&b).unwrap());
        assert_eq!(ta, tb, "greedy token {step}");
        a = r.model.decode(ta, &mut direct).unwrap();
        b = r.model.decode(tb, &mut saved.cache).unwrap();
        assert_eq!(a, b, "logits of step {step}");
    }
}
