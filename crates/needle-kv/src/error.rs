//! Errors of needle-kv: each names the file and, where it applies, the section at fault.

use std::path::{Path, PathBuf};

/// What went wrong with a context file, a page or a tier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation.
    #[error("{op} {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`opening`, `writing`, …).
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The destination exists and overwriting was not asked for.
    #[error("{path} exists; pass --force to replace it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file does not start with a context file's magic bytes.
    #[error("{path} is not a needle context file")]
    NotAContext {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by another format version.
    #[error("{path}: context format version {found}, this needle reads version {supported}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The file ends early (no valid trailer): a save that did not finish, or a cut copy.
    #[error("{path} is truncated ({bytes} bytes, no valid trailer)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        bytes: u64,
    },
    /// A section's bytes fail their checksum or make no sense.
    #[error("{path}: section `{section}` is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The section (`table` for the index of sections).
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// A section the reader needs is absent.
    #[error("{path} has no section `{section}`")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The section.
        section: String,
    },
    /// A section was written wrongly (a bug of the caller, not of the file).
    #[error("section `{name}`: {reason}")]
    BadSection {
        /// The section.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A page view that does not fit its map (a bug of the caller, or a corrupt table).
    #[error("bad page: {reason}")]
    BadPage {
        /// What is wrong.
        reason: String,
    },
    /// A tier is full: the KV cache needs more than the budgets allow.
    #[error(
        "the {tier} tier's budget of {limit} bytes cannot hold {need} more bytes of KV pages (raise --kv-budget {tier}=…)"
    )]
    Budget {
        /// `host` or `disk`.
        tier: &'static str,
        /// The budget.
        limit: u64,
        /// Bytes asked for beyond what it holds.
        need: u64,
    },
    /// A budget spec that does not parse.
    #[error("--kv-budget `{spec}`: {reason}")]
    BadBudget {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of needle-kv.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), op, source }
    }
}
