//! Faults during training: the process killed (SIGKILL) at random moments, checkpoint
//! writes included, then resumed, in a loop; and the disk filling up while a checkpoint is
//! written. Nothing may be lost: the final adapter equals an uninterrupted run's, bit for
//! bit, and the previous checkpoint survives a failed write.
//!
//! The CI-sized loop runs a few kills; `cargo xtask kill-resume [N]` runs the ignored
//! `kill_and_resume_loop` with N kills (`KILL_RESUME_ITERATIONS`, default 50).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    model: PathBuf,
    data: PathBuf,
    val: PathBuf,
}

impl Run {
    fn new(dir: &Path) -> Self {
        let model = common::tiny_llama(dir);
        let (data, val) = (dir.join("train.jsonl"), dir.join("val.jsonl"));
        common::tiny_data(&data, 12);
        common::tiny_data(&val, 3);
        Self { model, data, val }
    }

    /// `peft train --resume` for 12 steps with a checkpoint after every step, so a random
    /// moment falls inside a checkpoint write often.
    fn command(&self, out: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
        c.args(["train", "--resume", "--model"])
            .arg(&self.model)
            .arg("--data")
            .arg(&self.data)
            .arg("--val-data")
            .arg(&self.val)
            .arg("--out")
            .arg(out)
            .args([
                "--max-steps",
                "12",
                "--batch-size",
                "2",
                "--rank",
                "4",
                "--seq-len",
                "160",
                "--save-every",
                "1",
                "--eval-every",
                "3",
                "--lr",
                "1e-2",
                "--seed",
                "7",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn run_to_end(&self, out: &Path) -> Duration {
        let t = Instant::now();
        let o = self.command(out).output().unwrap();
        assert!(
            o.status.success(),
            "peft train failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed()
    }
}

/// The adapter's bytes and the per-step losses of a finished run.
fn outcome(out: &Path) -> (Vec<u8>, Vec<u8>, Vec<(u64, f64)>) {
    let adapter = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let config = std::fs::read(out.join("adapter/adapter_config.json")).unwrap();
    let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect();
    (adapter, config, losses)
}

/// Entries under `dir` whose name starts with a dot (temporary files and directories of
/// interrupted writes), except inside `checkpoints/`, which the next resume cleans.
fn hidden_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                out.push(p.clone());
            }
            if p.is_dir() && e.file_name() != "checkpoints" {
                stack.push(p);
            }
        }
    }
    out
}

/// A small deterministic generator for the kill moments (SplitMix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// What a kill-and-resume loop saw.
#[derive(Debug, Default)]
struct LoopReport {
    kills: usize,
    during_checkpoint_write: usize,
    rounds_compared: usize,
}

/// Kills `peft train` `kills` times at random moments, resuming after each; whenever a run
/// finishes, its adapter and losses must equal the uninterrupted run's, and a new round
/// starts in a fresh directory.
fn kill_resume_loop(kills: usize, seed: u64) -> LoopReport {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::new(dir.path());
    let reference_out = dir.path().join("reference");
    let t_ref = run.run_to_end(&reference_out);
    let reference = outcome(&reference_out);
    assert_eq!(reference.2.len(), 12);
    let mut rng = Rng(seed);
    let mut report = LoopReport::default();
    let mut round = 0;
    let mut out = dir.path().join(format!("round-{round}"));
    let max_ms = (t_ref.as_millis() as u64).max(20);
    let compare = |out: &Path, report: &mut LoopReport| {
        let got = outcome(out);
        assert!(
            got.0 == reference.0,
            "{}: the adapter differs from the uninterrupted run's",
            out.display()
        );
        assert_eq!(
            got.1,
            reference.1,
            "{}: adapter_config.json differs",
            out.display()
        );
        assert_eq!(got.2, reference.2, "{}: the losses differ", out.display());
        let hidden = hidden_entries(out);
        assert!(
            hidden.is_empty(),
            "{}: temporary files left behind: {hidden:?}",
            out.display()
        );
        report.rounds_compared += 1;
    };
    while report.kills < kills {
        let mut child = run.command(&out).spawn().unwrap();
        let delay = Duration::from_millis(rng.below(max_ms));
        let start = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() >= delay {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        match finished {
            Some(status) => {
                let o = child.wait_with_output().unwrap();
                assert!(
                    status.success(),
                    "a resumed run failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                compare(&out, &mut report);
                round += 1;
                out = dir.path().join(format!("round-{round}"));
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                report.kills += 1;
                let tmp_left = std::fs::read_dir(out.join("checkpoints"))
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                    })
                    .unwrap_or(false);
                if tmp_left {
                    report.during_checkpoint_write += 1;
                }
            }
        }
    }
    // The last round runs to its end.
    run.run_to_end(&out);
    compare(&out, &mut report);
    println!(
        "kill-and-resume: {} kills ({} during a checkpoint write), {} finished runs equal \
         to the uninterrupted one bit for bit (reference run {:.2} s, seed {seed})",
        report.kills,
        report.during_checkpoint_write,
        report.rounds_compared,
        t_ref.as_secs_f64()
    );
    report
}

#[test]
fn a_run_killed_at_random_moments_and_resumed_ends_bit_for_bit_as_an_uninterrupted_one() {
    let report = kill_resume_loop(4, 0x5eed);
    assert_eq!(report.kills, 4);
    assert!(report.rounds_compared >= 1);
}

#[test]
#[ignore = "long: run with `cargo xtask kill-resume [N]`"]
fn kill_and_resume_loop() {
    let n = std::env::var("KILL_RESUME_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed = std::env::var("KILL_RESUME_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let report = kill_resume_loop(n, seed);
    assert_eq!(report.kills, n);
}

#[test]
fn a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::new(dir.path());
    let reference_out = dir.path().join("reference");
    run.run_to_end(&reference_out);
    let out = dir.path().join("run");
    let paused = run.command(&out).args(["--stop-at", "4"]).output().unwrap();
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
    let previous = out.join("checkpoints/step-000004");
    let before: Vec<(String, Vec<u8>)> = common::files_under(&previous)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(previous.join(&f)).unwrap()))
        .collect();
    assert_eq!(before.len(), 3, "{before:?}");

    // Resume with files limited to 8 blocks (4 KiB with dash, 8 KiB with bash): the
    // metrics lines fit, the next checkpoint's tensors do not. SIGXFSZ is ignored, so the
    // write fails with EFBIG as it would on a full disk.
    let mut c = run.command(&out);
    let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_os_string()).collect();
    c = Command::new("sh");
    c.arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_peft"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let full = c.output().unwrap();
    let err = String::from_utf8_lossy(&full.stderr).to_string();
    assert!(!full.status.success(), "the write did not fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for want in [
        "cannot write the checkpoint of step 5",
        "File too large",
        "step-000004` is intact",
        "--resume",
    ] {
        assert!(err.contains(want), "`{want}` missing from: {err}");
    }
    for (f, bytes) in &before {
        assert_eq!(
            &std::fs::read(previous.join(f)).unwrap(),
            bytes,
            "{f} of the previous checkpoint changed"
        );
    }
    let left = common::files_under(&out.join("checkpoints"));
    assert!(
        left.iter().all(|f| !f.starts_with(".tmp")),
        "a failed checkpoint left {left:?}"
    );
    // With space again, the run resumes from step 4 and ends as the uninterrupted one.
    run.run_to_end(&out);
    assert!(
        outcome(&out) == outcome(&reference_out),
        "the resumed run differs"
    );
}
