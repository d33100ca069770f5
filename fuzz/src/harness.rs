//! What each fuzz target does with its bytes. Shared by the fuzz crate (`fuzz/src/lib.rs`)
//! and by the seed-corpus replay in `crates/peft-cli/tests/fuzz_corpus.rs`, which both
//! define `REPO` (the repository root) before including this file.
//!
//! Every function parses the bytes the way the project reads such a file, then uses what
//! it got the way the project does next (reads every tensor, dequantizes, tokenizes,
//! resolves the options), so a malformed value that slips past the parser is caught too.
//! Errors are the expected outcome for most inputs; a panic is a bug.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use peft_core::config::AnyAdapterConfig;
use peft_core::format::TensorFile;
use peft_core::target::{ModuleInfo, ModuleKind};
use peft_models::config::ModelConfig;
use peft_models::gguf::GgufFile;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_models::weights::{SafetensorsSource, WeightSource};
use peft_qlora::BnbCheckpoint;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `cargo fuzz` and `fuzz/corpus/<name>/` know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("adapter_config", adapter_config),
    ("model_config", model_config),
    ("bnb_quant_state", bnb_quant_state),
    ("train_jsonl", train_jsonl),
    ("preference_jsonl", preference_jsonl),
    ("train_toml", train_toml),
];

/// Tensors larger than this many elements are not dequantized (the parser has already
/// checked that their data lies inside the input, so this only bounds the time per input).
const MAX_DEQUANT_ELEMENTS: u64 = 1 << 22;

/// A GGUF file: header, metadata, tensor directory; then every tensor's data is located
/// and dequantized, the Llama config and the tokenizer are rebuilt from the metadata, and
/// the tokenizer encodes text and renders its chat template.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(data, PathBuf::from("fuzz.gguf")) else {
        return;
    };
    for t in file.tensors.iter().take(64) {
        let _ = t.shape();
        let _ = t.byte_size();
        if t.num_elements() > MAX_DEQUANT_ELEMENTS {
            continue;
        }
        if let Ok(bytes) = file.tensor_data(&t.name, data) {
            let _ = file.dequantize_tensor(&t.name, bytes);
        }
    }
    let _ = peft_models::gguf_model::llama_config(&file);
    if let Ok(tok) = peft_models::gguf_model::tokenizer_from_gguf(&file) {
        exercise_tokenizer(&tok);
    }
}

fn exercise_tokenizer(tok: &Tokenizer) {
    if let Ok(ids) = tok.encode("Hello wörld <|im_start|> 12", true) {
        let _ = tok.decode(&ids, false);
    }
    let _ = tok.apply_chat_template(
        &[ChatMessage::user("hi"), ChatMessage::assistant("ok")],
        true,
    );
}

/// An `adapter_model.safetensors` (or a model's `model.safetensors`): the header and
/// offsets as `peft_core::format::TensorFile` and `peft_models::weights` read them, then
/// every tensor taken at its own shape.
pub fn safetensors(data: &[u8]) {
    let path = PathBuf::from("fuzz.safetensors");
    if let Ok(mut file) = TensorFile::from_bytes(data, path.clone()) {
        let _ = file.metadata();
        let keys: Vec<String> = file.keys().map(str::to_string).collect();
        for k in &keys {
            if let Some(shape) = file.shape(k) {
                let _ = file.take(k, &shape, "");
            }
        }
        let _ = file.finish();
    }
    if let Ok(mut src) = SafetensorsSource::from_bytes(data.to_vec(), path) {
        for name in src.untaken() {
            if let Some(shape) = src.shape(&name) {
                let _ = src.take(&name, &shape);
            }
        }
    }
}

/// Module paths of a small Llama, for target selection.
fn llama_modules() -> Vec<ModuleInfo> {
    let mut m = Vec::new();
    for layer in 0..2 {
        for p in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"] {
            m.push(ModuleInfo::new(
                format!("model.layers.{layer}.{p}"),
                ModuleKind::Linear,
            ));
        }
        m.push(ModuleInfo::new(
            format!("model.layers.{layer}.self_attn"),
            ModuleKind::Other,
        ));
    }
    m.push(ModuleInfo::new("model.embed_tokens", ModuleKind::Embedding));
    m.push(ModuleInfo::new("lm_head", ModuleKind::OutputHead));
    m
}

/// An `adapter_config.json` of any supported type; for LoRA its targets are matched
/// against a small Llama and its rank and alpha patterns compiled.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = AnyAdapterConfig::from_json_str(text) else {
        return;
    };
    let _ = config.common();
    if let AnyAdapterConfig::Lora(c) = &config {
        let modules = llama_modules();
        let spec = c.method.target_spec().resolve_all_linear(&modules);
        if let Ok(m) = spec.compile() {
            let _ = m.select(&modules);
            for module in &modules {
                let _ = m.check(&module.path);
                let _ = m.layer_index(&module.path);
            }
        }
        for m in &modules {
            if let Ok((r, alpha)) = c.method.rank_and_alpha(&m.path) {
                let _ = c.method.scaling(r, alpha);
            }
        }
        let _ = c.to_json_string();
    }
}

/// A model's `config.json` (architecture, sizes, token ids).
pub fn model_config(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ModelConfig::from_json(&v, Path::new("config.json"));
    }
}

/// A bitsandbytes 4-bit checkpoint: the safetensors file, then every layer with a
/// `weight.quant_state.bitsandbytes__nf4/__fp4` entry read (quant state JSON, codes,
/// absmax, nested statistics) and dequantized.
pub fn bnb_quant_state(data: &[u8]) {
    let Ok(mut ckpt) = BnbCheckpoint::from_bytes(data.to_vec(), PathBuf::from("fuzz.safetensors"))
    else {
        return;
    };
    let names = ckpt.untaken();
    for name in names {
        let Some(prefix) = name
            .strip_suffix(".weight.quant_state.bitsandbytes__nf4")
            .or_else(|| name.strip_suffix(".weight.quant_state.bitsandbytes__fp4"))
        else {
            continue;
        };
        let weight = format!("{prefix}.weight");
        let _ = ckpt.shape(&weight);
        if let Ok(layer) = ckpt.read_linear(prefix) {
            let _ = layer.weight.dequantize();
        }
    }
}

/// The small byte-level BPE tokenizer (with a chat template) of the peft-models fixtures.
fn fixture_tokenizer() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(super::REPO).join("crates/peft-models/tests/fixtures/tokenizer/bpe_hf");
        Tokenizer::from_hf_dir(&dir).ok()
    })
    .as_ref()
}

/// `peft train`'s JSONL data: parsed, tokenized with the chat template, truncated, packed
/// and batched.
pub fn train_jsonl(data: &[u8]) {
    use peft_train::data::{Batch, RenderOptions, parse_jsonl, prepare};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(records) = parse_jsonl(text, Path::new("fuzz.jsonl")) else {
        return;
    };
    let Some(tok) = fixture_tokenizer() else {
        return;
    };
    for opts in [
        RenderOptions::default(),
        RenderOptions {
            completion_only: false,
            system: Some("sys".into()),
        },
    ] {
        for pack in [false, true] {
            if let Ok((examples, _)) = prepare(tok, &records, &opts, 24, pack) {
                let refs: Vec<_> = examples.iter().take(4).collect();
                let _ = Batch::new(&refs, 0);
            }
        }
    }
}

/// `peft dpo`'s preference JSONL: parsed and each pair tokenized.
pub fn preference_jsonl(data: &[u8]) {
    use peft_rlhf::data::{parse_preferences, tokenize_preference};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(prefs) = parse_preferences(text, Path::new("fuzz.jsonl")) else {
        return;
    };
    let Some(tok) = fixture_tokenizer() else {
        return;
    };
    for p in prefs.iter().take(8) {
        let _ = tokenize_preference(tok, p, &Default::default());
    }
}

/// `peft train --config FILE`: the TOML parsed and resolved into a run's settings.
pub fn train_toml(data: &[u8]) {
    use peft_cli::settings::{Resolved, TrainSettings};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = TrainSettings::from_toml_str(text, Path::new("configs/run.toml")) {
        let _ = Resolved::from_settings(None, &s);
    }
}
