//! The page, the unit a tier holds and moves: owned in RAM (the host tier) or a view into a
//! memory-mapped file (the disk tier: a spill file, or a loaded context file read in place).

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// One page of numbers. Reading it is the same on every tier ([`Deref`] to `[T]`); only a
/// host page can be written ([`PageBuf::host_mut`]).
pub struct PageBuf<T> {
    repr: Repr<T>,
}

enum Repr<T> {
    Host(Box<[T]>),
    /// `len` elements of `T` at byte `offset` of `map`, checked in bounds and aligned when made.
    Mapped {
        map: Arc<Mmap>,
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

    /// A page read in place from `map`: `len` elements at byte `offset`. Errors when the range
    /// lies outside the map or is not aligned for `T`.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).and_then(|b| Some(offset..offset.checked_add(b)?));
        let ok = bytes
            .as_ref()
            .and_then(|r| map.get(r.clone()))
            .is_some_and(|b| bytemuck::try_cast_slice::<u8, T>(b).is_ok());
        if !ok {
            return Err(Error::BadPage {
                reason: format!(
                    "{len} elements of {} bytes at byte {offset} of a {}-byte map",
                    size_of::<T>(),
                    map.len()
                ),
            });
        }
        Ok(Self { repr: Repr::Mapped { map, offset, len, _t: PhantomData } })
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
            // In bounds and aligned: checked in `PageBuf::mapped`, and the map never changes.
            Repr::Mapped { map, offset, len, .. } => {
                bytemuck::cast_slice(&map[*offset..*offset + len * size_of::<T>()])
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
mod tests {
    use super::*;

    fn map_of(bytes: &[u8]) -> Arc<Mmap> {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        Arc::new(unsafe { Mmap::map(&f) }.unwrap())
    }

    #[test]
    fn mapped_pages_read_what_host_pages_hold_and_reject_bad_ranges() {
        let data: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let map = map_of(bytemuck::cast_slice(&data));
        let page = PageBuf::<f32>::mapped(map.clone(), 16 * 4, 32).unwrap();
        assert_eq!(&page[..], &data[16..48]);
        assert!(!page.is_host());
        let mut copy = page.clone();
        assert!(copy.host_mut().is_none());
        copy.make_host();
        copy.host_mut().unwrap()[0] = -1.0;
        assert_eq!((copy[0], page[0]), (-1.0, 8.0), "a page brought into RAM is a copy");
        assert!(PageBuf::<f32>::mapped(map.clone(), 2, 4).is_err(), "misaligned");
        assert!(PageBuf::<f32>::mapped(map.clone(), 0, 65).is_err(), "past the end");
        assert!(PageBuf::<f32>::mapped(map, usize::MAX - 3, 1).is_err(), "overflow");
    }
}
