//! Errors of the model crate.

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the checkpoint or tokenizer failed.
    #[error(transparent)]
    Loader(#[from] needle_loader::Error),
    /// A core contract rejected its input (shapes, budgets, non-finite queries).
    #[error(transparent)]
    Core(#[from] needle_core::Error),
    /// A context file could not be written or read.
    #[error(transparent)]
    Kv(#[from] needle_kv::Error),
    /// A context file was made for another model, weights mode or layout.
    #[error("{path} was saved {what} `{file}`, not `{expected}`: prefill it again for this one")]
    ContextMismatch {
        /// The context file.
        path: std::path::PathBuf,
        /// What differs (`for the model`, `with weights`, …).
        what: &'static str,
        /// What the file holds.
        file: String,
        /// What this run has.
        expected: String,
    },
    /// A weight's shape disagrees with the model configuration.
    #[error("tensor `{tensor}` has shape {got:?}, the configuration implies {expected:?}")]
    Shape {
        /// Checkpoint name of the tensor.
        tensor: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A fused kernel rejected a weight or activation (shape, block size, type).
    #[error("kernel on `{tensor}`: {source}")]
    Kernel {
        /// The weight or activation the kernel was running on.
        tensor: String,
        /// What the kernel reported.
        source: needle_kernels_cpu::Error,
    },
    /// The prompt has no tokens.
    #[error("empty prompt: nothing to prefill")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A parameter outside its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: String,
        /// What is allowed.
        reason: String,
    },
    /// The order of calls is wrong (e.g. decoding before prefill).
    #[error("{0}")]
    State(String),
    /// Tensor data could not be read back from the backend.
    #[error("reading tensor data back from the backend: {0}")]
    Data(String),
}

/// Result with the model crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Kernel`].
    pub fn kernel(tensor: impl Into<String>, source: needle_kernels_cpu::Error) -> Self {
        Error::Kernel { tensor: tensor.into(), source }
    }

    /// Shorthand for [`Error::InvalidParameter`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name: name.into(), reason: reason.into() }
    }
}
