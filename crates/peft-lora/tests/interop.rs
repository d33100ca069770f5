//! Interoperability with Python's peft: adapters saved by peft (`fixtures/`, made by
//! `scripts/fixtures/lora.py` on the tiny models of peft-models' fixtures) load here and give
//! peft's logits (LoRA on every linear layer, rsLoRA with a regex target and
//! rank/alpha patterns, DoRA, GPT-2's Conv1D layers); merged they give the same logits;
//! disabled they give the base model's; saved here and loaded back they give the same
//! logits bit for bit. Each test runs on every backend compiled in.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::config::{AdapterConfig, LoraFields};
use peft_core::model;
use peft_lora::{LoraGpt2, LoraLlama, load_adapter, save_adapter};
use peft_models::config::ModelConfig;
use peft_models::weights::SafetensorsSource;
use peft_models::{CausalLm, ForwardInput};

fn models_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-models/tests/fixtures")
        .join(name)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read(name: &str, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture(name).join("logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

const SEQ: [i32; 7] = [1, 17, 42, 99, 5, 63, 120];

fn logits<B: Backend, M: CausalLm<B>>(m: &M, device: &B::Device) -> Vec<f32> {
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(SEQ.to_vec(), [SEQ.len()]), device)
        .unsqueeze::<2>();
    m.forward(ForwardInput::new(ids), None)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn llama<B: Backend>(device: &B::Device) -> LoraLlama<B> {
    let dir = models_fixture("llama_gqa");
    let ModelConfig::Llama(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
        panic!()
    };
    LoraLlama::load(
        &cfg,
        &mut SafetensorsSource::open_dir(&dir).unwrap(),
        device,
    )
    .unwrap()
}

fn gpt2<B: Backend>(device: &B::Device) -> LoraGpt2<B> {
    let dir = models_fixture("gpt2");
    let ModelConfig::Gpt2(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
        panic!()
    };
    LoraGpt2::load(
        &cfg,
        &mut SafetensorsSource::open_dir(&dir).unwrap(),
        device,
    )
    .unwrap()
}

/// The whole round for one adapter: peft's logits, merged, disabled, saved and reloaded.
macro_rules! interop {
    ($model:expr, $name:expr, $device:expr) => {{
        let device = $device;
        let name: &str = $name;
        let mut m = $model;
        let base = logits(&m, device);
        let paths = load_adapter(&mut m, &fixture(name), "default", device).unwrap();
        assert!(!paths.is_empty());
        let expected = read(name, "logits");
        let got = logits(&m, device);
        let d = max_diff(&got, &expected);
        assert!(d < 1e-4, "{name}: max |logits - peft| = {d}");

        // Disabled: the base model's logits, bit for bit, and peft's base logits.
        model::set_adapters_disabled(&mut m, true).unwrap();
        assert!(
            logits(&m, device) == base,
            "{name}: disabled differs from base"
        );
        assert!(
            max_diff(&base, &read(name, "base_logits")) < 1e-4,
            "{name}: base vs transformers"
        );
        model::set_adapters_disabled(&mut m, false).unwrap();

        // Saved here, loaded back: bit for bit.
        let cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        model::delete_adapter(&mut m, "default").unwrap();
        assert!(
            logits(&m, device) == base,
            "{name}: delete left something behind"
        );
        load_adapter(&mut m, dir.path(), "default", device).unwrap();
        assert!(
            logits(&m, device) == got,
            "{name}: save then load changed the logits"
        );
        // Merged: same logits; unmerged: same weights back.
        model::merge_adapters(&mut m, None, true).unwrap();
        let d = max_diff(&logits(&m, device), &expected);
        assert!(d < 1e-4, "{name}: merged differs from peft by {d}");
        model::unmerge_adapters(&mut m).unwrap();
        let d = max_diff(&logits(&m, device), &got);
        assert!(d < 1e-4, "{name}: unmerged differs by {d}");
    }};
}

fn lora_llama<B: AutodiffBackend>(device: &B::Device) {
    interop!(llama::<B::InnerBackend>(device), "lora_llama", device);
}
fn rslora_llama<B: AutodiffBackend>(device: &B::Device) {
    interop!(llama::<B::InnerBackend>(device), "rslora_llama", device);
}
fn dora_llama<B: AutodiffBackend>(device: &B::Device) {
    interop!(llama::<B::InnerBackend>(device), "dora_llama", device);
}
fn lora_gpt2<B: AutodiffBackend>(device: &B::Device) {
    interop!(gpt2::<B::InnerBackend>(device), "lora_gpt2", device);
}

peft_testing::backend_tests!(lora_llama, rslora_llama, dora_llama, lora_gpt2);

/// The other direction: adapters made here (plain LoRA, rsLoRA with patterns, DoRA, LoRA
/// on the embeddings with `modules_to_save = ["lm_head"]`, `lora_bias`), for Python's peft to load
/// (`scripts/fixtures/check_lora_export.py` loads them and compares its logits with the
/// ones written here). Runs only when `PEFT_LORA_EXPORT` names an output directory.
#[test]
fn export_for_python() {
    let Some(out) = std::env::var_os("PEFT_LORA_EXPORT").map(PathBuf::from) else {
        println!(
            "skipped: set PEFT_LORA_EXPORT=DIR to write adapters for scripts/fixtures/check_lora_export.py"
        );
        return;
    };
    type B = burn::backend::NdArray;
    let device = Default::default();
    let configs = [
        (
            "lora",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": false, "task_type": "CAUSAL_LM"}"#,
        ),
        (
            "rslora_patterns",
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true, "target_modules": ".*\\.(k|o|gate)_proj", "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"gate_proj": 3}, "init_lora_weights": false, "task_type": "CAUSAL_LM"}"#,
        ),
        (
            "dora",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "use_dora": true, "target_modules": ["q_proj", "up_proj"], "init_lora_weights": false, "task_type": "CAUSAL_LM"}"#,
        ),
    ];
    // LoRA on the embeddings and q_proj with a trained lm_head (modules_to_save), and
    // lora_bias: the whole-module entry points.
    let full = [
        (
            "embedding_modules_to_save",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"], "init_lora_weights": false, "task_type": "CAUSAL_LM"}"#,
        ),
        (
            "lora_bias",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "up_proj"], "lora_bias": true, "init_lora_weights": false, "task_type": "CAUSAL_LM"}"#,
        ),
    ];
    for (name, json) in full {
        use peft_lora::LoraModel;
        let cfg = AdapterConfig::<LoraFields>::from_json_str(json)
            .unwrap()
            .with_base_model("llama_gqa");
        let dir = models_fixture("llama_gqa");
        let ModelConfig::Llama(mc) = ModelConfig::from_dir(&dir).unwrap() else {
            panic!()
        };
        let mut m = peft_lora::LoraLlamaWithEmbedding::<B>::load(
            &mc,
            &mut SafetensorsSource::open_dir(&dir).unwrap(),
            &device,
        )
        .unwrap();
        peft_lora::add_adapter_full(&mut m, "default", &cfg.method, &device).unwrap();
        // Train the head a little (a fixed change), so saving it matters.
        if cfg.method.modules_to_save.is_some() {
            let head = m.module_tensors("lm_head").remove(0).1;
            let moved: Vec<f32> = head
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, v)| v * 1.1 + (i % 7) as f32 * 1e-3)
                .collect();
            m.set_module_tensor(
                "lm_head",
                "weight",
                TensorData::new(moved, head.shape.clone()),
            )
            .unwrap();
        }
        let out_dir = out.join(name);
        peft_lora::save_adapter_full(&m, "default", &cfg, &out_dir).unwrap();
        let l = logits(&m, &device);
        peft_core::format::TensorFile::write(
            out_dir.join("burn_logits.safetensors"),
            vec![("logits".into(), TensorData::new(l, [SEQ.len(), 256]))],
        )
        .unwrap();
    }
    for (name, json) in configs {
        let cfg = AdapterConfig::<LoraFields>::from_json_str(json)
            .unwrap()
            .with_base_model("llama_gqa");
        let mut m = llama::<B>(&device);
        peft_lora::add_adapter(&mut m, "default", &cfg.method, &device).unwrap();
        let dir = out.join(name);
        save_adapter(&m, "default", &cfg, &dir).unwrap();
        let l = logits(&m, &device);
        let data = TensorData::new(l, [SEQ.len(), 256]);
        peft_core::format::TensorFile::write(
            dir.join("burn_logits.safetensors"),
            vec![("logits".into(), data)],
        )
        .unwrap();
    }
}
