#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! A full training step (forward, backward, clipping, AdamW) on SmolLM2-135M's architecture
//! with 4 sequences of 128 tokens: LoRA (r = 16 on q, k, v, o, gate, up, down) and QLoRA
//! against full fine-tuning (`baseline`) measured in the same run. `cargo xtask bench
//! train_step` prints the ratios; `cargo xtask bench train` reports tokens per second and
//! peak memory per method in separate processes, and compares with Hugging Face peft.

use burn::tensor::backend::AutodiffBackend;
use criterion::{Criterion, criterion_group, criterion_main};
use peft_benches::train_step::{Method, StepShape, stepper};

fn group<B: AutodiffBackend + peft_qlora::QuantBackend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let shape = StepShape::default();
    let mut g = c.benchmark_group(format!("train_step_{backend}_b4x128"));
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(20));
    for (name, method) in [
        ("baseline", Method::Full),
        ("lora", Method::Lora),
        ("qlora", Method::Qlora),
    ] {
        let (mut step, _) =
            stepper::<B>(method, &shape, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        step();
        g.bench_function(name, |b| b.iter(&mut step));
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    group::<burn::backend::Autodiff<burn::backend::Flex>>(c, "flex");
    #[cfg(feature = "ndarray")]
    group::<burn::backend::Autodiff<burn::backend::NdArray>>(c, "ndarray");
    #[cfg(feature = "wgpu")]
    group::<burn::backend::Autodiff<burn::backend::Wgpu>>(c, "wgpu");
    #[cfg(feature = "cuda")]
    group::<burn::backend::Autodiff<burn::backend::Cuda>>(c, "cuda");
}

criterion_group!(train_step, benches);
criterion_main!(train_step);
