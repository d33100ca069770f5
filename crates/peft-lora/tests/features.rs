//! The LoRA features beyond plain adapters, against Python's peft (fixtures made by
//! `scripts/fixtures/lora.py`): `bias = "all"` / `"lora_only"`, `lora_bias`,
//! `modules_to_save = ["lm_head"]`, LoRA on the token embeddings, PiSSA initialisation and
//! loading, and `add_weighted_adapter` (linear, cat, svd). Each loads peft's adapter and
//! matches peft's logits within 1e-4, saves it and loads it back, and (where it applies)
//! merges. Each runs on every backend compiled in.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::adapters::AdaptedLinear;
use peft_core::config::{AdapterConfig, InitLoraWeights, LoraBias, LoraFields};
use peft_core::format::TensorFile;
use peft_core::inject::LinearWeight;
use peft_core::model::{self, AdaptableModel};
use peft_core::target::Targets;
use peft_lora::{
    Combination, LoraGpt2, LoraLlama, LoraLlamaWithEmbedding, LoraSlot, add_adapter_full,
    add_weighted_adapter, load_adapter, load_adapter_full, save_adapter, save_adapter_full,
};
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

fn read_file(path: &Path, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn read(name: &str, key: &str) -> Vec<f32> {
    read_file(&fixture(name).join("logits.safetensors"), key)
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

/// Asserts `|got - peft| < 1e-4` and prints the difference (the numbers the docs quote).
fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    let d = max_diff(got, expected);
    println!("{what}: max |ours - peft| = {d:.2e}");
    assert!(d < 1e-4, "{what}: max |ours - peft| = {d}");
}

fn load_llama_like<B: Backend, M>(
    name: &str,
    device: &B::Device,
    load: impl Fn(&peft_models::config::LlamaConfig, &mut SafetensorsSource, &B::Device) -> M,
) -> M {
    let dir = models_fixture(name);
    let ModelConfig::Llama(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
        panic!("{name} is not a Llama-family model")
    };
    load(
        &cfg,
        &mut SafetensorsSource::open_dir(&dir).unwrap(),
        device,
    )
}

fn llama<B: Backend>(name: &str, device: &B::Device) -> LoraLlama<B> {
    load_llama_like::<B, _>(name, device, |c, s, d| LoraLlama::load(c, s, d).unwrap())
}

fn llama_emb<B: Backend>(name: &str, device: &B::Device) -> LoraLlamaWithEmbedding<B> {
    load_llama_like::<B, _>(name, device, |c, s, d| {
        LoraLlamaWithEmbedding::load(c, s, d).unwrap()
    })
}

/// peft's adapter on Qwen2 (biases on q, k, v): peft's logits, peft's "disabled" logits
/// (the trained base biases stay, as in peft), saved and loaded into a fresh model, merged.
fn bias_round<B: Backend>(name: &str, device: &B::Device) {
    let mut m = llama::<B>("qwen2", device);
    load_adapter(&mut m, &fixture(name), "default", device).unwrap();
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));
    model::set_adapters_disabled(&mut m, true).unwrap();
    assert_close(
        &format!("{name} disabled"),
        &logits(&m, device),
        &read(name, "base_logits"),
    );
    model::set_adapters_disabled(&mut m, false).unwrap();

    // Saved under peft's keys (the same key set as peft's file), loaded into a fresh model.
    let cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, "default", &cfg, dir.path()).unwrap();
    let keys = |p: &Path| {
        TensorFile::read(p.join("adapter_model.safetensors"))
            .unwrap()
            .keys()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(dir.path()), keys(&fixture(name)), "{name}: saved keys");
    let mut fresh = llama::<B>("qwen2", device);
    load_adapter(&mut fresh, dir.path(), "default", device).unwrap();
    assert!(
        logits(&fresh, device) == got,
        "{name}: save then load changed the logits"
    );

    model::merge_adapters(&mut m, None, true).unwrap();
    assert_close(
        &format!("{name} merged"),
        &logits(&m, device),
        &read(name, "logits"),
    );
    model::unmerge_adapters(&mut m).unwrap();
    assert!(max_diff(&logits(&m, device), &got) < 1e-4);
}

fn bias_all_qwen2<B: AutodiffBackend>(device: &B::Device) {
    bias_round::<B::InnerBackend>("bias_all_qwen2", device);
}
fn bias_lora_only_qwen2<B: AutodiffBackend>(device: &B::Device) {
    bias_round::<B::InnerBackend>("bias_lora_only_qwen2", device);
}
fn lora_bias_qwen2<B: AutodiffBackend>(device: &B::Device) {
    bias_round::<B::InnerBackend>("lora_bias_qwen2", device);
}

/// GPT-2 with `bias = "all"`: the biases of the Conv1D layers and of the layer norms are
/// loaded and saved under peft's keys.
fn bias_all_gpt2<B: AutodiffBackend>(device: &B::Device) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let name = "bias_all_gpt2";
    let load = || {
        let dir = models_fixture("gpt2");
        let ModelConfig::Gpt2(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
            panic!()
        };
        LoraGpt2::<I<B>>::load(
            &cfg,
            &mut SafetensorsSource::open_dir(&dir).unwrap(),
            device,
        )
        .unwrap()
    };
    let mut m = load();
    // The layer-norm biases need the whole-module entry point.
    assert!(load_adapter(&mut m, &fixture(name), "default", device).is_err());
    let mut m = load();
    load_adapter_full(&mut m, &fixture(name), "default", device).unwrap();
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));
    let cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter_full(&m, "default", &cfg, dir.path()).unwrap();
    let keys = |p: &Path| {
        TensorFile::read(p.join("adapter_model.safetensors"))
            .unwrap()
            .keys()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(dir.path()), keys(&fixture(name)), "{name}: saved keys");
    let mut fresh = load();
    load_adapter_full(&mut fresh, dir.path(), "default", device).unwrap();
    assert!(
        logits(&fresh, device) == got,
        "{name}: save then load changed the logits"
    );
}

fn modules_to_save_llama<B: AutodiffBackend>(device: &B::Device) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let name = "modules_to_save_llama";
    // The linear-only entry point says what it cannot do, naming the module.
    let mut m = llama::<I<B>>("llama_gqa", device);
    let err = load_adapter(&mut m, &fixture(name), "default", device).unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");

    let mut m = llama::<I<B>>("llama_gqa", device);
    load_adapter_full(&mut m, &fixture(name), "default", device).unwrap();
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));

    let cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter_full(&m, "default", &cfg, dir.path()).unwrap();
    let ours = dir.path().join("adapter_model.safetensors");
    let theirs = fixture(name).join("adapter_model.safetensors");
    assert_eq!(
        read_file(&ours, "base_model.model.lm_head.weight"),
        read_file(&theirs, "base_model.model.lm_head.weight"),
        "the saved head is peft's"
    );
    let mut fresh = llama::<I<B>>("llama_gqa", device);
    load_adapter_full(&mut fresh, dir.path(), "default", device).unwrap();
    assert!(
        logits(&fresh, device) == got,
        "save then load changed the logits"
    );
}

fn embedding_llama<B: AutodiffBackend>(device: &B::Device) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let name = "embedding_llama";
    let mut m = llama::<I<B>>("llama_gqa", device);
    let err = load_adapter(&mut m, &fixture(name), "default", device).unwrap_err();
    assert!(err.to_string().contains("embed_tokens"), "{err}");

    let mut m = llama_emb::<I<B>>("llama_gqa", device);
    let base = logits(&m, device);
    let paths = load_adapter_full(&mut m, &fixture(name), "default", device).unwrap();
    assert!(paths.iter().any(|p| p == "model.embed_tokens"));
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));
    model::set_adapters_disabled(&mut m, true).unwrap();
    assert!(logits(&m, device) == base, "disabled differs from base");
    model::set_adapters_disabled(&mut m, false).unwrap();

    let cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter_full(&m, "default", &cfg, dir.path()).unwrap();
    for key in ["lora_embedding_A", "lora_embedding_B"] {
        let k = format!("base_model.model.model.embed_tokens.{key}");
        assert_eq!(
            read_file(&dir.path().join("adapter_model.safetensors"), &k),
            read_file(&fixture(name).join("adapter_model.safetensors"), &k),
            "{k}"
        );
    }
    model::delete_adapter(&mut m, "default").unwrap();
    assert!(logits(&m, device) == base, "delete left something behind");
    load_adapter_full(&mut m, dir.path(), "default", device).unwrap();
    assert!(
        logits(&m, device) == got,
        "save then load changed the logits"
    );
    // Linear layers merge; the embedding adapter keeps acting on the lookup.
    model::merge_adapters(&mut m, None, true).unwrap();
    assert_close(
        "embedding_llama merged",
        &logits(&m, device),
        &read(name, "logits"),
    );
}

fn pissa_fields() -> LoraFields {
    LoraFields {
        r: 4,
        lora_alpha: 8.0,
        init_lora_weights: InitLoraWeights::Scheme("pissa".into()),
        target_modules: Some(Targets::list(["q_proj", "v_proj", "down_proj"])),
        ..LoraFields::default()
    }
}

fn q_proj0<B: Backend>(m: &LoraLlama<B>) -> AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>> {
    m.model.layers[0].self_attn.q_proj.clone()
}

fn pissa_llama<B: AutodiffBackend>(device: &B::Device) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let name = "pissa_llama";
    let residual_file = fixture(name).join("pissa_residual.safetensors");

    // Initialisation: the residual and the adapter's delta are peft's; the output is the
    // base model's.
    let mut m = llama::<I<B>>("llama_gqa", device);
    add_adapter_full(&mut m, "default", &pissa_fields(), device).unwrap();
    assert_close(
        &format!("{name} init"),
        &logits(&m, device),
        &read(name, "init_logits"),
    );
    let q = q_proj0(&m);
    let residual: Vec<f32> = q.base.weight().into_data().to_vec().unwrap();
    let expected = read_file(&residual_file, "model.layers.0.self_attn.q_proj.residual");
    let d = max_diff(&residual, &expected);
    println!("{name}: residual max diff {d:.2e}");
    assert!(d < 1e-5, "residual differs from peft's by {d}");
    let delta: Vec<f32> = q
        .adapter
        .get("default")
        .unwrap()
        .delta_weight()
        .into_data()
        .to_vec()
        .unwrap();
    let expected = read_file(&residual_file, "model.layers.0.self_attn.q_proj.delta0");
    let d = max_diff(&delta, &expected);
    println!("{name}: initial delta max diff {d:.2e}");
    assert!(d < 1e-5, "initial s B A differs from peft's by {d}");

    // Loading peft's trained PiSSA adapter onto the original base, as peft does.
    let mut m = llama::<I<B>>("llama_gqa", device);
    load_adapter(&mut m, &fixture(name), "default", device).unwrap();
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));
    assert_close(
        &format!("{name} (peft reload)"),
        &got,
        &read(name, "reload_logits"),
    );

    // The niter variant computes the same (exact) triplets here.
    let mut m = llama::<I<B>>("llama_gqa", device);
    let fields = LoraFields {
        init_lora_weights: InitLoraWeights::Scheme("pissa_niter_4".into()),
        ..pissa_fields()
    };
    add_adapter_full(&mut m, "default", &fields, device).unwrap();
    assert_close(
        &format!("{name} niter init"),
        &logits(&m, device),
        &read(name, "base_logits"),
    );
}

fn combine_round<B: Backend>(name: &str, combination: Combination, device: &B::Device) {
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("combine.json")).unwrap())
            .unwrap();
    let sources: Vec<String> = spec["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let weights: Vec<f64> = spec["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut m = llama::<B>("llama_gqa", device);
    for s in &sources {
        load_adapter(&mut m, &fixture(s), s, device).unwrap();
    }
    let names: Vec<&str> = sources.iter().map(String::as_str).collect();
    let fields = add_weighted_adapter(&mut m, &names, &weights, "combined", combination).unwrap();
    let peft_cfg = AdapterConfig::<LoraFields>::load(fixture(name)).unwrap();
    assert_eq!(fields.r, peft_cfg.method.r, "{name}: rank");
    model::set_active_adapters(&mut m, &["combined"]).unwrap();
    let got = logits(&m, device);
    assert_close(name, &got, &read(name, "logits"));

    // The combined adapter's delta on every layer is peft's (B A: sign-free for svd).
    let theirs = TensorFile::read(fixture(name).join("adapter_model.safetensors")).unwrap();
    let mut worst = 0.0f32;
    let mut compared = 0;
    m.visit_linears(&mut |path, layer| {
        let Some(l) = layer.adapter.get("combined") else {
            return;
        };
        compared += 1;
        let key = |t: &str| format!("base_model.model.{path}.{t}");
        let shape = |k: &str| theirs.shape(k).unwrap();
        let a = Tensor::<B, 2>::from_data(
            TensorData::new(
                read_file(theirs.path(), &key("lora_A.weight")),
                shape(&key("lora_A.weight")),
            ),
            device,
        );
        let b = Tensor::<B, 2>::from_data(
            TensorData::new(
                read_file(theirs.path(), &key("lora_B.weight")),
                shape(&key("lora_B.weight")),
            ),
            device,
        );
        let expected: Vec<f32> = b.matmul(a).into_data().to_vec().unwrap();
        let ours: Vec<f32> = l.delta_weight().into_data().to_vec().unwrap();
        worst = worst.max(max_diff(&ours, &expected));
    });
    // q_proj, v_proj and down_proj of both layers.
    assert_eq!(compared, 6, "{name}: layers holding the combined adapter");
    println!("{name}: delta max diff {worst:.2e}");
    assert!(worst < 1e-5, "{name}: delta differs from peft's by {worst}");

    // Saved with the returned config and loaded back alone.
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, "combined", &AdapterConfig::new(fields), dir.path()).unwrap();
    let mut fresh = llama::<B>("llama_gqa", device);
    load_adapter(&mut fresh, dir.path(), "combined", device).unwrap();
    assert!(
        max_diff(&logits(&fresh, device), &got) < 1e-5,
        "{name}: reload"
    );
}

fn weighted_linear<B: AutodiffBackend>(device: &B::Device) {
    combine_round::<B::InnerBackend>("weighted_linear", Combination::Linear, device);
}
fn weighted_cat<B: AutodiffBackend>(device: &B::Device) {
    combine_round::<B::InnerBackend>("weighted_cat", Combination::Cat, device);
}
fn weighted_svd<B: AutodiffBackend>(device: &B::Device) {
    combine_round::<B::InnerBackend>("weighted_svd", Combination::Svd { rank: Some(3) }, device);
}

peft_testing::backend_tests!(
    bias_all_qwen2,
    bias_lora_only_qwen2,
    bias_all_gpt2,
    lora_bias_qwen2,
    modules_to_save_llama,
    embedding_llama,
    pissa_llama,
    weighted_linear,
    weighted_cat,
    weighted_svd,
);

/// Every float parameter's values by module path.
struct Snapshot(Vec<String>, BTreeMap<String, Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Snapshot {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.0.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
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

/// One optimizer step on the whole model changes exactly the adapter parameters, the base
/// biases of the adapted layers (`bias = "lora_only"`), `lora_B`'s bias and the
/// `modules_to_save` module; every other weight stays bit for bit.
#[test]
fn a_training_step_changes_only_what_the_config_trains() {
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    type A = burn::backend::Autodiff<burn::backend::NdArray>;
    let device = Default::default();
    let mut m = llama::<A>("qwen2", &device);
    let fields = LoraFields {
        r: 2,
        target_modules: Some(Targets::list(["q_proj", "o_proj"])),
        bias: LoraBias::LoraOnly,
        lora_bias: true,
        modules_to_save: Some(vec!["norm".into()]),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraFields::default()
    };
    let adapted = add_adapter_full(&mut m, "default", &fields, &device).unwrap();
    let m = peft_core::trainable::freeze(m, &peft_lora::trainable_policy(&fields, &adapted));
    let before = snapshot(&m);
    let ids = Tensor::<A, 1, Int>::from_data(TensorData::new(SEQ.to_vec(), [SEQ.len()]), &device)
        .unsqueeze::<2>();
    let loss = m
        .forward(ForwardInput::new(ids), None)
        .powi_scalar(2)
        .mean();
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let mut optim = AdamWConfig::new().init();
    let m = optim.step(1e-2, m, grads);
    let after = snapshot(&m);
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    let trains = |p: &str| {
        p.contains(".adapter.")
            || p == "model.norm.weight"
            || (p.ends_with(".base.bias") && (p.contains("q_proj") || p.contains("o_proj")))
    };
    for p in &changed {
        assert!(trains(p), "{p} changed but the config does not train it");
    }
    for must in [
        "model.layers.0.self_attn.q_proj.base.bias",
        "model.layers.0.self_attn.q_proj.adapter.slots.0.lora_a",
        "model.layers.0.self_attn.q_proj.adapter.slots.0.lora_b_bias",
        "model.norm.weight",
    ] {
        assert!(
            changed.iter().any(|c| c.as_str() == must),
            "{must} did not change: {changed:?}"
        );
    }
    assert!(!changed.iter().any(|c| c.contains("k_proj.base.bias")));
    assert!(!changed.iter().any(|c| c.contains("embed_tokens")));
}
