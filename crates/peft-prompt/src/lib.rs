//! # peft-prompt
//!
//! - Prompt tuning (Lester et al., 2021, <https://arxiv.org/abs/2104.08691>): `n` learned
//!   embeddings prepended to the input embeddings.
//! - P-tuning (Liu et al., 2021, <https://arxiv.org/abs/2103.10385>): the virtual tokens come
//!   from a small MLP or LSTM prompt encoder.
//! - Prefix tuning (Li & Liang, 2021, <https://arxiv.org/abs/2101.00190>): learned keys and
//!   values prepended in every attention layer.
//!
//! Status: the crate exists so the workspace has its final shape; the methods land with the
//! prompt-methods work item ([`peft_core::inject::EmbeddingAdapter`],
//! [`peft_core::inject::KvAdapter`]).
