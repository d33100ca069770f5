//! BERT (Devlin et al., 2018, <https://arxiv.org/abs/1810.04805>): a post-LayerNorm
//! encoder with word, position and token-type embeddings, a tanh pooler and a
//! sequence-classification head.
//!
//! Adapter slots: `bert.encoder.layer.N.attention.self.{query,key,value}`,
//! `bert.encoder.layer.N.attention.output.dense`, `bert.encoder.layer.N.intermediate.dense`,
//! `bert.encoder.layer.N.output.dense`, `bert.pooler.dense`; after each sublayer
//! `bert.encoder.layer.N.attn_adapter` / `mlp_adapter`. The classifier (`classifier`) is
//! the head that peft's `modules_to_save` trains in full.

use std::marker::PhantomData;

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::prelude::*;
use burn::tensor::activation::gelu;
use peft_core::adapters::{AdaptedLinear, AdapterControl, LinearAdapterControl};
use peft_core::inject::{LinearWeight, NoAdapter, SublayerAdapter};
use peft_core::model::AdaptableModel;
use peft_core::target::{ModuleInfo, ModuleKind};

use crate::config::BertConfig;
use crate::error::Result;
use crate::llama::load_linear;
use crate::nn::{LayerNorm, attention, attention_mask, gelu_tanh};
use crate::weights::WeightSource;

/// Embeddings: word + position + token type, then LayerNorm.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// Word embeddings.
    pub word_embeddings: Embedding<B>,
    /// Position embeddings.
    pub position_embeddings: Embedding<B>,
    /// Token-type (segment) embeddings.
    pub token_type_embeddings: Embedding<B>,
    /// LayerNorm (`LayerNorm` in Hugging Face names).
    pub layer_norm: LayerNorm<B>,
}

/// One encoder layer.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend, Lin, Sub> {
    /// `attention.self.query`.
    pub query: Lin,
    /// `attention.self.key`.
    pub key: Lin,
    /// `attention.self.value`.
    pub value: Lin,
    /// `attention.output.dense`.
    pub attention_output: Lin,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm<B>,
    /// `intermediate.dense`.
    pub intermediate: Lin,
    /// `output.dense`.
    pub output: Lin,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm<B>,
    /// Adapter slot after attention.
    pub attn_adapter: Sub,
    /// Adapter slot after the feed-forward block.
    pub mlp_adapter: Sub,
}

/// BERT with a sequence-classification head.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification<B: Backend, Lin, Sub> {
    /// Embeddings.
    pub embeddings: BertEmbeddings<B>,
    /// Encoder layers.
    pub layers: Vec<BertLayer<B, Lin, Sub>>,
    /// `bert.pooler.dense`.
    pub pooler: Lin,
    /// The classification head (absent when the checkpoint has none).
    pub classifier: Option<burn::nn::Linear<B>>,
    /// The config.
    #[module(skip)]
    pub config: BertConfig,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// A plain BERT classifier.
pub type Bert<B> =
    BertForSequenceClassification<B, AdaptedLinear<B, burn::nn::Linear<B>, NoAdapter>, NoAdapter>;

/// Outputs of a BERT forward pass.
#[derive(Debug, Clone)]
pub struct BertOutput<B: Backend> {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]`.
    pub pooler_output: Tensor<B, 2>,
    /// `[batch, num_labels]`, when the model has a classifier.
    pub logits: Option<Tensor<B, 2>>,
}

fn emb<B: Backend>(
    src: &mut dyn WeightSource,
    name: &str,
    rows: usize,
    d: usize,
    device: &B::Device,
) -> Result<Embedding<B>> {
    Ok(Embedding {
        weight: Param::from_data(src.take(name, &[rows, d])?, device),
    })
}

impl<B, W, A, Sub> BertForSequenceClassification<B, AdaptedLinear<B, W, A>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    A: Default,
    Sub: Default,
{
    /// Loads the weights named as in Hugging Face checkpoints (`bert.` prefix and
    /// `classifier`).
    ///
    /// # Errors
    /// A missing or mis-shaped tensor, or an unreadable file.
    pub fn load(
        config: &BertConfig,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let e = "bert.embeddings";
        let embeddings = BertEmbeddings {
            word_embeddings: emb(
                src,
                &format!("{e}.word_embeddings.weight"),
                c.vocab_size,
                d,
                device,
            )?,
            position_embeddings: emb(
                src,
                &format!("{e}.position_embeddings.weight"),
                c.max_position_embeddings,
                d,
                device,
            )?,
            token_type_embeddings: emb(
                src,
                &format!("{e}.token_type_embeddings.weight"),
                c.type_vocab_size,
                d,
                device,
            )?,
            layer_norm: LayerNorm::load(src, &format!("{e}.LayerNorm"), d, eps, device)?,
        };
        let _ = src.take_optional(
            &format!("{e}.position_ids"),
            &[1, c.max_position_embeddings],
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("bert.encoder.layer.{i}");
            let i_s = c.intermediate_size;
            layers.push(BertLayer {
                query: load_linear(
                    src,
                    &format!("{p}.attention.self.query"),
                    d,
                    d,
                    true,
                    device,
                )?,
                key: load_linear(src, &format!("{p}.attention.self.key"), d, d, true, device)?,
                value: load_linear(
                    src,
                    &format!("{p}.attention.self.value"),
                    d,
                    d,
                    true,
                    device,
                )?,
                attention_output: load_linear(
                    src,
                    &format!("{p}.attention.output.dense"),
                    d,
                    d,
                    true,
                    device,
                )?,
                attention_norm: LayerNorm::load(
                    src,
                    &format!("{p}.attention.output.LayerNorm"),
                    d,
                    eps,
                    device,
                )?,
                intermediate: load_linear(
                    src,
                    &format!("{p}.intermediate.dense"),
                    d,
                    i_s,
                    true,
                    device,
                )?,
                output: load_linear(src, &format!("{p}.output.dense"), i_s, d, true, device)?,
                output_norm: LayerNorm::load(
                    src,
                    &format!("{p}.output.LayerNorm"),
                    d,
                    eps,
                    device,
                )?,
                attn_adapter: Sub::default(),
                mlp_adapter: Sub::default(),
            });
        }
        let pooler = load_linear(src, "bert.pooler.dense", d, d, true, device)?;
        let classifier = if c.num_labels > 0 && src.contains("classifier.weight") {
            let w: Tensor<B, 2> =
                Tensor::from_data(src.take("classifier.weight", &[c.num_labels, d])?, device);
            let b = src.take("classifier.bias", &[c.num_labels])?;
            Some(<burn::nn::Linear<B> as LinearWeight<B>>::from_dense(
                w,
                Some(Tensor::from_data(b, device)),
            ))
        } else {
            None
        };
        src.finish();
        Ok(Self {
            embeddings,
            layers,
            pooler,
            classifier,
            config: config.clone(),
            backend: PhantomData,
        })
    }
}

impl<B, W, A, Sub> BertForSequenceClassification<B, AdaptedLinear<B, W, A>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B>,
{
    /// Encodes `ids: [batch, seq]` with optional token types and a padding mask
    /// (`mask[b][j]` false = padding).
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
        padding: Option<&[Vec<bool>]>,
    ) -> BertOutput<B> {
        let c = &self.config;
        let device = ids.device();
        let [batch, seq] = ids.dims();
        let e = &self.embeddings;
        let pos = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).unsqueeze::<2>();
        let types = token_type_ids.unwrap_or_else(|| Tensor::zeros([batch, seq], &device));
        let mut h = e.layer_norm.forward(
            e.word_embeddings.forward(ids)
                + e.token_type_embeddings.forward(types)
                + e.position_embeddings.forward(pos),
        );
        let mask = padding.map(|p| attention_mask::<B>(batch, seq, 0, 0, false, Some(p), &device));
        let hd = c.hidden_size / c.num_attention_heads;
        let act = |x: Tensor<B, 3>| {
            if c.hidden_act == "gelu" {
                gelu(x)
            } else {
                gelu_tanh(x)
            }
        };
        for l in &self.layers {
            let split = |t: Tensor<B, 3>| {
                t.reshape([batch, seq, c.num_attention_heads, hd])
                    .swap_dims(1, 2)
            };
            let ctx = attention(
                split(l.query.forward(h.clone())),
                split(l.key.forward(h.clone())),
                split(l.value.forward(h.clone())),
                mask.as_ref(),
                (hd as f64).powf(-0.5),
            )
            .swap_dims(1, 2)
            .reshape([batch, seq, c.hidden_size]);
            let a = l.attn_adapter.forward(&h, l.attention_output.forward(ctx));
            h = l.attention_norm.forward(a + h);
            let y = l.output.forward(act(l.intermediate.forward(h.clone())));
            let y = l.mlp_adapter.forward(&h, y);
            h = l.output_norm.forward(y + h);
        }
        let first: Tensor<B, 2> = h
            .clone()
            .slice([0..batch, 0..1, 0..c.hidden_size])
            .reshape([batch, c.hidden_size]);
        let pooled = self.pooler.forward(first).tanh();
        let logits = self
            .classifier
            .as_ref()
            .map(|cl| cl.forward(pooled.clone()));
        BertOutput {
            last_hidden_state: h,
            pooler_output: pooled,
            logits,
        }
    }
}

impl<B, W, A, Sub> AdaptableModel<B>
    for BertForSequenceClassification<B, AdaptedLinear<B, W, A>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B> + AdapterControl,
{
    type Weight = W;
    type Linear = A;
    type Sublayer = Sub;
    type Embedding = NoAdapter;
    type KeyValue = NoAdapter;

    fn modules(&self) -> Vec<ModuleInfo> {
        let mut v = vec![
            ModuleInfo::new("bert", ModuleKind::Other),
            ModuleInfo::new("bert.embeddings", ModuleKind::Other),
            ModuleInfo::new("bert.embeddings.word_embeddings", ModuleKind::Embedding),
            ModuleInfo::new("bert.embeddings.position_embeddings", ModuleKind::Embedding),
            ModuleInfo::new(
                "bert.embeddings.token_type_embeddings",
                ModuleKind::Embedding,
            ),
            ModuleInfo::new("bert.embeddings.LayerNorm", ModuleKind::Other),
            ModuleInfo::new("bert.encoder", ModuleKind::Other),
        ];
        for i in 0..self.layers.len() {
            v.push(ModuleInfo::new(
                format!("bert.encoder.layer.{i}"),
                ModuleKind::Other,
            ));
            for path in layer_linear_paths(i) {
                v.push(ModuleInfo::new(path, ModuleKind::Linear));
            }
        }
        v.push(ModuleInfo::new("bert.pooler", ModuleKind::Other));
        v.push(ModuleInfo::new("bert.pooler.dense", ModuleKind::Linear));
        v.push(ModuleInfo::new("classifier", ModuleKind::OutputHead));
        v
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B, W, A>)) {
        let paths = linear_paths(self.layers.len());
        let mut p = paths.iter();
        for l in &self.layers {
            for lin in [
                &l.query,
                &l.key,
                &l.value,
                &l.attention_output,
                &l.intermediate,
                &l.output,
            ] {
                if let Some(path) = p.next() {
                    f(path, lin);
                }
            }
        }
        f("bert.pooler.dense", &self.pooler);
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut AdaptedLinear<B, W, A>) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        let paths = linear_paths(self.layers.len());
        let mut p = paths.iter();
        for l in &mut self.layers {
            for lin in [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attention_output,
                &mut l.intermediate,
                &mut l.output,
            ] {
                if let Some(path) = p.next() {
                    f(path, lin)?;
                }
            }
        }
        f("bert.pooler.dense", &mut self.pooler)
    }

    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Sub) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            f(
                &format!("bert.encoder.layer.{i}.attn_adapter"),
                &mut l.attn_adapter,
            )?;
            f(
                &format!("bert.encoder.layer.{i}.mlp_adapter"),
                &mut l.mlp_adapter,
            )?;
        }
        Ok(())
    }
}

/// The Hugging Face paths of the six linear layers of encoder layer `i`, in field order.
fn layer_linear_paths(i: usize) -> [String; 6] {
    let p = format!("bert.encoder.layer.{i}");
    [
        format!("{p}.attention.self.query"),
        format!("{p}.attention.self.key"),
        format!("{p}.attention.self.value"),
        format!("{p}.attention.output.dense"),
        format!("{p}.intermediate.dense"),
        format!("{p}.output.dense"),
    ]
}

/// The paths of every encoder layer's linear layers, in order.
fn linear_paths(layers: usize) -> Vec<String> {
    (0..layers).flat_map(layer_linear_paths).collect()
}
