//! `adapter_config.json`: peft's config file, field for field.
//!
//! [`AdapterConfig<C>`] is one file: the fields every peft config has ([`CommonFields`]),
//! the method's fields `C` (a [`MethodConfig`]: [`LoraFields`], [`Ia3Fields`],
//! [`PromptTuningFields`], [`PrefixTuningFields`], [`PromptEncoderFields`], or a user's own),
//! and every other field found in the file, kept as it was and written back on save.
//!
//! - A field this build does not know is kept and reported with a `tracing` warning.
//! - A field peft knows that changes the computation in a way this build cannot honour
//!   (LoRA's `use_qalora`, `layer_replication`, ...) is an error when set.
//! - A `peft_type` the method does not handle is an error that lists what is handled.
//!
//! ```
//! use peft_core::config::{AdapterConfig, LoraFields};
//!
//! let json = r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32,
//!                "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}"#;
//! let cfg = AdapterConfig::<LoraFields>::from_json_str(json).unwrap();
//! assert_eq!(cfg.method.r, 16);
//! assert_eq!(cfg.method.scaling(16, 32.0), 2.0);
//! ```

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{PeftError, Result};
use crate::target::{LayerIndices, PatternMap, TargetSpec, Targets};

/// File name of the config in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The fields of every peft config (`PeftConfigMixin` and `PeftConfig`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommonFields {
    /// `LORA`, `IA3`, `PROMPT_TUNING`, ...
    pub peft_type: String,
    /// `CAUSAL_LM`, `SEQ_CLS`, ... or null.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// Whether the adapter was saved for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// transformers' auto-class mapping (kept as is).
    #[serde(default)]
    pub auto_mapping: Option<Value>,
    /// The peft version that wrote the file.
    #[serde(default)]
    pub peft_version: Option<String>,
}

/// The method-specific part of `adapter_config.json`.
pub trait MethodConfig: Serialize + DeserializeOwned + Clone + Debug {
    /// The `peft_type` values this config reads; the first is written.
    const PEFT_TYPES: &'static [&'static str];
    /// Fields peft writes that this build accepts without acting on them (they only matter
    /// at initialisation in peft, or only for other integrations).
    const PASSIVE_FIELDS: &'static [&'static str] = &[];
    /// Fields that change the computation in ways this build cannot honour: loading fails
    /// when one is set to anything but null, false, 0 or empty.
    const UNSUPPORTED_FIELDS: &'static [&'static str] = &[];

    /// Checks values after parsing.
    ///
    /// # Errors
    /// [`PeftError::InvalidConfig`] with a message for the user (`path` is filled in by
    /// the caller).
    fn validate(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// One `adapter_config.json`: common fields, method fields and everything else.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig<C> {
    /// Fields every peft config has.
    pub common: CommonFields,
    /// The method's fields.
    pub method: C,
    /// Fields neither part knows, kept in file order and written back on save.
    pub extra: Map<String, Value>,
}

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
    }
}

fn keys_of<T: Serialize>(value: &T) -> BTreeSet<String> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

impl<C: MethodConfig> AdapterConfig<C> {
    /// A new config for this method.
    pub fn new(method: C) -> Self {
        Self {
            common: CommonFields {
                peft_type: C::PEFT_TYPES[0].to_string(),
                ..CommonFields::default()
            },
            method,
            extra: Map::new(),
        }
    }

    /// Sets `task_type` (`CAUSAL_LM`, `SEQ_CLS`, ...).
    pub fn with_task_type(mut self, task: impl Into<String>) -> Self {
        self.common.task_type = Some(task.into());
        self
    }

    /// Sets `base_model_name_or_path`.
    pub fn with_base_model(mut self, base: impl Into<String>) -> Self {
        self.common.base_model_name_or_path = Some(base.into());
        self
    }

    /// Parses a config from JSON text.
    ///
    /// # Errors
    /// [`PeftError::InvalidConfig`] or [`PeftError::UnsupportedPeftType`].
    pub fn from_json_str(json: &str) -> Result<Self> {
        Self::parse(json, Path::new("<memory>"))
    }

    /// Reads `adapter_config.json` from a file, or from a directory holding one.
    ///
    /// # Errors
    /// [`PeftError::Io`], [`PeftError::InvalidConfig`] or [`PeftError::UnsupportedPeftType`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = config_path(path.as_ref());
        let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io("read", &path, e))?;
        Self::parse(&text, &path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let invalid = |message: String| PeftError::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(invalid("the file must hold a JSON object".into()));
        };
        let peft_type = match object.get("peft_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(invalid(format!(
                    "`peft_type` must be a string, found {other}"
                )));
            }
            None => return Err(invalid("the `peft_type` field is missing".into())),
        };
        if !C::PEFT_TYPES
            .iter()
            .any(|t| t.eq_ignore_ascii_case(&peft_type))
        {
            return Err(PeftError::UnsupportedPeftType {
                found: peft_type,
                context: format!(" in `{}`", path.display()),
                supported: C::PEFT_TYPES.join(", "),
            });
        }
        let common: CommonFields = serde_json::from_value(Value::Object(object.clone()))
            .map_err(|e| invalid(e.to_string()))?;
        let method: C = serde_json::from_value(Value::Object(object.clone()))
            .map_err(|e| invalid(e.to_string()))?;
        method.validate().map_err(invalid)?;
        let mut known = keys_of(&common);
        known.extend(keys_of(&method));
        let mut extra = Map::new();
        let mut unknown = Vec::new();
        for (k, v) in object {
            if known.contains(&k) {
                continue;
            }
            if C::UNSUPPORTED_FIELDS.contains(&k.as_str()) && !is_unset(&v) {
                return Err(invalid(format!(
                    "`{k}` is set to {v}, which this build does not support; \
                     use an adapter without it"
                )));
            }
            if !C::PASSIVE_FIELDS.contains(&k.as_str())
                && !C::UNSUPPORTED_FIELDS.contains(&k.as_str())
            {
                unknown.push(k.clone());
            }
            extra.insert(k, v);
        }
        if !unknown.is_empty() {
            tracing::warn!(
                "{}: unknown field(s) {} kept as they are but not used",
                path.display(),
                unknown.join(", ")
            );
        }
        Ok(Self {
            common,
            method,
            extra,
        })
    }

    /// The config as a JSON object, in peft's field names.
    pub fn to_json_value(&self) -> Value {
        let mut out = Map::new();
        for part in [
            serde_json::to_value(&self.common),
            serde_json::to_value(&self.method),
        ] {
            if let Ok(Value::Object(m)) = part {
                out.extend(m);
            }
        }
        for (k, v) in &self.extra {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(out)
    }

    /// The config as pretty-printed JSON.
    pub fn to_json_string(&self) -> String {
        // Serialising a `Value` cannot fail.
        serde_json::to_string_pretty(&self.to_json_value()).unwrap_or_default()
    }

    /// Writes `adapter_config.json` into `dir` (atomically: a temporary file, then a rename).
    ///
    /// # Errors
    /// [`PeftError::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        let path = dir.as_ref().join(CONFIG_FILE);
        crate::format::write_atomic(&path, self.to_json_string().as_bytes())?;
        Ok(path)
    }
}

fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CONFIG_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Reads only `peft_type` from a config file or adapter directory.
///
/// # Errors
/// [`PeftError::Io`] or [`PeftError::InvalidConfig`].
pub fn read_peft_type(path: impl AsRef<Path>) -> Result<String> {
    let path = config_path(path.as_ref());
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io("read", &path, e))?;
    peft_type_of(&text, &path)
}

fn peft_type_of(text: &str, path: &Path) -> Result<String> {
    let v: Value = serde_json::from_str(text).map_err(|e| PeftError::InvalidConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    v.get("peft_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| PeftError::InvalidConfig {
            path: path.to_path_buf(),
            message: "the `peft_type` field is missing (or is not a string)".into(),
        })
}

/// `bias` of a LoRA config: which biases train and are saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// The biases of the adapted layers train.
    LoraOnly,
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (random, not a no-op),
/// or a named scheme (`"gaussian"`, `"pissa"`, `"pissa_niter_N"`, `"olora"`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named scheme.
    Scheme(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        Self::Bool(true)
    }
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// Writes whole floats as JSON integers, as Python writes `lora_alpha=16`, so a file read
/// and written back keeps its values exactly.
mod number {
    use serde::Serializer;
    use serde::ser::SerializeMap;

    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
    pub(super) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.fract() == 0.0 && v.abs() < EXACT {
            s.serialize_i64(*v as i64)
        } else {
            s.serialize_f64(*v)
        }
    }

    pub(super) fn serialize_map<S: Serializer>(
        m: &super::OrderedPatterns<f64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        struct Num(f64);
        impl serde::Serialize for Num {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serialize(&self.0, s)
            }
        }
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            map.serialize_entry(k, &Num(*v))?;
        }
        map.end()
    }
}

/// An ordered `name pattern -> value` map, as peft's `rank_pattern` / `alpha_pattern`
/// (a JSON object whose order matters: the first matching key wins).
pub type OrderedPatterns<V> = indexmap::IndexMap<String, V>;

/// The fields of peft's `LoraConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraFields {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Modules to adapt.
    #[serde(default)]
    pub target_modules: Option<Targets>,
    /// Modules never to adapt.
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    /// Scaling numerator: the delta is scaled by `lora_alpha / r` (`/ sqrt(r)` with rsLoRA).
    #[serde(default = "default_alpha", serialize_with = "number::serialize")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA path's input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Whether the base layer stores its weight `[in, out]` (GPT-2's Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train.
    #[serde(default)]
    pub bias: LoraBias,
    /// rsLoRA: scale by `lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained and saved in full (heads).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Initialisation scheme.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Restrict targets to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The layer container's name, for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<Targets>,
    /// Per-module ranks (regex key, matched at the end of the path).
    #[serde(default)]
    pub rank_pattern: OrderedPatterns<usize>,
    /// Per-module alphas (regex key, matched at the end of the path).
    #[serde(default, serialize_with = "number::serialize_map")]
    pub alpha_pattern: OrderedPatterns<f64>,
    /// DoRA: weight-decomposed LoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// A trainable bias on `lora_B`.
    #[serde(default)]
    pub lora_bias: bool,
}

impl Default for LoraFields {
    fn default() -> Self {
        Self {
            r: default_r(),
            target_modules: None,
            exclude_modules: None,
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: LoraBias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::default(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: OrderedPatterns::new(),
            alpha_pattern: OrderedPatterns::new(),
            use_dora: false,
            lora_bias: false,
        }
    }
}

impl LoraFields {
    /// The target-selection part of this config.
    pub fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            modules_to_save: self.modules_to_save.clone(),
        }
    }

    /// The compiled `rank_pattern`.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`].
    pub fn rank_patterns(&self) -> Result<PatternMap<usize>> {
        PatternMap::new(
            "rank_pattern",
            self.rank_pattern.iter().map(|(k, v)| (k.clone(), *v)),
        )
    }

    /// The compiled `alpha_pattern`.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`].
    pub fn alpha_patterns(&self) -> Result<PatternMap<f64>> {
        PatternMap::new(
            "alpha_pattern",
            self.alpha_pattern.iter().map(|(k, v)| (k.clone(), *v)),
        )
    }

    /// The scaling factor for a rank and alpha: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Rank and alpha of the module at `path`, after `rank_pattern` / `alpha_pattern`.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`].
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = self.rank_patterns()?.get(path).unwrap_or(self.r);
        let alpha = self.alpha_patterns()?.get(path).unwrap_or(self.lora_alpha);
        Ok((r, alpha))
    }
}

impl MethodConfig for LoraFields {
    const PEFT_TYPES: &'static [&'static str] = &["LORA"];
    const PASSIVE_FIELDS: &'static [&'static str] = &[
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "ensure_weight_tying",
    ];
    const UNSUPPORTED_FIELDS: &'static [&'static str] = &[
        "trainable_token_indices",
        "velora_config",
        "alora_invocation_tokens",
        "use_qalora",
        "monteclora_config",
        "layer_replication",
        "target_parameters",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
    ];

    fn validate(&self) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err("`r` must be a positive integer".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "`lora_dropout` must be in [0, 1), found {}",
                self.lora_dropout
            ));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, v)| **v == 0) {
            return Err(format!("`rank_pattern` gives rank 0 to `{k}`"));
        }
        if self.use_dora && self.lora_bias {
            return Err("`use_dora` and `lora_bias` cannot be combined (as in peft)".into());
        }
        Ok(())
    }
}

/// The fields of peft's `IA3Config`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ia3Fields {
    /// Modules to adapt.
    #[serde(default)]
    pub target_modules: Option<Targets>,
    /// Modules never to adapt.
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    /// Targets whose *input* is scaled (feed-forward layers) rather than their output.
    #[serde(default)]
    pub feedforward_modules: Option<Targets>,
    /// Whether the base layer stores its weight `[in, out]` (GPT-2's Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained and saved in full.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Initialise the vectors to ones (a no-op adapter).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
}

fn default_true() -> bool {
    true
}

impl Ia3Fields {
    /// The target-selection part of this config.
    pub fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            ..TargetSpec::default()
        }
    }
}

impl MethodConfig for Ia3Fields {
    const PEFT_TYPES: &'static [&'static str] = &["IA3"];
}

/// Fields shared by peft's prompt-learning configs (`PromptLearningConfig`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningFields {
    /// Number of virtual tokens.
    #[serde(default)]
    pub num_virtual_tokens: Option<usize>,
    /// Hidden size of the base model.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// Number of transformer submodules (1 for decoder-only models).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Number of attention heads of the base model.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Number of layers of the base model.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Modules trained and saved in full.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// The fields of peft's `PromptTuningConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningFields {
    /// Shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// `RANDOM`, `TEXT` or `SAMPLE_VOCAB`.
    #[serde(default = "default_prompt_init")]
    pub prompt_tuning_init: String,
    /// The text whose embeddings initialise the prompt (with `TEXT`).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer for `prompt_tuning_init_text`.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Tokenizer keyword arguments (kept as is).
    #[serde(default)]
    pub tokenizer_kwargs: Option<Value>,
}

fn default_prompt_init() -> String {
    "RANDOM".into()
}

impl MethodConfig for PromptTuningFields {
    const PEFT_TYPES: &'static [&'static str] = &["PROMPT_TUNING"];
}

/// The fields of peft's `PrefixTuningConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningFields {
    /// Shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// Hidden size of the reparameterisation MLP.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Whether keys and values come from a reparameterisation MLP.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Initialisation (kept as is).
    #[serde(default)]
    pub init_weights: Option<Value>,
}

impl MethodConfig for PrefixTuningFields {
    const PEFT_TYPES: &'static [&'static str] = &["PREFIX_TUNING"];
}

/// The fields of peft's `PromptEncoderConfig` (P-tuning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptEncoderFields {
    /// Shared prompt-learning fields.
    #[serde(flatten)]
    pub prompt: PromptLearningFields,
    /// `MLP` or `LSTM`.
    #[serde(default = "default_encoder_type")]
    pub encoder_reparameterization_type: String,
    /// Hidden size of the prompt encoder.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Number of encoder layers.
    #[serde(default = "default_encoder_layers")]
    pub encoder_num_layers: usize,
    /// Dropout in the encoder.
    #[serde(default)]
    pub encoder_dropout: f64,
}

fn default_encoder_type() -> String {
    "MLP".into()
}

fn default_encoder_layers() -> usize {
    2
}

impl MethodConfig for PromptEncoderFields {
    const PEFT_TYPES: &'static [&'static str] = &["P_TUNING"];
}

/// Any adapter config this build reads, dispatched on `peft_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyAdapterConfig {
    /// `LORA`.
    Lora(AdapterConfig<LoraFields>),
    /// `IA3`.
    Ia3(AdapterConfig<Ia3Fields>),
    /// `PROMPT_TUNING`.
    PromptTuning(AdapterConfig<PromptTuningFields>),
    /// `PREFIX_TUNING`.
    PrefixTuning(AdapterConfig<PrefixTuningFields>),
    /// `P_TUNING`.
    PromptEncoder(AdapterConfig<PromptEncoderFields>),
}

impl AnyAdapterConfig {
    /// The `peft_type` values this build reads.
    pub const SUPPORTED: &'static [&'static str] =
        &["LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"];

    /// Reads `adapter_config.json` (a file or an adapter directory) of any supported type.
    ///
    /// # Errors
    /// [`PeftError::UnsupportedPeftType`] for another type; otherwise as
    /// [`AdapterConfig::load`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = config_path(path.as_ref());
        let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io("read", &path, e))?;
        Self::parse(&text, &path)
    }

    /// Parses a config of any supported type from JSON text.
    ///
    /// # Errors
    /// As [`AnyAdapterConfig::load`], less the I/O errors.
    pub fn from_json_str(json: &str) -> Result<Self> {
        Self::parse(json, Path::new("<memory>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let peft_type = peft_type_of(text, path)?;
        Ok(match peft_type.to_ascii_uppercase().as_str() {
            "LORA" => Self::Lora(AdapterConfig::parse(text, path)?),
            "IA3" => Self::Ia3(AdapterConfig::parse(text, path)?),
            "PROMPT_TUNING" => Self::PromptTuning(AdapterConfig::parse(text, path)?),
            "PREFIX_TUNING" => Self::PrefixTuning(AdapterConfig::parse(text, path)?),
            "P_TUNING" => Self::PromptEncoder(AdapterConfig::parse(text, path)?),
            _ => {
                return Err(PeftError::UnsupportedPeftType {
                    found: peft_type,
                    context: format!(" in `{}`", path.display()),
                    supported: Self::SUPPORTED.join(", "),
                });
            }
        })
    }

    /// The common fields.
    pub fn common(&self) -> &CommonFields {
        match self {
            Self::Lora(c) => &c.common,
            Self::Ia3(c) => &c.common,
            Self::PromptTuning(c) => &c.common,
            Self::PrefixTuning(c) => &c.common,
            Self::PromptEncoder(c) => &c.common,
        }
    }
}
