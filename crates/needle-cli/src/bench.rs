//! `needle bench`: measured comparisons.

use anyhow::{Result, bail};
use clap::Args;

/// Arguments of `needle bench`.
#[derive(Args)]
pub struct BenchArgs {}

/// Runs `needle bench`.
pub fn run(_a: BenchArgs) -> Result<()> {
    bail!("needle bench is being written")
}
