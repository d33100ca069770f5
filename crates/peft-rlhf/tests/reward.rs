#![allow(clippy::unwrap_used, missing_docs)]
//! Reward models against TRL and peft: the Bradley-Terry loss on fixtures from
//! scripts/fixtures/rlhf.py, the rewards of a SEQ_CLS adapter saved by Python's peft
//! (scripts/fixtures/reward.py), the saved layout, and a short training run.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use peft_core::config::{AdapterConfig, LoraFields};
use peft_core::format::{TensorFile, WEIGHTS_FILE};
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLlama, add_adapter};
use peft_rlhf::reward::{
    Reward, RewardConfig, RewardModel, RewardPair, bradley_terry_loss, load_reward_adapter,
    reward_adapter_config, save_reward_adapter, sequence_rewards,
};
use peft_train::data::Tokenized;
use peft_train::metrics::{METRICS_FILE, read};
use peft_train::trainer::{Objective, TrainOptions, train};

type B = Autodiff<Flex>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
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

#[test]
fn bradley_terry_matches_trls_reward_loss() {
    let f = json("dpo_reference.json");
    let bt = &f["bradley_terry"];
    let d = Default::default();
    let t = |v: Vec<f32>| Tensor::<Flex, 1>::from_floats(v.as_slice(), &d);
    let (rc, rr) = (
        floats(&bt["rewards_chosen"]),
        floats(&bt["rewards_rejected"]),
    );
    let cases = bt["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let margin = c["margin"]
            .as_bool()
            .unwrap()
            .then(|| t(floats(&bt["margin"])));
        let center = c["center_rewards_coefficient"].as_f64();
        let per = bradley_terry_loss(t(rc.clone()), t(rr.clone()), margin, center);
        let what = format!("margin={} center={center:?}", c["margin"]);
        let got: Vec<f32> = per.clone().into_data().to_vec().unwrap();
        close(&got, &floats(&c["per_pair"]), 1e-5, &what);
        close(
            &[per.mean().into_scalar()],
            &[c["loss"].as_f64().unwrap() as f32],
            1e-5,
            &what,
        );
    }
    // The objective's accuracy is TRL's (r_chosen > r_rejected).
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / rc.len() as f64;
    assert!((acc - bt["accuracy"].as_f64().unwrap()).abs() < 1e-12);
}

fn lm(seed: u64) -> LoraLlama<B> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    let device = Default::default();
    <B as Backend>::seed(&device, seed);
    peft_models::load_llama(&dir, &device).unwrap()
}

fn tokenized(ids: &[u32]) -> Tokenized {
    Tokenized {
        ids: ids.to_vec(),
        trained: vec![false; ids.len()],
    }
}

fn rewards_of(m: &RewardModel<B, LoraLlama<B>>, seqs: &[Vec<u32>]) -> Vec<f32> {
    let t: Vec<Tokenized> = seqs.iter().map(|s| tokenized(s)).collect();
    let refs: Vec<&Tokenized> = t.iter().collect();
    sequence_rewards(m, &refs, 0, &Default::default())
        .into_data()
        .to_vec()
        .unwrap()
}

fn peft_reference() -> (Vec<Vec<u32>>, Vec<f32>) {
    let f = json("reward_reference.json");
    let seqs = f["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (seqs, floats(&f["rewards"]))
}

fn loaded_from(dir: &Path) -> RewardModel<B, LoraLlama<B>> {
    let d = Default::default();
    let mut m = RewardModel::new(lm(0), 32, 0.02, &d);
    load_reward_adapter(&mut m, dir, "default", &d).unwrap();
    m
}

#[test]
fn a_reward_adapter_saved_by_peft_gives_transformers_rewards_and_saves_back_the_same() {
    let (seqs, want) = peft_reference();
    let peft_dir = fixtures().join("reward_adapter");
    let m = loaded_from(&peft_dir);
    // Right-padded batch, rewards at the last real token, as transformers reads them.
    close(
        &rewards_of(&m, &seqs),
        &want,
        1e-4,
        "rewards of peft's adapter",
    );

    let out = tempfile::tempdir().unwrap();
    let peft_cfg = AdapterConfig::<LoraFields>::load(&peft_dir).unwrap();
    let mut fields = peft_cfg.method.clone();
    fields.modules_to_save = None;
    let cfg = reward_adapter_config(fields, None);
    save_reward_adapter(&m, "default", &cfg, out.path()).unwrap();
    let ours = TensorFile::read(out.path().join(WEIGHTS_FILE)).unwrap();
    let theirs = TensorFile::read(peft_dir.join(WEIGHTS_FILE)).unwrap();
    let mut k1: Vec<&str> = ours.keys().collect();
    let mut k2: Vec<&str> = theirs.keys().collect();
    k1.sort_unstable();
    k2.sort_unstable();
    assert_eq!(k1, k2, "the saved keys are peft's");
    assert!(k1.contains(&"base_model.model.score.weight"));
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["task_type"], "SEQ_CLS");
    assert_eq!(saved["modules_to_save"], serde_json::json!(["score"]));
    let again = loaded_from(out.path());
    close(
        &rewards_of(&again, &seqs),
        &want,
        1e-4,
        "rewards after a round trip",
    );

    // With PEFT_REWARD_EXPORT set, also leave an adapter trained here (not a copy of
    // peft's) and its rewards for scripts/fixtures/reward.py --check.
    if let Ok(dir) = std::env::var("PEFT_REWARD_EXPORT") {
        let d = Default::default();
        let mut fresh = lm(3);
        let fields = LoraFields {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(Targets::all_linear()),
            init_lora_weights: peft_core::config::InitLoraWeights::Bool(false),
            ..Default::default()
        };
        add_adapter(&mut fresh, "default", &fields, &d).unwrap();
        let rm = RewardModel::new(fresh, 32, 0.5, &d);
        let dir = Path::new(&dir).join("lora_all_linear");
        let cfg = reward_adapter_config(fields, None);
        save_reward_adapter(&rm, "default", &cfg, &dir).unwrap();
        let r = rewards_of(&rm, &seqs);
        std::fs::write(
            dir.join("burn_rewards.json"),
            serde_json::json!({"sequences": seqs, "rewards": r}).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn a_non_reward_adapter_is_refused_with_a_reason() {
    let out = tempfile::tempdir().unwrap();
    let d = Default::default();
    let mut m = lm(0);
    let fields = LoraFields {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    add_adapter(&mut m, "default", &fields, &d).unwrap();
    peft_lora::save_adapter(&m, "default", &AdapterConfig::new(fields), out.path()).unwrap();
    let mut rm = RewardModel::new(lm(0), 32, 0.02, &d);
    let err = load_reward_adapter(&mut rm, out.path(), "default", &d)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a reward adapter"), "{err}");
}

/// Chosen: the prompt continued with +1 steps; rejected: random tokens.
fn pairs(n: usize) -> Vec<RewardPair> {
    let mut s = 777u64;
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
            let mk = |c: &[u32]| tokenized(&[prompt.as_slice(), c].concat());
            RewardPair {
                chosen: mk(&good),
                rejected: mk(&bad),
                margin: 0.0,
            }
        })
        .collect()
}

#[test]
fn training_the_adapter_and_head_ranks_the_pairs() {
    let d = Default::default();
    let mut base = lm(5);
    let fields = LoraFields {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    add_adapter(&mut base, "default", &fields, &d).unwrap();
    let m = RewardModel::new(freeze(base, &AdapterOnly), 32, 0.02, &d);
    let objective = Reward::new(RewardConfig::default(), 0);
    let data = pairs(24);
    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        lr: 1e-2,
        batch_size: 8,
        max_steps: Some(15),
        progress: false,
        ..Default::default()
    };
    let done = train(m, &objective, &data, &[], &opts, out.path(), false, &d).unwrap();
    let lines = read(&out.path().join(METRICS_FILE)).unwrap();
    assert_eq!(lines.len(), 15);
    for k in ["accuracy", "margin", "rewards_chosen", "rewards_rejected"] {
        assert!(lines[0].extra.contains_key(k), "no {k}");
    }
    let refs: Vec<&RewardPair> = data.iter().collect();
    let _ = objective.loss(&done.model, &refs, &d);
    let m = objective.take_metrics();
    let acc = m.iter().find(|(k, _)| k == "accuracy").unwrap().1;
    let margin = m.iter().find(|(k, _)| k == "margin").unwrap().1;
    assert!(acc >= 0.9, "accuracy {acc}");
    assert!(margin > 0.5, "margin {margin}");
    assert!(lines[14].loss < lines[0].loss, "loss did not fall");
    // The head trained too.
    let head: Vec<f32> = done.model.score_weight().into_data().to_vec().unwrap();
    assert!(head.iter().any(|w| w.abs() > 0.05), "head {head:?}");
}

#[test]
fn a_finished_sample_is_scored_where_the_training_answers_were() {
    use peft_models::tokenizer::ChatMessage;
    use peft_rlhf::data::{Preference, answer_suffix, as_trained, tokenize_reward_pair};
    use peft_train::data::{RenderOptions, prompt_ids};

    let path = peft_models::smollm2_gguf_path();
    if !path.exists() {
        println!(
            "skipped: {} not found (cargo xtask fetch-model smollm2)",
            path.display()
        );
        return;
    }
    let tok = peft_models::gguf_model::load_tokenizer(&path).unwrap();
    let p = Preference {
        prompt: "Extract the name. Sentence: Ana is 30.".into(),
        chosen: "{\"name\": \"Ana\"}".into(),
        rejected: "The name is Ana.".into(),
        margin: None,
    };
    let opts = RenderOptions {
        completion_only: true,
        system: None,
    };
    let trained = tokenize_reward_pair(&tok, &p, &opts).unwrap().chosen.ids;
    let prompt = prompt_ids(&tok, &[ChatMessage::user(p.prompt.clone())], &opts).unwrap();
    let eos = tok.eos_token_ids().to_vec();
    // What sampling gives for the same answer: its tokens, then an end-of-sequence token.
    let mut sampled = tok.encode(&p.chosen, false).unwrap();
    sampled.push(eos[0]);
    let plain: Vec<u32> = prompt.iter().chain(&sampled).copied().collect();
    assert_ne!(plain, trained, "the template adds nothing after the answer");
    let suffix = answer_suffix(&tok).unwrap();
    assert_eq!(as_trained(&prompt, &sampled, &eos, &suffix), trained);
    // A completion cut at the length limit is left as it is.
    let cut = &sampled[..2];
    let kept: Vec<u32> = prompt.iter().chain(cut).copied().collect();
    assert_eq!(as_trained(&prompt, cut, &eos, &suffix), kept);
}
