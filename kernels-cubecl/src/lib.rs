//! needle's GPU kernels, written in CubeCL (runs on wgpu — Vulkan/Metal/DX12 — and CUDA).
//!
//! * [`decode`]: gathered decode attention over per-KV-head id lists, GQA-aware,
//!   flash-decoding (chunks in separate cubes, then a log-sum-exp reduction); output and LSE.
//! * [`merge`]: exact LSE merge of two partials (device static part + host retrieved part).
//! * [`gemv`]: `y = W·x` straight from GGUF Q8_0 / Q4_0 / Q4_1 blocks.
//! * [`prefill`]: causal prefill attention (tiled flash attention), GQA-aware, with LSE.
//! * [`quest`]: Quest page upper-bound scores and a deterministic top-k.
//!
//! Every kernel works without plane (subgroup) operations: Mesa's lavapipe, on which the tests
//! run, exposes none. Each module has a `launch_*` function over device handles (for callers
//! that keep data on the device) and a wrapper that uploads, launches and reads back.
//! Kernels never use infinite literals (WGSL rejects them): `-inf` results are written from a
//! run-time argument.

pub mod decode;
pub mod error;
pub mod gemv;
pub mod merge;
pub mod prefill;
pub mod quest;

mod util;

pub use decode::{Attention, DecodeOptions, DeviceKv, DeviceRowLists, decode_attention, launch_decode};
pub use error::{Error, Result};
pub use gemv::{DeviceQMatrix, gemv, launch_gemv};
pub use merge::{launch_lse_merge, lse_merge};
pub use prefill::{launch_prefill, prefill_attention};
pub use quest::{launch_quest_scores, launch_top_k, quest_scores, top_k};

/// Re-export of the CubeCL version this crate is built against.
pub use cubecl;

/// Opens the default wgpu device (a real GPU when there is one, else e.g. lavapipe).
///
/// CubeCL panics when no adapter exists; this turns that into [`Error::NoDevice`].
#[cfg(feature = "wgpu")]
pub fn wgpu_client() -> Result<cubecl::prelude::ComputeClient<cubecl::wgpu::WgpuRuntime>> {
    use cubecl::prelude::Runtime;
    std::panic::catch_unwind(|| cubecl::wgpu::WgpuRuntime::client(&cubecl::wgpu::WgpuDevice::DefaultDevice)).map_err(
        |p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "adapter creation panicked".into());
            Error::NoDevice(msg)
        },
    )
}
