//! `needle`: run a real model on a long document with retrieval attention, and measure it.
//!
//! The binary is [`run`]; a crate that registers its own selectors or indexes
//! (`needle_select::register_selector`, `register_index`) builds its own `needle` by calling
//! [`run`] after registering (see `examples/custom-selector`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod calibrate;
/// The commands' shared steps (model loading, prompts and chat templates, caches), public so
/// that bindings (the Python package) turn text into tokens exactly as the CLI does.
pub mod common;
mod eval;
mod generate;
mod logits;
mod prefill;
mod serve;
mod trace;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "needle", version, about = "Long-context inference with retrieval attention")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or a long document) and report speed and memory.
    Generate(generate::GenerateArgs),
    /// Prefill a document once and save the context for `generate --context` ("ask many").
    Prefill(prefill::PrefillArgs),
    /// Print the top-K next-token logits of a prompt's last position (for cross-checks).
    Logits(logits::LogitsArgs),
    /// Record post-RoPE keys, prefill queries and decode queries into a safetensors file.
    Trace(trace::TraceArgs),
    /// Selectors against full attention: fidelity, passkey, RULER-style tasks, cost.
    Eval(eval::EvalArgs),
    /// Rank heads by attention outside sinks + window and write a per-head selector policy.
    Calibrate(calibrate::CalibrateArgs),
    /// An OpenAI-compatible server that prefills a long document once for every question.
    Serve(serve::ServeArgs),
    /// Benchmarks (`needle bench index`, ...).
    Bench(bench::BenchArgs),
    /// Fetch the default model and document into the cache (as `cargo xtask fetch-model`).
    FetchModel,
}

/// Runs the `needle` command line on this process's arguments.
pub fn run() -> Result<()> {
    run_from(std::env::args_os())
}

/// Runs the `needle` command line on `args` (the first is the program name).
pub fn run_from<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // A second call in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "needle=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match Cli::try_parse_from(args).unwrap_or_else(|e| e.exit()).command {
        Command::Generate(a) => generate::run(a),
        Command::Prefill(a) => prefill::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Trace(a) => trace::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
        Command::FetchModel => {
            let p = needle_fetch::ensure_default_model()?;
            eprintln!("model ready: {}", p.display());
            let d = needle_fetch::ensure_default_document()?;
            eprintln!("document ready: {}", d.display());
            Ok(())
        }
    }
}
