//! LoRA on the token embeddings, as peft's `lora.Embedding`: the looked-up row of the
//! frozen table `E` gains `s * (A^T[ids]) B^T`, i.e. `delta E = s * (B A)^T` with
//! `A` (`lora_embedding_A`) `[r, vocab]` and `B` (`lora_embedding_B`) `[dim, r]`.
//! peft initialises `A` to zero and `B` from N(0, 1), so a new adapter is a no-op.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use peft_core::adapters::AdapterSet;
use peft_core::config::{InitLoraWeights, LoraFields};
use peft_core::inject::{EmbeddingAdapter, NoAdapter};
use peft_core::{PeftError, Result};

/// One LoRA adapter on a token embedding.
///
/// Stored in the lookup-friendly layout: `A^T` `[vocab, r]` (a row per token) and `B^T`
/// `[r, dim]`; files hold peft's `[r, vocab]` and `[dim, r]`.
#[derive(Module, Debug)]
pub struct LoraEmbedding<B: Backend> {
    /// `A^T`, `[vocab, r]`.
    pub lora_embedding_a: Param<Tensor<B, 2>>,
    /// `B^T`, `[r, dim]`.
    pub lora_embedding_b: Param<Tensor<B, 2>>,
    /// The scale `s`.
    pub scaling: f64,
}

impl<B: Backend> LoraEmbedding<B> {
    /// A new adapter of rank `r` on a `[vocab, dim]` embedding, initialised as peft does:
    /// `A = 0`, `B ~ N(0, 1)` (`init_lora_weights` true or `"gaussian"`), both N(0, 1) with
    /// `false`.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] for DoRA, `lora_bias` (peft refuses it on embeddings too)
    /// or an initialisation that needs the base weight (PiSSA).
    pub fn new(
        vocab: usize,
        dim: usize,
        r: usize,
        scaling: f64,
        fields: &LoraFields,
        device: &B::Device,
    ) -> Result<Self> {
        if fields.use_dora {
            return Err(PeftError::Unsupported(
                "DoRA on embeddings is not supported by this build".into(),
            ));
        }
        if fields.lora_bias {
            return Err(PeftError::Unsupported(
                "lora_bias = true is not supported on embedding layers (as in peft)".into(),
            ));
        }
        let normal =
            |shape: [usize; 2]| Tensor::random(shape, Distribution::Normal(0.0, 1.0), device);
        let a = match &fields.init_lora_weights {
            InitLoraWeights::Bool(false) => normal([vocab, r]),
            InitLoraWeights::Bool(true) => Tensor::zeros([vocab, r], device),
            InitLoraWeights::Scheme(s) if s.eq_ignore_ascii_case("gaussian") => {
                Tensor::zeros([vocab, r], device)
            }
            InitLoraWeights::Scheme(s) => {
                return Err(PeftError::Unsupported(format!(
                    "init_lora_weights = {s:?} is not supported for LoRA on embeddings (use true, \
                     false or \"gaussian\")"
                )));
            }
        };
        Ok(Self {
            lora_embedding_a: Param::from_tensor(a),
            lora_embedding_b: Param::from_tensor(normal([r, dim])),
            scaling,
        })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_embedding_a.shape().dims::<2>()[1]
    }

    /// `s * (B A)^T`, `[vocab, dim]`: what merging adds to the embedding table.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_embedding_a
            .val()
            .matmul(self.lora_embedding_b.val())
            * self.scaling
    }
}

impl<B: Backend> EmbeddingAdapter<B> for LoraEmbedding<B> {
    fn adapt_lookup(&self, ids: &Tensor<B, 2, Int>, embeddings: Tensor<B, 3>) -> Tensor<B, 3> {
        let after_a = burn::tensor::module::embedding(self.lora_embedding_a.val(), ids.clone());
        embeddings + after_a.matmul(self.lora_embedding_b.val().unsqueeze()) * self.scaling
    }
}

/// The slot type of a token embedding holding named LoRA adapters.
pub type LoraEmbeddingSlot<B> = AdapterSet<B, LoraEmbedding<B>>;

/// An embedding slot type that may hold LoRA adapters: [`LoraEmbeddingSlot`] does,
/// [`NoAdapter`] does not.
pub trait EmbeddingLoras<B: Backend> {
    /// The LoRA adapters, when this slot type holds them.
    fn loras(&self) -> Option<&LoraEmbeddingSlot<B>>;
    /// The LoRA adapters, mutably.
    fn loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>>;
}

impl<B: Backend> EmbeddingLoras<B> for NoAdapter {
    fn loras(&self) -> Option<&LoraEmbeddingSlot<B>> {
        None
    }
    fn loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>> {
        None
    }
}

impl<B: Backend> EmbeddingLoras<B> for LoraEmbeddingSlot<B> {
    fn loras(&self) -> Option<&LoraEmbeddingSlot<B>> {
        Some(self)
    }
    fn loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>> {
        Some(self)
    }
}
