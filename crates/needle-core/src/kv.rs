//! Views of keys and values: one row of `dim` numbers per token, for one KV head.
//!
//! Selectors and reference attention read rows through [`RowSource`], so they work the same
//! over a contiguous slice ([`Rows`]) or over fixed-size pages ([`PagedRows`]) that a storage
//! tier can move, spill or reload one page at a time. A row comes at its stored precision
//! ([`Row`]: `f32`, `f16` or 8-bit with a scale per row, see [`KvDtype`]); readers that need
//! `f32` convert it ([`Row::dot`], [`Row::extend_into`]); the decode kernels read `f32` and `f16`
//! directly, 8-bit rows once dequantized.

use std::str::FromStr;

use crate::error::{Error, Result, check_finite, check_len};
use crate::kit::dot;
use crate::page::{PageBuf, PageSpill};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Precision of stored key and value rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 32-bit floats: exact, the default.
    #[default]
    F32,
    /// IEEE half precision: half the bytes; values beyond ±65504 are rejected on insert.
    F16,
    /// 8-bit integers with one `f32` scale per row (its largest magnitude / 127): about a
    /// quarter of the bytes, error at most half a step (`scale / 2`) per number.
    Q8,
}

impl KvDtype {
    /// Bytes per stored number (a `q8` row adds its 4-byte scale, see [`KvDtype::row_bytes`]).
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Q8 => 1,
        }
    }

    /// Bytes of one stored row of `dim` numbers.
    pub fn row_bytes(self, dim: usize) -> usize {
        dim * self.bytes() + if self == KvDtype::Q8 { Q8_SCALE_BYTES } else { 0 }
    }

    /// The name `--kv` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8 => "q8",
        }
    }
}

/// A `q8` row is its scale (`f32`, little-endian) followed by its `dim` signed bytes.
const Q8_SCALE_BYTES: usize = 4;

/// `row` as a `q8` row into `out` (`row.len() + 4` bytes): scale = largest magnitude / 127,
/// each number rounded to the nearest step.
fn quantize_q8(row: &[f32], out: &mut [u8]) {
    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = max / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let (head, body) = out.split_at_mut(Q8_SCALE_BYTES);
    head.copy_from_slice(&scale.to_le_bytes());
    for (o, &x) in body.iter_mut().zip(row) {
        *o = ((x * inv).round().clamp(-127.0, 127.0) as i8) as u8;
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "q8" => Ok(KvDtype::Q8),
            _ => Err(Error::invalid("kv", format!("unknown KV precision `{s}` (expected f32, f16 or q8)"))),
        }
    }
}

/// One stored row at its stored precision.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    /// Stored as `f32`.
    F32(&'a [f32]),
    /// Stored as `f16`.
    F16(&'a [f16]),
    /// Stored as `q8`: the scale's 4 bytes, then one signed byte per number.
    Q8(&'a [u8]),
}

impl Row<'_> {
    /// Starts fetching the row's bytes into the cache ([`prefetch`](crate::kit::prefetch)).
    #[inline]
    pub fn prefetch(&self) {
        let (p, bytes) = match self {
            Row::F32(r) => (r.as_ptr() as *const u8, size_of_val(*r)),
            Row::F16(r) => (r.as_ptr() as *const u8, size_of_val(*r)),
            Row::Q8(r) => (r.as_ptr(), r.len()),
        };
        crate::kit::prefetch(p, bytes);
    }
}

impl<'a> From<&'a [f32]> for Row<'a> {
    fn from(r: &'a [f32]) -> Self {
        Row::F32(r)
    }
}

impl<'a> From<&'a Vec<f32>> for Row<'a> {
    fn from(r: &'a Vec<f32>) -> Self {
        Row::F32(r)
    }
}

impl Row<'_> {
    /// Numbers in the row.
    pub fn len(&self) -> usize {
        match self {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
            Row::Q8(r) => r.len().saturating_sub(Q8_SCALE_BYTES),
        }
    }

    /// The scale and the signed bytes of a `q8` row.
    fn q8_parts(r: &[u8]) -> (f32, &[u8]) {
        let (head, body) = r.split_at(Q8_SCALE_BYTES.min(r.len()));
        (head.try_into().map_or(0.0, f32::from_le_bytes), body)
    }

    /// True for a row of no numbers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `j` as `f32`.
    pub fn get(&self, j: usize) -> f32 {
        match self {
            Row::F32(r) => r[j],
            Row::F16(r) => r[j].to_f32(),
            Row::Q8(r) => {
                let (scale, q) = Self::q8_parts(r);
                scale * f32::from(q[j] as i8)
            }
        }
    }

    /// The elements as `f32`, one by one (for reference code; hot paths use [`Row::dot`] or
    /// [`Row::extend_into`]).
    pub fn iter(&self) -> impl Iterator<Item = f32> + '_ {
        (0..self.len()).map(|j| self.get(j))
    }

    /// Inner product with `q` in `f32` (the shorter length wins), as [`dot`].
    #[inline]
    pub fn dot(&self, q: &[f32]) -> f32 {
        match self {
            Row::F32(r) => dot(q, r),
            Row::F16(r) => {
                let n = q.len().min(r.len());
                let mut acc = 0.0f32;
                let mut buf = [0f32; 16];
                for (qs, rs) in q[..n].chunks(16).zip(r[..n].chunks(16)) {
                    rs.convert_to_f32_slice(&mut buf[..rs.len()]);
                    acc += dot(qs, &buf[..rs.len()]);
                }
                acc
            }
            Row::Q8(r) => {
                let (scale, body) = Self::q8_parts(r);
                scale * q.iter().zip(body).map(|(&x, &b)| x * f32::from(b as i8)).sum::<f32>()
            }
        }
    }

    /// Appends the row to `out` as `f32`.
    pub fn extend_into(&self, out: &mut Vec<f32>) {
        match self {
            Row::F32(r) => out.extend_from_slice(r),
            Row::F16(r) => {
                let start = out.len();
                out.resize(start + r.len(), 0.0);
                r.convert_to_f32_slice(&mut out[start..]);
            }
            Row::Q8(r) => {
                let (scale, body) = Self::q8_parts(r);
                out.extend(body.iter().map(|&b| scale * f32::from(b as i8)));
            }
        }
    }

    /// The row as a new `f32` vector.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_into(&mut v);
        v
    }
}

/// Read access to `len()` rows of `dim()` numbers, addressed by token position.
pub trait RowSource: Sync {
    /// Numbers per row.
    fn dim(&self) -> usize;
    /// Number of rows.
    fn len(&self) -> usize;
    /// Precision the rows are stored in: every [`RowSource::row`] has this variant.
    fn dtype(&self) -> KvDtype;
    /// Row `i`. Panics if `i >= len()`; callers check ids with [`RowSource::check_id`].
    fn row(&self, i: usize) -> Row<'_>;
    /// Row `i` and the rows after it that are stored right behind it, as one slice of whole
    /// rows (a page's rest, for a paged source), so a reader of consecutive rows finds their
    /// storage once per run instead of once per row. Only where the precision stores rows back to
    /// back in one slice (`f32`, `f16`); a `q8` row, and any row of a source without runs, comes
    /// alone ([`RowSource::row`], the default). Panics like [`RowSource::row`].
    fn run(&self, i: usize) -> Row<'_> {
        self.row(i)
    }
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
    fn dtype(&self) -> KvDtype {
        KvDtype::F32
    }
    fn row(&self, i: usize) -> Row<'_> {
        Row::F32(&self.data[i * self.dim..(i + 1) * self.dim])
    }
    fn run(&self, i: usize) -> Row<'_> {
        assert!(i < self.len(), "row {i} out of range ({} rows)", self.len());
        Row::F32(&self.data[i * self.dim..])
    }
}

/// Owned rows kept in fixed-size pages of `page_size` rows, so growth never copies old rows
/// and a page is the unit a storage tier moves. Rows are stored at one [`KvDtype`]. A full page
/// can leave RAM for a [`PageSpill`] tier ([`PagedRows::spill_page`]) and is then read in place from
/// its map; readers see no difference.
#[derive(Debug, Clone)]
pub struct PagedRows {
    dim: usize,
    page_size: usize,
    pages: Pages,
    len: usize,
}

/// The pages of a [`PagedRows`], at their stored precision; the last page may be partly filled.
#[derive(Debug, Clone)]
pub enum Pages {
    /// `f32` pages.
    F32(Vec<PageBuf<f32>>),
    /// `f16` pages.
    F16(Vec<PageBuf<f16>>),
    /// `q8` pages: rows of [`KvDtype::row_bytes`] bytes.
    Q8(Vec<PageBuf<u8>>),
}

impl Pages {
    /// Pages held.
    pub fn count(&self) -> usize {
        match self {
            Pages::F32(p) => p.len(),
            Pages::F16(p) => p.len(),
            Pages::Q8(p) => p.len(),
        }
    }

    /// True when page `i` is in RAM (false past the end).
    pub fn is_host(&self, i: usize) -> bool {
        match self {
            Pages::F32(p) => p.get(i).is_some_and(PageBuf::is_host),
            Pages::F16(p) => p.get(i).is_some_and(PageBuf::is_host),
            Pages::Q8(p) => p.get(i).is_some_and(PageBuf::is_host),
        }
    }

    /// The precision the pages hold.
    pub fn dtype(&self) -> KvDtype {
        match self {
            Pages::F32(_) => KvDtype::F32,
            Pages::F16(_) => KvDtype::F16,
            Pages::Q8(_) => KvDtype::Q8,
        }
    }
}

impl PagedRows {
    /// Empty `f32` storage for rows of `dim` floats in pages of `page_size` rows.
    pub fn new(dim: usize, page_size: usize) -> Result<Self> {
        Self::with_dtype(dim, page_size, KvDtype::F32)
    }

    /// Empty storage for rows of `dim` numbers in pages of `page_size` rows, stored as `dtype`.
    pub fn with_dtype(dim: usize, page_size: usize, dtype: KvDtype) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be at least 1"));
        }
        if page_size == 0 {
            return Err(Error::invalid("page_size", "must be at least 1"));
        }
        let pages = match dtype {
            KvDtype::F32 => Pages::F32(Vec::new()),
            KvDtype::F16 => Pages::F16(Vec::new()),
            KvDtype::Q8 => Pages::Q8(Vec::new()),
        };
        Ok(Self { dim, page_size, pages, len: 0 })
    }

    /// Rows per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Page elements per row: the numbers of a row, or the bytes of a `q8` row.
    pub fn stride(&self) -> usize {
        let dtype = self.pages.dtype();
        dtype.row_bytes(self.dim) / dtype.bytes()
    }

    /// The pages; the last one may be partly filled (see [`RowSource::len`]).
    pub fn pages(&self) -> &Pages {
        &self.pages
    }

    /// Appends one row and returns its position. Rejects wrong lengths, non-finite values, and
    /// values an `f16` store cannot hold.
    pub fn push(&mut self, row: &[f32]) -> Result<u32> {
        check_len("PagedRows::push row", self.dim, row.len())?;
        check_finite("PagedRows::push row", row)?;
        let id = u32::try_from(self.len).map_err(|_| Error::invalid("len", "more than u32::MAX rows"))?;
        let (slot, d, ps) = (self.len % self.page_size, self.dim, self.page_size);
        let span = slot * d..(slot + 1) * d;
        let missing = || Error::invalid("page", "missing");
        match &mut self.pages {
            Pages::F32(pages) => {
                if slot == 0 {
                    pages.push(PageBuf::host(vec![0.0; ps * d].into_boxed_slice()));
                }
                let page = pages.last_mut().ok_or_else(missing)?;
                page.make_host();
                page.host_mut().ok_or_else(missing)?[span].copy_from_slice(row);
            }
            Pages::F16(pages) => {
                if let Some((i, &x)) = row.iter().enumerate().find(|(_, x)| x.abs() > f16::MAX.to_f32()) {
                    return Err(Error::invalid(
                        "kv",
                        format!("row {id} holds {x} at column {i}, beyond f16's range (±65504): store this KV as f32"),
                    ));
                }
                if slot == 0 {
                    pages.push(PageBuf::host(vec![f16::ZERO; ps * d].into_boxed_slice()));
                }
                let page = pages.last_mut().ok_or_else(missing)?;
                page.make_host();
                page.host_mut().ok_or_else(missing)?[span].convert_from_f32_slice(row);
            }
            Pages::Q8(pages) => {
                let rb = KvDtype::Q8.row_bytes(d);
                if slot == 0 {
                    pages.push(PageBuf::host(vec![0u8; ps * rb].into_boxed_slice()));
                }
                let page = pages.last_mut().ok_or_else(missing)?;
                page.make_host();
                quantize_q8(row, &mut page.host_mut().ok_or_else(missing)?[slot * rb..(slot + 1) * rb]);
            }
        }
        self.len += 1;
        Ok(id)
    }

    /// Appends every row of a row-major slice.
    pub fn extend_from_slice(&mut self, rows: &[f32]) -> Result<()> {
        let view = Rows::new("PagedRows::extend_from_slice", rows, self.dim)?;
        for row in view.as_slice().chunks_exact(self.dim) {
            self.push(row)?;
        }
        Ok(())
    }

    /// The same rows stored as `dtype` (a clone when already so); errors as [`PagedRows::push`]
    /// on values `dtype` cannot hold.
    pub fn to_dtype(&self, dtype: KvDtype) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let mut out = Self::with_dtype(self.dim, self.page_size, dtype)?;
        let mut row = Vec::with_capacity(self.dim);
        for i in 0..self.len {
            row.clear();
            self.row(i).extend_into(&mut row);
            out.push(&row)?;
        }
        Ok(out)
    }

    /// Drops every row after the first `len` (used to roll back a speculative step).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            let keep = len.div_ceil(self.page_size);
            match &mut self.pages {
                Pages::F32(p) => p.truncate(keep),
                Pages::F16(p) => p.truncate(keep),
                Pages::Q8(p) => p.truncate(keep),
            }
        }
    }

    /// Bytes held on every tier, counting whole pages.
    pub fn bytes(&self) -> usize {
        self.pages.count() * self.page_bytes()
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_size * self.dtype().row_bytes(self.dim)
    }

    /// Bytes held in RAM (the host tier), counting whole pages.
    pub fn host_bytes(&self) -> usize {
        (0..self.pages.count()).filter(|&i| self.pages.is_host(i)).count() * self.page_bytes()
    }

    /// Pages that are full, so never written again: the ones that may leave RAM.
    pub fn full_pages(&self) -> usize {
        self.len / self.page_size
    }

    /// Moves full page `i` from RAM to `spill`; returns whether it moved (a page already on
    /// disk, or the page still being filled, stays where it is).
    pub fn spill_page(&mut self, i: usize, spill: &mut dyn PageSpill) -> Result<bool> {
        if i >= self.full_pages() || !self.pages.is_host(i) {
            return Ok(false);
        }
        match &mut self.pages {
            Pages::F32(p) => p[i] = p[i].spilled_to(spill)?,
            Pages::F16(p) => p[i] = p[i].spilled_to(spill)?,
            Pages::Q8(p) => p[i] = p[i].spilled_to(spill)?,
        }
        Ok(true)
    }

    /// Rows read in place from pages of a mapped file (a loaded context): `len` rows of `dim`
    /// numbers in pages of `page_size` rows, every page full but the last, which may hold only
    /// its rows. A partly filled last page is copied into RAM (appending writes to it).
    pub fn from_pages(dim: usize, page_size: usize, mut pages: Pages, len: usize) -> Result<Self> {
        let mut rows = Self::with_dtype(dim, page_size, pages.dtype())?;
        let stride = rows.stride();
        let (count, per_page) = (pages.count(), page_size * stride);
        let last_rows = len - len.saturating_sub(1) / page_size * page_size;
        let fits = |i: usize, n: usize| n == per_page || (i + 1 == count && n == last_rows * stride);
        let sizes_ok = match &pages {
            Pages::F32(p) => p.iter().enumerate().all(|(i, b)| fits(i, b.len())),
            Pages::F16(p) => p.iter().enumerate().all(|(i, b)| fits(i, b.len())),
            Pages::Q8(p) => p.iter().enumerate().all(|(i, b)| fits(i, b.len())),
        };
        if count != len.div_ceil(page_size) || !sizes_ok {
            return Err(Error::invalid(
                "pages",
                format!("{count} pages do not hold {len} rows of {dim} numbers in pages of {page_size} rows"),
            ));
        }
        fn pad<T: bytemuck::Pod>(p: &mut [PageBuf<T>], per_page: usize) {
            if let Some(last) = p.last_mut()
                && last.len() < per_page
            {
                let mut full = vec![T::zeroed(); per_page];
                full[..last.len()].copy_from_slice(last);
                *last = PageBuf::host(full.into_boxed_slice());
            }
        }
        match &mut pages {
            Pages::F32(p) => pad(p, per_page),
            Pages::F16(p) => pad(p, per_page),
            Pages::Q8(p) => pad(p, per_page),
        }
        rows.pages = pages;
        rows.len = len;
        Ok(rows)
    }
}

impl RowSource for PagedRows {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> KvDtype {
        self.pages.dtype()
    }
    fn row(&self, i: usize) -> Row<'_> {
        assert!(i < self.len, "row {i} out of range ({} rows)", self.len);
        let (p, s, stride) = (i / self.page_size, i % self.page_size, self.stride());
        let span = s * stride..(s + 1) * stride;
        match &self.pages {
            Pages::F32(pages) => Row::F32(&pages[p][span]),
            Pages::F16(pages) => Row::F16(&pages[p][span]),
            Pages::Q8(pages) => Row::Q8(&pages[p][span]),
        }
    }

    fn run(&self, i: usize) -> Row<'_> {
        assert!(i < self.len, "row {i} out of range ({} rows)", self.len);
        let (p, s, stride) = (i / self.page_size, i % self.page_size, self.stride());
        let end = self.page_size.min(self.len - p * self.page_size);
        let span = s * stride..end * stride;
        match &self.pages {
            Pages::F32(pages) => Row::F32(&pages[p][span]),
            Pages::F16(pages) => Row::F16(&pages[p][span]),
            Pages::Q8(_) => self.row(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run(i)` is row `i` and the rows stored behind it in its page (up to the last row), the
    /// same memory `row` gives each; a `q8` row comes alone.
    #[test]
    fn runs_are_the_rows_stored_behind_a_row() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
            let mut p = PagedRows::with_dtype(4, 3, dtype).unwrap();
            for i in 0..13 {
                p.push(&[i as f32, -1.5 * i as f32, 0.25, 7.0]).unwrap();
            }
            for i in 0..13 {
                let rows = if dtype == KvDtype::Q8 { 1 } else { (3 - i % 3).min(13 - i) };
                let (run, row) = (p.run(i), p.row(i));
                let (start, len, want) = match (run, row) {
                    (Row::F32(a), Row::F32(b)) => (a.as_ptr() == b.as_ptr(), a.len(), rows * b.len()),
                    (Row::F16(a), Row::F16(b)) => (a.as_ptr() == b.as_ptr(), a.len(), rows * b.len()),
                    (Row::Q8(a), Row::Q8(b)) => (a.as_ptr() == b.as_ptr(), a.len(), rows * b.len()),
                    _ => (false, 0, 1),
                };
                assert!(start && len == want, "{dtype} run({i}): {len} elements, want {want}");
            }
        }
    }

    #[test]
    fn paged_rows_cross_page_boundaries() {
        let mut p = PagedRows::new(3, 2).unwrap();
        for i in 0..5 {
            let id = p.push(&[i as f32, 1.0, 2.0]).unwrap();
            assert_eq!(id, i);
        }
        assert_eq!(p.len(), 5);
        assert_eq!(p.pages().count(), 3);
        assert_eq!(p.row(4).to_vec(), [4.0, 1.0, 2.0]);
        p.truncate(3);
        assert_eq!(p.pages().count(), 2);
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

    #[test]
    fn f16_rows_round_to_half_precision_and_reject_what_it_cannot_hold() {
        let mut p = PagedRows::with_dtype(37, 4, KvDtype::F16).unwrap();
        let rows: Vec<Vec<f32>> =
            (0..9).map(|r| (0..37).map(|j| ((r * 37 + j) as f32 * 0.731).sin() * 300.0).collect()).collect();
        for r in &rows {
            p.push(r).unwrap();
        }
        assert_eq!((p.dtype(), p.pages().count(), p.bytes()), (KvDtype::F16, 3, 3 * 4 * 37 * 2));
        let q: Vec<f32> = (0..37).map(|j| (j as f32 * 0.3).cos()).collect();
        for (i, r) in rows.iter().enumerate() {
            let got = p.row(i).to_vec();
            for (a, b) in got.iter().zip(r) {
                assert!((a - b).abs() <= b.abs() * 2f32.powi(-11) + 1e-7, "row {i}: {a} vs {b}");
            }
            // `dot` over the stored row equals the f64 dot of its f32 expansion, at every tail.
            for n in [0, 1, 15, 16, 17, 37] {
                let exact: f64 = got[..n].iter().zip(&q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                assert!((f64::from(p.row(i).dot(&q[..n])) - exact).abs() < 1e-3, "row {i} n {n}");
            }
        }
        let mut big = rows[0].clone();
        big[5] = 7.0e4;
        let err = p.push(&big).unwrap_err().to_string();
        assert!(err.contains("f16") && err.contains("column 5"), "{err}");
        assert_eq!(p.len(), 9, "a rejected row is not stored");
        let wide = p.to_dtype(KvDtype::F32).unwrap();
        assert_eq!(wide.dtype(), KvDtype::F32);
        assert!((0..9).all(|i| wide.row(i).to_vec() == p.row(i).to_vec()), "f16 → f32 is exact");
        let back = wide.to_dtype(KvDtype::F16).unwrap();
        assert!((0..9).all(|i| back.row(i).to_vec() == p.row(i).to_vec()), "and back again");
        assert_eq!("F16".parse::<KvDtype>().unwrap(), KvDtype::F16);
        assert!("q4".parse::<KvDtype>().is_err());
    }

    #[test]
    fn q8_rows_hold_each_number_within_half_a_step_and_read_back_alike_every_way() {
        let mut p = PagedRows::with_dtype(37, 4, KvDtype::Q8).unwrap();
        let rows: Vec<Vec<f32>> = (0..9)
            .map(|r| (0..37).map(|j| ((r * 37 + j) as f32 * 0.731).sin() * (r as f32 + 0.5) * 40.0).collect())
            .collect();
        let zero = vec![0.0f32; 37];
        for r in rows.iter().chain([&zero]) {
            p.push(r).unwrap();
        }
        assert_eq!((p.dtype(), p.pages().count(), p.bytes()), (KvDtype::Q8, 3, 3 * 4 * (37 + 4)));
        assert_eq!((p.stride(), p.row(0).len()), (41, 37));
        let q: Vec<f32> = (0..37).map(|j| (j as f32 * 0.3).cos()).collect();
        for (i, r) in rows.iter().enumerate() {
            let got = p.row(i).to_vec();
            let step = r.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (j, (a, b)) in got.iter().zip(r).enumerate() {
                assert!((a - b).abs() <= step * 0.5 * (1.0 + 1e-5), "row {i} col {j}: {a} vs {b}, step {step}");
                assert_eq!(p.row(i).get(j), *a);
            }
            let exact: f64 = got.iter().zip(&q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            assert!((f64::from(p.row(i).dot(&q)) - exact).abs() < 1e-3 * exact.abs().max(1.0), "row {i}");
        }
        assert_eq!(p.row(9).to_vec(), zero, "an all-zero row has scale 0 and reads back as zeros");
        let wide = p.to_dtype(KvDtype::F32).unwrap();
        assert!((0..10).all(|i| wide.row(i).to_vec() == p.row(i).to_vec()), "q8 → f32 is exact");
        let back = wide.to_dtype(KvDtype::Q8).unwrap();
        assert!((0..10).all(|i| back.row(i).to_vec() == p.row(i).to_vec()), "and back again");
        assert_eq!("Q8".parse::<KvDtype>().unwrap(), KvDtype::Q8);
        assert_eq!(KvDtype::Q8.to_string(), "q8");
    }

    #[test]
    fn spilled_pages_read_as_before_and_a_truncated_spilled_page_is_written_in_ram() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
            let row = |i: usize| -> Vec<f32> { (0..5).map(|j| ((i * 5 + j) as f32 * 0.37).sin()).collect() };
            let mut p = PagedRows::with_dtype(5, 4, dtype).unwrap();
            (0..11).for_each(|i| assert_eq!(p.push(&row(i)).unwrap(), i as u32));
            let before: Vec<Vec<f32>> = (0..11).map(|i| p.row(i).to_vec()).collect();
            let mut spill = crate::page::tests::Spill::default();
            let moved: Vec<bool> = [0, 1, 2, 0].iter().map(|&i| p.spill_page(i, &mut spill).unwrap()).collect();
            assert_eq!(
                moved,
                [true, true, false, false],
                "the page being filled stays, a spilled one is not spilled again"
            );
            assert_eq!(spill.0, 2);
            assert_eq!((p.host_bytes(), p.bytes()), (p.page_bytes(), 3 * p.page_bytes()));
            assert!((0..11).all(|i| p.row(i).to_vec() == before[i]), "{dtype}");
            p.truncate(6);
            p.push(&row(99)).unwrap();
            assert!(p.pages().is_host(1), "a spilled page written again comes back into RAM");
            assert_eq!(
                p.row(6).to_vec(),
                PagedRows::with_dtype(5, 4, dtype)
                    .map(|mut q| {
                        q.push(&row(99)).unwrap();
                        q.row(0).to_vec()
                    })
                    .unwrap()
            );
            assert!((0..6).all(|i| p.row(i).to_vec() == before[i]));
            let clone = p.clone();
            assert!((0..7).all(|i| clone.row(i).to_vec() == p.row(i).to_vec()));
        }
    }

    #[test]
    fn from_pages_takes_a_short_last_page_and_rejects_pages_that_do_not_fit() {
        let page = |n: usize, x: f32| PageBuf::host(vec![x; n].into_boxed_slice());
        let p = PagedRows::from_pages(2, 4, Pages::F32(vec![page(8, 1.0), page(2, 2.0)]), 5).unwrap();
        assert_eq!((p.len(), p.row(4).to_vec(), p.pages().count()), (5, vec![2.0, 2.0], 2));
        let mut p = p;
        p.push(&[3.0, 3.0]).unwrap();
        assert_eq!(p.row(5).to_vec(), [3.0, 3.0]);
        for (pages, len) in
            [(vec![page(8, 1.0), page(4, 2.0)], 5), (vec![page(6, 1.0), page(2, 2.0)], 5), (vec![page(8, 1.0)], 5)]
        {
            assert!(PagedRows::from_pages(2, 4, Pages::F32(pages), len).is_err());
        }
        // q8 pages hold rows of 2 + 4 bytes.
        let bytes = |n: usize| PageBuf::host(vec![0u8; n].into_boxed_slice());
        let p = PagedRows::from_pages(2, 4, Pages::Q8(vec![bytes(24), bytes(6)]), 5).unwrap();
        assert_eq!((p.dtype(), p.len(), p.row(4).to_vec()), (KvDtype::Q8, 5, vec![0.0, 0.0]));
        assert!(PagedRows::from_pages(2, 4, Pages::Q8(vec![bytes(8), bytes(2)]), 5).is_err(), "f32-sized");
    }
}
