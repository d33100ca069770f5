//! New adapters: `TEXT` initialisation gives the embeddings peft's gives; configs are
//! completed with the fields peft writes; saving then loading gives the same logits (peft's
//! fixtures and fresh adapters with encoders, whose outputs are what is saved); a training
//! step changes only the prompt parameters; mismatched adapters are refused with a message.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use peft_core::config::{
    AdapterConfig, PrefixTuningFields, PromptEncoderFields, PromptTuningFields,
};
use peft_models::tokenizer::Tokenizer;
use peft_models::{CausalLm, ForwardInput};
use peft_prompt::{
    PrefixLlama, PromptConfig, PromptLearningLlama, PromptLlama, add_adapter, load_adapter,
    save_adapter, trainable_policy,
};

type Nd = burn::backend::NdArray;
type Ad = burn::backend::Autodiff<Nd>;

const SEQ: [i32; 7] = [1, 17, 42, 99, 5, 63, 120];

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

fn base<B: Backend>() -> PromptLearningLlama<B> {
    peft_models::load_llama(&models_fixture("llama_gqa"), &Default::default()).unwrap()
}

fn logits<B: Backend, M: CausalLm<B>>(m: &M) -> Vec<f32> {
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(SEQ.to_vec(), [1, 7]), &Default::default());
    m.forward(ForwardInput::new(ids), None)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn saved_embeddings(dir: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.names(),
        vec!["prompt_embeddings"],
        "peft's file holds only prompt_embeddings"
    );
    let t = st.tensor("prompt_embeddings").unwrap();
    let v = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// `TEXT` initialisation with the same tokenizer gives exactly the embeddings peft saved
/// (the text's ids repeated, then cut, to 7 virtual tokens).
#[test]
fn text_init_gives_peft_embeddings() {
    let tok = Tokenizer::from_hf_dir(&models_fixture("tokenizer/bpe_hf")).unwrap();
    let mut m = base::<Nd>();
    let mut fields = PromptTuningFields::default();
    fields.prompt.num_virtual_tokens = Some(7);
    fields.prompt_tuning_init = "TEXT".into();
    fields.prompt_tuning_init_text = Some("abc".into());
    let cfg = PromptConfig::PromptTuning(AdapterConfig::new(fields));
    let cfg = add_adapter(&mut m, "default", &cfg, Some(&tok), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, "default", &cfg, dir.path()).unwrap();
    let ours = saved_embeddings(dir.path());
    let peft = saved_embeddings(&fixture("prompt_tuning_text"));
    assert_eq!(ours, peft);
    // And the logits are peft's.
    let want = {
        let bytes =
            std::fs::read(fixture("prompt_tuning_text").join("logits.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits")
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let got = logits(&m);
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "{d}");
}

/// The config written for a new adapter holds what peft writes for the same options
/// (`token_dim`, `num_attention_heads`, `num_layers`, `encoder_hidden_size`, ...; for
/// prefix tuning the key/value heads' width).
#[test]
fn completed_configs_match_peft() {
    let device = Default::default();
    let mut fields = PrefixTuningFields::default();
    fields.prompt.num_virtual_tokens = Some(3);
    fields.prefix_projection = true;
    fields.encoder_hidden_size = Some(16);
    let mut fp = PromptEncoderFields {
        prompt: Default::default(),
        encoder_reparameterization_type: "LSTM".into(),
        encoder_hidden_size: Some(8),
        encoder_num_layers: 2,
        encoder_dropout: 0.0,
    };
    fp.prompt.num_virtual_tokens = Some(4);
    let mut ft = PromptTuningFields::default();
    ft.prompt.num_virtual_tokens = Some(4);
    for (name, cfg) in [
        (
            "prefix_projection",
            PromptConfig::PrefixTuning(AdapterConfig::new(fields)),
        ),
        (
            "p_tuning_lstm",
            PromptConfig::PTuning(AdapterConfig::new(fp)),
        ),
        (
            "prompt_tuning",
            PromptConfig::PromptTuning(AdapterConfig::new(ft)),
        ),
    ] {
        let mut m = base::<Nd>();
        let cfg = add_adapter(&mut m, "default", &cfg, None, &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        let (ours, peft) = (json(dir.path()), json(&fixture(name)));
        for key in [
            "peft_type",
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_attention_heads",
            "num_layers",
            "num_transformer_submodules",
            "encoder_hidden_size",
            "prefix_projection",
            "encoder_reparameterization_type",
            "encoder_num_layers",
            "prompt_tuning_init",
            "inference_mode",
        ] {
            assert_eq!(ours.get(key), peft.get(key), "{name}: `{key}`");
        }
        assert_eq!(
            saved_embeddings(dir.path()).0,
            saved_embeddings(&fixture(name)).0,
            "{name}"
        );
    }
}

/// peft's adapters saved here and loaded back give the same logits bit for bit, and the
/// same file contents.
#[test]
fn peft_adapters_round_trip() {
    let device = Default::default();
    for name in [
        "prompt_tuning",
        "p_tuning_lstm",
        "prefix",
        "prefix_projection",
    ] {
        let mut m = base::<Nd>();
        let cfg = load_adapter(&mut m, &fixture(name), "default", &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        assert_eq!(
            saved_embeddings(dir.path()),
            saved_embeddings(&fixture(name)),
            "{name}"
        );
        assert_eq!(
            json(dir.path()),
            json(&fixture(name)),
            "{name}: config changed"
        );
        let mut again = base::<Nd>();
        load_adapter(&mut again, dir.path(), "default", &device).unwrap();
        assert_eq!(logits(&m), logits(&again), "{name}");
    }
}

fn fresh_configs() -> Vec<PromptConfig> {
    let mut pt = PromptTuningFields::default();
    pt.prompt.num_virtual_tokens = Some(3);
    pt.prompt_tuning_init = "SAMPLE_VOCAB".into();
    let mut mlp = PromptEncoderFields {
        prompt: Default::default(),
        encoder_reparameterization_type: "MLP".into(),
        encoder_hidden_size: Some(12),
        encoder_num_layers: 2,
        encoder_dropout: 0.0,
    };
    mlp.prompt.num_virtual_tokens = Some(2);
    let mut lstm = mlp.clone();
    lstm.encoder_reparameterization_type = "LSTM".into();
    lstm.encoder_dropout = 0.1;
    let mut prefix = PrefixTuningFields::default();
    prefix.prompt.num_virtual_tokens = Some(2);
    let mut proj = prefix.clone();
    proj.prefix_projection = true;
    proj.encoder_hidden_size = Some(10);
    vec![
        PromptConfig::PromptTuning(AdapterConfig::new(pt)),
        PromptConfig::PTuning(AdapterConfig::new(mlp)),
        PromptConfig::PTuning(AdapterConfig::new(lstm)),
        PromptConfig::PrefixTuning(AdapterConfig::new(prefix)),
        PromptConfig::PrefixTuning(AdapterConfig::new(proj)),
    ]
}

/// New adapters of every kind change the output; saved (P-tuning's encoder output, the
/// projected prefix) and loaded back they give the same logits.
#[test]
fn fresh_adapters_save_and_load() {
    let device = Default::default();
    let plain = logits(&base::<Nd>());
    for cfg in fresh_configs() {
        let mut m = base::<Nd>();
        let cfg = add_adapter(&mut m, "default", &cfg, None, &device).unwrap();
        let before = logits(&m);
        let moved = before
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{}: the new adapter does not change the output",
            cfg.peft_type()
        );
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        let mut again = base::<Nd>();
        load_adapter(&mut again, dir.path(), "default", &device).unwrap();
        let after = logits(&again);
        let d = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-5, "{}: {d}", cfg.peft_type());
    }
}

struct Snapshot(Vec<String>, BTreeMap<String, Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Snapshot {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let v = param.val().into_data().convert::<f32>().to_vec().unwrap();
        self.1.insert(self.0.join("."), v);
    }
}

fn snapshot<B: Backend, M: Module<B>>(m: &M) -> BTreeMap<String, Vec<f32>> {
    let mut s = Snapshot(vec![], BTreeMap::new());
    m.visit(&mut s);
    s.1
}

/// One optimizer step on the whole model changes the prompt parameters (table, encoder,
/// projection) and nothing else.
#[test]
fn a_training_step_changes_only_prompt_parameters() {
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    let device = Default::default();
    for cfg in fresh_configs() {
        let mut m = base::<Ad>();
        add_adapter(&mut m, "default", &cfg, None, &device).unwrap();
        let m = peft_core::trainable::freeze(m, &trainable_policy());
        let before = snapshot(&m);
        let ids = Tensor::<Ad, 2, Int>::from_data(TensorData::new(SEQ.to_vec(), [1, 7]), &device);
        let loss = m
            .forward(ForwardInput::new(ids), None)
            .powi_scalar(2)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let m = AdamWConfig::new().init().step(1e-2, m, grads);
        let after = snapshot(&m);
        let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
        let slot = if cfg.is_prefix() {
            "model.kv_adapter."
        } else {
            "model.embed_adapter."
        };
        for p in &changed {
            assert!(p.starts_with(slot), "{}: {p} changed", cfg.peft_type());
        }
        let adapter_params: Vec<&String> = before.keys().filter(|k| k.starts_with(slot)).collect();
        assert!(!adapter_params.is_empty());
        assert_eq!(
            changed,
            adapter_params,
            "{}: every prompt parameter trains",
            cfg.peft_type()
        );
    }
}

/// Adapters that do not fit are refused with a message naming the problem.
#[test]
fn mismatches_are_refused() {
    let device = Default::default();
    // A prefix adapter needs the key/value slot.
    let mut m: PromptLlama<Nd> =
        peft_models::load_llama(&models_fixture("llama_gqa"), &device).unwrap();
    let e = load_adapter(&mut m, &fixture("prefix"), "default", &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("PrefixLlama"), "{e}");
    // A prompt adapter needs the embedding slot.
    let mut m: PrefixLlama<Nd> =
        peft_models::load_llama(&models_fixture("llama_gqa"), &device).unwrap();
    let e = load_adapter(&mut m, &fixture("prompt_tuning"), "default", &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("PromptLlama"), "{e}");
    // A prefix saved for full attention heads (old peft) on a GQA model.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = json(&fixture("prefix"));
    cfg["token_dim"] = 32.into();
    cfg["num_attention_heads"] = 4.into();
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("prefix").join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut m = base::<Nd>();
    let e = load_adapter(&mut m, dir.path(), "default", &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grouped-query"), "{e}");
    // The wrong number of layers.
    let mut cfg = json(&fixture("prompt_tuning"));
    cfg["num_layers"] = 5.into();
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = load_adapter(&mut m, dir.path(), "default", &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_layers = 5"), "{e}");
    // A LoRA adapter is not a prompt adapter.
    let lora =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-lora/tests/fixtures/lora_llama");
    let e = load_adapter(&mut m, &lora, "default", &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LORA"), "{e}");
}
