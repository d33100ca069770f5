//! Output directories written all at once: a command that writes several files into
//! `--out` (`peft merge`, `peft quantize`) fills a temporary sibling directory first and
//! moves it into place only when every file is written, so a failure (a bad input found
//! late, a full disk, a kill) leaves no half-written output behind.
//!
//! ```
//! let parent = tempfile::tempdir()?;
//! let out = parent.path().join("merged");
//! let failed: anyhow::Result<()> = peft_cli::output::staged(&out, |tmp| {
//!     std::fs::write(tmp.join("config.json"), "{}")?;
//!     anyhow::bail!("the weights could not be written")
//! });
//! assert!(failed.is_err());
//! assert!(!out.exists()); // nothing half-written
//! peft_cli::output::staged(&out, |tmp| Ok(std::fs::write(tmp.join("config.json"), "{}")?))?;
//! assert!(out.join("config.json").exists());
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.partial-{}", std::process::id()))
}

/// Runs `write` on a fresh temporary directory next to `out`, then moves what it wrote into
/// `out`: the whole directory at once when `out` does not exist or is empty, else file by
/// file (each file replaced atomically). On failure the temporary directory is removed and
/// `out` is left as it was; temporary directories of earlier, killed attempts at the same
/// `out` are removed first.
///
/// # Errors
/// `write`'s error, or an I/O error creating or moving the files (naming the path).
pub fn staged<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = staging_dir(out);
    remove_leftovers(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = write(&tmp).and_then(|v| move_into_place(&tmp, out).map(|()| v));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes the staging directories of earlier attempts at the same output (a process
/// killed while writing leaves one, named with its own id).
fn remove_leftovers(tmp: &Path) {
    let (Some(parent), Some(name)) = (tmp.parent(), tmp.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Some((prefix, _)) = name.rsplit_once('-') else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{prefix}-"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn move_into_place(tmp: &Path, out: &Path) -> Result<()> {
    let empty = std::fs::read_dir(out).map(|mut rd| rd.next().is_none());
    match empty {
        Err(_) => {
            std::fs::rename(tmp, out)
                .with_context(|| format!("moving the output into {}", out.display()))?;
        }
        Ok(true) => {
            std::fs::remove_dir(out).with_context(|| format!("replacing {}", out.display()))?;
            std::fs::rename(tmp, out)
                .with_context(|| format!("moving the output into {}", out.display()))?;
        }
        Ok(false) => {
            for entry in
                std::fs::read_dir(tmp).with_context(|| format!("reading {}", tmp.display()))?
            {
                let entry = entry?;
                let dest = out.join(entry.file_name());
                if dest.is_dir() {
                    std::fs::remove_dir_all(&dest)
                        .with_context(|| format!("replacing {}", dest.display()))?;
                }
                std::fs::rename(entry.path(), &dest)
                    .with_context(|| format!("moving the output into {}", dest.display()))?;
            }
            std::fs::remove_dir(tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
    }
    Ok(())
}
