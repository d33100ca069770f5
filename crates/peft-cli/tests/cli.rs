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
