//! The context cache: prefilled prefixes with their built selectors, kept as needle context
//! files ([`needle_model::context`]) in one directory and reused by any request whose prompt's
//! token ids extend one (the rest is extended after it).
//!
//! A cached prefix lives on the disk tier: a loaded context's KV pages are read in place from
//! its file (the OS keeps the hot ones in its page cache), so the cache costs RAM only while a
//! sequence reads it. The files' total is held under a byte limit, least recently used first
//! out. With `--context-dir` the directory is the user's and the files stay for the next start
//! (each checked page by page against the model when the server starts); without it the
//! directory is a temporary one removed at shutdown.

use std::path::{Path, PathBuf};

use needle_model::context::{self, ContextInfo, SavedContext};
use needle_model::{Cpu, KvCache, KvDtype, Llama};

use crate::error::{Error, Result};

/// Files the cache writes (and only these does it read back or evict).
const PREFIX: &str = "ctx-";
const SUFFIX: &str = ".needle";

/// One cached prefix.
#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    selector: String,
    kv: KvDtype,
    path: PathBuf,
    bytes: u64,
    last_used: u64,
}

/// Cached prefixes of one model.
pub struct ContextCache {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    limit: u64,
    min_tokens: usize,
    entries: Vec<Entry>,
    clock: u64,
    digest: String,
    weights: String,
}

/// A cached prefix found for a prompt.
pub struct Hit {
    /// Its context file.
    pub path: PathBuf,
    /// Tokens it holds (a prefix of the prompt).
    pub tokens: usize,
}

impl ContextCache {
    /// A cache in `dir` (made if missing; its context files read back, each checked against
    /// `model`), or in a new temporary directory under `temp_parent`. Holds at most `limit`
    /// bytes of files and caches prefixes of at least `min_tokens` tokens.
    pub fn open(
        dir: Option<&Path>,
        temp_parent: &Path,
        limit: u64,
        min_tokens: usize,
        model: &Llama<Cpu>,
        digest: &str,
        weights: &str,
    ) -> Result<Self> {
        let io = |what: String| move |source| Error::Io { what, source };
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io(format!("creating --context-dir {}", d.display())))?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("needle-contexts-")
                    .tempdir_in(temp_parent)
                    .map_err(io(format!("a temporary context directory in {}", temp_parent.display())))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut c = Self {
            dir,
            _temp: temp,
            limit,
            min_tokens,
            entries: Vec::new(),
            clock: 0,
            digest: digest.into(),
            weights: weights.into(),
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(&c.dir)
            .map_err(io(format!("reading {}", c.dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| Self::ours(p))
            .collect();
        names.sort();
        for path in names {
            // Checked as any load is: header against the model, every page's checksum.
            match c.load(&path, model) {
                Ok(saved) => {
                    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                    c.clock += 1;
                    c.entries.push(Entry {
                        tokens: saved.tokens,
                        selector: saved.info.selector,
                        kv: saved.info.kv,
                        path,
                        bytes,
                        last_used: c.clock,
                    });
                }
                Err(e) => tracing::warn!("context cache: skipping {} ({e})", path.display()),
            }
        }
        tracing::info!("context cache in {}: {} prefixes, {} bytes", c.dir.display(), c.entries.len(), c.bytes());
        c.evict(None);
        Ok(c)
    }

    fn ours(p: &Path) -> bool {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
    }

    /// Whether a prefix of `n` tokens is worth caching.
    pub fn wants(&self, n: usize) -> bool {
        n >= self.min_tokens && self.limit > 0
    }

    /// The longest cached prefix of `ids` built with `selector` at `kv` precision.
    pub fn lookup(&mut self, ids: &[u32], selector: &str, kv: KvDtype) -> Option<Hit> {
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.selector == selector && e.kv == kv && ids.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        self.clock += 1;
        best.last_used = self.clock;
        Some(Hit { path: best.path.clone(), tokens: best.tokens.len() })
    }

    /// Loads a cached context (checked against `model`).
    pub fn load(&self, path: &Path, model: &Llama<Cpu>) -> Result<SavedContext> {
        Ok(context::load(path, model, &self.digest, &self.weights, &needle_select::parse)?)
    }

    /// Forgets an entry whose file failed to load, removing the file.
    pub fn forget(&mut self, path: &Path) {
        self.entries.retain(|e| e.path != path);
        let _ = std::fs::remove_file(path);
    }

    /// Saves a just-prefilled (built) `cache` of `tokens` with the `logits` after its last token,
    /// then evicts past the limit. A prefix already cached is left as it is.
    pub fn insert(
        &mut self,
        model: &Llama<Cpu>,
        selector: &str,
        tokens: &[u32],
        logits: &[f32],
        cache: &KvCache,
    ) -> Result<()> {
        let kv = cache.config().kv;
        if self.entries.iter().any(|e| e.selector == selector && e.kv == kv && e.tokens == tokens) {
            return Ok(());
        }
        let mut key = Vec::with_capacity(tokens.len() * 4 + selector.len() + 8);
        key.extend_from_slice(selector.as_bytes());
        key.extend_from_slice(kv.to_string().as_bytes());
        key.push(0);
        tokens.iter().for_each(|t| key.extend_from_slice(&t.to_le_bytes()));
        let path = self.dir.join(format!("{PREFIX}{:016x}{SUFFIX}", xxhash_rust::xxh3::xxh3_64(&key)));
        let info = ContextInfo::new(model, &self.digest, &self.weights, selector, cache);
        // An entry's file is the cache's own: one of the same name (a hash collision with a file
        // the start-up check refused) is replaced.
        context::save(&path, true, &info, tokens, logits, cache, &mut |_, _| {})?;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        self.clock += 1;
        let entry =
            Entry { tokens: tokens.to_vec(), selector: selector.into(), kv, path, bytes, last_used: self.clock };
        self.entries.push(entry);
        self.evict(None);
        Ok(())
    }

    /// Removes the least recently used files until the total is within the limit.
    fn evict(&mut self, keep: Option<&Path>) {
        while self.bytes() > self.limit {
            let Some(i) = (0..self.entries.len())
                .filter(|&i| Some(self.entries[i].path.as_path()) != keep)
                .min_by_key(|&i| self.entries[i].last_used)
            else {
                return;
            };
            let e = self.entries.swap_remove(i);
            tracing::info!(
                "context cache: evicting {} ({} tokens, {} bytes)",
                e.path.display(),
                e.tokens.len(),
                e.bytes
            );
            if let Err(err) = std::fs::remove_file(&e.path) {
                tracing::warn!("context cache: removing {}: {err}", e.path.display());
            }
        }
    }

    /// Bytes of the cached files.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Prefixes cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
