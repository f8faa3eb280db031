//! # needle-kv
//!
//! KV storage beyond one process's RAM.
//!
//! - The **page** ([`PageBuf`]), the unit a tier holds and moves: in RAM (host tier) or read in
//!   place from a memory-mapped file (disk tier).
//! - The **disk tier** ([`SpillFile`]): pages that leave the host budget ([`TierBudget`]) are
//!   written once to an unnamed temporary file and read back through its maps on demand.
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
#![warn(missing_docs)]

mod error;
mod file;
mod page;
mod tier;

pub use error::{Error, Result};
pub use file::{ContextReader, ContextWriter, VERSION};
pub use page::PageBuf;
pub use tier::{SpillFile, TierBudget, parse_bytes};
