//! Bottleneck adapters against a PyTorch reference: `scripts/fixtures/adapter.py` writes
//! adapter weights in this crate's layout and computes the adapted logits by hooking the
//! transformers attention and MLP modules (`fixtures/bn_*`). Here they load and give those
//! logits (sequential after the MLP, after attention and the MLP with a layer left out,
//! parallel with scaling, on Llama, GPT-2 and Qwen2; relu, silu, tanh, gelu); disabled
//! they give the base model's bit for bit; saved and loaded back, bit for bit; several
//! named adapters switch per task on one base.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use common::{fixture, keys_and_shapes, logits, max_diff, read};
use peft_adapter::bottleneck::{self, BottleneckFields, BottleneckSlots};
use peft_adapter::{BottleneckGpt2, BottleneckLlama};
use peft_core::config::AdapterConfig;
use peft_core::format::WEIGHTS_FILE;
use peft_core::model::{self, AdaptableModel};
use peft_models::CausalLm;

fn round<B, M>(mut m: M, name: &str, device: &B::Device)
where
    B: Backend,
    M: CausalLm<B> + AdaptableModel<B> + Clone,
    M::Sublayer: BottleneckSlots<B>,
{
    let base = logits(&m, device);
    let d = max_diff(&base, &read(name, "base_logits"));
    assert!(d < 1e-4, "{name}: base model vs transformers: {d}");

    let paths = bottleneck::load_adapter(&mut m, &fixture(name), "default", device).unwrap();
    assert!(!paths.is_empty());
    let got = logits(&m, device);
    let d = max_diff(&got, &read(name, "logits"));
    println!("{name}: max |logits - reference| = {d:e}");
    assert!(d < 1e-4, "{name}: max |logits - reference| = {d}");
    assert!(
        max_diff(&got, &base) > 0.1,
        "{name}: the adapter changes nothing"
    );

    model::set_adapters_disabled(&mut m, true).unwrap();
    assert!(
        logits(&m, device) == base,
        "{name}: disabled differs from base"
    );
    model::set_adapters_disabled(&mut m, false).unwrap();

    let cfg = AdapterConfig::<BottleneckFields>::load(fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    bottleneck::save_adapter(&m, "default", &cfg, dir.path()).unwrap();
    assert_eq!(
        keys_and_shapes(&dir.path().join(WEIGHTS_FILE)),
        keys_and_shapes(&fixture(name).join(WEIGHTS_FILE)),
        "{name}: saved keys differ from the documented layout"
    );
    let saved = AdapterConfig::<BottleneckFields>::load(dir.path()).unwrap();
    assert_eq!(saved.method, cfg.method, "{name}: config round trip");
    model::delete_adapter(&mut m, "default").unwrap();
    assert!(logits(&m, device) == base, "{name}: delete left something");
    bottleneck::load_adapter(&mut m, dir.path(), "default", device).unwrap();
    assert!(
        logits(&m, device) == got,
        "{name}: save then load changed the logits"
    );
}

fn bn_seq_llama<B: AutodiffBackend>(device: &B::Device) {
    let m: BottleneckLlama<B::InnerBackend> = common::llama("llama_gqa", device);
    round(m, "bn_seq_llama", device);
}

fn bn_double_llama<B: AutodiffBackend>(device: &B::Device) {
    let m: BottleneckLlama<B::InnerBackend> = common::llama("llama_gqa", device);
    round(m, "bn_double_llama", device);
}

fn bn_double_gpt2<B: AutodiffBackend>(device: &B::Device) {
    let m: BottleneckGpt2<B::InnerBackend> = common::gpt2(device);
    round(m, "bn_double_gpt2", device);
}

fn bn_par_qwen2<B: AutodiffBackend>(device: &B::Device) {
    let m: BottleneckLlama<B::InnerBackend> = common::llama("qwen2", device);
    round(m, "bn_par_qwen2", device);
}

peft_testing::backend_tests!(bn_seq_llama, bn_double_llama, bn_double_gpt2, bn_par_qwen2);

type B = burn::backend::NdArray;

/// One adapter per task on one frozen base, switched per task: each gives its reference.
#[test]
fn one_adapter_per_task() {
    let device = Default::default();
    let mut m: BottleneckLlama<B> = common::llama("llama_gqa", &device);
    let base = logits(&m, &device);
    bottleneck::load_adapter(&mut m, &fixture("bn_seq_llama"), "seq", &device).unwrap();
    bottleneck::load_adapter(&mut m, &fixture("bn_double_llama"), "double", &device).unwrap();
    bottleneck::add_adapter(&mut m, "fresh", &BottleneckFields::par_bn(), &device).unwrap();
    for (task, name) in [("seq", "bn_seq_llama"), ("double", "bn_double_llama")] {
        model::set_active_adapters(&mut m, &[task]).unwrap();
        let d = max_diff(&logits(&m, &device), &read(name, "logits"));
        assert!(d < 1e-4, "{task}: {d}");
    }
    // A fresh adapter starts as the identity (its up-projection is zero).
    model::set_active_adapters(&mut m, &["fresh"]).unwrap();
    assert!(max_diff(&logits(&m, &device), &base) < 1e-6);
    let mut names = model::adapter_names(&mut m).unwrap();
    names.sort();
    assert_eq!(names, ["double", "fresh", "seq"]);
}

/// The layouts place adapters where adapter-hub does, with its defaults.
#[test]
fn layouts_and_widths() {
    let device = Default::default();
    let mut m: BottleneckLlama<B> = common::llama("llama_gqa", &device);
    let seq = bottleneck::add_adapter(&mut m, "s", &BottleneckFields::seq_bn(), &device).unwrap();
    assert_eq!(
        seq,
        vec!["model.layers.0.mlp_adapter", "model.layers.1.mlp_adapter"]
    );
    let double = bottleneck::add_adapter(
        &mut m,
        "d",
        &BottleneckFields::double_seq_bn().with_leave_out(vec![0]),
        &device,
    )
    .unwrap();
    assert_eq!(
        double,
        vec!["model.layers.1.attn_adapter", "model.layers.1.mlp_adapter"]
    );
    let a = m.model.layers[1].attn_adapter.get("d").unwrap();
    assert_eq!((a.hidden_size(), a.bottleneck_size()), (32, 2)); // 32 / 16
    let p = BottleneckFields::par_bn();
    bottleneck::add_adapter(&mut m, "p", &p, &device).unwrap();
    let a = m.model.layers[0].mlp_adapter.get("p").unwrap();
    assert_eq!(
        (a.bottleneck_size(), a.scaling, a.parallel),
        (16, 4.0, true)
    );
    let err =
        bottleneck::add_adapter(&mut m, "s", &BottleneckFields::seq_bn(), &device).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = bottleneck::add_adapter(
        &mut m,
        "z",
        &BottleneckFields::seq_bn().with_reduction_factor(64.0),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("leaves no bottleneck"), "{err}");
}

#[test]
fn file_errors_name_the_problem() {
    let device = Default::default();
    // GPT-2 weights on a Llama: the keys are not there.
    let mut m: BottleneckLlama<B> = common::llama("llama_gqa", &device);
    let err =
        bottleneck::load_adapter(&mut m, &fixture("bn_double_gpt2"), "x", &device).unwrap_err();
    assert!(
        err.to_string().contains("hidden size") || err.to_string().contains("missing"),
        "{err}"
    );
    // An IA3 directory is refused with the type it found.
    let err = bottleneck::load_adapter(&mut m, &fixture("ia3_llama"), "x", &device).unwrap_err();
    assert!(err.to_string().contains("IA3"), "{err}");
    // A layout that contradicts its flags.
    let json = r#"{"peft_type": "BOTTLENECK", "layout": "par_bn", "is_parallel": false}"#;
    let err = AdapterConfig::<BottleneckFields>::from_json_str(json).unwrap_err();
    assert!(err.to_string().contains("layout"), "{err}");
    // adapter-hub's names are accepted.
    let json = r#"{"peft_type": "BOTTLENECK", "layout": "houlsby", "mh_adapter": true,
                   "non_linearity": "swish", "reduction_factor": 8}"#;
    let cfg = AdapterConfig::<BottleneckFields>::from_json_str(json).unwrap();
    assert_eq!(cfg.method.non_linearity, peft_adapter::NonLinearity::Silu);
    assert!(cfg.to_json_string().contains("\"reduction_factor\": 8"));
}
