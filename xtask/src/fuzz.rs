//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the libFuzzer targets of `fuzz/` (every
//! target, or the one named) for N seconds each (default 60) and prints, per target, the
//! executions and whether it crashed.
//!
//! The targets build with `cargo +nightly fuzz` (install it with `cargo install
//! cargo-fuzz`) and no sanitizer: the project has no unsafe code, so what fuzzing looks for
//! is panics, arithmetic overflow (debug assertions are on), runaway memory (`-rss_limit_mb`)
//! and hangs (`-timeout`); without AddressSanitizer the targets build faster and run about
//! twice as many inputs. New inputs go to `fuzz/work/<target>/` (not committed); the seeds
//! in `fuzz/corpus/<target>/` are read only. A crash is saved by libFuzzer under
//! `fuzz/artifacts/<target>/`; replay it with `cargo +nightly fuzz run -s none <target>
//! <file>`. The same seeds run in the ordinary test suite (`crates/peft-cli/tests/
//! fuzz_corpus.rs`), so CI needs no nightly.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The fuzz targets: the file stems of `fuzz/fuzz_targets/*.rs`, sorted.
fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let dir = fuzz.join("fuzz_targets");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "rs" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Where the fuzz build goes: `$CARGO_TARGET_DIR/fuzz` when that is set, else
/// `fuzz/target`.
fn target_dir(fuzz: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d).join("fuzz"),
        None => fuzz.join("target"),
    }
}

/// One target's outcome.
struct Outcome {
    target: String,
    seconds: u64,
    executions: Option<u64>,
    crashed: bool,
}

fn stat(output: &str, name: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the command.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--seconds takes a number of seconds")?;
            }
            t if !t.starts_with("--") => only = Some(t.to_string()),
            other => {
                bail!("unknown option `{other}`; usage: cargo xtask fuzz [TARGET] [--seconds N]")
            }
        }
    }
    let fuzz = root.join("fuzz");
    let all = targets(&fuzz)?;
    let chosen: Vec<String> = match only {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target `{t}`; the targets are {}", all.join(", ")),
        None => all,
    };
    let ok = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "`cargo +nightly fuzz` is not available: install a nightly toolchain \
             (`rustup toolchain install nightly`) and cargo-fuzz (`cargo install cargo-fuzz`)"
        );
    }
    let tdir = target_dir(&fuzz);
    let tdir_s = tdir.display().to_string();
    println!("\n$ cargo +nightly fuzz build -s none --target-dir {tdir_s}");
    let status = Command::new("cargo")
        .current_dir(&fuzz)
        .args([
            "+nightly",
            "fuzz",
            "build",
            "-s",
            "none",
            "--target-dir",
            &tdir_s,
        ])
        .status()
        .context("cannot run `cargo +nightly fuzz build`")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    let mut outcomes = Vec::new();
    for t in &chosen {
        let work = fuzz.join("work").join(t);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let seeds = fuzz.join("corpus").join(t);
        println!("\n$ cargo +nightly fuzz run -s none {t} ({seconds} s)");
        let out = Command::new("cargo")
            .current_dir(&fuzz)
            .args([
                "+nightly",
                "fuzz",
                "run",
                "-s",
                "none",
                "--target-dir",
                &tdir_s,
                t,
            ])
            .arg(&work)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=2048",
                "-timeout=10",
                "-print_final_stats=1",
            ])
            .output()
            .with_context(|| format!("cannot run the fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let crashed = !out.status.success();
        if crashed {
            // The tail names the input and the panic.
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                println!("  {l}");
            }
        }
        outcomes.push(Outcome {
            target: t.clone(),
            seconds,
            executions: stat(&log, "number_of_executed_units"),
            crashed,
        });
    }
    println!(
        "\n{:<18} {:>8} {:>14}  result",
        "target", "seconds", "executions"
    );
    for o in &outcomes {
        println!(
            "{:<18} {:>8} {:>14}  {}",
            o.target,
            o.seconds,
            o.executions.map_or("?".into(), |e| e.to_string()),
            if o.crashed {
                "CRASH (see fuzz/artifacts)"
            } else {
                "ok"
            }
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz target(s) crashed: {}", crashed.join(", "));
    }
    Ok(())
}
