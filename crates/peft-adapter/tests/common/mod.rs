//! Shared helpers: fixture paths, reference tensors, logits of the fixed sequence.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses a subset; tests unwrap

use std::path::PathBuf;

use burn::prelude::*;
use peft_models::config::ModelConfig;
use peft_models::weights::SafetensorsSource;
use peft_models::{CausalLm, ForwardInput};

/// The token ids scripts/fixtures/adapter.py runs.
pub const SEQ: [i32; 7] = [1, 17, 42, 99, 5, 63, 120];

pub fn models_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-models/tests/fixtures")
        .join(name)
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A tensor of a fixture's logits.safetensors, flattened.
pub fn read(name: &str, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture(name).join("logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Keys and shapes of a safetensors file, sorted.
pub fn keys_and_shapes(path: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.shape().to_vec()))
        .collect();
    v.sort();
    v
}

pub fn ids<B: Backend>(device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_data(TensorData::new(SEQ.to_vec(), [SEQ.len()]), device)
        .unsqueeze::<2>()
}

pub fn logits<B: Backend, M: CausalLm<B>>(m: &M, device: &B::Device) -> Vec<f32> {
    m.forward(ForwardInput::new(ids(device)), None)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A Llama-family model (llama_gqa, qwen2, ...) with any slot types.
pub fn llama<B, Lin, Sub>(
    name: &str,
    device: &B::Device,
) -> peft_models::llama::LlamaForCausalLM<
    B,
    peft_core::adapters::AdaptedLinear<B, burn::nn::Linear<B>, Lin>,
    Sub,
    peft_core::inject::NoAdapter,
    peft_core::inject::NoAdapter,
>
where
    B: Backend,
    Lin: Default,
    Sub: Default,
{
    let dir = models_fixture(name);
    let ModelConfig::Llama(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
        panic!("{name} is not a Llama-family model")
    };
    peft_models::llama::LlamaForCausalLM::load(
        &cfg,
        &mut SafetensorsSource::open_dir(&dir).unwrap(),
        device,
    )
    .unwrap()
}

/// GPT-2 with any slot types.
pub fn gpt2<B, Lin, Sub>(
    device: &B::Device,
) -> peft_models::gpt2::Gpt2LMHeadModel<
    B,
    peft_core::adapters::AdaptedLinear<B, burn::nn::Linear<B>, Lin>,
    Sub,
>
where
    B: Backend,
    Lin: Default,
    Sub: Default,
{
    let dir = models_fixture("gpt2");
    let ModelConfig::Gpt2(cfg) = ModelConfig::from_dir(&dir).unwrap() else {
        panic!("not GPT-2")
    };
    peft_models::gpt2::Gpt2LMHeadModel::load(
        &cfg,
        &mut SafetensorsSource::open_dir(&dir).unwrap(),
        device,
    )
    .unwrap()
}
