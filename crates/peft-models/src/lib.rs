//! # peft-models
//!
//! Real architectures written with adapter slots at every injection point of
//! [`peft_core::inject`], loading real checkpoints:
//!
//! - the Llama family ([`llama`]: Llama 2/3 with rope scaling, SmolLM2, Mistral, Qwen2 with
//!   q/k/v biases; grouped-query attention, RoPE, RMSNorm, SwiGLU, tied or untied embeddings);
//! - GPT-2 ([`gpt2`], whose Conv1D weights are stored `[in, out]`);
//! - BERT ([`bert`]: encoder, pooler, sequence-classification head).
//!
//! Weights come from Hugging Face directories (`config.json` + `model.safetensors`, or
//! shards listed in `model.safetensors.index.json`; f32, f16 or bf16) through
//! [`weights::SafetensorsSource`], and from GGUF files ([`gguf`]). Module paths equal the
//! Hugging Face names (`model.layers.3.self_attn.q_proj`), so peft's target names and
//! adapter keys apply unchanged. [`generate`] decodes with a KV cache.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use peft_models::{CausalLm, ForwardInput, load_causal_lm};
//!
//! let device = Default::default();
//! let model = load_causal_lm::<NdArray>("path/to/SmolLM2-135M-Instruct".as_ref(), &device)?;
//! let ids = burn::tensor::Tensor::from_ints([[1, 2, 3]], &device);
//! let logits = model.forward(ForwardInput::new(ids), None); // [1, 3, vocab]
//! # Ok::<(), peft_models::ModelError>(())
//! ```

pub mod bert;
pub mod config;
pub mod error;
pub mod export;
#[cfg(feature = "flex")]
pub mod flex;
pub mod generate;
pub mod gguf;
pub mod gguf_model;
pub mod gpt2;
pub mod llama;
pub mod nn;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use burn::prelude::*;
use peft_core::adapters::{AdaptedLinear, LinearAdapterControl};
use peft_core::inject::NoAdapter;

pub use error::{ModelError, Result};

/// Inputs of a forward pass.
#[derive(Clone, Debug)]
pub struct ForwardInput<'a, B: Backend> {
    /// Token ids `[batch, seq]`.
    pub ids: Tensor<B, 2, Int>,
    /// Per sequence, which of the `past + seq` positions are real tokens (false = padding).
    pub padding: Option<&'a [Vec<bool>]>,
}

impl<B: Backend> ForwardInput<'_, B> {
    /// Token ids with no padding.
    pub fn new(ids: Tensor<B, 2, Int>) -> Self {
        Self { ids, padding: None }
    }
}

/// Cached keys and values of every layer, for incremental decoding.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Positions cached so far (virtual tokens included).
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Appends this step's keys and values `[batch, heads, seq, head_dim]` for `layer` and
    /// returns the full keys and values so far.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// A causal language model: ids in, next-token logits out.
pub trait CausalLm<B: Backend> {
    /// Logits `[batch, seq, vocab]` for the input's own positions. With a cache, the input
    /// continues the cached sequence and the cache grows.
    fn forward(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.logits(self.hidden(input, cache))
    }
    /// Final hidden states `[batch, seq, hidden]` of the input's own positions (after the
    /// final norm, before the output head). Training uses it to project only the positions
    /// that carry a loss, which saves most of the output head's cost.
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3>;
    /// The output head: logits `[batch, seq, vocab]` from hidden states.
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3>;
    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache<B>;
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Token ids that end generation, from the model's config.
    fn eos_token_ids(&self) -> Vec<u32>;
}

impl<B: Backend, T: CausalLm<B> + ?Sized> CausalLm<B> for Box<T> {
    fn forward(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        (**self).forward(input, cache)
    }
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        (**self).hidden(input, cache)
    }
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        (**self).logits(hidden)
    }
    fn new_cache(&self) -> KvCache<B> {
        (**self).new_cache()
    }
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        (**self).eos_token_ids()
    }
}

/// A causal language model of any supported architecture, with dense weights and the
/// adapter slot `A` on every linear layer (none by default; `peft_lora::LoraSlot` for LoRA).
#[derive(Module, Debug)]
pub enum AnyCausalLm<B: Backend, A = NoAdapter> {
    /// Llama family.
    Llama(llama::LlamaWith<B, burn::nn::Linear<B>, A, NoAdapter, NoAdapter, NoAdapter>),
    /// GPT-2.
    Gpt2(gpt2::Gpt2LMHeadModel<B, AdaptedLinear<B, burn::nn::Linear<B>, A>, NoAdapter>),
}

impl<B: Backend, A: LinearAdapterControl<B>> CausalLm<B> for AnyCausalLm<B, A> {
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        match self {
            Self::Llama(m) => m.hidden(input, cache),
            Self::Gpt2(m) => m.hidden(input, cache),
        }
    }
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Llama(m) => m.logits(hidden),
            Self::Gpt2(m) => m.logits(hidden),
        }
    }
    fn new_cache(&self) -> KvCache<B> {
        match self {
            Self::Llama(m) => m.new_cache(),
            Self::Gpt2(m) => m.new_cache(),
        }
    }
    fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.vocab_size(),
            Self::Gpt2(m) => m.vocab_size(),
        }
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            Self::Llama(m) => m.eos_token_ids(),
            Self::Gpt2(m) => m.eos_token_ids(),
        }
    }
}

/// The model cache that `cargo xtask fetch-model` fills: `$PEFT_CACHE`, else
/// `~/.cache/burn-peft/models`.
pub fn model_cache() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("PEFT_CACHE") {
        return dir.into();
    }
    std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/burn-peft/models")
}

/// Where SmolLM2-135M-Instruct's GGUF file is: `$SMOLLM2_GGUF`, else its place in
/// [`model_cache`] (`cargo xtask fetch-model smollm2` puts it there). The file may not exist.
pub fn smollm2_gguf_path() -> std::path::PathBuf {
    std::env::var_os("SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| model_cache().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// Loads a Llama-family model with any slot types (plain, LoRA, ...) from a Hugging Face
/// directory or a `.gguf` file.
///
/// # Errors
/// A missing file, another architecture, a missing or mis-shaped tensor, a truncated file.
pub fn load_llama<B, W, A, Sub, Emb, Kv>(
    path: &Path,
    device: &B::Device,
) -> Result<crate::llama::LlamaWith<B, W, A, Sub, Emb, Kv>>
where
    B: Backend,
    W: peft_core::inject::LinearWeight<B>,
    A: Default,
    Sub: Default,
    Emb: Default,
    Kv: Default,
{
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return gguf_model::load_llama(path, device);
    }
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            hint: "give a Hugging Face model directory or a .gguf file".into(),
        });
    }
    match config::ModelConfig::from_dir(path)? {
        config::ModelConfig::Llama(c) => llama::LlamaForCausalLM::load(
            &c,
            &mut weights::SafetensorsSource::open_dir(path)?,
            device,
        ),
        _ => Err(ModelError::InvalidInput(format!(
            "`{}` is not a Llama-family model",
            path.display()
        ))),
    }
}

/// Loads a causal LM from a Hugging Face directory or a `.gguf` file.
///
/// # Errors
/// A missing file, an unknown architecture, a missing or mis-shaped tensor, a truncated file.
pub fn load_causal_lm<B: Backend>(path: &Path, device: &B::Device) -> Result<AnyCausalLm<B>> {
    load_causal_lm_with(path, device)
}

/// Loads a causal LM with the (empty) adapter slot `A` on its linear layers, from a
/// Hugging Face directory or a `.gguf` file; reads `config.json` once.
///
/// # Errors
/// As [`load_causal_lm`].
pub fn load_causal_lm_with<B: Backend, A: Default>(
    path: &Path,
    device: &B::Device,
) -> Result<AnyCausalLm<B, A>> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok(AnyCausalLm::Llama(gguf_model::load_llama(path, device)?));
    }
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            hint: "give a Hugging Face model directory or a .gguf file".into(),
        });
    }
    let config = config::ModelConfig::from_dir(path)?;
    let mut src = weights::SafetensorsSource::open_dir(path)?;
    match config {
        config::ModelConfig::Llama(c) => Ok(AnyCausalLm::Llama(llama::LlamaForCausalLM::load(
            &c, &mut src, device,
        )?)),
        config::ModelConfig::Gpt2(c) => Ok(AnyCausalLm::Gpt2(gpt2::Gpt2LMHeadModel::load(
            &c, &mut src, device,
        )?)),
        config::ModelConfig::Bert(_) => Err(ModelError::InvalidInput(format!(
            "`{}` is a BERT encoder, not a causal language model; load it with bert::BertForSequenceClassification",
            path.display()
        ))),
    }
}

/// The Rust examples of docs/models.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/models.md")]
pub struct ModelsGuideDoctests;
