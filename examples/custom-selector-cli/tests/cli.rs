//! The binary runs `needle generate` with the registered selector named in `--selector`, and
//! refuses a misspelt option of it by name.
#![allow(clippy::unwrap_used)]

const PROMPT: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. \
The pass key is 40917. Remember it. 40917 is the pass key. The grass is green. The sky is blue. The sun is yellow. \
Here we go. There and back again. The grass is green. The sky is blue. The sun is yellow. Here we go. \
What is the pass key? The pass key is";

fn needle(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_needle-custom")).args(args).output().unwrap()
}

#[test]
fn registered_by_name_it_runs_in_needle_generate() {
    let path = needle_fetch::default_model_path().unwrap();
    assert!(path.is_file(), "{} is missing: run `cargo xtask fetch-model` (or set NEEDLE_MODEL)", path.display());
    let spec = "strided-rerank:stride=4,oversample=2,k=8,sinks=4,window=16";
    let out = needle(&["generate", "--prompt", PROMPT, "--selector", spec, "--max-tokens", "4", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["selector"], spec);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let share = v["share_of_keys_touched"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");

    let out = needle(&["generate", "--prompt", PROMPT, "--selector", "strided-rerank:strid=4", "--max-tokens", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("strid") && stderr.contains("oversample"), "{stderr}");
}
