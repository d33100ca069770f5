//! `train-step`: times training steps of SmolLM2-135M's architecture in a process of its
//! own, so its peak memory is that of one configuration. `cargo xtask bench train` runs it
//! for each method and backend and prints the table.
//!
//! ```text
//! train-step --method lora|qlora|full --backend flex|ndarray|wgpu|cuda
//!            [--batch 4] [--seq-len 128] [--rank 16] [--layers 30] [--steps 5] [--warmup 2]
//!            [--checkpointing none|balanced] [--allocator tuned|system]
//! ```
//!
//! `--allocator tuned` (the default, what `peft` does) applies
//! `peft_train::tune_allocator`: freed memory stays in the heap for the next step.
//! `--allocator system` leaves malloc's defaults.
//!
//! `--checkpointing balanced` runs burn's `BalancedCheckpointing` (what `peft train
//! --grad-checkpointing true` uses): memory-bound operations are recomputed in the backward
//! pass instead of kept.
//!
//! Prints one JSON line: method, backend, shape, trainable parameters, seconds per step
//! (and in its forward pass, backward pass and optimizer step),
//! tokens per second, peak resident memory and the peak of the bytes live on the heap.

#![allow(clippy::print_stderr)] // a command-line tool reports its failure on stderr

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use peft_benches::train_step::{Method, Phases, StepShape, peak_rss_bytes, stepper};

struct Args {
    method: Method,
    backend: String,
    shape: StepShape,
    steps: usize,
    warmup: usize,
    checkpointing: bool,
    tuned_allocator: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        method: Method::Lora,
        backend: "flex".into(),
        shape: StepShape::default(),
        steps: 5,
        warmup: 2,
        checkpointing: false,
        tuned_allocator: true,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
        let num = || -> Result<usize, String> {
            value
                .parse()
                .map_err(|_| format!("`{flag}` takes a whole number, not `{value}`"))
        };
        match flag.as_str() {
            "--method" => a.method = Method::parse(value)?,
            "--backend" => a.backend = value.clone(),
            "--batch" => a.shape.batch = num()?,
            "--seq-len" => a.shape.seq_len = num()?,
            "--rank" => a.shape.rank = num()?,
            "--layers" => a.shape.layers = num()?,
            "--steps" => a.steps = num()?.max(1),
            "--warmup" => a.warmup = num()?,
            "--allocator" => {
                a.tuned_allocator = match value.as_str() {
                    "tuned" => true,
                    "system" => false,
                    _ => return Err(format!("--allocator is tuned or system, not `{value}`")),
                }
            }
            "--checkpointing" => {
                a.checkpointing = match value.as_str() {
                    "none" => false,
                    "balanced" => true,
                    _ => {
                        return Err(format!(
                            "--checkpointing is none or balanced, not `{value}`"
                        ));
                    }
                }
            }
            _ => return Err(format!("unknown flag `{flag}`")),
        }
    }
    Ok(a)
}

/// The system allocator, counting the bytes live on the heap and their peak, so the report
/// can tell what the step needs from what the allocator keeps (`peak_rss_bytes`).
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count(grow: usize, shrink: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let live = if grow >= shrink {
        LIVE.fetch_add(grow - shrink, Relaxed) + (grow - shrink)
    } else {
        LIVE.fetch_sub(shrink - grow, Relaxed) - (shrink - grow)
    };
    PEAK.fetch_max(live, Relaxed);
}

#[allow(unsafe_code)] // a GlobalAlloc is an unsafe trait; every call forwards to System
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};

    // SAFETY: forwards every call to the system allocator unchanged.
    unsafe impl GlobalAlloc for super::Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            super::count(layout.size(), 0);
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            super::count(layout.size(), 0);
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            super::count(0, layout.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            super::count(new_size, layout.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: super::Counting = super::Counting;
}

fn measure<B: AutodiffBackend + peft_qlora::QuantBackend>(
    a: &Args,
) -> Result<serde_json::Value, String> {
    let device = B::Device::default();
    let t = Instant::now();
    let (mut step, trainable) = stepper::<B>(a.method, &a.shape, &device)?;
    let build_s = t.elapsed().as_secs_f64();
    for _ in 0..a.warmup {
        step();
    }
    let t = Instant::now();
    let mut loss = 0.0;
    let mut phases = Phases::default();
    for _ in 0..a.steps {
        let (l, p) = step();
        loss = l;
        phases.forward += p.forward / a.steps as f64;
        phases.backward += p.backward / a.steps as f64;
        phases.optimizer += p.optimizer / a.steps as f64;
    }
    let step_s = t.elapsed().as_secs_f64() / a.steps as f64;
    if !loss.is_finite() {
        return Err(format!("the loss is {loss}"));
    }
    let tokens = (a.shape.batch * a.shape.seq_len) as f64;
    Ok(serde_json::json!({
        "method": a.method.name(),
        "backend": a.backend,
        "checkpointing": if a.checkpointing { "balanced" } else { "none" },
        "allocator": if a.tuned_allocator { "tuned" } else { "system" },
        "batch": a.shape.batch,
        "seq_len": a.shape.seq_len,
        "rank": a.shape.rank,
        "layers": a.shape.layers,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "trainable": trainable,
        "build_s": build_s,
        "steps": a.steps,
        "step_s": step_s,
        "forward_s": phases.forward,
        "backward_s": phases.backward,
        "optimizer_s": phases.optimizer,
        "tokens_per_s": tokens / step_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_heap_bytes": PEAK.load(std::sync::atomic::Ordering::Relaxed),
        "loss": loss,
    }))
}

fn main() -> std::process::ExitCode {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing as Balanced;
    let args = parse();
    if args.as_ref().is_ok_and(|a| a.tuned_allocator) {
        peft_train::tune_allocator();
    }
    let result = args.and_then(|a| match (a.backend.as_str(), a.checkpointing) {
        #[cfg(feature = "flex")]
        ("flex", false) => measure::<Autodiff<burn::backend::Flex>>(&a),
        #[cfg(feature = "flex")]
        ("flex", true) => measure::<Autodiff<burn::backend::Flex, Balanced>>(&a),
        #[cfg(feature = "ndarray")]
        ("ndarray", false) => measure::<Autodiff<burn::backend::NdArray>>(&a),
        #[cfg(feature = "ndarray")]
        ("ndarray", true) => measure::<Autodiff<burn::backend::NdArray, Balanced>>(&a),
        #[cfg(feature = "wgpu")]
        ("wgpu", false) => measure::<Autodiff<burn::backend::Wgpu>>(&a),
        #[cfg(feature = "wgpu")]
        ("wgpu", true) => measure::<Autodiff<burn::backend::Wgpu, Balanced>>(&a),
        #[cfg(feature = "cuda")]
        ("cuda", false) => measure::<Autodiff<burn::backend::Cuda>>(&a),
        #[cfg(feature = "cuda")]
        ("cuda", true) => measure::<Autodiff<burn::backend::Cuda, Balanced>>(&a),
        (other, _) => Err(format!(
            "backend `{other}` is not compiled in (features: ndarray, flex, wgpu, cuda)"
        )),
    });
    match result {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("train-step: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
