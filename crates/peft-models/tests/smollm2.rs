//! SmolLM2-135M-Instruct loaded from its GGUF file (Q8_0 embeddings, Q4_1 weights) against
//! transformers, which dequantizes the same file to f32 (`scripts/fixtures/smollm2.py`).
//!
//! The model is fetched by `cargo xtask fetch-model smollm2` (CI does this first); without
//! it these tests print that they skipped. Set `SMOLLM2_GGUF` to use another copy.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_models::generate::{GenerationConfig, generate};
use peft_models::gguf_model::load_tokenizer;
use peft_models::tokenizer::ChatMessage;
use peft_models::{CausalLm, ForwardInput, load_causal_lm};
use serde_json::Value;

fn model_path() -> Option<PathBuf> {
    let path = peft_models::smollm2_gguf_path();
    if path.exists() {
        Some(path)
    } else {
        println!(
            "skipped: {} not found (run `cargo xtask fetch-model smollm2`)",
            path.display()
        );
        None
    }
}

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every position, on the first 1024 vocabulary entries, against transformers.
///
/// Over 30 layers, f32 rounding alone moves logits of magnitude ~30 by about 1e-3:
/// transformers' own f32 logits are `f32_error` (9.7e-4) from the same model evaluated in
/// f64. Two correct f32 implementations therefore cannot be held to 1e-4 here (the tiny
/// models in `parity.rs` are, and pass). This test holds the project to transformers' own
/// accuracy: our f32 logits must be about as close (within 1.5x) to the f64 result as transformers'
/// f32 logits are, and within 1e-3 of transformers' f32 logits; the argmax over the whole
/// vocabulary must agree at every position.
fn logits_match_transformers<B: AutodiffBackend>(device: &B::Device) {
    let Some(path) = model_path() else { return };
    let r = reference();
    let model = load_causal_lm::<B::InnerBackend>(&path, device).unwrap();
    let input = ids(&r["ids"]);
    let n = input.len();
    let t = Tensor::<B::InnerBackend, 1, Int>::from_data(
        TensorData::new(input.iter().map(|&i| i as i32).collect::<Vec<_>>(), [n]),
        device,
    )
    .unsqueeze::<2>();
    let logits = model.forward(ForwardInput::new(t), None);
    let vocab = model.vocab_size();
    let got = logits
        .reshape([n, vocab])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (mut vs_f32, mut vs_f64) = (0.0f64, 0.0f64);
    let rows32 = r["logits_head"].as_array().unwrap();
    let rows64 = r["logits_head_f64"].as_array().unwrap();
    for (pos, (row32, row64)) in rows32.iter().zip(rows64).enumerate() {
        let ours = &got[pos * vocab..(pos + 1) * vocab];
        for (j, (e32, e64)) in row32
            .as_array()
            .unwrap()
            .iter()
            .zip(row64.as_array().unwrap())
            .enumerate()
        {
            vs_f32 = vs_f32.max((f64::from(ours[j]) - e32.as_f64().unwrap()).abs());
            vs_f64 = vs_f64.max((f64::from(ours[j]) - e64.as_f64().unwrap()).abs());
        }
        let argmax = ours
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > ours[b] { i } else { b });
        assert_eq!(
            argmax as u64,
            r["argmax"][pos].as_u64().unwrap(),
            "argmax at position {pos}"
        );
    }
    let hf_error = r["f32_error"].as_f64().unwrap();
    println!(
        "max |ours - transformers f32| = {vs_f32:.2e}, |ours - f64| = {vs_f64:.2e}, |transformers f32 - f64| = {hf_error:.2e}"
    );
    assert!(
        vs_f64 <= hf_error * 1.5,
        "ours is {vs_f64:.2e} from the f64 logits; transformers' f32 is {hf_error:.2e}"
    );
    assert!(
        vs_f32 < 1e-3,
        "max |logits - transformers f32| = {vs_f32:.2e}"
    );
}

/// Greedy decoding of the chat prompt gives transformers' tokens and text.
fn greedy_chat_matches_transformers<B: AutodiffBackend>(device: &B::Device) {
    let Some(path) = model_path() else { return };
    let r = reference();
    let tok = load_tokenizer(&path).unwrap();
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(prompt, r["prompt"].as_str().unwrap());
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(prompt_ids, ids(&r["prompt_ids"]));
    let model = load_causal_lm::<B::InnerBackend>(&path, device).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        ..Default::default()
    };
    let new = generate(&model, &prompt_ids, &cfg, device, |_| {}).unwrap();
    assert_eq!(new, ids(&r["greedy_ids"]));
    assert_eq!(
        tok.decode(&new, true).unwrap(),
        r["greedy_text"].as_str().unwrap()
    );
}

peft_testing::backend_tests!(logits_match_transformers, greedy_chat_matches_transformers);
