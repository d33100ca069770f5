//! # peft-lora
//!
//! Low-rank adaptation of linear layers (Hu et al., 2021, <https://arxiv.org/abs/2106.09685>):
//! a frozen weight `W` gains `delta W = s * B A` with `A: [r, in]`, `B: [out, r]`, computed
//! on activations as `y = W x + s * B (A dropout(x))`, so the full delta is never built while
//! training. `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski, 2023,
//! <https://arxiv.org/abs/2312.03732>). DoRA (Liu et al., 2024,
//! <https://arxiv.org/abs/2402.09353>) rescales each output row of `W + s B A` to a learned
//! magnitude `m`, the row norm detached from the gradient, as peft does.
//!
//! Adapters are read and written in peft's format (`adapter_config.json` with
//! [`peft_core::config::LoraFields`], `adapter_model.safetensors` with `lora_A.weight`,
//! `lora_B.weight`, `lora_magnitude_vector`), with peft's target selection, `rank_pattern`
//! and `alpha_pattern`.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use peft_lora::{LoraLlama, load_adapter};
//! use peft_models::config::ModelConfig;
//! use peft_models::weights::SafetensorsSource;
//!
//! let device = Default::default();
//! let dir = std::path::Path::new("my-llama");
//! let ModelConfig::Llama(cfg) = ModelConfig::from_dir(dir)? else { panic!("not a Llama") };
//! let mut model = LoraLlama::<NdArray>::load(&cfg, &mut SafetensorsSource::open_dir(dir)?, &device)?;
//! load_adapter(&mut model, "my-adapter".as_ref(), "default", &device)?; // saved by Python's peft
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use peft_core::adapters::{AdaptedLinear, AdapterSet};
use peft_core::config::{AdapterConfig, InitLoraWeights, LoraFields};
use peft_core::format::{TensorFile, WEIGHTS_FILE, peft_key};
use peft_core::inject::{LinearAdapter, LinearWeight};
use peft_core::model::AdaptableModel;
use peft_core::{PeftError, Result};

/// One LoRA adapter on one linear layer.
///
/// `a` is stored `[in, r]` and `b` `[r, out]` (burn's layout, so the forward pass needs no
/// transpose); files hold peft's `[r, in]` and `[out, r]`, converted once at the boundary.
#[derive(Module, Debug)]
pub struct LoraLayer<B: Backend> {
    /// `A^T`, `[in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B^T`, `[r, out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// DoRA's magnitude `m`, `[out]`.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// Dropout on the adapter's input (active only with autodiff, i.e. in training).
    pub dropout: Dropout,
    /// The scale `s`.
    pub scaling: f64,
    /// DoRA: the row norms `||W + s B A||` of the merged weight, kept to unmerge.
    #[module(skip)]
    merged_norm: Option<Tensor<B, 1>>,
}

impl<B: Backend> LoraLayer<B> {
    /// A new adapter of rank `r` for a layer `[in] -> [out]`, initialised as
    /// `init_lora_weights` says (default: A Kaiming-uniform, B zero, a no-op).
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] for an initialisation scheme this build does not have.
    pub fn new<W: LinearWeight<B>>(
        base: &W,
        r: usize,
        scaling: f64,
        fields: &LoraFields,
        device: &B::Device,
    ) -> Result<Self> {
        let (inp, out) = (base.in_features(), base.out_features());
        // Kaiming-uniform with a = sqrt(5), as torch's nn.Linear and peft: bound 1/sqrt(fan_in).
        let kaiming = |fan_in: usize, shape: [usize; 2]| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::<B, 2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let (a, b) = match &fields.init_lora_weights {
            InitLoraWeights::Bool(true) => {
                (kaiming(inp, [inp, r]), Tensor::zeros([r, out], device))
            }
            InitLoraWeights::Bool(false) => (kaiming(inp, [inp, r]), kaiming(r, [r, out])),
            InitLoraWeights::Scheme(s) if s.eq_ignore_ascii_case("gaussian") => (
                Tensor::random([inp, r], Distribution::Normal(0.0, 1.0 / r as f64), device),
                Tensor::zeros([r, out], device),
            ),
            InitLoraWeights::Scheme(s) => {
                return Err(PeftError::Unsupported(format!(
                    "init_lora_weights = {s:?} is not supported by this build (use true, false or \"gaussian\")"
                )));
            }
        };
        let mut layer = Self {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            magnitude: None,
            dropout: DropoutConfig::new(fields.lora_dropout).init(),
            scaling,
            merged_norm: None,
        };
        if fields.use_dora {
            let norm = layer.adapted_row_norms(base.weight());
            layer.magnitude = Some(Param::from_tensor(norm));
        }
        Ok(layer)
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[1]
    }

    /// `s * B A` in the Hugging Face layout `[out, in]` (built only for merging and DoRA norms).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()).transpose() * self.scaling
    }

    /// `||W + s B A||` over each output row, detached from the gradient.
    fn adapted_row_norms(&self, weight: Tensor<B, 2>) -> Tensor<B, 1> {
        let w = (weight + self.delta_weight()).detach();
        w.powi_scalar(2).sum_dim(1).sqrt().squeeze_dim(1)
    }
}

impl<B: Backend> LinearAdapter<B> for LoraLayer<B> {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let x = self.dropout.forward(input.clone());
        let lora = x
            .clone()
            .matmul(self.lora_a.val().unsqueeze())
            .matmul(self.lora_b.val().unsqueeze())
            * self.scaling;
        let Some(m) = &self.magnitude else {
            return output + lora;
        };
        // DoRA, as peft: result = base(x) + (m / ||W + sBA|| - 1) * (x W^T) + m / ||W + sBA|| * lora.
        let norm = self.adapted_row_norms(base.weight());
        let scale = (m.val() / norm).unsqueeze::<D>();
        let base_no_bias = x.matmul(base.weight().transpose().unsqueeze());
        output + (scale.clone() - 1.0) * base_no_bias + scale * lora
    }

    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let adapted = weight + self.delta_weight();
        match &self.magnitude {
            None => Ok((adapted, bias)),
            Some(m) => {
                let norm = adapted
                    .clone()
                    .powi_scalar(2)
                    .sum_dim(1)
                    .sqrt()
                    .squeeze_dim::<1>(1);
                let scale = (m.val() / norm.clone()).unsqueeze_dim(1);
                self.merged_norm = Some(norm);
                Ok((adapted * scale, bias))
            }
        }
    }

    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        match &self.magnitude {
            None => Ok((weight - self.delta_weight(), bias)),
            Some(m) => {
                // W' = m / n * (W + dW) row-wise, and the rows of W' have norm m, so
                // n = ||W + dW|| cannot be recovered from W'; merge kept it.
                let norm = self.merged_norm.take().ok_or_else(|| {
                    PeftError::Unsupported(
                        "this DoRA adapter was not merged here, so it cannot be unmerged".into(),
                    )
                })?;
                let scale = (norm / m.val()).unsqueeze_dim(1);
                Ok((weight * scale - self.delta_weight(), bias))
            }
        }
    }
}

/// The slot type of a linear layer holding named LoRA adapters.
pub type LoraSlot<B> = AdapterSet<B, LoraLayer<B>>;

/// A Llama-family model with LoRA slots on every linear layer.
pub type LoraLlama<B> = peft_models::llama::LlamaForCausalLM<
    B,
    AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>,
    peft_core::inject::NoAdapter,
    peft_core::inject::NoAdapter,
    peft_core::inject::NoAdapter,
>;

/// GPT-2 with LoRA slots on every linear layer.
pub type LoraGpt2<B> = peft_models::gpt2::Gpt2LMHeadModel<
    B,
    AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>,
    peft_core::inject::NoAdapter,
>;

/// The target paths of a config on a model, with rank and scale for each.
///
/// # Errors
/// [`PeftError::NoTargetMatched`] (listing the model's modules), or a bad pattern.
pub fn plan<B: Backend, M: AdaptableModel<B>>(
    model: &M,
    fields: &LoraFields,
) -> Result<Vec<(String, usize, f64)>> {
    let modules = model.modules();
    let targets = fields.target_spec().compile()?.select(&modules)?;
    let ranks = fields.rank_patterns()?;
    let alphas = fields.alpha_patterns()?;
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let kind = modules.iter().find(|m| m.path == t).map(|m| m.kind);
        if kind != Some(peft_core::target::ModuleKind::Linear)
            && kind != Some(peft_core::target::ModuleKind::OutputHead)
        {
            return Err(PeftError::Unsupported(format!(
                "target `{t}` is not a linear layer; LoRA adapts linear layers (give the names of \
                 linear layers, e.g. q_proj, or use \"all-linear\")"
            )));
        }
        let r = ranks.get(&t).unwrap_or(fields.r);
        let alpha = alphas.get(&t).unwrap_or(fields.lora_alpha);
        out.push((t, r, fields.scaling(r, alpha)));
    }
    Ok(out)
}

/// Adds a new LoRA adapter named `name` to the layers the config targets. Returns the
/// adapted module paths.
///
/// # Errors
/// No target matched, a target that is not a linear layer (or that this model keeps out of
/// the adapter slots, such as the output head), a taken name, or an unsupported option.
pub fn add_adapter<B, M, W>(
    model: &mut M,
    name: &str,
    fields: &LoraFields,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = LoraSlot<B>>,
{
    validate(fields)?;
    let plan = plan(model, fields)?;
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        if let Some((_, r, s)) = plan.iter().find(|(p, _, _)| p == path) {
            let lora = LoraLayer::new(&layer.base, *r, *s, fields, device)?;
            layer.adapter.insert(name, lora)?;
            done.push(path.to_string());
        }
        Ok(())
    })?;
    check_all_placed(&plan, &done)?;
    Ok(done)
}

fn validate(fields: &LoraFields) -> Result<()> {
    if fields.lora_bias {
        return Err(PeftError::Unsupported(
            "lora_bias = true is not supported by this build".into(),
        ));
    }
    if fields.bias != peft_core::config::LoraBias::None {
        return Err(PeftError::Unsupported(format!(
            "bias = {:?} is not supported by this build yet (use \"none\")",
            fields.bias
        )));
    }
    Ok(())
}

fn check_all_placed(plan: &[(String, usize, f64)], done: &[String]) -> Result<()> {
    let missing: Vec<&str> = plan
        .iter()
        .map(|(p, _, _)| p.as_str())
        .filter(|p| !done.iter().any(|d| d == p))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PeftError::Unsupported(format!(
            "these targets have no adapter slot in this model: {} (LoRA on the output head is not supported)",
            missing.join(", ")
        )))
    }
}

/// Loads an adapter saved by Python's peft (or by [`save_adapter`]) under `name`.
/// Returns the adapted module paths.
///
/// # Errors
/// An unreadable or invalid config, a `peft_type` other than LORA, targets that match no
/// module, a missing, unexpected or mis-shaped tensor (naming the key and both shapes).
pub fn load_adapter<B, M, W>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = LoraSlot<B>>,
{
    let cfg = AdapterConfig::<LoraFields>::load(dir)?;
    let fields = &cfg.method;
    validate(fields)?;
    if !matches!(fields.init_lora_weights, InitLoraWeights::Bool(_)) {
        tracing::debug!(
            "init_lora_weights = {:?} only matters at initialisation; loading the saved weights",
            fields.init_lora_weights
        );
    }
    let plan = plan(model, fields)?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?;
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        let Some((_, r, s)) = plan.iter().find(|(p, _, _)| p == path) else {
            return Ok(());
        };
        let (inp, out) = (layer.base.in_features(), layer.base.out_features());
        let hint = format!("whose `{path}` is [out={out}, in={inp}] with r={r}");
        let a = file.take(&peft_key(path, "lora_A.weight"), &[*r, inp], &hint)?;
        let b = file.take(&peft_key(path, "lora_B.weight"), &[out, *r], &hint)?;
        let magnitude = if fields.use_dora {
            Some(Param::from_data(
                file.take(&peft_key(path, "lora_magnitude_vector"), &[out], &hint)?,
                device,
            ))
        } else {
            None
        };
        let lora = LoraLayer {
            lora_a: Param::from_tensor(Tensor::<B, 2>::from_data(a, device).transpose()),
            lora_b: Param::from_tensor(Tensor::<B, 2>::from_data(b, device).transpose()),
            magnitude,
            dropout: DropoutConfig::new(fields.lora_dropout).init(),
            scaling: *s,
            merged_norm: None,
        };
        layer.adapter.insert(name, lora)?;
        done.push(path.to_string());
        Ok(())
    })?;
    check_all_placed(&plan, &done)?;
    file.finish()?;
    Ok(done)
}

/// Saves the adapter `name` in peft's format into `dir` (created if needed), with the
/// given config (its `target_modules` should select exactly the adapted layers).
///
/// # Errors
/// [`PeftError::Adapter`] if no layer holds `name`; I/O errors.
pub fn save_adapter<B, M, W>(
    model: &M,
    name: &str,
    config: &AdapterConfig<LoraFields>,
    dir: &Path,
) -> Result<PathBuf>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = LoraSlot<B>>,
{
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    model.visit_linears(&mut |path, layer| {
        if let Some(l) = layer.adapter.get(name) {
            tensors.push((
                peft_key(path, "lora_A.weight"),
                l.lora_a.val().transpose().into_data(),
            ));
            tensors.push((
                peft_key(path, "lora_B.weight"),
                l.lora_b.val().transpose().into_data(),
            ));
            if let Some(m) = &l.magnitude {
                tensors.push((peft_key(path, "lora_magnitude_vector"), m.val().into_data()));
            }
        }
    });
    if tensors.is_empty() {
        return Err(PeftError::Adapter(format!(
            "no layer holds an adapter named `{name}`"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io("create directory", dir, e))?;
    TensorFile::write(dir.join(WEIGHTS_FILE), tensors)?;
    config.save(dir)?;
    Ok(dir.to_path_buf())
}

/// The Rust examples of README.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The Rust examples of docs/lora.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/lora.md")]
pub struct LoraGuideDoctests;
