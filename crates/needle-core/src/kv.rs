//! Views of keys and values: one row of `dim` floats per token, for one KV head.
//!
//! Selectors and reference attention read rows through [`RowSource`], so they work the same
//! over a contiguous slice ([`Rows`]) or over fixed-size pages ([`PagedRows`]) that a storage
//! tier can move, spill or reload one page at a time.

use crate::error::{Error, Result, check_finite, check_len};

/// Read access to `len()` rows of `dim()` floats, addressed by token position.
pub trait RowSource: Sync {
    /// Floats per row.
    fn dim(&self) -> usize;
    /// Number of rows.
    fn len(&self) -> usize;
    /// Row `i`. Panics if `i >= len()`; callers check ids with [`RowSource::check_id`].
    fn row(&self, i: usize) -> &[f32];
    /// True when there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Errors unless `id` addresses a stored row.
    fn check_id(&self, what: &str, id: u32) -> Result<()> {
        if (id as usize) < self.len() {
            Ok(())
        } else {
            Err(Error::OutOfRange { what: what.to_string(), id: id.into(), len: self.len() })
        }
    }
}

/// A borrowed row-major matrix: `data.len() == rows * dim`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: &'a [f32],
    dim: usize,
}

impl<'a> Rows<'a> {
    /// Wraps `data` as rows of `dim` floats; errors if the length is not a multiple of `dim`.
    pub fn new(what: &str, data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", format!("{what}: rows need at least one column")));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(Error::DimensionMismatch {
                what: format!("{what} (rows of {dim})"),
                expected: data.len().div_ceil(dim) * dim,
                got: data.len(),
            });
        }
        Ok(Self { data, dim })
    }

    /// The underlying slice.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }
}

impl RowSource for Rows<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// Owned rows kept in fixed-size pages of `page_size` rows, so growth never copies old rows
/// and a page is the unit a storage tier moves.
#[derive(Debug, Clone)]
pub struct PagedRows {
    dim: usize,
    page_size: usize,
    pages: Vec<Box<[f32]>>,
    len: usize,
}

impl PagedRows {
    /// Empty storage for rows of `dim` floats in pages of `page_size` rows.
    pub fn new(dim: usize, page_size: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        if page_size == 0 {
            return Err(Error::invalid("page_size", "must be at least 1"));
        }
        Ok(Self { dim, page_size, pages: Vec::new(), len: 0 })
    }

    /// Rows per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The pages; the last one may be partly filled (see [`PagedRows::len`]).
    pub fn pages(&self) -> &[Box<[f32]>] {
        &self.pages
    }

    /// Appends one row and returns its position. Rejects wrong lengths and non-finite values.
    pub fn push(&mut self, row: &[f32]) -> Result<u32> {
        check_len("PagedRows::push row", self.dim, row.len())?;
        check_finite("PagedRows::push row", row)?;
        let slot = self.len % self.page_size;
        if slot == 0 {
            self.pages.push(vec![0.0; self.page_size * self.dim].into_boxed_slice());
        }
        let page = self.pages.last_mut().ok_or_else(|| Error::invalid("page", "missing"))?;
        page[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(row);
        let id = u32::try_from(self.len).map_err(|_| Error::invalid("len", "more than u32::MAX rows"))?;
        self.len += 1;
        Ok(id)
    }

    /// Appends every row of a row-major slice.
    pub fn extend_from_slice(&mut self, rows: &[f32]) -> Result<()> {
        let view = Rows::new("PagedRows::extend_from_slice", rows, self.dim)?;
        for i in 0..view.len() {
            self.push(view.row(i))?;
        }
        Ok(())
    }

    /// Drops every row after the first `len` (used to roll back a speculative step).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.pages.truncate(len.div_ceil(self.page_size));
        }
    }

    /// Bytes held, counting whole pages.
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.page_size * self.dim * std::mem::size_of::<f32>()
    }
}

impl RowSource for PagedRows {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.len
    }
    fn row(&self, i: usize) -> &[f32] {
        assert!(i < self.len, "row {i} out of range ({} rows)", self.len);
        let (p, s) = (i / self.page_size, i % self.page_size);
        &self.pages[p][s * self.dim..(s + 1) * self.dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_rows_cross_page_boundaries() {
        let mut p = PagedRows::new(3, 2).unwrap();
        for i in 0..5 {
            let id = p.push(&[i as f32, 1.0, 2.0]).unwrap();
            assert_eq!(id, i);
        }
        assert_eq!(p.len(), 5);
        assert_eq!(p.pages().len(), 3);
        assert_eq!(p.row(4), &[4.0, 1.0, 2.0]);
        p.truncate(3);
        assert_eq!(p.pages().len(), 2);
        assert_eq!(p.len(), 3);
        assert!(p.check_id("keys", 3).is_err());
    }

    #[test]
    fn bad_rows_are_named_errors() {
        let mut p = PagedRows::new(2, 4).unwrap();
        assert!(matches!(p.push(&[1.0]), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(p.push(&[f32::NAN, 1.0]), Err(Error::NonFinite { index: 0, .. })));
        assert!(Rows::new("k", &[1.0, 2.0, 3.0], 2).is_err());
        assert!(PagedRows::new(0, 4).is_err());
    }
}
