//! The `peft` binary on adapters written by Python's peft (peft-core's fixtures).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use assert_cmd::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-core/tests/fixtures")
        .join(name)
}

#[test]
fn inspect_adapter_reports_a_peft_lora_adapter() {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .arg("inspect-adapter")
        .arg(fixture("lora_llama"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peft_type"], "LORA");
    // 3 layers x (q_proj r=4: 4*16+16*4, v_proj r=4: 4*16+8*4, down_proj r=2: 2*32+16*2)
    assert_eq!(v["parameters"], 3 * ((64 + 64) + (64 + 32) + (64 + 32)));
    assert_eq!(v["modules"].as_array().unwrap().len(), 9);
    assert!(v["problems"].as_array().unwrap().is_empty());
}

#[test]
fn inspect_adapter_explains_a_missing_directory() {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .arg("inspect-adapter")
        .arg("/nonexistent/adapter")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/adapter") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn inspect_adapter_flags_tensors_that_disagree_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(fixture("lora_llama/adapter_config.json")).unwrap();
    // Claim rank 8 for modules whose tensors have rank 4.
    std::fs::write(
        dir.path().join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    std::fs::copy(
        fixture("lora_llama/adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let out = Command::cargo_bin("peft")
        .unwrap()
        .arg("inspect-adapter")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("do not have rank 8"), "{stdout}");
}

#[test]
fn help_lists_the_commands() {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("inspect-adapter"));
}

fn models_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-models/tests/fixtures")
        .join(name)
}

fn read_f32(path: &std::path::Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    (
        t.shape().to_vec(),
        t.data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

#[test]
fn logits_match_transformers_through_the_binary() {
    // The fixture's ids and logits were made by transformers (scripts/fixtures/models.py).
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("logits.safetensors");
    for model in ["llama_gqa", "gpt2"] {
        let out = Command::cargo_bin("peft")
            .unwrap()
            .args(["logits", "--model"])
            .arg(models_fixture(model))
            .args(["--ids", "1,17,42,99,5,63,120", "--out"])
            .arg(&out_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (shape, got) = read_f32(&out_file, "logits");
        let (ref_shape, expected) =
            read_f32(&models_fixture(model).join("logits.safetensors"), "logits");
        assert_eq!(shape, ref_shape);
        let diff = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{model}: {diff}");
    }
}

#[test]
fn logits_refuses_ids_outside_the_vocabulary() {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args(["logits", "--model"])
        .arg(models_fixture("gpt2"))
        .args(["--ids", "1,999", "--out", "/tmp/never-written.safetensors"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("999"));
}

#[test]
fn inspect_lists_the_targetable_layers() {
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args(["inspect", "--json", "--model"])
        .arg(models_fixture("qwen2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["linear_layers"].as_array().unwrap().len(), 2 * 7);
    assert_eq!(
        v["target_names"],
        serde_json::json!([
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ])
    );
    assert_eq!(v["output_head"], serde_json::json!(["lm_head"]));
    // The parameter count equals the sum of the checkpoint's tensors (embeddings tied).
    let bytes = std::fs::read(models_fixture("qwen2").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let total: usize = st
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    assert_eq!(v["parameters"], total);
}

#[test]
fn generate_with_smollm2_gives_transformers_answer() {
    let path = std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/burn-peft/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "skipped: {} not found (cargo xtask fetch-model smollm2)",
            path.display()
        );
        return;
    }
    let out = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "generate",
            "--chat",
            "--max-new-tokens",
            "20",
            "--prompt",
            "What is the capital of France?",
            "--model",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // transformers' greedy answer to the same chat prompt.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models_fixture("smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        reference["greedy_text"].as_str().unwrap()
    );
}

fn lora_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-lora/tests/fixtures")
        .join(name)
}

fn run_logits(
    model: &std::path::Path,
    extra: &[&std::ffi::OsStr],
    out: &std::path::Path,
) -> Vec<f32> {
    let res = Command::cargo_bin("peft")
        .unwrap()
        .args(["logits", "--ids", "1,17,42,99,5,63,120", "--model"])
        .arg(model)
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    read_f32(out, "logits").1
}

#[test]
fn adapters_and_merge_give_peft_logits() {
    // The adapters and their logits were saved by Python's peft (scripts/fixtures/lora.py).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    for (adapter, base, merge) in [
        ("lora_llama", "llama_gqa", false),
        ("lora_llama", "llama_gqa", true),
        ("dora_llama", "llama_gqa", true),
        ("rslora_llama", "llama_gqa", false),
        ("modules_to_save_llama", "llama_gqa", false),
        ("bias_all_qwen2", "qwen2", true),
        ("lora_bias_qwen2", "qwen2", false),
    ] {
        let a = lora_fixture(adapter);
        let mut extra: Vec<&std::ffi::OsStr> = vec!["--adapter".as_ref(), a.as_os_str()];
        if merge {
            extra.push("--merge".as_ref());
        }
        let got = run_logits(&models_fixture(base), &extra, &out);
        let (_, expected) = read_f32(&lora_fixture(adapter).join("logits.safetensors"), "logits");
        let diff = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{adapter} merge={merge}: {diff}");
    }
}

#[test]
fn merge_writes_a_model_with_the_adapter_folded_in() {
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    let res = Command::cargo_bin("peft")
        .unwrap()
        .args(["merge", "--model"])
        .arg(models_fixture("llama_gqa"))
        .arg("--adapter")
        .arg(lora_fixture("lora_llama"))
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(merged.join(f).exists(), "{f} missing");
    }
    let got = run_logits(&merged, &[], &dir.path().join("l.safetensors"));
    let (_, expected) = read_f32(
        &lora_fixture("lora_llama").join("logits.safetensors"),
        "logits",
    );
    let diff = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "merged model vs peft with the adapter: {diff}");
}

#[test]
fn an_adapter_for_another_model_says_which_shapes_disagree() {
    // lora_gpt2 targets c_attn/c_proj/c_fc, which a Llama does not have.
    let res = Command::cargo_bin("peft")
        .unwrap()
        .args([
            "logits",
            "--ids",
            "1,2",
            "--out",
            "/tmp/never.safetensors",
            "--model",
        ])
        .arg(models_fixture("llama_gqa"))
        .arg("--adapter")
        .arg(lora_fixture("lora_gpt2"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("c_attn") && err.contains("matched no module"),
        "{err}"
    );
}

#[test]
fn every_methods_adapter_runs_through_the_binary_with_peft_logits() {
    // (IA)^3 saved by peft, bottleneck adapters computed in PyTorch, prompt-learning
    // adapters saved by peft: `peft logits` gives their logits (the input's own positions).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (adapter, merge) in [
        ("peft-adapter/tests/fixtures/ia3_llama", false),
        ("peft-adapter/tests/fixtures/ia3_llama", true),
        ("peft-adapter/tests/fixtures/bn_seq_llama", false),
        ("peft-prompt/tests/fixtures/prompt_tuning", false),
        ("peft-prompt/tests/fixtures/p_tuning_lstm", false),
        ("peft-prompt/tests/fixtures/prefix_projection", false),
    ] {
        let a = root.join(adapter);
        let mut extra: Vec<&std::ffi::OsStr> = vec!["--adapter".as_ref(), a.as_os_str()];
        if merge {
            extra.push("--merge".as_ref());
        }
        let got = run_logits(&models_fixture("llama_gqa"), &extra, &out);
        let (_, expected) = read_f32(&a.join("logits.safetensors"), "logits");
        assert_eq!(
            got.len(),
            expected.len(),
            "{adapter}: only the input's own positions"
        );
        let diff = got
            .iter()
            .zip(&expected)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{adapter} merge={merge}: {diff}");
    }
}

#[test]
fn quantize_writes_a_bitsandbytes_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let res = Command::cargo_bin("peft")
        .unwrap()
        .args(["quantize", "--model"])
        .arg(models_fixture("llama_gqa"))
        .args(["--out"])
        .arg(&out)
        .args(["--quant-type", "fp4", "--blocksize", "32"])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["bnb_4bit_quant_type"], "fp4", "{q}");
    assert_eq!(q["load_in_4bit"], true, "{q}");
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let w = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::U8, "packed 4-bit codes");
    assert!(
        st.tensor("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__fp4")
            .is_ok()
    );
    let bad = Command::cargo_bin("peft")
        .unwrap()
        .args(["quantize", "--model"])
        .arg(models_fixture("llama_gqa"))
        .args(["--out"])
        .arg(dir.path().join("x"))
        .args(["--blocksize", "48"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
