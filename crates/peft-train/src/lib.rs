//! # peft-train
//!
//! A training loop built from burn's public pieces (gradients, optimizers, schedulers), so
//! that checkpoints hold the adapter and optimizer state only, never the frozen base: AdamW
//! with decoupled weight decay, warm-up with linear or cosine decay, gradient accumulation,
//! global-norm clipping, atomic checkpoints that resume exactly, and metrics.
//!
//! Status: the crate exists so the workspace has its final shape; the loop lands with the
//! training work item.
