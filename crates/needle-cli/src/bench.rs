//! `needle bench`: measured comparisons.

mod index;
mod plot;
mod stats;

use anyhow::Result;
use clap::{Args, Subcommand};

/// Arguments of `needle bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Recall@k, keys scanned, latency and build cost of index backends on a `needle trace` file.
    Index(index::IndexArgs),
}

/// Runs `needle bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Index(a) => index::run(a),
    }
}
