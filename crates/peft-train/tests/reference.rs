#![allow(clippy::unwrap_used, missing_docs)]
//! The numeric pieces of the loop against PyTorch and transformers
//! (fixtures from scripts/fixtures/train.py).

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::prelude::*;
use peft_core::format::TensorFile;
use peft_train::data::{Batch, Tokenized};
use peft_train::optim::{AdamW, AdamWConfig, Decay, GradStore, Schedule};
use peft_train::trainer::token_nll;

type B = Autodiff<Flex>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> (TensorFile, serde_json::Value) {
    let f = TensorFile::read(fixtures().join("train_reference.safetensors")).unwrap();
    let j = std::fs::read_to_string(fixtures().join("train_reference.json")).unwrap();
    (f, serde_json::from_str(&j).unwrap())
}

fn vec_of(f: &mut TensorFile, key: &str) -> Vec<f32> {
    f.take_any(key).unwrap().convert::<f32>().to_vec().unwrap()
}

#[derive(Module, Debug)]
struct TwoParams<B: Backend> {
    p0: Param<Tensor<B, 2>>,
    p1: Param<Tensor<B, 1>>,
}

/// A backward pass whose gradients are exactly `g0` and `g1`: d/dp sum(p * g) = g.
fn grads_of(
    m: &TwoParams<B>,
    g0: &[f32],
    g1: &[f32],
    device: &burn::tensor::Device<B>,
) -> GradStore<Flex> {
    let g0 = Tensor::<B, 2>::from_data(TensorData::new(g0.to_vec(), [3, 4]), device);
    let g1 = Tensor::<B, 1>::from_data(TensorData::new(g1.to_vec(), [5]), device);
    let l = (m.p0.val() * g0).sum() + (m.p1.val() * g1).sum();
    let g = l.backward();
    let mut store = GradStore::default();
    store.accumulate(m, &g);
    store
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol, "{what}[{i}]: {a} vs torch {b}");
    }
}

#[test]
fn adamw_matches_torch() {
    let (mut f, _) = reference();
    let device = Default::default();
    let p0 = vec_of(&mut f, "adamw.p0");
    let p1 = vec_of(&mut f, "adamw.p1");
    let mut m = TwoParams::<B> {
        p0: Param::from_tensor(Tensor::from_data(TensorData::new(p0, [3, 4]), &device)),
        p1: Param::from_tensor(Tensor::from_data(TensorData::new(p1, [5]), &device)),
    };
    let mut opt = AdamW::<Flex>::new(AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    });
    for step in 0..3 {
        let g0 = vec_of(&mut f, &format!("adamw.g{step}.0"));
        let g1 = vec_of(&mut f, &format!("adamw.g{step}.1"));
        let grads = grads_of(&m, &g0, &g1, &device);
        assert_eq!(grads.len(), 2);
        m = opt.step(m, grads, 0.01);
        let want0 = vec_of(&mut f, &format!("adamw.out{step}.0"));
        let want1 = vec_of(&mut f, &format!("adamw.out{step}.1"));
        let got0: Vec<f32> = m.p0.val().into_data().to_vec().unwrap();
        let got1: Vec<f32> = m.p1.val().into_data().to_vec().unwrap();
        assert_close(&got0, &want0, 1e-6, &format!("p0 after step {step}"));
        assert_close(&got1, &want1, 1e-6, &format!("p1 after step {step}"));
    }
    // The state round-trips through a checkpoint's tensors.
    let saved = opt.state_tensors();
    assert_eq!(saved.len(), 4);
    let mut again = AdamW::<Flex>::new(opt.config.clone());
    again.load_state(opt.steps, saved.clone(), &device).unwrap();
    assert_eq!(again.state_tensors(), saved);
}

#[test]
fn clipping_matches_torch() {
    let (mut f, j) = reference();
    let device = Default::default();
    let m = TwoParams::<B> {
        p0: Param::from_tensor(Tensor::zeros([3, 4], &device)),
        p1: Param::from_tensor(Tensor::zeros([5], &device)),
    };
    let g0: Vec<f32> = vec_of(&mut f, "adamw.g0.0")
        .iter()
        .map(|v| v * 3.0)
        .collect();
    let g1: Vec<f32> = vec_of(&mut f, "adamw.g0.1")
        .iter()
        .map(|v| v * 3.0)
        .collect();
    let mut grads = grads_of(&m, &g0, &g1, &device);
    let norm = grads.clip_global_norm(1.0);
    let want = j["clip_norm"].as_f64().unwrap();
    assert!(
        (norm - want).abs() < 1e-4 * want,
        "norm {norm} vs torch {want}"
    );
    assert!((grads.global_norm() - 1.0).abs() < 1e-5);
    for (path, key) in [("p0", "clip.g0"), ("p1", "clip.g1")] {
        let got: Vec<f32> = grads
            .get(path)
            .unwrap()
            .clone()
            .into_data()
            .to_vec()
            .unwrap();
        assert_close(&got, &vec_of(&mut f, key), 1e-6, &format!("clipped {path}"));
    }
}

#[test]
fn schedules_match_transformers() {
    let (_, j) = reference();
    for (name, decay) in [("linear", Decay::Linear), ("cosine", Decay::Cosine)] {
        let s = Schedule {
            lr: 0.1,
            warmup: 3,
            total: 10,
            decay,
        };
        let want: Vec<f64> = j["schedule"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (step, w) in want.iter().enumerate() {
            let got = s.lr(step);
            assert!((got - w).abs() < 1e-12, "{name} step {step}: {got} vs {w}");
        }
    }
}

fn tiny_llama() -> peft_models::llama::Llama<Flex> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    peft_models::load_llama(&dir, &Default::default()).unwrap()
}

/// The fixture's batch as examples: token `i` is a target where transformers' label is not
/// -100 (its loss shifts labels by one, as `trained` does).
fn reference_examples(f: &mut TensorFile) -> Vec<Tokenized> {
    let ids: Vec<i64> = f
        .take_any("loss.input_ids")
        .unwrap()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let labels: Vec<i64> = f
        .take_any("loss.labels")
        .unwrap()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let lens = [8usize, 5];
    (0..2)
        .map(|b| {
            let row = &ids[b * 8..b * 8 + lens[b]];
            let lab = &labels[b * 8..b * 8 + lens[b]];
            Tokenized {
                ids: row.iter().map(|&t| t as u32).collect(),
                trained: lab
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| i > 0 && l != -100)
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn token_loss_matches_transformers_with_masked_prompt_and_padding() {
    let (mut f, j) = reference();
    let device = Default::default();
    let model = tiny_llama();
    let examples = reference_examples(&mut f);
    let refs: Vec<&Tokenized> = examples.iter().collect();
    let batch = Batch::new(&refs, 0);
    let n = batch.targets.len();
    let sum: f32 = token_nll(&model, &batch, &device).into_scalar();
    let want = j["loss"].as_f64().unwrap();
    let got = f64::from(sum) / n as f64;
    assert!(
        (got - want).abs() < 1e-5,
        "mean loss {got} vs transformers {want}"
    );

    // Padding is never a target: another pad id gives the same loss.
    let other = Batch::new(&refs, 77);
    let sum2: f32 = token_nll(&model, &other, &device).into_scalar();
    assert!((sum - sum2).abs() < 1e-5);

    // Masked prompt tokens contribute nothing: training on them too adds exactly their
    // negative log-likelihood, read here from the full logits.
    let mut all = examples.clone();
    for e in &mut all {
        for (i, t) in e.trained.iter_mut().enumerate() {
            *t = i > 0;
        }
    }
    let all_refs: Vec<&Tokenized> = all.iter().collect();
    let sum_all: f32 = token_nll(&model, &Batch::new(&all_refs, 0), &device).into_scalar();
    let mut extra = 0.0f64;
    for e in &examples {
        let len = e.ids.len();
        let ids: Vec<i32> = e.ids.iter().map(|&t| t as i32).collect();
        let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        use peft_models::CausalLm;
        let logits = model.forward(peft_models::ForwardInput::new(x), None);
        let v = logits.dims()[2];
        let logp: Vec<f32> = burn::tensor::activation::log_softmax(logits.reshape([len, v]), 1)
            .into_data()
            .to_vec()
            .unwrap();
        for i in 1..len {
            if !e.trained[i] {
                extra -= f64::from(logp[(i - 1) * v + e.ids[i] as usize]);
            }
        }
    }
    let diff = f64::from(sum_all - sum);
    assert!(extra > 0.1, "the fixture masks tokens with real loss");
    assert!((diff - extra).abs() < 1e-3, "{diff} vs {extra}");
}

/// The gradient of the mean token loss reaches the model as transformers' does: here, the
/// final norm's weight, which every target's cross-entropy gradient passes through.
#[test]
fn token_loss_gradient_matches_transformers() {
    let (mut f, _) = reference();
    let want = vec_of(&mut f, "loss.grad_norm_weight");
    let device = Default::default();
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    let model: peft_models::llama::Llama<B> = peft_models::load_llama(&dir, &device).unwrap();
    let examples = reference_examples(&mut f);
    let refs: Vec<&Tokenized> = examples.iter().collect();
    let batch = Batch::new(&refs, 0);
    let n = batch.targets.len();
    let grads = (token_nll(&model, &batch, &device) / n as f64).backward();
    let got: Vec<f32> = model
        .model
        .norm
        .weight
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "the fixture's gradient is all but zero");
    assert_close(&got, &want, 1e-5 * scale.max(1.0), "d loss / d norm.weight");
}
