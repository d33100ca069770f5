#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The cost of an adapter slot on a linear layer.
//!
//! Every linear layer of a PEFT-ready model is an `AdaptedLinear`; with no adapter, or
//! with its adapters disabled, it must cost what the plain linear layer costs. Each group
//! times the plain layer as `baseline` and the slot variants against it in the same run;
//! `cargo xtask bench` prints the ratios (target: 1.00).

use burn::prelude::*;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peft_benches::sync;
use peft_core::adapters::{AdaptedLinear, AdapterControl};
use peft_core::config::LoraFields;
use peft_core::inject::NoAdapter;
use peft_lora::{LoraLayer, LoraSlot};

const TOKENS: usize = 64;

fn group<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut g = c.benchmark_group(format!("adapter_slot_{backend}"));
    g.sample_size(20);
    for width in [576usize, 2048] {
        let linear = burn::nn::LinearConfig::new(width, width).init::<B>(&device);
        let x = Tensor::<B, 3>::random(
            [1, TOKENS, width],
            burn::tensor::Distribution::Default,
            &device,
        );
        let empty: AdaptedLinear<B, _, NoAdapter> = AdaptedLinear::new(linear.clone());
        let mut disabled: AdaptedLinear<B, _, LoraSlot<B>> = AdaptedLinear::new(linear.clone());
        disabled
            .adapter
            .insert(
                "a",
                LoraLayer::new(&linear, 16, 2.0, &LoraFields::default(), &device)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        disabled.adapter.set_disabled(true);

        g.bench_with_input(BenchmarkId::new("baseline", width), &x, |b, x| {
            b.iter(|| sync(linear.forward(x.clone())))
        });
        g.bench_with_input(BenchmarkId::new("empty_slot", width), &x, |b, x| {
            b.iter(|| sync(empty.forward(x.clone())))
        });
        g.bench_with_input(BenchmarkId::new("disabled_adapter", width), &x, |b, x| {
            b.iter(|| sync(disabled.forward(x.clone())))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "ndarray")]
    group::<burn::backend::NdArray>(c, "ndarray");
    #[cfg(feature = "flex")]
    group::<burn::backend::Flex>(c, "flex");
    #[cfg(feature = "wgpu")]
    group::<burn::backend::Wgpu>(c, "wgpu");
    #[cfg(feature = "cuda")]
    group::<burn::backend::Cuda>(c, "cuda");
}

criterion_group!(adapter_slot, benches);
criterion_main!(adapter_slot);
