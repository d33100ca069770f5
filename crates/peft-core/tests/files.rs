//! The adapter file format against files written by Python's peft
//! (`fixtures/lora_llama`, `fixtures/ia3_llama`, made by `scripts/fixtures/peft_core.py`),
//! the errors for bad files, and save-then-load round trips as property tests.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use burn::tensor::TensorData;
use peft_core::PeftError;
use peft_core::config::{
    AdapterConfig, AnyAdapterConfig, Ia3Fields, LoraBias, LoraFields, PromptTuningFields,
};
use peft_core::format::{TensorFile, WEIGHTS_FILE, peft_key, split_key};
use peft_core::target::Targets;
use proptest::prelude::*;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn reads_a_lora_config_written_by_peft() {
    let cfg = AdapterConfig::<LoraFields>::load(fixture("lora_llama")).unwrap();
    let m = &cfg.method;
    assert_eq!(cfg.common.peft_type, "LORA");
    assert_eq!(cfg.common.task_type.as_deref(), Some("CAUSAL_LM"));
    assert!(cfg.common.inference_mode);
    assert_eq!(m.r, 4);
    assert_eq!(m.lora_alpha, 8.0);
    assert_eq!(m.bias, LoraBias::None);
    assert_eq!(
        m.target_modules,
        Some(Targets::list(["down_proj", "q_proj", "v_proj"]))
    );
    // rank_pattern / alpha_pattern resolve per module as peft does.
    assert_eq!(
        m.rank_and_alpha("model.layers.1.mlp.down_proj").unwrap(),
        (2, 8.0)
    );
    assert_eq!(
        m.rank_and_alpha("model.layers.0.self_attn.v_proj").unwrap(),
        (4, 16.0)
    );
    assert_eq!(
        m.rank_and_alpha("model.layers.1.self_attn.v_proj").unwrap(),
        (4, 8.0)
    );
    // peft's fields that this build does not act on are kept, not reported as unknown.
    assert_eq!(
        cfg.extra.get("megatron_core"),
        Some(&Value::String("megatron.core".into()))
    );
}

#[test]
fn a_config_written_back_equals_peft_original() {
    let path = fixture("lora_llama/adapter_config.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cfg = AdapterConfig::<LoraFields>::load(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    cfg.save(dir.path()).unwrap();
    let written: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written, original);
    assert_eq!(AdapterConfig::<LoraFields>::load(dir.path()).unwrap(), cfg);
}

#[test]
fn reads_lora_tensors_written_by_peft_with_their_shapes() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("lora_llama/expected.json")).unwrap(),
    )
    .unwrap();
    let shapes = expected["shapes"].as_object().unwrap();
    let cfg = AdapterConfig::<LoraFields>::load(fixture("lora_llama")).unwrap();
    let mut file = TensorFile::read(fixture("lora_llama").join(WEIGHTS_FILE)).unwrap();
    assert_eq!(file.keys().count(), shapes.len());
    // Rebuild every key and shape from the config alone, as a loader must.
    let hidden = 16;
    let intermediate = 32;
    for layer in 0..3 {
        for (module, in_f, out_f) in [
            (
                format!("model.layers.{layer}.self_attn.q_proj"),
                hidden,
                hidden,
            ),
            (
                format!("model.layers.{layer}.self_attn.v_proj"),
                hidden,
                hidden / 2,
            ),
            (
                format!("model.layers.{layer}.mlp.down_proj"),
                intermediate,
                hidden,
            ),
        ] {
            let (r, _) = cfg.method.rank_and_alpha(&module).unwrap();
            let a = file
                .take(&peft_key(&module, "lora_A.weight"), &[r, in_f], "")
                .unwrap();
            let b = file
                .take(&peft_key(&module, "lora_B.weight"), &[out_f, r], "")
                .unwrap();
            assert_eq!(a.shape.to_vec(), vec![r, in_f]);
            let b = b.to_vec::<f32>().unwrap();
            assert!(
                b.iter().any(|v| *v != 0.0),
                "lora_B of {module} is all zeros"
            );
        }
    }
    file.finish().unwrap();
}

#[test]
fn reads_an_ia3_adapter_written_by_peft() {
    let cfg = match AnyAdapterConfig::load(fixture("ia3_llama")).unwrap() {
        AnyAdapterConfig::Ia3(c) => c,
        other => panic!("expected IA3, got {other:?}"),
    };
    assert_eq!(
        cfg.method.feedforward_modules,
        Some(Targets::list(["down_proj"]))
    );
    let mut file = TensorFile::read(fixture("ia3_llama").join(WEIGHTS_FILE)).unwrap();
    // peft: feed-forward layers scale the input ([1, in]), others the output ([out, 1]).
    let l = file
        .take(
            &peft_key("model.layers.0.mlp.down_proj", "ia3_l"),
            &[1, 32],
            "",
        )
        .unwrap();
    assert!(l.to_vec::<f32>().unwrap().iter().all(|v| *v == 1.0));
    file.take(
        &peft_key("model.layers.0.self_attn.k_proj", "ia3_l"),
        &[8, 1],
        "",
    )
    .unwrap();
}

#[test]
fn wrong_shape_names_the_key_and_both_shapes() {
    let mut file = TensorFile::read(fixture("lora_llama").join(WEIGHTS_FILE)).unwrap();
    let key = peft_key("model.layers.0.self_attn.q_proj", "lora_A.weight");
    let err = file
        .take(&key, &[4, 576], "with hidden size 576")
        .unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&key) && msg.contains("[4, 16]") && msg.contains("[4, 576]"),
        "{msg}"
    );
    assert!(msg.contains("hidden size 576"), "{msg}");
}

#[test]
fn an_adapter_for_another_base_names_the_base_it_was_made_for() {
    // As a loader passes it from adapter_config.json's `base_model_name_or_path`.
    let base = "HuggingFaceTB/SmolLM2-135M";
    let mut file = TensorFile::read(fixture("lora_llama").join(WEIGHTS_FILE))
        .unwrap()
        .with_base_model(Some(base));
    let key = peft_key("model.layers.0.self_attn.q_proj", "lora_A.weight");
    let msg = file
        .take(
            &key,
            &[4, 576],
            "whose `q_proj` is [out=576, in=576] with r=4",
        )
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("made for base model `{base}`"))
            && msg.contains("base_model_name_or_path")
            && msg.contains("[4, 16]")
            && msg.contains("[4, 576]"),
        "{msg}"
    );
    let msg = file.finish().unwrap_err().to_string();
    assert!(msg.contains(&format!("`{base}`")), "{msg}");
    // Without a recorded base the message says so.
    let mut file = TensorFile::read(fixture("lora_llama").join(WEIGHTS_FILE)).unwrap();
    let msg = file.take(&key, &[4, 576], "").unwrap_err().to_string();
    assert!(msg.contains("records no base_model_name_or_path"), "{msg}");
}

#[test]
fn non_finite_adapter_values_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WEIGHTS_FILE);
    let key = peft_key("model.layers.0.self_attn.q_proj", "lora_A.weight");
    let data = TensorData::new(vec![0.0, f32::NAN, f32::INFINITY, 1.0], [2, 2]);
    TensorFile::write(&path, vec![(key.clone(), data)]).unwrap();
    let mut file = TensorFile::read(&path).unwrap();
    let err = file.take(&key, &[2, 2], "").unwrap_err();
    assert!(
        matches!(
            err,
            PeftError::NonFiniteTensor {
                count: 2,
                total: 4,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&key) && msg.contains(WEIGHTS_FILE), "{msg}");
}

#[test]
fn missing_and_unexpected_tensors_are_errors_that_name_the_key() {
    let mut file = TensorFile::read(fixture("lora_llama").join(WEIGHTS_FILE)).unwrap();
    let key = peft_key("model.layers.0.self_attn.k_proj", "lora_A.weight");
    let msg = file.take(&key, &[4, 16], "").unwrap_err().to_string();
    assert!(msg.contains(&key) && msg.contains("missing"), "{msg}");
    let msg = file.finish().unwrap_err().to_string();
    assert!(
        msg.contains("q_proj.lora_A.weight") && msg.contains("unexpected"),
        "{msg}"
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let err =
        AdapterConfig::<LoraFields>::from_json_str(r#"{"peft_type": "LOHA", "r": 8}"#).unwrap_err();
    assert!(matches!(err, PeftError::UnsupportedPeftType { .. }));
    assert!(
        err.to_string().contains("LOHA") && err.to_string().contains("LORA"),
        "{err}"
    );

    let err = AdapterConfig::<LoraFields>::from_json_str(r#"{"r": 8}"#).unwrap_err();
    assert!(
        err.to_string().contains("`peft_type` field is missing"),
        "{err}"
    );

    let err = AdapterConfig::<LoraFields>::from_json_str(r#"{"peft_type": "LORA", "r": "eight"}"#)
        .unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err}");

    let err =
        AdapterConfig::<LoraFields>::from_json_str(r#"{"peft_type": "LORA", "r": 0}"#).unwrap_err();
    assert!(
        err.to_string().contains("`r` must be a positive integer"),
        "{err}"
    );

    let err =
        AdapterConfig::<LoraFields>::from_json_str(r#"{"peft_type": "LORA", "use_qalora": true}"#)
            .unwrap_err();
    assert!(err.to_string().contains("use_qalora"), "{err}");

    let err = AdapterConfig::<LoraFields>::from_json_str("[1, 2]").unwrap_err();
    assert!(err.to_string().contains("JSON object"), "{err}");

    // The dispatcher lists every supported type.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "VERA"}"#,
    )
    .unwrap();
    let msg = AnyAdapterConfig::load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("VERA") && msg.contains("PREFIX_TUNING"),
        "{msg}"
    );
}

#[test]
fn unknown_fields_are_kept_and_written_back() {
    let json =
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "my_tool_field": {"a": 1}}"#;
    let cfg = AdapterConfig::<PromptTuningFields>::from_json_str(json).unwrap();
    assert_eq!(cfg.method.prompt.num_virtual_tokens, Some(8));
    assert_eq!(cfg.extra["my_tool_field"], serde_json::json!({"a": 1}));
    assert_eq!(
        cfg.to_json_value()["my_tool_field"],
        serde_json::json!({"a": 1})
    );
}

#[test]
fn a_truncated_safetensors_file_is_an_error_not_a_panic() {
    let bytes = std::fs::read(fixture("lora_llama").join(WEIGHTS_FILE)).unwrap();
    for cut in [0, 4, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let err = TensorFile::from_bytes(&bytes[..cut], "x.safetensors".into()).unwrap_err();
        assert!(
            matches!(err, PeftError::InvalidSafetensors { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn split_key_recovers_module_path_and_tensor_name() {
    let key = peft_key("model.layers.3.self_attn.q_proj", "lora_A.weight");
    assert_eq!(
        split_key(&key, &["lora_A", "lora_B"]),
        Some(("model.layers.3.self_attn.q_proj", "lora_A.weight"))
    );
    assert_eq!(
        split_key("base_model.model.x.ia3_l", &["ia3_l"]),
        Some(("x", "ia3_l"))
    );
    assert_eq!(split_key("prompt_embeddings", &["prompt_embeddings"]), None);
}

fn key_strategy() -> impl Strategy<Value = String> {
    (
        "[a-z_]{1,8}",
        0usize..30,
        prop::sample::select(vec!["lora_A.weight", "lora_B.weight", "ia3_l"]),
    )
        .prop_map(|(m, i, t)| peft_key(&format!("model.layers.{i}.{m}"), t))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // Whatever is written is read back bit for bit, under the same keys.
    #[test]
    fn tensors_round_trip(entries in prop::collection::btree_map(key_strategy(), (1usize..5, 1usize..7), 1..6), seed in any::<u32>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        let mut tensors = Vec::new();
        for (i, (k, (a, b))) in entries.iter().enumerate() {
            let values: Vec<f32> = (0..a * b).map(|j| ((seed as usize + i * 31 + j * 7) % 1000) as f32 / 7.0 - 50.0).collect();
            tensors.push((k.clone(), TensorData::new(values, [*a, *b])));
        }
        TensorFile::write(&path, tensors.clone()).unwrap();
        let mut file = TensorFile::read(&path).unwrap();
        prop_assert_eq!(file.metadata().get("format").map(String::as_str), Some("pt"));
        for (k, t) in &tensors {
            let got = file.take(k, &t.shape.to_vec(), "").unwrap();
            prop_assert_eq!(&got, t);
        }
        file.finish().unwrap();
    }

    // Every LoRA config survives save then load, unknown fields included.
    #[test]
    fn lora_configs_round_trip(
        r in 1usize..64, alpha in 1u32..128, half in any::<bool>(), dropout in 0.0f64..0.9,
        rslora in any::<bool>(), dora in any::<bool>(), targets in prop::collection::vec("[a-z]{1,6}_proj", 1..4),
        regex_target in any::<bool>(), layers in prop::option::of(prop::collection::vec(0usize..32, 0..4)),
        rank_pat in prop::collection::vec(("[a-z]{2,6}", 1usize..32), 0..3), extra in prop::option::of("[a-z]{3,10}"),
    ) {
        let mut m = LoraFields {
            r,
            lora_alpha: f64::from(alpha) + if half { 0.5 } else { 0.0 },
            lora_dropout: dropout,
            use_rslora: rslora,
            use_dora: dora,
            layers_to_transform: layers.map(Into::into),
            target_modules: Some(if regex_target { Targets::pattern(format!(".*({})", targets.join("|"))) } else { Targets::List(targets) }),
            ..LoraFields::default()
        };
        for (k, v) in rank_pat { m.rank_pattern.insert(k, v); }
        let mut cfg = AdapterConfig::new(m).with_task_type("CAUSAL_LM");
        if let Some(e) = extra { cfg.extra.insert(format!("x_{e}"), Value::from(e)); }
        let dir = tempfile::tempdir().unwrap();
        cfg.save(dir.path()).unwrap();
        let back = AdapterConfig::<LoraFields>::load(dir.path()).unwrap();
        prop_assert_eq!(back, cfg);
    }
}

#[test]
fn ia3_defaults_follow_peft() {
    let cfg = AdapterConfig::<Ia3Fields>::from_json_str(r#"{"peft_type": "IA3"}"#).unwrap();
    assert!(cfg.method.init_ia3_weights);
    assert_eq!(cfg.method.target_modules, None);
}

#[test]
fn a_new_lora_config_writes_only_fields_peft_knows() {
    // peft rejects or drops fields it does not know; every key of a config made here must
    // be one that peft itself wrote into its LoRA config.
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("lora_llama/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let ours = AdapterConfig::new(LoraFields {
        r: 16,
        lora_alpha: 32.0,
        ..LoraFields::default()
    })
    .with_task_type("CAUSAL_LM")
    .to_json_value();
    for key in ours.as_object().unwrap().keys() {
        assert!(
            peft.get(key).is_some(),
            "`{key}` is not a field of peft's LoraConfig"
        );
    }
    assert_eq!(ours["peft_type"], "LORA");
    assert_eq!(ours["lora_alpha"], 32);
}
