//! The tokenizer against Hugging Face transformers 5.24 (`fixtures/tokenizer`, made by
//! `scripts/fixtures/tokenizer.py`): ids and decodes of tricky strings for a small
//! byte-level BPE loaded from a Hugging Face directory and for GGUF tokenizer metadata
//! rebuilt as transformers rebuilds it (byte-level "gpt2" with three pre-tokenizer
//! variants, sentencepiece "llama" with merges derived from scores); five real chat
//! templates rendered as `apply_chat_template(..., tokenize=False)` renders them; error
//! cases. Where the model cache holds SmolLM2-135M-Instruct's GGUF (`cargo xtask
//! fetch-model smollm2`), the tokenizer rebuilt from it is checked against transformers too.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use peft_models::ModelError;
use peft_models::tokenizer::{ChatMessage, GgufTokenizerParts, Tokenizer};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name)
}

fn load_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

fn opt_u32(v: &Value) -> Option<u32> {
    v.as_u64().map(|x| u32::try_from(x).unwrap())
}

/// A temporary copy of `bpe_hf/tokenizer.json` with the given files written beside it
/// (JSON values as JSON, strings as they are).
fn dir_with(files: &serde_json::Map<String, Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("bpe_hf/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, content) in files {
        let text = match content {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Every `encodings` entry: ids with and without special tokens, both decodes, and the
/// streaming decode adding up to the full decode.
fn check_encodings(tok: &Tokenizer, encodings: &Value, what: &str) {
    let encodings = encodings.as_array().unwrap();
    assert!(!encodings.is_empty());
    for e in encodings {
        let text = e["text"].as_str().unwrap();
        let want = ids(&e["ids"]);
        assert_eq!(
            tok.encode(text, true).unwrap(),
            want,
            "{what}: ids of {text:?}"
        );
        if let Some(plain) = e.get("ids_no_special") {
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids(plain),
                "{what}: ids without special tokens of {text:?}"
            );
        }
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            e["decode"].as_str().unwrap(),
            "{what}: decode of {text:?}"
        );
        let skipped = e["decode_skip_special"].as_str().unwrap();
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            skipped,
            "{what}: decode skipping special tokens of {text:?}"
        );
        let mut stream = tok.decode_stream();
        let mut streamed = String::new();
        for &id in &want {
            if let Some(piece) = stream.step(id).unwrap() {
                assert!(
                    !piece.contains('\u{FFFD}') || skipped.contains('\u{FFFD}'),
                    "{what}: stream gave a partial character for {text:?}: {piece:?}"
                );
                streamed.push_str(&piece);
            }
        }
        assert_eq!(streamed, skipped, "{what}: streamed decode of {text:?}");
    }
}

fn check_single_id_decodes(tok: &Tokenizer, decodes: &Value, what: &str) {
    let decodes = decodes.as_array().unwrap();
    assert_eq!(decodes.len(), tok.vocab_size(), "{what}");
    for (id, want) in decodes.iter().enumerate() {
        let id = u32::try_from(id).unwrap();
        assert_eq!(
            tok.decode(&[id], false).unwrap(),
            want.as_str().unwrap(),
            "{what}: decode of id {id}"
        );
    }
}

fn check_chat(tok: &Tokenizer, renders: &Value, what: &str) {
    for r in renders.as_array().unwrap() {
        let msgs = messages(&r["messages"]);
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&msgs, agp).unwrap();
        assert_eq!(
            text,
            r["rendered"].as_str().unwrap(),
            "{what}: rendering of {msgs:?} (add_generation_prompt={agp})"
        );
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&r["ids"]),
            "{what}: ids of the rendering of {msgs:?}"
        );
    }
}

fn check_special_tokens(tok: &Tokenizer, map: &Value, what: &str) {
    for (name, text) in map.as_object().unwrap() {
        assert_eq!(
            tok.special_token(name),
            Some(text.as_str().unwrap()),
            "{what}: {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A Hugging Face directory
// ---------------------------------------------------------------------------------------

#[test]
fn hf_dir_matches_transformers() {
    let expected = load_json(&fixture("bpe_expected.json"));
    let tok = Tokenizer::from_hf_dir(&fixture("bpe_hf")).unwrap();
    assert_eq!(
        tok.vocab_size(),
        expected["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.bos_token_id(), opt_u32(&expected["bos_token_id"]));
    assert_eq!(tok.eos_token_ids(), ids(&expected["eos_token_ids"]));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("not a token"), None);
    check_special_tokens(&tok, &expected["special_tokens_map"], "bpe_hf");
    check_encodings(&tok, &expected["encodings"], "bpe_hf");
    check_single_id_decodes(&tok, &expected["single_id_decodes"], "bpe_hf");
    check_chat(&tok, &expected["chat"], "bpe_hf");
}

#[test]
fn hf_dir_config_variants_match_transformers() {
    let expected = load_json(&fixture("bpe_expected.json"));
    for v in expected["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let dir = dir_with(v["files"].as_object().unwrap());
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            tok.vocab_size(),
            v["vocab_size"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(tok.bos_token_id(), opt_u32(&v["bos_token_id"]), "{name}");
        assert_eq!(tok.eos_token_ids(), ids(&v["eos_token_ids"]), "{name}");
        check_special_tokens(&tok, &v["special_tokens_map"], name);
        let template = match &v["chat_template"] {
            Value::Object(named) => named.get("default").and_then(Value::as_str),
            other => other.as_str(),
        };
        assert_eq!(tok.chat_template(), template, "{name}");
        check_encodings(&tok, &v["encodings"], name);
        check_chat(&tok, &v["chat"], name);
    }
}

// ---------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------

#[test]
fn chat_templates_render_as_transformers() {
    let fixture_json = load_json(&fixture("chat_templates.json"));
    let cases = fixture_json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut files = serde_json::Map::new();
        files.insert(
            "tokenizer_config.json".into(),
            case["tokenizer_config"].clone(),
        );
        let dir = dir_with(&files);
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            tok.chat_template(),
            case["tokenizer_config"]["chat_template"].as_str(),
            "{name}"
        );
        check_special_tokens(&tok, &case["special_tokens_map"], name);
        let renders = case["renders"].as_array().unwrap();
        assert!(renders.len() >= 4, "{name}");
        check_chat(&tok, &case["renders"], name);
        for err in case["errors"].as_array().unwrap() {
            let msgs = messages(&err["messages"]);
            let want = err["message"].as_str().unwrap();
            match tok.apply_chat_template(&msgs, false) {
                Err(ModelError::ChatTemplate(message)) => assert!(
                    message.contains(want),
                    "{name}: error {message:?} does not carry {want:?}"
                ),
                other => panic!("{name}: expected a chat template error, got {other:?}"),
            }
        }
    }
}

#[test]
fn chat_template_errors_are_errors() {
    let mut files = serde_json::Map::new();
    files.insert(
        "tokenizer_config.json".into(),
        serde_json::json!({"chat_template": "{% for m in messages %}{{ m.content }"}),
    );
    let dir = dir_with(&files);
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let hello = [ChatMessage::user("hi")];
    assert!(matches!(
        tok.apply_chat_template(&hello, false),
        Err(ModelError::ChatTemplate(_))
    ));
    // Empty conversations are refused, as transformers refuses them.
    let good = Tokenizer::from_hf_dir(&fixture("bpe_hf")).unwrap();
    assert!(matches!(
        good.apply_chat_template(&[], true),
        Err(ModelError::ChatTemplate(_))
    ));
    // No template at all.
    let bare = dir_with(&serde_json::Map::new());
    let tok = Tokenizer::from_hf_dir(bare.path()).unwrap();
    assert_eq!(tok.chat_template(), None);
    let err = tok.apply_chat_template(&hello, false).unwrap_err();
    assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    // A template raising with its own message.
    let mut files = serde_json::Map::new();
    files.insert(
        "chat_template.jinja".into(),
        Value::String("{{ raise_exception('no ' ~ messages[0].role ~ ' here') }}".into()),
    );
    let dir = dir_with(&files);
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    match tok.apply_chat_template(&[ChatMessage::system("x")], false) {
        Err(ModelError::ChatTemplate(m)) => assert!(m.contains("no system here"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_template_with_overlapping_tag_marks_is_an_error_not_a_panic() {
    // Found by the `gguf` fuzz target: in `{%}` the `%}` overlaps the `{%`, and the
    // `{% generation %}` rewriting sliced the tag backwards and panicked.
    for template in [
        "{%}",
        "a{%}b{% generation %}{{ messages[0].content }}{% endgeneration %}",
        "{%-}",
        "{%%}",
    ] {
        let mut files = serde_json::Map::new();
        files.insert("chat_template.jinja".into(), Value::String(template.into()));
        let dir = dir_with(&files);
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        let err = tok
            .apply_chat_template(&[ChatMessage::user("hi")], false)
            .unwrap_err();
        assert!(
            matches!(err, ModelError::ChatTemplate(_)),
            "{template}: {err}"
        );
        assert!(
            err.to_string().contains("syntax error"),
            "{template}: {err}"
        );
    }
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    // Expected strings are Python's json.dumps output for the same values.
    let template = concat!(
        "{{ {'a': 1, 'b': [1, 2.5, none, true], 'c': 'x\"<>&\\'é\\n'} | tojson }}|",
        "{{ {'b': 1, 'a': {}} | tojson(sort_keys=true) }}|",
        "{{ [1, [2, {'k': 'v'}], []] | tojson(indent=2) }}|",
        "{{ 'é😀' | tojson(ensure_ascii=true) }}|",
        "{{ [1, 2] | tojson(separators=[',', ':']) }}|",
        "{{ 1e-7 | tojson }} {{ 100.0 | tojson }}"
    );
    let mut files = serde_json::Map::new();
    files.insert("chat_template.jinja".into(), Value::String(template.into()));
    let dir = dir_with(&files);
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let out = tok
        .apply_chat_template(&[ChatMessage::user("u")], false)
        .unwrap();
    let want = concat!(
        r#"{"a": 1, "b": [1, 2.5, null, true], "c": "x\"<>&'é\n"}|"#,
        r#"{"a": {}, "b": 1}|"#,
        "[\n  1,\n  [\n    2,\n    {\n      \"k\": \"v\"\n    }\n  ],\n  []\n]|",
        r#""\u00e9\ud83d\ude00"|"#,
        "[1,2]|",
        "1e-07 100.0"
    );
    assert_eq!(out, want);
}

// ---------------------------------------------------------------------------------------
// GGUF metadata
// ---------------------------------------------------------------------------------------

fn parts_from_json(p: &Value) -> GgufTokenizerParts {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    GgufTokenizerParts {
        model: p["model"].as_str().unwrap().to_string(),
        pre: p["pre"].as_str().map(str::to_string),
        tokens: strings(&p["tokens"]),
        token_types: p["token_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| i32::try_from(t.as_i64().unwrap()).unwrap())
            .collect(),
        merges: strings(&p["merges"]),
        scores: p["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap() as f32)
            .collect(),
        bos_token_id: opt_u32(&p["bos_token_id"]),
        eos_token_id: opt_u32(&p["eos_token_id"]),
        unknown_token_id: opt_u32(&p["unknown_token_id"]),
        padding_token_id: opt_u32(&p["padding_token_id"]),
        add_bos_token: p["add_bos_token"].as_bool(),
        chat_template: p["chat_template"].as_str().map(str::to_string),
    }
}

#[test]
fn gguf_parts_rebuild_as_transformers() {
    let fixture_json = load_json(&fixture("gguf_cases.json"));
    let cases = fixture_json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let parts = parts_from_json(&case["parts"]);
        let file_eos = parts.eos_token_id;
        let tok = Tokenizer::from_gguf_parts(parts).unwrap();
        let e = &case["expected"];
        assert_eq!(
            tok.vocab_size(),
            e["vocab_size"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(tok.bos_token_id(), opt_u32(&e["bos_token_id"]), "{name}");
        // The file's eos id, then the tokenizer's eos token if it differs.
        let mut eos: Vec<u32> = file_eos.into_iter().collect();
        if let Some(id) = opt_u32(&e["eos_token_id"])
            && !eos.contains(&id)
        {
            eos.push(id);
        }
        assert_eq!(tok.eos_token_ids(), eos, "{name}");
        check_special_tokens(&tok, &e["special_tokens_map"], name);
        check_encodings(&tok, &e["encodings"], name);
        check_single_id_decodes(&tok, &e["single_id_decodes"], name);
        check_chat(&tok, &e["chat"], name);
    }
}

#[test]
fn gguf_parts_errors() {
    let base = GgufTokenizerParts {
        model: "gpt2".into(),
        tokens: vec!["a".into(), "b".into(), "ab".into()],
        token_types: vec![1, 1, 1],
        merges: vec!["a b".into()],
        ..Default::default()
    };
    assert!(Tokenizer::from_gguf_parts(base.clone()).is_ok());
    let unsupported = GgufTokenizerParts {
        model: "t5".into(),
        ..base.clone()
    };
    match Tokenizer::from_gguf_parts(unsupported) {
        Err(ModelError::Tokenizer(m)) => assert!(m.contains("t5") && m.contains("gpt2"), "{m}"),
        other => panic!("{other:?}"),
    }
    let bad_merge = GgufTokenizerParts {
        merges: vec!["a b c".into()],
        ..base.clone()
    };
    assert!(matches!(
        Tokenizer::from_gguf_parts(bad_merge),
        Err(ModelError::Tokenizer(_))
    ));
    let unknown_piece = GgufTokenizerParts {
        merges: vec!["a z".into()],
        ..base.clone()
    };
    assert!(matches!(
        Tokenizer::from_gguf_parts(unknown_piece),
        Err(ModelError::Tokenizer(_))
    ));
    let bad_id = GgufTokenizerParts {
        eos_token_id: Some(99),
        ..base.clone()
    };
    assert!(matches!(
        Tokenizer::from_gguf_parts(bad_id),
        Err(ModelError::Tokenizer(_))
    ));
    let no_merges = GgufTokenizerParts {
        merges: vec![],
        ..base.clone()
    };
    assert!(matches!(
        Tokenizer::from_gguf_parts(no_merges),
        Err(ModelError::Tokenizer(_))
    ));
    let empty = GgufTokenizerParts {
        tokens: vec![],
        ..base
    };
    assert!(matches!(
        Tokenizer::from_gguf_parts(empty),
        Err(ModelError::Tokenizer(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Files that are missing or broken
// ---------------------------------------------------------------------------------------

#[test]
fn missing_and_malformed_files() {
    let empty = tempfile::tempdir().unwrap();
    match Tokenizer::from_hf_dir(empty.path()) {
        Err(ModelError::MissingFile { path, hint }) => {
            assert!(path.ends_with("tokenizer.json"), "{}", path.display());
            assert!(hint.contains("tokenizer.json"), "{hint}");
        }
        other => panic!("{other:?}"),
    }

    for broken in [
        "{",
        "[]",
        "{\"model\": 3}",
        "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}",
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), broken).unwrap();
        match Tokenizer::from_hf_dir(dir.path()) {
            Err(ModelError::InvalidFile { path, .. }) => {
                assert!(path.ends_with("tokenizer.json"));
            }
            other => panic!("{broken}: {other:?}"),
        }
    }
    // Truncations of a real tokenizer.json never panic.
    let good = std::fs::read(fixture("bpe_hf/tokenizer.json")).unwrap();
    for len in [1, 10, 100, 1000, good.len() / 2, good.len() - 2] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &good[..len]).unwrap();
        assert!(Tokenizer::from_hf_dir(dir.path()).is_err(), "{len}");
    }

    for (name, content) in [
        ("tokenizer_config.json", "{not json"),
        ("generation_config.json", "[1, 2]"),
        ("config.json", "{\"eos_token_id\": \"two\"}"),
        (
            "tokenizer_config.json",
            "{\"chat_template\": [{\"name\": \"default\"}]}",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &good).unwrap();
        std::fs::write(dir.path().join(name), content).unwrap();
        match Tokenizer::from_hf_dir(dir.path()) {
            Err(ModelError::InvalidFile { path, .. } | ModelError::InvalidConfig { path, .. }) => {
                assert!(path.ends_with(name), "{}", path.display());
            }
            other => panic!("{name} {content}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct, where the files are present
// ---------------------------------------------------------------------------------------

/// Ids that transformers 5.24 computes with the tokenizer it rebuilds from the GGUF.
fn check_smollm2_notes(tok: &Tokenizer, what: &str) {
    let cases: [(&str, &[u32]); 5] = [
        ("Hello world", &[19556, 905]),
        ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
        (
            "  leading spaces\n\nnewline",
            &[216, 2899, 5600, 198, 198, 28160],
        ),
        (
            "2024 year 12345 3.14",
            &[
                34, 32, 34, 36, 713, 216, 33, 34, 35, 36, 37, 216, 35, 30, 33, 36,
            ],
        ),
        ("don't I'M", &[12420, 982, 339, 23, 61]),
    ];
    for (text, want) in cases {
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "{what}: {text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), text, "{what}");
    }
    assert_eq!(tok.vocab_size(), 49152, "{what}");
    assert_eq!(tok.bos_token_id(), Some(1), "{what}");
    assert!(tok.eos_token_ids().contains(&2), "{what}");

    let chat = [ChatMessage::user("What is the capital of France?")];
    let prompt = tok.apply_chat_template(&chat, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n",
        "{what}"
    );
    let want: [u32; 37] = [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
        520, 9531, 198,
    ];
    assert_eq!(tok.encode(&prompt, false).unwrap(), want, "{what}");
    let answer = [504, 3575, 282, 4649, 314, 7042, 30, 2];
    assert_eq!(
        tok.decode(&answer, false).unwrap(),
        "The capital of France is Paris.<|im_end|>"
    );
    assert_eq!(
        tok.decode(&answer, true).unwrap(),
        "The capital of France is Paris."
    );
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let path = peft_models::smollm2_gguf_path();
    if !path.exists() {
        println!(
            "skipped: {} not found (run `cargo xtask fetch-model smollm2`)",
            path.display()
        );
        return;
    }
    let tok = peft_models::gguf_model::load_tokenizer(&path).unwrap();
    check_smollm2_notes(&tok, "smollm2 GGUF");
    assert_eq!(tok.eos_token_ids(), [2]);
    let e = load_json(&fixture("smollm2_gguf_expected.json"));
    assert_eq!(tok.vocab_size(), e["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.chat_template(), e["chat_template"].as_str());
    check_encodings(&tok, &e["encodings"], "smollm2 GGUF");
    check_chat(&tok, &e["chat"], "smollm2 GGUF");
}
