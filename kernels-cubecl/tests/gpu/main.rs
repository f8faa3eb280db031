//! Every kernel on CubeCL's wgpu runtime (lavapipe in CI) against a plain f64 CPU reference,
//! on fresh seeded random inputs. One test binary: one link, one device.

// Test helpers outside `#[test]` fns: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;
mod decode;
mod gemv;
mod merge;
mod prefill;
mod quest;
