//! Decode-attention time against context length, per selector: the same module as
//! `needle eval --sweep`, runnable on its own.
//!
//! ```text
//! cargo run --release -p needle-cli --example sweep -- --max-context 32K --plot sweep.png
//! cargo run --release -p needle-cli --example sweep -- --trace trace.safetensors --layer 15
//! ```

#[path = "../src/sweep.rs"]
mod sweep;

use clap::Parser;

/// Decode-step attention time of one layer against context length, per selector.
#[derive(Parser)]
#[command(name = "sweep")]
struct Cli {
    #[command(flatten)]
    args: sweep::SweepArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sweep=info,needle=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let report = sweep::run(&cli.args)?;
    sweep::finish(&cli.args, &report)
}
