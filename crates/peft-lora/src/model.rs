//! What LoRA needs from a model beyond its linear layers: whole modules (for
//! `modules_to_save` and `bias = "all"`), the token embedding and its LoRA slot; and which
//! parameters train under a LoRA config.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use peft_core::adapters::{AdaptedLinear, AdapterControl};
use peft_core::config::{LoraBias, LoraFields};
use peft_core::inject::{EmbeddingAdapter, KvAdapter, LinearWeight, SublayerAdapter};
use peft_core::model::{AdaptableModel, ModelLinear};
use peft_core::target::ModuleInfo;
use peft_core::trainable::{AdapterOnly, ModulesToSave, TrainablePolicy};
use peft_core::{PeftError, Result};
use peft_models::gpt2::Gpt2LMHeadModel;
use peft_models::llama::LlamaForCausalLM;

use crate::LoraSlot;
use crate::embedding::{EmbeddingLoras, LoraEmbeddingSlot};

/// A model with LoRA slots on its linear layers that also exposes its other modules by
/// their Hugging Face paths, for `modules_to_save`, `bias = "all"` and LoRA on the token
/// embedding. Every method has a default meaning "none here".
///
/// Implemented for the Llama family (`lm_head` when untied, `model.embed_tokens`, the
/// norms; the embedding slot when its type is [`LoraEmbeddingSlot`]) and GPT-2 (`transformer.wte`,
/// `transformer.wpe`, the layer norms; its head is always tied to `wte`).
pub trait LoraModel<B: Backend>: AdaptableModel<B, Linear = LoraSlot<B>> {
    /// Paths of the modules whose tensors [`module_tensors`](Self::module_tensors) reads
    /// and [`set_module_tensor`](Self::set_module_tensor) writes.
    fn whole_modules(&self) -> Vec<String> {
        Vec::new()
    }

    /// Modules that exist but share their weight with another: `(path, tied to)`.
    fn tied_modules(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The tensors of a whole module in the Hugging Face layout, by name (`weight`,
    /// `bias`); empty for an unknown path.
    fn module_tensors(&self, path: &str) -> Vec<(String, TensorData)> {
        let _ = path;
        Vec::new()
    }

    /// Replaces one tensor of a whole module (Hugging Face layout), keeping the
    /// parameter's id and trainability.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] for an unknown module or tensor, or a wrong shape.
    fn set_module_tensor(&mut self, path: &str, name: &str, data: TensorData) -> Result<()> {
        let _ = data;
        Err(PeftError::Unsupported(format!(
            "this model cannot set `{path}.{name}`"
        )))
    }

    /// The token embedding: its path, vocabulary size and width.
    fn token_embedding(&self) -> Option<(String, usize, usize)> {
        None
    }

    /// The LoRA adapters of the token embedding, when the model has such a slot.
    fn embedding_loras(&self) -> Option<&LoraEmbeddingSlot<B>> {
        None
    }

    /// The LoRA adapters of the token embedding, mutably.
    fn embedding_loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>> {
        None
    }
}

/// A model seen through its linear layers only (what [`crate::add_adapter`] and friends
/// accept): no whole modules, no embedding slot.
pub(crate) enum LinearsOnly<'a, M> {
    Mut(&'a mut M),
    Ref(&'a M),
}

impl<M> LinearsOnly<'_, M> {
    fn get(&self) -> &M {
        match self {
            Self::Mut(m) => m,
            Self::Ref(m) => m,
        }
    }

    fn get_mut(&mut self) -> Result<&mut M> {
        match self {
            Self::Mut(m) => Ok(m),
            Self::Ref(_) => Err(PeftError::Unsupported(
                "internal: a read-only model view was asked to change".into(),
            )),
        }
    }
}

impl<B: Backend, M: AdaptableModel<B>> AdaptableModel<B> for LinearsOnly<'_, M> {
    type Weight = M::Weight;
    type Linear = M::Linear;
    type Sublayer = M::Sublayer;
    type Embedding = M::Embedding;
    type KeyValue = M::KeyValue;

    fn modules(&self) -> Vec<ModuleInfo> {
        self.get().modules()
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &ModelLinear<B, Self>)) {
        self.get().visit_linears(f);
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut ModelLinear<B, Self>) -> Result<()>,
    ) -> Result<()> {
        self.get_mut()?.map_linears(f)
    }

    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Sublayer) -> Result<()>,
    ) -> Result<()> {
        self.get_mut()?.map_sublayers(f)
    }

    fn map_embedding(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Embedding) -> Result<()>,
    ) -> Result<()> {
        self.get_mut()?.map_embedding(f)
    }

    fn map_kv(&mut self, f: &mut dyn FnMut(&str, &mut Self::KeyValue) -> Result<()>) -> Result<()> {
        self.get_mut()?.map_kv(f)
    }
}

impl<B: Backend, M: AdaptableModel<B, Linear = LoraSlot<B>>> LoraModel<B> for LinearsOnly<'_, M> {}

fn shape_error(path: &str, name: &str, expected: &[usize], found: &[usize]) -> PeftError {
    PeftError::Unsupported(format!(
        "`{path}.{name}` is {expected:?} in this model, the adapter holds {found:?}"
    ))
}

/// Replaces a parameter's value from data of the same shape, keeping id and trainability.
fn set_param<B: Backend, const D: usize>(
    param: &mut Param<Tensor<B, D>>,
    path: &str,
    name: &str,
    data: TensorData,
) -> Result<()> {
    let expected = param.shape().dims::<D>().to_vec();
    if data.shape.as_slice() != expected.as_slice() {
        return Err(shape_error(path, name, &expected, data.shape.as_slice()));
    }
    let device = param.val().device();
    let rg = param.is_require_grad();
    let t = Tensor::<B, D>::from_data(data, &device).set_require_grad(rg);
    *param = Param::initialized(param.id, t);
    Ok(())
}

fn unknown(path: &str, name: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "this model has no tensor `{name}` in a module `{path}` that can be set"
    ))
}

impl<B, W, Sub, Emb, Kv> LoraModel<B>
    for LlamaForCausalLM<B, AdaptedLinear<B, W, LoraSlot<B>>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    Sub: SublayerAdapter<B> + AdapterControl,
    Emb: EmbeddingAdapter<B> + AdapterControl + EmbeddingLoras<B>,
    Kv: KvAdapter<B> + AdapterControl,
{
    fn whole_modules(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.lm_head.is_some() {
            v.push("lm_head".to_string());
        }
        v.push("model.embed_tokens".to_string());
        v.push("model.norm".to_string());
        for i in 0..self.model.layers.len() {
            v.push(format!("model.layers.{i}.input_layernorm"));
            v.push(format!("model.layers.{i}.post_attention_layernorm"));
        }
        v
    }

    fn tied_modules(&self) -> Vec<(String, String)> {
        if self.lm_head.is_none() {
            vec![("lm_head".into(), "model.embed_tokens".into())]
        } else {
            Vec::new()
        }
    }

    fn module_tensors(&self, path: &str) -> Vec<(String, TensorData)> {
        let w = |t: Tensor<B, 1>| vec![("weight".to_string(), t.into_data())];
        match path {
            "lm_head" => match &self.lm_head {
                Some(l) => {
                    let mut v = vec![("weight".to_string(), LinearWeight::weight(l).into_data())];
                    if let Some(b) = LinearWeight::bias(l) {
                        v.push(("bias".into(), b.into_data()));
                    }
                    v
                }
                None => Vec::new(),
            },
            "model.embed_tokens" => vec![(
                "weight".to_string(),
                self.model.embed_tokens.weight.val().into_data(),
            )],
            "model.norm" => w(self.model.norm.weight.val()),
            _ => match llama_layer_norm(path) {
                Some((i, second)) if i < self.model.layers.len() => {
                    let l = &self.model.layers[i];
                    let n = if second {
                        &l.post_attention_layernorm
                    } else {
                        &l.input_layernorm
                    };
                    w(n.weight.val())
                }
                _ => Vec::new(),
            },
        }
    }

    fn set_module_tensor(&mut self, path: &str, name: &str, data: TensorData) -> Result<()> {
        match (path, name) {
            ("lm_head", "weight" | "bias") => {
                let l = self.lm_head.as_mut().ok_or_else(|| unknown(path, name))?;
                let device = l.weight.val().device();
                let (mut weight, mut bias) = (LinearWeight::weight(l), LinearWeight::bias(l));
                if name == "weight" {
                    let expected = weight.dims().to_vec();
                    if data.shape.as_slice() != expected.as_slice() {
                        return Err(shape_error(path, name, &expected, data.shape.as_slice()));
                    }
                    weight = Tensor::from_data(data, &device);
                } else {
                    let expected = bias
                        .as_ref()
                        .ok_or_else(|| unknown(path, name))?
                        .dims()
                        .to_vec();
                    if data.shape.as_slice() != expected.as_slice() {
                        return Err(shape_error(path, name, &expected, data.shape.as_slice()));
                    }
                    bias = Some(Tensor::from_data(data, &device));
                }
                LinearWeight::set_weight(l, weight, bias)
            }
            ("model.embed_tokens", "weight") => {
                set_param(&mut self.model.embed_tokens.weight, path, name, data)
            }
            ("model.norm", "weight") => set_param(&mut self.model.norm.weight, path, name, data),
            (_, "weight") => match llama_layer_norm(path) {
                Some((i, second)) if i < self.model.layers.len() => {
                    let l = &mut self.model.layers[i];
                    let n = if second {
                        &mut l.post_attention_layernorm
                    } else {
                        &mut l.input_layernorm
                    };
                    set_param(&mut n.weight, path, name, data)
                }
                _ => Err(unknown(path, name)),
            },
            _ => Err(unknown(path, name)),
        }
    }

    fn token_embedding(&self) -> Option<(String, usize, usize)> {
        let [vocab, dim] = self.model.embed_tokens.weight.shape().dims::<2>();
        Some(("model.embed_tokens".into(), vocab, dim))
    }

    fn embedding_loras(&self) -> Option<&LoraEmbeddingSlot<B>> {
        self.model.embed_adapter.loras()
    }

    fn embedding_loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>> {
        self.model.embed_adapter.loras_mut()
    }
}

/// `model.layers.N.{input,post_attention}_layernorm` -> `(N, is_post_attention)`.
fn llama_layer_norm(path: &str) -> Option<(usize, bool)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (i, norm) = rest.split_once('.')?;
    let second = match norm {
        "input_layernorm" => false,
        "post_attention_layernorm" => true,
        _ => return None,
    };
    Some((i.parse().ok()?, second))
}

impl<B, W, Sub> LoraModel<B> for Gpt2LMHeadModel<B, AdaptedLinear<B, W, LoraSlot<B>>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    Sub: SublayerAdapter<B> + AdapterControl,
{
    fn whole_modules(&self) -> Vec<String> {
        let mut v = vec![
            "transformer.wte".to_string(),
            "transformer.wpe".to_string(),
            "transformer.ln_f".to_string(),
        ];
        for i in 0..self.transformer.h.len() {
            v.push(format!("transformer.h.{i}.ln_1"));
            v.push(format!("transformer.h.{i}.ln_2"));
        }
        v
    }

    fn tied_modules(&self) -> Vec<(String, String)> {
        vec![("lm_head".into(), "transformer.wte".into())]
    }

    fn module_tensors(&self, path: &str) -> Vec<(String, TensorData)> {
        let t = &self.transformer;
        let ln = |n: &peft_models::nn::LayerNorm<B>| {
            vec![
                ("weight".to_string(), n.weight.val().into_data()),
                ("bias".to_string(), n.bias.val().into_data()),
            ]
        };
        match path {
            "transformer.wte" => vec![("weight".into(), t.wte.weight.val().into_data())],
            "transformer.wpe" => vec![("weight".into(), t.wpe.weight.val().into_data())],
            "transformer.ln_f" => ln(&t.ln_f),
            _ => match gpt2_layer_norm(path) {
                Some((i, second)) if i < t.h.len() => {
                    ln(if second { &t.h[i].ln_2 } else { &t.h[i].ln_1 })
                }
                _ => Vec::new(),
            },
        }
    }

    fn set_module_tensor(&mut self, path: &str, name: &str, data: TensorData) -> Result<()> {
        let t = &mut self.transformer;
        let ln = |n: &mut peft_models::nn::LayerNorm<B>, data: TensorData| match name {
            "weight" => set_param(&mut n.weight, path, name, data),
            "bias" => set_param(&mut n.bias, path, name, data),
            _ => Err(unknown(path, name)),
        };
        match (path, name) {
            ("transformer.wte", "weight") => set_param(&mut t.wte.weight, path, name, data),
            ("transformer.wpe", "weight") => set_param(&mut t.wpe.weight, path, name, data),
            ("transformer.ln_f", _) => ln(&mut t.ln_f, data),
            _ => match gpt2_layer_norm(path) {
                Some((i, second)) if i < t.h.len() => {
                    let block = &mut t.h[i];
                    ln(
                        if second {
                            &mut block.ln_2
                        } else {
                            &mut block.ln_1
                        },
                        data,
                    )
                }
                _ => Err(unknown(path, name)),
            },
        }
    }

    fn token_embedding(&self) -> Option<(String, usize, usize)> {
        let [vocab, dim] = self.transformer.wte.weight.shape().dims::<2>();
        Some(("transformer.wte".into(), vocab, dim))
    }
}

/// `transformer.h.N.ln_{1,2}` -> `(N, is_ln_2)`.
fn gpt2_layer_norm(path: &str) -> Option<(usize, bool)> {
    let rest = path.strip_prefix("transformer.h.")?;
    let (i, norm) = rest.split_once('.')?;
    let second = match norm {
        "ln_1" => false,
        "ln_2" => true,
        _ => return None,
    };
    Some((i.parse().ok()?, second))
}

/// Which parameters train under a LoRA config, as peft's `mark_only_lora_as_trainable`
/// plus `modules_to_save`: the adapters; every bias (`bias = "all"`) or the biases of the
/// adapted layers (`"lora_only"`); every parameter of the `modules_to_save` modules.
#[derive(Clone, Debug, Default)]
pub struct LoraTrainable {
    bias: LoraBias,
    adapted: Vec<String>,
    modules_to_save: ModulesToSave,
}

impl TrainablePolicy for LoraTrainable {
    fn is_trainable(&self, path: &str) -> bool {
        if AdapterOnly.is_trainable(path) || self.modules_to_save.is_trainable(path) {
            return true;
        }
        match self.bias {
            LoraBias::None => false,
            LoraBias::All => path.rsplit('.').next() == Some("bias"),
            LoraBias::LoraOnly => self
                .adapted
                .iter()
                .any(|a| path.strip_prefix(a.as_str()) == Some(".base.bias")),
        }
    }
}

/// The [`TrainablePolicy`] of a LoRA config, given the adapted linear-layer paths (what
/// [`crate::add_adapter`] returns). Use it with [`peft_core::trainable::freeze`].
pub fn trainable_policy(fields: &LoraFields, adapted: &[String]) -> LoraTrainable {
    LoraTrainable {
        bias: fields.bias,
        adapted: adapted.to_vec(),
        modules_to_save: ModulesToSave(fields.modules_to_save.clone().unwrap_or_default()),
    }
}
