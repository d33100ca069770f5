//! # VeRA, written outside the library
//!
//! Vector-based random matrix adaptation (Kopiczko et al., 2023,
//! <https://arxiv.org/abs/2310.11454>) is a PEFT method this workspace does not ship. This
//! crate implements it against `peft-core`'s traits only, to show what writing a method
//! takes:
//!
//! ```text
//! y = W x + lambda_b * (B (lambda_d * (A x)))
//! ```
//!
//! `A: [r, in]` and `B: [out, r]` are frozen random matrices, shared by every layer (each
//! layer uses the top-left corner of one pair drawn for the largest shapes, as peft does)
//! and regenerated from a seed rather than stored; only the vectors `lambda_d: [r]`
//! (initialised to `d_initial`) and `lambda_b: [out]` (initialised to zero, so a new
//! adapter is a no-op) train. At rank 256 that is `256 + out` numbers per layer, against
//! LoRA's `r * (in + out)`.
//!
//! What it takes:
//! 1. [`VeraLayer`] implements [`LinearAdapter`]: the forward pass on activations, and
//!    `merge`/`unmerge` (`W += diag(lambda_b) B diag(lambda_d) A`).
//! 2. [`add_vera`] puts a layer in the [`AdapterSet`] slot of each targeted linear layer of
//!    any [`AdaptableModel`] (Llama, GPT-2, ...), found with peft-core's target rules; named
//!    adapters, activation, disabling and merging then come from peft-core for free.
//! 3. [`VeraTrainable`] is a [`TrainablePolicy`]: the lambdas train, the projections do not.
//! 4. [`save_vera`]/[`load_vera`] write and read the vectors (the projections are
//!    regenerated from the seed in the config) with peft-core's safetensors helpers.
//!
//! Training is peft-train's loop, unchanged; see `tests/vera.rs`.

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use peft_core::adapters::AdapterSet;
use peft_core::format::{TensorFile, WEIGHTS_FILE, peft_key, write_atomic};
use peft_core::inject::{LinearAdapter, LinearWeight};
use peft_core::model::AdaptableModel;
use peft_core::target::{TargetSpec, Targets};
use peft_core::trainable::TrainablePolicy;
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

/// VeRA's options (the fields of peft's `VeraConfig` this example uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeraConfig {
    /// Always `"VERA"`.
    pub peft_type: String,
    /// Rank of the shared random projections.
    pub r: usize,
    /// Initial value of `lambda_d`.
    pub d_initial: f64,
    /// Seed of the shared projections.
    pub projection_prng_key: u64,
    /// Which linear layers (peft's target rules).
    pub target_modules: Targets,
}

impl VeraConfig {
    /// A config for rank `r` on `targets`.
    pub fn new(r: usize, targets: Targets) -> Self {
        Self {
            peft_type: "VERA".into(),
            r,
            d_initial: 0.1,
            projection_prng_key: 0,
            target_modules: targets,
        }
    }
}

/// The shared frozen projections, drawn once for the largest shapes: Kaiming-uniform as
/// peft draws them, from a SplitMix64 stream so every backend and process gets the same
/// numbers from the same seed.
#[derive(Clone, Debug)]
pub struct Projections {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    max_in: usize,
}

impl Projections {
    /// Draws `A: [r, max_in]` and `B: [max_out, r]` from `seed`.
    pub fn new(seed: u64, r: usize, max_in: usize, max_out: usize) -> Self {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((next() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        let a = uniform(r * max_in, max_in);
        let b = uniform(max_out * r, r);
        Self { a, b, r, max_in }
    }

    /// `A^T[:in, :]` as `[in, r]` and `B^T[:, :out]` as `[r, out]` (burn's layout).
    fn slices(&self, inp: usize, out: usize) -> (TensorData, TensorData) {
        let mut at = Vec::with_capacity(inp * self.r);
        for i in 0..inp {
            for k in 0..self.r {
                at.push(self.a[k * self.max_in + i]);
            }
        }
        let mut bt = Vec::with_capacity(self.r * out);
        for k in 0..self.r {
            for o in 0..out {
                bt.push(self.b[o * self.r + k]);
            }
        }
        (
            TensorData::new(at, [inp, self.r]),
            TensorData::new(bt, [self.r, out]),
        )
    }
}

/// VeRA on one linear layer.
#[derive(Module, Debug)]
pub struct VeraLayer<B: Backend> {
    /// `A^T`, `[in, r]`, frozen.
    pub vera_a: Param<Tensor<B, 2>>,
    /// `B^T`, `[r, out]`, frozen.
    pub vera_b: Param<Tensor<B, 2>>,
    /// `lambda_d`, `[r]`.
    pub lambda_d: Param<Tensor<B, 1>>,
    /// `lambda_b`, `[out]`.
    pub lambda_b: Param<Tensor<B, 1>>,
}

impl<B: Backend> VeraLayer<B> {
    /// A new (no-op) VeRA layer for `base`.
    pub fn new<W: LinearWeight<B>>(
        base: &W,
        p: &Projections,
        d_initial: f64,
        device: &B::Device,
    ) -> Self {
        let (inp, out) = (base.in_features(), base.out_features());
        let (a, b) = p.slices(inp, out);
        Self {
            vera_a: Param::from_data(a, device).set_require_grad(false),
            vera_b: Param::from_data(b, device).set_require_grad(false),
            lambda_d: Param::from_tensor(Tensor::full([p.r], d_initial, device)),
            lambda_b: Param::from_tensor(Tensor::zeros([out], device)),
        }
    }

    /// `diag(lambda_b) B diag(lambda_d) A` in the Hugging Face layout `[out, in]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let a = self.vera_a.val() * self.lambda_d.val().unsqueeze::<2>(); // [in, r]
        let b = self.vera_b.val() * self.lambda_b.val().unsqueeze::<2>(); // [r, out]
        a.matmul(b).transpose()
    }
}

impl<B: Backend> LinearAdapter<B> for VeraLayer<B> {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let h =
            input.clone().matmul(self.vera_a.val().unsqueeze()) * self.lambda_d.val().unsqueeze();
        let h = h.matmul(self.vera_b.val().unsqueeze()) * self.lambda_b.val().unsqueeze();
        output + h
    }

    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight + self.delta_weight(), bias))
    }

    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight - self.delta_weight(), bias))
    }
}

/// The linear slot of a model that holds named VeRA adapters.
pub type VeraSlot<B> = AdapterSet<B, VeraLayer<B>>;

/// A Llama-family model with VeRA slots on its linear layers.
pub type VeraLlama<B> = peft_models::llama::LlamaWith<
    B,
    burn::nn::Linear<B>,
    VeraSlot<B>,
    peft_core::inject::NoAdapter,
    peft_core::inject::NoAdapter,
    peft_core::inject::NoAdapter,
>;

fn targets<B: Backend, M: AdaptableModel<B>>(model: &M, cfg: &VeraConfig) -> Result<Vec<String>> {
    let spec = TargetSpec {
        target_modules: Some(cfg.target_modules.clone()),
        ..Default::default()
    };
    spec.compile()?.select(&model.modules())
}

fn projections<B, W, M>(model: &M, cfg: &VeraConfig, targets: &[String]) -> Projections
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = VeraSlot<B>>,
{
    let (mut max_in, mut max_out) = (0, 0);
    model.visit_linears(&mut |path, l| {
        if targets.iter().any(|t| t == path) {
            max_in = max_in.max(l.base.in_features());
            max_out = max_out.max(l.base.out_features());
        }
    });
    Projections::new(cfg.projection_prng_key, cfg.r, max_in, max_out)
}

/// Adds a VeRA adapter named `name` to the linear layers `cfg` targets; returns them.
///
/// # Errors
/// No target matched (the error lists the model's modules), or a taken name.
pub fn add_vera<B, W, M>(
    model: &mut M,
    name: &str,
    cfg: &VeraConfig,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = VeraSlot<B>>,
{
    let targets = targets(model, cfg)?;
    let p = projections(model, cfg, &targets);
    model.map_linears(&mut |path, l| {
        if targets.iter().any(|t| t == path) {
            let layer = VeraLayer::new(&l.base, &p, cfg.d_initial, device);
            l.adapter.insert(name, layer)?;
        }
        Ok(())
    })?;
    Ok(targets)
}

/// Trains the lambdas only, never the shared projections or the base.
#[derive(Clone, Copy, Debug, Default)]
pub struct VeraTrainable;

impl TrainablePolicy for VeraTrainable {
    fn is_trainable(&self, path: &str) -> bool {
        path.ends_with(".lambda_d") || path.ends_with(".lambda_b")
    }
}

const CONFIG_FILE: &str = "adapter_config.json";

/// Writes adapter `name`: `adapter_config.json` (the [`VeraConfig`]) and
/// `adapter_model.safetensors` with peft's key names (`...q_proj.vera_lambda_d`).
///
/// # Errors
/// No layer holds `name`; I/O errors.
pub fn save_vera<B, W, M>(model: &M, name: &str, cfg: &VeraConfig, dir: &Path) -> Result<()>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = VeraSlot<B>>,
{
    let mut tensors = Vec::new();
    model.visit_linears(&mut |path, l| {
        if let Some(v) = l.adapter.get(name) {
            tensors.push((
                peft_key(path, "vera_lambda_d"),
                v.lambda_d.val().into_data(),
            ));
            tensors.push((
                peft_key(path, "vera_lambda_b"),
                v.lambda_b.val().into_data(),
            ));
        }
    });
    if tensors.is_empty() {
        return Err(PeftError::Adapter(format!(
            "no layer holds an adapter named `{name}`"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io("create directory", dir, e))?;
    TensorFile::write(dir.join(WEIGHTS_FILE), tensors)?;
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| PeftError::InvalidConfig {
        path: dir.join(CONFIG_FILE),
        message: e.to_string(),
    })?;
    write_atomic(&dir.join(CONFIG_FILE), &json)
}

/// Loads an adapter written by [`save_vera`] under `name`.
///
/// # Errors
/// A missing or invalid file, another method, a missing or mis-shaped tensor.
pub fn load_vera<B, W, M>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<VeraConfig>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = VeraSlot<B>>,
{
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io("read", &path, e))?;
    let cfg: VeraConfig = serde_json::from_str(&text).map_err(|e| PeftError::InvalidConfig {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if cfg.peft_type != "VERA" {
        return Err(PeftError::InvalidConfig {
            path,
            message: format!("peft_type is {}, not VERA", cfg.peft_type),
        });
    }
    add_vera(model, name, &cfg, device)?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?;
    model.map_linears(&mut |p, l| {
        let out = l.base.out_features();
        let Some(v) = l.adapter.get_mut(name) else {
            return Ok(());
        };
        let hint = format!("whose `{p}` has {out} outputs at rank {}", cfg.r);
        let d = file.take(&peft_key(p, "vera_lambda_d"), &[cfg.r], &hint)?;
        let b = file.take(&peft_key(p, "vera_lambda_b"), &[out], &hint)?;
        v.lambda_d = Param::from_data(d, device);
        v.lambda_b = Param::from_data(b, device);
        Ok(())
    })?;
    file.finish()?;
    Ok(cfg)
}
