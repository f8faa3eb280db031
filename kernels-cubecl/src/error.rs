//! Errors of the wrappers: bad shapes and lengths name the parameter.

/// What a wrapper refuses, or what failed on the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A buffer length does not match what the other parameters imply.
    #[error("`{param}` has length {got}, expected {expected}")]
    Len {
        /// The parameter.
        param: &'static str,
        /// Its length.
        got: usize,
        /// The length the other parameters imply.
        expected: usize,
    },
    /// A parameter is out of its valid range.
    #[error("`{param}`: {why}")]
    Invalid {
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The device could not be opened (no adapter, no driver).
    #[error("no compute device: {0}")]
    NoDevice(String),
    /// Reading a result back from the device failed.
    #[error("device read-back failed: {0}")]
    ReadBack(String),
}

/// Result of the wrappers.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors unless `got == expected`.
pub(crate) fn check_len(param: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(Error::Len { param, got, expected }) }
}

/// An `Invalid` error.
pub(crate) fn invalid(param: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid { param, why: why.into() }
}

/// `x` as `u32`, or an error naming `param`: kernels index with 32-bit integers.
pub(crate) fn to_u32(param: &'static str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| invalid(param, format!("{x} does not fit in 32 bits")))
}
