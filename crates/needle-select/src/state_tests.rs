//! Saved selector state: every built-in spec saves, loads into a fresh selector from the same
//! factory and then selects exactly as the original, before and after more inserts; corrupt,
//! truncated and foreign states are errors, never panics.

use needle_core::{AttentionSelector, Budget, BuildContext, Error, PagedRows, RowSource, Selection};

use crate::parse;
use crate::testutil::{Data, HEAD, attention_like};

const DIM: usize = 32;
const SINKS: usize = 8;
const WINDOW: usize = 32;

/// Every built-in kind, with indexes small enough to build in milliseconds.
fn specs(policy: &std::path::Path) -> Vec<String> {
    let f = format!("sinks={SINKS},window={WINDOW}");
    let mut v = vec![
        "full".to_string(),
        format!("streaming:{f}"),
        format!("oracle:k=20,{f}"),
        format!("retrieval:index=flat,k=20,min_index=64,{f}"),
        format!("quest:k=32,page=16,{f}"),
        format!("block:k=48,block=16,reps=2,{f}"),
        format!("hip:k=20,block=4,width=2,{f}"),
        format!("tokenselect:k=20,threshold=0.5,{f}"),
        format!("tokenselect:k=40,mass=0.8,threshold=0.5,{f}"),
        format!("policy:file={},k=20", policy.display()),
    ];
    if cfg!(feature = "graph") {
        // Deferred: the index is still unbuilt when saved, and builds after the load.
        v.push(format!("retrieval:index=graph,k=20,min_index=1080,{f}"));
        v.push(format!("retrieval:index=RoarGraph16,k=20,min_index=64,{f}"));
        // Compressed walks over 8-bit codes of projections to 16 and 4 of 32 dims (maps saved).
        v.push(format!("retrieval:index=RoarGraph16r16p50,k=20,min_index=64,{f}"));
        v.push(format!("retrieval:index=RoarGraph16r4,k=20,min_index=64,{f}"));
        v.push(format!("retrieval:index=hnsw,k=20,min_index=64,combine=rerank,{f}"));
        // The coded walk, one per group, started from the saved previous selection.
        v.push(format!("retrieval:index=qgraph,k=20,min_index=64,combine=max,{f}"));
        v.push(format!("retrieval:index=RoarGraph16q8s8,k=20,min_index=64,combine=max,{f}"));
    }
    if cfg!(feature = "ivfpq") {
        v.push(format!("retrieval:index=ivfpq,k=20,min_index=64,{f}"));
    }
    if cfg!(feature = "lsh") {
        v.push(format!("retrieval:index=lsh,k=20,min_index=64,{f}"));
        v.push(format!("lsh-sample:k=10,bits=4,tables=16,min_collisions=1,{f}"));
    }
    v
}

fn policy_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("needle-state-policy-{}.json", std::process::id()));
    let rule = format!("quest:k=32,page=16,sinks={SINKS},window={WINDOW}");
    let json = format!(r#"{{"default": "streaming", "heads": [{{"layer": 0, "kv_head": 0, "spec": "{rule}"}}]}}"#);
    std::fs::write(&path, json).unwrap();
    path
}

/// Appends `n` rows of `data` to `keys` and tells the selectors which left the window.
fn grow(keys: &mut PagedRows, data: &Data, n: usize, sels: &mut [&mut dyn AttentionSelector]) {
    let sp = sels[0].static_part();
    let before = sp.dynamic_range(keys.len()).end;
    let at = keys.len();
    keys.extend_from_slice(&data.keys[at * DIM..(at + n) * DIM]).unwrap();
    let after = sp.dynamic_range(keys.len()).end;
    for s in sels.iter_mut() {
        if after > before {
            s.insert(keys, before..after).unwrap();
        }
    }
}

fn select(sel: &mut dyn AttentionSelector, keys: &dyn RowSource, group: &[f32], budget: &Budget) -> Selection {
    let mut out = Selection::default();
    sel.select(group, keys, budget, &mut out).unwrap();
    out
}

fn saved(sel: &dyn AttentionSelector) -> Vec<u8> {
    let mut out = Vec::new();
    sel.save_state(&mut out).unwrap();
    out
}

/// Truncations (every length up to 256, then strided) and 300 single-bit flips: `Err`, or an
/// `Ok` (a flipped float payload) after which the selector still selects without panicking.
fn assert_corruption_is_caught(
    make: &dyn Fn() -> Box<dyn AttentionSelector>,
    state: &[u8],
    keys: &PagedRows,
    data: &Data,
    budget: &Budget,
) {
    // Full attention's state is empty, so its empty copy is valid.
    let damaged = if make().describe() == "full" { &[][..] } else { state };
    needle_core::state::check_damage(damaged, 300, 0x9e37_79b9_7f4a_7c15, |s| {
        let mut sel = make();
        sel.load_state(s, keys)?;
        let mut out = Selection::default();
        let _ = sel.select(&data.queries[..3 * DIM], keys, budget, &mut out);
        Ok(())
    });
}

#[test]
fn every_selector_continues_exactly_after_save_and_load() {
    let policy = policy_file();
    let data = attention_like(1500, 256, 30, DIM, 11);
    let streaming_state = {
        let s = parse(&format!("streaming:sinks={SINKS},window={WINDOW}")).unwrap();
        saved(s.factory.create(HEAD, DIM).unwrap().as_ref())
    };
    for spec_str in specs(&policy) {
        let spec = parse(&spec_str).unwrap();
        let make = || spec.factory.create(HEAD, DIM).unwrap();
        let mut keys = PagedRows::new(DIM, 64).unwrap();
        keys.extend_from_slice(&data.keys[..1000 * DIM]).unwrap();
        let mut orig = make();
        let ctx = BuildContext { head: HEAD, keys: &keys, train_queries: &data.train, scale: 0.2 };
        orig.build(&ctx).unwrap();
        // Decode growth, and a few selections (caches, samplers) before the save.
        grow(&mut keys, &data, 60, &mut [orig.as_mut()]);
        let groups: Vec<&[f32]> = data.queries.chunks_exact(3 * DIM).collect();
        for g in &groups[..2] {
            select(orig.as_mut(), &keys, g, &spec.budget);
        }
        let state = saved(orig.as_ref());
        let mut loaded = make();
        loaded.load_state(&state, &keys).unwrap();
        assert!(saved(loaded.as_ref()) == state, "{spec_str}: save → load → save changed the bytes");
        let agree = |orig: &mut dyn AttentionSelector, loaded: &mut dyn AttentionSelector, keys: &PagedRows| {
            for (i, g) in groups.iter().enumerate() {
                let a = select(orig, keys, g, &spec.budget);
                let b = select(loaded, keys, g, &spec.budget);
                assert_eq!(a, b, "{spec_str}: group {i}");
                // Twice the same group: a selection cache hits on both or neither.
                assert_eq!(select(orig, keys, g, &spec.budget), select(loaded, keys, g, &spec.budget), "{spec_str}");
            }
        };
        agree(orig.as_mut(), loaded.as_mut(), &keys);
        grow(&mut keys, &data, 400, &mut [orig.as_mut(), loaded.as_mut()]);
        agree(orig.as_mut(), loaded.as_mut(), &keys);
        assert!(saved(orig.as_ref()) == saved(loaded.as_ref()), "{spec_str}: states differ after the same steps");

        // Corrupt, foreign and newer states.
        let mut at_save = PagedRows::new(DIM, 64).unwrap();
        at_save.extend_from_slice(&data.keys[..1060 * DIM]).unwrap();
        assert_corruption_is_caught(&make, &state, &at_save, &data, &spec.budget);
        if spec_str == "full" {
            continue;
        }
        let mut newer = state.clone();
        newer[8] += 1;
        let e = make().load_state(&newer, &at_save).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }) && e.to_string().contains("newer"), "{spec_str}: {e}");
        if !spec_str.starts_with("streaming") {
            let e = make().load_state(&streaming_state, &at_save).unwrap_err();
            assert!(e.to_string().contains("another kind"), "{spec_str}: {e}");
        }
        // Another configuration of the same kind.
        let other = parse(&spec_str.replace(&format!("window={WINDOW}"), "window=40")).unwrap();
        if other.factory.describe() != spec.factory.describe() {
            let e = other.factory.create(HEAD, DIM).unwrap().load_state(&state, &at_save).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{spec_str}: {e}");
        }
    }
    let _ = std::fs::remove_file(policy);
}

/// Load time against build time of the default retrieval selector on an 8K-key head
/// (printed with `--nocapture`; not asserted).
#[cfg(feature = "graph")]
#[test]
#[allow(clippy::print_stderr)] // The timings are what this test is for.
fn retrieval_load_is_cheaper_than_build_at_8k() {
    let dim = 64;
    let data = attention_like(8192, 2048, 3, dim, 5);
    let keys = needle_core::Rows::new("keys", &data.keys, dim).unwrap();
    for spec in
        ["retrieval", "retrieval:index=hnsw", "retrieval:index=ivfpq", "retrieval:index=lsh", "quest", "lsh-sample"]
    {
        if spec.ends_with("ivfpq") && !cfg!(feature = "ivfpq") || spec.contains("lsh") && !cfg!(feature = "lsh") {
            continue;
        }
        let s = parse(spec).unwrap();
        let mut sel = s.factory.create(HEAD, dim).unwrap();
        let t = std::time::Instant::now();
        sel.build(&BuildContext { head: HEAD, keys: &keys, train_queries: &data.train, scale: 0.125 }).unwrap();
        let build_s = t.elapsed().as_secs_f64();
        let state = saved(sel.as_ref());
        let mut fresh = s.factory.create(HEAD, dim).unwrap();
        let t = std::time::Instant::now();
        fresh.load_state(&state, &keys).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        eprintln!(
            "{spec} at 8192 keys: build {:.1} ms, load {:.2} ms, state {} KiB",
            build_s * 1e3,
            load_s * 1e3,
            state.len() / 1024
        );
    }
}
