//! QLoRA on the Llama family: loading and quantizing models, saving them in the
//! bitsandbytes layout, merging adapters, and measuring the base's device memory.

use std::marker::PhantomData;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use peft_core::adapters::{AdaptedLinear, LinearAdapterControl};
use peft_core::inject::{LinearWeight, NoAdapter};
use peft_core::model::AdaptableModel;
use peft_lora::LoraSlot;
use peft_models::config::ModelConfig;
use peft_models::llama::{
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel, LlamaWith,
};

use crate::backend::QuantBackend;
use crate::bnb::{
    BnbCheckpoint, RawTensor, bnb_tensors, is_bnb_checkpoint, quantization_config_json, raw_f32,
    write_safetensors,
};
use crate::error::{QloraError, Result};
use crate::linear::{Linear4bit, with_quant_config};
use crate::quant::QuantConfig;

/// A Llama-family model with a 4-bit frozen base and LoRA slots on every linear layer.
pub type QloraLlama<B> = LlamaForCausalLM<
    B,
    AdaptedLinear<B, Linear4bit<B>, LoraSlot<B>>,
    NoAdapter,
    NoAdapter,
    NoAdapter,
>;

/// Rebuilds a Llama with every linear layer's weight storage mapped through `f` (called
/// with the layer's Hugging Face path); adapters and every other module are kept.
///
/// # Errors
/// The first error `f` returns.
pub fn map_llama_weights<B, W, V, A, Sub, Emb, Kv>(
    model: LlamaWith<B, W, A, Sub, Emb, Kv>,
    mut f: impl FnMut(&str, W) -> Result<V>,
) -> Result<LlamaWith<B, V, A, Sub, Emb, Kv>>
where
    B: Backend,
{
    let mut lin = |path: String, l: AdaptedLinear<B, W, A>| -> Result<AdaptedLinear<B, V, A>> {
        Ok(AdaptedLinear {
            base: f(&path, l.base)?,
            adapter: l.adapter,
            backend: PhantomData,
        })
    };
    let LlamaForCausalLM {
        model: m,
        lm_head,
        config,
    } = model;
    let mut layers = Vec::with_capacity(m.layers.len());
    for (i, l) in m.layers.into_iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = l.self_attn;
        let mlp = l.mlp;
        layers.push(LlamaDecoderLayer {
            self_attn: LlamaAttention {
                q_proj: lin(format!("{p}.self_attn.q_proj"), a.q_proj)?,
                k_proj: lin(format!("{p}.self_attn.k_proj"), a.k_proj)?,
                v_proj: lin(format!("{p}.self_attn.v_proj"), a.v_proj)?,
                o_proj: lin(format!("{p}.self_attn.o_proj"), a.o_proj)?,
                backend: PhantomData,
            },
            mlp: LlamaMlp {
                gate_proj: lin(format!("{p}.mlp.gate_proj"), mlp.gate_proj)?,
                up_proj: lin(format!("{p}.mlp.up_proj"), mlp.up_proj)?,
                down_proj: lin(format!("{p}.mlp.down_proj"), mlp.down_proj)?,
                backend: PhantomData,
            },
            input_layernorm: l.input_layernorm,
            post_attention_layernorm: l.post_attention_layernorm,
            attn_adapter: l.attn_adapter,
            mlp_adapter: l.mlp_adapter,
        });
    }
    Ok(LlamaForCausalLM {
        model: LlamaModel {
            embed_tokens: m.embed_tokens,
            layers,
            norm: m.norm,
            embed_adapter: m.embed_adapter,
            kv_adapter: m.kv_adapter,
        },
        lm_head,
        config,
    })
}

/// Quantizes the linear layers of a loaded model (any weight storage, adapters kept) to
/// 4 bits with `config`. The embeddings, norms and output head stay f32, as bitsandbytes
/// leaves them.
///
/// # Errors
/// [`QloraError::InvalidConfig`] for an unsupported block size.
pub fn quantize_llama<B, W, A, Sub, Emb, Kv>(
    model: LlamaWith<B, W, A, Sub, Emb, Kv>,
    config: &QuantConfig,
) -> Result<LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>>
where
    B: QuantBackend,
    W: LinearWeight<B>,
{
    config.validate()?;
    map_llama_weights(model, |_, w: W| {
        Linear4bit::quantize(w.weight(), w.bias(), config)
    })
}

/// Dequantizes every 4-bit layer into a dense f32 `burn::nn::Linear` (bitsandbytes'
/// dequantized values), adapters kept.
pub fn dequantize_llama<B, A, Sub, Emb, Kv>(
    model: LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>,
) -> LlamaWith<B, burn::nn::Linear<B>, A, Sub, Emb, Kv>
where
    B: QuantBackend,
{
    let dense = map_llama_weights(model, |_, w: Linear4bit<B>| {
        Ok(<burn::nn::Linear<B> as LinearWeight<B>>::from_dense(
            w.weight(),
            w.bias(),
        ))
    });
    match dense {
        Ok(m) => m,
        // The closure never fails.
        Err(_) => unreachable!("dequantizing cannot fail"),
    }
}

/// Loads a Llama-family model as 4-bit: a bitsandbytes 4-bit checkpoint directory loads
/// with its own bytes and settings (`config` is then ignored); any other Hugging Face
/// directory or `.gguf` file is loaded through `peft_models::load_llama` and each linear
/// layer is quantized with `config` as it is read (the dense model is never held whole).
///
/// # Errors
/// A missing or malformed checkpoint, or an unsupported block size.
pub fn load_quantized_llama<B, A, Sub, Emb, Kv>(
    path: &Path,
    config: &QuantConfig,
    device: &B::Device,
) -> Result<LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>>
where
    B: QuantBackend,
    A: Default,
    Sub: Default,
    Emb: Default,
    Kv: Default,
{
    if path.is_dir() && is_bnb_checkpoint(path) {
        return load_bnb_llama(path, device);
    }
    with_quant_config(*config, || {
        peft_models::load_llama::<B, Linear4bit<B>, A, Sub, Emb, Kv>(path, device)
    })?
    .map_err(QloraError::from)
}

/// [`load_quantized_llama`] for the QLoRA model type (LoRA slots, no other adapters).
///
/// # Errors
/// As [`load_quantized_llama`].
pub fn load_qlora_llama<B: QuantBackend>(
    path: &Path,
    config: &QuantConfig,
    device: &B::Device,
) -> Result<QloraLlama<B>> {
    load_quantized_llama(path, config, device)
}

/// Loads a Hugging Face directory saved by transformers with a bitsandbytes 4-bit
/// `quantization_config`: the 4-bit layers keep their exact codes and statistics.
///
/// # Errors
/// A missing or malformed checkpoint, a model that is not Llama-family, or 4-bit tensors
/// that are inconsistent.
pub fn load_bnb_llama<B, A, Sub, Emb, Kv>(
    dir: &Path,
    device: &B::Device,
) -> Result<LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>>
where
    B: QuantBackend,
    A: Default,
    Sub: Default,
    Emb: Default,
    Kv: Default,
{
    let ModelConfig::Llama(config) = ModelConfig::from_dir(dir)? else {
        return Err(QloraError::checkpoint(
            dir,
            "not a Llama-family model; 4-bit loading supports Llama, Mistral, Qwen2 and SmolLM2",
        ));
    };
    let mut src = BnbCheckpoint::open(dir)?;
    Ok(LlamaForCausalLM::load(&config, &mut src, device)?)
}

/// Saves the base model in transformers' bitsandbytes 4-bit layout: `config.json` (with
/// `quantization_config`) and `model.safetensors`, loadable with transformers'
/// `from_pretrained` (bitsandbytes installed). Adapters are not written (save them with
/// `peft_lora::save_adapter`).
///
/// # Errors
/// [`QloraError::Io`]; [`QloraError::InvalidConfig`] when layers use different settings
/// (transformers has one `quantization_config` per model).
pub fn save_bnb_llama<B, A, Sub, Emb, Kv>(
    model: &LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>,
    dir: &Path,
) -> Result<()>
where
    B: QuantBackend,
{
    fn vec1<B: Backend>(p: &Param<Tensor<B, 1>>) -> Vec<f32> {
        p.val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default()
    }
    fn mat<B: Backend>(t: Tensor<B, 2>) -> (Vec<usize>, Vec<f32>) {
        let dims = t.dims().to_vec();
        (
            dims,
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default(),
        )
    }
    let mut tensors: Vec<RawTensor> = vec![];
    let mut config: Option<QuantConfig> = None;
    let mut add_linear =
        |prefix: String, l: &Linear4bit<B>, out: &mut Vec<RawTensor>| -> Result<()> {
            match config {
                Some(c) if c != l.meta.config => {
                    return Err(QloraError::InvalidConfig(format!(
                        "layer `{prefix}` is quantized with {:?} but earlier layers with {c:?}; \
                     a transformers checkpoint has one quantization_config",
                        l.meta.config
                    )));
                }
                _ => config = Some(l.meta.config),
            }
            out.extend(bnb_tensors(&prefix, l));
            Ok(())
        };
    let (shape, v) = mat(model.model.embed_tokens.weight.val());
    tensors.push(raw_f32("model.embed_tokens.weight".into(), shape, &v));
    for (i, l) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        for (n, lin) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &l.mlp.gate_proj),
            ("mlp.up_proj", &l.mlp.up_proj),
            ("mlp.down_proj", &l.mlp.down_proj),
        ] {
            add_linear(format!("{p}.{n}"), &lin.base, &mut tensors)?;
        }
        for (n, norm) in [
            ("input_layernorm", &l.input_layernorm),
            ("post_attention_layernorm", &l.post_attention_layernorm),
        ] {
            let v = vec1(&norm.weight);
            tensors.push(raw_f32(format!("{p}.{n}.weight"), vec![v.len()], &v));
        }
    }
    let v = vec1(&model.model.norm.weight);
    tensors.push(raw_f32("model.norm.weight".into(), vec![v.len()], &v));
    if let Some(head) = &model.lm_head {
        let (shape, v) = mat(head.weight.val().transpose());
        tensors.push(raw_f32("lm_head.weight".into(), shape, &v));
    }
    std::fs::create_dir_all(dir).map_err(|e| QloraError::io("create directory", dir, e))?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let mut cfg = peft_models::export::llama_config_json(&model.config)?;
    cfg["quantization_config"] = quantization_config_json(&config.unwrap_or_default());
    cfg["dtype"] = "float32".into();
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| QloraError::InvalidConfig(format!("config.json: {e}")))?;
    peft_core::format::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    Ok(())
}

/// The error requantizing made in one layer (or in all of them): the difference between
/// the merged f32 weight `W + s B A` and its 4-bit requantization.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequantError {
    /// Number of weights.
    pub weights: usize,
    /// Largest absolute difference.
    pub max_abs: f32,
    /// Root mean square difference.
    pub rms: f32,
    /// `||requantized - merged||_F / ||merged||_F`.
    pub relative: f32,
}

/// What [`merge_requantize`] did: the error of every layer it rewrote, and overall.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeReport {
    /// Per layer: Hugging Face path and its error.
    pub layers: Vec<(String, RequantError)>,
    /// Over all rewritten layers.
    pub total: RequantError,
}

fn error_stats<B: Backend>(merged: Tensor<B, 2>, requant: Tensor<B, 2>) -> (usize, f32, f64, f64) {
    let n = merged.shape().num_elements();
    let d = requant - merged.clone();
    let max = d.clone().abs().max().into_scalar().elem::<f32>();
    let sq = d.powi_scalar(2).sum().into_scalar().elem::<f64>();
    let ref_sq = merged.powi_scalar(2).sum().into_scalar().elem::<f64>();
    (n, max, sq, ref_sq)
}

/// Merges the named LoRA adapters (all active ones when `None`) into the 4-bit base and
/// requantizes it with each layer's settings: the model stays 4-bit (and small), at the
/// price of the requantization error, which is measured and returned. Layers without an
/// adapter to merge are left untouched. With `safe`, a non-finite merge is refused.
///
/// Unmerging afterwards subtracts the adapter from the requantized weight, so it does not
/// restore the original codes.
///
/// # Errors
/// As the adapters' merge ([`LinearAdapterControl::merge_adapters`]).
pub fn merge_requantize<B, A, M>(
    model: &mut M,
    names: Option<&[String]>,
    safe: bool,
) -> Result<MergeReport>
where
    B: QuantBackend,
    A: LinearAdapterControl<B>,
    M: AdaptableModel<B, Weight = Linear4bit<B>, Linear = A>,
{
    let mut report = MergeReport::default();
    let (mut sq, mut ref_sq) = (0.0f64, 0.0f64);
    model.map_linears(&mut |path, layer| {
        let before = layer.adapter.merged_adapters();
        let mut adapter = layer.adapter.clone();
        let (w, b) = adapter.merge_adapters(names, layer.base.weight(), layer.base.bias(), safe)?;
        if adapter.merged_adapters() == before {
            return Ok(());
        }
        layer.base.set_weight(w.clone(), b)?;
        layer.adapter = adapter;
        let (n, max, s, r) = error_stats(w, layer.base.weight());
        sq += s;
        ref_sq += r;
        report.total.weights += n;
        report.total.max_abs = report.total.max_abs.max(max);
        report.layers.push((
            path.to_string(),
            RequantError {
                weights: n,
                max_abs: max,
                rms: (s / n as f64).sqrt() as f32,
                relative: (s / r.max(f64::MIN_POSITIVE)).sqrt() as f32,
            },
        ));
        Ok(())
    })?;
    if report.total.weights > 0 {
        report.total.rms = (sq / report.total.weights as f64).sqrt() as f32;
        report.total.relative = (sq / ref_sq.max(f64::MIN_POSITIVE)).sqrt() as f32;
    }
    Ok(report)
}

/// Dequantizes the base to f32 and merges the named LoRA adapters (all active ones when
/// `None`) into it exactly: the result is a dense model (`W + s B A` with bitsandbytes'
/// dequantized `W`), ready for `peft_models::export`.
///
/// # Errors
/// As the adapters' merge.
pub fn merge_to_dense<B, A, Sub, Emb, Kv>(
    model: LlamaWith<B, Linear4bit<B>, A, Sub, Emb, Kv>,
    names: Option<&[String]>,
    safe: bool,
) -> Result<LlamaWith<B, burn::nn::Linear<B>, A, Sub, Emb, Kv>>
where
    B: QuantBackend,
    A: LinearAdapterControl<B>,
{
    map_llama_weights_mut(dequantize_llama(model), |l| {
        l.merge(names, safe).map_err(QloraError::from)
    })
}

fn map_llama_weights_mut<B, W, A, Sub, Emb, Kv>(
    mut model: LlamaWith<B, W, A, Sub, Emb, Kv>,
    mut f: impl FnMut(&mut AdaptedLinear<B, W, A>) -> Result<()>,
) -> Result<LlamaWith<B, W, A, Sub, Emb, Kv>>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
{
    for l in &mut model.model.layers {
        let a = &mut l.self_attn;
        for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            f(lin)?;
        }
        let m = &mut l.mlp;
        for lin in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
            f(lin)?;
        }
    }
    Ok(model)
}

/// Device memory of a model's quantized linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BaseMemory {
    /// Number of quantized weights (`sum out * in`).
    pub weights: usize,
    /// Bytes they occupy on the device: codes, statistics and code tables.
    pub bytes: usize,
}

impl BaseMemory {
    /// Bytes per quantized weight (0.5 for the codes, about 0.517 with double quantization
    /// at block size 64 on layers of realistic size).
    pub fn bytes_per_parameter(&self) -> f64 {
        if self.weights == 0 {
            0.0
        } else {
            self.bytes as f64 / self.weights as f64
        }
    }
}

/// Measures the device memory of every 4-bit linear layer of a model (biases, embeddings,
/// norms and the output head are not counted: they are not quantized).
pub fn base_memory<B, M>(model: &M) -> BaseMemory
where
    B: QuantBackend,
    M: AdaptableModel<B, Weight = Linear4bit<B>>,
{
    let mut m = BaseMemory::default();
    model.visit_linears(&mut |_, l| {
        m.weights += l.base.num_weights();
        m.bytes += l.base.device_bytes();
    });
    m
}
