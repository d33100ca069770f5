//! The error type of `peft-models`.

use std::path::PathBuf;

/// Result alias for `peft-models`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A required file is not there.
    #[error("`{path}` not found: {hint}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What to do.
        hint: String,
    },

    /// `config.json` (or GGUF metadata) names an architecture this build does not have.
    #[error("unknown architecture `{found}` in `{path}`; supported: {supported}")]
    UnknownArchitecture {
        /// The architecture named in the file.
        found: String,
        /// The file.
        path: PathBuf,
        /// Supported architectures.
        supported: String,
    },

    /// `config.json` or GGUF metadata is missing a field or has a bad value.
    #[error("invalid model config `{path}`: {message}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A weight the architecture needs is not in the checkpoint.
    #[error(
        "tensor `{name}` (shape {expected:?}) is missing from `{path}`; the checkpoint is incomplete or for another architecture"
    )]
    MissingTensor {
        /// The tensor name in the checkpoint's naming.
        name: String,
        /// The shape the architecture expects.
        expected: Vec<usize>,
        /// The checkpoint.
        path: PathBuf,
    },

    /// A weight has the wrong shape for the config.
    #[error(
        "tensor `{name}` in `{path}` has shape {found:?}, but config.json implies {expected:?}"
    )]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
        /// The checkpoint.
        path: PathBuf,
    },

    /// A weight has a dtype this build cannot load.
    #[error(
        "tensor `{name}` in `{path}` has dtype {dtype}, which cannot be loaded as a float weight{hint}"
    )]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
        /// The checkpoint.
        path: PathBuf,
        /// Extra advice.
        hint: String,
    },

    /// The file is not a valid safetensors / GGUF / JSON file, or is truncated.
    #[error("`{path}` is not a valid {format} file: {message}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// "safetensors", "GGUF", ...
        format: &'static str,
        /// What the parser reported.
        message: String,
    },

    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// Invalid input from the caller (empty prompt, bad sampling parameters, ...).
    #[error("{0}")]
    InvalidInput(String),

    /// An error from peft-core (adapter files, target selection).
    #[error(transparent)]
    Peft(#[from] peft_core::PeftError),
}

impl ModelError {
    /// Wraps an I/O error with the action and the path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
