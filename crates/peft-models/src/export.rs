//! Writing a Llama-family model as a Hugging Face directory (`config.json`,
//! `model.safetensors`, tokenizer files) that transformers loads: the output of
//! `peft merge`, from a Hugging Face or a GGUF base.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;
use peft_core::adapters::AdaptedLinear;
use peft_core::format::{TensorFile, write_atomic};
use peft_core::inject::LinearWeight;
use serde_json::{Value, json};

use crate::config::{LlamaConfig, LlamaFlavor, RopeScaling};
use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::Tokenizer;

/// `config.json` for a Llama-family config, as transformers 5 writes it (with the legacy
/// `rope_theta` too, for older readers).
///
/// # Errors
/// [`ModelError::InvalidConfig`] for rope scaling that `config.json` cannot express
/// (llama.cpp's per-frequency factors).
pub fn llama_config_json(c: &LlamaConfig) -> Result<Value> {
    let (model_type, arch) = match c.flavor {
        LlamaFlavor::Llama => ("llama", "LlamaForCausalLM"),
        LlamaFlavor::Mistral => ("mistral", "MistralForCausalLM"),
        LlamaFlavor::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let mut rope = json!({ "rope_theta": c.rope.theta, "rope_type": "default" });
    match &c.rope.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            rope["rope_type"] = json!("linear");
            rope["factor"] = json!(factor);
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            rope["rope_type"] = json!("llama3");
            rope["factor"] = json!(factor);
            rope["low_freq_factor"] = json!(low_freq_factor);
            rope["high_freq_factor"] = json!(high_freq_factor);
            rope["original_max_position_embeddings"] = json!(original_max_position_embeddings);
        }
        RopeScaling::PerFrequency { .. } => {
            return Err(ModelError::InvalidConfig {
                path: "config.json".into(),
                message: "per-frequency rope factors (GGUF rope_freqs) have no config.json form"
                    .into(),
            });
        }
    }
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope.theta,
        "rope_parameters": rope,
        "dtype": "float32",
    });
    if c.flavor == LlamaFlavor::Llama {
        v["attention_bias"] = json!(c.qkv_bias);
        v["mlp_bias"] = json!(c.mlp_bias);
    }
    if let Some(b) = c.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    match c.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = json!(one),
        many => v["eos_token_id"] = json!(many),
    }
    Ok(v)
}

fn linear_tensors<B: Backend, W: LinearWeight<B>, A>(
    out: &mut Vec<(String, TensorData)>,
    path: &str,
    l: &AdaptedLinear<B, W, A>,
) {
    out.push((format!("{path}.weight"), l.base.weight().into_data()));
    if let Some(b) = l.base.bias() {
        out.push((format!("{path}.bias"), b.into_data()));
    }
}

/// Writes the model's weights (as they are now: merge adapters first) with Hugging Face
/// names, its `config.json`, and the tokenizer files, into `dir`.
///
/// # Errors
/// I/O errors; a config that `config.json` cannot express.
pub fn save_llama_hf<B, W, A, Sub, Emb, Kv>(
    model: &LlamaForCausalLM<B, AdaptedLinear<B, W, A>, Sub, Emb, Kv>,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
) -> Result<()>
where
    B: Backend,
    W: LinearWeight<B>,
{
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io("create directory", dir, e))?;
    let mut t: Vec<(String, TensorData)> = Vec::new();
    let m = &model.model;
    t.push((
        "model.embed_tokens.weight".into(),
        m.embed_tokens.weight.val().into_data(),
    ));
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        linear_tensors(&mut t, &format!("{p}.self_attn.q_proj"), &a.q_proj);
        linear_tensors(&mut t, &format!("{p}.self_attn.k_proj"), &a.k_proj);
        linear_tensors(&mut t, &format!("{p}.self_attn.v_proj"), &a.v_proj);
        linear_tensors(&mut t, &format!("{p}.self_attn.o_proj"), &a.o_proj);
        linear_tensors(&mut t, &format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj);
        linear_tensors(&mut t, &format!("{p}.mlp.up_proj"), &l.mlp.up_proj);
        linear_tensors(&mut t, &format!("{p}.mlp.down_proj"), &l.mlp.down_proj);
        t.push((
            format!("{p}.input_layernorm.weight"),
            l.input_layernorm.weight.val().into_data(),
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight.val().into_data(),
        ));
    }
    t.push(("model.norm.weight".into(), m.norm.weight.val().into_data()));
    if let Some(head) = &model.lm_head {
        t.push((
            "lm_head.weight".into(),
            head.weight.val().transpose().into_data(),
        ));
    }
    TensorFile::write(dir.join("model.safetensors"), t)?;
    let config = llama_config_json(&model.config)?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write_atomic(&dir.join("config.json"), pretty(&config).as_bytes())?;
    let mut generation = json!({ "do_sample": false });
    if let Some(b) = model.config.bos_token_id {
        generation["bos_token_id"] = json!(b);
    }
    if !model.config.eos_token_ids.is_empty() {
        generation["eos_token_id"] = json!(model.config.eos_token_ids);
    }
    write_atomic(
        &dir.join("generation_config.json"),
        pretty(&generation).as_bytes(),
    )?;
    if let Some(tok) = tokenizer {
        save_tokenizer(tok, dir)?;
    }
    Ok(())
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat template)
/// that transformers' `AutoTokenizer` loads.
///
/// # Errors
/// I/O errors, or a tokenizer that cannot be serialised.
pub fn save_tokenizer(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let json = tok
        .inner()
        .to_string(true)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let mut cfg = json!({ "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false });
    for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(s) = tok.special_token(name) {
            cfg[name] = json!(s);
        }
    }
    if let Some(t) = tok.chat_template() {
        cfg["chat_template"] = json!(t);
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(())
}
