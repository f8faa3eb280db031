//! Every kernel on CubeCL's wgpu runtime (lavapipe in CI) against a plain f64 CPU reference,
//! on fresh seeded random inputs. One test binary: one link, one device.

mod common;
mod decode;
mod gemv;
mod merge;
mod prefill;
mod quest;
