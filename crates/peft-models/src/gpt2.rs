//! GPT-2 (Radford et al., 2019): learned position embeddings, pre-LayerNorm blocks, fused
//! `c_attn` (q, k, v) and `gelu_new`. Hugging Face stores its Conv1D weights `[in, out]`;
//! they are turned into the `[out, in]` layout once, at loading, so adapters see ordinary
//! linear layers (peft's `fan_in_fan_out` concerns only the file layout of the base).
//!
//! Adapter slots: every `transformer.h.N.attn.{c_attn,c_proj}` and
//! `transformer.h.N.mlp.{c_fc,c_proj}`; `transformer.h.N.attn_adapter` / `mlp_adapter`.

use std::marker::PhantomData;

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::prelude::*;
use peft_core::adapters::{AdaptedLinear, AdapterControl, LinearAdapterControl};
use peft_core::inject::{LinearWeight, NoAdapter, SublayerAdapter};
use peft_core::model::AdaptableModel;
use peft_core::target::{ModuleInfo, ModuleKind};

use crate::config::Gpt2Config;
use crate::error::Result;
use crate::nn::{LayerNorm, attention, attention_mask, gelu_tanh};
use crate::weights::WeightSource;
use crate::{CausalLm, ForwardInput, KvCache};

/// Attention: fused q/k/v projection and output projection.
#[derive(Module, Debug)]
pub struct Gpt2Attention<B: Backend, Lin> {
    /// q, k, v in one projection `[hidden -> 3 * hidden]`.
    pub c_attn: Lin,
    /// Output projection.
    pub c_proj: Lin,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// MLP: `c_proj(gelu_new(c_fc(x)))`.
#[derive(Module, Debug)]
pub struct Gpt2Mlp<B: Backend, Lin> {
    /// Up projection.
    pub c_fc: Lin,
    /// Down projection.
    pub c_proj: Lin,
    /// Ties the module to its backend.
    pub backend: PhantomData<B>,
}

/// One block.
#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend, Lin, Sub> {
    /// Norm before attention.
    pub ln_1: LayerNorm<B>,
    /// Attention.
    pub attn: Gpt2Attention<B, Lin>,
    /// Norm before the MLP.
    pub ln_2: LayerNorm<B>,
    /// MLP.
    pub mlp: Gpt2Mlp<B, Lin>,
    /// Adapter slot after attention.
    pub attn_adapter: Sub,
    /// Adapter slot after the MLP.
    pub mlp_adapter: Sub,
}

/// The transformer stack (`transformer.` in Hugging Face names).
#[derive(Module, Debug)]
pub struct Gpt2Model<B: Backend, Lin, Sub> {
    /// Token embeddings.
    pub wte: Embedding<B>,
    /// Position embeddings.
    pub wpe: Embedding<B>,
    /// Blocks.
    pub h: Vec<Gpt2Block<B, Lin, Sub>>,
    /// Final norm.
    pub ln_f: LayerNorm<B>,
}

/// GPT-2 with its (tied) language-model head.
#[derive(Module, Debug)]
pub struct Gpt2LMHeadModel<B: Backend, Lin, Sub> {
    /// The transformer.
    pub transformer: Gpt2Model<B, Lin, Sub>,
    /// The config.
    #[module(skip)]
    pub config: Gpt2Config,
}

/// A plain GPT-2.
pub type Gpt2<B> = Gpt2LMHeadModel<B, AdaptedLinear<B, burn::nn::Linear<B>, NoAdapter>, NoAdapter>;

fn load_conv1d<B: Backend, W: LinearWeight<B>, A: Default>(
    src: &mut dyn WeightSource,
    prefix: &str,
    inp: usize,
    out: usize,
    device: &B::Device,
) -> Result<AdaptedLinear<B, W, A>> {
    // Conv1D stores [in, out].
    let w: Tensor<B, 2> =
        Tensor::from_data(src.take(&format!("{prefix}.weight"), &[inp, out])?, device);
    let b = Tensor::from_data(src.take(&format!("{prefix}.bias"), &[out])?, device);
    Ok(AdaptedLinear::new(W::from_dense(w.transpose(), Some(b))))
}

impl<B, W, A, Sub> Gpt2LMHeadModel<B, AdaptedLinear<B, W, A>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    A: Default,
    Sub: Default,
{
    /// Loads the weights named as in Hugging Face checkpoints.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor, or an unreadable file.
    pub fn load(
        config: &Gpt2Config,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let d = c.n_embd;
        let eps = c.layer_norm_epsilon;
        let mut h = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("transformer.h.{i}");
            h.push(Gpt2Block {
                ln_1: LayerNorm::load(src, &format!("{p}.ln_1"), d, eps, device)?,
                attn: Gpt2Attention {
                    c_attn: load_conv1d(src, &format!("{p}.attn.c_attn"), d, 3 * d, device)?,
                    c_proj: load_conv1d(src, &format!("{p}.attn.c_proj"), d, d, device)?,
                    backend: PhantomData,
                },
                ln_2: LayerNorm::load(src, &format!("{p}.ln_2"), d, eps, device)?,
                mlp: Gpt2Mlp {
                    c_fc: load_conv1d(src, &format!("{p}.mlp.c_fc"), d, c.n_inner, device)?,
                    c_proj: load_conv1d(src, &format!("{p}.mlp.c_proj"), c.n_inner, d, device)?,
                    backend: PhantomData,
                },
                attn_adapter: Sub::default(),
                mlp_adapter: Sub::default(),
            });
            // Older checkpoints carry attention-mask buffers; they are recomputed here.
            let _ = src.take_optional(
                &format!("{p}.attn.bias"),
                &[1, 1, c.n_positions, c.n_positions],
            );
            let _ = src.take_optional(&format!("{p}.attn.masked_bias"), &[]);
        }
        let wte = src.take("transformer.wte.weight", &[c.vocab_size, d])?;
        let wpe = src.take("transformer.wpe.weight", &[c.n_positions, d])?;
        let ln_f = LayerNorm::load(src, "transformer.ln_f", d, eps, device)?;
        let _ = src.take_optional("lm_head.weight", &[c.vocab_size, d])?;
        src.finish();
        Ok(Self {
            transformer: Gpt2Model {
                wte: Embedding {
                    weight: Param::from_data(wte, device),
                },
                wpe: Embedding {
                    weight: Param::from_data(wpe, device),
                },
                h,
                ln_f,
            },
            config: config.clone(),
        })
    }
}

impl<B, W, A, Sub> CausalLm<B> for Gpt2LMHeadModel<B, AdaptedLinear<B, W, A>, Sub>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    Sub: SublayerAdapter<B>,
{
    fn hidden(
        &self,
        input: ForwardInput<'_, B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let c = &self.config;
        let t = &self.transformer;
        let device = input.ids.device();
        let [batch, seq] = input.ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        // Learned absolute positions count real tokens only, as transformers' position ids
        // from the attention mask (`cumsum - 1`), so left padding does not shift them.
        let pos = match input.padding {
            None => Tensor::<B, 1, Int>::arange(past as i64..(past + seq) as i64, &device)
                .unsqueeze::<2>()
                .repeat_dim(0, batch),
            Some(p) => {
                let mut v = Vec::with_capacity(batch * seq);
                for row in p {
                    let mut real = row.iter().take(past).filter(|&&r| r).count() as i64;
                    for i in past..past + seq {
                        let is_real = row.get(i).copied().unwrap_or(true);
                        v.push(if is_real { real } else { 0 });
                        real += i64::from(is_real);
                    }
                }
                Tensor::<B, 2, Int>::from_data(TensorData::new(v, [batch, seq]), &device)
            }
        };
        let mut h = t.wte.forward(input.ids) + t.wpe.forward(pos);
        let mask = (seq > 1 || input.padding.is_some())
            .then(|| attention_mask::<B>(batch, seq, past, 0, true, input.padding, &device));
        let hd = c.n_embd / c.n_head;
        let scale = (hd as f64).powf(-0.5);
        for (i, block) in t.h.iter().enumerate() {
            let x = block.ln_1.forward(h.clone());
            let qkv = block.attn.c_attn.forward(x.clone());
            let part = |j: usize| {
                qkv.clone()
                    .slice([0..batch, 0..seq, j * c.n_embd..(j + 1) * c.n_embd])
                    .reshape([batch, seq, c.n_head, hd])
                    .swap_dims(1, 2)
            };
            let (q, mut k, mut v) = (part(0), part(1), part(2));
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k, v);
            }
            let o = attention(q, k, v, mask.as_ref(), scale)
                .swap_dims(1, 2)
                .reshape([batch, seq, c.n_embd]);
            h = h + block.attn_adapter.forward(&x, block.attn.c_proj.forward(o));
            let x = block.ln_2.forward(h.clone());
            let y = block
                .mlp
                .c_proj
                .forward(gelu_tanh(block.mlp.c_fc.forward(x.clone())));
            h = h + block.mlp_adapter.forward(&x, y);
        }
        if let Some(cache) = cache {
            cache.len += seq;
        }
        t.ln_f.forward(h)
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        // A 2-D product with the transposed embedding read in place (broadcasting it to
        // rank 3 would copy the whole table on every call).
        let [b, s, d] = hidden.dims();
        let w = self.transformer.wte.weight.val();
        let v = w.dims()[0];
        hidden
            .reshape([b * s, d])
            .matmul(w.transpose())
            .reshape([b, s, v])
    }

    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.n_layer)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.config.eos_token_ids.clone()
    }
}

impl<B, W, A, Sub> AdaptableModel<B> for Gpt2LMHeadModel<B, AdaptedLinear<B, W, A>, Sub>
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
            ModuleInfo::new("transformer", ModuleKind::Other),
            ModuleInfo::new("transformer.wte", ModuleKind::Embedding),
            ModuleInfo::new("transformer.wpe", ModuleKind::Embedding),
            ModuleInfo::new("transformer.h", ModuleKind::Other),
        ];
        for i in 0..self.transformer.h.len() {
            let p = format!("transformer.h.{i}");
            v.push(ModuleInfo::new(p.clone(), ModuleKind::Other));
            v.push(ModuleInfo::new(format!("{p}.ln_1"), ModuleKind::Other));
            v.push(ModuleInfo::new(format!("{p}.attn"), ModuleKind::Other));
            v.push(ModuleInfo::new(
                format!("{p}.attn.c_attn"),
                ModuleKind::Linear,
            ));
            v.push(ModuleInfo::new(
                format!("{p}.attn.c_proj"),
                ModuleKind::Linear,
            ));
            v.push(ModuleInfo::new(format!("{p}.ln_2"), ModuleKind::Other));
            v.push(ModuleInfo::new(format!("{p}.mlp"), ModuleKind::Other));
            v.push(ModuleInfo::new(format!("{p}.mlp.c_fc"), ModuleKind::Linear));
            v.push(ModuleInfo::new(
                format!("{p}.mlp.c_proj"),
                ModuleKind::Linear,
            ));
        }
        v.push(ModuleInfo::new("transformer.ln_f", ModuleKind::Other));
        v.push(ModuleInfo::new("lm_head", ModuleKind::OutputHead));
        v
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B, W, A>)) {
        for (i, b) in self.transformer.h.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            f(&format!("{p}.attn.c_attn"), &b.attn.c_attn);
            f(&format!("{p}.attn.c_proj"), &b.attn.c_proj);
            f(&format!("{p}.mlp.c_fc"), &b.mlp.c_fc);
            f(&format!("{p}.mlp.c_proj"), &b.mlp.c_proj);
        }
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut AdaptedLinear<B, W, A>) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        for (i, b) in self.transformer.h.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            f(&format!("{p}.attn.c_attn"), &mut b.attn.c_attn)?;
            f(&format!("{p}.attn.c_proj"), &mut b.attn.c_proj)?;
            f(&format!("{p}.mlp.c_fc"), &mut b.mlp.c_fc)?;
            f(&format!("{p}.mlp.c_proj"), &mut b.mlp.c_proj)?;
        }
        Ok(())
    }

    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Sub) -> peft_core::Result<()>,
    ) -> peft_core::Result<()> {
        for (i, b) in self.transformer.h.iter_mut().enumerate() {
            f(
                &format!("transformer.h.{i}.attn_adapter"),
                &mut b.attn_adapter,
            )?;
            f(
                &format!("transformer.h.{i}.mlp_adapter"),
                &mut b.mlp_adapter,
            )?;
        }
        Ok(())
    }
}
