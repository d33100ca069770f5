//! Checkpoints written atomically: a directory is filled under a temporary name, every file
//! is flushed to disk, and the directory is renamed into place, so a process killed at any
//! moment leaves either the previous checkpoints or the new one, never a partial one.
//!
//! Layout of `<out>/checkpoints/step-000120/`:
//!
//! | file | holds |
//! |---|---|
//! | `trainable.safetensors` | the trainable parameters, by module path |
//! | `optimizer.safetensors` | AdamW's `exp_avg` and `exp_avg_sq` by path |
//! | `state.json` | [`TrainState`]: step, data position, best validation loss, the options |

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use peft_core::format::TensorFile;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Everything but tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Examples consumed so far, across epochs (the data position).
    pub consumed: usize,
    /// Best validation loss so far, and its step.
    pub best: Option<(f64, usize)>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: usize,
    /// Tokens seen so far.
    pub tokens: usize,
    /// Training seconds before this checkpoint (for throughput across resumes).
    pub elapsed_s: f64,
    /// The options the run started with, to refuse resuming with different ones.
    pub fingerprint: String,
}

/// The name of the checkpoints directory inside the output directory.
pub const CHECKPOINTS: &str = "checkpoints";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS).join(format!("step-{step:06}"))
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep` (at least one).
/// Returns its directory.
///
/// # Errors
/// I/O errors; the previous checkpoints are then untouched.
pub fn save(
    out: &Path,
    state: &TrainState,
    trainable: Vec<(String, TensorData)>,
    optimizer: Vec<(String, TensorData)>,
    keep: usize,
) -> Result<PathBuf> {
    let root = out.join(CHECKPOINTS);
    fs::create_dir_all(&root).map_err(|e| TrainError::io("create", &root, e))?;
    let dir = step_dir(out, state.step);
    let tmp = root.join(format!(
        ".tmp-step-{:06}-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io("remove", &tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io("create", &tmp, e))?;
    let written = (|| -> Result<()> {
        TensorFile::write(tmp.join(TRAINABLE), trainable)?;
        TensorFile::write(tmp.join(OPTIMIZER), optimizer)?;
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| TrainError::Config(format!("cannot serialise the state: {e}")))?;
        write_synced(&tmp.join(STATE), &json)?;
        sync_dir(&tmp);
        if dir.exists() {
            // A checkpoint of the same step from an earlier attempt: replace it.
            fs::remove_dir_all(&dir).map_err(|e| TrainError::io("remove", &dir, e))?;
        }
        fs::rename(&tmp, &dir).map_err(|e| TrainError::io("rename into place", &dir, e))?;
        sync_dir(&root);
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let mut steps = list(out);
    steps.sort_unstable();
    let keep = keep.max(1);
    if steps.len() > keep {
        for s in &steps[..steps.len() - keep] {
            let _ = fs::remove_dir_all(step_dir(out, *s));
        }
    }
    Ok(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| TrainError::io("create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| TrainError::io("write", path, e))
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable; not every platform can open a directory, which is fine.
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The steps of the complete checkpoints under `out` (temporary directories are ignored).
pub fn list(out: &Path) -> Vec<usize> {
    let Ok(entries) = fs::read_dir(out.join(CHECKPOINTS)) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some(step)
        })
        .collect()
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The loop's state.
    pub state: TrainState,
    /// Trainable parameters by path.
    pub trainable: Vec<(String, TensorData)>,
    /// Optimizer moments by path.
    pub optimizer: Vec<(String, TensorData)>,
}

/// Loads the newest complete checkpoint under `out`, if any; leftovers of interrupted
/// writes are removed.
///
/// # Errors
/// A checkpoint that cannot be read (named with its directory).
pub fn load_latest(out: &Path) -> Result<Option<Checkpoint>> {
    if let Ok(entries) = fs::read_dir(out.join(CHECKPOINTS)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let Some(step) = list(out).into_iter().max() else {
        return Ok(None);
    };
    load(&step_dir(out, step)).map(Some)
}

/// Loads the checkpoint in `dir`.
///
/// # Errors
/// A missing or unreadable file.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let bad = |msg: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let state_path = dir.join(STATE);
    let text = fs::read_to_string(&state_path).map_err(|e| bad(format!("{STATE}: {e}")))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| bad(format!("{STATE} is not valid: {e}")))?;
    let read_all = |name: &str| -> Result<Vec<(String, TensorData)>> {
        let mut f = TensorFile::read(dir.join(name)).map_err(|e| bad(e.to_string()))?;
        let keys: Vec<String> = f.keys().map(str::to_string).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(t) = f.take_any(&k) {
                out.push((k, t));
            }
        }
        Ok(out)
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        trainable: read_all(TRAINABLE)?,
        optimizer: read_all(OPTIMIZER)?,
        state,
    })
}
