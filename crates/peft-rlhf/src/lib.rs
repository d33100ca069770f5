//! # peft-rlhf
//!
//! Preference optimisation on PEFT-adapted models, as objectives of `peft-train`'s loop:
//!
//! - supervised and instruction fine-tuning: `peft_train::trainer::TokenCrossEntropy`
//!   (token cross-entropy with completion-only masking), re-exported here as [`Sft`];
//! - DPO (Rafailov et al., 2023, <https://arxiv.org/abs/2305.18290>) with TRL's loss variants
//!   ([`dpo`]): `sigmoid` (with label smoothing), `robust`, `ipo`, `hinge`, `beta`, and the
//!   rewards and margins TRL logs. The reference is the same model without the adapter being
//!   trained: its log-probabilities are computed once before training
//!   ([`dpo::reference_logps`]), so no second copy of the weights is held;
//! - reward models ([`reward`]): a scalar `score` head on the adapted model, the
//!   Bradley-Terry loss of TRL's `RewardTrainer` and pairwise accuracy, saved with the
//!   adapter as peft's `modules_to_save` (a `SEQ_CLS` adapter Python's peft loads);
//! - GRPO ([`grpo`]): group-relative advantages and TRL's clipped loss, sampling from the
//!   policy inside the loop's loss, with an optional KL to the adapter-disabled model;
//! - PPO ([`ppo`]): a value head on the policy, KL-penalised rewards against the
//!   adapter-disabled model, GAE, whitening, clipped policy and value losses, each rollout
//!   reused for `ppo_epochs` updates;
//! - preference data in JSONL ([`data`]).
//!
//! ```no_run
//! use peft_rlhf::dpo::{DpoConfig, DpoLossType, dpo_loss};
//! use burn::backend::Flex;
//! use burn::prelude::*;
//!
//! let d = Default::default();
//! let t = |v: [f32; 2]| Tensor::<Flex, 1>::from_floats(v, &d);
//! let cfg = DpoConfig { beta: 0.1, loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 };
//! let out = dpo_loss(&cfg, t([-10.0, -12.0]), t([-14.0, -11.0]), t([-11.0, -12.0]), t([-13.0, -11.5]), t([5.0, 6.0]), t([5.0, 7.0]));
//! println!("{}", out.losses.mean().into_scalar());
//! ```

pub mod data;
pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod reward;

/// The supervised fine-tuning objective (token cross-entropy, prompt tokens masked).
pub use peft_train::trainer::TokenCrossEntropy as Sft;

/// The Rust examples of docs/rlhf.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/rlhf.md")]
pub struct RlhfGuideDoctests;
