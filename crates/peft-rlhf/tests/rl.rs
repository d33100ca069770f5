#![allow(clippy::unwrap_used, missing_docs)]
//! PPO and GRPO against PyTorch (fixtures from scripts/fixtures/rl.py): KL, rewards, GAE,
//! whitening, the clipped policy and value losses, group advantages and GRPO's losses; and
//! GRPO training a tiny Llama with LoRA through peft-train's loop.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use peft_core::config::LoraFields;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLlama, add_adapter};
use peft_rlhf::grpo::{
    Grpo, GrpoConfig, GrpoLossType, ScaleRewards, group_advantages, grpo_per_token, reduce_grpo,
};
use peft_rlhf::ppo::{
    KlEstimator, gae, kl_per_token, masked_whiten, ppo_policy_loss, ppo_value_loss, rewards_with_kl,
};
use peft_train::metrics::{METRICS_FILE, read};
use peft_train::trainer::{TrainOptions, train};

type F = Flex;
type B = Autodiff<Flex>;

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rl_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A flat vector of a number array, nested or not.
fn flat(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn mask(lengths: &[usize], t: usize) -> Vec<f32> {
    lengths
        .iter()
        .flat_map(|&l| (0..t).map(move |j| if j < l { 1.0 } else { 0.0 }))
        .collect()
}

fn t2(v: Vec<f32>, n: usize, t: usize) -> Tensor<F, 2> {
    Tensor::from_data(TensorData::new(v, [n, t]), &Default::default())
}

fn lengths(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn ppo_kl_rewards_gae_and_clipped_losses_match_pytorch() {
    let f = fixture();
    let p = &f["ppo"];
    let len = lengths(&p["lengths"]);
    let (n, t) = (len.len(), 6);
    let m = mask(&len, t);
    let (logp, refp) = (flat(&p["logprobs"]), flat(&p["ref_logprobs"]));
    let k1 = kl_per_token(&logp, &refp, &m, KlEstimator::K1);
    close(&k1, &flat(&p["kl_k1"]), 1e-5, "kl k1");
    let k3 = kl_per_token(&logp, &refp, &m, KlEstimator::K3);
    close(&k3, &flat(&p["kl_k3"]), 1e-5, "kl k3");
    let objective_kl = k1.iter().sum::<f32>() / n as f32;
    close(
        &[objective_kl],
        &flat(&p["objective_kl"]),
        1e-5,
        "objective/kl",
    );
    let (rewards, non_score) = rewards_with_kl(
        &k1,
        &flat(&p["scores"]),
        &len,
        t,
        p["kl_coef"].as_f64().unwrap(),
    );
    close(&rewards, &flat(&p["rewards"]), 1e-5, "rewards");
    close(&non_score, &flat(&p["non_score_reward"]), 1e-5, "non-score");
    let values = flat(&p["values"]);
    let (adv, ret) = gae(
        &rewards,
        &values,
        &m,
        t,
        p["gamma"].as_f64().unwrap(),
        p["lam"].as_f64().unwrap(),
    );
    close(&adv, &flat(&p["advantages"]), 1e-5, "advantages");
    close(&ret, &flat(&p["returns"]), 1e-5, "returns");
    let white = masked_whiten(&adv, &m);
    close(&white, &flat(&p["whitened_advantages"]), 1e-4, "whitened");

    let pl = ppo_policy_loss(
        t2(flat(&p["new_logprobs"]), n, t),
        t2(logp, n, t),
        t2(white, n, t),
        t2(m.clone(), n, t),
        p["cliprange"].as_f64().unwrap(),
    );
    close(
        &[pl.loss.into_scalar()],
        &flat(&p["pg_loss"]),
        1e-4,
        "pg loss",
    );
    close(
        &[pl.clipfrac as f32],
        &flat(&p["pg_clipfrac"]),
        1e-6,
        "clipfrac",
    );
    close(
        &[pl.approxkl as f32],
        &flat(&p["approxkl"]),
        1e-5,
        "approxkl",
    );
    let (vl, vfrac) = ppo_value_loss(
        t2(flat(&p["vpred"]), n, t),
        t2(values, n, t),
        t2(ret, n, t),
        t2(m, n, t),
        p["cliprange_value"].as_f64().unwrap(),
    );
    close(&[vl.into_scalar()], &flat(&p["vf_loss"]), 1e-5, "vf loss");
    close(
        &[vfrac as f32],
        &flat(&p["vf_clipfrac"]),
        1e-6,
        "vf clipfrac",
    );
}

#[test]
fn grpo_advantages_and_losses_match_trl() {
    let f = fixture();
    let g = &f["grpo"];
    let rewards = flat(&g["rewards"]);
    let k = g["num_generations"].as_u64().unwrap() as usize;
    for (name, scale) in [
        ("group", ScaleRewards::Group),
        ("batch", ScaleRewards::Batch),
        ("none", ScaleRewards::None),
    ] {
        close(
            &group_advantages(&rewards, k, scale),
            &flat(&g["advantages"][name]),
            1e-4,
            name,
        );
    }
    let len = lengths(&g["lengths"]);
    let t = g["max_completion_length"].as_u64().unwrap() as usize;
    let n = len.len();
    let m = t2(mask(&len, t), n, t);
    let adv = Tensor::<F, 1>::from_floats(
        group_advantages(&rewards, k, ScaleRewards::Group).as_slice(),
        &Default::default(),
    )
    .unsqueeze_dim::<2>(1);
    for case in g["losses"].as_array().unwrap() {
        let beta = case["beta"].as_f64().unwrap();
        let terms = grpo_per_token(
            t2(flat(&g["logprobs"]), n, t),
            t2(flat(&g["old_logprobs"]), n, t),
            Some(t2(flat(&g["ref_logprobs"]), n, t)),
            adv.clone(),
            beta,
            case["epsilon_low"].as_f64().unwrap(),
            case["epsilon_high"].as_f64().unwrap(),
        );
        for (name, lt) in [
            ("grpo", GrpoLossType::Grpo),
            ("bnpo", GrpoLossType::Bnpo),
            ("dr_grpo", GrpoLossType::DrGrpo),
        ] {
            let l = reduce_grpo(terms.per_token.clone(), m.clone(), lt, t);
            close(
                &[l.into_scalar()],
                &flat(&case[name]),
                1e-5,
                &format!("{name} beta={beta}"),
            );
        }
        let msum: f32 = m.clone().sum().into_scalar();
        let kl: f32 = (terms.kl.unwrap() * m.clone()).sum().into_scalar() / msum;
        close(&[kl], &flat(&case["kl"]), 1e-5, "kl");
        let clip: f32 = (terms.clipped * m.clone()).sum().into_scalar() / msum;
        close(&[clip], &flat(&case["clip_ratio"]), 1e-6, "clip ratio");
    }
}

/// Serialises the seeded initialisations: the backend's generator is shared by the
/// tests running in parallel, and the LoRA A matrices are drawn from it.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn policy(seed: u64) -> LoraLlama<B> {
    let _guard = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// The mean probability, over the prompts, that the next token is below 64.
fn low_mass(m: &LoraLlama<B>, prompts: &[Vec<u32>]) -> f64 {
    use peft_models::{CausalLm, ForwardInput};
    let d = Default::default();
    let mut sum = 0.0;
    for p in prompts {
        let ids: Vec<i32> = p.iter().map(|&t| t as i32).collect();
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, p.len()]), &d);
        let logits = m.forward(ForwardInput::new(x), None);
        let v = logits.dims()[2];
        let last = logits
            .slice([0..1, p.len() - 1..p.len(), 0..v])
            .reshape([v]);
        let probs: Vec<f32> = burn::tensor::activation::softmax(last, 0)
            .into_data()
            .to_vec()
            .unwrap();
        sum += probs[..64].iter().map(|&x| f64::from(x)).sum::<f64>();
    }
    sum / prompts.len() as f64
}

#[test]
fn log_probabilities_are_those_of_the_sampling_temperature() {
    use peft_models::{CausalLm, ForwardInput};
    use peft_rlhf::dpo::token_logps_at;
    use peft_rlhf::ppo::{PolicyWithValue, policy_terms};
    use peft_train::data::Tokenized;

    let d = Default::default();
    let lm = policy(9);
    // One sequence, the last 3 of its 5 tokens are the completion.
    let seq = Tokenized {
        ids: vec![1, 17, 30, 5, 44],
        trained: vec![false, false, true, true, true],
    };
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1, 17, 30, 5, 44], [1, 5]), &d);
    let logits = lm.forward(ForwardInput::new(x), None);
    let v = logits.dims()[2];
    let want = |t: f32| -> Vec<f32> {
        let lp: Vec<f32> =
            burn::tensor::activation::log_softmax(logits.clone().reshape([5, v]) / t, 1)
                .into_data()
                .to_vec()
                .unwrap();
        (2..5)
            .map(|i| lp[(i - 1) * v + seq.ids[i] as usize])
            .collect()
    };
    let got = |t: f64| -> Vec<f32> {
        token_logps_at(&lm, &[&seq], 0, t, &d)
            .0
            .into_data()
            .to_vec()
            .unwrap()
    };
    close(&got(1.0), &want(1.0), 1e-5, "T = 1");
    close(&got(0.5), &want(0.5), 1e-5, "T = 0.5");
    assert!(
        (got(0.5)[0] - got(1.0)[0]).abs() > 1e-3,
        "the temperature did nothing"
    );
    // The policy with a value head: the same log-probabilities, values untouched.
    let pv = PolicyWithValue::new(lm, 32, 0.02, &d);
    let (lp_cold, v_cold, _) = policy_terms(&pv, &[&seq], 0, 0.5, &d);
    let (_, v_warm, _) = policy_terms(&pv, &[&seq], 0, 1.0, &d);
    close(
        &lp_cold.into_data().to_vec().unwrap(),
        &want(0.5),
        1e-5,
        "policy T = 0.5",
    );
    close(
        &v_cold.into_data().to_vec().unwrap(),
        &v_warm.into_data().to_vec().unwrap(),
        1e-6,
        "values",
    );
}

#[test]
fn grpo_trains_a_tiny_policy_towards_the_rewarded_token() {
    // The reward is the share of completion tokens below 64 (a quarter of the vocabulary
    // at the start): the policy should learn to prefer them.
    let d = Default::default();
    let reward = Box::new(|s: &[(Vec<u32>, Vec<u32>)]| {
        s.iter()
            .map(|(_, c)| c.iter().filter(|&&t| t < 64).count() as f32 / c.len().max(1) as f32)
            .collect()
    });
    let cfg = GrpoConfig {
        num_generations: 8,
        max_completion_length: 3,
        temperature: 1.0,
        ..Default::default()
    };
    cfg.validate().unwrap();
    let grpo = Grpo::new(cfg, 0, reward, None);
    let prompts: Vec<Vec<u32>> = (0..2).map(|i| vec![1, 10 + i, 20 + i]).collect();
    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        lr: 1e-1,
        batch_size: 2,
        max_steps: Some(24),
        progress: false,
        max_grad_norm: None,
        ..Default::default()
    };
    let before = low_mass(&policy(4), &prompts);
    let done = train(
        policy(4),
        &grpo,
        &prompts,
        &[],
        &opts,
        out.path(),
        false,
        &d,
    )
    .unwrap();
    let after = low_mass(&done.model, &prompts);
    println!("P(token < 64) {before:.4} -> {after:.4}");
    let lines = read(&out.path().join(METRICS_FILE)).unwrap();
    assert_eq!(lines.len(), 24);
    let rewards: Vec<f64> = lines.iter().map(|l| l.extra["reward"]).collect();
    for k in [
        "reward",
        "reward_std",
        "completion_length",
        "clip_ratio",
        "frac_reward_zero_std",
    ] {
        assert!(lines[0].extra.contains_key(k), "no {k}");
    }
    println!("GRPO sampled rewards per step {rewards:?}");
    // The sampled rewards are noisy; the probability of a rewarded first token is not.
    assert!(after > before + 0.05, "P(token < 64) {before} -> {after}");
}

#[test]
fn ppo_with_a_value_head_trains_a_tiny_policy_towards_the_rewarded_tokens() {
    use burn::module::AutodiffModule;
    use peft_core::model::set_adapters_disabled;
    use peft_rlhf::dpo::token_logps_at;
    use peft_rlhf::ppo::{PolicyWithValue, Ppo, PpoConfig};
    use peft_train::data::Tokenized;

    let d = Default::default();
    let reward = Box::new(|s: &[(Vec<u32>, Vec<u32>)]| {
        s.iter()
            .map(|(_, c)| c.iter().filter(|&&t| t < 64).count() as f32 / c.len().max(1) as f32)
            .collect()
    });
    let lm = policy(6);
    // The reference: the same weights with the adapter disabled.
    let mut reference = lm.valid();
    set_adapters_disabled(&mut reference, true).unwrap();
    let reference = Box::new(move |seqs: &[&Tokenized], temperature: f64| {
        token_logps_at(&reference, seqs, 0, temperature, &Default::default())
            .0
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    });
    let cfg = PpoConfig {
        max_completion_length: 3,
        temperature: 1.0,
        ppo_epochs: 4,
        ..Default::default()
    };
    cfg.validate().unwrap();
    let ppo = Ppo::new(cfg, 0, reward, Some(reference));
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| vec![1, 10 + i, 20 + i]).collect();
    let before = low_mass(&lm, &prompts);
    let model = PolicyWithValue::new(lm, 32, 0.02, &d);
    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        lr: 1e-1,
        batch_size: 16,
        max_steps: Some(40),
        progress: false,
        max_grad_norm: None,
        ..Default::default()
    };
    let done = train(model, &ppo, &prompts, &[], &opts, out.path(), false, &d).unwrap();
    let after = low_mass(&done.model.lm, &prompts);
    let lines = read(&out.path().join(METRICS_FILE)).unwrap();
    assert_eq!(lines.len(), 40);
    for k in [
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/clipfrac",
        "loss/value",
    ] {
        assert!(lines[0].extra.contains_key(k), "no {k}");
    }
    // A fresh adapter is a no-op: the first rollout's policy is the reference.
    assert!(lines[0].extra["objective/kl"].abs() < 1e-4);
    // Rollouts alternate with reuse steps, which carry no rollout metrics.
    assert!(!lines[1].extra.contains_key("objective/kl"));
    assert!(lines.iter().any(|l| l.extra["policy/approxkl"] > 0.0));
    let scores: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.extra.get("objective/scores").copied())
        .collect();
    println!("P(token < 64) {before:.4} -> {after:.4}; rollout scores {scores:?}");
    assert!(
        after > before + 0.05,
        "P(token < 64) {before} -> {after}; scores {scores:?}"
    );
}
