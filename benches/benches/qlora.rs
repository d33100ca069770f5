#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The 4-bit base against the f32 layer of the same shape, measured in the same run.
//!
//! - `qlora_matvec_*`: one token (decoding), `baseline` the f32 linear layer, `nf4` the
//!   NF4 layer (block 64, double quantization) on the portable path;
//! - `qlora_matmul512_*`: 512 tokens (a training or prefill batch);
//! - `qlora_codec_*`: `baseline` reads the f32 weight back to the host; `dequantize` builds
//!   the f32 weight from the 4-bit codes on the device and reads it back; `quantize`
//!   quantizes the host f32 weight (bitsandbytes' algorithm, double quantization).
//!
//! `cargo xtask bench qlora` prints every candidate over its baseline.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use peft_benches::sync;
use peft_core::inject::LinearWeight;
use peft_qlora::quant::QuantizedWeight;
use peft_qlora::{Linear4bit, QuantConfig};

const SHAPES: [(usize, usize); 3] = [(1536, 576), (2048, 2048), (4096, 4096)];

fn layers<B: Backend>(
    out: usize,
    inp: usize,
    device: &B::Device,
) -> (burn::nn::Linear<B>, Linear4bit<B>) {
    let w = Tensor::<B, 2>::random([out, inp], Distribution::Normal(0.0, 0.02), device);
    let q = Linear4bit::quantize(w.clone(), None, &QuantConfig::new())
        .unwrap_or_else(|e| panic!("{e}"));
    (
        <burn::nn::Linear<B> as LinearWeight<B>>::from_dense(w, None),
        q,
    )
}

fn products<B: peft_qlora::QuantBackend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    for (out, inp) in SHAPES {
        let (dense, q) = layers::<B>(out, inp, &device);
        for (name, tokens) in [("matvec", 1usize), ("matmul512", 512)] {
            let mut g = c.benchmark_group(format!("qlora_{name}_{backend}_{out}x{inp}"));
            g.sample_size(10)
                .measurement_time(std::time::Duration::from_secs(3));
            let x = Tensor::<B, 3>::random([1, tokens, inp], Distribution::Default, &device);
            g.bench_function("baseline", |b| {
                b.iter(|| sync(LinearWeight::forward(&dense, x.clone())))
            });
            g.bench_function("nf4", |b| {
                b.iter(|| sync(LinearWeight::forward(&q, x.clone())))
            });
            g.finish();
        }
    }
}

fn codec<B: peft_qlora::QuantBackend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let (out, inp) = (2048, 2048);
    let (dense, q) = layers::<B>(out, inp, &device);
    let host: Vec<f32> = LinearWeight::weight(&dense)
        .into_data()
        .to_vec()
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut g = c.benchmark_group(format!("qlora_codec_{backend}_{out}x{inp}"));
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3));
    g.bench_function("baseline", |b| {
        b.iter(|| sync(LinearWeight::weight(&dense)))
    });
    g.bench_function("dequantize", |b| b.iter(|| sync(LinearWeight::weight(&q))));
    g.bench_function("quantize", |b| {
        b.iter(|| QuantizedWeight::quantize(&host, [out, inp], &QuantConfig::new()).is_ok())
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    {
        products::<burn::backend::Flex>(c, "flex");
        codec::<burn::backend::Flex>(c, "flex");
    }
    #[cfg(feature = "ndarray")]
    {
        products::<burn::backend::NdArray>(c, "ndarray");
        codec::<burn::backend::NdArray>(c, "ndarray");
    }
    #[cfg(feature = "wgpu")]
    {
        products::<burn::backend::Wgpu>(c, "wgpu");
        codec::<burn::backend::Wgpu>(c, "wgpu");
    }
    #[cfg(feature = "cuda")]
    {
        products::<burn::backend::Cuda>(c, "cuda");
        codec::<burn::backend::Cuda>(c, "cuda");
    }
}

criterion_group!(qlora, benches);
criterion_main!(qlora);
