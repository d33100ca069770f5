//! Model configs: Hugging Face `config.json` for the Llama family, GPT-2 and BERT.
//!
//! Field names follow transformers. Both the current rope layout (`rope_parameters`, with
//! `rope_theta` inside) and the older one (`rope_theta` + `rope_scaling`) are read.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// How rotary position frequencies are computed.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Frequencies divided by `factor` (position interpolation).
    Linear {
        /// The interpolation factor.
        factor: f64,
    },
    /// Each frequency divided by its own factor (llama.cpp's `rope_freqs` tensor in GGUF).
    PerFrequency {
        /// One divisor per frequency.
        divisors: Vec<f64>,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength bound (as a fraction of the original context) above which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength bound below which frequencies are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base `theta`.
    pub theta: f64,
    /// The scaling rule.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The inverse frequencies for a head dimension `dim`, as transformers computes them.
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        match &self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::PerFrequency { divisors } => base
                .iter()
                .zip(divisors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Which member of the Llama family (they differ in biases and defaults only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaFlavor {
    /// Llama 2/3, SmolLM2.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 (biases on q, k, v).
    Qwen2,
}

/// The config of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Which family member.
    pub flavor: LlamaFlavor,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embeddings.
    pub rope: RopeConfig,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2; Llama's `attention_bias` also adds one on o).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
}

/// The config of a GPT-2 model.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length (position embeddings).
    pub n_positions: usize,
    /// Width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// MLP width (`n_inner`, default 4 * n_embd).
    pub n_inner: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
}

/// The config of a BERT encoder with a sequence-classification head.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Position embeddings.
    pub max_position_embeddings: usize,
    /// Token-type embeddings.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Number of classification labels (0 when the checkpoint has no classifier).
    pub num_labels: usize,
    /// `gelu` (erf) or `gelu_new`/`gelu_pytorch_tanh` (tanh approximation).
    pub hidden_act: String,
}

/// Any supported architecture's config.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// Llama family.
    Llama(LlamaConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// BERT.
    Bert(BertConfig),
}

/// The architectures `config.json` may name.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2 (incl. SmolLM2), gpt2, bert";

struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, message: String) -> ModelError {
        ModelError::InvalidConfig {
            path: self.path.to_path_buf(),
            message,
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("`{key}` is missing")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .filter(|n| *n < (1 << 40))
                .map(|n| Some(n as usize))
                .ok_or_else(|| {
                    self.err(format!("`{key}` must be a non-negative integer, found {x}"))
                }),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {x}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.v.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn ids(&self, key: &str) -> Vec<u32> {
        match self.v.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|n| n as u32)
                .collect(),
            _ => vec![],
        }
    }
}

fn rope_from(f: &Fields<'_>, default_theta: f64) -> Result<RopeConfig> {
    // transformers >= 5 writes `rope_parameters` (with rope_theta inside); older files
    // write `rope_theta` and `rope_scaling`.
    let params =
        f.v.get("rope_parameters")
            .filter(|p| p.is_object())
            .or_else(|| f.v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = match params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
    {
        Some(t) => t,
        None => f.f64_or("rope_theta", default_theta)?,
    };
    let Some(p) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        p.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(format!("rope `{kind}` needs `{k}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(f.err(format!(
                "rope type `{other}` is not supported (supported: default, linear, llama3)"
            )));
        }
    };
    Ok(RopeConfig { theta, scaling })
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    ///
    /// # Errors
    /// [`ModelError::MissingFile`], [`ModelError::InvalidConfig`] or
    /// [`ModelError::UnknownArchitecture`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path,
                hint: "a Hugging Face model directory needs config.json next to its weights".into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io("read", &path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut cfg = Self::from_json(&v, &path)?;
        // generation_config.json may list more end-of-sequence ids (Llama 3 does).
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path)
            && let Ok(g) = serde_json::from_str::<Value>(&text)
        {
            let extra = Fields {
                v: &g,
                path: &gen_path,
            }
            .ids("eos_token_id");
            let eos = match &mut cfg {
                Self::Llama(c) => Some(&mut c.eos_token_ids),
                Self::Gpt2(c) => Some(&mut c.eos_token_ids),
                Self::Bert(_) => None,
            };
            if let Some(eos) = eos {
                for id in extra {
                    if !eos.contains(&id) {
                        eos.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a `config.json` value; `path` is used in messages.
    ///
    /// # Errors
    /// As [`ModelConfig::from_dir`].
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let flavor = match model_type {
            "llama" => Some(LlamaFlavor::Llama),
            "mistral" => Some(LlamaFlavor::Mistral),
            "qwen2" => Some(LlamaFlavor::Qwen2),
            _ => None,
        };
        if let Some(flavor) = flavor {
            let hidden = f.usize("hidden_size")?;
            let heads = f.usize("num_attention_heads")?;
            if heads == 0 || hidden == 0 {
                return Err(
                    f.err("`hidden_size` and `num_attention_heads` must be positive".into())
                );
            }
            let kv = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
            if kv == 0 || heads % kv != 0 {
                return Err(f.err(format!(
                    "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})"
                )));
            }
            let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads);
            if head_dim == 0 || head_dim % 2 != 0 {
                return Err(f.err(format!(
                    "head_dim must be even and positive, found {head_dim}"
                )));
            }
            let default_theta = if flavor == LlamaFlavor::Qwen2 {
                1_000_000.0
            } else {
                10_000.0
            };
            let attention_bias = f.bool_or("attention_bias", false);
            let act = v
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu");
            if act != "silu" {
                return Err(f.err(format!(
                    "hidden_act `{act}` is not supported for {model_type} (only silu)"
                )));
            }
            return Ok(Self::Llama(LlamaConfig {
                flavor,
                vocab_size: f.usize("vocab_size")?,
                hidden_size: hidden,
                intermediate_size: f.usize("intermediate_size")?,
                num_hidden_layers: f.usize("num_hidden_layers")?,
                num_attention_heads: heads,
                num_key_value_heads: kv,
                head_dim,
                rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
                rope: rope_from(&f, default_theta)?,
                max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
                tie_word_embeddings: f.bool_or("tie_word_embeddings", false),
                qkv_bias: flavor == LlamaFlavor::Qwen2 || attention_bias,
                o_bias: flavor == LlamaFlavor::Llama && attention_bias,
                mlp_bias: f.bool_or("mlp_bias", false),
                bos_token_id: f.ids("bos_token_id").first().copied(),
                eos_token_ids: f.ids("eos_token_id"),
            }));
        }
        match model_type {
            "gpt2" => {
                let n_embd = f.usize("n_embd")?;
                let n_head = f.usize("n_head")?;
                if n_head == 0 || n_embd % n_head != 0 {
                    return Err(f.err(format!(
                        "n_embd ({n_embd}) must be a multiple of n_head ({n_head})"
                    )));
                }
                Ok(Self::Gpt2(Gpt2Config {
                    vocab_size: f.usize("vocab_size")?,
                    n_positions: f.usize("n_positions")?,
                    n_embd,
                    n_layer: f.usize("n_layer")?,
                    n_head,
                    n_inner: f.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
                    layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
                    eos_token_ids: f.ids("eos_token_id"),
                }))
            }
            "bert" => {
                let hidden = f.usize("hidden_size")?;
                let heads = f.usize("num_attention_heads")?;
                if heads == 0 || hidden % heads != 0 {
                    return Err(f.err(format!(
                        "hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})"
                    )));
                }
                let num_labels = v
                    .get("id2label")
                    .and_then(Value::as_object)
                    .map(|m| m.len())
                    .or(f.opt_usize("num_labels")?)
                    .unwrap_or(0);
                Ok(Self::Bert(BertConfig {
                    vocab_size: f.usize("vocab_size")?,
                    hidden_size: hidden,
                    num_hidden_layers: f.usize("num_hidden_layers")?,
                    num_attention_heads: heads,
                    intermediate_size: f.usize("intermediate_size")?,
                    max_position_embeddings: f.usize("max_position_embeddings")?,
                    type_vocab_size: f.opt_usize("type_vocab_size")?.unwrap_or(2),
                    layer_norm_eps: f.f64_or("layer_norm_eps", 1e-12)?,
                    num_labels,
                    hidden_act: v
                        .get("hidden_act")
                        .and_then(Value::as_str)
                        .unwrap_or("gelu")
                        .to_string(),
                }))
            }
            other => Err(ModelError::UnknownArchitecture {
                found: if other.is_empty() {
                    "(no model_type)".to_string()
                } else {
                    other.to_string()
                },
                path: path.to_path_buf(),
                supported: SUPPORTED_ARCHITECTURES.into(),
            }),
        }
    }
}
