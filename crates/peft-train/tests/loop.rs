#![allow(clippy::unwrap_used, missing_docs)]
//! The training loop on a tiny Llama with LoRA: exact resumption, interrupted checkpoint
//! writes, early stopping, the NaN guard.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use peft_core::config::LoraFields;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_lora::{LoraLlama, add_adapter};
use peft_models::CausalLm;
use peft_train::TrainError;
use peft_train::checkpoint;
use peft_train::data::{SplitMix64, Tokenized};
use peft_train::metrics::{METRICS_FILE, read};
use peft_train::optim::trainable_tensors;
use peft_train::trainer::{Objective, TokenCrossEntropy, TrainOptions, evaluate_loss, train};

type B = Autodiff<Flex>;

/// The backend's random generator is global to the process (initialisation, dropout), so
/// these runs must not interleave with each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn model(seed: u64) -> LoraLlama<B> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    let device = Default::default();
    <B as Backend>::seed(&device, seed);
    let mut m: LoraLlama<B> = peft_models::load_llama(&dir, &device).unwrap();
    let fields = LoraFields {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    add_adapter(&mut m, "default", &fields, &device).unwrap();
    freeze(m, &AdapterOnly)
}

/// Sequences whose second half follows from the first (token + `shift`), loss on the
/// second half only.
fn examples(n: usize, shift: u32, seed: u64, vocab: u32) -> Vec<Tokenized> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| {
            let half = 3 + rng.below(4);
            let first: Vec<u32> = (0..half).map(|_| 1 + rng.below(40) as u32).collect();
            let second: Vec<u32> = first.iter().map(|t| (t + shift) % vocab).collect();
            let ids: Vec<u32> = first.iter().chain(&second).copied().collect();
            let trained = (0..ids.len()).map(|i| i >= half).collect();
            Tokenized { ids, trained }
        })
        .collect()
}

fn options() -> TrainOptions {
    TrainOptions {
        lr: 5e-3,
        batch_size: 2,
        grad_accum: 2,
        max_steps: Some(6),
        warmup_steps: 2,
        save_every: Some(2),
        eval_every: Some(2),
        progress: false,
        ..Default::default()
    }
}

fn losses(dir: &Path) -> Vec<(usize, f64, Option<f64>)> {
    read(&dir.join(METRICS_FILE))
        .unwrap()
        .into_iter()
        .map(|m| (m.step, m.loss, m.val_loss))
        .collect()
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one_step_for_step() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    let data = examples(24, 7, 1, vocab);
    let val = examples(6, 7, 2, vocab);
    let obj = TokenCrossEntropy { pad: 0 };
    let whole = tempfile::tempdir().unwrap();
    let a = train(
        model(3),
        &obj,
        &data,
        &val,
        &options(),
        whole.path(),
        false,
        &device,
    )
    .unwrap();
    assert!(a.finished);

    let parts = tempfile::tempdir().unwrap();
    let first = TrainOptions {
        stop_at: Some(3),
        ..options()
    };
    let p = train(
        model(3),
        &obj,
        &data,
        &val,
        &first,
        parts.path(),
        false,
        &device,
    )
    .unwrap();
    assert!(!p.finished);
    assert_eq!(p.state.step, 3);
    // A new process: a freshly built model (other random LoRA init) and optimizer.
    let b = train(
        model(99),
        &obj,
        &data,
        &val,
        &options(),
        parts.path(),
        true,
        &device,
    )
    .unwrap();
    assert!(b.finished);

    let (la, lb) = (losses(whole.path()), losses(parts.path()));
    assert_eq!(la.len(), 6);
    assert_eq!(lb.len(), 6, "resumed metrics continue the file: {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x.0, y.0);
        assert!(
            (x.1 - y.1).abs() <= 1e-6 * x.1.abs().max(1.0),
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
        match (x.2, y.2) {
            (Some(u), Some(v)) => {
                assert!((u - v).abs() <= 1e-6 * u.abs().max(1.0), "{la:?} vs {lb:?}")
            }
            (None, None) => {}
            other => panic!("step {}: validation {other:?}", x.0),
        }
    }
    // The run learned: validation loss fell from the first evaluation to the last.
    assert!(
        la[5].2.unwrap() < la[1].2.unwrap(),
        "validation loss fell: {la:?}"
    );
    for ((ka, ta), (kb, tb)) in trainable_tensors(&a.model)
        .iter()
        .zip(&trainable_tensors(&b.model))
    {
        assert_eq!(ka, kb);
        let (ta, tb): (Vec<f32>, Vec<f32>) = (ta.to_vec().unwrap(), tb.to_vec().unwrap());
        for (u, v) in ta.iter().zip(&tb) {
            assert!((u - v).abs() <= 1e-5, "{ka}: {u} vs {v}");
        }
    }
}

#[test]
fn resuming_with_other_options_is_refused() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    let data = examples(8, 7, 1, vocab);
    let obj = TokenCrossEntropy { pad: 0 };
    let dir = tempfile::tempdir().unwrap();
    let o = TrainOptions {
        stop_at: Some(1),
        ..options()
    };
    train(model(3), &obj, &data, &[], &o, dir.path(), false, &device).unwrap();
    // Starting over in the same directory without --resume is refused too.
    let again = train(
        model(3),
        &obj,
        &data,
        &[],
        &options(),
        dir.path(),
        false,
        &device,
    );
    assert!(matches!(again, Err(TrainError::Config(m)) if m.contains("--resume")));
    let other = TrainOptions {
        lr: 1e-2,
        ..options()
    };
    let err = train(
        model(3),
        &obj,
        &data,
        &[],
        &other,
        dir.path(),
        true,
        &device,
    )
    .unwrap_err();
    assert!(matches!(&err, TrainError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("other options"), "{err}");
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_loadable() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    let data = examples(16, 7, 1, vocab);
    let obj = TokenCrossEntropy { pad: 0 };
    let dir = tempfile::tempdir().unwrap();
    let o = TrainOptions {
        stop_at: Some(4),
        ..options()
    };
    train(model(3), &obj, &data, &[], &o, dir.path(), false, &device).unwrap();
    // What a kill during the write of step 6 leaves: a temporary directory holding a
    // truncated file and no state.
    let partial = dir
        .path()
        .join(checkpoint::CHECKPOINTS)
        .join(".tmp-step-000006-4242");
    std::fs::create_dir_all(&partial).unwrap();
    let good = dir
        .path()
        .join(checkpoint::CHECKPOINTS)
        .join("step-000004/trainable.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(
        partial.join("trainable.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();

    let ck = checkpoint::load_latest(dir.path()).unwrap().unwrap();
    assert_eq!(ck.state.step, 4);
    assert!(!ck.trainable.is_empty());
    assert!(
        !partial.exists(),
        "leftovers of the interrupted write are removed"
    );
    let done = train(
        model(5),
        &obj,
        &data,
        &[],
        &options(),
        dir.path(),
        true,
        &device,
    )
    .unwrap();
    assert_eq!(done.state.step, 6);
    assert_eq!(
        checkpoint::list(dir.path()).len(),
        2,
        "keeps the newest two"
    );
}

#[test]
fn early_stopping_keeps_the_best_step() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    // Training teaches "+7"; validation wants "+9" for the same kind of prompt, so after
    // the first steps (which learn the shared structure) validation loss rises.
    let data = examples(64, 7, 1, vocab);
    let val = examples(8, 9, 2, vocab);
    let obj = TokenCrossEntropy { pad: 0 };
    let dir = tempfile::tempdir().unwrap();
    let o = TrainOptions {
        lr: 2e-2,
        max_steps: Some(30),
        eval_every: Some(1),
        save_every: None,
        early_stopping_patience: Some(3),
        warmup_steps: 0,
        ..options()
    };
    let done = train(model(3), &obj, &data, &val, &o, dir.path(), false, &device).unwrap();
    let m = losses(dir.path());
    let (best_step, best) = m.iter().filter_map(|(s, _, v)| v.map(|v| (*s, v))).fold(
        (0, f64::INFINITY),
        |acc, (s, v)| if v < acc.1 { (s, v) } else { acc },
    );
    assert!(done.stopped_early, "validation loss kept improving: {m:?}");
    assert_eq!(
        done.state.step,
        best_step + 3,
        "stops after 3 evaluations without progress"
    );
    assert_eq!(done.model_step, best_step);
    // The returned model is the best one: its validation loss is the best logged.
    let again = evaluate_loss(&done.model.valid(), &obj, &val, 2, &device);
    assert!(
        (again.loss - best).abs() < 1e-5,
        "{} vs best {best}",
        again.loss
    );
}

/// Wraps an objective and returns NaN from the given call on.
struct NanFrom<O> {
    inner: O,
    calls: std::cell::Cell<usize>,
    from: usize,
}

impl<O: Objective> Objective for NanFrom<O> {
    type Example = O::Example;
    fn loss<B2: Backend, M: CausalLm<B2>>(
        &self,
        model: &M,
        ex: &[&O::Example],
        device: &B2::Device,
    ) -> Tensor<B2, 1> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        let l = self.inner.loss(model, ex, device);
        if n >= self.from { l * f32::NAN } else { l }
    }
    fn targets(&self, e: &O::Example) -> usize {
        self.inner.targets(e)
    }
    fn tokens(&self, e: &O::Example) -> usize {
        self.inner.tokens(e)
    }
}

/// Wraps an objective and records the examples of every loss call.
struct Record<O: Objective> {
    inner: O,
    seen: std::cell::RefCell<Vec<O::Example>>,
}

impl<O: Objective> Objective for Record<O>
where
    O::Example: Clone,
{
    type Example = O::Example;
    fn loss<B2: Backend, M: CausalLm<B2>>(
        &self,
        model: &M,
        ex: &[&O::Example],
        device: &B2::Device,
    ) -> Tensor<B2, 1> {
        self.seen
            .borrow_mut()
            .extend(ex.iter().map(|e| (*e).clone()));
        self.inner.loss(model, ex, device)
    }
    fn targets(&self, e: &O::Example) -> usize {
        self.inner.targets(e)
    }
    fn tokens(&self, e: &O::Example) -> usize {
        self.inner.tokens(e)
    }
}

#[test]
fn examples_used_names_the_examples_the_loop_takes_in_order() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    // 7 examples, 4 per step, 5 steps: two whole epochs, each in its own order, and part
    // of a third.
    let data = examples(7, 5, 2, vocab);
    let opts = TrainOptions {
        max_steps: Some(5),
        save_every: None,
        eval_every: None,
        ..options()
    };
    let used = opts.examples_used(data.len());
    assert_eq!(used.len(), 20);
    assert_ne!(used[..7], used[7..14], "both epochs in one order");
    for epoch in [&used[..7], &used[7..14]] {
        let mut sorted = epoch.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
    }
    let obj = Record {
        inner: TokenCrossEntropy { pad: 0 },
        seen: std::cell::RefCell::new(Vec::new()),
    };
    let dir = tempfile::tempdir().unwrap();
    train(
        model(4),
        &obj,
        &data,
        &[],
        &opts,
        dir.path(),
        false,
        &device,
    )
    .unwrap();
    let expected: Vec<Tokenized> = used.iter().map(|&i| data[i].clone()).collect();
    assert_eq!(obj.seen.into_inner(), expected);
    // A run shorter than an epoch leaves some examples out.
    let short = TrainOptions {
        max_steps: Some(1),
        ..opts
    };
    assert_eq!(short.examples_used(data.len()), used[..4]);
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    let data = examples(16, 7, 1, vocab);
    let dir = tempfile::tempdir().unwrap();
    // Two micro-batches per step: NaN from the 7th loss, i.e. in step 4.
    let obj = NanFrom {
        inner: TokenCrossEntropy { pad: 0 },
        calls: std::cell::Cell::new(0),
        from: 6,
    };
    let err = train(
        model(3),
        &obj,
        &data,
        &[],
        &options(),
        dir.path(),
        false,
        &device,
    )
    .unwrap_err();
    let TrainError::NonFinite {
        step,
        checkpoint: Some(ck),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*step, 4);
    assert!(ck.ends_with("step-000002"), "{}", ck.display());
    assert!(err.to_string().contains("step-000002"), "{err}");
    assert_eq!(
        checkpoint::load_latest(dir.path())
            .unwrap()
            .unwrap()
            .state
            .step,
        2
    );
    assert_eq!(losses(dir.path()).len(), 3, "no line for the failed step");
}

#[test]
fn gradient_checkpointing_gives_the_same_run() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    type C = Autodiff<Flex, BalancedCheckpointing>;
    let _serial = serial();
    let device = Default::default();
    let vocab = model(0).vocab_size() as u32;
    let data = examples(8, 7, 1, vocab);
    let obj = TokenCrossEntropy { pad: 0 };
    let o = TrainOptions {
        max_steps: Some(3),
        save_every: None,
        eval_every: None,
        ..options()
    };
    let plain = tempfile::tempdir().unwrap();
    train(model(3), &obj, &data, &[], &o, plain.path(), false, &device).unwrap();

    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    <C as Backend>::seed(&device, 3);
    let mut m: LoraLlama<C> = peft_models::load_llama(&dir, &device).unwrap();
    let fields = LoraFields {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(Targets::all_linear()),
        ..Default::default()
    };
    add_adapter(&mut m, "default", &fields, &device).unwrap();
    let m = freeze(m, &AdapterOnly);
    let recomputed = tempfile::tempdir().unwrap();
    train(m, &obj, &data, &[], &o, recomputed.path(), false, &device).unwrap();
    let (a, b) = (losses(plain.path()), losses(recomputed.path()));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x.1 - y.1).abs() <= 1e-5 * x.1.abs(),
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
}
