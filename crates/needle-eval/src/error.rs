//! The one error type of the evaluation harness.

use std::path::PathBuf;

/// Errors of the evaluation harness; each names the file, argument or selector at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A trace file is malformed, or lacks what was asked of it.
    #[error("trace {}: {reason}", path.display())]
    Trace {
        /// The file (empty for a trace in memory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An argument outside its valid range (`name` is the field of the config struct, which the
    /// command line spells as a `--flag`).
    #[error("{name}: {reason}")]
    Invalid {
        /// The argument.
        name: String,
        /// Why it is invalid and what is allowed.
        reason: String,
    },
    /// An error of the model, with what was being done.
    #[error("{what}: {source}")]
    Model {
        /// What was being done (building a selector, decoding, ...).
        what: String,
        /// The cause.
        source: Box<needle_model::Error>,
    },
    /// A core contract rejected its input.
    #[error(transparent)]
    Core(#[from] needle_core::Error),
    /// An index or selector contract failed, with what was being done.
    #[error("{what}: {source}")]
    Index {
        /// What was being done.
        what: String,
        /// The cause.
        source: needle_core::Error,
    },
    /// Tokenizing failed.
    #[error(transparent)]
    Loader(#[from] Box<needle_loader::Error>),
    /// Building a task prompt failed.
    #[error(transparent)]
    Tasks(#[from] needle_tasks::Error),
    /// Drawing a plot failed.
    #[error("drawing {}: {reason}", path.display())]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Invalid`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { name: name.into(), reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn trace(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Trace { path: path.into(), reason: reason.into() }
    }
}

impl From<needle_loader::Error> for Error {
    fn from(e: needle_loader::Error) -> Self {
        Self::Loader(Box::new(e))
    }
}

impl From<needle_model::Error> for Error {
    fn from(source: needle_model::Error) -> Self {
        Self::Model { what: "model".into(), source: Box::new(source) }
    }
}

/// Adds what was being done to model and index errors.
pub(crate) trait Context<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, needle_model::Error> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Model { what: what(), source: Box::new(source) })
    }
}

impl<T> Context<T> for std::result::Result<T, needle_core::Error> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Index { what: what(), source })
    }
}

/// Result with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
