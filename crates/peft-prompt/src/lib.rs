//! # peft-prompt
//!
//! Prompt-learning methods, computing what Python's peft computes and reading and writing
//! its files:
//!
//! - **Prompt tuning** (Lester et al., 2021, <https://arxiv.org/abs/2104.08691>): `n`
//!   learned embeddings `P: [n, d]` are prepended to the input embeddings,
//!   `h_0 = [P; E(x)]`. Initialised at random (`N(0, 1)`), from the embeddings of a text
//!   (`TEXT`: its token ids repeated, then cut, to `n`) or of `n` random vocabulary rows
//!   (`SAMPLE_VOCAB`), as peft does.
//! - **P-tuning** (Liu et al., 2021, <https://arxiv.org/abs/2103.10385>): the virtual tokens
//!   are `f(P)`, a prompt encoder `f` (an MLP, or a bidirectional LSTM and an MLP) applied
//!   to learned embeddings.
//! - **Prefix tuning** (Li & Liang, 2021, <https://arxiv.org/abs/2101.00190>): every
//!   attention layer `l` attends to `n` learned keys and values before the sequence's own,
//!   `softmax(q [K_l; K] ^T / sqrt(d)) [V_l; V]`, taken from a table or from a
//!   reparameterisation MLP (`prefix_projection`). With grouped-query attention the prefix
//!   has the key/value heads' width, as in peft.
//!
//! The virtual tokens live in the model's embedding slot ([`PromptSlot`]) and the prefixes
//! in its key/value slot ([`PrefixSlot`]); both compose with LoRA on the linear layers
//! ([`LoraPromptLlama`]). The logits a model returns are those of the input's own
//! positions; the virtual positions are dropped. Generation with the KV cache and padded
//! batches work as in peft: virtual tokens enter the cache once, prefixes are prepended on
//! every step, the attention mask covers them, and the positions of the real tokens start
//! after the prefix.
//!
//! Files are peft's: `adapter_config.json` with its prompt-learning fields
//! ([`PromptConfig`]) and `adapter_model.safetensors` holding only `prompt_embeddings`, the
//! *final* virtual tokens (`[n, d]`) or the flattened prefix (`[n, layers * 2 * kv_dim]`):
//! P-tuning's encoder and the prefix projection are not saved, so a loaded adapter is a
//! plain table, exactly as peft loads it.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use peft_core::config::{AdapterConfig, PromptTuningFields};
//! use peft_models::{CausalLm, ForwardInput};
//! use peft_prompt::{PromptConfig, PromptLearningLlama, add_adapter, load_adapter, save_adapter};
//!
//! let device = Default::default();
//! let dir = std::path::Path::new("my-llama");
//! let mut model: PromptLearningLlama<NdArray> = peft_models::load_llama(dir, &device)?;
//!
//! // A new prompt-tuning adapter of 20 virtual tokens, initialised from a text.
//! let mut fields = PromptTuningFields::default();
//! fields.prompt.num_virtual_tokens = Some(20);
//! fields.prompt_tuning_init = "TEXT".into();
//! fields.prompt_tuning_init_text = Some("Classify the sentiment:".into());
//! fields.tokenizer_name_or_path = Some(dir.display().to_string());
//! let config = PromptConfig::PromptTuning(AdapterConfig::new(fields));
//! let config = add_adapter(&mut model, "default", &config, None, &device)?;
//! save_adapter(&model, "default", &config, "my-prompt".as_ref())?;
//!
//! // An adapter saved by Python's peft (prompt tuning, P-tuning or prefix tuning).
//! let mut model: PromptLearningLlama<NdArray> = peft_models::load_llama(dir, &device)?;
//! load_adapter(&mut model, "their-prefix".as_ref(), "default", &device)?;
//! let ids = burn::tensor::Tensor::from_ints([[1, 2, 3]], &device);
//! let logits = model.forward(ForwardInput::new(ids), None); // [1, 3, vocab]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use peft_core::adapters::{AdaptedLinear, AdapterSet};
use peft_core::config::{
    AdapterConfig, AnyAdapterConfig, PrefixTuningFields, PromptEncoderFields, PromptLearningFields,
    PromptTuningFields,
};
use peft_core::format::{TensorFile, WEIGHTS_FILE};
use peft_core::inject::{EmbeddingAdapter, KvAdapter, LinearWeight, NoAdapter, SublayerAdapter};
use peft_core::model::AdaptableModel;
use peft_core::trainable::AdapterOnly;
use peft_core::{PeftError, Result};
use peft_lora::LoraSlot;
use peft_models::llama::LlamaForCausalLM;
use peft_models::tokenizer::Tokenizer;

mod encoder;

pub use encoder::{Lstm, LstmCell, PrefixEncoder, PromptEncoder};

/// The key of the learned tensor in `adapter_model.safetensors`.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The embedding slot holding named prompt-tuning / P-tuning adapters.
pub type PromptSlot<B> = AdapterSet<B, PromptEncoder<B>>;

/// The key/value slot holding named prefix-tuning adapters.
pub type PrefixSlot<B> = AdapterSet<B, PrefixEncoder<B>>;

type DenseLinear<B, A> = AdaptedLinear<B, burn::nn::Linear<B>, A>;

/// A Llama-family model with a prompt slot (prompt tuning, P-tuning).
pub type PromptLlama<B> =
    LlamaForCausalLM<B, DenseLinear<B, NoAdapter>, NoAdapter, PromptSlot<B>, NoAdapter>;

/// A Llama-family model with a prefix slot (prefix tuning).
pub type PrefixLlama<B> =
    LlamaForCausalLM<B, DenseLinear<B, NoAdapter>, NoAdapter, NoAdapter, PrefixSlot<B>>;

/// A Llama-family model with both slots: any of the three methods.
pub type PromptLearningLlama<B> =
    LlamaForCausalLM<B, DenseLinear<B, NoAdapter>, NoAdapter, PromptSlot<B>, PrefixSlot<B>>;

/// A Llama-family model with LoRA slots on every linear layer (use `peft_lora::add_adapter`
/// / `load_adapter` / `save_adapter` for them) and both prompt-learning slots.
pub type LoraPromptLlama<B> =
    LlamaForCausalLM<B, DenseLinear<B, LoraSlot<B>>, NoAdapter, PromptSlot<B>, PrefixSlot<B>>;

/// The shapes of a model that prompt learning needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptDims {
    /// Width of the token embeddings.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

impl PromptDims {
    /// Width of one layer's keys (or values): `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// An embedding slot type that may hold prompt adapters ([`PromptSlot`]) or not
/// ([`NoAdapter`]).
pub trait PromptSlotAccess<B: Backend> {
    /// The prompt adapters, when this slot holds them.
    fn prompt_slot(&self) -> Option<&PromptSlot<B>>;
    /// The prompt adapters, mutably.
    fn prompt_slot_mut(&mut self) -> Option<&mut PromptSlot<B>>;
}

/// A key/value slot type that may hold prefix adapters ([`PrefixSlot`]) or not
/// ([`NoAdapter`]).
pub trait PrefixSlotAccess<B: Backend> {
    /// The prefix adapters, when this slot holds them.
    fn prefix_slot(&self) -> Option<&PrefixSlot<B>>;
    /// The prefix adapters, mutably.
    fn prefix_slot_mut(&mut self) -> Option<&mut PrefixSlot<B>>;
}

impl<B: Backend> PromptSlotAccess<B> for NoAdapter {
    fn prompt_slot(&self) -> Option<&PromptSlot<B>> {
        None
    }
    fn prompt_slot_mut(&mut self) -> Option<&mut PromptSlot<B>> {
        None
    }
}

impl<B: Backend> PromptSlotAccess<B> for PromptSlot<B> {
    fn prompt_slot(&self) -> Option<&PromptSlot<B>> {
        Some(self)
    }
    fn prompt_slot_mut(&mut self) -> Option<&mut PromptSlot<B>> {
        Some(self)
    }
}

impl<B: Backend> PrefixSlotAccess<B> for NoAdapter {
    fn prefix_slot(&self) -> Option<&PrefixSlot<B>> {
        None
    }
    fn prefix_slot_mut(&mut self) -> Option<&mut PrefixSlot<B>> {
        None
    }
}

impl<B: Backend> PrefixSlotAccess<B> for PrefixSlot<B> {
    fn prefix_slot(&self) -> Option<&PrefixSlot<B>> {
        Some(self)
    }
    fn prefix_slot_mut(&mut self) -> Option<&mut PrefixSlot<B>> {
        Some(self)
    }
}

/// What prompt learning needs from a model: its shapes, its word embeddings (for `TEXT`
/// and `SAMPLE_VOCAB` initialisation) and its prompt and prefix slots, when it has them.
pub trait PromptModel<B: Backend>: AdaptableModel<B> {
    /// The model's shapes.
    fn prompt_dims(&self) -> PromptDims;
    /// The word-embedding table `[vocab, d]`, detached.
    fn word_embeddings(&self) -> Tensor<B, 2>;
    /// The prompt adapters, when the model has a [`PromptSlot`].
    fn prompt_slot(&self) -> Option<&PromptSlot<B>>;
    /// The prompt adapters, mutably.
    fn prompt_slot_mut(&mut self) -> Option<&mut PromptSlot<B>>;
    /// The prefix adapters, when the model has a [`PrefixSlot`].
    fn prefix_slot(&self) -> Option<&PrefixSlot<B>>;
    /// The prefix adapters, mutably.
    fn prefix_slot_mut(&mut self) -> Option<&mut PrefixSlot<B>>;
}

impl<B, W, A, Sub, Emb, Kv> PromptModel<B>
    for LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    A: peft_core::adapters::LinearAdapterControl<B>,
    Sub: SublayerAdapter<B> + peft_core::adapters::AdapterControl,
    Emb: EmbeddingAdapter<B> + peft_core::adapters::AdapterControl + PromptSlotAccess<B>,
    Kv: KvAdapter<B> + peft_core::adapters::AdapterControl + PrefixSlotAccess<B>,
{
    fn prompt_dims(&self) -> PromptDims {
        let c = &self.config;
        PromptDims {
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
        }
    }

    fn word_embeddings(&self) -> Tensor<B, 2> {
        self.model.embed_tokens.weight.val().detach()
    }

    fn prompt_slot(&self) -> Option<&PromptSlot<B>> {
        self.model.embed_adapter.prompt_slot()
    }

    fn prompt_slot_mut(&mut self) -> Option<&mut PromptSlot<B>> {
        self.model.embed_adapter.prompt_slot_mut()
    }

    fn prefix_slot(&self) -> Option<&PrefixSlot<B>> {
        self.model.kv_adapter.prefix_slot()
    }

    fn prefix_slot_mut(&mut self) -> Option<&mut PrefixSlot<B>> {
        self.model.kv_adapter.prefix_slot_mut()
    }
}

/// The config of a prompt-learning adapter: one of peft's three configs.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptConfig {
    /// `PROMPT_TUNING` (peft's `PromptTuningConfig`).
    PromptTuning(AdapterConfig<PromptTuningFields>),
    /// `P_TUNING` (peft's `PromptEncoderConfig`).
    PTuning(AdapterConfig<PromptEncoderFields>),
    /// `PREFIX_TUNING` (peft's `PrefixTuningConfig`).
    PrefixTuning(AdapterConfig<PrefixTuningFields>),
}

impl PromptConfig {
    /// The `peft_type` values these configs have.
    pub const SUPPORTED: &'static [&'static str] = &["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"];

    /// Reads `adapter_config.json` (a file or an adapter directory).
    ///
    /// # Errors
    /// An unreadable or invalid file, or a `peft_type` that is not a prompt-learning one.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match AnyAdapterConfig::load(path)? {
            AnyAdapterConfig::PromptTuning(c) => Ok(Self::PromptTuning(c)),
            AnyAdapterConfig::PromptEncoder(c) => Ok(Self::PTuning(c)),
            AnyAdapterConfig::PrefixTuning(c) => Ok(Self::PrefixTuning(c)),
            other => Err(PeftError::UnsupportedPeftType {
                found: other.common().peft_type.clone(),
                context: format!(
                    " in `{}` (peft-prompt loads prompt-learning adapters)",
                    path.display()
                ),
                supported: Self::SUPPORTED.join(", "),
            }),
        }
    }

    /// Writes `adapter_config.json` into `dir`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        match self {
            Self::PromptTuning(c) => c.save(dir),
            Self::PTuning(c) => c.save(dir),
            Self::PrefixTuning(c) => c.save(dir),
        }
    }

    /// The config as JSON text.
    pub fn to_json_string(&self) -> String {
        match self {
            Self::PromptTuning(c) => c.to_json_string(),
            Self::PTuning(c) => c.to_json_string(),
            Self::PrefixTuning(c) => c.to_json_string(),
        }
    }

    /// `PROMPT_TUNING`, `P_TUNING` or `PREFIX_TUNING`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Self::PromptTuning(_) => "PROMPT_TUNING",
            Self::PTuning(_) => "P_TUNING",
            Self::PrefixTuning(_) => "PREFIX_TUNING",
        }
    }

    /// The shared prompt-learning fields.
    pub fn prompt_fields(&self) -> &PromptLearningFields {
        match self {
            Self::PromptTuning(c) => &c.method.prompt,
            Self::PTuning(c) => &c.method.prompt,
            Self::PrefixTuning(c) => &c.method.prompt,
        }
    }

    fn prompt_fields_mut(&mut self) -> &mut PromptLearningFields {
        match self {
            Self::PromptTuning(c) => &mut c.method.prompt,
            Self::PTuning(c) => &mut c.method.prompt,
            Self::PrefixTuning(c) => &mut c.method.prompt,
        }
    }

    fn common(&self) -> &peft_core::config::CommonFields {
        match self {
            Self::PromptTuning(c) => &c.common,
            Self::PTuning(c) => &c.common,
            Self::PrefixTuning(c) => &c.common,
        }
    }

    fn common_mut(&mut self) -> &mut peft_core::config::CommonFields {
        match self {
            Self::PromptTuning(c) => &mut c.common,
            Self::PTuning(c) => &mut c.common,
            Self::PrefixTuning(c) => &mut c.common,
        }
    }

    /// Whether the adapter lives in the key/value slot (prefix tuning) rather than the
    /// embedding slot.
    pub fn is_prefix(&self) -> bool {
        matches!(self, Self::PrefixTuning(_))
    }

    /// The number of virtual tokens.
    ///
    /// # Errors
    /// [`PeftError::Adapter`] when `num_virtual_tokens` is unset or zero.
    pub fn num_virtual_tokens(&self) -> Result<usize> {
        match self.prompt_fields().num_virtual_tokens {
            Some(n) if n > 0 => Ok(n),
            _ => Err(PeftError::Adapter(
                "`num_virtual_tokens` must be set to a positive number".into(),
            )),
        }
    }

    /// The config with the model's shapes filled in as peft fills them
    /// (`_prepare_prompt_learning_config`): `num_layers`, `token_dim`,
    /// `num_attention_heads`, `num_transformer_submodules = 1`, `encoder_hidden_size =
    /// token_dim` when unset; for prefix tuning `token_dim = kv_heads * head_dim` and
    /// `num_attention_heads = kv_heads` (grouped-query attention).
    pub fn completed(&self, dims: &PromptDims) -> Self {
        let mut c = self.clone();
        let p = c.prompt_fields_mut();
        p.num_layers.get_or_insert(dims.num_layers);
        p.token_dim.get_or_insert(dims.hidden_size);
        p.num_attention_heads
            .get_or_insert(dims.num_attention_heads);
        p.num_transformer_submodules.get_or_insert(1);
        if c.is_prefix() {
            let p = c.prompt_fields_mut();
            p.token_dim = Some(dims.kv_dim());
            p.num_attention_heads = Some(dims.num_key_value_heads);
        }
        let token_dim = c.prompt_fields().token_dim.unwrap_or(dims.hidden_size);
        match &mut c {
            Self::PTuning(x) => {
                x.method.encoder_hidden_size.get_or_insert(token_dim);
            }
            Self::PrefixTuning(x) => {
                x.method.encoder_hidden_size.get_or_insert(token_dim);
            }
            Self::PromptTuning(_) => {}
        }
        if let Self::PromptTuning(x) = &mut c
            && x.method.prompt_tuning_init.is_empty()
        {
            x.method.prompt_tuning_init = "RANDOM".into();
        }
        if c.common_mut().task_type.is_none() {
            c.common_mut().task_type = Some("CAUSAL_LM".into());
        }
        c
    }

    /// Checks the config against the model: one transformer submodule, no
    /// `modules_to_save`, and `token_dim`, `num_layers`, `num_attention_heads` matching the
    /// model (for prefix tuning, its key/value heads).
    ///
    /// # Errors
    /// [`PeftError::Adapter`] saying which field does not fit and what it should be.
    pub fn check(&self, dims: &PromptDims) -> Result<()> {
        let p = self.prompt_fields();
        self.num_virtual_tokens()?;
        if p.num_transformer_submodules.is_some_and(|n| n != 1) {
            return Err(PeftError::Adapter(
                "`num_transformer_submodules` is not 1: the adapter was made for an \
                 encoder-decoder model; this build has decoder-only models"
                    .into(),
            ));
        }
        if p.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(PeftError::Unsupported(
                "`modules_to_save` with a prompt-learning adapter is not supported by this build"
                    .into(),
            ));
        }
        let mismatch = |field: &str, found: usize, want: usize| {
            PeftError::Adapter(format!(
                "the {} adapter has {field} = {found}, but this model needs {want}; it was made \
                 for another model",
                self.peft_type()
            ))
        };
        let (want_dim, want_heads) = if self.is_prefix() {
            (dims.kv_dim(), dims.num_key_value_heads)
        } else {
            (dims.hidden_size, dims.num_attention_heads)
        };
        if let Some(d) = p.token_dim
            && d != want_dim
        {
            if self.is_prefix() && d == dims.hidden_size {
                return Err(PeftError::Unsupported(format!(
                    "the prefix-tuning adapter has token_dim = {d} (the model's hidden size), but \
                     this model uses grouped-query attention with {} key/value heads, whose \
                     prefixes are {} wide: the adapter was saved by a peft older than 0.12 that \
                     ignored key/value heads; retrain it with a recent peft",
                    dims.num_key_value_heads,
                    dims.kv_dim()
                )));
            }
            return Err(mismatch("token_dim", d, want_dim));
        }
        if let Some(l) = p.num_layers
            && l != dims.num_layers
        {
            return Err(mismatch("num_layers", l, dims.num_layers));
        }
        if self.is_prefix()
            && let Some(h) = p.num_attention_heads
            && h != want_heads
        {
            return Err(mismatch("num_attention_heads", h, want_heads));
        }
        Ok(())
    }
}

impl TryFrom<AnyAdapterConfig> for PromptConfig {
    type Error = PeftError;

    fn try_from(c: AnyAdapterConfig) -> Result<Self> {
        match c {
            AnyAdapterConfig::PromptTuning(c) => Ok(Self::PromptTuning(c)),
            AnyAdapterConfig::PromptEncoder(c) => Ok(Self::PTuning(c)),
            AnyAdapterConfig::PrefixTuning(c) => Ok(Self::PrefixTuning(c)),
            other => Err(PeftError::UnsupportedPeftType {
                found: other.common().peft_type.clone(),
                context: String::new(),
                supported: Self::SUPPORTED.join(", "),
            }),
        }
    }
}

/// The [`TrainablePolicy`](peft_core::trainable::TrainablePolicy) of prompt learning: only
/// adapter parameters train (the virtual tokens, the prompt encoder, the prefix and its
/// projection; and LoRA's matrices in a model that also has LoRA). Use it with
/// [`peft_core::trainable::freeze`].
pub fn trainable_policy() -> AdapterOnly {
    AdapterOnly
}

fn no_slot(kind: &str, alias: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "this model type has no {kind} slot; use peft_prompt::{alias} (or PromptLearningLlama / \
         LoraPromptLlama, which have both slots)"
    ))
}

fn taken(name: &str) -> PeftError {
    PeftError::Adapter(format!(
        "an adapter named `{name}` already exists here; delete it first or pick another name"
    ))
}

/// The rows `ids` of the word embeddings, `[ids.len(), d]`.
fn embedding_rows<B: Backend>(
    table: Tensor<B, 2>,
    ids: &[u32],
    device: &B::Device,
) -> Tensor<B, 2> {
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len();
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device);
    table.select(0, ids)
}

/// peft's `TEXT` initialisation ids: the text's token ids (special tokens included, as
/// `tokenizer(text)` gives them) repeated, then cut, to `n`.
pub fn text_init_ids(text_ids: &[u32], n: usize) -> Vec<u32> {
    text_ids.iter().copied().cycle().take(n).collect()
}

fn prompt_init<B: Backend, M: PromptModel<B>>(
    model: &M,
    fields: &PromptTuningFields,
    n: usize,
    tokenizer: Option<&Tokenizer>,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let dims = model.prompt_dims();
    let d = dims.hidden_size;
    match fields.prompt_tuning_init.to_ascii_uppercase().as_str() {
        "RANDOM" | "" => Ok(Tensor::random(
            [n, d],
            Distribution::Normal(0.0, 1.0),
            device,
        )),
        "SAMPLE_VOCAB" => {
            let ids = Tensor::<B, 1>::random(
                [n],
                Distribution::Uniform(0.0, dims.vocab_size as f64),
                device,
            )
            .floor()
            .int()
            .clamp(0, dims.vocab_size as i64 - 1);
            Ok(model.word_embeddings().select(0, ids))
        }
        "TEXT" => {
            let text = fields.prompt_tuning_init_text.as_deref().ok_or_else(|| {
                PeftError::Adapter(
                    "prompt_tuning_init = \"TEXT\" needs `prompt_tuning_init_text`".into(),
                )
            })?;
            let loaded;
            let tok = match tokenizer {
                Some(t) => t,
                None => {
                    let path = fields.tokenizer_name_or_path.as_deref().ok_or_else(|| {
                        PeftError::Adapter(
                            "prompt_tuning_init = \"TEXT\" needs a tokenizer: pass one, or set \
                             `tokenizer_name_or_path` to a directory holding tokenizer.json"
                                .into(),
                        )
                    })?;
                    loaded = Tokenizer::from_hf_dir(Path::new(path)).map_err(|e| {
                        PeftError::Adapter(format!(
                            "cannot load the tokenizer of `tokenizer_name_or_path` = `{path}`: {e}"
                        ))
                    })?;
                    &loaded
                }
            };
            let ids = tok.encode(text, true).map_err(|e| {
                PeftError::Adapter(format!("cannot tokenize `prompt_tuning_init_text`: {e}"))
            })?;
            if ids.is_empty() {
                return Err(PeftError::Adapter(
                    "`prompt_tuning_init_text` gives no tokens".into(),
                ));
            }
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= dims.vocab_size) {
                return Err(PeftError::Adapter(format!(
                    "the tokenizer gives id {bad}, outside this model's vocabulary ({}); use \
                     the model's own tokenizer",
                    dims.vocab_size
                )));
            }
            Ok(embedding_rows(
                model.word_embeddings(),
                &text_init_ids(&ids, n),
                device,
            ))
        }
        other => Err(PeftError::Unsupported(format!(
            "prompt_tuning_init = {other:?}: use RANDOM, TEXT or SAMPLE_VOCAB"
        ))),
    }
}

/// Adds a new, trainable adapter named `name` for `config` (prompt tuning, P-tuning or
/// prefix tuning), initialised as peft initialises it. Returns the config completed with
/// the model's shapes (what [`save_adapter`] should write).
///
/// `tokenizer` serves `prompt_tuning_init = "TEXT"`; when `None`, the tokenizer is read from
/// the directory `tokenizer_name_or_path` names. Prefix tuning's `init_weights = "zero"`
/// starts the prefix (or the projection's last layer) at zero.
///
/// # Errors
/// A model without the needed slot, a taken name, an unset `num_virtual_tokens`, an
/// unknown initialisation or encoder type, a tokenizer that cannot be read, or shapes that
/// do not fit the model.
pub fn add_adapter<B, M>(
    model: &mut M,
    name: &str,
    config: &PromptConfig,
    tokenizer: Option<&Tokenizer>,
    device: &B::Device,
) -> Result<PromptConfig>
where
    B: Backend,
    M: PromptModel<B>,
{
    peft_core::adapters::validate_adapter_name(name)?;
    let dims = model.prompt_dims();
    let config = config.completed(&dims);
    config.check(&dims)?;
    let n = config.num_virtual_tokens()?;
    let d = dims.hidden_size;
    match &config {
        PromptConfig::PromptTuning(c) => {
            if model
                .prompt_slot()
                .ok_or_else(|| no_slot("prompt", "PromptLlama"))?
                .get(name)
                .is_some()
            {
                return Err(taken(name));
            }
            // A leaf tensor, so the table can train.
            let table = prompt_init(model, &c.method, n, tokenizer, device)?.detach();
            let slot = model
                .prompt_slot_mut()
                .ok_or_else(|| no_slot("prompt", "PromptLlama"))?;
            slot.insert(name, PromptEncoder::from_embeddings(table))?;
        }
        PromptConfig::PTuning(c) => {
            let f = &c.method;
            let h = f.encoder_hidden_size.unwrap_or(d);
            let mut enc = PromptEncoder::from_embeddings(Tensor::random(
                [n, d],
                Distribution::Normal(0.0, 1.0),
                device,
            ));
            match f
                .encoder_reparameterization_type
                .to_ascii_uppercase()
                .as_str()
            {
                "MLP" => {
                    if f.encoder_num_layers != 2 {
                        tracing::warn!(
                            "P-tuning with the MLP encoder ignores encoder_num_layers = {} and uses \
                             exactly 2 hidden layers, as peft",
                            f.encoder_num_layers
                        );
                    }
                    enc.mlp_head = vec![
                        encoder::torch_linear(d, h, device),
                        encoder::torch_linear(h, h, device),
                        encoder::torch_linear(h, d, device),
                    ];
                }
                "LSTM" => {
                    if f.encoder_num_layers == 0 {
                        return Err(PeftError::Adapter(
                            "`encoder_num_layers` must be at least 1 for the LSTM encoder".into(),
                        ));
                    }
                    enc.lstm_head = Some(Lstm::new(
                        d,
                        h,
                        f.encoder_num_layers,
                        f.encoder_dropout,
                        device,
                    ));
                    enc.mlp_head = vec![
                        encoder::torch_linear(2 * h, 2 * h, device),
                        encoder::torch_linear(2 * h, d, device),
                    ];
                }
                other => {
                    return Err(PeftError::Unsupported(format!(
                        "encoder_reparameterization_type = {other:?}: use MLP or LSTM"
                    )));
                }
            }
            let slot = model
                .prompt_slot_mut()
                .ok_or_else(|| no_slot("prompt", "PromptLlama"))?;
            if slot.get(name).is_some() {
                return Err(taken(name));
            }
            slot.insert(name, enc)?;
        }
        PromptConfig::PrefixTuning(c) => {
            let f = &c.method;
            let kv = dims.kv_dim();
            let width = dims.num_layers * 2 * kv;
            let zero = match &f.init_weights {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::String(s)) if s == "zero" => true,
                Some(other) => {
                    return Err(PeftError::Unsupported(format!(
                        "init_weights = {other}: use null or \"zero\""
                    )));
                }
            };
            let normal = |shape: [usize; 2]| {
                Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device)
            };
            let enc = if f.prefix_projection {
                let h = f.encoder_hidden_size.unwrap_or(kv);
                let mut last = encoder::torch_linear(h, width, device);
                if zero {
                    last = <burn::nn::Linear<B> as LinearWeight<B>>::from_dense(
                        Tensor::zeros([width, h], device),
                        Some(Tensor::zeros([width], device)),
                    );
                }
                let mut e = PrefixEncoder::from_table(
                    normal([n, kv]),
                    dims.num_layers,
                    dims.num_key_value_heads,
                    dims.head_dim,
                );
                e.transform = vec![encoder::torch_linear(kv, h, device), last];
                e
            } else {
                let table = if zero {
                    Tensor::zeros([n, width], device)
                } else {
                    normal([n, width])
                };
                PrefixEncoder::from_table(
                    table,
                    dims.num_layers,
                    dims.num_key_value_heads,
                    dims.head_dim,
                )
            };
            let slot = model
                .prefix_slot_mut()
                .ok_or_else(|| no_slot("prefix", "PrefixLlama"))?;
            if slot.get(name).is_some() {
                return Err(taken(name));
            }
            slot.insert(name, enc)?;
        }
    }
    Ok(config)
}

/// Loads a prompt-learning adapter saved by Python's peft (or by [`save_adapter`]) under
/// `name` and returns its config. Like peft, it loads the saved `prompt_embeddings` as a
/// plain table: P-tuning's encoder and the prefix projection are not in the file.
///
/// # Errors
/// An unreadable or invalid config, a `peft_type` that is not a prompt-learning one, a
/// config made for another model (naming the field), a missing, mis-shaped or unexpected
/// tensor, a model without the needed slot, or a taken name.
pub fn load_adapter<B, M>(
    model: &mut M,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<PromptConfig>
where
    B: Backend,
    M: PromptModel<B>,
{
    let config = PromptConfig::load(dir)?;
    let dims = model.prompt_dims();
    config.check(&dims)?;
    let n = config.num_virtual_tokens()?;
    let mut file = TensorFile::read(dir.join(WEIGHTS_FILE))?
        .with_base_model(config.common().base_model_name_or_path.as_deref());
    if config.is_prefix() {
        let width = dims.num_layers * 2 * dims.kv_dim();
        let hint = format!(
            "for {} virtual tokens of {} layers x 2 x {} key/value heads x {} wide",
            n, dims.num_layers, dims.num_key_value_heads, dims.head_dim
        );
        let table = file.take(PROMPT_EMBEDDINGS, &[n, width], &hint)?;
        file.finish()?;
        let slot = model
            .prefix_slot_mut()
            .ok_or_else(|| no_slot("prefix", "PrefixLlama"))?;
        if slot.get(name).is_some() {
            return Err(taken(name));
        }
        let enc = PrefixEncoder::from_table(
            Tensor::from_data(table, device),
            dims.num_layers,
            dims.num_key_value_heads,
            dims.head_dim,
        );
        slot.insert(name, enc)?;
    } else {
        let hint = format!(
            "for {n} virtual tokens of the model's width {}",
            dims.hidden_size
        );
        let table = file.take(PROMPT_EMBEDDINGS, &[n, dims.hidden_size], &hint)?;
        file.finish()?;
        let slot = model
            .prompt_slot_mut()
            .ok_or_else(|| no_slot("prompt", "PromptLlama"))?;
        if slot.get(name).is_some() {
            return Err(taken(name));
        }
        slot.insert(
            name,
            PromptEncoder::from_embeddings(Tensor::from_data(table, device)),
        )?;
    }
    Ok(config)
}

/// Saves the adapter `name` in peft's format into `dir` (created if needed):
/// `adapter_config.json` from `config` (with `inference_mode = true`, as peft writes it)
/// and `adapter_model.safetensors` with `prompt_embeddings`, the final virtual tokens
/// (P-tuning: the encoder's output) or the flattened prefix (with the projection: its
/// output), as peft saves them.
///
/// # Errors
/// [`PeftError::Adapter`] if the model holds no such adapter of the config's kind; I/O
/// errors.
pub fn save_adapter<B, M>(
    model: &M,
    name: &str,
    config: &PromptConfig,
    dir: &Path,
) -> Result<PathBuf>
where
    B: Backend,
    M: PromptModel<B>,
{
    let missing = || {
        PeftError::Adapter(format!(
            "no {} adapter named `{name}` in this model",
            config.peft_type()
        ))
    };
    let table = if config.is_prefix() {
        model
            .prefix_slot()
            .and_then(|s| s.get(name))
            .ok_or_else(missing)?
            .table()
    } else {
        model
            .prompt_slot()
            .and_then(|s| s.get(name))
            .ok_or_else(missing)?
            .embeddings()
    };
    let mut config = config.clone();
    config.common_mut().inference_mode = true;
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io("create directory", dir, e))?;
    TensorFile::write(
        dir.join(WEIGHTS_FILE),
        vec![(PROMPT_EMBEDDINGS.to_string(), table.detach().into_data())],
    )?;
    config.save(dir)?;
    Ok(dir.to_path_buf())
}

/// The Rust examples of docs/prompts.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/prompts.md")]
pub struct PromptGuideDoctests;
