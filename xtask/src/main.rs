//! `cargo xtask <task>`: the project's chores in one place, cheapest checks first.
//!
//! - `ci`: rustfmt check, clippy (warnings are errors), fetch the model, the workspace tests,
//!   and the downstream example crates. `.ci/run` runs exactly this.
//! - `fetch-model`: puts the verified SmolLM2 GGUF and the default document in the cache (see
//!   `needle-fetch`).
//! - `test-gpu [--build-only] [--out DIR]`: the GPU test suite (see the command's message).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <ci | fetch-model | test-gpu [--build-only] [--out DIR]>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("fetch-model") => fetch_model().map(|_| ()),
        Some("test-gpu") => test_gpu(&args[1..]),
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
        None => bail!("{USAGE}"),
    }
}

/// The workspace root. `cargo run` sets `CARGO_MANIFEST_DIR` for the running binary: read it at
/// run time, since a build cache shared by several clones may hold an xtask built in another one.
fn root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn cargo(args: &[&str], dir: &Path) -> Result<()> {
    eprintln!("\n==> cargo {} ({})", args.join(" "), dir.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(args).current_dir(dir).status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn fetch_model() -> Result<PathBuf> {
    eprintln!("\n==> fetch-model");
    let path = needle_fetch::ensure_default_model().context("fetching the default model")?;
    if std::env::var_os("NEEDLE_MODEL").is_none() {
        needle_fetch::verify(&path, needle_fetch::DEFAULT_MODEL_SHA256)?;
    }
    eprintln!("model ready: {}", path.display());
    // The README's main job reads the default document; CI fetches it here, beside the model.
    let doc = needle_fetch::ensure_default_document().context("fetching the default document")?;
    eprintln!("document ready: {}", doc.display());
    Ok(path)
}

/// Downstream crates under `examples/` that stand for a user's own project.
fn example_crates(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    v.sort();
    v
}

fn ci() -> Result<()> {
    let root = root();
    cargo(&["fmt", "--all", "--check"], &root)?;
    cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"], &root)?;
    fetch_model()?;
    cargo(&["test", "--workspace", "--locked"], &root)?;
    for ex in example_crates(&root) {
        cargo(&["test"], &ex)?;
    }
    eprintln!("\nci: all checks passed");
    Ok(())
}

fn test_gpu(args: &[String]) -> Result<()> {
    let build_only = args.iter().any(|a| a == "--build-only");
    let _out = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1));
    // Honest until kernels-cubecl lands: there is no CUDA test suite to build or run yet.
    eprintln!(
        "test-gpu: needle has no GPU test suite yet (kernels-cubecl is not built; see README status).{}",
        if build_only { " Nothing to bundle." } else { " Nothing to run." }
    );
    Ok(())
}
