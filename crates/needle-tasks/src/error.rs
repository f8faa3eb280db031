//! The one error type of needle-tasks.

/// Errors raised while parsing task specs or building task instances.
///
/// Every variant names the parameter at fault and, where there is a fixed set, what is valid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A task name that is not known.
    #[error("unknown task `{name}`; valid tasks: {valid}")]
    UnknownTask {
        /// The name as written.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },
    /// An option key that the task does not take.
    #[error("task `{task}` has no option `{key}`; valid options: {valid}")]
    UnknownOption {
        /// The task.
        task: String,
        /// The option key as written.
        key: String,
        /// The valid keys, comma separated (or `none`).
        valid: String,
    },
    /// A spec string that is not `name[:key=value,...]`, or an option value that is invalid.
    #[error("invalid task spec `{spec}`: {reason}")]
    InvalidSpec {
        /// The spec as written.
        spec: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A parameter outside its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: String,
        /// Why it is invalid and what is allowed.
        reason: String,
    },
    /// The target length cannot even hold the instructions, needles and question.
    #[error("target length {target} tokens is too short for task `{task}`: its fixed text alone takes {needed} tokens")]
    TooShort {
        /// The task.
        task: String,
        /// The requested length in tokens.
        target: usize,
        /// Tokens taken by everything but the filler.
        needed: usize,
    },
    /// Filler text with no words in it.
    #[error("filler text is empty: pass a text with at least one word, or use Filler::Landmark")]
    EmptyFiller,
}

impl Error {
    pub(crate) fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name: name.into(), reason: reason.into() }
    }
}

/// Result with needle-tasks' [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
