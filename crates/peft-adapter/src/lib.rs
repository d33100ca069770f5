//! # peft-adapter
//!
//! - Bottleneck adapters (Houlsby et al., 2019, <https://arxiv.org/abs/1902.00751>):
//!   `h + up(act(down(h)))` after a sublayer, in the sequential (Pfeiffer), double (Houlsby)
//!   and parallel layouts.
//! - (IA)^3 (Liu et al., 2022, <https://arxiv.org/abs/2205.05638>): a learned vector scales a
//!   layer output (or the input of feed-forward layers), `y = l * (W x)`.
//! - BitFit (Ben Zaken et al., 2021, <https://arxiv.org/abs/2106.10199>): only biases train.
//!
//! Status: the crate exists so the workspace has its final shape; the methods land with the
//! adapters work item ([`peft_core::inject::SublayerAdapter`],
//! [`peft_core::inject::LinearAdapter`], [`peft_core::trainable::BiasOnly`]).
