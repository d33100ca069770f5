#![allow(clippy::unwrap_used, missing_docs)]
//! DPO against TRL's formulas (fixtures from scripts/fixtures/rlhf.py), and on a tiny
//! Llama with LoRA: ln 2 at the first step, rising margins when trained.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use peft_core::config::LoraFields;
use peft_core::model::set_adapters_disabled;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLlama, add_adapter};
use peft_models::{CausalLm, ForwardInput};
use peft_rlhf::dpo::{
    Dpo, DpoConfig, DpoLossType, PreferencePair, dpo_loss, reference_logps, reference_logps_of,
    sequence_logps,
};
use peft_train::data::Tokenized;
use peft_train::metrics::{METRICS_FILE, read};
use peft_train::trainer::{Objective, TrainOptions, train};

type B = Autodiff<Flex>;

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn every_loss_variant_matches_trls_formulas() {
    let f = fixture();
    let d = Default::default();
    let t = |k: &str| Tensor::<Flex, 1>::from_floats(floats(&f["inputs"][k]).as_slice(), &d);
    let cases = f["dpo"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let cfg = DpoConfig {
            beta: c["beta"].as_f64().unwrap(),
            loss_type: c["loss_type"].as_str().unwrap().parse().unwrap(),
            label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        };
        let out = dpo_loss(
            &cfg,
            t("policy_chosen"),
            t("policy_rejected"),
            t("ref_chosen"),
            t("ref_rejected"),
            t("chosen_tokens"),
            t("rejected_tokens"),
        );
        let what = format!(
            "{:?} beta={} eps={}",
            cfg.loss_type, cfg.beta, cfg.label_smoothing
        );
        let per: Vec<f32> = out.losses.clone().into_data().to_vec().unwrap();
        close(&per, &floats(&c["per_pair"]), &format!("{what} per pair"));
        let mean: f32 = out.losses.mean().into_scalar();
        close(
            &[mean],
            &[c["loss"].as_f64().unwrap() as f32],
            &format!("{what} loss"),
        );
        let cr: Vec<f32> = out.chosen_rewards.clone().into_data().to_vec().unwrap();
        let rr: Vec<f32> = out.rejected_rewards.clone().into_data().to_vec().unwrap();
        close(
            &cr,
            &floats(&c["rewards_chosen"]),
            &format!("{what} chosen rewards"),
        );
        close(
            &rr,
            &floats(&c["rewards_rejected"]),
            &format!("{what} rejected rewards"),
        );
        let margins: Vec<f32> = cr.iter().zip(&rr).map(|(a, b)| a - b).collect();
        close(&margins, &floats(&c["margins"]), &format!("{what} margins"));
    }
}

fn model(seed: u64) -> LoraLlama<B> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    let device = Default::default();
    <B as Backend>::seed(&device, seed);
    let mut m: LoraLlama<B> = peft_models::load_llama(&dir, &device).unwrap();
    let fields = LoraFields {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    add_adapter(&mut m, "default", &fields, &device).unwrap();
    freeze(m, &AdapterOnly)
}

/// Prompt of 4 tokens; the chosen completion continues it with +1 steps, the rejected one
/// with random tokens.
fn pairs(n: usize) -> Vec<PreferencePair> {
    let mut s = 12345u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    (0..n)
        .map(|_| {
            let prompt: Vec<u32> = (0..4).map(|_| 3 + next() % 50).collect();
            let good: Vec<u32> = (1..=4).map(|k| prompt[3] + k).collect();
            let bad: Vec<u32> = (0..4).map(|_| 3 + next() % 100).collect();
            let mk = |c: &[u32]| Tokenized {
                ids: prompt.iter().chain(c).copied().collect(),
                trained: (0..8).map(|i| i >= 4).collect(),
            };
            PreferencePair {
                chosen: mk(&good),
                rejected: mk(&bad),
                ref_chosen: 0.0,
                ref_rejected: 0.0,
            }
        })
        .collect()
}

#[test]
fn sequence_logps_sum_the_completion_tokens() {
    let d = Default::default();
    let m = model(1);
    let p = pairs(2);
    let seqs: Vec<&Tokenized> = vec![&p[0].chosen, &p[1].rejected];
    let (lp, counts) = sequence_logps(&m, &seqs, 0, &d);
    assert_eq!(counts, vec![4, 4]);
    let lp: Vec<f32> = lp.into_data().to_vec().unwrap();
    for (s, got) in seqs.iter().zip(lp) {
        let ids: Vec<i32> = s.ids.iter().map(|&t| t as i32).collect();
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 8]), &d);
        let logits = m.forward(ForwardInput::new(x), None);
        let v = logits.dims()[2];
        let all: Vec<f32> = burn::tensor::activation::log_softmax(logits.reshape([8, v]), 1)
            .into_data()
            .to_vec()
            .unwrap();
        let want: f32 = (4..8).map(|i| all[(i - 1) * v + s.ids[i] as usize]).sum();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}

#[test]
fn reference_logps_of_a_subset_match_the_full_pass_and_leave_the_rest_nan() {
    let d = Default::default();
    let mut m = model(3);
    set_adapters_disabled(&mut m, true).unwrap();
    // Completions of 1 to 4 tokens, so the length-sorted batches differ from the file's.
    let mut data = pairs(10);
    for (i, p) in data.iter_mut().enumerate() {
        for s in [&mut p.chosen, &mut p.rejected] {
            let keep = 5 + (i * 7 + s.ids[0] as usize) % 4;
            s.ids.truncate(keep);
            s.trained.truncate(keep);
        }
    }
    let mut full = data.clone();
    reference_logps(&m, &mut full, 3, 0, &d);
    let mut some = data;
    let computed = reference_logps_of(&m, &mut some, &[7, 2, 2, 5, 0], 3, 0, &d);
    assert_eq!(computed, 4);
    for (i, (f, s)) in full.iter().zip(&some).enumerate() {
        if [0, 2, 5, 7].contains(&i) {
            assert!((f.ref_chosen - s.ref_chosen).abs() < 1e-4, "pair {i}");
            assert!((f.ref_rejected - s.ref_rejected).abs() < 1e-4, "pair {i}");
            assert!(f.ref_chosen < 0.0 && f.ref_rejected < 0.0, "pair {i}");
        } else {
            assert!(s.ref_chosen.is_nan() && s.ref_rejected.is_nan(), "pair {i}");
        }
    }
}

#[test]
fn the_first_step_has_loss_ln2_and_zero_margins_then_margins_rise() {
    let d = Default::default();
    let mut m = model(2);
    let mut data = pairs(24);
    // The reference: the same model with its adapter disabled.
    set_adapters_disabled(&mut m, true).unwrap();
    reference_logps(&m, &mut data, 8, 0, &d);
    set_adapters_disabled(&mut m, false).unwrap();

    let dpo = Dpo::new(
        DpoConfig {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
        },
        0,
    );
    let refs: Vec<&PreferencePair> = data.iter().collect();
    let first: f32 = dpo.loss(&m, &refs, &d).into_scalar();
    let mean = f64::from(first) / data.len() as f64;
    assert!(
        (mean - std::f64::consts::LN_2).abs() < 1e-5,
        "first loss {mean}"
    );
    let metrics = dpo.take_metrics();
    let margin = metrics.iter().find(|(k, _)| k == "margin").unwrap().1;
    assert!(margin.abs() < 1e-5, "margin {margin}");

    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        lr: 1e-2,
        batch_size: 4,
        max_steps: Some(12),
        progress: false,
        ..Default::default()
    };
    train(m, &dpo, &data, &[], &opts, out.path(), false, &d).unwrap();
    let lines = read(&out.path().join(METRICS_FILE)).unwrap();
    assert_eq!(lines.len(), 12);
    for l in &lines {
        for k in ["rewards_chosen", "rewards_rejected", "margin", "accuracy"] {
            assert!(l.extra.contains_key(k), "step {} lacks {k}", l.step);
        }
    }
    let early: f64 = lines[..3].iter().map(|l| l.extra["margin"]).sum::<f64>() / 3.0;
    let late: f64 = lines[9..].iter().map(|l| l.extra["margin"]).sum::<f64>() / 3.0;
    assert!(late > early + 0.05, "margin {early} -> {late}");
    assert!(
        lines[11].loss < std::f64::consts::LN_2,
        "loss {}",
        lines[11].loss
    );
}
