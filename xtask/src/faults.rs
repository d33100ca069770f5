//! `cargo xtask kill-resume [N]`: kills `peft train` N times (default 50) at random
//! moments, checkpoint writes included, resuming after each, and checks that every run
//! that finishes ends with the adapter of an uninterrupted run, bit for bit. It runs the
//! ignored test `kill_and_resume_loop` of `crates/peft-cli/tests/faults.rs` (a CI-sized
//! version of it runs in the normal test suite). `KILL_RESUME_SEED` fixes the kill moments.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs the command.
pub fn kill_resume(root: &Path, args: &[String]) -> Result<()> {
    let n: usize = match args.first() {
        Some(a) => a
            .parse()
            .with_context(|| format!("`{a}` is not a number of kills"))?,
        None => 50,
    };
    println!(
        "\n$ KILL_RESUME_ITERATIONS={n} cargo test -p peft-cli --test faults -- --ignored --exact --nocapture kill_and_resume_loop"
    );
    let status = Command::new("cargo")
        .current_dir(root)
        .env("KILL_RESUME_ITERATIONS", n.to_string())
        .args([
            "test",
            "-p",
            "peft-cli",
            "--test",
            "faults",
            "--",
            "--ignored",
            "--exact",
            "--nocapture",
            "kill_and_resume_loop",
        ])
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("the kill-and-resume loop failed ({status})");
    }
    Ok(())
}
