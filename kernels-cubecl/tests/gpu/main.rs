//! Every kernel on CubeCL's wgpu runtime (lavapipe in CI; CUDA with `--no-default-features
//! --features cuda`) against a plain f64 CPU reference,
//! on fresh seeded random inputs. One test binary: one link, one device.

// Test helpers outside `#[test]` fns: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::print_stderr)]
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
mod decode;
mod gemv;
mod merge;
mod prefill;
mod quest;
mod sparse_prefill;
mod store;
