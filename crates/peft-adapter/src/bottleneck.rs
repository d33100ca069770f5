//! Bottleneck adapters (Houlsby et al., 2019, <https://arxiv.org/abs/1902.00751>) in the
//! layouts of adapter-hub's `adapters` library.
//!
//! A small two-layer network sits at the output of a sublayer (attention or MLP), inside
//! the residual branch:
//!
//! - sequential: `y' = y + s * up(act(down(y)))`, where `y` is the sublayer's output;
//! - parallel (He et al., 2022, <https://arxiv.org/abs/2110.04366>):
//!   `y' = y + s * up(act(down(x)))`, where `x` is the sublayer's input (the normalised
//!   hidden states the attention or MLP sees).
//!
//! `down` maps the hidden width `d` to `d / reduction_factor`, `up` maps it back; `up`
//! starts at zero, so a fresh adapter is the identity. Layouts ([`Layout`]):
//! `seq_bn` (Pfeiffer et al., 2021: after the MLP), `double_seq_bn` (Houlsby: after
//! attention and after the MLP), `par_bn` (parallel to the MLP, scaling 4).
//!
//! peft has no bottleneck adapters, so the file layout is this crate's (docs/adapters.md):
//! `adapter_config.json` with [`BottleneckFields`] (`peft_type: "BOTTLENECK"`) and
//! `adapter_model.safetensors` with `<sublayer path>.adapter.{down,up}.{weight,bias}`
//! (`model.layers.0.mlp.adapter.down.weight`, weights `[out, in]`).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData, activation};
use peft_core::adapters::AdapterSet;
use peft_core::config::{AdapterConfig, MethodConfig};
use peft_core::format::{TensorFile, WEIGHTS_FILE};
use peft_core::inject::{LinearWeight, SublayerAdapter};
use peft_core::model::AdaptableModel;
use peft_core::target::ModuleInfo;
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

/// The `peft_type` written in a bottleneck adapter's `adapter_config.json`.
pub const PEFT_TYPE: &str = "BOTTLENECK";

/// The non-linearity between the down- and up-projections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonLinearity {
    /// `max(0, x)`.
    #[default]
    Relu,
    /// GELU with the exact (erf) form, PyTorch's `F.gelu`.
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`).
    GeluNew,
    /// `x * sigmoid(x)` (adapter-hub's `swish`).
    #[serde(alias = "swish")]
    Silu,
    /// `tanh(x)`.
    Tanh,
}

impl NonLinearity {
    /// Applies the function elementwise.
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Relu => activation::relu(x),
            Self::Gelu => activation::gelu(x),
            Self::GeluNew => activation::gelu_approximate(x),
            Self::Silu => activation::silu(x),
            Self::Tanh => activation::tanh(x),
        }
    }
}

/// The adapter-hub layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Sequential, after the MLP only (Pfeiffer et al., 2021).
    #[serde(alias = "pfeiffer")]
    SeqBn,
    /// Sequential, after attention and after the MLP (Houlsby et al., 2019).
    #[serde(alias = "houlsby")]
    DoubleSeqBn,
    /// Parallel to the MLP, scaled (He et al., 2022).
    #[serde(alias = "parallel")]
    ParBn,
}

/// How the bottleneck weights start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitWeights {
    /// adapter-hub's `bert`: down-projection normal with std 0.02, biases and the
    /// up-projection zero.
    #[default]
    Bert,
    /// adapter-hub's `mam_adapter`: down-projection Kaiming-uniform (bound
    /// `1 / sqrt(d)`), biases and the up-projection zero.
    MamAdapter,
}

/// Writes whole floats as JSON integers (`"reduction_factor": 16`), as adapter-hub does.
fn whole_as_int<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn default_architecture() -> String {
    "bottleneck".into()
}
fn default_true() -> bool {
    true
}
fn default_reduction() -> f64 {
    16.0
}
fn default_scaling() -> f64 {
    1.0
}

/// The fields of a bottleneck adapter's `adapter_config.json` (adapter-hub's
/// `BnConfig` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BottleneckFields {
    /// Always `bottleneck`.
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// The layout's name, for readers; [`mh_adapter`](Self::mh_adapter),
    /// [`output_adapter`](Self::output_adapter) and [`is_parallel`](Self::is_parallel)
    /// decide, and must agree with it.
    #[serde(default)]
    pub layout: Option<Layout>,
    /// An adapter after the attention sublayer.
    #[serde(default)]
    pub mh_adapter: bool,
    /// An adapter after the MLP sublayer.
    #[serde(default = "default_true")]
    pub output_adapter: bool,
    /// Parallel (reads the sublayer's input) rather than sequential (reads its output).
    #[serde(default)]
    pub is_parallel: bool,
    /// Bottleneck width is `floor(hidden_size / reduction_factor)`.
    #[serde(default = "default_reduction", serialize_with = "whole_as_int")]
    pub reduction_factor: f64,
    /// The non-linearity.
    #[serde(default)]
    pub non_linearity: NonLinearity,
    /// The factor `s` on the adapter's output.
    #[serde(default = "default_scaling", serialize_with = "whole_as_int")]
    pub scaling: f64,
    /// Dropout on the adapter's output, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Layer indices that get no adapter.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// Initialisation of a fresh adapter.
    #[serde(default)]
    pub init_weights: InitWeights,
    /// The model's hidden width (written on save, checked on load).
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// The bottleneck width (written on save, checked on load).
    #[serde(default)]
    pub bottleneck_size: Option<usize>,
}

impl Default for BottleneckFields {
    fn default() -> Self {
        Self::seq_bn()
    }
}

impl BottleneckFields {
    fn base(layout: Layout) -> Self {
        Self {
            architecture: default_architecture(),
            layout: Some(layout),
            mh_adapter: false,
            output_adapter: true,
            is_parallel: false,
            reduction_factor: 16.0,
            non_linearity: NonLinearity::Relu,
            scaling: 1.0,
            dropout: 0.0,
            leave_out: vec![],
            init_weights: InitWeights::Bert,
            hidden_size: None,
            bottleneck_size: None,
        }
    }

    /// adapter-hub's `SeqBnConfig` (Pfeiffer): after the MLP, reduction 16, relu.
    pub fn seq_bn() -> Self {
        Self::base(Layout::SeqBn)
    }

    /// adapter-hub's `DoubleSeqBnConfig` (Houlsby): after attention and the MLP,
    /// reduction 16, swish (silu).
    pub fn double_seq_bn() -> Self {
        Self {
            mh_adapter: true,
            non_linearity: NonLinearity::Silu,
            ..Self::base(Layout::DoubleSeqBn)
        }
    }

    /// adapter-hub's `ParBnConfig`: parallel to the MLP, reduction 2, relu, scaling 4,
    /// `mam_adapter` initialisation.
    pub fn par_bn() -> Self {
        Self {
            is_parallel: true,
            reduction_factor: 2.0,
            scaling: 4.0,
            init_weights: InitWeights::MamAdapter,
            ..Self::base(Layout::ParBn)
        }
    }

    /// The defaults of a layout.
    pub fn for_layout(layout: Layout) -> Self {
        match layout {
            Layout::SeqBn => Self::seq_bn(),
            Layout::DoubleSeqBn => Self::double_seq_bn(),
            Layout::ParBn => Self::par_bn(),
        }
    }

    /// Sets the reduction factor.
    pub fn with_reduction_factor(mut self, r: f64) -> Self {
        self.reduction_factor = r;
        self
    }

    /// Sets the non-linearity.
    pub fn with_non_linearity(mut self, f: NonLinearity) -> Self {
        self.non_linearity = f;
        self
    }

    /// Sets the scaling factor.
    pub fn with_scaling(mut self, s: f64) -> Self {
        self.scaling = s;
        self
    }

    /// Sets the layers left without an adapter.
    pub fn with_leave_out(mut self, layers: Vec<usize>) -> Self {
        self.leave_out = layers;
        self
    }

    /// Sets the dropout probability.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// The bottleneck width for a hidden width: `floor(hidden / reduction_factor)`.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] when that is zero.
    pub fn bottleneck_width(&self, hidden: usize) -> Result<usize> {
        let w = (hidden as f64 / self.reduction_factor).floor();
        if w < 1.0 {
            return Err(PeftError::Unsupported(format!(
                "reduction_factor {} leaves no bottleneck for hidden size {hidden}; use a \
                 factor of at most {hidden}",
                self.reduction_factor
            )));
        }
        Ok(w as usize)
    }

    /// Whether a sublayer slot (`attn` or `mlp`) of layer `layer` gets an adapter.
    pub fn wants(&self, kind: SublayerKind, layer: Option<usize>) -> bool {
        if layer.is_some_and(|l| self.leave_out.contains(&l)) {
            return false;
        }
        match kind {
            SublayerKind::Attention => self.mh_adapter,
            SublayerKind::Mlp => self.output_adapter,
        }
    }
}

impl MethodConfig for BottleneckFields {
    const PEFT_TYPES: &'static [&'static str] = &[PEFT_TYPE];

    fn validate(&self) -> std::result::Result<(), String> {
        if self.architecture != "bottleneck" {
            return Err(format!(
                "`architecture` is {:?}; this crate reads bottleneck adapters only",
                self.architecture
            ));
        }
        if !(self.reduction_factor > 0.0 && self.reduction_factor.is_finite()) {
            return Err(format!(
                "`reduction_factor` must be positive, found {}",
                self.reduction_factor
            ));
        }
        if !self.scaling.is_finite() {
            return Err(format!("`scaling` must be finite, found {}", self.scaling));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "`dropout` must be in [0, 1), found {}",
                self.dropout
            ));
        }
        if !self.mh_adapter && !self.output_adapter {
            return Err("neither `mh_adapter` nor `output_adapter` is set: no adapter".into());
        }
        if let Some(layout) = self.layout {
            let expected = Self::for_layout(layout);
            if (
                expected.mh_adapter,
                expected.output_adapter,
                expected.is_parallel,
            ) != (self.mh_adapter, self.output_adapter, self.is_parallel)
            {
                return Err(format!(
                    "`layout` {layout:?} means mh_adapter={}, output_adapter={}, is_parallel={}, \
                     but the file says {}, {}, {}; fix one or drop `layout`",
                    expected.mh_adapter,
                    expected.output_adapter,
                    expected.is_parallel,
                    self.mh_adapter,
                    self.output_adapter,
                    self.is_parallel
                ));
            }
        }
        Ok(())
    }
}

/// Which sublayer a slot follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SublayerKind {
    /// The attention sublayer (`attn_adapter` slots).
    Attention,
    /// The MLP sublayer (`mlp_adapter` slots).
    Mlp,
}

/// One bottleneck adapter at one sublayer.
#[derive(Module, Debug)]
pub struct BottleneckAdapter<B: Backend> {
    /// `d -> d / reduction_factor`.
    pub down: Linear<B>,
    /// `d / reduction_factor -> d` (zero at initialisation).
    pub up: Linear<B>,
    /// Dropout on the adapter's output (active only with autodiff, in training).
    pub dropout: Dropout,
    /// The factor `s` on the adapter's output.
    pub scaling: f64,
    /// Reads the sublayer's input (parallel) rather than its output (sequential).
    pub parallel: bool,
    /// The non-linearity.
    #[module(skip)]
    pub non_linearity: NonLinearity,
}

impl<B: Backend> BottleneckAdapter<B> {
    /// A fresh adapter for hidden width `hidden`, initialised as `fields.init_weights`
    /// says; its up-projection is zero, so it starts as the identity.
    ///
    /// # Errors
    /// A reduction factor that leaves no bottleneck.
    pub fn new(hidden: usize, fields: &BottleneckFields, device: &B::Device) -> Result<Self> {
        let size = fields.bottleneck_width(hidden)?;
        let down_w = match fields.init_weights {
            InitWeights::Bert => {
                Tensor::random([size, hidden], Distribution::Normal(0.0, 0.02), device)
            }
            InitWeights::MamAdapter => {
                let bound = 1.0 / (hidden as f64).sqrt();
                Tensor::random([size, hidden], Distribution::Uniform(-bound, bound), device)
            }
        };
        Ok(Self::from_weights(
            down_w,
            Tensor::zeros([size], device),
            Tensor::zeros([hidden, size], device),
            Tensor::zeros([hidden], device),
            fields,
        ))
    }

    /// An adapter from weights in the Hugging Face layout: `down` `[size, hidden]`,
    /// `up` `[hidden, size]`.
    pub fn from_weights(
        down_weight: Tensor<B, 2>,
        down_bias: Tensor<B, 1>,
        up_weight: Tensor<B, 2>,
        up_bias: Tensor<B, 1>,
        fields: &BottleneckFields,
    ) -> Self {
        Self {
            down: Linear::from_dense(down_weight, Some(down_bias)),
            up: Linear::from_dense(up_weight, Some(up_bias)),
            dropout: DropoutConfig::new(fields.dropout).init(),
            scaling: fields.scaling,
            parallel: fields.is_parallel,
            non_linearity: fields.non_linearity,
        }
    }

    /// The bottleneck width.
    pub fn bottleneck_size(&self) -> usize {
        LinearWeight::<B>::out_features(&self.down)
    }

    /// The hidden width.
    pub fn hidden_size(&self) -> usize {
        LinearWeight::<B>::in_features(&self.down)
    }

    /// The tensors under their file names (`down.weight`, ...), Hugging Face layout.
    pub fn tensors(&self) -> Vec<(&'static str, TensorData)> {
        let bias = |l: &Linear<B>| {
            l.bias
                .as_ref()
                .map(|b| b.val().into_data())
                .unwrap_or_else(|| TensorData::new(vec![0.0f32; 0], [0]))
        };
        vec![
            ("down.weight", LinearWeight::weight(&self.down).into_data()),
            ("down.bias", bias(&self.down)),
            ("up.weight", LinearWeight::weight(&self.up).into_data()),
            ("up.bias", bias(&self.up)),
        ]
    }
}

impl<B: Backend> SublayerAdapter<B> for BottleneckAdapter<B> {
    fn forward(&self, input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = if self.parallel {
            input.clone()
        } else {
            output.clone()
        };
        let h = self.non_linearity.apply(self.down.forward(x));
        let delta = self.dropout.forward(self.up.forward(h) * self.scaling);
        output + delta
    }
}

/// The slot type after a sublayer holding named bottleneck adapters.
pub type BottleneckSlot<B> = AdapterSet<B, BottleneckAdapter<B>>;

/// A sublayer adapter slot that holds a [`BottleneckSlot`]: the slot itself, or a pair
/// whose second half is one.
pub trait BottleneckSlots<B: Backend> {
    /// The bottleneck adapters of this slot.
    fn bottleneck(&self) -> &BottleneckSlot<B>;
    /// The bottleneck adapters of this slot, mutably.
    fn bottleneck_mut(&mut self) -> &mut BottleneckSlot<B>;
}

impl<B: Backend> BottleneckSlots<B> for BottleneckSlot<B> {
    fn bottleneck(&self) -> &BottleneckSlot<B> {
        self
    }
    fn bottleneck_mut(&mut self) -> &mut BottleneckSlot<B> {
        self
    }
}

impl<B: Backend, A> BottleneckSlots<B> for (A, BottleneckSlot<B>) {
    fn bottleneck(&self) -> &BottleneckSlot<B> {
        &self.1
    }
    fn bottleneck_mut(&mut self) -> &mut BottleneckSlot<B> {
        &mut self.1
    }
}

/// A sublayer slot of a model, as the bottleneck functions see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSite {
    /// The slot's path (`model.layers.0.mlp_adapter`).
    pub slot: String,
    /// The sublayer module it follows (`model.layers.0.mlp`), the prefix of its file keys.
    pub module: String,
    /// Attention or MLP.
    pub kind: SublayerKind,
    /// The decoder layer index.
    pub layer: Option<usize>,
    /// The hidden width: the input width of the first linear layer under `module`.
    pub hidden: Option<usize>,
}

impl SlotSite {
    /// The file key of tensor `name` (`down.weight`, ...) of this site.
    pub fn key(&self, name: &str) -> String {
        format!("{}.adapter.{name}", self.module)
    }
}

/// Where a model's sublayer slots are. Slot paths end in `attn_adapter` or `mlp_adapter`
/// (the convention of `peft-models`); the sublayer module is the sibling `self_attn`,
/// `attn` or `attention` (attention) or `mlp` (MLP) found among the model's modules.
///
/// # Errors
/// A slot whose name is neither `attn_adapter` nor `mlp_adapter`.
pub fn sites<B: Backend, M: AdaptableModel<B> + Clone>(model: &M) -> Result<Vec<SlotSite>> {
    let modules: Vec<ModuleInfo> = model.modules();
    let mut linears: Vec<(String, usize)> = Vec::new();
    model.visit_linears(&mut |path, l| linears.push((path.to_string(), l.base.in_features())));
    let mut slots = Vec::new();
    // map_sublayers needs `&mut`; a clone of a burn module shares its tensors, so it is cheap.
    model.clone().map_sublayers(&mut |path, _| {
        slots.push(path.to_string());
        Ok(())
    })?;
    slots
        .into_iter()
        .map(|slot| {
            let (prefix, last) = slot.rsplit_once('.').unwrap_or(("", slot.as_str()));
            let (kind, candidates): (SublayerKind, &[&str]) = match last {
                "attn_adapter" => (SublayerKind::Attention, &["self_attn", "attn", "attention"]),
                "mlp_adapter" => (SublayerKind::Mlp, &["mlp"]),
                other => {
                    return Err(PeftError::Unsupported(format!(
                        "sublayer slot `{slot}` ends in `{other}`; expected `attn_adapter` or \
                         `mlp_adapter`"
                    )));
                }
            };
            let join = |n: &str| {
                if prefix.is_empty() {
                    n.to_string()
                } else {
                    format!("{prefix}.{n}")
                }
            };
            let module = candidates
                .iter()
                .map(|c| join(c))
                .find(|p| modules.iter().any(|m| &m.path == p))
                .unwrap_or_else(|| slot.clone());
            let layer = slot.split('.').find_map(|s| s.parse::<usize>().ok());
            let under = format!("{module}.");
            let hidden = linears
                .iter()
                .find(|(p, _)| p.starts_with(&under))
                .map(|(_, w)| *w);
            Ok(SlotSite {
                slot,
                module,
                kind,
                layer,
                hidden,
            })
        })
        .collect()
}

fn hidden_of(site: &SlotSite, fields: &BottleneckFields) -> Result<usize> {
    match (site.hidden, fields.hidden_size) {
        (Some(h), Some(f)) if h != f => Err(PeftError::Unsupported(format!(
            "the adapter is for hidden size {f}, but `{}` has hidden size {h}; it was made for \
             another base model",
            site.module
        ))),
        (Some(h), _) | (None, Some(h)) => Ok(h),
        (None, None) => Err(PeftError::Unsupported(format!(
            "cannot tell the hidden size at `{}`; set `hidden_size` in the config",
            site.slot
        ))),
    }
}

fn check_some(placed: &[String]) -> Result<()> {
    if placed.is_empty() {
        return Err(PeftError::Unsupported(
            "the config places no adapter in this model (no sublayer slot, or every layer is in \
             leave_out); use a model type with bottleneck slots such as \
             peft_adapter::BottleneckLlama"
                .into(),
        ));
    }
    Ok(())
}

/// Adds a fresh bottleneck adapter named `name` at the sublayers `fields` selects.
/// Returns the slot paths that received it.
///
/// # Errors
/// An invalid config, a name already taken, a model with no matching slot.
pub fn add_adapter<B, M>(
    model: &mut M,
    name: &str,
    fields: &BottleneckFields,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: AdaptableModel<B> + Clone,
    M::Sublayer: BottleneckSlots<B>,
{
    fields.validate().map_err(PeftError::Unsupported)?;
    let sites = sites(model)?;
    let mut done = Vec::new();
    model.map_sublayers(&mut |path, slot| {
        let Some(site) = sites.iter().find(|s| s.slot == path) else {
            return Ok(());
        };
        if !fields.wants(site.kind, site.layer) {
            return Ok(());
        }
        let adapter = BottleneckAdapter::new(hidden_of(site, fields)?, fields, device)?;
        slot.bottleneck_mut().insert(name, adapter)?;
        done.push(path.to_string());
        Ok(())
    })?;
    check_some(&done)?;
    Ok(done)
}

/// Loads a bottleneck adapter saved by [`save_adapter`] (the layout of docs/adapters.md)
/// under `name`. Returns the slot paths that received it.
///
/// # Errors
/// An unreadable or invalid config, a `peft_type` other than `BOTTLENECK`, a missing,
/// unexpected or mis-shaped tensor (naming the key and both shapes).
pub fn load_adapter<B, M>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<Vec<String>>
where
    B: Backend,
    M: AdaptableModel<B> + Clone,
    M::Sublayer: BottleneckSlots<B>,
{
    let cfg = AdapterConfig::<BottleneckFields>::load(dir)?;
    let fields = &cfg.method;
    let sites = sites(model)?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?
        .with_base_model(cfg.common.base_model_name_or_path.as_deref());
    let mut done = Vec::new();
    model.map_sublayers(&mut |path, slot| {
        let Some(site) = sites.iter().find(|s| s.slot == path) else {
            return Ok(());
        };
        if !fields.wants(site.kind, site.layer) {
            return Ok(());
        }
        let hidden = hidden_of(site, fields)?;
        let size = match fields.bottleneck_size {
            Some(s) => s,
            None => fields.bottleneck_width(hidden)?,
        };
        let hint = format!("with hidden size {hidden} and bottleneck size {size}");
        let key = |n: &str| site.key(n);
        let down_w = take(
            &mut file,
            &key("down.weight"),
            [size, hidden],
            &hint,
            device,
        )?;
        let down_b = take(&mut file, &key("down.bias"), [size], &hint, device)?;
        let up_w = take(&mut file, &key("up.weight"), [hidden, size], &hint, device)?;
        let up_b = take(&mut file, &key("up.bias"), [hidden], &hint, device)?;
        let adapter = BottleneckAdapter::from_weights(down_w, down_b, up_w, up_b, fields);
        slot.bottleneck_mut().insert(name, adapter)?;
        done.push(path.to_string());
        Ok(())
    })?;
    check_some(&done)?;
    file.finish()?;
    Ok(done)
}

fn take<B: Backend, const D: usize>(
    file: &mut TensorFile,
    key: &str,
    shape: [usize; D],
    hint: &str,
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    Ok(Tensor::from_data(file.take(key, &shape, hint)?, device))
}

/// Saves the adapter `name` into `dir` (created if needed): `adapter_config.json` from
/// `config` (with `hidden_size` and `bottleneck_size` filled in) and
/// `adapter_model.safetensors` with `<sublayer path>.adapter.{down,up}.{weight,bias}`.
///
/// # Errors
/// [`PeftError::Adapter`] if no slot holds `name`; I/O errors.
pub fn save_adapter<B, M>(
    model: &M,
    name: &str,
    config: &AdapterConfig<BottleneckFields>,
    dir: &Path,
) -> Result<PathBuf>
where
    B: Backend,
    M: AdaptableModel<B> + Clone,
    M::Sublayer: BottleneckSlots<B>,
{
    let sites = sites(model)?;
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    let mut sizes = None;
    model.clone().map_sublayers(&mut |path, slot| {
        let (Some(a), Some(site)) = (
            slot.bottleneck().get(name),
            sites.iter().find(|s| s.slot == path),
        ) else {
            return Ok(());
        };
        sizes = Some((a.hidden_size(), a.bottleneck_size()));
        for (n, data) in a.tensors() {
            tensors.push((site.key(n), data));
        }
        Ok(())
    })?;
    let Some((hidden, size)) = sizes else {
        return Err(PeftError::Adapter(format!(
            "no sublayer holds a bottleneck adapter named `{name}`"
        )));
    };
    let mut config = config.clone();
    config.method.hidden_size = Some(hidden);
    config.method.bottleneck_size = Some(size);
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io("create directory", dir, e))?;
    TensorFile::write(dir.join(WEIGHTS_FILE), tensors)?;
    config.save(dir)?;
    Ok(dir.to_path_buf())
}
