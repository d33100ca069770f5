//! (IA)^3 against Python's peft: adapters saved by peft (`fixtures/ia3_*`, made by
//! `scripts/fixtures/adapter.py`) load here and give peft's logits; merged they give peft's
//! merged logits; disabled they give the base model's bit for bit; saved here they have
//! exactly peft's keys and shapes and load back bit for bit. Each test runs on every
//! backend compiled in.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use common::{fixture, keys_and_shapes, logits, max_diff, read};
use peft_adapter::ia3::{self, Ia3Slots};
use peft_adapter::{Ia3Gpt2, Ia3Llama, Ia3Slot};
use peft_core::config::{AdapterConfig, Ia3Fields};
use peft_core::format::WEIGHTS_FILE;
use peft_core::inject::NoAdapter;
use peft_core::model::{self, AdaptableModel};
use peft_models::CausalLm;

fn round<B, M>(mut m: M, name: &str, device: &B::Device)
where
    B: Backend,
    M: CausalLm<B> + AdaptableModel<B>,
    M::Linear: Ia3Slots<B>,
{
    let base = logits(&m, device);
    let d = max_diff(&base, &read(name, "base_logits"));
    assert!(d < 1e-4, "{name}: base model vs transformers: {d}");

    let paths = ia3::load_adapter(&mut m, &fixture(name), "default", device).unwrap();
    assert!(!paths.is_empty());
    let expected = read(name, "logits");
    let got = logits(&m, device);
    let d = max_diff(&got, &expected);
    println!("{name}: max |logits - peft| = {d:e}");
    assert!(d < 1e-4, "{name}: max |logits - peft| = {d}");
    assert!(
        max_diff(&got, &base) > 0.1,
        "{name}: the adapter changes nothing"
    );

    // Disabled: the base model, bit for bit.
    model::set_adapters_disabled(&mut m, true).unwrap();
    assert!(
        logits(&m, device) == base,
        "{name}: disabled differs from base"
    );
    model::set_adapters_disabled(&mut m, false).unwrap();

    // Saved here: peft's keys and shapes; loaded back: bit for bit.
    let cfg = AdapterConfig::<Ia3Fields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = logits(&m, device);
    ia3::save_adapter(&m, "default", &cfg, dir.path()).unwrap();
    assert_eq!(
        keys_and_shapes(&dir.path().join(WEIGHTS_FILE)),
        keys_and_shapes(&fixture(name).join(WEIGHTS_FILE)),
        "{name}: saved keys differ from peft's"
    );
    model::delete_adapter(&mut m, "default").unwrap();
    assert!(logits(&m, device) == base, "{name}: delete left something");
    ia3::load_adapter(&mut m, dir.path(), "default", device).unwrap();
    assert!(
        logits(&m, device) == now,
        "{name}: save then load changed the logits"
    );
    // Merged: peft's merged logits and ours unmerged.
    model::merge_adapters(&mut m, None, true).unwrap();
    let merged = logits(&m, device);
    let d = max_diff(&merged, &read(name, "merged_logits"));
    println!("{name}: max |merged - peft merged| = {d:e}");
    assert!(d < 1e-4, "{name}: merged vs peft merged: {d}");
    assert!(max_diff(&merged, &got) < 1e-4, "{name}: merged != unmerged");
    model::unmerge_adapters(&mut m).unwrap();
    let d = max_diff(&logits(&m, device), &got);
    assert!(d < 1e-4, "{name}: unmerged differs by {d}");
}

fn ia3_llama<B: AutodiffBackend>(device: &B::Device) {
    let m: Ia3Llama<B::InnerBackend> = common::llama("llama_gqa", device);
    round(m, "ia3_llama", device);
}

fn ia3_gpt2<B: AutodiffBackend>(device: &B::Device) {
    let m: Ia3Gpt2<B::InnerBackend> = common::gpt2(device);
    round(m, "ia3_gpt2", device);
}

fn ia3_qwen2<B: AutodiffBackend>(device: &B::Device) {
    let m: Ia3Llama<B::InnerBackend> = common::llama("qwen2", device);
    round(m, "ia3_qwen2", device);
}

peft_testing::backend_tests!(ia3_llama, ia3_gpt2, ia3_qwen2);

type B = burn::backend::NdArray;

/// peft's default targets applied here select the layers peft adapted, with the same
/// feed-forward split (the shapes of the saved vectors say which side they scale).
#[test]
fn default_targets_place_vectors_where_peft_does() {
    let device = Default::default();
    for (name, model_type) in [("ia3_llama", "llama"), ("ia3_gpt2", "gpt2")] {
        let fields = ia3::default_fields(model_type).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdapterConfig::new(fields.clone());
        if model_type == "gpt2" {
            let mut m: Ia3Gpt2<B> = common::gpt2(&device);
            ia3::add_adapter(&mut m, "default", &fields, &device).unwrap();
            ia3::save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        } else {
            let mut m: Ia3Llama<B> = common::llama("llama_gqa", &device);
            let base = logits(&m, &device);
            ia3::add_adapter(&mut m, "default", &fields, &device).unwrap();
            // A fresh adapter (vectors of ones) is the identity (up to the order of the
            // matmul's sums: the scaled input is a new, contiguous tensor).
            assert!(max_diff(&logits(&m, &device), &base) < 1e-5);
            ia3::save_adapter(&m, "default", &cfg, dir.path()).unwrap();
        }
        assert_eq!(
            keys_and_shapes(&dir.path().join(WEIGHTS_FILE)),
            keys_and_shapes(&fixture(name).join(WEIGHTS_FILE)),
            "{name}"
        );
    }
}

/// Two named adapters on one base: each active alone gives its own logits; both active
/// multiply their vectors, as peft does.
#[test]
fn named_adapters_switch() {
    let device = Default::default();
    let mut m: Ia3Llama<B> = common::llama("qwen2", &device);
    ia3::load_adapter(&mut m, &fixture("ia3_qwen2"), "a", &device).unwrap();
    let fields = Ia3Fields {
        init_ia3_weights: false,
        ..ia3::default_fields("qwen2").unwrap()
    };
    ia3::add_adapter(&mut m, "b", &fields, &device).unwrap();
    model::set_active_adapters(&mut m, &["a"]).unwrap();
    let d = max_diff(&logits(&m, &device), &read("ia3_qwen2", "logits"));
    assert!(d < 1e-4, "{d}");
    model::set_active_adapters(&mut m, &["b"]).unwrap();
    let only_b = logits(&m, &device);
    assert!(max_diff(&only_b, &read("ia3_qwen2", "logits")) > 0.1);
    model::set_active_adapters(&mut m, &["a", "b"]).unwrap();
    let both = logits(&m, &device);
    assert!(max_diff(&both, &only_b) > 0.1);
    // Merging both and comparing with both applied on activations.
    model::merge_adapters(&mut m, None, true).unwrap();
    assert!(max_diff(&logits(&m, &device), &both) < 1e-4);
    model::unmerge_adapters(&mut m).unwrap();
    assert!(max_diff(&logits(&m, &device), &both) < 1e-4);
    model::delete_adapter(&mut m, "b").unwrap();
    model::set_active_adapters(&mut m, &["a"]).unwrap();
    let d = max_diff(&logits(&m, &device), &read("ia3_qwen2", "logits"));
    assert!(d < 1e-4, "{d}");
}

#[test]
fn config_errors_are_clear() {
    let device = Default::default();
    let mut m: Ia3Llama<B> = common::llama("llama_gqa", &device);
    let err = ia3::add_adapter(&mut m, "x", &Ia3Fields::default(), &device).unwrap_err();
    assert!(err.to_string().contains("default_fields"), "{err}");
    let fields = Ia3Fields {
        target_modules: Some(peft_core::target::Targets::list(["k_proj"])),
        feedforward_modules: Some(peft_core::target::Targets::list(["down_proj"])),
        ..Ia3Fields::default()
    };
    let err = ia3::add_adapter(&mut m, "x", &fields, &device).unwrap_err();
    assert!(err.to_string().contains("subset"), "{err}");
    // A LoRA directory is refused with the type it found.
    let lora = common::models_fixture("../../../peft-lora/tests/fixtures/lora_llama");
    let err = ia3::load_adapter(&mut m, &lora, "x", &device).unwrap_err();
    assert!(err.to_string().contains("LORA"), "{err}");
    // GPT-2 shapes on a Llama: the key and both shapes are named.
    let err = ia3::load_adapter(&mut m, &fixture("ia3_gpt2"), "x", &device).unwrap_err();
    assert!(err.to_string().contains("matched no module"), "{err}");
}

/// (IA)^3 composed with LoRA in one linear slot, `(LoraSlot, Ia3Slot)`: LoRA adds its
/// delta, then the vector scales the sum (output scaling) or the base input (input
/// scaling). Checked against the formula on explicit tensors.
#[test]
fn composes_with_lora_in_one_slot() {
    use burn::tensor::Distribution;
    use peft_core::adapters::AdaptedLinear;
    use peft_core::config::{InitLoraWeights, LoraFields};
    use peft_core::inject::LinearWeight;
    use peft_lora::{LoraLayer, LoraSlot};
    let device = Default::default();
    let w = Tensor::<B, 2>::random([5, 6], Distribution::Normal(0.0, 1.0), &device);
    let bias = Tensor::<B, 1>::random([5], Distribution::Normal(0.0, 1.0), &device);
    let x = Tensor::<B, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
    for ff in [false, true] {
        let mut layer: AdaptedLinear<B, burn::nn::Linear<B>, (LoraSlot<B>, Ia3Slot<B>)> =
            AdaptedLinear::new(burn::nn::Linear::from_dense(w.clone(), Some(bias.clone())));
        let fields = LoraFields {
            r: 2,
            init_lora_weights: InitLoraWeights::Bool(false),
            ..LoraFields::default()
        };
        let lora = LoraLayer::new(&layer.base, 2, 0.5, &fields, &device).unwrap();
        let delta = lora.delta_weight();
        layer.adapter.0.insert("lora", lora).unwrap();
        let n = if ff { 6 } else { 5 };
        let l = Tensor::<B, 1>::random([n], Distribution::Uniform(0.5, 1.5), &device);
        layer
            .adapter
            .ia3_mut()
            .insert("ia3", peft_adapter::Ia3Layer::from_vector(l.clone(), ff))
            .unwrap();
        let xw = |x: Tensor<B, 3>, w: Tensor<B, 2>| x.matmul(w.transpose().unsqueeze());
        let expected = if ff {
            xw(x.clone() * l.clone().unsqueeze(), w.clone())
                + bias.clone().unsqueeze()
                + xw(x.clone(), delta)
        } else {
            (xw(x.clone(), w.clone() + delta) + bias.clone().unsqueeze()) * l.unsqueeze()
        };
        let got = layer.forward(x.clone());
        let d: f32 = (got - expected).abs().max().into_scalar();
        assert!(d < 1e-4, "feedforward={ff}: {d}");
    }
    let _ = NoAdapter;
}

/// The other direction: an (IA)^3 adapter made here (random vectors, peft's default Llama
/// targets) with its logits, for Python's peft to load and compare. Runs only when
/// `PEFT_ADAPTER_EXPORT` names an output directory.
#[test]
fn export_for_python() {
    let Some(out) = std::env::var_os("PEFT_ADAPTER_EXPORT").map(std::path::PathBuf::from) else {
        println!("skipped: set PEFT_ADAPTER_EXPORT=DIR to write an (IA)^3 adapter for peft");
        return;
    };
    let device = Default::default();
    let fields = Ia3Fields {
        init_ia3_weights: false,
        ..ia3::default_fields("llama").unwrap()
    };
    let cfg = AdapterConfig::new(fields.clone())
        .with_task_type("CAUSAL_LM")
        .with_base_model("llama_gqa");
    let mut m: Ia3Llama<B> = common::llama("llama_gqa", &device);
    ia3::add_adapter(&mut m, "default", &fields, &device).unwrap();
    ia3::save_adapter(&m, "default", &cfg, &out).unwrap();
    let l = logits(&m, &device);
    peft_core::format::TensorFile::write(
        out.join("burn_logits.safetensors"),
        vec![(
            "logits".into(),
            TensorData::new(l, [common::SEQ.len(), 256]),
        )],
    )
    .unwrap();
}
