//! `needle`: run a real model on a long document with retrieval attention, and measure it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod calibrate;
mod common;
mod eval;
mod generate;
mod logits;
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
    /// Print the top-K next-token logits of a prompt's last position (for cross-checks).
    Logits(logits::LogitsArgs),
    /// Record post-RoPE keys, prefill queries and decode queries into a safetensors file.
    Trace(trace::TraceArgs),
    /// Selectors against full attention: fidelity, passkey, RULER-style tasks, cost.
    Eval(eval::EvalArgs),
    /// Rank heads by attention outside sinks + window and write a per-head selector policy.
    Calibrate(calibrate::CalibrateArgs),
    /// Benchmarks (`needle bench index`, ...).
    Bench(bench::BenchArgs),
    /// Fetch the default model into the cache (as `cargo xtask fetch-model`).
    FetchModel,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "needle=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Trace(a) => trace::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::FetchModel => {
            let p = needle_fetch::ensure_default_model()?;
            eprintln!("model ready: {}", p.display());
            Ok(())
        }
    }
}
