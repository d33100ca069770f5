//! Invariants on random shapes and inputs: (IA)^3 merged equals unmerged and unmerge
//! restores the weights; disabled equals the base layer bit for bit; a record round trip
//! keeps the outputs bit for bit; a training step changes only the adapter (the vector, or
//! the bottleneck adapter's weights after a frozen model's sublayer).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use peft_adapter::bottleneck::{self, BottleneckFields};
use peft_adapter::{BottleneckLlama, Ia3Layer, Ia3Slot, NonLinearity};
use peft_core::adapters::{AdaptedLinear, AdapterControl};
use peft_core::inject::LinearWeight;
use peft_core::trainable::{AdapterOnly, freeze, trainable_paths};
use peft_models::{CausalLm, ForwardInput};
use proptest::prelude::*;

type B = NdArray;
type Layer<B> = AdaptedLinear<B, burn::nn::Linear<B>, Ia3Slot<B>>;

fn layer<Bk: Backend>(
    inp: usize,
    out: usize,
    ff: bool,
    bias: bool,
    device: &Bk::Device,
) -> Layer<Bk> {
    // Built from data, as a loaded checkpoint is.
    let w = Tensor::random([out, inp], Distribution::Normal(0.0, 0.5), device);
    let b = bias.then(|| Tensor::random([out], Distribution::Normal(0.0, 0.5), device));
    let mut l: Layer<Bk> = AdaptedLinear::new(burn::nn::Linear::from_dense(w, b));
    let n = if ff { inp } else { out };
    let v = Tensor::random([n], Distribution::Uniform(0.3, 2.0), device);
    l.adapter.insert("a", Ia3Layer::from_vector(v, ff)).unwrap();
    l
}

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn ia3_merge_unmerge_disable_and_reload(inp in 1usize..24, out in 1usize..24, tokens in 1usize..5, ff in any::<bool>(), bias in any::<bool>()) {
        let device = Default::default();
        let mut l = layer::<B>(inp, out, ff, bias, &device);
        let x = Tensor::<B, 3>::random([2, tokens, inp], Distribution::Normal(0.0, 1.0), &device);
        let base = l.base.forward(x.clone());
        let adapted = l.forward(x.clone());

        l.adapter.set_disabled(true);
        prop_assert_eq!(l.forward(x.clone()).into_data(), base.clone().into_data());
        l.adapter.set_disabled(false);

        let (w0, b0) = (l.base.weight(), l.base.bias());
        l.merge(None, true).unwrap();
        prop_assert!(max_diff(l.forward(x.clone()), adapted.clone()) < 1e-4);
        l.unmerge().unwrap();
        prop_assert!(max_diff(l.base.weight(), w0) < 1e-5);
        if let (Some(b0), Some(b1)) = (b0, l.base.bias()) {
            prop_assert!(max_diff(b0, b1) < 1e-5);
        }
        prop_assert!(max_diff(l.forward(x.clone()), adapted) < 1e-4);

        let now = l.forward(x.clone());
        let fresh = layer::<B>(inp, out, ff, bias, &device).load_record(l.clone().into_record());
        prop_assert_eq!(fresh.forward(x).into_data(), now.into_data());
    }

    #[test]
    fn ia3_training_step_changes_only_the_vector(inp in 2usize..16, out in 2usize..16, ff in any::<bool>()) {
        type A = Autodiff<B>;
        let device = Default::default();
        let l = freeze(layer::<A>(inp, out, ff, true, &device), &AdapterOnly);
        let x = Tensor::<A, 3>::random([2, 3, inp], Distribution::Normal(0.0, 1.0), &device);
        let before = l.clone();
        let loss = l.forward(x).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &l);
        let mut optim = AdamWConfig::new().init::<A, Layer<A>>();
        let after = optim.step(1e-2, l, grads);
        prop_assert_eq!(before.base.weight.val().into_data(), after.base.weight.val().into_data());
        prop_assert_eq!(
            before.base.bias.as_ref().unwrap().val().into_data(),
            after.base.bias.as_ref().unwrap().val().into_data()
        );
        let (a0, a1) = (before.adapter.get("a").unwrap(), after.adapter.get("a").unwrap());
        let moved: f32 = (a0.ia3_l.val() - a1.ia3_l.val()).abs().max().into_scalar();
        prop_assert!(moved > 0.0, "ia3_l did not move");
    }
}

/// On a whole frozen model: after a step only the bottleneck adapters changed, and the
/// up-projection left zero (a fresh adapter gets a gradient through it).
#[test]
fn bottleneck_training_step_changes_only_the_adapter() {
    type A = Autodiff<B>;
    let device = Default::default();
    for fields in [
        BottleneckFields::double_seq_bn().with_non_linearity(NonLinearity::Gelu),
        BottleneckFields::par_bn(),
    ] {
        let mut m: BottleneckLlama<A> = common::llama("llama_gqa", &device);
        bottleneck::add_adapter(&mut m, "task", &fields, &device).unwrap();
        let m = freeze(m, &AdapterOnly);
        assert!(
            trainable_paths(&m)
                .iter()
                .all(|p| p.contains("_adapter.slots.0."))
        );
        let before = m.clone();
        let loss = m
            .forward(ForwardInput::new(common::ids::<A>(&device)), None)
            .powi_scalar(2)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let mut optim = AdamWConfig::new().init::<A, BottleneckLlama<A>>();
        let after = optim.step(1e-2, m, grads);
        let (l0, l1) = (&before.model.layers[1], &after.model.layers[1]);
        assert_eq!(
            l0.mlp.down_proj.base.weight.val().into_data(),
            l1.mlp.down_proj.base.weight.val().into_data()
        );
        assert_eq!(
            before.model.embed_tokens.weight.val().into_data(),
            after.model.embed_tokens.weight.val().into_data()
        );
        let (a0, a1) = (
            l0.mlp_adapter.get("task").unwrap(),
            l1.mlp_adapter.get("task").unwrap(),
        );
        let moved: f32 = (a0.up.weight.val() - a1.up.weight.val())
            .abs()
            .max()
            .into_scalar();
        assert!(moved > 0.0, "the up-projection did not move");
    }
}
