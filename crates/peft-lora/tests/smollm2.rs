//! LoRA on the real SmolLM2-135M-Instruct (fetched with `cargo xtask fetch-model smollm2`;
//! skipped with a message without it): the trainable and total parameter counts equal what
//! peft reports for the same config (`fixtures/smollm2_counts.json`), and a fresh adapter
//! (B = 0) leaves the logits unchanged.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use peft_core::config::LoraFields;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze, trainable_report};
use peft_lora::{LoraLlama, add_adapter};
use peft_models::{CausalLm, ForwardInput};
use serde_json::Value;

#[test]
fn all_linear_r16_counts_match_peft() {
    let path = peft_models::smollm2_gguf_path();
    if !path.exists() {
        println!(
            "skipped: {} not found (run `cargo xtask fetch-model smollm2`)",
            path.display()
        );
        return;
    }
    type B = Autodiff<Flex>;
    let device = Default::default();
    let mut model: LoraLlama<B> = peft_models::load_llama(&path, &device).unwrap();
    let ids = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 4]], &device);
    let before = model
        .forward(ForwardInput::new(ids.clone()), None)
        .into_data();
    let lora = LoraFields {
        r: 16,
        lora_alpha: 32.0,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    let paths = add_adapter(&mut model, "default", &lora, &device).unwrap();
    assert_eq!(paths.len(), 30 * 7);
    let model = freeze(model, &AdapterOnly);
    let report = trainable_report(&model);
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_counts.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert_eq!(
        report.trainable as u64,
        expected["trainable"].as_u64().unwrap()
    );
    assert_eq!(report.total as u64, expected["total"].as_u64().unwrap());
    // B starts at zero: the adapter is a no-op until trained.
    assert_eq!(
        model.forward(ForwardInput::new(ids), None).into_data(),
        before
    );
}
