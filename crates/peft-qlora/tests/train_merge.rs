//! LoRA over the 4-bit base: training changes only the adapter and lowers the loss;
//! merging keeps f32 exactly or requantizes with a measured error.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use peft_core::config::{InitLoraWeights, LoraFields};
use peft_models::{CausalLm, ForwardInput};
use peft_qlora::{QloraLlama, load_bnb_llama, merge_requantize, merge_to_dense};

type A = burn::backend::Autodiff<burn::backend::NdArray>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
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

const SEQ: [i64; 12] = [1, 17, 200, 42, 99, 3, 128, 255, 7, 64, 31, 2];

/// Next-token cross-entropy on SEQ.
fn loss<B: Backend, M: CausalLm<B>>(m: &M, device: &B::Device) -> Tensor<B, 1> {
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(SEQ.to_vec(), [SEQ.len()]), device)
        .unsqueeze::<2>();
    let logits = m.forward(ForwardInput::new(ids), None);
    let [_, s, v] = logits.dims();
    let logits = logits.reshape([s, v]).slice([0..s - 1, 0..v]);
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(SEQ[1..].to_vec(), [s - 1]), device);
    burn::nn::loss::CrossEntropyLossConfig::new()
        .init(device)
        .forward(logits, targets)
}

fn base_codes(m: &QloraLlama<A>) -> Vec<Vec<i32>> {
    m.model
        .layers
        .iter()
        .flat_map(|l| {
            [&l.self_attn.q_proj, &l.mlp.down_proj].map(|x| {
                x.base
                    .codes
                    .to_data()
                    .convert::<i32>()
                    .to_vec::<i32>()
                    .unwrap()
            })
        })
        .collect()
}

fn lora_fields() -> LoraFields {
    LoraFields {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(peft_core::target::Targets::list([
            "q_proj",
            "v_proj",
            "down_proj",
        ])),
        init_lora_weights: InitLoraWeights::Bool(true),
        ..LoraFields::default()
    }
}

/// A step of AdamW on the frozen-policy model changes the LoRA matrices and nothing else
/// (the 4-bit codes are constants; embeddings, norms and the head are frozen), and a few
/// steps lower the loss: the input gradient flows through the 4-bit base to the adapters
/// of earlier layers.
#[test]
fn lora_over_4bit_trains_only_the_adapter() {
    let device = Default::default();
    let mut m: QloraLlama<A> = load_bnb_llama(&fixture("llama_gqa_nf4"), &device).unwrap();
    let fields = lora_fields();
    let adapted = peft_lora::add_adapter(&mut m, "default", &fields, &device).unwrap();
    assert_eq!(adapted.len(), 6);
    let mut m = peft_core::trainable::freeze(m, &peft_lora::trainable_policy(&fields, &adapted));
    let before = snapshot(&m);
    let codes = base_codes(&m);
    let l0 = loss(&m, &device);
    let first = l0.clone().into_scalar().elem::<f32>();
    let grads = l0.backward();
    // The first layer's A gets a gradient only through the later layers' 4-bit weights.
    let a0 = &m.model.layers[0].self_attn.q_proj.adapter.slots[0].lora_b;
    assert!(
        a0.grad(&grads).is_some(),
        "no gradient reached layer 0's adapter"
    );
    let grads = GradientsParams::from_grads(grads, &m);
    let mut optim = AdamWConfig::new().init();
    m = optim.step(1e-2, m, grads);
    let after = snapshot(&m);
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert!(!changed.is_empty());
    for k in &changed {
        assert!(k.contains(".adapter."), "{k} changed");
    }
    assert!(
        changed
            .iter()
            .any(|k| k.contains("layers.0.self_attn.q_proj.adapter"))
    );
    assert_eq!(codes, base_codes(&m), "the 4-bit base changed");
    for _ in 0..9 {
        let l = loss(&m, &device);
        let grads = GradientsParams::from_grads(l.backward(), &m);
        m = optim.step(1e-2, m, grads);
    }
    let last = loss(&m, &device).into_scalar().elem::<f32>();
    assert!(last < first - 0.05, "loss {first} -> {last}");
}

type B = burn::backend::NdArray;

fn logits<M: CausalLm<B>>(m: &M, device: &burn::backend::ndarray::NdArrayDevice) -> Vec<f32> {
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(SEQ.to_vec(), [SEQ.len()]), device)
        .unsqueeze::<2>();
    m.forward(ForwardInput::new(ids), None)
        .into_data()
        .to_vec()
        .unwrap()
}

fn with_random_adapter(device: &burn::backend::ndarray::NdArrayDevice) -> QloraLlama<B> {
    let mut m: QloraLlama<B> = load_bnb_llama(&fixture("llama_gqa_nf4"), device).unwrap();
    let fields = LoraFields {
        init_lora_weights: InitLoraWeights::Bool(false),
        ..lora_fields()
    };
    peft_lora::add_adapter(&mut m, "default", &fields, device).unwrap();
    m
}

/// Merging into f32 is exact (the adapter's output equals the merged weight's); merging
/// with requantization keeps 4 bits, reports its error, and that error is the NF4 error of
/// the merged weight (relative ~0.1, as quantizing the dense model gives).
#[test]
fn merging_keeps_f32_exactly_or_requantizes_with_a_measured_error() {
    let device = Default::default();
    let m = with_random_adapter(&device);
    let want = logits(&m, &device);
    let dense = merge_to_dense(m, None, true).unwrap();
    let got = logits(&dense, &device);
    let d = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "f32 merge differs by {d}");

    // Requantizing: the same adapter, merged and requantized in place, must equal the f32
    // merge quantized afresh with the fixture's settings (NF4, block 64, double quant).
    let m = with_random_adapter(&device);
    let unmerged = logits(&m, &device);
    let mut requantized = m.clone();
    let report = merge_requantize(&mut requantized, None, true).unwrap();
    assert_eq!(report.layers.len(), 6);
    assert!(
        report.total.relative > 0.01 && report.total.relative < 0.3,
        "{report:?}"
    );
    assert!(report.total.max_abs > 0.0);
    // The merged model still adds nothing on top: its adapter is marked merged.
    use peft_core::adapters::AdapterControl;
    assert_eq!(
        requantized.model.layers[0]
            .self_attn
            .q_proj
            .adapter
            .merged_adapters(),
        vec!["default".to_string()]
    );
    let reference = peft_qlora::quantize_llama(
        merge_to_dense(m, None, true).unwrap(),
        &peft_qlora::QuantConfig::new(),
    )
    .unwrap();
    let (got, want) = (logits(&requantized, &device), logits(&reference, &device));
    let d = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Requantizing moves the logits by whole NF4 steps (several units here); the two paths
    // compute W + dW in a different float order, so a value sitting on a rounding midpoint
    // can take the neighbouring code: allow a twentieth of the requantization's own effect.
    let moved = unmerged
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 0.1, "requantizing changed the logits by {moved}");
    assert!(
        d < moved / 20.0,
        "requantized merge vs quantized f32 merge: {d} (requantization moved them by {moved})"
    );
}
