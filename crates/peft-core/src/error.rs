//! The error type of `peft-core`.
//!
//! Every fallible operation in this crate (file I/O, parsing, user configuration) returns
//! [`PeftError`]. Messages say what was wrong and what to do about it.

use std::path::PathBuf;

/// Result alias for `peft-core`.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// Everything that can go wrong in `peft-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// A file could not be read or written.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done ("read", "write", "create directory", ...).
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `adapter_config.json` is not valid JSON or does not have the expected fields.
    #[error("invalid adapter config `{path}`: {message}")]
    InvalidConfig {
        /// The file (or `<memory>` for an in-memory string).
        path: PathBuf,
        /// What serde or validation reported.
        message: String,
    },

    /// The config names a `peft_type` this build cannot handle.
    #[error(
        "unsupported peft_type `{found}`{context}; this build handles: {supported}. \
         Check that the adapter was made for this method, or add the crate that implements it"
    )]
    UnsupportedPeftType {
        /// The `peft_type` in the file.
        found: String,
        /// Extra context (e.g. " (expected LORA)").
        context: String,
        /// Comma-separated list of what is supported.
        supported: String,
    },

    /// A regular expression in the config (`target_modules`, `exclude_modules`,
    /// `layers_pattern`, `rank_pattern`, ...) does not compile.
    #[error("invalid regular expression in `{field}`: {pattern:?}: {message}")]
    InvalidPattern {
        /// The config field that held the pattern.
        field: &'static str,
        /// The pattern itself.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },

    /// The target selection matched no module of the model.
    #[error(
        "target_modules {targets} matched no module of the model{excluded}. \
         Module paths that exist ({count} targetable): {available}"
    )]
    NoTargetMatched {
        /// The targets as the user gave them.
        targets: String,
        /// A note when exclusions removed every match.
        excluded: String,
        /// How many targetable paths exist.
        count: usize,
        /// A (possibly abbreviated) list of targetable module paths.
        available: String,
    },

    /// A tensor the adapter needs is absent from `adapter_model.safetensors`.
    #[error(
        "missing tensor `{key}` (expected shape {expected:?}) in `{path}`; \
         the adapter file does not match this model or config{base}"
    )]
    MissingTensor {
        /// peft's key name.
        key: String,
        /// The shape this model expects.
        expected: Vec<usize>,
        /// The file.
        path: PathBuf,
        /// `" (it was made for `NAME`)"` from `base_model_name_or_path`, or empty.
        base: String,
    },

    /// `adapter_model.safetensors` has tensors that no module of the model claims.
    #[error(
        "unexpected tensor(s) in `{path}`: {keys}; the adapter targets modules this model \
         does not have (it was made for {base})"
    )]
    UnexpectedTensors {
        /// The unclaimed keys (comma-separated, possibly abbreviated).
        keys: String,
        /// The file.
        path: PathBuf,
        /// The base model the adapter was made for, in words (see
        /// [`crate::format::TensorFile::with_base_model`]).
        base: String,
    },

    /// A tensor exists but has the wrong shape.
    #[error(
        "tensor `{key}` in `{path}` has shape {found:?}, but this model expects {expected:?} \
         {context}"
    )]
    ShapeMismatch {
        /// peft's key name.
        key: String,
        /// The shape this model expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
        /// What the loaded model has there and which base model the adapter was made for
        /// (see [`crate::format::TensorFile::with_base_model`]).
        context: String,
        /// The file.
        path: PathBuf,
    },

    /// A tensor holds NaN or infinite values (a corrupt or diverged file).
    #[error(
        "tensor `{key}` in `{path}` holds {count} NaN or infinite value(s) out of {total}; \
         the file is corrupt or comes from a run that diverged"
    )]
    NonFiniteTensor {
        /// peft's key name.
        key: String,
        /// How many values are not finite.
        count: usize,
        /// How many values the tensor has.
        total: usize,
        /// The file.
        path: PathBuf,
    },

    /// A tensor has a dtype this crate cannot convert to f32.
    #[error("tensor `{key}` in `{path}` has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// peft's key name.
        key: String,
        /// The dtype in the file.
        dtype: String,
        /// The file.
        path: PathBuf,
    },

    /// The safetensors container itself is malformed.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        message: String,
    },

    /// An adapter name is unknown, or already taken.
    #[error("{0}")]
    Adapter(String),

    /// An operation is not possible for this method or layer (e.g. merging into a
    /// quantized weight that cannot be rewritten).
    #[error("{0}")]
    Unsupported(String),
}

impl PeftError {
    /// Wraps an I/O error with the action and the path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
