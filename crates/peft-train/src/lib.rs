//! # peft-train
//!
//! A training loop for any PEFT method, built from burn's public pieces so that checkpoints
//! hold the trainable parameters and optimizer state only, never the frozen base:
//!
//! - [`optim`]: AdamW with decoupled weight decay (state only for trainable parameters,
//!   keyed by module path), warm-up then linear, cosine or constant learning rate,
//!   gradient accumulation, global-norm clipping;
//! - [`data`]: JSONL records (`text`; `prompt` + `completion`; chat `messages`) rendered
//!   with the model's chat template, loss only on completions, truncation with a count,
//!   packing, a validation split;
//! - [`trainer`]: the loop, with evaluation, early stopping that keeps the best
//!   parameters, atomic [`checkpoint`]s that resume exactly, a NaN guard, a progress bar,
//!   [`metrics`] (`metrics.jsonl`, `loss.png`);
//! - [`eval`]: exact-match accuracy of generated answers.
//!
//! Gradient checkpointing (recomputing activations in the backward pass instead of keeping
//! them) is a property of the autodiff backend in burn: train on
//! `Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>`.
//!
//! ```no_run
//! use burn::backend::{Autodiff, Flex};
//! use peft_core::config::LoraFields;
//! use peft_core::target::Targets;
//! use peft_core::trainable::{AdapterOnly, freeze};
//! use peft_lora::{LoraLlama, add_adapter};
//! use peft_train::data::{RenderOptions, prepare, read_jsonl};
//! use peft_train::trainer::{TokenCrossEntropy, TrainOptions, train};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let path = peft_models::smollm2_gguf_path();
//! let mut model: LoraLlama<B> = peft_models::load_llama(&path, &device)?;
//! let lora = LoraFields { r: 16, lora_alpha: 32.0, target_modules: Some(Targets::all_linear()), ..Default::default() };
//! add_adapter(&mut model, "default", &lora, &device)?;
//! let model = freeze(model, &AdapterOnly);
//! let tok = peft_models::gguf_model::load_tokenizer(&path)?;
//! let records = read_jsonl("data/demo/train.jsonl".as_ref())?;
//! let (examples, _stats) = prepare(&tok, &records, &RenderOptions::default(), 256, false)?;
//! let opts = TrainOptions { lr: 1e-3, max_steps: Some(100), ..Default::default() };
//! let objective = TokenCrossEntropy { pad: 0 };
//! let done = train(model, &objective, &examples, &[], &opts, "runs/demo".as_ref(), false, &device)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod allocator;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod trainer;

pub use allocator::tune_allocator;
pub use error::{Result, TrainError};

/// The Rust examples of docs/training.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/training.md")]
pub struct TrainingGuideDoctests;
