//! Kernel benchmarks (filled in later).
fn main() {}
