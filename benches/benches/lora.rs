#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! LoRA's cost on a linear layer, against the frozen base layer measured in the same run.
//!
//! For r in {8, 16, 64} and square layers of width 576, 2048 and 4096 (64 tokens):
//! - `baseline`: the plain frozen linear layer;
//! - `lora`: the adapter on activations, `W x + s B (A x)` (what training runs);
//! - `materialized`: the same output through a full delta weight, `(W + s B A) x`;
//! - `merged`: the layer after merging (must cost what the base costs).
//!
//! The `_backward` groups time forward + backward with only the adapter trainable.
//! `cargo xtask bench lora` prints every candidate over its baseline.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peft_benches::sync;
use peft_core::adapters::{AdaptedLinear, AdapterControl};
use peft_core::config::{InitLoraWeights, LoraFields};
use peft_core::inject::LinearWeight;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLayer, LoraSlot};

const TOKENS: usize = 64;
type Layer<B> = AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>;

fn layer<B: Backend>(width: usize, r: usize, device: &B::Device) -> Layer<B> {
    let w = Tensor::random([width, width], Distribution::Normal(0.0, 0.02), device);
    let mut l: Layer<B> = AdaptedLinear::new(burn::nn::Linear::from_dense(w, None));
    let fields = LoraFields {
        r,
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraFields::default()
    };
    let lora = LoraLayer::new(&l.base, r, 2.0, &fields, device).unwrap_or_else(|e| panic!("{e}"));
    l.adapter
        .insert("a", lora)
        .unwrap_or_else(|e| panic!("{e}"));
    l
}

fn forward<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    for width in [576usize, 2048, 4096] {
        let mut g = c.benchmark_group(format!("lora_forward_{backend}_w{width}"));
        g.sample_size(10)
            .measurement_time(std::time::Duration::from_secs(2));
        let x = Tensor::<B, 3>::random([1, TOKENS, width], Distribution::Default, &device);
        let base = layer::<B>(width, 8, &device).base;
        g.bench_with_input(BenchmarkId::new("baseline", "-"), &x, |b, x| {
            b.iter(|| sync(base.forward(x.clone())))
        });
        for r in [8usize, 16, 64] {
            let l = layer::<B>(width, r, &device);
            let id = format!("r{r}");
            g.bench_with_input(BenchmarkId::new("lora", &id), &x, |b, x| {
                b.iter(|| sync(l.forward(x.clone())))
            });
            let lora = l
                .adapter
                .get("a")
                .map(|a| (a.lora_a.val(), a.lora_b.val(), a.scaling));
            if let Some((a, bm, s)) = lora {
                let w = l.base.weight.val();
                g.bench_with_input(BenchmarkId::new("materialized", &id), &x, |b, x| {
                    b.iter(|| {
                        sync(
                            x.clone()
                                .matmul((w.clone() + a.clone().matmul(bm.clone()) * s).unsqueeze()),
                        )
                    })
                });
            }
            let mut merged = l.clone();
            merged.merge(None, true).unwrap_or_else(|e| panic!("{e}"));
            g.bench_with_input(BenchmarkId::new("merged", &id), &x, |b, x| {
                b.iter(|| sync(merged.forward(x.clone())))
            });
        }
        g.finish();
    }
}

fn backward<B: Backend>(c: &mut Criterion, backend: &str) {
    type A<B> = Autodiff<B>;
    let device = B::Device::default();
    for width in [576usize, 2048] {
        let mut g = c.benchmark_group(format!("lora_backward_{backend}_w{width}"));
        g.sample_size(10)
            .measurement_time(std::time::Duration::from_secs(2));
        let x = Tensor::<A<B>, 3>::random([1, TOKENS, width], Distribution::Default, &device);
        // Baseline: the frozen layer alone, with gradients flowing to its input.
        let base = freeze(layer::<A<B>>(width, 8, &device), &AdapterOnly);
        let mut plain = base.clone();
        plain.adapter.set_disabled(true);
        g.bench_with_input(BenchmarkId::new("baseline", "-"), &x, |b, x| {
            b.iter(|| {
                let x = x.clone().require_grad();
                let _ = plain.forward(x).sum().backward();
            })
        });
        for r in [8usize, 16, 64] {
            let l = freeze(layer::<A<B>>(width, r, &device), &AdapterOnly);
            g.bench_with_input(BenchmarkId::new("lora", format!("r{r}")), &x, |b, x| {
                b.iter(|| {
                    let x = x.clone().require_grad();
                    let _ = l.forward(x).sum().backward();
                })
            });
        }
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    {
        forward::<burn::backend::Flex>(c, "flex");
        backward::<burn::backend::Flex>(c, "flex");
    }
    #[cfg(feature = "ndarray")]
    {
        forward::<burn::backend::NdArray>(c, "ndarray");
        backward::<burn::backend::NdArray>(c, "ndarray");
    }
    #[cfg(feature = "wgpu")]
    forward::<burn::backend::Wgpu>(c, "wgpu");
    #[cfg(feature = "cuda")]
    forward::<burn::backend::Cuda>(c, "cuda");
}

criterion_group!(lora, benches);
criterion_main!(lora);
