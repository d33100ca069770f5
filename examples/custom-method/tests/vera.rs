#![allow(clippy::unwrap_used, missing_docs)]
//! VeRA on a tiny Llama: the math against an independent f64 computation, a no-op at
//! initialisation, training with peft-train's loop, merge, and a save/load round trip.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use peft_core::model::{merge_adapters, set_adapters_disabled, unmerge_adapters};
use peft_core::target::Targets;
use peft_core::trainable::{freeze, trainable_paths};
use peft_example_vera::{VeraConfig, VeraLlama, VeraTrainable, add_vera, load_vera, save_vera};
use peft_models::{CausalLm, ForwardInput};
use peft_train::data::Tokenized;
use peft_train::optim::trainable_tensors;
use peft_train::trainer::{TokenCrossEntropy, TrainOptions, evaluate_loss, train};

type B = Autodiff<Flex>;

fn base<Bk: Backend>() -> VeraLlama<Bk> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/peft-models/tests/fixtures/llama_gqa");
    peft_models::load_llama(&dir, &Default::default()).unwrap()
}

fn config() -> VeraConfig {
    VeraConfig {
        d_initial: 0.5,
        ..VeraConfig::new(8, Targets::list(["q_proj", "v_proj", "down_proj"]))
    }
}

fn logits<Bk: Backend, M: CausalLm<Bk>>(m: &M) -> Vec<f32> {
    let ids = Tensor::<Bk, 2, Int>::from_ints([[1, 17, 42, 99, 5, 63, 120]], &Default::default());
    m.forward(ForwardInput::new(ids), None)
        .into_data()
        .to_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn data() -> Vec<Tokenized> {
    // Sequences whose second half repeats the first: learnable, loss on the second half.
    (0..32u32)
        .map(|i| {
            let first: Vec<u32> = (0..4).map(|k| 3 + (i * 7 + k * 13) % 60).collect();
            let ids: Vec<u32> = first.iter().chain(&first).copied().collect();
            Tokenized {
                trained: (0..8).map(|k| k >= 4).collect(),
                ids,
            }
        })
        .collect()
}

#[test]
fn a_new_adapter_is_a_no_op_and_the_layer_computes_veras_formula() {
    let device = Default::default();
    let plain = logits::<Flex, _>(&base::<Flex>());
    let mut m = base::<Flex>();
    let adapted = add_vera(&mut m, "default", &config(), &device).unwrap();
    assert_eq!(
        adapted.len(),
        3 * 2,
        "three targets in each of the two layers"
    );
    assert_eq!(
        logits::<Flex, _>(&m),
        plain,
        "lambda_b = 0: the base model, bit for bit"
    );

    // Set lambda_b and check one layer against y = W x + lambda_b * B (lambda_d * A x),
    // computed here in f64 from the raw numbers.
    let layer = &mut m.model.layers[0].self_attn.q_proj;
    let v = layer.adapter.get_mut("default").unwrap();
    let out = v.lambda_b.dims()[0];
    let lb: Vec<f32> = (0..out).map(|o| 0.1 * ((o % 7) as f32 - 3.0)).collect();
    v.lambda_b = burn::module::Param::from_data(TensorData::new(lb.clone(), [out]), &device);
    let inp = layer.base.weight.dims()[0];
    let x: Vec<f32> = (0..inp)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let y: Vec<f32> = layer
        .forward(Tensor::<Flex, 2>::from_data(
            TensorData::new(x.clone(), [1, inp]),
            &device,
        ))
        .into_data()
        .to_vec()
        .unwrap();
    let v = layer.adapter.get("default").unwrap();
    let w: Vec<f32> = layer.base.weight.val().into_data().to_vec().unwrap(); // [in, out]
    let a: Vec<f32> = v.vera_a.val().into_data().to_vec().unwrap(); // [in, r]
    let b: Vec<f32> = v.vera_b.val().into_data().to_vec().unwrap(); // [r, out]
    let ld: Vec<f32> = v.lambda_d.val().into_data().to_vec().unwrap();
    let r = ld.len();
    let ax: Vec<f64> = (0..r)
        .map(|k| {
            (0..inp)
                .map(|i| f64::from(x[i]) * f64::from(a[i * r + k]))
                .sum::<f64>()
                * f64::from(ld[k])
        })
        .collect();
    for o in 0..out {
        let base: f64 = (0..inp)
            .map(|i| f64::from(x[i]) * f64::from(w[i * out + o]))
            .sum();
        let bias = layer.base.bias.as_ref().map_or(0.0, |b| {
            f64::from(b.val().into_data().to_vec::<f32>().unwrap()[o])
        });
        let delta: f64 = (0..r)
            .map(|k| ax[k] * f64::from(b[k * out + o]))
            .sum::<f64>()
            * f64::from(lb[o]);
        let want = base + bias + delta;
        assert!(
            (f64::from(y[o]) - want).abs() < 1e-4,
            "output {o}: {} vs {want}",
            y[o]
        );
    }
}

#[test]
fn trains_with_peft_train_merges_and_round_trips_its_file() {
    let device = Default::default();
    <B as Backend>::seed(&device, 1);
    let mut m = base::<B>();
    add_vera(&mut m, "default", &config(), &device).unwrap();
    let m = freeze(m, &VeraTrainable);
    let paths = trainable_paths(&m);
    assert_eq!(
        paths.len(),
        12,
        "lambda_d and lambda_b of 6 layers: {paths:?}"
    );
    let before: Vec<(String, TensorData)> = all_params(&m);

    let examples = data();
    let (train_set, val) = examples.split_at(24);
    let obj = TokenCrossEntropy { pad: 0 };
    let start = evaluate_loss(&m.valid(), &obj, val, 4, &device).loss;
    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        lr: 0.2,
        batch_size: 4,
        max_steps: Some(40),
        progress: false,
        ..Default::default()
    };
    let done = train(m, &obj, train_set, val, &opts, out.path(), false, &device).unwrap();
    let end = evaluate_loss(&done.model.valid(), &obj, val, 4, &device).loss;
    assert!(end < start - 0.05, "validation loss {start} -> {end}");

    // Only the lambdas moved.
    for ((path, a), (_, b)) in before.iter().zip(all_params(&done.model)) {
        let changed = a != &b;
        assert_eq!(
            changed,
            VeraTrainableCheck::is_lambda(path),
            "{path} changed: {changed}"
        );
    }
    assert_eq!(trainable_tensors(&done.model).len(), 12);

    // Save, load into a fresh model: the same logits.
    let trained = done.model.valid();
    let dir = tempfile::tempdir().unwrap();
    save_vera(&trained, "default", &config(), dir.path()).unwrap();
    let mut fresh = base::<Flex>();
    load_vera(&mut fresh, dir.path(), "default", &device).unwrap();
    let (t, f) = (logits::<Flex, _>(&trained), logits::<Flex, _>(&fresh));
    assert!(t == f, "the loaded adapter gives the trained logits");
    assert!(
        max_diff(&t, &logits::<Flex, _>(&base::<Flex>())) > 1e-3,
        "the adapter changes the output"
    );

    // Disabled is the base model, bit for bit; merge folds the adapter into the weights
    // and unmerge takes it out again (up to rounding).
    set_adapters_disabled(&mut fresh, true).unwrap();
    assert!(
        logits::<Flex, _>(&fresh) == logits::<Flex, _>(&base::<Flex>()),
        "disabled is the base"
    );
    set_adapters_disabled(&mut fresh, false).unwrap();
    merge_adapters(&mut fresh, None, true).unwrap();
    assert!(max_diff(&logits::<Flex, _>(&fresh), &t) < 1e-4);
    unmerge_adapters(&mut fresh).unwrap();
    assert!(max_diff(&logits::<Flex, _>(&fresh), &t) < 1e-4);
}

struct VeraTrainableCheck;
impl VeraTrainableCheck {
    fn is_lambda(path: &str) -> bool {
        path.ends_with("lambda_d") || path.ends_with("lambda_b")
    }
}

fn all_params<Bk: Backend, M: burn::module::Module<Bk>>(m: &M) -> Vec<(String, TensorData)> {
    struct V(Vec<String>, Vec<(String, TensorData)>);
    impl<Bk: Backend> burn::module::ModuleVisitor<Bk> for V {
        fn enter_module(&mut self, n: &str, _: &str) {
            self.0.push(n.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<Bk, D>>) {
            self.1.push((self.0.join("."), p.val().into_data()));
        }
    }
    let mut v = V(Vec::new(), Vec::new());
    m.visit(&mut v);
    v.1
}
