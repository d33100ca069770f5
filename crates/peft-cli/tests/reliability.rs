//! Bad inputs through the `peft` binary: each gives a clear error (naming the file, field
//! or shapes), no panic, and no partial output. The rows of docs/reliability.md that are
//! about whole commands live here; the parsers' own rows are in the owning crates' tests.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn peft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peft"))
}

/// Runs a command that must fail; returns its stderr after checking it is an error
/// report, not a panic.
fn fails(cmd: &mut Command) -> String {
    let o: Output = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected a failure; stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "a panic instead of an error: {err}"
    );
    assert!(err.contains("error:"), "no error report: {err}");
    err
}

/// A LoRA adapter made for SmolLM2-135M (hidden size 576) on q_proj of two layers.
fn smollm2_adapter(dir: &Path) -> PathBuf {
    let a = dir.join("smollm2-adapter");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(
        a.join("adapter_config.json"),
        serde_json::json!({
            "peft_type": "LORA",
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "task_type": "CAUSAL_LM",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj"],
        })
        .to_string(),
    )
    .unwrap();
    let mut t = Vec::new();
    for l in 0..2 {
        let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        t.push((
            format!("{p}.lora_A.weight"),
            vec![4, 576],
            vec![0.01f32; 4 * 576],
        ));
        t.push((
            format!("{p}.lora_B.weight"),
            vec![576, 4],
            vec![0.0f32; 576 * 4],
        ));
    }
    common::write_f32_safetensors(&a.join("adapter_model.safetensors"), &t);
    a
}

#[test]
fn an_adapter_for_another_base_names_that_base_and_both_shapes_and_merge_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    let adapter = smollm2_adapter(dir.path());
    let out = dir.path().join("merged");
    let err = fails(
        peft()
            .args(["merge", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out),
    );
    for want in [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_model_name_or_path",
        "lora_A.weight",
        "[4, 576]",
        "[4, 32]",
    ] {
        assert!(err.contains(want), "`{want}` missing from: {err}");
    }
    assert!(!out.exists(), "a failed merge left {}", out.display());
    let logits = dir.path().join("logits.safetensors");
    fails(
        peft()
            .args(["logits", "--ids", "1,2", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&logits),
    );
    assert!(!logits.exists());
}

/// `sh -c 'ulimit -f BLOCKS; exec peft ARGS'` with SIGXFSZ ignored, so a write past the
/// limit fails with EFBIG ("File too large") as on a full disk, instead of killing.
fn with_file_size_limit(blocks: u64, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_peft"))
        .args(args);
    c
}

#[test]
fn merge_and_quantize_leave_no_partial_output_when_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    let adapter = tiny_adapter(dir.path(), "adapter", false);
    for cmd in ["merge", "quantize"] {
        let out = dir.path().join(format!("{cmd}-out"));
        let mut args: Vec<&std::ffi::OsStr> = vec![
            cmd.as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if cmd == "merge" {
            args.extend(["--adapter".as_ref(), adapter.as_os_str()]);
        }
        // 8 blocks: the small JSON files fit, the weights do not.
        let err = fails(&mut with_file_size_limit(8, &args));
        assert!(err.contains("File too large"), "{cmd}: {err}");
        assert!(
            !out.exists(),
            "{cmd}: a failed write left {}",
            out.display()
        );
        let leftovers = common::files_under(dir.path());
        assert!(
            leftovers.iter().all(|f| !f.contains(".partial-")),
            "{cmd}: staging files left: {leftovers:?}"
        );
        // Without the limit the same command succeeds.
        let ok = peft().args(&args).output().unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(out.join("config.json").exists());
    }
}

fn train_args(model: &Path, data: &Path, out: &Path) -> Command {
    let mut c = peft();
    c.args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--max-steps",
            "1",
            "--rank",
            "2",
            "--seq-len",
            "160",
            "--val-fraction",
            "0",
        ]);
    c
}

#[test]
fn targets_that_match_nothing_list_what_exists_and_leave_no_run_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    let data = dir.path().join("d.jsonl");
    common::tiny_data(&data, 4);
    let out = dir.path().join("run");
    let err = fails(train_args(&model, &data, &out).args(["--targets", "c_attn,qkv"]));
    assert!(
        err.contains("c_attn") && err.contains("matched no module"),
        "{err}"
    );
    assert!(err.contains("model.layers.0.self_attn.q_proj"), "{err}");
    let left = common::files_under(&out);
    assert!(
        left.iter()
            .all(|f| !f.starts_with("checkpoints") && !f.starts_with("adapter")),
        "a run that never started left {left:?}"
    );
}

#[test]
fn empty_and_malformed_datasets_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    let cases: &[(&str, &str, &str)] = &[
        ("empty.jsonl", "", "empty.jsonl:0: the file holds no record"),
        (
            "blank.jsonl",
            "\n  \n",
            "blank.jsonl:0: the file holds no record",
        ),
        (
            "bad.jsonl",
            "{\"text\": \"fine\"}\n{\"text\": \"cut",
            "bad.jsonl:2: not valid JSON",
        ),
        (
            "shape.jsonl",
            "{\"text\": \"fine\"}\n\n{\"prompt\": \"no completion\"}\n",
            "shape.jsonl:3: expected an object with `text`",
        ),
        (
            "noassistant.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "noassistant.jsonl:1: `messages` has no assistant turn",
        ),
    ];
    for (name, text, want) in cases {
        let data = dir.path().join(name);
        std::fs::write(&data, text).unwrap();
        let out = dir.path().join(format!("run-{name}"));
        let err = fails(&mut train_args(&model, &data, &out));
        assert!(err.contains(want), "{name}: `{want}` not in {err}");
        assert!(
            common::files_under(&out).is_empty(),
            "{name}: output left in {}",
            out.display()
        );
    }
}

#[test]
fn a_tokenizer_without_an_end_of_sequence_token_is_refused_for_completions() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    // No chat template and no eos anywhere: a completion's end could not be learned.
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();
    std::fs::remove_file(model.join("generation_config.json")).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"backend": "tokenizers", "tokenizer_class": "TokenizersBackend"}"#,
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let data = dir.path().join("d.jsonl");
    common::tiny_data(&data, 4);
    let out = dir.path().join("run");
    let err = fails(&mut train_args(&model, &data, &out));
    assert!(
        err.contains("neither a chat template nor an end-of-sequence token"),
        "{err}"
    );
    assert!(err.contains("eos_token"), "{err}");
    assert!(common::files_under(&out).is_empty());
}

/// A LoRA adapter for the tiny Llama (r = 2 on q_proj), with one NaN in layer 1's
/// `lora_A` when `nan` is set.
fn tiny_adapter(dir: &Path, name: &str, nan: bool) -> PathBuf {
    let adapter = dir.join(name);
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let mut t = Vec::new();
    for l in 0..2 {
        let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        let mut a = vec![0.1f32; 2 * 32];
        if nan && l == 1 {
            a[5] = f32::NAN;
        }
        t.push((format!("{p}.lora_A.weight"), vec![2, 32], a));
        t.push((format!("{p}.lora_B.weight"), vec![32, 2], vec![0.01f32; 64]));
    }
    common::write_f32_safetensors(&adapter.join("adapter_model.safetensors"), &t);
    adapter
}

#[test]
fn nan_weights_in_the_base_or_the_adapter_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(dir.path());
    let adapter = tiny_adapter(dir.path(), "nan-adapter", true);
    let logits = dir.path().join("l.safetensors");
    let err = fails(
        peft()
            .args(["logits", "--ids", "1,2", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&logits),
    );
    assert!(
        err.contains("model.layers.1.self_attn.q_proj.lora_A.weight")
            && err.contains("1 NaN or infinite value(s) out of 64"),
        "{err}"
    );
    assert!(!logits.exists());

    // The base model with an infinite weight.
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["model.norm.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    let mut bytes = bytes;
    let at = 8 + header_len + start;
    bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&weights, bytes).unwrap();
    let err = fails(
        peft()
            .args(["logits", "--ids", "1,2", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&logits),
    );
    assert!(
        err.contains("model.norm.weight") && err.contains("NaN or infinite"),
        "{err}"
    );
}
