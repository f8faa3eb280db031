//! The disk tier and the budgets that decide when pages go there.
//!
//! Pages leave the host tier in whole pages, coldest first (the caller decides which: it knows
//! what its selectors picked), into a [`SpillFile`]: an unnamed temporary file, so nothing is
//! left behind by a process that dies, read back in place through maps of 64 MiB segments.
//! Spilled pages are never written again (a KV page is immutable once full), so the file only
//! grows; its pages come back on demand through the page cache when a selector picks them.

use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use needle_core::{PageBuf, PageBytes, PageSpill};

use crate::error::{Error, Result};

/// Bytes per mapped segment of a spill file (a multiple of every OS page size).
const SEGMENT: usize = 64 << 20;
/// Pages start at this alignment inside a segment (cache lines, and any `T` up to 64 bytes).
const ALIGN: usize = 64;

/// Memory budgets of the KV tiers, as `--kv-budget device=2GiB,host=4GiB,disk=100GiB` gives
/// them; an absent tier is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBudget {
    /// Bytes of KV rows a device backend keeps on the device (all layers together); past it
    /// the device holds each layer's sinks and most recent rows, and the host attends the rest.
    pub device: Option<u64>,
    /// Bytes of KV pages kept in RAM; past it the coldest pages spill to disk.
    pub host: Option<u64>,
    /// Bytes of KV pages the disk tier may hold; past it growing the cache is an error.
    pub disk: Option<u64>,
}

impl TierBudget {
    /// True when no tier is bounded.
    pub fn is_unbounded(&self) -> bool {
        self.device.is_none() && self.host.is_none() && self.disk.is_none()
    }
}

/// Parses `4GiB`, `512MiB`, `100G`, `1.5GiB` or a plain number of bytes (binary units; a
/// `B` is optional).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a size such as 4GiB or 512MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use KiB, MiB, GiB or TiB)")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

impl FromStr for TierBudget {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadBudget { spec: spec.into(), reason };
        let mut budget = TierBudget::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tier, size) =
                part.split_once('=').ok_or_else(|| bad(format!("`{part}` is not tier=size (host=4GiB)")))?;
            let bytes = parse_bytes(size).map_err(bad)?;
            let slot = match tier.trim() {
                "device" => &mut budget.device,
                "host" => &mut budget.host,
                "disk" => &mut budget.disk,
                other => return Err(bad(format!("unknown tier `{other}` (device, host or disk)"))),
            };
            if slot.replace(bytes).is_some() {
                return Err(bad(format!("tier `{}` given twice", tier.trim())));
            }
        }
        Ok(budget)
    }
}

impl fmt::Display for TierBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [("device", self.device), ("host", self.host), ("disk", self.disk)]
            .into_iter()
            .filter_map(|(t, b)| b.map(|b| format!("{t}={b}")))
            .collect();
        if parts.is_empty() { f.write_str("unbounded") } else { f.write_str(&parts.join(",")) }
    }
}

/// The disk tier: pages written once to an unnamed temporary file and read back in place.
pub struct SpillFile {
    file: File,
    dir: PathBuf,
    segments: Vec<Arc<Mmap>>,
    /// Bytes per segment.
    segment: usize,
    /// Bytes used in the last segment.
    tail: usize,
    /// Bytes of pages stored.
    stored: u64,
    limit: Option<u64>,
}

impl SpillFile {
    /// An empty spill file in `dir`, holding at most `limit` bytes of pages.
    pub fn create(dir: &Path, limit: Option<u64>) -> Result<Self> {
        Self::with_segment(dir, limit, SEGMENT)
    }

    /// As [`SpillFile::create`] with segments of `segment` bytes (a multiple of the OS page).
    fn with_segment(dir: &Path, limit: Option<u64>, segment: usize) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(|e| Error::io(dir, "creating a spill file in", e))?;
        Ok(Self { file, dir: dir.to_path_buf(), segments: Vec::new(), segment, tail: segment, stored: 0, limit })
    }

    /// Writes `data` and returns the page that reads it back from the file.
    pub fn store<T: bytemuck::Pod>(&mut self, data: &[T]) -> Result<PageBuf<T>> {
        let (map, at) = self.store_bytes(bytemuck::cast_slice(data))?;
        PageBuf::mapped(map, at, data.len()).map_err(|e| Error::BadPage { reason: e.to_string() })
    }

    /// Writes `bytes` at the next 64-byte boundary; returns the segment's map and their offset in it.
    fn store_bytes(&mut self, bytes: &[u8]) -> Result<(Arc<Mmap>, usize)> {
        if bytes.len() > self.segment {
            return Err(Error::BadPage { reason: format!("a page of {} bytes exceeds a spill segment", bytes.len()) });
        }
        if let Some(limit) = self.limit
            && self.stored + bytes.len() as u64 > limit
        {
            return Err(Error::Budget { tier: "disk", limit, need: self.stored + bytes.len() as u64 - limit });
        }
        let at = self.tail.next_multiple_of(ALIGN);
        if self.segments.is_empty() || at + bytes.len() > self.segment {
            self.grow()?;
        }
        let at = self.tail.next_multiple_of(ALIGN);
        let seg = self.segments.len() - 1;
        let file_at = (seg * self.segment + at) as u64;
        // Seek and write rather than a positioned write (`FileExt`, which differs by OS): only
        // this struct, through `&mut self`, moves the file's cursor.
        self.file
            .seek(SeekFrom::Start(file_at))
            .and_then(|_| self.file.write_all(bytes))
            .map_err(|e| Error::io(&self.dir, "writing a spilled page in", e))?;
        self.tail = at + bytes.len();
        self.stored += bytes.len() as u64;
        Ok((self.segments[seg].clone(), at))
    }

    /// Adds a mapped segment at the end of the file.
    fn grow(&mut self) -> Result<()> {
        let start = (self.segments.len() * self.segment) as u64;
        let io = |e| Error::io(&self.dir, "growing a spill file in", e);
        self.file.set_len(start + self.segment as u64).map_err(io)?;
        // SAFETY: the file is unnamed and only this struct writes to it, never to bytes a page
        // already maps; the map is read-only.
        let map = unsafe { MmapOptions::new().offset(start).len(self.segment).map(&self.file) }.map_err(io)?;
        self.segments.push(Arc::new(map));
        self.tail = 0;
        Ok(())
    }

    /// Bytes of pages stored.
    pub fn bytes(&self) -> u64 {
        self.stored
    }

    /// Drops this process's mapping of every spilled page it read (they stay in the page cache
    /// and are mapped again when next read), so spilled pages count against RAM only while a
    /// step reads them. An optimisation, on Unix (`madvise`); elsewhere the OS decides.
    pub fn release(&self) {
        #[cfg(unix)]
        for seg in &self.segments {
            // SAFETY: a read-only shared map of a file: the pages are read again from the file.
            if let Err(e) = unsafe { seg.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
                tracing::debug!("madvise(DONTNEED) on a spill segment: {e}");
            }
        }
    }
}

impl PageSpill for SpillFile {
    /// [`SpillFile::store`] for [`PagedRows::spill_page`](needle_core::PagedRows::spill_page): its
    /// errors (a full disk tier, a failed write) become [`needle_core::Error::Storage`].
    fn spill(&mut self, bytes: &[u8]) -> needle_core::Result<(Arc<dyn PageBytes>, usize)> {
        let (map, at) = self.store_bytes(bytes).map_err(|e| needle_core::Error::Storage(e.to_string()))?;
        Ok((map, at))
    }
}

impl fmt::Debug for SpillFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpillFile({} bytes in {} segments under {})", self.stored, self.segments.len(), self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_bad_ones_are_named() {
        let b: TierBudget = "host=4GiB, disk=100G".parse().unwrap();
        assert_eq!(b, TierBudget { device: None, host: Some(4 << 30), disk: Some(100 << 30) });
        let b: TierBudget = "device=512MiB,host=4GiB".parse().unwrap();
        assert_eq!(b, TierBudget { device: Some(512 << 20), host: Some(4 << 30), disk: None });
        assert_eq!(b.to_string(), format!("device={},host={}", 512 << 20, 4u64 << 30));
        assert_eq!(b.to_string().parse::<TierBudget>().unwrap(), b);
        assert!(!"device=1G".parse::<TierBudget>().unwrap().is_unbounded());
        assert_eq!("host=1.5MiB".parse::<TierBudget>().unwrap().host, Some(3 << 19));
        assert_eq!("disk=4096".parse::<TierBudget>().unwrap().disk, Some(4096));
        assert!("".parse::<TierBudget>().unwrap().is_unbounded());
        for bad in
            ["host", "ram=1G", "host=1G,host=2G", "host=1Q", "host=-1", "host=G", "device=1G,device=2G", "gpu=1G"]
        {
            let e = bad.parse::<TierBudget>().unwrap_err().to_string();
            assert!(e.contains("--kv-budget") && e.contains(bad), "{bad}: {e}");
        }
        // An unknown tier's error lists the valid ones.
        assert!("gpu=1G".parse::<TierBudget>().unwrap_err().to_string().contains("device, host or disk"));
    }

    #[test]
    fn spilled_pages_read_back_across_segments_and_the_disk_budget_holds() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 1 << 20;
        let mut spill = SpillFile::with_segment(dir.path(), Some(3 * segment as u64), segment).unwrap();
        // Pages of a size that does not divide a segment, so segments end with unused bytes.
        let page = |i: usize| -> Vec<f32> { (0..30_001).map(|j| (i * 7 + j) as f32).collect() };
        let stored: Vec<PageBuf<f32>> = (0..20).map(|i| spill.store(&page(i)).unwrap()).collect();
        assert_eq!(spill.segments.len(), 3);
        spill.release();
        for (i, p) in stored.iter().enumerate() {
            assert_eq!(&p[..], &page(i)[..], "page {i}");
        }
        assert_eq!(spill.bytes(), 20 * 30_001 * 4);
        let mut n = 20;
        let err = loop {
            match spill.store(&page(n)) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Budget { tier: "disk", .. }), "{err}");
        assert!(spill.bytes() <= 3 * segment as u64);
        assert!(spill.store(&vec![0f32; segment / 4 + 1]).is_err(), "a page larger than a segment");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "the spill file has no name");
    }
}
