//! The page, the unit a KV storage tier holds and moves: owned in RAM (the host tier) or a view
//! into bytes held elsewhere (the disk tier: a memory-mapped spill file, or a loaded context file
//! read in place).
//!
//! The maps belong to the storage crate (needle-kv); this module knows them only as
//! [`PageBytes`], and a tier that takes pages out of RAM only as a [`PageSpill`], so the
//! contracts build without memmap2 or any OS-specific code.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Immutable bytes that pages are read from in place (a memory map, or any buffer).
///
/// [`PageBytes::bytes`] must return the same slice (address and length) on every call: a
/// [`PageBuf`] checks its range and alignment once, when it is made, and panics when read if the
/// bytes have moved. Every `AsRef<[u8]>` type that is `Send + Sync` is one (`memmap2::Mmap`,
/// `Vec<u8>`, `Box<[u8]>`): behind the `Arc` a page holds, nothing can move them.
pub trait PageBytes: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

impl<B: AsRef<[u8]> + Send + Sync + ?Sized> PageBytes for B {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Where full pages go when they leave RAM (needle-kv's `SpillFile`: written once to a file and
/// mapped back). See [`PagedRows::spill_page`](crate::PagedRows::spill_page).
pub trait PageSpill {
    /// Stores one page's `bytes` and returns what reads them back: the bytes they now lie in and
    /// the offset of their first byte there, aligned for any `T` up to 64 bytes. An error (a
    /// full tier, a failed write) is an [`Error::Storage`] naming the tier.
    fn spill(&mut self, bytes: &[u8]) -> Result<(Arc<dyn PageBytes>, usize)>;
}

/// One page of numbers. Reading it is the same on every tier ([`Deref`] to `[T]`); only a
/// host page can be written ([`PageBuf::host_mut`]).
pub struct PageBuf<T> {
    repr: Repr<T>,
}

enum Repr<T> {
    Host(Box<[T]>),
    /// `len` elements of `T` at byte `offset` of `map`, checked in bounds and aligned when made.
    Mapped {
        map: Arc<dyn PageBytes>,
        offset: usize,
        len: usize,
        _t: PhantomData<T>,
    },
}

impl<T: bytemuck::Pod> PageBuf<T> {
    /// A page in RAM.
    pub fn host(data: Box<[T]>) -> Self {
        Self { repr: Repr::Host(data) }
    }

    /// A page read in place from `map`: `len` elements at byte `offset`. Errors (naming
    /// `page`) when the range lies outside the map or is not aligned for `T`.
    pub fn mapped(map: Arc<dyn PageBytes>, offset: usize, len: usize) -> Result<Self> {
        let bytes = map.bytes();
        let range = len.checked_mul(size_of::<T>()).and_then(|b| Some(offset..offset.checked_add(b)?));
        let ok = range.and_then(|r| bytes.get(r)).is_some_and(|b| bytemuck::try_cast_slice::<u8, T>(b).is_ok());
        if !ok {
            return Err(Error::invalid(
                "page",
                format!(
                    "{len} elements of {} bytes at byte {offset} of a {}-byte map (out of bounds or misaligned)",
                    size_of::<T>(),
                    bytes.len()
                ),
            ));
        }
        Ok(Self { repr: Repr::Mapped { map, offset, len, _t: PhantomData } })
    }

    /// The page moved to `spill` (a mapped page reading the same numbers); `self` is unchanged.
    pub fn spilled_to(&self, spill: &mut dyn PageSpill) -> Result<Self> {
        let (map, offset) = spill.spill(bytemuck::cast_slice::<T, u8>(self))?;
        Self::mapped(map, offset, self.len())
    }

    /// True for a page in RAM.
    pub fn is_host(&self) -> bool {
        matches!(self.repr, Repr::Host(_))
    }

    /// The page's numbers, writable, when it is in RAM.
    pub fn host_mut(&mut self) -> Option<&mut [T]> {
        match &mut self.repr {
            Repr::Host(b) => Some(b),
            Repr::Mapped { .. } => None,
        }
    }

    /// Brings a mapped page into RAM (a copy); a host page is left as it is.
    pub fn make_host(&mut self) {
        if !self.is_host() {
            self.repr = Repr::Host(Box::from(&self[..]));
        }
    }

    /// Bytes of the page.
    pub fn bytes(&self) -> usize {
        self.len() * size_of::<T>()
    }
}

impl<T: bytemuck::Pod> Deref for PageBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Host(b) => b,
            // In bounds and aligned: checked in `PageBuf::mapped`, and `PageBytes` promises the
            // bytes never move.
            Repr::Mapped { map, offset, len, .. } => {
                bytemuck::cast_slice(&map.bytes()[*offset..*offset + len * size_of::<T>()])
            }
        }
    }
}

impl<T: Clone> Clone for PageBuf<T> {
    fn clone(&self) -> Self {
        let repr = match &self.repr {
            Repr::Host(b) => Repr::Host(b.clone()),
            Repr::Mapped { map, offset, len, .. } => {
                Repr::Mapped { map: map.clone(), offset: *offset, len: *len, _t: PhantomData }
            }
        };
        Self { repr }
    }
}

impl<T> fmt::Debug for PageBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Host(b) => write!(f, "PageBuf::Host({} elements)", b.len()),
            Repr::Mapped { offset, len, .. } => write!(f, "PageBuf::Mapped({len} elements at byte {offset})"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes aligned for any `T` up to 8 bytes, as a map's are (to its OS page).
    struct Aligned(Vec<u64>);

    impl AsRef<[u8]> for Aligned {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }

    fn bytes_of(data: &[f32]) -> Arc<dyn PageBytes> {
        let mut words = vec![0u64; (data.len() * 4).div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..data.len() * 4].copy_from_slice(bytemuck::cast_slice(data));
        Arc::new(Aligned(words))
    }

    #[test]
    fn mapped_pages_read_what_host_pages_hold_and_reject_bad_ranges() {
        let data: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let map = bytes_of(&data);
        let page = PageBuf::<f32>::mapped(map.clone(), 16 * 4, 32).unwrap();
        assert_eq!(&page[..], &data[16..48]);
        assert!(!page.is_host());
        let mut copy = page.clone();
        assert!(copy.host_mut().is_none());
        copy.make_host();
        copy.host_mut().unwrap()[0] = -1.0;
        assert_eq!((copy[0], page[0]), (-1.0, 8.0), "a page brought into RAM is a copy");
        for (offset, len, why) in [(2, 4, "misaligned"), (0, 65, "past the end"), (usize::MAX - 3, 1, "overflow")] {
            let err = PageBuf::<f32>::mapped(map.clone(), offset, len).unwrap_err();
            assert!(matches!(&err, Error::InvalidParameter { name, .. } if name == "page"), "{why}: {err}");
        }
    }

    /// A spill tier in RAM (counting its pages): each page in bytes of its own, at an offset, to
    /// check that the offset is honoured.
    #[derive(Default)]
    pub(crate) struct Spill(pub(crate) usize);

    impl PageSpill for Spill {
        fn spill(&mut self, bytes: &[u8]) -> Result<(Arc<dyn PageBytes>, usize)> {
            self.0 += 1;
            let mut words = vec![0u64; 8 + bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[64..64 + bytes.len()].copy_from_slice(bytes);
            Ok((Arc::new(Aligned(words)), 64))
        }
    }

    #[test]
    fn a_spilled_page_reads_the_same_numbers_from_its_tier() {
        let host = PageBuf::host((0..10u8).collect::<Vec<_>>().into_boxed_slice());
        let mut spill = Spill::default();
        let moved = host.spilled_to(&mut spill).unwrap();
        assert_eq!((spill.0, moved.is_host(), &moved[..]), (1, false, &host[..]));
        assert_eq!(moved.bytes(), 10);
    }
}
