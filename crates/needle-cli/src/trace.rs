//! `needle trace`: record vectors of the real model for index benchmarks.

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `needle trace`.
#[derive(Args)]
pub struct TraceArgs {}

/// Runs `needle trace`.
pub fn run(_a: TraceArgs) -> Result<()> {
    bail!("needle trace is being written")
}
