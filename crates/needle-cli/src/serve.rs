//! `needle serve`: the OpenAI-compatible server of needle-serve on the CPU backend.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use needle_model::Weights;
use needle_serve::{ServeConfig, Server};

use crate::common::{DeviceKind, ModelArgs, WeightsArg, model_path};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model's name in requests and /v1/models (default: the checkpoint's file name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Attention selector when a request names none (a request may send
    /// `"needle": {"selector": …}`). `auto` is retrieval from 2,048 prefix tokens on.
    #[arg(long, default_value = "auto")]
    pub selector: String,
    /// Sequences decoded together (one batched pass over the weights per step).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait for a free sequence; past that a request gets 503 at once.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Keep cached prefixes (context files) here across restarts; default: a temporary
    /// directory in --kv-spill-dir, removed at shutdown.
    #[arg(long)]
    pub context_dir: Option<PathBuf>,
    /// Most bytes of cached prefixes, e.g. `8GiB` (least recently used out).
    #[arg(long, default_value = "8GiB", value_parser = parse_bytes)]
    pub cache_bytes: u64,
    /// Shortest prefix worth caching, in tokens.
    #[arg(long, default_value_t = 512)]
    pub cache_min_tokens: usize,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Most tokens per sequence (prompt + answer); default: the model's trained length.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
}

/// Ctrl-C, or (on Unix) SIGTERM: either shuts the server down cleanly (spill files and a
/// temporary context directory removed).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `8GiB`, `512MiB`, `100000`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}`: a number of bytes, e.g. 8GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        u => return Err(format!("`{s}`: unknown unit `{u}` (B, KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.model.device != DeviceKind::Cpu {
        bail!("--device {:?}: `needle serve` runs on the CPU backend", a.model.device);
    }
    if a.model.prefill != "dense" {
        bail!("--prefill {}: `needle serve` prefills densely", a.model.prefill);
    }
    let mut cfg = ServeConfig::new(model_path(&a.model.model)?);
    cfg.model_id = a.model_id.clone();
    cfg.weights = if a.model.weights == WeightsArg::F32 { Weights::F32 } else { Weights::Native };
    cfg.kv = a.model.kv_dtype();
    cfg.kv_budget = a.model.kv_budget;
    cfg.spill_dir = a.model.kv_spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    cfg.context_dir = a.context_dir.clone();
    cfg.cache_bytes = a.cache_bytes;
    cfg.cache_min_tokens = a.cache_min_tokens;
    cfg.selector = a.selector.clone();
    cfg.parallel = a.parallel;
    cfg.queue = a.queue;
    cfg.chunk = a.chunk;
    cfg.max_context = a.max_context;
    cfg.default_max_tokens = a.default_max_tokens;
    cfg.build_during_prefill = !a.model.build_after_prefill;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let server = Server::start(cfg, SocketAddr::new(a.host, a.port)).await.context("starting the server")?;
        eprintln!("[needle] serving on http://{} (ctrl-c stops)", server.addr());
        server.run_until(stop_signal()).await.context("serving")?;
        eprintln!("[needle] stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(super::parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(super::parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_bytes("100"), Ok(100));
        assert!(super::parse_bytes("5 parsecs").is_err());
        assert!(super::parse_bytes("99999999999TiB").is_err());
    }
}
