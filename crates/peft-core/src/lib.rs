//! # peft-core
//!
//! The foundation of burn-peft: the traits every parameter-efficient fine-tuning method
//! implements, target-module selection with Python peft's semantics, named adapters, the
//! choice of which parameters train, and the Hugging Face PEFT file format
//! (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! ## The idea in one picture
//!
//! A PEFT method adds a small number of trainable parameters at a few *injection points*
//! of a frozen model. For a linear layer, LoRA computes
//! `y = W x + (alpha / r) * B (A x)` with `A: [r, in]`, `B: [out, r]`, `r << min(in, out)`
//! (Hu et al., 2021, <https://arxiv.org/abs/2106.09685>). Each point is a trait in
//! [`inject`]; a model is generic over a [`inject::PeftSlots`] bundle naming the type
//! used at each point, and [`adapters::AdapterSet`] holds several named adapters there.
//!
//! ## Example: a method of your own, on one layer
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::nn::LinearConfig;
//! use burn::prelude::*;
//! use peft_core::adapters::{AdaptedLinear, AdapterControl, AdapterSet};
//! use peft_core::inject::{LinearAdapter, LinearWeight};
//!
//! /// Scales a layer's output by a learned vector, like (IA)^3.
//! #[derive(Module, Debug)]
//! struct Scale<B: Backend> {
//!     l: burn::module::Param<Tensor<B, 1>>,
//! }
//!
//! impl<B: Backend> LinearAdapter<B> for Scale<B> {
//!     fn adapt_output<const D: usize, W: LinearWeight<B>>(
//!         &self, _x: &Tensor<B, D>, _base: &W, y: Tensor<B, D>,
//!     ) -> Tensor<B, D> {
//!         y * self.l.val().unsqueeze()
//!     }
//! }
//!
//! type B = NdArray;
//! let device = Default::default();
//! let base = LinearConfig::new(4, 3).init::<B>(&device);
//! let mut layer: AdaptedLinear<B, _, AdapterSet<B, Scale<B>>> = AdaptedLinear::new(base);
//! let l = burn::module::Param::from_tensor(Tensor::from_floats([2.0, 2.0, 2.0], &device));
//! layer.adapter.insert("double", Scale { l }).unwrap();
//!
//! let x = Tensor::<B, 2>::ones([1, 4], &device);
//! let base_out = layer.base.forward(x.clone());
//! layer.forward(x.clone()).into_data().assert_approx_eq::<f32>(
//!     &(base_out.clone() * 2.0).into_data(), burn::tensor::Tolerance::default());
//! layer.adapter.set_disabled(true);
//! assert_eq!(layer.forward(x).into_data(), base_out.into_data()); // exactly the base
//! ```
//!
//! ## Modules
//!
//! - [`inject`]: the injection-point traits and the slot bundle.
//! - [`linalg`]: a small f64 SVD on the CPU (PiSSA, SVD-based adapter combination).
//! - [`adapters`]: named adapters ([`adapters::AdapterSet`]) and [`adapters::AdaptedLinear`].
//! - [`model`]: the trait a model implements so methods can find and change its layers,
//!   and model-wide adapter operations (activate, disable, merge, delete).
//! - [`target`]: `target_modules`, `exclude_modules`, `layers_to_transform`,
//!   `rank_pattern` / `alpha_pattern` with peft's semantics.
//! - [`trainable`]: freezing everything but the adapter, and the trainable-parameter report.
//! - [`config`]: `adapter_config.json` for every peft type this project knows.
//! - [`format`](mod@format): `adapter_model.safetensors` with peft's key names, validated on load.
//! - [`fused`]: the linear product and the low-rank update as fused operations on the CPU
//!   backend.
//! - [`error`]: the crate's error type.

pub mod adapters;
pub mod config;
pub mod error;
pub mod format;
pub mod fused;
pub mod inject;
pub mod linalg;
pub mod model;
pub mod target;
pub mod trainable;

pub use error::{PeftError, Result};
