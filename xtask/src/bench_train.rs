//! `cargo xtask bench train`: tokens per second and peak memory of a full training step on
//! SmolLM2-135M's architecture, per method and backend, each in a process of its own; with
//! `--compare-python`, the same step in Hugging Face transformers + peft in the same run,
//! and the ratios.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{root, run};

struct Options {
    methods: Vec<String>,
    backends: Vec<String>,
    shape: Vec<(String, String)>,
    compare_python: bool,
    python: Option<String>,
    threads: usize,
}

const USAGE: &str = "cargo xtask bench train [--methods lora,qlora,full] [--backends flex,ndarray] \
[--batch 4] [--seq-len 128] [--rank 16] [--layers 30] [--steps 5] [--warmup 2] \
[--compare-python] [--python PATH] [--threads N]";

fn parse(args: &[String]) -> Result<Options> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Options {
        methods: vec!["lora".into(), "qlora".into(), "full".into()],
        backends: vec!["flex".into(), "ndarray".into()],
        shape: Vec::new(),
        compare_python: false,
        python: std::env::var("PEFT_BENCH_PYTHON").ok(),
        threads,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--compare-python" {
            o.compare_python = true;
            continue;
        }
        let Some(value) = it.next() else {
            bail!("`{flag}` needs a value\nusage: {USAGE}");
        };
        let list = || value.split(',').map(str::to_string).collect::<Vec<_>>();
        match flag.as_str() {
            "--methods" => o.methods = list(),
            "--backends" => o.backends = list(),
            "--python" => o.python = Some(value.clone()),
            "--threads" => {
                o.threads = value
                    .parse()
                    .with_context(|| format!("--threads takes a number, not `{value}`"))?;
            }
            "--batch" | "--seq-len" | "--rank" | "--layers" | "--steps" | "--warmup" => {
                value
                    .parse::<usize>()
                    .with_context(|| format!("`{flag}` takes a number, not `{value}`"))?;
                o.shape.push((flag.clone(), value.clone()));
            }
            _ => bail!("unknown flag `{flag}`\nusage: {USAGE}"),
        }
    }
    Ok(o)
}

/// Runs a command that prints one JSON line last; returns it, or the failure as text.
fn json_of(cmd: &mut Command) -> Result<Value, String> {
    let out = cmd.output().map_err(|e| format!("cannot start: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!(
            "failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("no JSON line in its output: {stdout}"))
}

/// The Python interpreter with torch, transformers and peft: `--python`,
/// `$PEFT_BENCH_PYTHON`, or a virtual environment `.bench-venv` made here with pip.
fn python(o: &Options) -> Result<String> {
    if let Some(p) = &o.python {
        return Ok(p.clone());
    }
    let venv = root().join(".bench-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        println!(
            "making a Python environment for the comparison in {}",
            venv.display()
        );
        run("python3", &["-m", "venv", &venv.display().to_string()])?;
    }
    let py = py.display().to_string();
    run(
        &py,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "-r",
            "scripts/bench/requirements.txt",
        ],
    )?;
    Ok(py)
}

fn gb(v: &Value) -> String {
    v["peak_rss_bytes"]
        .as_f64()
        .map_or("-".into(), |b| format!("{:.2} GB", b / 1e9))
}

/// `cargo xtask bench train [...]`.
pub fn bench_train(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let mut features = Vec::new();
    for b in &o.backends {
        match b.as_str() {
            "flex" | "ndarray" => {}
            "wgpu" | "cuda" => features.push(format!("peft-benches/{b}")),
            _ => bail!("unknown backend `{b}` (flex, ndarray, wgpu, cuda)"),
        }
    }
    let mut build = vec![
        "build",
        "--release",
        "-p",
        "peft-benches",
        "--bin",
        "train-step",
    ];
    let features = features.join(",");
    if !features.is_empty() {
        build.extend(["--features", &features]);
    }
    run("cargo", &build)?;
    let bin = root().join("target/release/train-step");
    let shape_args: Vec<String> = o
        .shape
        .iter()
        .flat_map(|(k, v)| [k.clone(), v.clone()])
        .collect();
    let threads = o.threads.to_string();
    let mut rows: Vec<(String, String, Result<Value, String>)> = Vec::new();
    for backend in &o.backends {
        for method in &o.methods {
            println!(
                "\n$ train-step --method {method} --backend {backend} {}",
                shape_args.join(" ")
            );
            let r = json_of(
                Command::new(&bin)
                    .args(["--method", method, "--backend", backend])
                    .args(&shape_args)
                    .env("RAYON_NUM_THREADS", &threads)
                    .current_dir(root()),
            );
            match &r {
                Ok(v) => println!("{v}"),
                Err(e) => println!("{e}"),
            }
            rows.push((method.clone(), backend.clone(), r));
        }
    }
    let mut python_rows: Vec<(String, Result<Value, String>)> = Vec::new();
    if o.compare_python {
        let py = python(&o)?;
        for method in &o.methods {
            println!(
                "\n$ python scripts/bench/train_step.py --method {method} --threads {threads}"
            );
            let r = json_of(
                Command::new(&py)
                    .arg("-P")
                    .arg("scripts/bench/train_step.py")
                    .args(["--method", method, "--threads", &threads])
                    .args(&shape_args)
                    .env("OMP_NUM_THREADS", &threads)
                    .current_dir(root()),
            );
            match &r {
                Ok(v) => println!("{v}"),
                Err(e) => println!("{e}"),
            }
            python_rows.push((method.clone(), r));
        }
    }

    println!(
        "\n| method | backend | trainable | tokens/s | peak RSS | tokens/s vs HF peft | memory vs HF peft |"
    );
    println!("|---|---|---|---|---|---|---|");
    let reference = |m: &str| {
        python_rows
            .iter()
            .find(|(pm, _)| pm == m)
            .and_then(|(_, r)| r.as_ref().ok())
    };
    let mut report = Vec::new();
    for (method, backend, r) in &rows {
        match r {
            Ok(v) => {
                let (speed, mem) = match reference(method) {
                    Some(p) => (
                        format!(
                            "{:.2}x",
                            v["tokens_per_s"].as_f64().unwrap_or(0.0)
                                / p["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
                        ),
                        format!(
                            "{:.2}x",
                            v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN)
                                / p["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN)
                        ),
                    ),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "| {method} | {backend} | {} | {:.1} | {} | {speed} | {mem} |",
                    v["trainable"],
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                    gb(v)
                );
                report.push(v.clone());
            }
            Err(e) => println!("| {method} | {backend} | - | - | - | {e} | |"),
        }
    }
    for (method, r) in &python_rows {
        match r {
            Ok(v) => {
                println!(
                    "| {method} | {} | {} | {:.1} | {} | 1.00x | 1.00x |",
                    v["backend"].as_str().unwrap_or("pytorch"),
                    v["trainable"],
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                    gb(v)
                );
                report.push(v.clone());
            }
            Err(e) => println!("| {method} | HF peft | - | - | - | {e} | |"),
        }
    }
    let path: PathBuf = root().join("target/bench-train.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\n(written to {})", path.display());
    Ok(())
}
