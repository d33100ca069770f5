//! Loading errors a user can act on: a missing file, an unknown architecture, a tensor of
//! the wrong shape or dtype, a truncated file. Never a panic, never a silent partial load.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use peft_models::{ModelError, load_causal_lm};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load(dir: &Path) -> ModelError {
    load_causal_lm::<NdArray>(dir, &Default::default()).unwrap_err()
}

#[test]
fn a_missing_model_says_what_to_give() {
    let msg = load(Path::new("/nonexistent/model")).to_string();
    assert!(
        msg.contains("/nonexistent/model") && msg.contains("Hugging Face model directory"),
        "{msg}"
    );
    let dir = tempfile::tempdir().unwrap();
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llama_gqa/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn an_unknown_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"falcon\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let err = load(dir.path());
    assert!(
        matches!(err, ModelError::UnknownArchitecture { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("falcon") && err.to_string().contains("qwen2"),
        "{err}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama_gqa"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 96");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let err = load(dir.path());
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("mlp.gate_proj.weight")
            && msg.contains("[64, 32]")
            && msg.contains("[96, 32]"),
        "{msg}"
    );
}

#[test]
fn a_truncated_checkpoint_is_an_error_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen2"), dir.path());
    let bytes = std::fs::read(fixture("qwen2/model.safetensors")).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 3, bytes.len() - 1] {
        std::fs::write(dir.path().join("model.safetensors"), &bytes[..cut]).unwrap();
        let err = load(dir.path());
        assert!(
            matches!(err, ModelError::InvalidFile { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn an_integer_weight_is_refused_with_its_dtype() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("gpt2"), dir.path());
    let bytes = std::fs::read(fixture("gpt2/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for t in &mut owned {
        if t.0 == "transformer.h.0.ln_1.weight" {
            t.1 = Dtype::I32; // same byte size, wrong dtype
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let err = load(dir.path());
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err}");
    assert!(
        err.to_string().contains("ln_1.weight") && err.to_string().contains("I32"),
        "{err}"
    );
}

#[test]
fn a_bert_directory_is_not_loaded_as_a_causal_lm() {
    let msg = load(&fixture("bert_seq_cls")).to_string();
    assert!(msg.contains("BERT"), "{msg}");
}
