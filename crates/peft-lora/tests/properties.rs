//! Invariants of LoRA and DoRA on random shapes, ranks and inputs: merged equals unmerged,
//! unmerge restores the weights, disabled equals the base layer bit for bit, save then
//! load equals before, and a training step changes only the adapter.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use peft_core::adapters::{AdaptedLinear, AdapterControl};
use peft_core::config::{InitLoraWeights, LoraFields};
use peft_core::inject::LinearWeight;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLayer, LoraSlot};
use proptest::prelude::*;

type B = NdArray;
type Layer<B> = AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>;

fn layer<Bk: Backend>(
    inp: usize,
    out: usize,
    r: usize,
    dora: bool,
    bias: bool,
    device: &Bk::Device,
) -> Layer<Bk> {
    // Built from data, as a loaded checkpoint is (burn's LinearConfig::init creates lazily
    // initialised parameters, which clones would initialise independently).
    let w = Tensor::random([out, inp], Distribution::Normal(0.0, 0.5), device);
    let b = bias.then(|| Tensor::random([out], Distribution::Normal(0.0, 0.5), device));
    let base = burn::nn::Linear::from_dense(w, b);
    let fields = LoraFields {
        r,
        use_dora: dora,
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraFields::default()
    };
    let mut l: Layer<Bk> = AdaptedLinear::new(base);
    let lora = LoraLayer::new(&l.base, r, 1.5, &fields, device).unwrap();
    l.adapter.insert("a", lora).unwrap();
    if dora {
        // Move the magnitude away from its initial value so DoRA's rescaling matters.
        let m = l.adapter.get_mut("a").unwrap().magnitude.take().unwrap();
        let v = (m.val() * Tensor::random([out], Distribution::Uniform(0.5, 1.5), device)).detach();
        l.adapter.get_mut("a").unwrap().magnitude = Some(Param::from_tensor(v));
    }
    l
}

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn merge_unmerge_disable_and_reload(inp in 1usize..24, out in 1usize..24, r in 1usize..8, tokens in 1usize..5, dora in any::<bool>(), bias in any::<bool>()) {
        let device = Default::default();
        let mut l = layer::<B>(inp, out, r, dora, bias, &device);
        let x = Tensor::<B, 3>::random([2, tokens, inp], Distribution::Normal(0.0, 1.0), &device);
        let base = l.base.forward(x.clone());
        let adapted = l.forward(x.clone());

        // Disabled: the base layer, bit for bit.
        l.adapter.set_disabled(true);
        prop_assert_eq!(l.forward(x.clone()).into_data(), base.clone().into_data());
        l.adapter.set_disabled(false);

        // Merged equals unmerged; unmerge restores the weights.
        let w0 = l.base.weight();
        l.merge(None, true).unwrap();
        prop_assert!(max_diff(l.forward(x.clone()), adapted.clone()) < 1e-4);
        l.unmerge().unwrap();
        prop_assert!(max_diff(l.base.weight(), w0) < 1e-5);
        prop_assert!(max_diff(l.forward(x.clone()), adapted.clone()) < 1e-4);

        // Record round trip (what a checkpoint stores) gives the same outputs, bit for bit.
        let now = l.forward(x.clone());
        let fresh = layer::<B>(inp, out, r, dora, bias, &device).load_record(l.clone().into_record());
        prop_assert_eq!(fresh.forward(x).into_data(), now.into_data());
    }

    #[test]
    fn a_training_step_changes_only_the_adapter(inp in 2usize..16, out in 2usize..16, r in 1usize..6, dora in any::<bool>()) {
        type A = Autodiff<B>;
        let device = Default::default();
        let l = freeze(layer::<A>(inp, out, r, dora, true, &device), &AdapterOnly);
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
        let moved: f32 = (a0.lora_a.val() - a1.lora_a.val()).abs().max().into_scalar();
        prop_assert!(moved > 0.0, "lora_A did not move");
        if dora {
            let m0 = a0.magnitude.as_ref().unwrap().val();
            let m1 = a1.magnitude.as_ref().unwrap().val();
            prop_assert!((m0 - m1).abs().max().into_scalar() > 0.0, "the DoRA magnitude did not move");
        }
    }
}
