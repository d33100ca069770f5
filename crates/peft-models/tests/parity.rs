//! Logits of every architecture against Hugging Face transformers, on tiny randomly
//! initialised models saved by `scripts/fixtures/models.py` (f32, eager attention; one
//! saved as bf16 shards), on
//! every backend compiled in. Greedy decoding with the KV cache must give the tokens
//! transformers' `generate` gave.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_models::bert::Bert;
use peft_models::config::ModelConfig;
use peft_models::generate::{GenerationConfig, generate, greedy_batch};
use peft_models::weights::SafetensorsSource;
use peft_models::{CausalLm, ForwardInput, load_causal_lm};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    input_ids: Vec<i64>,
    tensors: safetensors::SafeTensors<'static>,
}

fn reference(dir: &str) -> Reference {
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(fixture(dir).join("logits.safetensors"))
            .unwrap()
            .into_boxed_slice(),
    );
    let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let ids = tensors.tensor("input_ids").unwrap();
    let input_ids = ids
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Reference { input_ids, tensors }
}

impl Reference {
    fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.tensors.tensor(key).unwrap();
        (
            t.shape().to_vec(),
            t.data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
    fn i64(&self, key: &str) -> Vec<i64> {
        self.tensors
            .tensor(key)
            .unwrap()
            .data()
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_causal_lm<B: Backend>(dir: &str, device: &B::Device) {
    let r = reference(dir);
    let model = load_causal_lm::<B>(&fixture(dir), device).unwrap();
    let ids: Vec<i32> = r.input_ids.iter().map(|&i| i as i32).collect();
    let n = ids.len();
    let t =
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), device).unsqueeze::<2>();
    let logits = model.forward(ForwardInput::new(t), None);
    let (shape, expected) = r.f32("logits");
    assert_eq!(logits.dims()[1..], shape[..], "{dir}");
    let got = logits.into_data().to_vec::<f32>().unwrap();
    let diff = max_abs_diff(&got, &expected);
    assert!(diff < 1e-4, "{dir}: max |logits - transformers| = {diff}");

    let prompt: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        eos_token_ids: vec![u32::MAX],
        ..Default::default()
    };
    let new = generate(&model, &prompt, &cfg, device, |_| {}).unwrap();
    let expected: Vec<u32> = r.i64("greedy_ids").iter().map(|&i| i as u32).collect();
    assert_eq!(new, expected, "{dir}: greedy tokens with the KV cache");

    // Batched greedy decoding with left padding: the full prompt still gives
    // transformers' tokens, and shorter prompts in the same batch give what they give
    // alone.
    let prompts = vec![prompt[..4].to_vec(), prompt.clone(), prompt[2..].to_vec()];
    let batched = greedy_batch(&model, &prompts, 8, &[u32::MAX], 0, device).unwrap();
    assert_eq!(
        batched[1], expected,
        "{dir}: batched greedy, longest prompt"
    );
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = generate(&model, p, &cfg, device, |_| {}).unwrap();
        assert_eq!(
            got,
            &alone,
            "{dir}: batched vs alone for a prompt of {}",
            p.len()
        );
    }
}

fn llama_gqa<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("llama_gqa", device);
}
fn llama3_rope<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("llama3_rope", device);
}
fn mistral<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("mistral", device);
}
fn qwen2<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("qwen2", device);
}
/// bf16 weights in two shards listed by model.safetensors.index.json.
fn qwen2_bf16_sharded<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("qwen2_bf16_sharded", device);
}
fn gpt2<B: AutodiffBackend>(device: &B::Device) {
    check_causal_lm::<B::InnerBackend>("gpt2", device);
}

fn bert_seq_cls<B: AutodiffBackend>(device: &B::Device) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let r = reference("bert_seq_cls");
    let ModelConfig::Bert(cfg) = ModelConfig::from_dir(&fixture("bert_seq_cls")).unwrap() else {
        panic!("not BERT")
    };
    let mut src = SafetensorsSource::open_dir(&fixture("bert_seq_cls")).unwrap();
    let model = Bert::<I<B>>::load(&cfg, &mut src, device).unwrap();
    let ids: Vec<i32> = r.input_ids.iter().map(|&i| i as i32).collect();
    let n = ids.len();
    let t = Tensor::<I<B>, 1, Int>::from_data(TensorData::new(ids, [n]), device).unsqueeze::<2>();
    let out = model.forward(t, None, Some(&[vec![true; n]]));
    for (key, got) in [
        ("logits", out.logits.unwrap().into_data()),
        ("last_hidden_state", out.last_hidden_state.into_data()),
        ("pooler_output", out.pooler_output.into_data()),
    ] {
        let (_, expected) = r.f32(key);
        let diff = max_abs_diff(&got.to_vec::<f32>().unwrap(), &expected);
        assert!(diff < 1e-4, "bert {key}: max diff {diff}");
    }
}

peft_testing::backend_tests!(
    llama_gqa,
    llama3_rope,
    mistral,
    qwen2,
    qwen2_bf16_sharded,
    gpt2,
    bert_seq_cls
);
