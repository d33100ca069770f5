//! The Llama family: Llama 2/3 (with rope scaling), SmolLM2, Mistral and Qwen2.
//!
//! Pre-norm decoder layers of grouped-query attention with rotary embeddings and a SwiGLU
//! MLP, RMSNorm, tied or untied embeddings (Touvron et al., 2023,
//! <https://arxiv.org/abs/2302.13971>). Module paths equal the Hugging Face names
//! (`model.layers.3.self_attn.q_proj`), so peft's target names and adapter keys apply as
//! they are. Adapter slots:
//!
//! | slot | path |
//! |---|---|
//! | every linear layer | `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj` |
//! | after attention, after the MLP | `model.layers.N.attn_adapter`, `model.layers.N.mlp_adapter` |
//! | input embeddings | `model.embed_adapter` |
//! | keys and values | `model.kv_adapter` |

use std::marker::PhantomData;

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::prelude::*;
use peft_core::adapters::{AdaptedLinear, AdapterControl, LinearAdapterControl};
use peft_core::inject::{EmbeddingAdapter, KvAdapter, LinearWeight, NoAdapter, SublayerAdapter};
use peft_core::model::AdaptableModel;
use peft_core::target::{ModuleInfo, ModuleKind};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::nn::{
    RmsNorm, apply_rope_bshd, attention, attention_mask, rope_tables_for_heads, swiglu,
};
use crate::weights::WeightSource;
use crate::{CausalLm, ForwardInput, KvCache};

/// Attention with separate q, k, v and o projections.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend, Lin> {
    /// Query projection.
    pub q_proj: Lin,
    /// Key projection.
    pub k_proj: Lin,
    /// Value projection.
    pub v_proj: Lin,
    /// Output projection.
    pub o_proj: Lin,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend, Lin> {
    /// Gate projection.
    pub gate_proj: Lin,
    /// Up projection.
    pub up_proj: Lin,
    /// Down projection.
    pub down_proj: Lin,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend, Lin, Sub> {
    /// Attention.
    pub self_attn: LlamaAttention<B, Lin>,
    /// MLP.
    pub mlp: LlamaMlp<B, Lin>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Adapter slot after attention.
    pub attn_adapter: Sub,
    /// Adapter slot after the MLP.
    pub mlp_adapter: Sub,
}

/// The decoder stack (`model.` in Hugging Face names).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend, Lin, Sub, Emb, Kv> {
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<LlamaDecoderLayer<B, Lin, Sub>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Adapter slot on the input embeddings.
    pub embed_adapter: Emb,
    /// Adapter slot on attention keys and values.
    pub kv_adapter: Kv,
}

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend, Lin, Sub, Emb, Kv> {
    /// The decoder.
    pub model: LlamaModel<B, Lin, Sub, Emb, Kv>,
    /// The output head, `None` when tied to the embeddings.
    pub lm_head: Option<burn::nn::Linear<B>>,
    /// The config.
    #[module(skip)]
    pub config: LlamaConfig,
}

/// A Llama whose linear layers hold weight storage `W` and adapter slot `A`.
pub type LlamaWith<B, W, A, Sub, Emb, Kv> =
    LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>;

/// A plain Llama (dense weights, no adapters).
pub type Llama<B> = LlamaForCausalLM<
    B,
    AdaptedLinear<B, burn::nn::Linear<B>, NoAdapter>,
    NoAdapter,
    NoAdapter,
    NoAdapter,
>;

/// Loads `{prefix}.weight` (`[out, in]`) and, if asked, `{prefix}.bias` into a linear slot.
///
/// # Errors
/// As [`WeightSource::take`].
pub fn load_linear<B: Backend, W: LinearWeight<B>, A: Default>(
    src: &mut dyn WeightSource,
    prefix: &str,
    inp: usize,
    out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<AdaptedLinear<B, W, A>> {
    let w = Tensor::from_data(src.take(&format!("{prefix}.weight"), &[out, inp])?, device);
    let b = if bias {
        Some(Tensor::from_data(
            src.take(&format!("{prefix}.bias"), &[out])?,
            device,
        ))
    } else {
        None
    };
    Ok(AdaptedLinear::new(W::from_dense(w, b)))
}

impl<B, W, A, Sub, Emb, Kv> LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    A: Default,
    Sub: Default,
    Emb: Default,
    Kv: Default,
{
    /// Loads the weights named as in Hugging Face checkpoints.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor, or an unreadable file.
    pub fn load(
        config: &LlamaConfig,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = LlamaAttention {
                q_proj: load_linear(
                    src,
                    &format!("{p}.self_attn.q_proj"),
                    h,
                    q_out,
                    c.qkv_bias,
                    device,
                )?,
                k_proj: load_linear(
                    src,
                    &format!("{p}.self_attn.k_proj"),
                    h,
                    kv_out,
                    c.qkv_bias,
                    device,
                )?,
                v_proj: load_linear(
                    src,
                    &format!("{p}.self_attn.v_proj"),
                    h,
                    kv_out,
                    c.qkv_bias,
                    device,
                )?,
                o_proj: load_linear(
                    src,
                    &format!("{p}.self_attn.o_proj"),
                    q_out,
                    h,
                    c.o_bias,
                    device,
                )?,
                backend: PhantomData,
            };
            let i_s = c.intermediate_size;
            let mlp = LlamaMlp {
                gate_proj: load_linear(
                    src,
                    &format!("{p}.mlp.gate_proj"),
                    h,
                    i_s,
                    c.mlp_bias,
                    device,
                )?,
                up_proj: load_linear(src, &format!("{p}.mlp.up_proj"), h, i_s, c.mlp_bias, device)?,
                down_proj: load_linear(
                    src,
                    &format!("{p}.mlp.down_proj"),
                    i_s,
                    h,
                    c.mlp_bias,
                    device,
                )?,
                backend: PhantomData,
            };
            layers.push(LlamaDecoderLayer {
                self_attn,
                mlp,
                input_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.input_layernorm"),
                    h,
                    c.rms_norm_eps,
                    device,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    c.rms_norm_eps,
                    device,
                )?,
                attn_adapter: Sub::default(),
                mlp_adapter: Sub::default(),
            });
        }
        let embed = src.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let embed_tokens = Embedding {
            weight: Param::from_data(embed, device),
        };
        let norm = RmsNorm::load(src, "model.norm", h, c.rms_norm_eps, device)?;
        let lm_head = if c.tie_word_embeddings {
            // Some checkpoints store the tied head anyway; it equals the embeddings.
            let _ = src.take_optional("lm_head.weight", &[c.vocab_size, h])?;
            None
        } else {
            let w: Tensor<B, 2> =
                Tensor::from_data(src.take("lm_head.weight", &[c.vocab_size, h])?, device);
            Some(burn::nn::Linear {
                weight: Param::from_tensor(w.transpose()),
                bias: None,
            })
        };
        src.finish();
        Ok(Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
                embed_adapter: Emb::default(),
                kv_adapter: Kv::default(),
            },
            lm_head,
            config: config.clone(),
        })
    }
}

impl<B, W, A, Sub, Emb, Kv> LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B>,
    Emb: EmbeddingAdapter<B>,
    Kv: KvAdapter<B>,
{
    /// Final hidden states `[batch, positions, hidden]` (virtual tokens included) and the
    /// number of virtual tokens prepended.
    ///
    /// `input.padding` covers the real tokens only (past and present); the virtual tokens
    /// of the embedding slot and the prefixes of the key/value slot are always attended to,
    /// as peft prepends ones to the attention mask for them.
    pub fn forward_hidden(
        &self,
        input: ForwardInput<'_, B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> (Tensor<B, 3>, usize) {
        let c = &self.config;
        let device = input.ids.device();
        let [batch, seq] = input.ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let emb = self.model.embed_tokens.forward(input.ids.clone());
        let emb = self.model.embed_adapter.adapt_lookup(&input.ids, emb);
        // Virtual tokens are prepended once, on the first pass.
        let (mut h, virt) = match (past, self.model.embed_adapter.virtual_tokens(batch)) {
            (0, Some(v)) => {
                let n = v.dims()[1];
                (Tensor::cat(vec![v, emb], 1), n)
            }
            _ => (emb, 0),
        };
        let queries = seq + virt;
        let prefix = self.model.kv_adapter.num_virtual_tokens();
        let start = prefix + past;
        let inv_freq = c.rope.inv_freq(c.head_dim);
        let (cos_q, sin_q) = rope_tables_for_heads::<B>(
            &inv_freq,
            start..start + queries,
            c.num_attention_heads,
            &device,
        );
        let (cos_k, sin_k) = rope_tables_for_heads::<B>(
            &inv_freq,
            start..start + queries,
            c.num_key_value_heads,
            &device,
        );
        // The padding mask covers the real tokens only; the virtual tokens sit at the start
        // of the sequence (and of the cache, on later passes) and are always attended to, as
        // peft prepends ones to the attention mask on every pass.
        let virt_cached = if past == 0 {
            virt
        } else {
            self.model.embed_adapter.num_virtual_tokens()
        };
        let padding = input.padding.map(|p| {
            p.iter()
                .map(|row| {
                    std::iter::repeat_n(true, virt_cached)
                        .chain(row.iter().copied())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        let mask = (queries > 1 || padding.is_some()).then(|| {
            attention_mask::<B>(
                batch,
                queries,
                past,
                prefix,
                true,
                padding.as_deref(),
                &device,
            )
        });
        let scale = (c.head_dim as f64).powf(-0.5);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let x = layer.input_layernorm.forward(h.clone());
            let a = &layer.self_attn;
            // [batch, seq, heads, head_dim] as the projections write it; rotary embeddings
            // are applied in this layout, then heads move before positions.
            let split =
                |t: Tensor<B, 3>, heads: usize| t.reshape([batch, queries, heads, c.head_dim]);
            let q = apply_rope_bshd(
                split(a.q_proj.forward(x.clone()), c.num_attention_heads),
                &cos_q,
                &sin_q,
            )
            .swap_dims(1, 2);
            let mut k = apply_rope_bshd(
                split(a.k_proj.forward(x.clone()), c.num_key_value_heads),
                &cos_k,
                &sin_k,
            )
            .swap_dims(1, 2);
            let mut v = split(a.v_proj.forward(x.clone()), c.num_key_value_heads).swap_dims(1, 2);
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k, v);
            }
            if let Some((pk, pv)) = self.model.kv_adapter.prefix(i, batch) {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            let o = attention(q, k, v, mask.as_ref(), scale)
                .swap_dims(1, 2)
                .reshape([batch, queries, c.num_attention_heads * c.head_dim]);
            let o = layer.attn_adapter.forward(&x, a.o_proj.forward(o));
            h = h + o;
            let x = layer.post_attention_layernorm.forward(h.clone());
            let m = &layer.mlp;
            let y = m.down_proj.forward(swiglu(
                m.gate_proj.forward(x.clone()),
                m.up_proj.forward(x.clone()),
            ));
            h = h + layer.mlp_adapter.forward(&x, y);
        }
        if let Some(cache) = cache {
            cache.len += queries;
        }
        (self.model.norm.forward(h), virt)
    }

    /// Logits from hidden states.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(l) => l.forward(hidden),
            None => {
                // A 2-D product with the transposed embedding read in place (broadcasting
                // it to rank 3 would copy the whole table on every call).
                let [b, s, d] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                peft_core::fused::linear(hidden.reshape([b * s, d]), w.transpose())
                    .reshape([b, s, v])
            }
        }
    }
}

impl<B, W, A, Sub, Emb, Kv> CausalLm<B>
    for LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B>,
    Emb: EmbeddingAdapter<B>,
    Kv: KvAdapter<B>,
{
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let (h, virt) = self.forward_hidden(input, cache);
        if virt == 0 {
            return h;
        }
        let [b, s, d] = h.dims();
        h.slice([0..b, virt..s, 0..d])
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head(hidden)
    }

    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.num_hidden_layers)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.config.eos_token_ids.clone()
    }
}

impl<B, W, A, Sub, Emb, Kv> AdaptableModel<B>
    for LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B> + AdapterControl,
    Emb: EmbeddingAdapter<B> + AdapterControl,
    Kv: KvAdapter<B> + AdapterControl,
{
    type Weight = W;
    type Linear = A;
    type Sublayer = Sub;
    type Embedding = Emb;
    type KeyValue = Kv;

    fn modules(&self) -> Vec<ModuleInfo> {
        let mut v = vec![
            ModuleInfo::new("model", ModuleKind::Other),
            ModuleInfo::new("model.embed_tokens", ModuleKind::Embedding),
            ModuleInfo::new("model.layers", ModuleKind::Other),
        ];
        for i in 0..self.model.layers.len() {
            let p = format!("model.layers.{i}");
            v.push(ModuleInfo::new(p.clone(), ModuleKind::Other));
            v.push(ModuleInfo::new(format!("{p}.self_attn"), ModuleKind::Other));
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                v.push(ModuleInfo::new(
                    format!("{p}.self_attn.{n}"),
                    ModuleKind::Linear,
                ));
            }
            v.push(ModuleInfo::new(format!("{p}.mlp"), ModuleKind::Other));
            for n in ["gate_proj", "up_proj", "down_proj"] {
                v.push(ModuleInfo::new(format!("{p}.mlp.{n}"), ModuleKind::Linear));
            }
            v.push(ModuleInfo::new(
                format!("{p}.input_layernorm"),
                ModuleKind::Other,
            ));
            v.push(ModuleInfo::new(
                format!("{p}.post_attention_layernorm"),
                ModuleKind::Other,
            ));
        }
        v.push(ModuleInfo::new("model.norm", ModuleKind::Other));
        v.push(ModuleInfo::new("lm_head", ModuleKind::OutputHead));
        v
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B, W, A>)) {
        for (i, l) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            f(&format!("{p}.self_attn.q_proj"), &a.q_proj);
            f(&format!("{p}.self_attn.k_proj"), &a.k_proj);
            f(&format!("{p}.self_attn.v_proj"), &a.v_proj);
            f(&format!("{p}.self_attn.o_proj"), &a.o_proj);
            f(&format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj);
            f(&format!("{p}.mlp.up_proj"), &l.mlp.up_proj);
            f(&format!("{p}.mlp.down_proj"), &l.mlp.down_proj);
        }
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut AdaptedLinear<B, W, A>) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj)?;
            f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj)?;
            f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj)?;
            f(&format!("{p}.self_attn.o_proj"), &mut a.o_proj)?;
            f(&format!("{p}.mlp.gate_proj"), &mut l.mlp.gate_proj)?;
            f(&format!("{p}.mlp.up_proj"), &mut l.mlp.up_proj)?;
            f(&format!("{p}.mlp.down_proj"), &mut l.mlp.down_proj)?;
        }
        Ok(())
    }

    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Sub) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            f(
                &format!("model.layers.{i}.attn_adapter"),
                &mut l.attn_adapter,
            )?;
            f(&format!("model.layers.{i}.mlp_adapter"), &mut l.mlp_adapter)?;
        }
        Ok(())
    }

    fn map_embedding(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Emb) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        f("model.embed_adapter", &mut self.model.embed_adapter)
    }

    fn map_kv(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Kv) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        f("model.kv_adapter", &mut self.model.kv_adapter)
    }
}
