//! The error type of peft-qlora.

use std::path::PathBuf;

/// What went wrong in quantizing, loading or saving a 4-bit model.
#[derive(Debug, thiserror::Error)]
pub enum QloraError {
    /// A setting that bitsandbytes would not accept (block size, quant type, shape).
    #[error("invalid 4-bit quantization setting: {0}")]
    InvalidConfig(String),
    /// A file could not be read or written.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint that is not in the bitsandbytes 4-bit layout this crate reads.
    #[error("`{path}`: {message}")]
    InvalidCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
    },
    /// An error from the model loader.
    #[error(transparent)]
    Model(#[from] peft_models::ModelError),
    /// An error from peft-core (merging, adapters).
    #[error(transparent)]
    Peft(#[from] peft_core::PeftError),
}

impl QloraError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::InvalidCheckpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// peft-qlora's result type.
pub type Result<T, E = QloraError> = std::result::Result<T, E>;
