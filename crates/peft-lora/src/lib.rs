//! # peft-lora
//!
//! Low-rank adaptation of linear layers and embeddings (Hu et al., 2021,
//! <https://arxiv.org/abs/2106.09685>): a frozen weight `W` gains a trainable update
//! `delta W = (alpha / r) * B A` with `A: [r, in]`, `B: [out, r]`, computed on activations as
//! `(x A^T) B^T * scale` so the full delta is never built during training. Variants:
//! rsLoRA (scale `alpha / sqrt(r)`, Kalajdzievski, 2023) and DoRA (a learned magnitude over
//! the normalised adapted weight, Liu et al., 2024). Merge, unmerge and adapter combination
//! follow Python peft.
//!
//! Status: the crate exists so the workspace has its final shape; the method lands with the
//! LoRA work item (it implements [`peft_core::inject::LinearAdapter`]).
