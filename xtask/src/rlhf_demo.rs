//! `cargo xtask rlhf-demo`: the worked example of docs/rlhf.md end to end on the demo model
//! (SmolLM2-135M-Instruct) on the CPU: supervised fine-tuning on the extraction task, a
//! reward model on the preference pairs, then DPO and PPO, both starting from the SFT
//! adapter (PPO scored by that reward model). Each stage is the release `peft` binary with
//! the settings below; the run goes into `runs/rlhf-demo-<time>/` (one directory per
//! stage plus `SUMMARY.md` and `summary.json`), and the before/after numbers of every stage
//! and the wall times are printed at the end.
//!
//! `--out DIR` chooses the directory; `--device D` is passed to every stage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{fetch_model, peft_binary, root, run};

/// The settings of every stage, sized so that the chain takes well under 20 minutes on a
/// 2-core CPU (docs/rlhf.md has the measured times).
const SFT: &[&str] = &[
    "--max-steps",
    "12",
    "--eval-every",
    "6",
    "--save-every",
    "1000",
];
const REWARD: &[&str] = &[
    "--max-steps",
    "10",
    "--batch-size",
    "8",
    "--rank",
    "8",
    "--alpha",
    "16",
    "--lr",
    "2e-3",
    "--seq-len",
    "256",
    "--eval-every",
    "5",
    "--save-every",
    "1000",
];
const DPO: &[&str] = &[
    "--max-steps",
    "15",
    "--batch-size",
    "4",
    "--rank",
    "16",
    "--alpha",
    "32",
    "--lr",
    "5e-4",
    "--beta",
    "0.1",
    "--seq-len",
    "256",
    "--eval-every",
    "5",
    "--save-every",
    "1000",
];
const PPO: &[&str] = &[
    "--max-steps",
    "40",
    "--batch-size",
    "4",
    "--ppo-epochs",
    "4",
    "--max-new-tokens",
    "32",
    "--rank",
    "8",
    "--alpha",
    "16",
    "--lr",
    "5e-4",
    "--kl-coef",
    "0.05",
    "--seq-len",
    "256",
    "--save-every",
    "1000",
];

struct Stage {
    name: &'static str,
    dir: PathBuf,
    seconds: f64,
}

/// Runs the chain; `args` may hold `--out DIR` and `--device D`.
pub fn rlhf_demo(args: &[String]) -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut device: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out needs a directory")?.into()),
            "--device" => device = Some(it.next().context("--device needs a value")?.clone()),
            o => bail!("rlhf-demo takes --out DIR and --device D, not `{o}`"),
        }
    }
    fetch_model(&["smollm2".to_string()])?;
    run("cargo", &["build", "--release", "-p", "peft-cli"])?;
    let out = out.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        root().join(format!("runs/rlhf-demo-{stamp}"))
    });
    if out.join("summary.json").exists() {
        bail!(
            "{} already holds a finished run; choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let peft = peft_binary();
    let demo = root().join("data/demo");
    let s = |p: &Path| p.display().to_string();
    let (prefs, prefs_val) = (
        s(&demo.join("preferences.jsonl")),
        s(&demo.join("preferences_val.jsonl")),
    );
    let sft_adapter = s(&out.join("sft/adapter"));
    let with_device = |mut v: Vec<String>| {
        if let Some(d) = &device {
            v.extend(["--device".to_string(), d.clone()]);
        }
        v
    };
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let started = Instant::now();
    let mut stages = Vec::new();

    // 1. SFT: the demo's LoRA on the extraction task, shorter.
    let mut cmd = owned(&["train", "--config"]);
    cmd.push(s(&demo.join("demo.toml")));
    cmd.extend(["--out".into(), s(&out.join("sft"))]);
    cmd.extend(owned(SFT));
    stages.push(stage("sft", &peft, with_device(cmd), &out)?);

    // 2. The reward model, over the SFT model; 3. DPO from the SFT adapter (the SFT model
    // is the reference). Both train on the preference pairs.
    for (name, command, flags) in [("rm", "reward", REWARD), ("dpo", "dpo", DPO)] {
        let mut cmd = owned(&[command, "--model", "smollm2", "--from-adapter"]);
        cmd.push(sft_adapter.clone());
        cmd.extend(["--data".into(), prefs.clone()]);
        cmd.extend(["--val-data".into(), prefs_val.clone()]);
        cmd.extend(["--out".into(), s(&out.join(name))]);
        cmd.extend(owned(flags));
        stages.push(stage(name, &peft, with_device(cmd), &out)?);
    }

    // 4. PPO from the SFT adapter against the reward model (which was trained over it).
    let mut cmd = owned(&["ppo", "--model", "smollm2", "--from-adapter"]);
    cmd.push(sft_adapter.clone());
    cmd.extend(["--reward-model".into(), s(&out.join("rm/adapter"))]);
    cmd.extend(["--reward-from-adapter".into(), sft_adapter]);
    cmd.extend(["--data".into(), prefs]);
    cmd.extend(["--val-data".into(), prefs_val]);
    cmd.extend(["--out".into(), s(&out.join("ppo"))]);
    cmd.extend(owned(PPO));
    stages.push(stage("ppo", &peft, with_device(cmd), &out)?);

    let total = started.elapsed().as_secs_f64();
    let summary = summarize(&stages, total)?;
    println!("\n{summary}");
    std::fs::write(out.join("SUMMARY.md"), &summary)?;
    let times: serde_json::Map<String, Value> = stages
        .iter()
        .map(|st| (st.name.to_string(), Value::from(st.seconds)))
        .collect();
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "seconds": times, "total_seconds": total,
        }))?,
    )?;
    println!("wrote {}", out.join("SUMMARY.md").display());
    Ok(())
}

/// Runs one stage of the chain into `out/<name>`, timing it.
fn stage(name: &'static str, peft: &Path, cmd: Vec<String>, out: &Path) -> Result<Stage> {
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let t = Instant::now();
    run(&peft.display().to_string(), &refs)?;
    let seconds = t.elapsed().as_secs_f64();
    println!("{name}: {seconds:.0} s");
    Ok(Stage {
        name,
        dir: out.join(name),
        seconds,
    })
}

fn results(dir: &Path) -> Result<Value> {
    let path = dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Metric lines of a stage's `metrics.jsonl`.
fn metrics(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// The report: each stage's before/after table and the wall times.
fn summarize(stages: &[Stage], total: f64) -> Result<String> {
    use std::fmt::Write as _;
    let mut s = String::from("# RLHF chain on SmolLM2-135M-Instruct\n\n");
    let secs = |name: &str| {
        stages
            .iter()
            .find(|st| st.name == name)
            .map_or(f64::NAN, |st| st.seconds)
    };
    for st in stages {
        let r = results(&st.dir)?;
        let (b, a) = (&r["before"], &r["after"]);
        match st.name {
            "sft" => {
                let em = |v: &Value| {
                    let c = v["exact_match"][0].as_u64().unwrap_or(0);
                    let t = v["exact_match"][1].as_u64().unwrap_or(0);
                    format!("{:.1}% ({c}/{t})", 100.0 * c as f64 / t.max(1) as f64)
                };
                let _ = writeln!(
                    s,
                    "## SFT (LoRA on the extraction task), {:.0} s\n\n| metric | before | after |\n\
                     |---|---|---|\n| exact match (test) | {} | {} |\n| validation loss | {} | {} |\n",
                    secs("sft"),
                    em(b),
                    em(a),
                    num(&b["val"]["loss"]),
                    num(&a["val"]["loss"]),
                );
            }
            "rm" | "dpo" => {
                let title = if st.name == "rm" {
                    "Reward model (Bradley-Terry), validation pairs"
                } else {
                    "DPO from the SFT adapter, validation pairs"
                };
                let _ = writeln!(
                    s,
                    "## {title}, {:.0} s\n\n| metric | before | after |\n|---|---|---|",
                    secs(st.name)
                );
                for k in [
                    "loss",
                    "accuracy",
                    "margin",
                    "rewards_chosen",
                    "rewards_rejected",
                ] {
                    let _ = writeln!(s, "| {k} | {} | {} |", num(&b[k]), num(&a[k]));
                }
                let evals: Vec<String> = metrics(&st.dir)?
                    .iter()
                    .filter(|l| l.get("val_margin").is_some())
                    .map(|l| {
                        format!(
                            "step {}: accuracy {}, margin {}",
                            l["step"],
                            num(&l["val_accuracy"]),
                            num(&l["val_margin"])
                        )
                    })
                    .collect();
                let _ = writeln!(s, "\nvalidation during training: {}\n", evals.join("; "));
                if st.name == "dpo" {
                    let _ = writeln!(
                        s,
                        "The reference (the SFT model) itself: mean log-probability of the \
                         chosen answers {}, of the rejected ones {}.\n",
                        num(&r["reference"]["val_logp_chosen"]),
                        num(&r["reference"]["val_logp_rejected"])
                    );
                }
            }
            "ppo" => {
                let rolls = |k: &str| -> Vec<String> {
                    r["rollouts"][k]
                        .as_array()
                        .map(|v| v.iter().map(num).collect())
                        .unwrap_or_default()
                };
                let _ = writeln!(
                    s,
                    "## PPO from the SFT adapter against the reward model, {:.0} s\n\n\
                     | validation prompts, greedy answers | before | after |\n|---|---|---|\n\
                     | mean reward-model score | {} | {} |\n| mean answer length (tokens) | {} | {} |\n\n\
                     Rollouts (sampled): mean score {}; KL to the SFT model {}.\n",
                    secs("ppo"),
                    num(&b["reward"]),
                    num(&a["reward"]),
                    num(&b["completion_length"]),
                    num(&a["completion_length"]),
                    rolls("scores").join(", "),
                    rolls("kl").join(", "),
                );
            }
            _ => {}
        }
    }
    let _ = writeln!(s, "## Wall time\n\n| stage | seconds |\n|---|---|");
    for st in stages {
        let _ = writeln!(s, "| {} | {:.0} |", st.name, st.seconds);
    }
    let _ = writeln!(s, "| total | {total:.0} ({:.1} min) |", total / 60.0);
    Ok(s)
}
