//! Errors of the training loop.

use std::path::{Path, PathBuf};

/// What can go wrong while preparing or running training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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
    /// A data file has a bad line (line 0: the file as a whole).
    #[error("{path}:{line}: {msg}")]
    Data {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// Options that cannot work together, or a bad value.
    #[error("{0}")]
    Config(String),
    /// The loss or the gradients became NaN or infinite.
    #[error(
        "the {what} became {value} at step {step}; training stopped. The last good checkpoint \
         is kept{}; lower the learning rate or enable gradient clipping, then resume",
        .checkpoint.as_ref().map(|p| format!(" at `{}`", p.display())).unwrap_or_default()
    )]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value (NaN, inf).
        value: f64,
        /// The optimizer step.
        step: usize,
        /// The last good checkpoint.
        checkpoint: Option<PathBuf>,
    },
    /// A checkpoint is missing, incomplete or belongs to another run.
    #[error("checkpoint `{path}`: {msg}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// From the model crate.
    #[error(transparent)]
    Model(Box<peft_models::ModelError>),
    /// From peft-core (adapter files, targets).
    #[error(transparent)]
    Peft(Box<peft_core::PeftError>),
}

impl From<peft_models::ModelError> for TrainError {
    fn from(e: peft_models::ModelError) -> Self {
        Self::Model(Box::new(e))
    }
}

impl From<peft_core::PeftError> for TrainError {
    fn from(e: peft_core::PeftError) -> Self {
        Self::Peft(Box::new(e))
    }
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
