//! The one error type of needle's core contracts.

/// Errors raised by the core contracts and reference math.
///
/// Every variant names the argument, tensor or parameter at fault, so a user can act on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A slice or row did not have the length its shape implies.
    #[error("dimension mismatch in {what}: expected {expected}, got {got}")]
    DimensionMismatch {
        /// What was being checked (argument or tensor name).
        what: String,
        /// Length that was required.
        expected: usize,
        /// Length that was given.
        got: usize,
    },
    /// An operation needs at least one key (or vector) and got none.
    #[error("empty key set: {what} needs at least one key")]
    EmptyKeys {
        /// The operation or argument that was empty.
        what: String,
    },
    /// A budget (k, pages, tokens) larger than what is available.
    #[error("budget {budget} for {what} exceeds the {available} available")]
    BudgetTooLarge {
        /// What the budget is for.
        what: String,
        /// The requested budget.
        budget: usize,
        /// How many items exist.
        available: usize,
    },
    /// A NaN or infinite value where finite numbers are required.
    #[error("non-finite value ({value}) in {what} at index {index}")]
    NonFinite {
        /// The argument that held it.
        what: String,
        /// Flat index of the first offending value.
        index: usize,
        /// The value itself, printed.
        value: f32,
    },
    /// A parameter outside its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Parameter name as the user wrote it.
        name: String,
        /// Why it is invalid and what is allowed.
        reason: String,
    },
    /// A token id or position outside the stored range.
    #[error("id {id} out of range for {what} holding {len}")]
    OutOfRange {
        /// What was indexed.
        what: String,
        /// The offending id.
        id: u64,
        /// How many items are stored.
        len: usize,
    },
    /// The operation is not offered by this implementation.
    #[error("{operation} is not supported by {implementation}")]
    Unsupported {
        /// What was asked.
        operation: String,
        /// Who was asked.
        implementation: String,
    },
    /// Saved state (a selector's or an index's) that cannot be loaded: truncated, of another
    /// kind or version, or inconsistent with the keys it is loaded over.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being loaded (kind and field).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A KV storage tier failed (a spill file could not be written, a budget is exhausted).
    #[error("KV storage: {0}")]
    Storage(String),
}

/// Result with needle-core's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidParameter`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name: name.into(), reason: reason.into() }
    }

    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), reason: reason.into() }
    }
}

/// Checks that `got == expected`, naming `what` otherwise.
pub fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got { Ok(()) } else { Err(Error::DimensionMismatch { what: what.to_string(), expected, got }) }
}

/// Checks that every value is finite, naming `what` and the first bad index otherwise.
pub fn check_finite(what: &str, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index, value: xs[index] }),
    }
}
