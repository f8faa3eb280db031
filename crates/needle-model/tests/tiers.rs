//! Under a host budget the KV cache spills its coldest pages to disk and reads them back in
//! place: the same tokens and bit-identical logits as a cache held in RAM, with the budget held
//! after every forward pass; a loaded context reads its pages in place from the file.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use needle_kv::TierBudget;
use needle_model::context::{self, ContextInfo};
use needle_model::{DecodeStats, KvCache, KvDtype, argmax, compose};

const DOC: usize = 600;

fn doc() -> Vec<u32> {
    let text: String = (0..DOC).map(|i| format!("Entry {i}: the lamp on shelf {} is blue. ", i * 13 % 97)).collect();
    common::native().tok.encode(&text, false).unwrap()[..DOC].to_vec()
}

fn new_cache(spec: &str, kv: KvDtype) -> KvCache {
    let m = &common::native().model;
    let (f, mut sel) = compose(needle_select::parse(spec).unwrap());
    sel.kv = kv;
    let c = m.config();
    KvCache::new(c.num_hidden_layers, m.gqa(), c.head_dim, f.as_ref(), sel).unwrap()
}

struct Run {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    stats: DecodeStats,
    /// Host bytes after the prefill and after every decode step.
    host: Vec<usize>,
    disk: usize,
}

/// Greedy decoding of `steps` tokens from `logits`, recording the host tier after each step.
fn decode(cache: &mut KvCache, mut logits: Vec<f32>, steps: usize) -> Run {
    let m = &common::native().model;
    let (mut ids, mut rows, mut host) = (Vec::new(), Vec::new(), vec![cache.tier_bytes().0]);
    for _ in 0..steps {
        let next = argmax(&logits).unwrap();
        ids.push(next);
        rows.push(logits);
        logits = m.decode(next, cache).unwrap();
        host.push(cache.tier_bytes().0);
    }
    Run { ids, logits: rows, stats: cache.stats, host, disk: cache.tier_bytes().1 }
}

fn prefill_and_decode(spec: &str, kv: KvDtype, budget: Option<u64>, dir: &Path) -> (Run, KvCache, Vec<f32>) {
    let m = &common::native().model;
    let mut cache = new_cache(spec, kv);
    if let Some(host) = budget {
        cache.set_kv_budget(TierBudget { device: None, host: Some(host), disk: None }, dir).unwrap();
    }
    let doc = doc();
    let logits = m.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
    let run = decode(&mut cache, logits.clone(), 8);
    (run, cache, logits)
}

#[test]
fn a_cache_over_its_host_budget_decodes_exactly_as_one_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, kv) in [("quest:sinks=16,window=64,k=64", KvDtype::F32), ("full", KvDtype::F16)] {
        let (want, ram, _) = prefill_and_decode(spec, kv, None, dir.path());
        let (all, disk) = ram.tier_bytes();
        assert_eq!(
            (disk, want.stats.pages_spilled, want.stats.pages_faulted),
            (0, 0, 0),
            "{spec}: no budget, no tiers"
        );
        let budget = all as u64 / 3;
        let (got, _, _) = prefill_and_decode(spec, kv, Some(budget), dir.path());
        assert_eq!(got.ids, want.ids, "{spec} ({kv}): greedy tokens under a host budget");
        assert_eq!(got.logits, want.logits, "{spec} ({kv}): logits are bit-identical");
        assert!(got.host.iter().all(|&h| h as u64 <= budget), "{spec}: host bytes {:?} over {budget}", got.host);
        assert!(got.disk > 0 && got.stats.pages_spilled > 0, "{spec}: pages went to disk");
        assert!(got.stats.pages_faulted > 0, "{spec}: decode read spilled pages");
    }
}

#[test]
fn a_loaded_context_reads_its_pages_in_place_and_takes_a_budget() {
    let r = common::native();
    let dir = tempfile::tempdir().unwrap();
    let spec = "quest:sinks=16,window=64,k=64";
    let m = &r.model;
    let mut cache = new_cache(spec, KvDtype::F32);
    let doc = doc();
    let logits = m.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
    let path = dir.path().join("ctx.needle");
    let info = ContextInfo::new(m, "digest", "native", spec, &cache);
    context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
    let want = decode(&mut cache, logits.clone(), 8);

    let mut saved = context::load(&path, m, "digest", "native", &needle_select::parse).unwrap();
    let (host, disk) = saved.cache.tier_bytes();
    let c = m.config();
    let partial = c.num_hidden_layers * m.gqa().n_kv_heads * 2 * saved.cache.keys(0, 0).page_bytes();
    assert_eq!(host, partial, "only the partly filled last pages are copied into RAM");
    assert!(disk > 0);
    saved.cache.set_kv_budget(TierBudget { device: None, host: Some(partial as u64), disk: None }, dir.path()).unwrap();
    let got = decode(&mut saved.cache, logits, 8);
    assert_eq!((got.ids, got.logits), (want.ids, want.logits), "a loaded, budgeted context decodes exactly");
    assert!(got.stats.pages_faulted > 0);
    assert!(got.host.iter().all(|&h| h <= partial), "{:?}", got.host);
}
