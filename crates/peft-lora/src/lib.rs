//! # peft-lora
//!
//! Low-rank adaptation of linear layers (Hu et al., 2021, <https://arxiv.org/abs/2106.09685>):
//! a frozen weight `W` gains `delta W = s * B A` with `A: [r, in]`, `B: [out, r]`, computed
//! on activations as `y = W x + s * B (A dropout(x))`, so the full delta is never built while
//! training. `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski, 2023,
//! <https://arxiv.org/abs/2312.03732>). DoRA (Liu et al., 2024,
//! <https://arxiv.org/abs/2402.09353>) rescales each output row of `W + s B A` to a learned
//! magnitude `m`, the row norm detached from the gradient, as peft does. PiSSA (Meng et al.,
//! 2024, <https://arxiv.org/abs/2404.02948>) starts `s B A` at the leading `r` singular
//! triplets of `W` and keeps the residual as the base.
//!
//! Also as in peft: `lora_bias` (a bias on `B`), trainable base biases (`bias = "all"` /
//! `"lora_only"`, see [`trainable_policy`]), LoRA on the token embeddings
//! ([`LoraEmbedding`], `s * (B A)^T` added to the looked-up rows), `modules_to_save`, and
//! new adapters combined from existing ones ([`add_weighted_adapter`]: linear, cat, svd).
//!
//! Adapters are read and written in peft's format (`adapter_config.json` with
//! [`peft_core::config::LoraFields`], `adapter_model.safetensors` with `lora_A.weight`,
//! `lora_B.weight`, `lora_B.bias`, `lora_magnitude_vector`, `lora_embedding_A` /
//! `lora_embedding_B`, `base_layer.bias`, whole modules), with peft's target selection,
//! `rank_pattern` and `alpha_pattern`. [`add_adapter`], [`load_adapter`] and
//! [`save_adapter`] take any model through its linear layers; [`add_adapter_full`],
//! [`load_adapter_full`] and [`save_adapter_full`] also reach embeddings and whole modules
//! of a [`LoraModel`] (the Llama family, GPT-2).
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
use peft_core::config::{AdapterConfig, InitLoraWeights, LoraBias, LoraFields};
use peft_core::format::{TensorFile, WEIGHTS_FILE, peft_key};
use peft_core::inject::{LinearAdapter, LinearWeight};
use peft_core::linalg::{Matrix, svd};
use peft_core::model::AdaptableModel;
use peft_core::target::ModuleKind;
use peft_core::{PeftError, Result};

mod combine;
mod embedding;
mod model;

pub use combine::{Combination, add_weighted_adapter};
pub use embedding::{EmbeddingLoras, LoraEmbedding, LoraEmbeddingSlot};
use model::LinearsOnly;
pub use model::{LoraModel, LoraTrainable, trainable_policy};

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
    /// `lora_bias`: the bias of `lora_B`, `[out]` (scaled by `s` like the rest of the path).
    pub lora_b_bias: Option<Param<Tensor<B, 1>>>,
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
    /// With `"pissa"` (or `"pissa_niter_N"`), A and B hold the leading `r` singular triplets
    /// of the base weight (`s B A = U_r S_r V_r^T`); the caller must then replace the base
    /// weight by the residual `W - delta_weight()`, as [`add_adapter`] does.
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
        let pissa = is_pissa(&fields.init_lora_weights)?;
        let (a, b) = match &fields.init_lora_weights {
            _ if pissa => pissa_factors(base.weight(), r, scaling, device)?,
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
                    "init_lora_weights = {s:?} is not supported by this build (use true, false, \
                     \"gaussian\", \"pissa\" or \"pissa_niter_N\")"
                )));
            }
        };
        // nn.Linear's default bias init (bound 1/sqrt(fan_in)); zero when B starts at zero.
        let lora_b_bias = fields.lora_bias.then(|| {
            let t = match fields.init_lora_weights {
                InitLoraWeights::Bool(false) => {
                    let bound = 1.0 / (r as f64).sqrt();
                    Tensor::random([out], Distribution::Uniform(-bound, bound), device)
                }
                _ => Tensor::zeros([out], device),
            };
            Param::from_tensor(t)
        });
        let mut layer = Self {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            magnitude: None,
            lora_b_bias,
            dropout: DropoutConfig::new(fields.lora_dropout).init(),
            scaling,
            merged_norm: None,
        };
        if fields.use_dora {
            // With PiSSA the base becomes W - sBA, so the adapted weight is W itself.
            let norm = if pissa {
                let w = base.weight().detach();
                w.powi_scalar(2).sum_dim(1).sqrt().squeeze_dim(1)
            } else {
                layer.adapted_row_norms(base.weight())
            };
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

    /// `bias + sign * s * lora_B.bias` (`lora_bias`), or `bias` unchanged without one.
    fn merge_bias(&self, bias: Option<Tensor<B, 1>>, sign: f64) -> Result<Option<Tensor<B, 1>>> {
        match (&self.lora_b_bias, bias) {
            (None, bias) => Ok(bias),
            (Some(lb), Some(b)) => Ok(Some(b + lb.val() * (sign * self.scaling))),
            (Some(_), None) => Err(PeftError::Unsupported(
                "cannot merge a LoRA adapter with lora_bias = true into a layer that has no bias \
                 (as in peft); keep it unmerged"
                    .into(),
            )),
        }
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
        // 2-D products over all leading dimensions: A's gradient is then one product over
        // every token instead of a batched product and a sum over the batch.
        let mut dims = input.dims();
        let (rows, inp) = (dims[..D - 1].iter().product::<usize>(), dims[D - 1]);
        let b = self.lora_b.val();
        let out = b.dims()[1];
        dims[D - 1] = out;
        if self.magnitude.is_none() && self.lora_b_bias.is_none() {
            // Plain LoRA: one fused update with its dropout, added into the base output's
            // buffer on the CPU.
            return peft_core::fused::low_rank_add_dropout(
                output.reshape([rows, out]),
                &input.clone().reshape([rows, inp]),
                self.lora_a.val(),
                b,
                self.scaling,
                self.dropout.prob,
            )
            .reshape(dims);
        }
        let x = peft_core::fused::dropout(input.clone(), self.dropout.prob);
        let lora = x
            .clone()
            .reshape([rows, inp])
            .matmul(self.lora_a.val())
            .matmul(b);
        let lora = match &self.lora_b_bias {
            Some(bias) => (lora + bias.val().unsqueeze()) * self.scaling,
            None => lora * self.scaling,
        };
        let lora: Tensor<B, D> = lora.reshape(dims);
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
        let bias = self.merge_bias(bias, 1.0)?;
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
        let bias = self.merge_bias(bias, -1.0)?;
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

/// Whether `init_lora_weights` asks for PiSSA (`"pissa"` or `"pissa_niter_N"`).
///
/// # Errors
/// [`PeftError::InvalidConfig`]-like [`PeftError::Unsupported`] for a malformed
/// `pissa_niter_N`.
fn is_pissa(init: &InitLoraWeights) -> Result<bool> {
    let InitLoraWeights::Scheme(s) = init else {
        return Ok(false);
    };
    if s == "pissa" {
        return Ok(true);
    }
    if let Some(n) = s.strip_prefix("pissa_niter_") {
        return match n.parse::<usize>() {
            Ok(_) => Ok(true),
            Err(_) => Err(PeftError::Unsupported(format!(
                "init_lora_weights = {s:?}: expected \"pissa_niter_\" followed by a number of iterations"
            ))),
        };
    }
    Ok(false)
}

/// peft's `[out, in]`-style factor as the `[in, out]`-style parameter, laid out
/// contiguously (the CPU kernels of the fused update read contiguous factors in place).
fn transposed<B: Backend>(data: TensorData, device: &B::Device) -> Tensor<B, 2> {
    let t = Tensor::<B, 2>::from_data(data, device).transpose();
    Tensor::from_data(t.into_data(), device)
}

/// PiSSA's factors of a weight `W` (`[out, in]`), as peft computes them: with
/// `W = U S V^T`, `A = sqrt(S_r / s) V_r^T` and `B = U_r sqrt(S_r / s)`, so `s B A` is the
/// best rank-`r` approximation of `W`. Returned in burn's layout: `A^T` `[in, r]`, `B^T`
/// `[r, out]`. peft's `pissa_niter_N` approximates the same triplets by randomized subspace
/// iteration; here they are computed exactly (f64 one-sided Jacobi on the CPU).
fn pissa_factors<B: Backend>(
    weight: Tensor<B, 2>,
    r: usize,
    scaling: f64,
    device: &B::Device,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    let w = Matrix::from_tensor_data(&weight.into_data())?;
    let (out, inp) = (w.rows, w.cols);
    let d = svd(&w).truncate(r);
    let mut a = Matrix::zeros(r, inp); // [r, in]
    let mut b = Matrix::zeros(out, r); // [out, r]
    for (k, &sk) in d.s.iter().enumerate() {
        let root = (sk / scaling).sqrt();
        for j in 0..inp {
            a.set(k, j, root * d.vt.get(k, j));
        }
        for i in 0..out {
            b.set(i, k, d.u.get(i, k) * root);
        }
    }
    let a = Tensor::<B, 2>::from_data(a.transpose().to_tensor_data(), device);
    let b = Tensor::<B, 2>::from_data(b.transpose().to_tensor_data(), device);
    Ok((a, b))
}

/// `W - s B A` for PiSSA factors.
fn pissa_residual<B: Backend>(
    weight: Tensor<B, 2>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    scaling: f64,
) -> Tensor<B, 2> {
    weight - a.clone().matmul(b.clone()).transpose() * scaling
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

/// A Llama-family model with LoRA slots on every linear layer and on the token embeddings
/// (peft's `lora_embedding_A` / `lora_embedding_B`). Use it with [`add_adapter_full`],
/// [`load_adapter_full`] and [`save_adapter_full`].
pub type LoraLlamaWithEmbedding<B> = peft_models::llama::LlamaForCausalLM<
    B,
    AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>,
    peft_core::inject::NoAdapter,
    LoraEmbeddingSlot<B>,
    peft_core::inject::NoAdapter,
>;

/// GPT-2 with LoRA slots on every linear layer.
pub type LoraGpt2<B> = peft_models::gpt2::Gpt2LMHeadModel<
    B,
    AdaptedLinear<B, burn::nn::Linear<B>, LoraSlot<B>>,
    peft_core::inject::NoAdapter,
>;

/// Where a config's targets lie in a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetPlan {
    /// Targeted linear layers: path, rank and scale.
    pub linears: Vec<(String, usize, f64)>,
    /// The targeted token embedding, if any: path, rank and scale.
    pub embedding: Option<(String, usize, f64)>,
}

/// The target paths of a config on a model, with rank and scale for each. Only linear
/// layers: a targeted embedding is an error here (see [`plan_targets`]).
///
/// # Errors
/// [`PeftError::NoTargetMatched`] (listing the model's modules), or a bad pattern.
pub fn plan<B: Backend, M: AdaptableModel<B>>(
    model: &M,
    fields: &LoraFields,
) -> Result<Vec<(String, usize, f64)>> {
    Ok(plan_targets(model, fields, None)?.linears)
}

/// The targets of a config on a model: linear layers, and the token embedding when
/// `token_embedding` names its path (the model has an embedding adapter slot).
///
/// # Errors
/// [`PeftError::NoTargetMatched`], a bad pattern, or a target that is neither a linear
/// layer nor the token embedding.
pub fn plan_targets<B: Backend, M: AdaptableModel<B>>(
    model: &M,
    fields: &LoraFields,
    token_embedding: Option<&str>,
) -> Result<TargetPlan> {
    let modules = model.modules();
    let targets = fields.target_spec().compile()?.select(&modules)?;
    let ranks = fields.rank_patterns()?;
    let alphas = fields.alpha_patterns()?;
    let mut out = TargetPlan::default();
    for t in targets {
        let kind = modules.iter().find(|m| m.path == t).map(|m| m.kind);
        let r = ranks.get(&t).unwrap_or(fields.r);
        let alpha = alphas.get(&t).unwrap_or(fields.lora_alpha);
        let entry = (t.clone(), r, fields.scaling(r, alpha));
        match kind {
            Some(ModuleKind::Linear | ModuleKind::OutputHead) => out.linears.push(entry),
            Some(ModuleKind::Embedding) if token_embedding == Some(t.as_str()) => {
                out.embedding = Some(entry);
            }
            Some(ModuleKind::Embedding) if token_embedding.is_none() => {
                return Err(PeftError::Unsupported(format!(
                    "target `{t}` is an embedding; LoRA on embeddings needs a model with an \
                     embedding adapter slot (peft_lora::LoraLlamaWithEmbedding) and \
                     add_adapter_full / load_adapter_full"
                )));
            }
            _ => {
                return Err(PeftError::Unsupported(format!(
                    "target `{t}` is not a linear layer{}; LoRA adapts linear layers (give the \
                     names of linear layers, e.g. q_proj, or use \"all-linear\")",
                    match token_embedding {
                        Some(e) => format!(" or the token embedding `{e}`"),
                        None => String::new(),
                    }
                )));
            }
        }
    }
    Ok(out)
}

/// Adds a new LoRA adapter named `name` to the layers the config targets. Returns the
/// adapted module paths.
///
/// Handles `bias`, `lora_bias`, DoRA and every `init_lora_weights` scheme this crate
/// has (PiSSA replaces the targeted base weights by their residual). Targets on the
/// embeddings and `modules_to_save` need [`add_adapter_full`].
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
    add_adapter_full(&mut LinearsOnly::Mut(model), name, fields, device)
}

/// [`add_adapter`] for a model that exposes its whole modules and embedding slot
/// ([`LoraModel`]): also LoRA on the token embedding and `modules_to_save`.
///
/// `modules_to_save` modules train in place (freeze with [`trainable_policy`]): the model
/// holds one copy of them, so unlike peft, disabling or deleting the adapter does not bring
/// the original module back.
///
/// # Errors
/// As [`add_adapter`]; a `modules_to_save` entry naming a module this model cannot save.
pub fn add_adapter_full<B, M>(
    model: &mut M,
    name: &str,
    fields: &LoraFields,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: LoraModel<B>,
{
    validate(fields)?;
    let token = model.token_embedding().map(|(p, _, _)| p);
    let plan = plan_targets(model, fields, token.as_deref())?;
    resolve_modules_to_save(model, fields)?;
    check_embedding_slot(model, &plan)?;
    let pissa = is_pissa(&fields.init_lora_weights)?;
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        if let Some((_, r, s)) = plan.linears.iter().find(|(p, _, _)| p == path) {
            check_lora_bias(path, fields, layer)?;
            let lora = LoraLayer::new(&layer.base, *r, *s, fields, device)?;
            if layer.adapter.get(name).is_some() {
                return Err(PeftError::Adapter(format!(
                    "an adapter named `{name}` already exists at `{path}`; delete it first or pick another name"
                )));
            }
            if pissa {
                let res = pissa_residual(layer.base.weight(), &lora.lora_a.val(), &lora.lora_b.val(), *s);
                layer.base.set_weight(res, layer.base.bias())?;
            }
            layer.adapter.insert(name, lora)?;
            done.push(path.to_string());
        }
        Ok(())
    })?;
    check_all_placed(&plan.linears, &done)?;
    if let Some((path, r, s)) = &plan.embedding {
        let (_, vocab, dim) = model.token_embedding().ok_or_else(|| no_embedding(path))?;
        let lora = LoraEmbedding::new(vocab, dim, *r, *s, fields, device)?;
        model
            .embedding_loras_mut()
            .ok_or_else(|| no_embedding(path))?
            .insert(name, lora)?;
        done.push(path.clone());
    }
    Ok(done)
}

fn no_embedding(path: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "the config targets the embedding `{path}`, but this model type has no LoRA embedding \
         slot (use peft_lora::LoraLlamaWithEmbedding)"
    ))
}

fn check_embedding_slot<B: Backend, M: LoraModel<B>>(model: &M, plan: &TargetPlan) -> Result<()> {
    match &plan.embedding {
        Some((path, _, _)) if model.embedding_loras().is_none() => Err(no_embedding(path)),
        _ => Ok(()),
    }
}

fn check_lora_bias<B: Backend, W: LinearWeight<B>>(
    path: &str,
    fields: &LoraFields,
    layer: &AdaptedLinear<B, W, LoraSlot<B>>,
) -> Result<()> {
    if fields.lora_bias && layer.base.bias().is_none() {
        tracing::warn!(
            "`{path}` has no bias, so its adapter with lora_bias = true cannot be merged (as in peft)"
        );
    }
    Ok(())
}

fn validate(fields: &LoraFields) -> Result<()> {
    is_pissa(&fields.init_lora_weights)?;
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

/// The paths of the modules `modules_to_save` names in this model (peft's matching: the
/// path itself or a dotted suffix of it).
///
/// # Errors
/// [`PeftError::Unsupported`] naming an entry that matches a module this model cannot
/// train and save in full (a tied head, a linear layer, a module with no accessor here).
pub fn resolve_modules_to_save<B: Backend, M: LoraModel<B>>(
    model: &M,
    fields: &LoraFields,
) -> Result<Vec<String>> {
    let Some(names) = &fields.modules_to_save else {
        return Ok(Vec::new());
    };
    let matches = |path: &str, name: &str| path == name || path.ends_with(&format!(".{name}"));
    let whole = model.whole_modules();
    let mut out = Vec::new();
    for name in names {
        let found: Vec<&String> = whole.iter().filter(|p| matches(p, name)).collect();
        if !found.is_empty() {
            out.extend(found.into_iter().cloned());
            continue;
        }
        if let Some((p, tied)) = model
            .tied_modules()
            .into_iter()
            .find(|(p, _)| matches(p, name))
        {
            return Err(PeftError::Unsupported(format!(
                "modules_to_save names `{p}`, which this model ties to `{tied}`; a tied module \
                 cannot be trained and saved on its own here (name `{tied}` instead, or use an \
                 untied checkpoint)"
            )));
        }
        if let Some(m) = model.modules().into_iter().find(|m| matches(&m.path, name)) {
            let can = if whole.is_empty() {
                "none through this entry point (use add_adapter_full, load_adapter_full and \
                 save_adapter_full)"
                    .to_string()
            } else {
                whole.join(", ")
            };
            return Err(PeftError::Unsupported(format!(
                "modules_to_save names `{}` (a {:?} module), which this build cannot train and \
                 save in full on this model; it can: {can}",
                m.path, m.kind
            )));
        }
        tracing::warn!(
            "modules_to_save: no module named `{name}` in this model; ignored (as in peft)"
        );
    }
    Ok(out)
}

/// Loads an adapter saved by Python's peft (or by [`save_adapter`]) under `name`.
/// Returns the adapted module paths.
///
/// Base biases saved with `bias = "all"` / `"lora_only"` are loaded into the base layers
/// (shared by every adapter, as in peft). An adapter whose config still says
/// `init_lora_weights = "pissa"` is loaded as peft loads it: the targeted base weights are
/// first replaced by the residual of their own SVD, so give it the *original* base model.
/// Embedding targets and `modules_to_save` need [`load_adapter_full`].
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
    load_adapter_full(&mut LinearsOnly::Mut(model), dir, name, device)
}

/// [`load_adapter`] for a model that implements [`LoraModel`]: also LoRA on the token
/// embedding (`lora_embedding_A` / `lora_embedding_B`), `modules_to_save` (written into the
/// model's module in place) and the biases of non-linear modules with `bias = "all"`.
///
/// # Errors
/// As [`load_adapter`].
pub fn load_adapter_full<B, M>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: LoraModel<B>,
{
    let cfg = AdapterConfig::<LoraFields>::load(dir)?;
    let fields = &cfg.method;
    validate(fields)?;
    let pissa = is_pissa(&fields.init_lora_weights)?;
    if !pissa && !matches!(fields.init_lora_weights, InitLoraWeights::Bool(_)) {
        tracing::debug!(
            "init_lora_weights = {:?} only matters at initialisation; loading the saved weights",
            fields.init_lora_weights
        );
    }
    let token = model.token_embedding().map(|(p, _, _)| p);
    let plan = plan_targets(model, fields, token.as_deref())?;
    let to_save = resolve_modules_to_save(model, fields)?;
    check_embedding_slot(model, &plan)?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?
        .with_base_model(cfg.common.base_model_name_or_path.as_deref());
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        let target = plan.linears.iter().find(|(p, _, _)| p == path);
        load_base_bias(&mut file, fields, path, target.is_some(), layer, device)?;
        let Some((_, r, s)) = target else {
            return Ok(());
        };
        if layer.adapter.get(name).is_some() {
            return Err(PeftError::Adapter(format!(
                "an adapter named `{name}` already exists at `{path}`; delete it first or pick another name"
            )));
        }
        let (inp, out) = (layer.base.in_features(), layer.base.out_features());
        let hint = format!("whose `{path}` is [out={out}, in={inp}] with r={r}");
        let a = file.take(&peft_key(path, "lora_A.weight"), &[*r, inp], &hint)?;
        let b = file.take(&peft_key(path, "lora_B.weight"), &[out, *r], &hint)?;
        let lora_b_bias = if fields.lora_bias {
            Some(Param::from_data(
                file.take(&peft_key(path, "lora_B.bias"), &[out], &hint)?,
                device,
            ))
        } else {
            None
        };
        let magnitude = if fields.use_dora {
            Some(Param::from_data(
                file.take(&peft_key(path, "lora_magnitude_vector"), &[out], &hint)?,
                device,
            ))
        } else {
            None
        };
        if pissa {
            let (pa, pb) = pissa_factors(layer.base.weight(), *r, *s, device)?;
            let res = pissa_residual(layer.base.weight(), &pa, &pb, *s);
            layer.base.set_weight(res, layer.base.bias())?;
        }
        let lora = LoraLayer {
            lora_a: Param::from_tensor(transposed::<B>(a, device)),
            lora_b: Param::from_tensor(transposed::<B>(b, device)),
            magnitude,
            lora_b_bias,
            dropout: DropoutConfig::new(fields.lora_dropout).init(),
            scaling: *s,
            merged_norm: None,
        };
        layer.adapter.insert(name, lora)?;
        done.push(path.to_string());
        Ok(())
    })?;
    check_all_placed(&plan.linears, &done)?;
    if let Some((path, r, s)) = &plan.embedding {
        let (_, vocab, dim) = model.token_embedding().ok_or_else(|| no_embedding(path))?;
        let hint = format!("whose `{path}` is [vocab={vocab}, dim={dim}] with r={r}");
        let a = file.take(&peft_key(path, "lora_embedding_A"), &[*r, vocab], &hint)?;
        let b = file.take(&peft_key(path, "lora_embedding_B"), &[dim, *r], &hint)?;
        // peft saves the base embedding too with save_embedding_layers=True.
        if let Some(w) =
            file.take_optional(&peft_key(path, "base_layer.weight"), &[vocab, dim], &hint)?
        {
            model.set_module_tensor(path, "weight", w)?;
        }
        let lora = LoraEmbedding {
            lora_embedding_a: Param::from_tensor(Tensor::<B, 2>::from_data(a, device).transpose()),
            lora_embedding_b: Param::from_tensor(Tensor::<B, 2>::from_data(b, device).transpose()),
            scaling: *s,
        };
        model
            .embedding_loras_mut()
            .ok_or_else(|| no_embedding(path))?
            .insert(name, lora)?;
        done.push(path.clone());
    }
    for path in &to_save {
        for (tname, current) in model.module_tensors(path) {
            let data = file.take(&peft_key(path, &tname), current.shape.as_slice(), "")?;
            model.set_module_tensor(path, &tname, data)?;
        }
    }
    if fields.bias == LoraBias::All {
        for path in model.whole_modules() {
            for (tname, current) in model.module_tensors(&path) {
                if tname != "bias" || to_save.contains(&path) {
                    continue;
                }
                let key = peft_key(&path, "bias");
                if let Some(data) = file.take_optional(&key, current.shape.as_slice(), "")? {
                    model.set_module_tensor(&path, "bias", data)?;
                }
            }
        }
    }
    file.finish()?;
    Ok(done)
}

/// Reads a base layer's bias saved with `bias = "all"` / `"lora_only"`: peft names it
/// `<path>.base_layer.bias` on LoRA layers and `<path>.bias` elsewhere.
fn load_base_bias<B: Backend, W: LinearWeight<B>>(
    file: &mut TensorFile,
    fields: &LoraFields,
    path: &str,
    targeted: bool,
    layer: &mut AdaptedLinear<B, W, LoraSlot<B>>,
    device: &B::Device,
) -> Result<()> {
    let wanted = match fields.bias {
        LoraBias::None => false,
        LoraBias::LoraOnly => targeted,
        LoraBias::All => true,
    };
    if !wanted {
        return Ok(());
    }
    let out = layer.base.out_features();
    let hint = format!("whose `{path}` has {out} outputs");
    let mut found = None;
    for key in [peft_key(path, "base_layer.bias"), peft_key(path, "bias")] {
        if let Some(b) = file.take_optional(&key, &[out], &hint)? {
            found = Some((key, b));
        }
    }
    let Some((key, bias)) = found else {
        return Ok(());
    };
    if layer.base.bias().is_none() {
        return Err(PeftError::Unsupported(format!(
            "the adapter holds `{key}`, but `{path}` has no bias in this model"
        )));
    }
    let bias = Tensor::<B, 1>::from_data(bias, device);
    layer.base.set_weight(layer.base.weight(), Some(bias))
}

/// Saves the adapter `name` in peft's format into `dir` (created if needed), with the
/// given config (its `target_modules` should select exactly the adapted layers).
///
/// With `bias = "all"` / `"lora_only"` the base biases are saved under peft's names
/// (`<path>.base_layer.bias` on adapted layers, `<path>.bias` elsewhere). Embedding
/// adapters and `modules_to_save` need [`save_adapter_full`].
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
    save_adapter_full(&LinearsOnly::Ref(model), name, config, dir)
}

/// [`save_adapter`] for a model that implements [`LoraModel`]: also embedding adapters,
/// `modules_to_save` (the module's current values, under peft's keys such as
/// `base_model.model.lm_head.weight`) and non-linear biases with `bias = "all"`.
///
/// # Errors
/// As [`save_adapter`]; a `modules_to_save` entry this model cannot save.
pub fn save_adapter_full<B, M>(
    model: &M,
    name: &str,
    config: &AdapterConfig<LoraFields>,
    dir: &Path,
) -> Result<PathBuf>
where
    B: Backend,
    M: LoraModel<B>,
{
    let fields = &config.method;
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    let mut held = false;
    model.visit_linears(&mut |path, layer| {
        let adapted = !layer.adapter.is_empty();
        if let Some(l) = layer.adapter.get(name) {
            held = true;
            tensors.push((
                peft_key(path, "lora_A.weight"),
                l.lora_a.val().transpose().into_data(),
            ));
            tensors.push((
                peft_key(path, "lora_B.weight"),
                l.lora_b.val().transpose().into_data(),
            ));
            if let Some(b) = &l.lora_b_bias {
                tensors.push((peft_key(path, "lora_B.bias"), b.val().into_data()));
            }
            if let Some(m) = &l.magnitude {
                tensors.push((peft_key(path, "lora_magnitude_vector"), m.val().into_data()));
            }
        }
        let save_bias = match fields.bias {
            LoraBias::None => false,
            LoraBias::LoraOnly => layer.adapter.get(name).is_some(),
            LoraBias::All => true,
        };
        if let (true, Some(b)) = (save_bias, layer.base.bias()) {
            let key = if adapted { "base_layer.bias" } else { "bias" };
            tensors.push((peft_key(path, key), b.into_data()));
        }
    });
    if let Some(slot) = model.embedding_loras()
        && let Some(l) = slot.get(name)
        && let Some((path, _, _)) = model.token_embedding()
    {
        held = true;
        tensors.push((
            peft_key(&path, "lora_embedding_A"),
            l.lora_embedding_a.val().transpose().into_data(),
        ));
        tensors.push((
            peft_key(&path, "lora_embedding_B"),
            l.lora_embedding_b.val().transpose().into_data(),
        ));
    }
    if !held {
        return Err(PeftError::Adapter(format!(
            "no layer holds an adapter named `{name}`"
        )));
    }
    let to_save = resolve_modules_to_save(model, fields)?;
    for path in &to_save {
        for (tname, data) in model.module_tensors(path) {
            tensors.push((peft_key(path, &tname), data));
        }
    }
    if fields.bias == LoraBias::All {
        for path in model.whole_modules() {
            if to_save.contains(&path) {
                continue;
            }
            for (tname, data) in model.module_tensors(&path) {
                if tname == "bias" {
                    tensors.push((peft_key(&path, "bias"), data));
                }
            }
        }
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
