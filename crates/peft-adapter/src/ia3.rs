//! (IA)^3: learned vectors that rescale activations (Liu et al., 2022,
//! <https://arxiv.org/abs/2205.05638>), with peft's semantics.
//!
//! On a targeted linear layer `y = W x + b`, a vector `l` scales the output,
//! `y' = l * (W x + b)`, or, on a layer listed in `feedforward_modules`, the input,
//! `y' = W (l * x) + b`. The vectors start at ones (the base model). Merging folds `l` into
//! the weight (rows of `W` and `b` for output scaling, columns of `W` for input scaling);
//! unmerging divides by `l + 1e-8`, as peft does.
//!
//! Files are peft's: `adapter_config.json` with [`Ia3Fields`] (`peft_type: "IA3"`), and
//! `adapter_model.safetensors` holding `base_model.model.<path>.ia3_l`, shaped `[out, 1]`
//! for output scaling and `[1, in]` for input scaling. `fan_in_fan_out` (GPT-2's Conv1D)
//! does not change these shapes; the models of `peft-models` keep every weight `[out, in]`.
//!
//! peft's rule for `feedforward_modules` is kept exactly: a string is a regex that must
//! match the whole module path, a list entry matches when the path *ends with* it (as a
//! plain string, not at a dot boundary).

use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use peft_core::adapters::AdapterSet;
use peft_core::config::{AdapterConfig, Ia3Fields};
use peft_core::format::{TensorFile, WEIGHTS_FILE, peft_key};
use peft_core::inject::{LinearAdapter, LinearWeight};
use peft_core::model::AdaptableModel;
use peft_core::target::{ModuleKind, Targets};
use peft_core::{PeftError, Result};
use regex::Regex;

/// The tolerance peft adds to `l` before dividing by it when unmerging.
pub const UNMERGE_EPS: f64 = 1e-8;

/// One (IA)^3 vector on one linear layer.
#[derive(Module, Debug)]
pub struct Ia3Layer<B: Backend> {
    /// The learned vector `l`: `[out]` scaling the output, or `[in]` scaling the input.
    pub ia3_l: Param<Tensor<B, 1>>,
    /// Whether `l` scales the layer's input (a feed-forward module in peft's terms).
    pub feedforward: bool,
}

impl<B: Backend> Ia3Layer<B> {
    /// A new vector for `base`: ones (the identity), or, with `init_ia3_weights = false`,
    /// standard normal values as peft draws them.
    pub fn new<W: LinearWeight<B>>(
        base: &W,
        feedforward: bool,
        init_ones: bool,
        device: &B::Device,
    ) -> Self {
        let n = if feedforward {
            base.in_features()
        } else {
            base.out_features()
        };
        let l = if init_ones {
            Tensor::ones([n], device)
        } else {
            Tensor::random([n], Distribution::Normal(0.0, 1.0), device)
        };
        Self::from_vector(l, feedforward)
    }

    /// An adapter holding the given vector.
    pub fn from_vector(l: Tensor<B, 1>, feedforward: bool) -> Self {
        Self {
            ia3_l: Param::from_tensor(l),
            feedforward,
        }
    }

    /// The vector's length.
    pub fn len(&self) -> usize {
        self.ia3_l.shape().dims::<1>()[0]
    }

    /// Whether the vector is empty (a layer of width zero).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape peft stores `ia3_l` with: `[1, in]` for input scaling, `[out, 1]` otherwise.
    pub fn peft_shape(&self) -> [usize; 2] {
        if self.feedforward {
            [1, self.len()]
        } else {
            [self.len(), 1]
        }
    }

    /// Weight and bias multiplied (`sign = 1`) or divided (`sign = -1`) by `l`.
    fn fold(
        &self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        divide: bool,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let l = self.ia3_l.val().detach();
        let l = if divide { l + UNMERGE_EPS } else { l };
        let apply_w = |w: Tensor<B, 2>, s: Tensor<B, 2>| if divide { w / s } else { w * s };
        if self.feedforward {
            // Input scaling: W (l * x) = (W diag(l)) x; the bias is untouched.
            (apply_w(weight, l.unsqueeze_dim(0)), bias)
        } else {
            let w = apply_w(weight, l.clone().unsqueeze_dim(1));
            let b = bias.map(|b| if divide { b / l } else { b * l });
            (w, b)
        }
    }
}

impl<B: Backend> LinearAdapter<B> for Ia3Layer<B> {
    fn adapt_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.feedforward {
            x * self.ia3_l.val().unsqueeze::<D>()
        } else {
            x
        }
    }

    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        _input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        if self.feedforward {
            output
        } else {
            output * self.ia3_l.val().unsqueeze::<D>()
        }
    }

    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok(self.fold(weight, bias, false))
    }

    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok(self.fold(weight, bias, true))
    }
}

/// The slot type of a linear layer holding named (IA)^3 adapters.
pub type Ia3Slot<B> = AdapterSet<B, Ia3Layer<B>>;

/// A linear adapter slot that holds an [`Ia3Slot`]: the slot itself, or a pair whose
/// second half is one (so (IA)^3 composes with another method at the same layer, as
/// `(LoraSlot, Ia3Slot)`: the other method acts first, then the vector scales).
pub trait Ia3Slots<B: Backend> {
    /// The (IA)^3 adapters of this slot.
    fn ia3(&self) -> &Ia3Slot<B>;
    /// The (IA)^3 adapters of this slot, mutably.
    fn ia3_mut(&mut self) -> &mut Ia3Slot<B>;
}

impl<B: Backend> Ia3Slots<B> for Ia3Slot<B> {
    fn ia3(&self) -> &Ia3Slot<B> {
        self
    }
    fn ia3_mut(&mut self) -> &mut Ia3Slot<B> {
        self
    }
}

impl<B: Backend, A> Ia3Slots<B> for (A, Ia3Slot<B>) {
    fn ia3(&self) -> &Ia3Slot<B> {
        &self.1
    }
    fn ia3_mut(&mut self) -> &mut Ia3Slot<B> {
        &mut self.1
    }
}

/// peft's default (IA)^3 targets and feed-forward modules for a `model_type` of
/// `config.json` (`TRANSFORMERS_MODELS_TO_IA3_*_MAPPING` in peft 0.21), for the
/// architectures of `peft-models`; `None` for another type.
pub fn default_fields(model_type: &str) -> Option<Ia3Fields> {
    let (targets, ff): (&[&str], &[&str]) = match model_type {
        "llama" | "mistral" => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        "qwen2" => (&["q_proj", "v_proj", "down_proj"], &["down_proj"]),
        "gpt2" => (&["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
        _ => return None,
    };
    Some(Ia3Fields {
        target_modules: Some(Targets::list(targets.iter().copied())),
        feedforward_modules: Some(Targets::list(ff.iter().copied())),
        fan_in_fan_out: model_type == "gpt2",
        // `Ia3Fields::default()` has `false` here (a derived default); peft's is `true`.
        init_ia3_weights: true,
        ..Ia3Fields::default()
    })
}

/// Decides, as peft's `_check_target_module_feedforward`, whether a target path is a
/// feed-forward module (its input is scaled).
#[derive(Clone, Debug)]
pub struct FeedforwardMatcher {
    pattern: Option<Regex>,
    suffixes: Vec<String>,
}

impl FeedforwardMatcher {
    /// Compiles `feedforward_modules`.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`] for a regex that does not compile.
    pub fn new(ff: Option<&Targets>) -> Result<Self> {
        Ok(match ff {
            None => Self {
                pattern: None,
                suffixes: vec![],
            },
            Some(Targets::List(l)) => Self {
                pattern: None,
                suffixes: l.clone(),
            },
            Some(Targets::Pattern(p)) => Self {
                pattern: Some(Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    PeftError::InvalidPattern {
                        field: "feedforward_modules",
                        pattern: p.clone(),
                        message: e.to_string(),
                    }
                })?),
                suffixes: vec![],
            },
        })
    }

    /// Whether the module at `path` is a feed-forward module.
    pub fn is_feedforward(&self, path: &str) -> bool {
        match &self.pattern {
            Some(re) => re.is_match(path),
            None => self.suffixes.iter().any(|s| path.ends_with(s.as_str())),
        }
    }
}

fn check_fields(fields: &Ia3Fields) -> Result<()> {
    if fields.target_modules.is_none() {
        return Err(PeftError::Unsupported(
            "the (IA)^3 config has no target_modules; peft chooses them per architecture: use \
             peft_adapter::ia3::default_fields(model_type) (llama, mistral, qwen2, gpt2) or name \
             the layers"
                .into(),
        ));
    }
    if let (Some(Targets::List(t)), Some(Targets::List(ff))) =
        (&fields.target_modules, &fields.feedforward_modules)
        && let Some(extra) = ff.iter().find(|f| !t.contains(f))
    {
        return Err(PeftError::Unsupported(format!(
            "feedforward_modules must be a subset of target_modules (as in peft); `{extra}` is not \
             a target"
        )));
    }
    if fields
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(PeftError::Unsupported(
            "modules_to_save is not supported with (IA)^3 here; train the vectors only, or use \
             peft-lora's modules_to_save"
                .into(),
        ));
    }
    Ok(())
}

/// The targeted linear layers of a config on a model, each with whether its input is
/// scaled (`true`) or its output (`false`).
///
/// # Errors
/// No `target_modules`, a `feedforward_modules` list that is not a subset of it, a target
/// that is not a linear layer, [`PeftError::NoTargetMatched`] or a bad pattern.
pub fn plan<B: Backend, M: AdaptableModel<B>>(
    model: &M,
    fields: &Ia3Fields,
) -> Result<Vec<(String, bool)>> {
    check_fields(fields)?;
    let modules = model.modules();
    let targets = fields.target_spec().compile()?.select(&modules)?;
    let ff = FeedforwardMatcher::new(fields.feedforward_modules.as_ref())?;
    targets
        .into_iter()
        .map(|t| {
            let kind = modules.iter().find(|m| m.path == t).map(|m| m.kind);
            match kind {
                Some(ModuleKind::Linear) => {
                    let is_ff = ff.is_feedforward(&t);
                    Ok((t, is_ff))
                }
                Some(ModuleKind::OutputHead) => Err(PeftError::Unsupported(format!(
                    "target `{t}` is the output head, which has no adapter slot here"
                ))),
                _ => Err(PeftError::Unsupported(format!(
                    "target `{t}` is not a linear layer; (IA)^3 here adapts linear layers (give \
                     names such as k_proj, v_proj, down_proj)"
                ))),
            }
        })
        .collect()
}

fn taken(name: &str, path: &str) -> PeftError {
    PeftError::Adapter(format!(
        "an adapter named `{name}` already exists at `{path}`; delete it first or pick another name"
    ))
}

/// Adds a fresh (IA)^3 adapter named `name` on the layers `fields` targets (vectors of
/// ones unless `init_ia3_weights` is false). Returns the adapted module paths.
///
/// # Errors
/// As [`plan`]; a name already taken.
pub fn add_adapter<B, M>(
    model: &mut M,
    name: &str,
    fields: &Ia3Fields,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: AdaptableModel<B>,
    M::Linear: Ia3Slots<B>,
{
    let plan = plan(model, fields)?;
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        if let Some((_, ff)) = plan.iter().find(|(p, _)| p == path) {
            if layer.adapter.ia3().get(name).is_some() {
                return Err(taken(name, path));
            }
            let a = Ia3Layer::new(&layer.base, *ff, fields.init_ia3_weights, device);
            layer.adapter.ia3_mut().insert(name, a)?;
            done.push(path.to_string());
        }
        Ok(())
    })?;
    Ok(done)
}

/// Loads an (IA)^3 adapter saved by Python's peft (or [`save_adapter`]) under `name`.
/// Returns the adapted module paths.
///
/// # Errors
/// An unreadable or invalid config, a `peft_type` other than `IA3`, as [`plan`], a missing,
/// unexpected or mis-shaped `ia3_l` (naming the key and both shapes).
pub fn load_adapter<B, M>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: AdaptableModel<B>,
    M::Linear: Ia3Slots<B>,
{
    let cfg = AdapterConfig::<Ia3Fields>::load(dir)?;
    let plan = plan(model, &cfg.method)?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?
        .with_base_model(cfg.common.base_model_name_or_path.as_deref());
    let mut done = Vec::new();
    model.map_linears(&mut |path, layer| {
        let Some((_, ff)) = plan.iter().find(|(p, _)| p == path) else {
            return Ok(());
        };
        if layer.adapter.ia3().get(name).is_some() {
            return Err(taken(name, path));
        }
        let (inp, out) = (layer.base.in_features(), layer.base.out_features());
        let shape = if *ff { [1, inp] } else { [out, 1] };
        let hint = format!(
            "whose `{path}` is [out={out}, in={inp}] and scales its {}",
            if *ff { "input" } else { "output" }
        );
        let data = file.take(&peft_key(path, "ia3_l"), &shape, &hint)?;
        let n = data.num_elements();
        let l = Tensor::<B, 2>::from_data(data, device).reshape([n]);
        layer
            .adapter
            .ia3_mut()
            .insert(name, Ia3Layer::from_vector(l, *ff))?;
        done.push(path.to_string());
        Ok(())
    })?;
    file.finish()?;
    Ok(done)
}

/// Saves the adapter `name` in peft's format into `dir` (created if needed) with the given
/// config, whose `target_modules` and `feedforward_modules` should describe the adapted
/// layers (peft loads the file with them).
///
/// # Errors
/// [`PeftError::Adapter`] if no layer holds `name`; I/O errors.
pub fn save_adapter<B, M>(
    model: &M,
    name: &str,
    config: &AdapterConfig<Ia3Fields>,
    dir: &Path,
) -> Result<PathBuf>
where
    B: Backend,
    M: AdaptableModel<B>,
    M::Linear: Ia3Slots<B>,
{
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    model.visit_linears(&mut |path, layer| {
        if let Some(a) = layer.adapter.ia3().get(name) {
            let data = a.ia3_l.val().reshape(a.peft_shape()).into_data();
            tensors.push((peft_key(path, "ia3_l"), data));
        }
    });
    if tensors.is_empty() {
        return Err(PeftError::Adapter(format!(
            "no layer holds an (IA)^3 adapter named `{name}`"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io("create directory", dir, e))?;
    TensorFile::write(dir.join(WEIGHTS_FILE), tensors)?;
    config.save(dir)?;
    Ok(dir.to_path_buf())
}
