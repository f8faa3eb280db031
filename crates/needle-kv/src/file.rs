//! The container of a context file: named sections, each checked by xxh3 per page, indexed by
//! a table at the end.
//!
//! ```text
//! "NEEDLECX" | version u32 | 0u32 | section … (each 64-byte aligned) | table | trailer
//! table:   count u32, then per section: name (u16 length + UTF-8), offset u64, len u64,
//!          page bytes u64, page count u32, one xxh3 u64 per page
//! trailer: table offset u64 | table length u64 | xxh3 of the table u64 | "NEEDLEND"
//! ```
//! All integers little-endian. The table is written last, so a file cut short anywhere has no
//! valid trailer and is reported as truncated; the writer fills a temporary file beside the
//! destination and renames it only after an fsync, so a killed save leaves the previous file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use needle_core::PageBuf;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};

// Pages are read in place as native numbers, which the file stores little-endian.
const _: () = assert!(cfg!(target_endian = "little"), "context files are read in place on little-endian hosts only");

const MAGIC: &[u8; 8] = b"NEEDLECX";
const END_MAGIC: &[u8; 8] = b"NEEDLEND";
/// Container version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 16;
const TRAILER_LEN: u64 = 32;
const ALIGN: u64 = 64;

struct Entry {
    name: String,
    offset: u64,
    len: u64,
    page_bytes: u64,
    checks: Vec<u64>,
}

/// Writes a context file section by section; nothing appears at the destination until
/// [`ContextWriter::finish`].
pub struct ContextWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    at: u64,
    entries: Vec<Entry>,
}

impl ContextWriter {
    /// Starts a file to be renamed to `dest` by [`ContextWriter::finish`]. An existing `dest`
    /// is an error unless `overwrite` (a user's saved context is never silently replaced).
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            return Err(Error::Exists { path: dest.to_path_buf() });
        }
        let name =
            dest.file_name().ok_or_else(|| Error::io(dest, "naming", std::io::ErrorKind::InvalidInput.into()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        remove_stale_temporaries(dest, &name.to_string_lossy());
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, "creating", e))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            dest: dest.to_path_buf(),
            at: 0,
            entries: Vec::new(),
        };
        w.write(MAGIC)?;
        w.write(&VERSION.to_le_bytes())?;
        w.write(&0u32.to_le_bytes())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::io(&self.tmp, "writing", e))?;
        self.at += bytes.len() as u64;
        Ok(())
    }

    /// Adds a section of `bytes` checked as one page.
    pub fn section(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.paged_section(name, bytes.len().max(1), (!bytes.is_empty()).then_some(bytes))
    }

    /// Adds a section made of `pages` (each at most `page_bytes` long, all but the last exactly
    /// so), each checked on its own: a damaged page is named by its index.
    pub fn paged_section<'a>(
        &mut self,
        name: &str,
        page_bytes: usize,
        pages: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<()> {
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::BadSection { name: name.into(), reason: "names are 1 to 65535 bytes".into() });
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::BadSection { name: name.into(), reason: "written twice".into() });
        }
        let pad = (ALIGN - self.at % ALIGN) % ALIGN;
        self.write(&[0u8; ALIGN as usize][..pad as usize])?;
        let (offset, mut checks, mut short) = (self.at, Vec::new(), false);
        for page in pages {
            if page.len() > page_bytes || short {
                return Err(Error::BadSection {
                    name: name.into(),
                    reason: format!("page of {} bytes after a short page or over {page_bytes}", page.len()),
                });
            }
            short = page.len() < page_bytes;
            checks.push(xxh3_64(page));
            self.write(page)?;
        }
        let len = self.at - offset;
        self.entries.push(Entry { name: name.into(), offset, len, page_bytes: page_bytes as u64, checks });
        Ok(())
    }

    /// Writes the table and trailer, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        let mut table = Vec::new();
        table.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            table.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            table.extend_from_slice(e.name.as_bytes());
            for x in [e.offset, e.len, e.page_bytes] {
                table.extend_from_slice(&x.to_le_bytes());
            }
            table.extend_from_slice(&(e.checks.len() as u32).to_le_bytes());
            for c in &e.checks {
                table.extend_from_slice(&c.to_le_bytes());
            }
        }
        let table_at = self.at;
        self.write(&table)?;
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        for x in [table_at, table.len() as u64, xxh3_64(&table)] {
            trailer.extend_from_slice(&x.to_le_bytes());
        }
        trailer.extend_from_slice(END_MAGIC);
        self.write(&trailer)?;
        self.out.flush().map_err(|e| Error::io(&self.tmp, "writing", e))?;
        self.out.get_ref().sync_all().map_err(|e| Error::io(&self.tmp, "syncing", e))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, "renaming into", e))?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself must reach the disk; not every platform can open a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

/// Removes `.NAME.PID.tmp` files beside `dest` left by saves whose process is gone (killed
/// midway: the rename never came). Only where a process's liveness can be read (`/proc`).
fn remove_stale_temporaries(dest: &Path, name: &str) {
    let proc = Path::new("/proc/self");
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (Ok(entries), true) = (std::fs::read_dir(dir), proc.exists()) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let pid = file.to_str().and_then(|f| f.strip_prefix(&prefix)?.strip_suffix(".tmp")?.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!("removed {}, left by an unfinished save", entry.path().display()),
                Err(e) => tracing::debug!("could not remove {}: {e}", entry.path().display()),
            }
        }
    }
}

impl Drop for ContextWriter {
    /// An unfinished file (an error midway) is removed; a finished one was renamed away.
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A context file opened for reading: memory-mapped, its table checked; sections are checked
/// page by page when read.
pub struct ContextReader {
    path: PathBuf,
    map: Arc<Mmap>,
    entries: HashMap<String, Entry>,
}

/// `file` mapped read-only, the map shared with every reader of the same file (device, inode,
/// size and modification time) that is still open in this process: sequences loaded from one
/// context then read its pages at the same addresses, so their attention over the shared rows
/// meets them in the caches and the TLB once, not once per sequence.
fn shared_map(path: &Path, file: &File) -> Result<Arc<Mmap>> {
    use std::sync::{Mutex, OnceLock, Weak};
    type Key = (u64, u64, u64, Option<std::time::SystemTime>);
    static MAPS: OnceLock<Mutex<HashMap<Key, Weak<Mmap>>>> = OnceLock::new();
    let meta = file.metadata().map_err(|e| Error::io(path, "reading the metadata of", e))?;
    #[cfg(unix)]
    let (dev, ino) = {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let (dev, ino) = (0, 0);
    let key = (dev, ino, meta.len(), meta.modified().ok());
    // SAFETY: the map is read-only; a file changed underneath is caught by the checksums of
    // whatever is read from it afterwards.
    let map_new = || unsafe { Mmap::map(file) }.map(Arc::new).map_err(|e| Error::io(path, "mapping", e));
    if !cfg!(unix) || ino == 0 {
        return map_new();
    }
    let mut maps = MAPS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|_, m| m.strong_count() > 0);
    if let Some(map) = maps.get(&key).and_then(Weak::upgrade) {
        return Ok(map);
    }
    let map = map_new()?;
    maps.insert(key, Arc::downgrade(&map));
    Ok(map)
}

impl ContextReader {
    /// Opens and maps `path`, checking the magic, version, trailer and table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "opening", e))?;
        let map = shared_map(path, &file)?;
        let len = map.len() as u64;
        let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), section: "table".into(), reason };
        if len < 8 || &map[..8] != MAGIC {
            return Err(Error::NotAContext { path: path.to_path_buf() });
        }
        if len < HEADER_LEN + TRAILER_LEN {
            return Err(Error::Truncated { path: path.to_path_buf(), bytes: len });
        }
        let version = u32_at(&map, 8);
        if version != VERSION {
            return Err(Error::Version { path: path.to_path_buf(), found: version, supported: VERSION });
        }
        let t = (len - TRAILER_LEN) as usize;
        if &map[t + 24..t + 32] != END_MAGIC {
            return Err(Error::Truncated { path: path.to_path_buf(), bytes: len });
        }
        let (table_at, table_len, table_check) = (u64_at(&map, t), u64_at(&map, t + 8), u64_at(&map, t + 16));
        if table_at < HEADER_LEN || table_at.checked_add(table_len) != Some(len - TRAILER_LEN) {
            return Err(corrupt(format!("table at {table_at} of {table_len} bytes does not end at the trailer")));
        }
        let table = &map[table_at as usize..t];
        if xxh3_64(table) != table_check {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut r = Cursor { bytes: table, at: 0 };
        let count = r.u32().ok_or_else(|| corrupt("no section count".into()))?;
        let mut entries = HashMap::new();
        for i in 0..count {
            let bad = || corrupt(format!("entry {i} cut short"));
            let n = r.u16().ok_or_else(bad)? as usize;
            let name = std::str::from_utf8(r.take(n).ok_or_else(bad)?)
                .map_err(|_| corrupt(format!("entry {i}: name is not UTF-8")))?;
            let (offset, slen, page_bytes) =
                (r.u64().ok_or_else(bad)?, r.u64().ok_or_else(bad)?, r.u64().ok_or_else(bad)?);
            let pages = r.u32().ok_or_else(bad)? as usize;
            let checks_bytes = r.take(pages.checked_mul(8).ok_or_else(bad)?).ok_or_else(bad)?;
            let checks: Vec<u64> = checks_bytes.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
            let end = offset.checked_add(slen);
            let expect_pages = if slen == 0 {
                0
            } else if page_bytes == 0 {
                u64::MAX
            } else {
                slen.div_ceil(page_bytes)
            };
            if offset < HEADER_LEN || end.is_none_or(|e| e > table_at) || expect_pages != pages as u64 {
                return Err(corrupt(format!(
                    "section `{name}`: {slen} bytes at {offset}, {pages} pages of {page_bytes}"
                )));
            }
            entries.insert(name.to_string(), Entry { name: name.to_string(), offset, len: slen, page_bytes, checks });
        }
        Ok(Self { path: path.to_path_buf(), map, entries })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a section exists.
    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Bytes of the whole file.
    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// A section's bytes, every page checked (a mismatch names the section and page).
    pub fn section(&self, name: &str) -> Result<&[u8]> {
        let e =
            self.entries.get(name).ok_or_else(|| Error::Missing { path: self.path.clone(), section: name.into() })?;
        let bytes = &self.map[e.offset as usize..(e.offset + e.len) as usize];
        for (i, (page, &check)) in bytes.chunks(e.page_bytes.max(1) as usize).zip(&e.checks).enumerate() {
            if xxh3_64(page) != check {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    section: e.name.clone(),
                    reason: format!("checksum mismatch in page {i} of {}", e.checks.len()),
                });
            }
        }
        // Checking read the whole section; drop this process's mapping of it (the pages stay in
        // the page cache and are mapped again when read), so a loaded context counts against
        // RAM only for what is read afterwards. An optimisation: elsewhere the OS decides.
        #[cfg(unix)]
        {
            use memmap2::UncheckedAdvice;
            // SAFETY: a read-only map of a file: dropped pages are read again from the file.
            if let Err(err) =
                unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, e.offset as usize, bytes.len()) }
            {
                tracing::debug!("madvise(DONTNEED) on {} section `{}`: {err}", self.path.display(), e.name);
            }
        }
        Ok(bytes)
    }

    /// A paged section's pages, each checked as in [`ContextReader::section`], then read in
    /// place as numbers of type `T` (no copy: the file is their disk tier).
    pub fn mapped_pages<T: bytemuck::Pod>(&self, name: &str) -> Result<Vec<PageBuf<T>>> {
        let bytes = self.section(name)?;
        let e = &self.entries[name];
        let corrupt = |reason: String| Error::Corrupt { path: self.path.clone(), section: name.into(), reason };
        let (page_bytes, size) = (e.page_bytes as usize, size_of::<T>());
        if page_bytes == 0 || !page_bytes.is_multiple_of(size) || !bytes.len().is_multiple_of(size) {
            return Err(corrupt(format!("pages of {page_bytes} bytes do not hold whole numbers of {size} bytes")));
        }
        (0..bytes.len().div_ceil(page_bytes))
            .map(|i| {
                let len = (bytes.len() - i * page_bytes).min(page_bytes);
                PageBuf::mapped(self.map.clone(), e.offset as usize + i * page_bytes, len / size)
                    .map_err(|err| corrupt(format!("page {i}: {err}")))
            })
            .collect()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Bounds-checked little-endian reads.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32_at(b, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64_at(b, 0))
    }
}
