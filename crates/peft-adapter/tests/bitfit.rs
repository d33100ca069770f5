//! BitFit against PyTorch: one plain SGD step (lr 0.5) on the mean next-token
//! cross-entropy, with only the biases trainable, gives torch's loss and torch's logits
//! after the step (`fixtures/bitfit_*`, made by `scripts/fixtures/adapter.py`); every
//! weight stays bit for bit as it was; a model without biases is refused with a clear
//! error.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use common::{logits, max_diff, read};
use peft_adapter::{BitFitGpt2, BitFitLlama, bitfit};
use peft_models::{CausalLm, ForwardInput};

struct Params {
    path: Vec<String>,
    values: BTreeMap<String, Vec<f32>>,
}

impl<B: Backend> ModuleVisitor<B> for Params {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let v = p
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        self.values.insert(self.path.join("."), v);
    }
}

fn params<B: Backend, M: Module<B>>(m: &M) -> BTreeMap<String, Vec<f32>> {
    let mut p = Params {
        path: vec![],
        values: BTreeMap::new(),
    };
    m.visit(&mut p);
    p.values
}

fn step<B, M>(model: M, name: &str, device: &B::Device)
where
    B: AutodiffBackend,
    M: CausalLm<B> + Module<B> + burn::module::AutodiffModule<B>,
{
    let d = max_diff(&logits(&model, device), &read(name, "base_logits"));
    assert!(d < 1e-4, "{name}: base vs transformers: {d}");
    let model = bitfit::freeze_all_but_biases(model).unwrap();
    let biases: usize = bitfit::bias_parameters(&model).iter().map(|(_, n)| n).sum();
    assert_eq!(
        biases as f32,
        read(name, "trained")[0],
        "{name}: bias count vs torch"
    );
    let report = peft_core::trainable::trainable_report(&model);
    assert_eq!(report.trainable, biases);

    let before = params(&model);
    let ids = common::ids::<B>(device);
    let n = common::SEQ.len();
    let out = model.forward(ForwardInput::new(ids.clone()), None);
    let vocab = out.dims()[2];
    let pred = out.reshape([n, vocab]).slice([0..n - 1, 0..vocab]);
    let target = ids.reshape([n]).slice(1..n);
    let loss = CrossEntropyLossConfig::new()
        .init(device)
        .forward(pred, target);
    let l: f32 = loss.clone().into_scalar().elem();
    let expected = read(name, "loss")[0];
    assert!(
        (l - expected).abs() < 1e-4,
        "{name}: loss {l} vs torch {expected}"
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut optim = SgdConfig::new().init::<B, M>();
    let model = optim.step(0.5, model, grads);

    let d = max_diff(&logits(&model, device), &read(name, "logits"));
    println!("{name}: loss {l} (torch {expected}); max |logits after the step - torch| = {d:e}");
    assert!(d < 1e-4, "{name}: logits after the step vs torch: {d}");
    let after = params(&model);
    let mut moved = 0;
    for (path, v) in &before {
        let changed = after[path] != *v;
        if path.ends_with("bias") {
            moved += usize::from(changed);
        } else {
            assert!(!changed, "{name}: `{path}` is not a bias but changed");
        }
    }
    assert!(moved > 0, "{name}: no bias moved");
}

fn bitfit_qwen2<B: AutodiffBackend>(device: &B::Device) {
    let m: BitFitLlama<B> = common::llama("qwen2", device);
    step(m, "bitfit_qwen2", device);
}

fn bitfit_gpt2<B: AutodiffBackend>(device: &B::Device) {
    let m: BitFitGpt2<B> = common::gpt2(device);
    step(m, "bitfit_gpt2", device);
}

peft_testing::backend_tests!(bitfit_qwen2, bitfit_gpt2);

#[test]
fn a_model_without_biases_is_refused() {
    type B = burn::backend::Autodiff<burn::backend::NdArray>;
    let device = Default::default();
    let m: BitFitLlama<B> = common::llama("llama_gqa", &device);
    assert!(bitfit::bias_parameters(&m).is_empty());
    let err = bitfit::freeze_all_but_biases(m).unwrap_err().to_string();
    assert!(err.contains("no bias parameters"), "{err}");
    assert!(err.contains("would train nothing"), "{err}");
}
