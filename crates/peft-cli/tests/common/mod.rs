//! A tiny Llama (hidden size 32, 2 layers, the 500-token BPE tokenizer of the peft-models
//! fixtures) and tiny data sets, so `peft train` runs in a fraction of a second.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of it

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

/// The peft-models fixtures directory.
pub fn models_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures")
}

/// Deterministic values in [-scale, scale) (SplitMix64).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The tensors of the tiny Llama: `(name, shape)`.
pub fn tiny_llama_tensors(vocab: usize) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("lm_head.weight".to_string(), vec![vocab, 32]),
        ("model.embed_tokens.weight".to_string(), vec![vocab, 32]),
        ("model.norm.weight".to_string(), vec![32]),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![32]),
            ("post_attention_layernorm.weight", vec![32]),
            ("mlp.down_proj.weight", vec![32, 64]),
            ("mlp.gate_proj.weight", vec![64, 32]),
            ("mlp.up_proj.weight", vec![64, 32]),
            ("self_attn.k_proj.weight", vec![16, 32]),
            ("self_attn.o_proj.weight", vec![32, 32]),
            ("self_attn.q_proj.weight", vec![32, 32]),
            ("self_attn.v_proj.weight", vec![16, 32]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t
}

/// Writes safetensors `tensors` (f32) to `path`.
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Builds a tiny Llama model directory (config.json, model.safetensors, the tokenizer)
/// under `parent` and returns it.
pub fn tiny_llama(parent: &Path) -> PathBuf {
    let dir = parent.join("tiny-llama");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models_fixtures().join("llama_gqa/config.json")).unwrap(),
    )
    .unwrap();
    config["vocab_size"] = 500.into();
    config["max_position_embeddings"] = 256.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = tiny_llama_tensors(500)
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let len = s.iter().product();
            let v = if n.ends_with("norm.weight") {
                vec![1.0; len]
            } else {
                values(len, i as u64 + 1, 0.2)
            };
            (n, s, v)
        })
        .collect();
    write_f32_safetensors(&dir.join("model.safetensors"), &tensors);
    let tok = models_fixtures().join("tokenizer/bpe_hf");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        std::fs::copy(tok.join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Writes `n` short prompt/completion records to `path`.
pub fn tiny_data(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("What is {i} plus {}?", i % 7),
                "completion": format!("{}", i + i % 7),
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Every file under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
