//! Test input shared by the unit tests: seeded values in [-1, 1).

/// A generator of `n` values in [-1, 1) per call (xorshift32 from `seed`, which must not be 0):
/// cheap, deterministic, and the same on every platform.
pub(crate) fn uniform(mut seed: u32) -> impl FnMut(usize) -> Vec<f32> {
    move |n| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }
}
