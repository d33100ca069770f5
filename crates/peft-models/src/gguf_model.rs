//! Models from GGUF files: the Llama family (`general.architecture` = `llama`, `mistral`,
//! `qwen2`), with every tensor dequantized to f32 as transformers does when it loads a GGUF.
//!
//! llama.cpp's converter reorders the rows of `attn_q` / `attn_k` of `llama` models for its
//! interleaved rotary layout; [`GgufSource`] undoes that per head,
//! `W_hf[h*hd + s*hd/2 + i] = W_gguf[h*hd + 2i + s]`, so the weights equal the Hugging
//! Face ones and the same attention code serves both.

use std::collections::BTreeSet;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::{LlamaConfig, LlamaFlavor, RopeConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::{GgufTokenizerParts, Tokenizer};
use crate::weights::WeightSource;
use peft_core::inject::LinearWeight;

/// Hugging Face name -> GGUF name for the Llama family.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let simple = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (n, tail) = rest.split_once('.')?;
    let (module, param) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{param}"))
}

/// Tensors of a GGUF file under Hugging Face names, dequantized to f32.
#[derive(Debug)]
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    unpermute: Option<(usize, usize, usize)>,
    taken: BTreeSet<String>,
}

impl<'a> GgufSource<'a> {
    /// A source over `file`. `heads` = (query heads, key/value heads, head_dim) when q/k rows
    /// must be restored to the Hugging Face order (`llama` architecture).
    pub fn new(file: &'a GgufFile, unpermute: Option<(usize, usize, usize)>) -> Self {
        Self {
            file,
            unpermute,
            taken: BTreeSet::new(),
        }
    }
}

/// Undoes llama.cpp's per-head row interleaving of a `[heads * hd, cols]` matrix (or a
/// `[heads * hd]` bias with `cols` = 1).
pub fn unpermute_rows(data: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    let half = hd / 2;
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let dst = (h * hd + s * half + i) * cols;
                let src = (h * hd + 2 * i + s) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

impl WeightSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, name: &str) -> bool {
        hf_to_gguf(name).is_some_and(|g| self.file.tensor(&g).is_some())
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        hf_to_gguf(name)
            .and_then(|g| self.file.tensor(&g))
            .map(|t| t.shape())
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
            expected: expected.to_vec(),
            path: self.file.path().to_path_buf(),
        };
        let g = hf_to_gguf(name).ok_or_else(missing)?;
        let Some(info) = self.file.tensor(&g) else {
            return Err(missing());
        };
        // The shape is checked before the data is read.
        if info.shape() != expected {
            return Err(ModelError::ShapeMismatch {
                name: g,
                expected: expected.to_vec(),
                found: info.shape(),
                path: self.file.path().to_path_buf(),
            });
        }
        let (shape, mut data) = self.file.read_tensor_f32(&g)?;
        crate::weights::check_finite(&g, &data, self.file.path())?;
        if let Some((qh, kvh, hd)) = self.unpermute {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            if g.ends_with("attn_q.weight") || g.ends_with("attn_q.bias") {
                data = unpermute_rows(&data, qh, hd, cols);
            } else if g.ends_with("attn_k.weight") || g.ends_with("attn_k.bias") {
                data = unpermute_rows(&data, kvh, hd, cols);
            }
        }
        self.taken.insert(g);
        Ok(TensorData::new(data, shape))
    }

    fn untaken(&self) -> Vec<String> {
        self.file
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| !self.taken.contains(n) && n != "rope_freqs.weight")
            .collect()
    }
}

fn meta_usize(file: &GgufFile, key: &str) -> Result<usize> {
    file.get(key)
        .and_then(GgufValue::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| ModelError::InvalidConfig {
            path: file.path().to_path_buf(),
            message: format!("GGUF metadata `{key}` is missing or not an integer"),
        })
}

/// The Llama-family config described by a GGUF file's metadata.
///
/// # Errors
/// [`ModelError::UnknownArchitecture`] or [`ModelError::InvalidConfig`].
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("")
        .to_string();
    let flavor = match arch.as_str() {
        "llama" => LlamaFlavor::Llama,
        "mistral" => LlamaFlavor::Mistral,
        "qwen2" => LlamaFlavor::Qwen2,
        other => {
            return Err(ModelError::UnknownArchitecture {
                found: other.to_string(),
                path: file.path().to_path_buf(),
                supported: "llama, mistral, qwen2 (GGUF)".into(),
            });
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta_usize(file, &k("embedding_length"))?;
    let heads = meta_usize(file, &k("attention.head_count"))?;
    let kv = file
        .get(&k("attention.head_count_kv"))
        .and_then(GgufValue::as_u64)
        .map_or(heads, |v| v as usize);
    if heads == 0 || kv == 0 || heads % kv != 0 {
        return Err(ModelError::InvalidConfig {
            path: file.path().to_path_buf(),
            message: format!("head counts {heads}/{kv} are not valid"),
        });
    }
    let head_dim = file
        .get(&k("attention.key_length"))
        .and_then(GgufValue::as_u64)
        .map_or(hidden / heads, |v| v as usize);
    let vocab = match file.get(&k("vocab_size")).and_then(GgufValue::as_u64) {
        Some(v) => v as usize,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(<[GgufValue]>::len)
            .unwrap_or(0),
    };
    let theta = file
        .get(&k("rope.freq_base"))
        .and_then(GgufValue::as_f64)
        .unwrap_or(10_000.0);
    let scaling = match file
        .get(&k("rope.scaling.type"))
        .and_then(GgufValue::as_str)
    {
        Some("linear") => RopeScaling::Linear {
            factor: file
                .get(&k("rope.scaling.factor"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(1.0),
        },
        Some("none") | None => match file.tensor("rope_freqs.weight") {
            Some(_) => {
                let (_, d) = file.read_tensor_f32("rope_freqs.weight")?;
                RopeScaling::PerFrequency {
                    divisors: d.into_iter().map(f64::from).collect(),
                }
            }
            None => RopeScaling::Default,
        },
        Some(other) => {
            return Err(ModelError::InvalidConfig {
                path: file.path().to_path_buf(),
                message: format!("rope scaling `{other}` is not supported"),
            });
        }
    };
    let id = |key: &str| file.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
    Ok(LlamaConfig {
        flavor,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(file, &k("feed_forward_length"))?,
        num_hidden_layers: meta_usize(file, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: file
            .get(&k("attention.layer_norm_rms_epsilon"))
            .and_then(GgufValue::as_f64)
            .unwrap_or(1e-5),
        rope: RopeConfig { theta, scaling },
        max_position_embeddings: file
            .get(&k("context_length"))
            .and_then(GgufValue::as_u64)
            .map_or(4096, |v| v as usize),
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
        o_bias: file.tensor("blk.0.attn_output.bias").is_some(),
        mlp_bias: file.tensor("blk.0.ffn_up.bias").is_some(),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
    })
}

/// Loads a Llama-family model with any slot types from a GGUF file.
///
/// # Errors
/// A missing or malformed file, an unsupported architecture or tensor type.
pub fn load_llama<B, W, A, Sub, Emb, Kv>(
    path: &Path,
    device: &B::Device,
) -> Result<crate::llama::LlamaWith<B, W, A, Sub, Emb, Kv>>
where
    B: Backend,
    W: LinearWeight<B>,
    A: Default,
    Sub: Default,
    Emb: Default,
    Kv: Default,
{
    let file = GgufFile::open(path)?;
    let config = llama_config(&file)?;
    // llama.cpp reorders q/k rows only for the `llama` architecture (Mistral is stored as llama).
    let unpermute = (file.get("general.architecture").and_then(GgufValue::as_str) == Some("llama"))
        .then_some((
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        ));
    let mut src = GgufSource::new(&file, unpermute);
    LlamaForCausalLM::load(&config, &mut src, device)
}

/// Rebuilds the tokenizer (and chat template) stored in a GGUF file's metadata.
///
/// # Errors
/// A missing or malformed file, or tokenizer metadata this build cannot rebuild.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    tokenizer_from_gguf(&GgufFile::open(path)?)
}

/// Rebuilds the tokenizer (and chat template) from a parsed GGUF file's metadata.
///
/// # Errors
/// Tokenizer metadata this build cannot rebuild.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let strings = |key: &str| -> Vec<String> {
        file.get(key)
            .and_then(GgufValue::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let id = |key: &str| file.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
    let parts = GgufTokenizerParts {
        model: file
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or("")
            .to_string(),
        pre: file
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .map(str::to_string),
        tokens: strings("tokenizer.ggml.tokens"),
        token_types: file
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_f64().map(|x| x as i32))
                    .collect()
            })
            .unwrap_or_default(),
        merges: strings("tokenizer.ggml.merges"),
        scores: file
            .get("tokenizer.ggml.scores")
            .and_then(GgufValue::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_f64().map(|x| x as f32))
                    .collect()
            })
            .unwrap_or_default(),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
        padding_token_id: id("tokenizer.ggml.padding_token_id"),
        add_bos_token: file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool),
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_string),
    };
    Tokenizer::from_gguf_parts(parts)
}
