//! The `needle` binary as a user runs it: the README's main job in small (default model, default
//! document, default selector), help text, and clear errors for what a build lacks.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn needle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needle")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn main_job_runs_from_the_clone_alone_and_auto_picks_retrieval() {
    // The README's command, shortened: default model and document, fetched into the cache.
    let o = needle(&[
        "generate",
        "--model",
        "default",
        "--document",
        "default",
        "--context-tokens",
        "2100",
        "--question",
        "Who built the ark?",
        "--chat",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["selector"], "retrieval", "auto over ≥ 2,048 tokens is retrieval");
    assert!(v["prompt_tokens"].as_u64().unwrap() >= 2100);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 3);
    let share = v["share_of_keys_touched"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "retrieval reads a part of the keys, not all: {share}");
    assert!(stderr(&o).contains("selector auto → retrieval"), "{}", stderr(&o));
}

#[test]
fn short_prompts_default_to_full_attention() {
    let o = needle(&["generate", "--prompt", "The capital of France is", "--max-tokens", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["selector"], "full");
    assert_eq!(v["share_of_keys_touched"].as_f64().unwrap(), 1.0);
}

/// `needle logits --at` gives the rows of the positions asked for from one prefill: its last row
/// is the plain command's, an earlier row differs, and a position past the prompt is an error.
#[test]
fn logits_at_chosen_positions() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "logits",
            "--prompt",
            "The capital of France is Paris. The capital of Italy is",
            "--top",
            "5",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = needle(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let plain = run(&[]);
    let last = plain["prompt_ids"].as_array().unwrap().len() - 1;
    let at = run(&["--at", &format!("3,{last}")]);
    let rows = at["at"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["position"].as_u64(), rows[1]["position"].as_u64()), (Some(3), Some(last as u64)));
    assert_eq!(rows[1]["top"], plain["top"], "the last row is the plain command's");
    assert_ne!(rows[0]["top"], plain["top"]);
    let o = needle(&["logits", "--prompt", "Hello", "--at", "99"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--at 99 is past"), "{}", stderr(&o));
}

#[test]
fn help_names_the_default_model() {
    for cmd in ["generate", "logits", "eval", "calibrate", "trace", "serve"] {
        let o = needle(&[cmd, "--help"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
        assert!(text.contains("SmolLM2-135M-Instruct Q4_1"), "{cmd}: {text}");
        assert!(!text.contains("pub struct"), "{cmd}: {text}");
    }
}

#[test]
fn unknown_documents_selectors_and_missing_backends_are_clear_errors() {
    let o = needle(&["generate", "--document", "bible-nope", "--max-tokens", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--document `bible-nope`"), "{}", stderr(&o));
    let o = needle(&["generate", "--prompt", "hi", "--selector", "nope", "--max-tokens", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("retrieval") && stderr(&o).contains("streaming"), "{}", stderr(&o));
    for (device, built) in [("wgpu", cfg!(feature = "wgpu")), ("cuda", cfg!(feature = "cuda"))] {
        if built {
            continue;
        }
        let o = needle(&["generate", "--prompt", "hi", "--device", device, "--max-tokens", "1"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(&format!("--features {device}")), "{}", stderr(&o));
    }
}

#[test]
fn a_saved_context_answers_questions_and_keeps_its_own_settings() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("bible.needle");
    let ctx = ctx.to_str().unwrap();
    let prefill = |extra: &[&str]| {
        let args = ["prefill", "--document", "default", "--context-tokens", "600", "--chat", "--kv", "f16"];
        let sel = ["--selector", "quest:sinks=16,window=64,k=32", "--save", ctx];
        needle(&[&args[..], &sel, extra].concat())
    };
    let o = prefill(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("saved") && stderr(&o).contains("KV f16"), "{}", stderr(&o));
    let again = prefill(&[]);
    assert!(!again.status.success() && stderr(&again).contains("--force"), "{}", stderr(&again));
    let o = needle(&["generate", "--context", ctx, "--question", "Who built the ark?", "--max-tokens", "4", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["selector"].as_str(), v["kv"].as_str()), (Some("quest:sinks=16,window=64,k=32"), Some("f16")));
    assert!(v["prompt_tokens"].as_u64().unwrap() > 600, "the question and the chat turn's end follow");
    assert!(v["context_load_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let answer = v["token_ids"].clone();
    // The decode profile: its parts are measured apart and the rest is "other".
    let p = &v["decode_profile"];
    let ms = |k: &str| p[k].as_f64().unwrap();
    assert!(p["steps"].as_u64().unwrap() >= 3 && ms("step_ms") > 0.0 && ms("weights_ms") > 0.0, "{p}");
    let parts = ["weights_ms", "attention_ms", "walk_ms", "insert_ms", "other_ms"].map(ms);
    assert!((parts.iter().sum::<f64>() - ms("step_ms")).abs() < 1e-6 * ms("step_ms").max(1.0), "{p}");

    // `bench decode` decodes the same tokens from the saved context, with its profile.
    let bench_json = dir.path().join("bench.json");
    let args = ["bench", "decode", "--context", ctx, "--question", "Who built the ark?", "--tokens", "4"];
    let o = needle(&[&args[..], &["--repeat", "2", "--json", bench_json.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("decode step") && stderr(&o).contains("walk"), "{}", stderr(&o));
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&bench_json).unwrap()).unwrap();
    assert_eq!(b["token_ids"], answer, "bench decode and generate --context decode the same tokens");
    assert_eq!(b["decode_profile"]["steps"].as_u64(), Some(4));
    assert!(b["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    let o = needle(&["bench", "decode", "--context", ctx, "--json", bench_json.to_str().unwrap()]);
    assert!(!o.status.success(), "an existing --json file is not overwritten");
    let o = needle(&["generate", "--context", ctx, "--kv", "f32", "--max-tokens", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("saved with `f16`"), "{}", stderr(&o));

    // The saved selector (its index as saved) and others built over the same pages, against
    // full attention over them, after a question.
    let json = dir.path().join("eval.json");
    let sel = "full;streaming:sinks=4,window=16";
    let args = ["eval", "--context", ctx, "--fidelity", "--steps", "3", "--question", "Who built the ark?"];
    let o = needle(&[&args[..], &["--selectors", sel, "--kv", "f32", "--json", json.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["fidelity"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["selector"].as_str().unwrap()).collect();
    assert_eq!(names, ["quest:sinks=16,window=64,k=32 (saved)", "full", "streaming:sinks=4,window=16"]);
    assert!(v["context_tokens"].as_u64().unwrap() >= 600);
    // `full` over the same f32 pages is the teacher itself: exactly no divergence.
    assert_eq!((rows[1]["mean_kl"].as_f64(), rows[1]["agreement"].as_f64()), (Some(0.0), Some(1.0)));
    assert!(rows[2]["mean_kl"].as_f64().unwrap() > 0.0, "a 16-token window differs from full attention");
    assert_eq!(rows[0]["build_s"].as_f64(), Some(0.0), "the saved index is not rebuilt");
    let o = needle(&["eval", "--context", ctx, "--ruler"]);
    assert!(!o.status.success() && stderr(&o).contains("--ruler"), "{}", stderr(&o));
    let o = needle(&["eval", "--context", ctx]);
    assert!(!o.status.success() && stderr(&o).contains("only --fidelity"), "{}", stderr(&o));
}

/// A question asked directly of a document is the same computation as the same question asked of
/// its saved context (prefill the document, build, extend with the question): the same greedy
/// tokens, with a chat template and without.
#[test]
fn asking_directly_and_asking_a_saved_context_give_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for chat in [false, true] {
        let ctx = dir.path().join(format!("doc-{chat}.needle"));
        let ctx = ctx.to_str().unwrap();
        let chat_flag: &[&str] = if chat { &["--chat"] } else { &[] };
        let doc = ["--document", "default", "--context-tokens", "1000", "--selector", "retrieval"];
        let o = needle(&[&["prefill", "--save", ctx][..], &doc, chat_flag].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let ask = ["--question", "Who built the ark?", "--max-tokens", "12", "--json"];
        let direct = needle(&[&["generate"][..], &doc, chat_flag, &ask].concat());
        let saved = needle(&[&["generate", "--context", ctx][..], &ask].concat());
        let ids = |o: &Output| {
            assert!(o.status.success(), "{}", stderr(o));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            (v["token_ids"].clone(), v["prompt_tokens"].clone())
        };
        assert_eq!(ids(&direct), ids(&saved), "chat {chat}: direct and saved-context answers differ");
    }
}
