//! Row access on plain row-major slices; inner products are needle-core's one `dot`.

pub(crate) use needle_core::kit::dot;

/// Row `i` of a row-major matrix with `dim` columns.
#[inline]
pub(crate) fn row(data: &[f32], dim: usize, i: u32) -> &[f32] {
    let s = i as usize * dim;
    &data[s..s + dim]
}
