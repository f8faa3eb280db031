//! The binary form of built state (`save_state` / `load_state`): little-endian, an 8-byte kind
//! tag and a `u32` format version first, then fields; arrays are a `u64` length followed by
//! their elements, read back by bulk copies.
//!
//! needle-select and the index crates write their states with it.

use crate::error::{Error, Result};

/// Bytes of the tag and version at the start of every state.
pub const HEADER_LEN: usize = 12;

fn tag_text(tag: &[u8]) -> String {
    tag.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}

/// Appends fields of one state to a buffer.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Starts a state of kind `tag` in format `version`.
    pub fn new(out: &'a mut Vec<u8>, tag: &[u8; 8], version: u32) -> Self {
        out.extend_from_slice(tag);
        out.extend_from_slice(&version.to_le_bytes());
        Self { out }
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    /// Appends a flag as one byte.
    pub fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u128`.
    pub fn u128(&mut self, v: u128) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a length (as `u64`).
    pub fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }
    /// Appends an `f32`.
    pub fn f32(&mut self, v: f32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends length-prefixed bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.out.extend_from_slice(v);
    }
    /// Appends a length-prefixed UTF-8 string.
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// Appends a length-prefixed `u32` array.
    pub fn u32s(&mut self, v: &[u32]) {
        self.len(v.len());
        if cfg!(target_endian = "little") {
            self.out.extend_from_slice(bytemuck::cast_slice(v));
        } else {
            v.iter().for_each(|x| self.out.extend_from_slice(&x.to_le_bytes()));
        }
    }
    /// Appends a length-prefixed `f32` array.
    pub fn f32s(&mut self, v: &[f32]) {
        self.len(v.len());
        if cfg!(target_endian = "little") {
            self.out.extend_from_slice(bytemuck::cast_slice(v));
        } else {
            v.iter().for_each(|x| self.out.extend_from_slice(&x.to_le_bytes()));
        }
    }
    /// A nested state (another object's `save_state`), length-prefixed.
    pub fn nested(&mut self, save: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<()> {
        let at = self.out.len();
        self.u64(0);
        save(self.out)?;
        let n = (self.out.len() - at - 8) as u64;
        self.out[at..at + 8].copy_from_slice(&n.to_le_bytes());
        Ok(())
    }
}

/// Reads the fields of one state, checking every length against the bytes left and its bound.
pub struct Reader<'a> {
    kind: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the header: tag `tag` (the kind `kind`) and format `version`.
    pub fn new(kind: &'static str, state: &'a [u8], tag: &[u8; 8], version: u32) -> Result<Self> {
        Self::with_versions(kind, state, tag, version..=version).map(|(r, _)| r)
    }

    /// Checks the header as [`Reader::new`] does, accepting any format version in `versions`
    /// (a kind whose newer format still reads the older ones); returns the version found.
    pub fn with_versions(
        kind: &'static str,
        state: &'a [u8],
        tag: &[u8; 8],
        versions: std::ops::RangeInclusive<u32>,
    ) -> Result<(Self, u32)> {
        let (oldest, version) = (*versions.start(), *versions.end());
        let mut r = Self { kind, buf: state };
        if state.len() < HEADER_LEN {
            return Err(r.fail("header", format!("{} bytes, shorter than the {HEADER_LEN}-byte header", state.len())));
        }
        let found = r.take("tag", 8)?;
        if found != tag {
            return Err(r.fail(
                "tag",
                format!(
                    "found `{}`, expected `{}`: the state of another kind of selector or index",
                    tag_text(found),
                    tag_text(tag)
                ),
            ));
        }
        let v = r.u32("version")?;
        if v > version {
            return Err(r.fail("version", format!("format version {v} is newer than this build reads ({version})")));
        }
        if v < oldest {
            let reads = if oldest == version { format!("{version}") } else { format!("{oldest} to {version}") };
            return Err(r.fail("version", format!("format version {v} is not one this build reads ({reads})")));
        }
        Ok((r, v))
    }

    /// An [`Error::Corrupt`] naming this kind and `field`.
    pub fn fail(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::Corrupt { what: format!("{} state ({field})", self.kind), reason: reason.into() }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, field: &str, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(self.fail(field, format!("needs {n} bytes, {} left: truncated", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    /// Reads a byte.
    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Reads a flag byte (0 or 1).
    pub fn bool(&mut self, field: &str) -> Result<bool> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.fail(field, format!("flag byte {b} is neither 0 nor 1"))),
        }
    }
    /// Reads a `u32`.
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// Reads a `u128`.
    pub fn u128(&mut self, field: &str) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }
    /// A finite `f32`.
    pub fn f32(&mut self, field: &str) -> Result<f32> {
        let v = f32::from_le_bytes(self.array(field)?);
        if v.is_finite() { Ok(v) } else { Err(self.fail(field, format!("{v} is not finite"))) }
    }
    /// A `u32` that must be `< bound`.
    pub fn u32_below(&mut self, field: &str, bound: usize) -> Result<u32> {
        let v = self.u32(field)?;
        if (v as usize) < bound { Ok(v) } else { Err(self.fail(field, format!("{v} is not below {bound}"))) }
    }
    /// A `u64` length that must be `<= max`.
    pub fn len(&mut self, field: &str, max: usize) -> Result<usize> {
        let v = self.u64(field)?;
        if v > max as u64 {
            return Err(self.fail(field, format!("length {v} exceeds its bound {max}")));
        }
        Ok(v as usize)
    }
    /// The dimension saved in `field`, which must be the index's own `dim`.
    pub fn expect_dim(&mut self, field: &str, dim: usize) -> Result<()> {
        let saved = self.len(field, usize::MAX)?;
        if saved != dim {
            return Err(self.fail(field, format!("saved for dim {saved}, this index has {dim}")));
        }
        Ok(())
    }
    /// The key count saved in `field`, which must be the number of rows of `dim` in `keys` (the
    /// keys a loaded index is given back); returns it.
    pub fn expect_rows(&mut self, field: &str, keys: &[f32], dim: usize) -> Result<usize> {
        let n = crate::index::check_batch("keys", keys, dim)?;
        let saved = self.len(field, usize::MAX)?;
        if saved != n {
            return Err(self.fail(field, format!("{saved} keys saved, {n} key rows given")));
        }
        Ok(n)
    }
    /// The length of an array of `size`-byte elements, at most `max` and within the bytes left:
    /// what may be allocated is bounded by the state's own size.
    fn array_len(&mut self, field: &str, size: usize, max: usize) -> Result<usize> {
        let n = self.len(field, max)?;
        if n.checked_mul(size).is_none_or(|b| b > self.buf.len()) {
            return Err(
                self.fail(field, format!("{n} elements of {size} bytes, {} bytes left: truncated", self.buf.len()))
            );
        }
        Ok(n)
    }
    /// An exact length: the array must hold `n` elements.
    fn exact(&mut self, field: &str, size: usize, n: usize) -> Result<usize> {
        let got = self.array_len(field, size, usize::MAX)?;
        if got != n {
            return Err(self.fail(field, format!("{got} elements where {n} are required")));
        }
        Ok(got)
    }

    /// Reads length-prefixed bytes, at most `max`.
    pub fn bytes(&mut self, field: &str, max: usize) -> Result<&'a [u8]> {
        let n = self.array_len(field, 1, max)?;
        self.take(field, n)
    }
    /// Reads length-prefixed bytes that must number `n`.
    pub fn bytes_exact(&mut self, field: &str, n: usize) -> Result<&'a [u8]> {
        let n = self.exact(field, 1, n)?;
        self.take(field, n)
    }
    /// Reads a length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, field: &str, max: usize) -> Result<&'a str> {
        let b = self.bytes(field, max)?;
        std::str::from_utf8(b).map_err(|e| self.fail(field, format!("not UTF-8: {e}")))
    }
    /// A nested state written by [`Writer::nested`].
    pub fn nested(&mut self, field: &str) -> Result<&'a [u8]> {
        self.bytes(field, usize::MAX)
    }

    fn u32_body(&mut self, field: &str, n: usize) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = bytemuck::pod_collect_to_vec(self.take(field, n * 4)?);
        if cfg!(target_endian = "big") {
            v.iter_mut().for_each(|x| *x = u32::from_le(*x));
        }
        Ok(v)
    }
    fn f32_body(&mut self, field: &str, n: usize) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = bytemuck::pod_collect_to_vec(self.take(field, n * 4)?);
        if cfg!(target_endian = "big") {
            v.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.fail(field, format!("element {i} is {}, not finite", v[i])));
        }
        Ok(v)
    }
    /// Up to `max` `u32`s.
    pub fn u32s(&mut self, field: &str, max: usize) -> Result<Vec<u32>> {
        let n = self.array_len(field, 4, max)?;
        self.u32_body(field, n)
    }
    /// Exactly `n` `u32`s.
    pub fn u32s_exact(&mut self, field: &str, n: usize) -> Result<Vec<u32>> {
        let n = self.exact(field, 4, n)?;
        self.u32_body(field, n)
    }
    /// Up to `max` finite `f32`s.
    pub fn f32s(&mut self, field: &str, max: usize) -> Result<Vec<f32>> {
        let n = self.array_len(field, 4, max)?;
        self.f32_body(field, n)
    }
    /// Exactly `n` finite `f32`s.
    pub fn f32s_exact(&mut self, field: &str, n: usize) -> Result<Vec<f32>> {
        let n = self.exact(field, 4, n)?;
        self.f32_body(field, n)
    }

    /// Errors unless every id is `< bound`.
    pub fn check_below(&self, field: &str, ids: &[u32], bound: usize) -> Result<()> {
        match ids.iter().position(|&x| x as usize >= bound) {
            None => Ok(()),
            Some(i) => Err(self.fail(field, format!("element {i} is {}, not below {bound}", ids[i]))),
        }
    }

    /// Errors unless the whole state was read.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.fail("end", format!("{} bytes left after the last field", self.buf.len())))
        }
    }
}

/// Checks a `load_state` against damaged copies of `state`, for the tests of selectors and
/// indexes (here and in plugin crates): every truncation up to 256 bytes and a strided sample of
/// longer ones must be an [`Error::Corrupt`], and `flips` single-bit flips (a xorshift sequence
/// from `seed`) must either fail or load into something usable. `load` loads one copy into a
/// fresh object and, when that succeeds, uses it (a search, a selection); panics name the copy.
pub fn check_damage(state: &[u8], flips: usize, seed: u64, mut load: impl FnMut(&[u8]) -> Result<()>) {
    let step = (state.len() / 300).max(1);
    for n in (0..state.len().min(256)).chain((256..state.len()).step_by(step)) {
        let r = load(&state[..n]);
        assert!(matches!(r, Err(Error::Corrupt { .. })), "truncated to {n} of {} bytes: {r:?}", state.len());
    }
    if state.is_empty() {
        return;
    }
    let (mut x, mut flipped) = (seed | 1, state.to_vec());
    for _ in 0..flips {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bit = (x % (state.len() as u64 * 8)) as usize;
        flipped[bit / 8] ^= 1 << (bit % 8);
        let _ = load(&flipped);
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_bad_headers_are_named() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out, b"test.kin", 1);
        w.u32(7);
        w.f32s(&[1.5, -2.0]);
        w.u32s(&[3, 4, 5]);
        w.str("abc");
        w.nested(|o| {
            o.extend_from_slice(&[9, 9]);
            Ok(())
        })
        .unwrap();
        let mut r = Reader::new("test", &out, b"test.kin", 1).unwrap();
        assert_eq!(r.u32("a").unwrap(), 7);
        assert_eq!(r.f32s("b", 2).unwrap(), vec![1.5, -2.0]);
        assert_eq!(r.remaining(), (8 + 12) + (8 + 3) + (8 + 2));
        assert_eq!(r.u32s_exact("c", 3).unwrap(), vec![3, 4, 5]);
        assert_eq!(r.str("d", 10).unwrap(), "abc");
        assert_eq!(r.nested("e").unwrap(), &[9, 9]);
        r.finish().unwrap();

        let e = Reader::new("test", &out, b"othr.kin", 1).err().unwrap().to_string();
        assert!(e.contains("another kind") && e.contains("test.kin"), "{e}");
        let mut newer = out.clone();
        newer[8] = 2;
        let e = Reader::new("test", &newer, b"test.kin", 1).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        for n in 0..out.len() {
            let Ok(mut r) = Reader::new("test", &out[..n], b"test.kin", 1) else { continue };
            let ok = (|| {
                r.u32("a")?;
                r.f32s("b", 2)?;
                r.u32s_exact("c", 3)?;
                r.str("d", 10)?;
                r.nested("e")?;
                r.finish()
            })();
            assert!(matches!(ok, Err(Error::Corrupt { .. })), "{n}");
        }
        // A huge length is refused before anything is allocated.
        let mut huge = Vec::new();
        Writer::new(&mut huge, b"test.kin", 1).u64(u64::MAX / 4);
        let mut r = Reader::new("test", &huge, b"test.kin", 1).unwrap();
        assert!(r.u32s("x", usize::MAX).is_err());
    }
}
