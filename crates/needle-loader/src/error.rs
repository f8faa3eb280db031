//! The one error type of the crate: each variant names the file, tensor or key at fault.

use std::path::PathBuf;

/// Result alias used throughout `needle-loader`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading a checkpoint or tokenizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused to open, stat or map a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a `.gguf` file nor a folder with `config.json`.
    #[error("{}: not a checkpoint: {reason}", path.display())]
    NotACheckpoint {
        /// Path given to [`open`](crate::open).
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{}: bad magic {found:02x?}, expected \"GGUF\"", path.display())]
    BadMagic {
        /// GGUF file.
        path: PathBuf,
        /// Bytes found at offset 0.
        found: [u8; 4],
    },
    /// The file is a big-endian GGUF; only little-endian files are read.
    #[error("{}: big-endian GGUF (version bytes {version_bytes:02x?}) is not supported", path.display())]
    BigEndian {
        /// GGUF file.
        path: PathBuf,
        /// The raw version field.
        version_bytes: [u8; 4],
    },
    /// A GGUF version other than 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3)", path.display())]
    UnsupportedVersion {
        /// GGUF file.
        path: PathBuf,
        /// Version found.
        version: u32,
    },
    /// The file ends before a header, metadata or tensor-info field is complete.
    #[error("{}: truncated {what}: needs {need} bytes at offset {offset}, file has {file_len}", path.display())]
    Truncated {
        /// File being parsed.
        path: PathBuf,
        /// The field being read (e.g. `metadata key #3 value`).
        what: String,
        /// Offset where the read started.
        offset: u64,
        /// Bytes that read needed.
        need: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A metadata value with a type id GGUF does not define.
    #[error("{}: metadata key {key:?} has unknown value type {type_id}", path.display())]
    UnknownValueType {
        /// GGUF file.
        path: PathBuf,
        /// Key being read.
        key: String,
        /// Type id found.
        type_id: u32,
    },
    /// Malformed header content: a bad string, an absurd count, a duplicate name.
    #[error("{}: malformed {what}: {reason}", path.display())]
    Malformed {
        /// File being parsed.
        path: PathBuf,
        /// Which part is malformed.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor with a ggml type id this crate does not know.
    #[error("{}: tensor {tensor:?} has unknown ggml type id {type_id}", path.display())]
    UnknownTensorType {
        /// GGUF file.
        path: PathBuf,
        /// Tensor name as stored.
        tensor: String,
        /// Type id found.
        type_id: u32,
    },
    /// A known tensor type (or safetensors dtype) that cannot be dequantised here.
    #[error("{}: tensor {tensor:?} has type {dtype}, which cannot be converted to f32 (supported: {supported})", path.display())]
    UnsupportedTensorType {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name as stored.
        tensor: String,
        /// Its type.
        dtype: String,
        /// Types that are supported.
        supported: &'static str,
    },
    /// A tensor's bytes reach past the end of its file.
    #[error("{}: data of tensor {tensor:?} ({size} bytes at offset {offset}) runs past the end of the file ({file_len} bytes)", path.display())]
    TensorDataOutOfBounds {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name as stored.
        tensor: String,
        /// Absolute offset of its data.
        offset: u64,
        /// Size of its data in bytes.
        size: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A tensor's dimensions are invalid (zero, overflowing, not a whole number of blocks).
    #[error("{}: tensor {tensor:?} has invalid dimensions {dims:?}: {reason}", path.display())]
    InvalidTensorInfo {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name as stored.
        tensor: String,
        /// Dimensions as stored.
        dims: Vec<u64>,
        /// What is wrong.
        reason: String,
    },
    /// A metadata key the model config needs is absent.
    #[error("{}: missing metadata key {key:?}", path.display())]
    MissingMetadata {
        /// Checkpoint file.
        path: PathBuf,
        /// Key looked up.
        key: String,
    },
    /// A metadata key has the wrong type or an impossible value.
    #[error("{}: metadata key {key:?}: {reason}", path.display())]
    BadMetadata {
        /// Checkpoint file.
        path: PathBuf,
        /// Key at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model config is inconsistent (see [`LlamaConfig::validate`](crate::LlamaConfig::validate)).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A checkpoint feature (architecture, RoPE scaling, tokenizer model) that is not supported.
    #[error("{}: unsupported {what}: {reason}", path.display())]
    Unsupported {
        /// Checkpoint file or folder.
        path: PathBuf,
        /// The feature.
        what: String,
        /// Detail.
        reason: String,
    },
    /// A model architecture needle does not run.
    #[error("{}: unsupported architecture {arch:?} (supported: {supported})", path.display())]
    UnsupportedArchitecture {
        /// Checkpoint file or folder.
        path: PathBuf,
        /// The name the checkpoint gives (`general.architecture`, `model_type`).
        arch: String,
        /// The names that are supported.
        supported: &'static str,
    },
    /// A RoPE scaling type needle does not implement (YaRN, dynamic NTK, LongRoPE, …).
    #[error("{}: unsupported RoPE scaling {rope_type:?} (supported: {supported})", path.display())]
    UnsupportedRopeScaling {
        /// Checkpoint file or config.
        path: PathBuf,
        /// The type the checkpoint asks for.
        rope_type: String,
        /// The types that are supported.
        supported: &'static str,
    },
    /// A tensor whose shape disagrees with the model config.
    #[error("{}: tensor {tensor:?} has shape {got:?}, config implies {expected:?}", path.display())]
    ShapeMismatch {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name (Hugging Face naming).
        tensor: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape stored.
        got: Vec<usize>,
    },
    /// The checkpoint has no tensor by that name (e.g. `lm_head.weight` of a tied model).
    #[error("{}: missing tensor {tensor:?}", path.display())]
    MissingTensor {
        /// Checkpoint file or folder.
        path: PathBuf,
        /// Tensor name asked for.
        tensor: String,
    },
    /// A NaN or infinity after conversion to f32.
    #[error("{}: tensor {tensor:?} has non-finite value {value} at flat index {index}", path.display())]
    NonFinite {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Flat index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A JSON file (`config.json`, index, `tokenizer.json`) that does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        /// JSON file.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file whose header does not parse or validate.
    #[error("{}: invalid safetensors file: {reason}", path.display())]
    Safetensors {
        /// Shard file.
        path: PathBuf,
        /// Parser error, as text.
        reason: String,
    },
    /// A chat template that does not compile or raised while rendering.
    #[error("chat template ({origin}): {reason}")]
    ChatTemplate {
        /// Where the template came from (GGUF file, `tokenizer_config.json`).
        origin: String,
        /// The template engine's message.
        reason: String,
    },
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer ({source_desc}): {reason}")]
    Tokenizer {
        /// Where the tokenizer came from (file path or GGUF).
        source_desc: String,
        /// What failed.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
