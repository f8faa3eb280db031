//! Batched decode (`Llama::decode_batch`: one pass over the weights for the sequences' rows,
//! attention per sequence through its own cache) gives each sequence the greedy tokens and the
//! logits it gets alone, bit for bit, with
//! sequences of different lengths and selectors joining and leaving between steps.
#![allow(clippy::unwrap_used)]

mod common;

use needle_model::{KvCache, argmax};

fn prompt(seed: usize, n: usize) -> Vec<u32> {
    let text: String =
        (0..n).map(|i| format!("Entry {seed}.{i}: the lamp of house {} is lit. ", i * 13 % 97)).collect();
    common::native().tok.encode(&text, false).unwrap()[..n].to_vec()
}

/// Prefills `p` into a fresh cache for `spec` and returns it with its first greedy token.
fn start(spec: &str, p: &[u32]) -> (KvCache, u32) {
    let m = &common::native().model;
    let mut cache = common::cache_for(m, spec);
    let logits = m.prefill(p, &mut cache, 128, &[p.len() - 1], &mut |_, _| {}).unwrap();
    (cache, argmax(&logits).unwrap())
}

/// `steps` greedy tokens of one sequence alone, with the logits of each step.
fn alone(spec: &str, p: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let m = &common::native().model;
    let (mut cache, mut next) = start(spec, p);
    let (mut ids, mut rows) = (vec![next], Vec::new());
    for _ in 1..steps {
        let logits = m.decode(next, &mut cache).unwrap();
        next = argmax(&logits).unwrap();
        ids.push(next);
        rows.push(logits);
    }
    (ids, rows)
}

#[test]
fn batched_greedy_tokens_are_each_sequences_own() {
    let m = &common::native().model;
    // (selector, prompt, step at which it joins, tokens it generates)
    let seqs = [
        ("full", prompt(1, 300), 0, 10),
        ("retrieval:sinks=16,window=32,k=32", prompt(2, 700), 0, 14),
        ("quest:sinks=16,window=32,k=64", prompt(3, 500), 3, 8),
        ("full", prompt(4, 41), 5, 6),
    ];
    let want: Vec<_> = seqs.iter().map(|(s, p, _, n)| alone(s, p, *n)).collect();
    // (sequence, its cache, its tokens, its logit rows)
    type Live = (usize, KvCache, Vec<u32>, Vec<Vec<f32>>);
    let mut live: Vec<Live> = Vec::new();
    let mut done = vec![None; seqs.len()];
    for step in 0.. {
        for (i, (spec, p, join, _)) in seqs.iter().enumerate() {
            if *join == step {
                let (cache, first) = start(spec, p);
                live.push((i, cache, vec![first], Vec::new()));
            }
        }
        live.retain_mut(|(i, _, ids, rows)| {
            if ids.len() < seqs[*i].3 {
                return true;
            }
            done[*i] = Some((std::mem::take(ids), std::mem::take(rows)));
            false
        });
        if live.is_empty() && step > 5 {
            break;
        }
        let tokens: Vec<u32> = live.iter().map(|s| *s.2.last().unwrap()).collect();
        let mut caches: Vec<&mut KvCache> = live.iter_mut().map(|s| &mut s.1).collect();
        let logits = m.decode_batch(&tokens, &mut caches).unwrap();
        for (s, l) in live.iter_mut().zip(logits) {
            s.2.push(argmax(&l).unwrap());
            s.3.push(l);
        }
    }
    for (i, (w, got)) in want.iter().zip(done).enumerate() {
        let (ids, rows) = got.unwrap();
        assert_eq!(ids, w.0, "sequence {i} ({}): batched greedy tokens", seqs[i].0);
        assert_eq!(rows, w.1, "sequence {i}: batched logits are the lone decode's, bit for bit");
    }
}

#[test]
fn a_batch_of_mismatched_lengths_or_unbuilt_caches_is_an_error() {
    let m = &common::native().model;
    let (mut a, t) = start("full", &prompt(5, 20));
    let mut b = common::cache_for(m, "full");
    assert!(m.decode_batch(&[t], &mut [&mut a, &mut b]).is_err());
    assert!(m.decode_batch(&[t, t], &mut [&mut a, &mut b]).is_err(), "b was never prefilled");
    assert_eq!(a.len(), 20, "nothing was appended to a");
}

/// A batched step is in each sequence's decode profile: its share of the step, the weights
/// within it.
#[test]
fn batched_steps_are_in_the_decode_profile() {
    let m = &common::native().model;
    let (mut a, t) = start("full", &prompt(6, 60));
    let (mut b, u) = start("full", &prompt(7, 90));
    let (mut next_a, mut next_b) = (t, u);
    for _ in 0..3 {
        let logits = m.decode_batch(&[next_a, next_b], &mut [&mut a, &mut b]).unwrap();
        (next_a, next_b) = (argmax(&logits[0]).unwrap(), argmax(&logits[1]).unwrap());
    }
    for c in [&a, &b] {
        let (s, p) = (&c.stats, c.stats.profile());
        assert_eq!(s.steps, 3);
        assert!(s.step_times.step > std::time::Duration::ZERO && s.step_times.weights <= s.step_times.step, "{p:?}");
        assert!(s.step_times.attention > std::time::Duration::ZERO, "{p:?}");
    }
}

/// Sequences loaded from one saved context read its full pages at the same addresses, so a
/// batched step attends those rows once for all of them: each sequence still gets the tokens
/// and logits it gets alone, bit for bit (f32 and f16 pages, full attention and a selector whose
/// window moves with each sequence's length).
#[test]
fn sequences_of_one_saved_context_decode_together_as_alone() {
    use needle_model::context::{self, ContextInfo};
    let r = common::native();
    let digest = r.ck.digest().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let questions = [" Which lamp is lit?", " Name a house.", " Is any lamp dark? Answer:"];
    for (spec, kv) in [
        ("full", needle_model::KvDtype::F32),
        ("full", needle_model::KvDtype::F16),
        ("quest:sinks=16,window=32,k=64", needle_model::KvDtype::F32),
    ] {
        let doc = prompt(8, 2 * needle_model::PAGE_SIZE + 40);
        let (f, mut sel) = needle_model::compose(needle_select::parse(spec).unwrap());
        sel.kv = kv;
        let c = r.model.config();
        let mut cache = KvCache::new(c.num_hidden_layers, r.model.gqa(), c.head_dim, f.as_ref(), sel).unwrap();
        let logits = r.model.prefill(&doc, &mut cache, 256, &[doc.len() - 1], &mut |_, _| {}).unwrap();
        let path = dir.path().join(format!("{kv}-{}.needle", spec.len()));
        let info = ContextInfo::new(&r.model, &digest, "native", spec, &cache);
        context::save(&path, false, &info, &doc, &logits, &cache, &mut |_, _| {}).unwrap();
        let load = |q: &str| {
            let mut saved = context::load(&path, &r.model, &digest, "native", &needle_select::parse).unwrap();
            let ids = r.tok.encode(q, false).unwrap();
            let logits = r.model.extend(&ids, &mut saved.cache, 64, &mut |_, _| {}).unwrap();
            (saved.cache, argmax(&logits).unwrap())
        };
        let steps = 6;
        let mut want = Vec::new();
        for q in questions {
            let (mut cache, mut next) = load(q);
            let mut rows = Vec::new();
            for _ in 0..steps {
                let l = r.model.decode(next, &mut cache).unwrap();
                next = argmax(&l).unwrap();
                rows.push(l);
            }
            want.push(rows);
        }
        let (mut caches, mut next): (Vec<KvCache>, Vec<u32>) = questions.iter().map(|q| load(q)).unzip();
        let mut got = vec![Vec::new(); questions.len()];
        for _ in 0..steps {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = r.model.decode_batch(&next, &mut refs).unwrap();
            next = logits.iter().map(|l| argmax(l).unwrap()).collect();
            got.iter_mut().zip(logits).for_each(|(g, l)| g.push(l));
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "{spec} ({kv}) sequence {i}: batched logits are the lone decode's, bit for bit");
        }
    }
}
