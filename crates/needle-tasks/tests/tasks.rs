//! Instances put their needles where asked, reach their target lengths, are deterministic per
//! seed, and score right answers 1, wrong 0, partial answers in between.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use needle_tasks::{Error, Filler, GridPoint, TaskInstance, TaskSpec, grid, score};

type Counter<'a> = &'a dyn Fn(&str) -> usize;

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// A counter unlike whitespace splitting: about one token per 4 bytes (a BPE-ish count that
/// is not additive over joins).
fn bytes4(s: &str) -> usize {
    s.len().div_ceil(4)
}

/// A real book as filler: the default document (the King James Bible, fetched from PyPI by
/// `needle-fetch` as the README's main job does), or `$NEEDLE_DATA/sherlock-holmes.txt` when
/// `NEEDLE_DATA` is set. Nothing beside the checkout is read.
fn book() -> Filler {
    let p = match std::env::var_os("NEEDLE_DATA") {
        Some(dir) => std::path::PathBuf::from(dir).join("sherlock-holmes.txt"),
        None => needle_fetch::ensure_default_document().expect("fetching the default document"),
    };
    let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let end = t.char_indices().nth(200_000).map_or(t.len(), |(i, _)| i);
    Filler::Text(Arc::from(&t[..end]))
}

fn fillers() -> Vec<Filler> {
    vec![Filler::Landmark, Filler::Sentences, book()]
}

fn specs() -> Vec<TaskSpec> {
    let mut v = TaskSpec::all();
    v.push("variable_tracking:chains=3,hops=2".parse().unwrap());
    v.push("niah_multikey:keys=8".parse().unwrap());
    v
}

/// Depth of the primary needle within the haystack, in tokens of `count`.
fn measured_depth(inst: &TaskInstance, count: &dyn Fn(&str) -> usize) -> f64 {
    let c = &inst.meta.context;
    count(&inst.prompt[c.start..inst.meta.needle.start]) as f64 / count(&inst.prompt[c.clone()]) as f64
}

#[test]
fn needles_sit_at_the_requested_depth_and_hold_the_answer() {
    let counters: [(&str, Counter); 2] = [("words", &words), ("bytes/4", &bytes4)];
    for filler in fillers() {
        for spec in specs() {
            for (cname, count) in counters {
                for p in grid(&[1500, 4000], &[0.0, 0.1, 0.25, 0.5, 0.77, 1.0], &[3]) {
                    let inst = spec.instance(p, &filler, count).unwrap();
                    let d = measured_depth(&inst, count);
                    let at = format!("{} {} {cname} len {} depth {}", spec, filler.kind(), p.length, p.depth);
                    assert!((d - p.depth).abs() <= 0.05, "{at}: needle at depth {d:.3}");
                    let needle = &inst.prompt[inst.meta.needle.clone()];
                    assert!(needle.contains(&inst.expected[0]), "{at}: needle `{needle}` lacks {}", inst.expected[0]);
                    for e in &inst.expected {
                        assert!(
                            inst.prompt[inst.meta.context.clone()].contains(e.as_str()),
                            "{at}: {e} not in context"
                        );
                    }
                    assert!(inst.meta.context.end < inst.prompt.len());
                }
            }
        }
    }
}

#[test]
fn prompts_reach_their_target_length() {
    let counters: [Counter; 2] = [&words, &bytes4];
    for filler in fillers() {
        for spec in specs() {
            for count in counters {
                for p in grid(&[600, 2000, 16_000], &[0.3], &[1, 2]) {
                    let inst = spec.instance(p, &filler, count).unwrap();
                    let n = count(&inst.prompt);
                    assert_eq!(n, inst.meta.prompt_tokens);
                    let err = n.abs_diff(p.length) as f64 / p.length as f64;
                    assert!(err <= 0.05, "{spec} {} len {}: {n} tokens", filler.kind(), p.length);
                }
            }
        }
    }
}

#[test]
fn prompts_end_with_an_answer_prefix() {
    let p = GridPoint { length: 800, depth: 0.5, seed: 9 };
    let end = |s: &str| spec_prompt(s, p).trim_end().to_string();
    assert!(end("passkey").ends_with("What is the pass key? The pass key is"));
    assert!(end("niah_single").ends_with("mentioned in the provided text is"));
    assert!(end("niah_multivalue").ends_with("mentioned in the provided text are"));
    assert!(end("niah_multiquery").ends_with("mentioned in the provided text are"));
    assert!(end("variable_tracking").ends_with("they are: VAR"));
    let inst = "passkey".parse::<TaskSpec>().unwrap().instance(p, &Filler::Landmark, &words).unwrap();
    let k = &inst.answer;
    assert_eq!(k.len(), 5);
    assert!(inst.prompt.contains(&format!("The pass key is {k}. Remember it. {k} is the pass key.")));
    assert!(inst.prompt.contains("The grass is green. The sky is blue. The sun is yellow. Here we go."));
}

fn spec_prompt(spec: &str, p: GridPoint) -> String {
    spec.parse::<TaskSpec>().unwrap().instance(p, &Filler::Landmark, &words).unwrap().prompt
}

#[test]
fn seeds_are_deterministic_and_distinct() {
    for filler in fillers() {
        for spec in specs() {
            let p = GridPoint { length: 1200, depth: 0.4, seed: 42 };
            let a = spec.instance(p, &filler, &words).unwrap();
            let b = spec.instance(p, &filler, &words).unwrap();
            assert_eq!(a, b);
            let c = spec.instance(GridPoint { seed: 43, ..p }, &filler, &words).unwrap();
            assert_ne!(a.expected, c.expected, "{spec}");
        }
    }
    let i = "niah_multikey".parse::<TaskSpec>().unwrap().instance(
        GridPoint { length: 1000, depth: 0.5, seed: 5 },
        &Filler::Landmark,
        &words,
    );
    assert_eq!(i.unwrap().id, "niah_multikey:keys=4/1000/d50/s5");
}

#[test]
fn multi_answer_tasks_hold_every_answer() {
    let p = GridPoint { length: 2000, depth: 0.2, seed: 11 };
    let t = |s: &str| s.parse::<TaskSpec>().unwrap().instance(p, &Filler::Landmark, &words).unwrap();
    let mk = t("niah_multikey:keys=5");
    assert_eq!(mk.expected.len(), 1);
    assert_eq!(mk.prompt.matches("One of the special magic numbers for").count(), 5);
    let mv = t("niah_multivalue:values=3");
    assert_eq!(mv.expected.len(), 3);
    let mq = t("niah_multiquery:queries=3");
    assert_eq!(mq.expected.len(), 3);
    let vt = t("variable_tracking:chains=2,hops=3");
    assert_eq!(vt.expected.len(), 4);
    assert_eq!(vt.prompt.matches("VAR ").count(), 2 * 4 + 2 * 3);
    // The chain is in order: each variable is assigned before it is used.
    let ctx = &vt.prompt[vt.meta.context.clone()];
    for w in vt.expected.windows(2) {
        let (a, b) = (ctx.find(&format!("VAR {} =", w[0])).unwrap(), ctx.find(&format!("VAR {} =", w[1])).unwrap());
        assert!(a < b);
        assert!(ctx.contains(&format!("VAR {} = VAR {}.", w[1], w[0])));
    }
    assert!(vt.prompt.contains("4 variables are assigned the value"));
}

#[test]
fn scores_are_one_for_right_zero_for_wrong_partial_for_some() {
    let p = GridPoint { length: 1000, depth: 0.5, seed: 2 };
    for spec in specs() {
        let inst = spec.instance(p, &Filler::Landmark, &words).unwrap();
        let right = format!(" {}.", inst.expected.join(", "));
        assert_eq!(score(&spec, &right, &inst), 1.0, "{spec}");
        assert_eq!(score(&spec, " I do not know.", &inst), 0.0, "{spec}");
        assert_eq!(score(&spec, " 1234567, 00000.", &inst), 0.0, "{spec}");
        if inst.expected.len() >= 2 {
            let half = inst.expected.len() / 2;
            let partial = format!(" {}.", inst.expected[..half].join(", "));
            let s = score(&spec, &partial, &inst);
            assert!((s - half as f64 / inst.expected.len() as f64).abs() < 1e-12, "{spec}: {s}");
        }
    }
    // Exact match takes the first number only.
    let spec: TaskSpec = "passkey".parse().unwrap();
    let inst = spec.instance(p, &Filler::Landmark, &words).unwrap();
    assert_eq!(score(&spec, &format!(" 99. {}", inst.answer), &inst), 0.0);
}

#[test]
fn bad_parameters_error_and_name_themselves() {
    let spec = TaskSpec::Passkey;
    let e = spec.instance(GridPoint { length: 1000, depth: 50.0, seed: 0 }, &Filler::Landmark, &words).unwrap_err();
    assert!(e.to_string().contains("depth"), "{e}");
    assert!(spec.instance(GridPoint { length: 1000, depth: f64::NAN, seed: 0 }, &Filler::Landmark, &words).is_err());
    let e = spec.instance(GridPoint { length: 20, depth: 0.5, seed: 0 }, &Filler::Landmark, &words).unwrap_err();
    assert!(matches!(e, Error::TooShort { target: 20, .. }), "{e}");
    let e = spec.instance(GridPoint { length: 1000, depth: 0.5, seed: 0 }, &Filler::text(""), &words).unwrap_err();
    assert_eq!(e, Error::EmptyFiller);
    let zero = |s: &str| usize::from(s.contains("pass key"));
    let e = spec.instance(GridPoint { length: 100, depth: 0.5, seed: 0 }, &Filler::Landmark, &zero).unwrap_err();
    assert!(e.to_string().contains("count_tokens"), "{e}");
    let bad = TaskSpec::NiahMultikey { keys: 0 };
    assert!(bad.instance(GridPoint { length: 1000, depth: 0.5, seed: 0 }, &Filler::Landmark, &words).is_err());
}

#[test]
fn grids_cover_every_combination_in_order() {
    let g = grid(&[100, 200], &[0.0, 1.0], &[7, 8, 9]);
    assert_eq!(g.len(), 12);
    assert_eq!(g[0], GridPoint { length: 100, depth: 0.0, seed: 7 });
    assert_eq!(g[11], GridPoint { length: 200, depth: 1.0, seed: 9 });
    assert!(grid(&[], &[0.5], &[1]).is_empty());
}

#[test]
fn instances_serialise() {
    let inst = TaskSpec::NiahSingle
        .instance(GridPoint { length: 300, depth: 0.5, seed: 1 }, &Filler::Landmark, &words)
        .unwrap();
    let json = serde_json::to_string(&inst).unwrap();
    assert_eq!(serde_json::from_str::<TaskInstance>(&json).unwrap(), inst);
}
