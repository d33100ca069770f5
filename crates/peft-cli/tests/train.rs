//! `peft train` and `peft eval` through the binary.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn smollm2() -> Option<PathBuf> {
    let p = peft_models_path();
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipped: {} not found (cargo xtask fetch-model smollm2)",
            p.display()
        );
        None
    }
}

fn peft_models_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SMOLLM2_GGUF") {
        return p.into();
    }
    let cache = std::env::var_os("PEFT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/burn-peft/models")
        });
    cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn demo_lines(file: &str, range: std::ops::Range<usize>, to: &Path) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/demo")
            .join(file),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().skip(range.start).take(range.len()).collect();
    std::fs::write(to, lines.join("\n") + "\n").unwrap();
}

#[test]
fn train_pauses_resumes_and_writes_everything_then_eval_reads_the_adapter() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (train, val, test) = (
        dir.path().join("train.jsonl"),
        dir.path().join("val.jsonl"),
        dir.path().join("test.jsonl"),
    );
    demo_lines("train.jsonl", 0..8, &train);
    demo_lines("val.jsonl", 0..2, &val);
    demo_lines("test.jsonl", 0..2, &test);
    let out = dir.path().join("run");
    let config = dir.path().join("run.toml");
    // The file sets a rank the flags do not, and a learning rate a flag overrides.
    std::fs::write(
        &config,
        "rank = 4\nlr = 0.5\nbatch_size = 2\nmax_steps = 2\nseq_len = 192\nmax_new_tokens = 24\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            config.display().to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            train.display().to_string(),
            "--val-data".into(),
            val.display().to_string(),
            "--eval-data".into(),
            test.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--lr".into(),
            "1e-3".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let paused = Command::cargo_bin("peft")
        .unwrap()
        .args(args(&["--stop-at", "1"]))
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&paused.get_output().stdout).to_string();
    assert!(stdout.contains("paused at step 1"), "{stdout}");
    assert!(
        !out.join("adapter").exists(),
        "a paused run writes no final adapter"
    );
    // Without --resume the directory is protected.
    let refused = Command::cargo_bin("peft")
        .unwrap()
        .args(args(&[]))
        .assert()
        .failure();
    assert!(String::from_utf8_lossy(&refused.get_output().stderr).contains("--resume"));

    let done = Command::cargo_bin("peft")
        .unwrap()
        .args(args(&["--resume"]))
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&done.get_output().stdout).to_string();
    assert!(stdout.contains("| exact match (test) |"), "{stdout}");

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        assert!(l["loss"].as_f64().unwrap().is_finite());
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0);
        // lr 1e-3 from the flag, not 0.5 from the file (warm-up of 1 step: 0, then 1e-3).
        assert!(l["lr"].as_f64().unwrap() <= 1e-3);
    }
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "loss.png",
        "README.md",
        "results.json",
        "answers.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4, "rank from the config file");
    assert_eq!(cfg["peft_type"], "LORA");

    let eval = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
            "--data",
            test.to_str().unwrap(),
            "--max-new-tokens",
            "24",
            "--json",
        ])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&eval.get_output().stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite());
    assert_eq!(v["exact_match"]["total"], 2);
    // The run's own "after" validation numbers and eval agree on the test answers.
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        results["after"]["exact_match"][0],
        v["exact_match"]["correct"]
    );
}

#[test]
fn train_explains_bad_options_before_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--data", "x.jsonl", "--out", "o"],
            "--model is required",
        ),
        (
            &[
                "train",
                "--model",
                "m",
                "--data",
                "x.jsonl",
                "--out",
                "o",
                "--method",
                "ia3",
                "--quantize",
                "nf4",
            ],
            "trains LoRA over the 4-bit base",
        ),
        (
            &[
                "train",
                "--model",
                "m",
                "--data",
                "x.jsonl",
                "--out",
                "o",
                "--quantize",
                "int8",
            ],
            "nf4 or fp4",
        ),
        (
            &[
                "train", "--model", "m", "--data", "x.jsonl", "--out", "o", "--method", "nope",
            ],
            "unknown --method",
        ),
        (
            &[
                "train",
                "--model",
                "m",
                "--data",
                "x.jsonl",
                "--out",
                "o",
                "--schedule",
                "steps",
            ],
            "unknown --schedule",
        ),
    ];
    for (args, want) in cases {
        let a = Command::cargo_bin("peft")
            .unwrap()
            .current_dir(dir.path())
            .args(*args)
            .assert()
            .failure();
        let err = String::from_utf8_lossy(&a.get_output().stderr).to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "rnak = 4\n").unwrap();
    let a = Command::cargo_bin("peft")
        .unwrap()
        .args(["train", "--config", bad.to_str().unwrap()])
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&a.get_output().stderr).to_string();
    assert!(err.contains("rnak"), "{err}");
}

#[test]
fn a_malformed_data_line_is_reported_with_its_line_number() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"fine\"}\n\n{\"prompt\": \"no completion\"}\n",
    )
    .unwrap();
    let a = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            dir.path().join("o").to_str().unwrap(),
        ])
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&a.get_output().stderr).to_string();
    assert!(err.contains("d.jsonl:3:"), "{err}");
}

/// Runs `peft` with `args`, asserting success; returns its standard output.
fn peft_ok(args: &[&str]) -> String {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args(args)
        .assert()
        .success();
    String::from_utf8_lossy(&out.get_output().stdout).to_string()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn jsonl_file(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_then_reward_dpo_and_ppo_run_end_to_end_at_a_tiny_scale() {
    // The worked example of docs/rlhf.md (`cargo xtask rlhf-demo`), shrunk: SFT on 4
    // examples, then a reward model, DPO and PPO, each starting from the SFT adapter.
    let Some(model) = smollm2() else { return };
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    demo_lines("train.jsonl", 0..4, Path::new(&p("t.jsonl")));
    demo_lines("preferences.jsonl", 0..4, Path::new(&p("p.jsonl")));
    demo_lines("preferences_val.jsonl", 0..2, Path::new(&p("pv.jsonl")));
    let (sft, sft_adapter) = (p("sft"), p("sft/adapter"));
    // No warm-up, so that both steps move the adapter (a warm-up step has learning rate 0).
    peft_ok(&[
        "train",
        "--model",
        model,
        "--data",
        &p("t.jsonl"),
        "--out",
        &sft,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "0",
        "--val-fraction",
        "0",
    ]);

    // The reward model over the SFT model records what it was trained over.
    let rm = p("rm");
    let stdout = peft_ok(&[
        "reward",
        "--model",
        model,
        "--from-adapter",
        &sft_adapter,
        "--data",
        &p("p.jsonl"),
        "--val-data",
        &p("pv.jsonl"),
        "--out",
        &rm,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "0",
    ]);
    assert!(stdout.contains("| accuracy |"), "{stdout}");
    let recorded = json_file(&Path::new(&rm).join("results.json"))["from_adapter"].clone();
    let canonical = std::fs::canonicalize(&sft_adapter).unwrap();
    assert_eq!(recorded, serde_json::json!([canonical.to_str().unwrap()]));

    // DPO from the SFT adapter: its reference is the SFT model, not the base.
    let dpo = p("dpo");
    let stdout = peft_ok(&[
        "dpo",
        "--model",
        model,
        "--from-adapter",
        &sft_adapter,
        "--data",
        &p("p.jsonl"),
        "--val-data",
        &p("pv.jsonl"),
        "--out",
        &dpo,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--beta",
        "0.1",
        "--loss-type",
        "sigmoid",
    ]);
    assert!(stdout.contains("| margin |"), "{stdout}");
    // 2 steps of 2 pairs take all 4 training pairs: no reference pass is skipped.
    assert!(
        stdout.contains("reference log-probabilities of 4 training and 2 validation pairs"),
        "{stdout}"
    );
    let lines = jsonl_file(&Path::new(&dpo).join("metrics.jsonl"));
    assert_eq!(lines.len(), 2);
    for l in &lines {
        for k in [
            "loss",
            "rewards_chosen",
            "rewards_rejected",
            "margin",
            "accuracy",
        ] {
            assert!(l[k].as_f64().unwrap().is_finite(), "{k} in {l}");
        }
    }
    // The first step starts from a no-op adapter: policy = reference, loss = ln 2.
    let first = lines[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-3, "{first}");
    let results = json_file(&Path::new(&dpo).join("results.json"));
    assert!((results["before"]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-3);
    assert_eq!(results["before"]["margin"].as_f64().unwrap(), 0.0);
    assert!(results["after"]["margin"].as_f64().unwrap().is_finite());
    assert!(
        Path::new(&dpo)
            .join("adapter/adapter_model.safetensors")
            .exists()
    );
    // The reference log-probability of the chosen answers is what `peft eval` gives for
    // them with the SFT adapter, and differs from the base model's.
    let chosen = p("chosen.jsonl");
    let records: String = std::fs::read_to_string(p("pv.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&chosen, records).unwrap();
    let logp = |adapter: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--data",
            &chosen,
            "--no-generate",
            "--json",
        ];
        args.extend(adapter);
        let v: serde_json::Value = serde_json::from_str(&peft_ok(&args)).unwrap();
        // Mean over the 2 pairs of each answer's summed log-probability.
        -v["loss"].as_f64().unwrap() * v["targets"].as_f64().unwrap() / 2.0
    };
    let (with_sft, base) = (logp(&["--adapter", &sft_adapter, "--merge"]), logp(&[]));
    let reference = results["reference"]["val_logp_chosen"].as_f64().unwrap();
    assert!(
        (reference - with_sft).abs() < 1e-2,
        "{reference} vs {with_sft}"
    );
    assert!(
        (reference - base).abs() > 0.1,
        "SFT changed nothing: {reference} vs {base}"
    );

    // PPO from the SFT adapter, scored by the reward model on the SFT model.
    let (ppo, rm_adapter, pv) = (p("ppo"), p("rm/adapter"), p("pv.jsonl"));
    let ppo_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<&str> = vec![
            "ppo",
            "--model",
            model,
            "--from-adapter",
            &sft_adapter,
            "--reward-model",
            &rm_adapter,
            "--data",
            &pv,
            "--val-data",
            &pv,
            "--out",
            &ppo,
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--ppo-epochs",
            "2",
            "--max-new-tokens",
            "3",
            "--rank",
            "4",
        ];
        v.extend(extra);
        v.into_iter().map(String::from).collect()
    };
    // Without --reward-from-adapter the reward head would score the bare base: refused.
    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args(ppo_args(&[]))
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&bad.get_output().stderr).to_string();
    assert!(err.contains("--reward-from-adapter"), "{err}");
    let stdout = peft_ok(
        &ppo_args(&["--reward-from-adapter", &sft_adapter])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(stdout.contains("mean reward-model score"), "{stdout}");
    let lines = jsonl_file(&Path::new(&ppo).join("metrics.jsonl"));
    assert_eq!(lines.len(), 2);
    for k in [
        "objective/kl",
        "objective/scores",
        "policy/clipfrac",
        "loss/value",
    ] {
        assert!(
            lines[0][k].as_f64().unwrap().is_finite(),
            "{k} in {}",
            lines[0]
        );
    }
    // A fresh adapter: the first rollout's policy is the reference.
    assert!(lines[0]["objective/kl"].as_f64().unwrap().abs() < 1e-3);
    let results = json_file(&Path::new(&ppo).join("results.json"));
    for when in ["before", "after"] {
        assert!(
            results[when]["reward"].as_f64().unwrap().is_finite(),
            "{results}"
        );
        let len = results[when]["completion_length"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 3.0, "{results}");
    }
    assert_eq!(jsonl_file(&Path::new(&ppo).join("answers.jsonl")).len(), 2);
    assert!(
        Path::new(&ppo)
            .join("adapter/adapter_model.safetensors")
            .exists()
    );

    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "dpo",
            "--model",
            model,
            "--data",
            &p("p.jsonl"),
            "--out",
            &p("x"),
        ])
        .args(["--loss-type", "nope"])
        .assert()
        .failure();
    assert!(String::from_utf8_lossy(&bad.get_output().stderr).contains("unknown DPO loss"));
}

#[test]
fn every_method_trains_a_step_and_writes_its_files() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("t.jsonl");
    demo_lines("train.jsonl", 0..4, &data);
    for (method, peft_type) in [
        ("ia3", "IA3"),
        ("adapter", "BOTTLENECK"),
        ("qlora", "LORA"),
        ("prompt", "PROMPT_TUNING"),
        ("p-tuning", "P_TUNING"),
        ("prefix", "PREFIX_TUNING"),
    ] {
        let out = dir.path().join(method);
        let run = Command::cargo_bin("peft")
            .unwrap()
            .args([
                "train",
                "--model",
                model.to_str().unwrap(),
                "--method",
                method,
                "--data",
                data.to_str().unwrap(),
            ])
            .args([
                "--out",
                out.to_str().unwrap(),
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--val-fraction",
                "0",
            ])
            .assert()
            .success();
        let stdout = String::from_utf8_lossy(&run.get_output().stdout).to_string();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type, "{method}");
        let line: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert!(
            line["loss"].as_f64().unwrap().is_finite(),
            "{method}: {line}"
        );
        if method == "qlora" {
            assert!(stdout.contains("bytes per weight"), "{stdout}");
        }
    }
    // BitFit on a model without biases stops with an explanation instead of training nothing.
    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "bitfit",
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--out", dir.path().join("b").to_str().unwrap()])
        .assert()
        .failure();
    assert!(String::from_utf8_lossy(&bad.get_output().stderr).contains("no bias parameters"));
}

#[test]
fn reward_then_grpo_run_end_to_end_at_a_tiny_scale() {
    // The reward and GRPO stages of docs/rlhf.md on the base model, shrunk: a reward model
    // from 4 preference pairs in 1 step, then 1 GRPO step on 2 prompts against it (PPO is
    // in the SFT chain above).
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (prefs, prefs_val) = (dir.path().join("p.jsonl"), dir.path().join("pv.jsonl"));
    demo_lines("preferences.jsonl", 0..4, &prefs);
    demo_lines("preferences_val.jsonl", 0..2, &prefs_val);
    let out_dir = dir.path().join("rm");
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args(["reward", "--model", model.to_str().unwrap()])
        .args([
            "--data",
            prefs.to_str().unwrap(),
            "--val-data",
            prefs_val.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ])
        .args([
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--lr",
            "1e-3",
            "--method",
            "lora",
        ])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(stdout.contains("| accuracy |"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    for k in [
        "loss",
        "accuracy",
        "margin",
        "rewards_chosen",
        "val_accuracy",
    ] {
        assert!(
            lines[0][k].as_f64().unwrap().is_finite(),
            "{k} in {}",
            lines[0]
        );
    }
    for f in ["loss.png", "README.md", "results.json"] {
        assert!(out_dir.join(f).exists(), "no {f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let inspect = Command::cargo_bin("peft")
        .unwrap()
        .args(["inspect-adapter", "--json"])
        .arg(out_dir.join("adapter"))
        .assert()
        .success();
    let report = String::from_utf8_lossy(&inspect.get_output().stdout).to_string();
    assert!(report.contains("base_model.model.score.weight"), "{report}");

    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args(["reward", "--model", model.to_str().unwrap()])
        .args(["--data", prefs.to_str().unwrap(), "--out"])
        .arg(dir.path().join("x"))
        .arg("--center-rewards-coefficient=-1")
        .assert()
        .failure();
    assert!(
        String::from_utf8_lossy(&bad.get_output().stderr).contains("center-rewards-coefficient")
    );

    let grpo = dir.path().join("grpo");
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args(["grpo", "--model", model.to_str().unwrap(), "--reward-model"])
        .arg(out_dir.join("adapter"))
        .args(["--data", prefs_val.to_str().unwrap(), "--out"])
        .arg(&grpo)
        .args([
            "--val-fraction",
            "0",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
        ])
        .args([
            "--num-generations",
            "2",
            "--max-new-tokens",
            "3",
            "--rank",
            "4",
        ])
        .args(["--beta", "0.04"])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(stdout.contains("mean sampled reward"), "{stdout}");
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(grpo.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for k in ["loss", "reward", "reward_std", "completion_length", "kl"] {
        assert!(line[k].as_f64().unwrap().is_finite(), "{k} in {line}");
    }
    assert!(grpo.join("adapter/adapter_model.safetensors").exists());
    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args(["grpo", "--model", model.to_str().unwrap(), "--reward-model"])
        .arg(dir.path())
        .args(["--data", prefs.to_str().unwrap(), "--out"])
        .arg(dir.path().join("y"))
        .assert()
        .failure();
    assert!(String::from_utf8_lossy(&bad.get_output().stderr).contains("peft reward"));
}
