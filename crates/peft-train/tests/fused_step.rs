//! A LoRA training step through the CPU backend's fused operations against the same step in
//! burn tensor operations: the Llama fixture with LoRA on every linear layer, one padded
//! batch, the token loss and its backward pass on `Autodiff<Flex>` (fused linear products,
//! low-rank updates, RMSNorm, rotary embeddings, attention, SwiGLU and loss) and on
//! `Autodiff<NdArray>` (none of them). The loss and the gradient of every adapter parameter
//! must agree. Ranks 8 (the general product) and 16 (the rank kernels, where the CPU has
//! AVX-512).
//!
//! The tolerance: the same step in burn operations on Flex and on ndarray (no fused
//! operation at all) already differs by up to about 1e-4 of a gradient's largest value,
//! rounding in another order through the attention's softmax; a wrong term moves a
//! gradient by the order of its values.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::config::{AdapterConfig, InitLoraWeights, LoraFields};
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLlama, add_adapter, load_adapter, save_adapter};
use peft_models::{CausalLm, ForwardInput};
use peft_train::optim::GradStore;
use peft_train::trainer::cross_entropy_sum;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa")
}

/// An adapter of rank `r` with both factors random (so every gradient is non-zero), saved
/// in peft's format.
fn adapter(r: usize, dir: &Path) {
    type B = NdArray;
    let device = Default::default();
    <B as Backend>::seed(&device, 7 + r as u64);
    let mut m: LoraLlama<B> = peft_models::load_llama(&fixture(), &device).unwrap();
    let fields = LoraFields {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: Some(Targets::all_linear()),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    add_adapter(&mut m, "default", &fields, &device).unwrap();
    save_adapter(&m, "default", &AdapterConfig::new(fields), dir).unwrap();
}

/// The summed token loss of one padded batch and every adapter gradient, by path.
fn step<B: AutodiffBackend>(dir: &Path) -> (f32, Vec<(String, Vec<f32>)>) {
    let device = Default::default();
    let mut m: LoraLlama<B> = peft_models::load_llama(&fixture(), &device).unwrap();
    load_adapter(&mut m, dir, "default", &device).unwrap();
    let m = freeze(m, &AdapterOnly);
    let ids = [[1, 5, 9, 200, 7, 3, 11, 60], [4, 8, 15, 16, 23, 42, 0, 0]];
    let padding = vec![
        vec![true; 8],
        vec![true, true, true, true, true, true, false, false],
    ];
    let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat.clone(), [2, 8]), &device);
    let hidden = m.hidden(
        ForwardInput {
            ids: input,
            padding: Some(&padding),
        },
        None,
    );
    let logits = m.logits(hidden);
    let vocab = logits.dims()[2];
    // Each position predicts the next token; the padded tail of the second sequence is not a
    // target.
    let rows: Vec<usize> = (0..7).chain(8..13).collect();
    let z = logits.reshape([16, vocab]).select(
        0,
        Tensor::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        ),
    );
    let targets: Vec<i64> = rows.iter().map(|&r| flat[r + 1]).collect();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows.len(), 1]), &device);
    let loss = cross_entropy_sum(z, t);
    let value: f32 = loss.clone().into_scalar().elem();
    let grads = loss.backward();
    let mut store = GradStore::<B::InnerBackend>::default();
    store.accumulate(&m, &grads);
    let all = store
        .iter()
        .map(|(p, g)| {
            (
                p.to_string(),
                g.clone().into_data().to_vec::<f32>().unwrap(),
            )
        })
        .collect();
    (value, all)
}

#[test]
fn a_fused_lora_step_matches_the_generic_one() {
    for r in [8, 16] {
        let dir = tempfile::tempdir().unwrap();
        adapter(r, dir.path());
        let (want_loss, want) = step::<Autodiff<NdArray>>(dir.path());
        let (got_loss, got) = step::<Autodiff<Flex>>(dir.path());
        assert!(
            (got_loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
            "r {r}: loss {got_loss}, want {want_loss}"
        );
        assert_eq!(got.len(), want.len(), "r {r}: parameters with a gradient");
        // Seven linear layers per decoder layer, two factors each.
        assert!(want.len() >= 14, "r {r}: only {} gradients", want.len());
        for ((pg, g), (pw, w)) in got.iter().zip(&want) {
            assert_eq!(pg, pw);
            let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "r {r}: {pw} has a zero gradient");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 5e-4 * scale,
                    "r {r}: {pw}[{i}] is {a}, want {b} (largest {scale})"
                );
            }
        }
    }
}
