//! needle's GPU kernels, written in CubeCL (runs on wgpu — Vulkan/Metal/DX12 — and CUDA).
//!
//! * [`decode`]: gathered decode attention over per-KV-head id lists, GQA-aware,
//!   flash-decoding (chunks in separate cubes, then a log-sum-exp reduction); output and LSE.
//! * [`merge`]: exact LSE merge of two partials (device static part + host retrieved part).
//! * [`gemv`]: `y = W·x` straight from GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K,
//!   Q5_K, Q6_K, F16, BF16).
//! * [`gemm`]: `Y = X·Wᵀ` for a block of tokens from the same blocks, tiled: each weight tile
//!   dequantized once into shared memory for all the tile's tokens (prefill).
//! * [`prefill`]: causal prefill attention (tiled flash attention), GQA-aware, with LSE; dense, or
//!   block-sparse over per-KV-head lists of key blocks (a prefill pattern's mask).
//! * [`quest`]: Quest page upper-bound scores and a deterministic top-k.
//!
//! Every kernel works without plane (subgroup) operations: Mesa's lavapipe, on which the tests
//! run, exposes none. Each module has a `launch_*` function over device handles (for callers
//! that keep data on the device) and a wrapper that uploads, launches and reads back.
//! Kernels never use infinite literals (WGSL rejects them): `-inf` results are written from a
//! run-time argument.

pub mod decode;
pub mod error;
pub mod gemm;
pub mod gemv;
pub mod merge;
pub mod prefill;
pub mod quest;

mod util;

pub use decode::{
    Attention, DecodeOptions, DeviceKv, DeviceRowLists, KvFormat, KvStore, decode_attention, launch_decode,
};
pub use error::{Error, Result};
pub use gemm::{gemm, launch_gemm};
pub use gemv::{DeviceQMatrix, gemv, launch_gemv};
pub use merge::{launch_lse_merge, lse_merge};
pub use prefill::{
    DeviceBlockLists, launch_prefill, launch_sparse_prefill, prefill_attention, sparse_prefill_attention,
};
pub use quest::{launch_quest_scores, launch_top_k, quest_scores, top_k};
pub use util::read_f32s;

/// Re-export of the CubeCL version this crate is built against.
pub use cubecl;

/// Opens `device` of runtime `R`, turning CubeCL's panic when there is no adapter or driver
/// into [`Error::NoDevice`].
pub fn open_client<R: cubecl::prelude::Runtime>(device: &R::Device) -> Result<cubecl::prelude::ComputeClient<R>> {
    // AssertUnwindSafe: `device` is only read, and after a panic nothing of it is used again.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(device))).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "client creation panicked".into());
        Error::NoDevice(msg)
    })
}

/// Opens the default wgpu device (a real GPU when there is one, else e.g. lavapipe).
#[cfg(feature = "wgpu")]
pub fn wgpu_client() -> Result<cubecl::prelude::ComputeClient<cubecl::wgpu::WgpuRuntime>> {
    open_client::<cubecl::wgpu::WgpuRuntime>(&cubecl::wgpu::WgpuDevice::DefaultDevice)
}

/// Opens CUDA device 0.
#[cfg(feature = "cuda")]
pub fn cuda_client() -> Result<cubecl::prelude::ComputeClient<cubecl::cuda::CudaRuntime>> {
    open_client::<cubecl::cuda::CudaRuntime>(&cubecl::cuda::CudaDevice { index: 0 })
}
