//! # needle-kv
//!
//! KV storage beyond one process's RAM.
//!
//! - The **page** ([`PageBuf`], defined in needle-core and re-exported here), the unit a tier
//!   holds and moves: in RAM (host tier) or read in place from a memory-mapped file (disk tier);
//!   a `memmap2::Mmap` is the [`PageBytes`](needle_core::PageBytes) its pages read.
//! - The **disk tier** ([`SpillFile`], the [`PageSpill`](needle_core::PageSpill) that
//!   [`PagedRows::spill_page`](needle_core::PagedRows::spill_page) takes): pages that leave the
//!   host budget ([`TierBudget`]) are written once to an unnamed temporary file and read back
//!   through its maps on demand.
//! - The **context file**: a prefilled KV cache and its selectors' built state saved once and
//!   loaded many times ("prefill once, ask many").
//!
//! [`ContextWriter`] writes named sections into a temporary file and renames it into place only
//! after an fsync, so a save killed midway leaves the previous file intact; [`ContextReader`]
//! maps the file, checks its table, and checks every section page by page (xxh3) as it is read,
//! so a truncated, bit-flipped or foreign file is a named [`Error`], never wrong output; a loaded
//! context's KV pages are read in place from that map ([`ContextReader::mapped_pages`]).
//!
//! What goes into the sections (pages, selector states, tokens, header) is the model crate's
//! business (`needle_model::context`); this crate knows bytes and pages only.
//!
//! Portable: positioned writes go through `Seek` and `Write`; the `madvise` calls that let the
//! OS drop pages already read are a Unix-only optimisation.
#![warn(missing_docs)]

mod error;
mod file;
mod tier;

pub use error::{Error, Result};
pub use file::{ContextReader, ContextWriter, VERSION};
/// The page type, from needle-core (where [`needle_core::PagedRows`] holds it).
pub use needle_core::PageBuf;
pub use tier::{SpillFile, TierBudget, parse_bytes};
