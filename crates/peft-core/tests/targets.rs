//! Target selection against Python peft: the decisions in `fixtures/target_cases.json` and
//! `fixtures/all_linear.json` were made by peft 0.21.2's own functions
//! (`scripts/fixtures/peft_core.py`), and the property tests check peft's documented rules
//! on generated module paths.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;

use peft_core::PeftError;

use peft_core::target::{
    LayerIndices, MatchResult, ModuleInfo, ModuleKind, PatternMap, TargetSpec, Targets,
};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    spec: TargetSpec,
    decisions: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PatternCase {
    keys: Vec<String>,
    matches: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
    pattern_cases: Vec<PatternCase>,
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn decisions_match_peft_check_target_module_exists() {
    let cases: Cases = serde_json::from_str(&fixture("target_cases.json")).unwrap();
    let mut checked = 0;
    for case in &cases.cases {
        let matcher = case.spec.compile().unwrap();
        for (path, expected) in &case.decisions {
            let got = match matcher.check(path) {
                MatchResult::Target => "target",
                MatchResult::Excluded => "excluded",
                MatchResult::NotTargeted => "not_targeted",
            };
            assert_eq!(got, expected, "spec {:?}, path {path}", case.spec);
            checked += 1;
        }
    }
    assert!(checked > 1500, "only {checked} decisions checked");
}

#[test]
fn pattern_keys_match_peft_get_pattern_key() {
    let cases: Cases = serde_json::from_str(&fixture("target_cases.json")).unwrap();
    for case in &cases.pattern_cases {
        let map = PatternMap::new(
            "rank_pattern",
            case.keys.iter().map(|k| (k.clone(), k.clone())),
        )
        .unwrap();
        for (path, expected) in &case.matches {
            // peft returns the matching key, or the path itself when no key matches.
            let got = map.get(path).unwrap_or_else(|| path.clone());
            assert_eq!(&got, expected, "keys {:?}, path {path}", case.keys);
        }
    }
}

#[derive(Deserialize)]
struct Module {
    path: String,
    kind: String,
}

#[derive(Deserialize)]
struct AllLinear {
    model: String,
    modules: Vec<Module>,
    resolved: Vec<String>,
}

#[test]
fn all_linear_resolves_like_peft() {
    let models: Vec<AllLinear> = serde_json::from_str(&fixture("all_linear.json")).unwrap();
    assert_eq!(models.len(), 3);
    for m in models {
        let modules: Vec<ModuleInfo> = m
            .modules
            .iter()
            .map(|x| {
                let kind = match x.kind.as_str() {
                    "linear" => ModuleKind::Linear,
                    "output_head" => ModuleKind::OutputHead,
                    "embedding" => ModuleKind::Embedding,
                    _ => ModuleKind::Other,
                };
                ModuleInfo::new(&x.path, kind)
            })
            .collect();
        let spec = TargetSpec {
            target_modules: Some(Targets::pattern("ALL-LINEAR")),
            ..Default::default()
        };
        let mut got = spec.compile().unwrap().select(&modules).unwrap();
        got.sort();
        assert_eq!(got, m.resolved, "{}", m.model);
    }
}

fn llama_modules(layers: usize) -> Vec<ModuleInfo> {
    let mut v = vec![ModuleInfo::new("model.embed_tokens", ModuleKind::Embedding)];
    for i in 0..layers {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(ModuleInfo::new(
                format!("model.layers.{i}.self_attn.{p}"),
                ModuleKind::Linear,
            ));
        }
        for p in ["gate_proj", "up_proj", "down_proj"] {
            v.push(ModuleInfo::new(
                format!("model.layers.{i}.mlp.{p}"),
                ModuleKind::Linear,
            ));
        }
    }
    v.push(ModuleInfo::new("lm_head", ModuleKind::OutputHead));
    v
}

#[test]
fn no_match_is_an_error_listing_the_paths_that_exist() {
    let spec = TargetSpec {
        target_modules: Some(Targets::list(["query", "value"])),
        ..Default::default()
    };
    let err = spec
        .compile()
        .unwrap()
        .select(&llama_modules(2))
        .unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }));
    let msg = err.to_string();
    assert!(msg.contains("[\"query\", \"value\"]"), "{msg}");
    assert!(msg.contains("model.layers.1.mlp.down_proj"), "{msg}");
    assert!(msg.contains("lm_head"), "{msg}");
}

#[test]
fn everything_excluded_is_reported_as_such() {
    let spec = TargetSpec {
        target_modules: Some(Targets::list(["q_proj"])),
        exclude_modules: Some(Targets::pattern(".*")),
        ..Default::default()
    };
    let msg = spec
        .compile()
        .unwrap()
        .select(&llama_modules(1))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("matched but were excluded"), "{msg}");
}

#[test]
fn a_bad_regex_names_the_field() {
    let spec = TargetSpec {
        target_modules: Some(Targets::pattern("q_proj(")),
        ..Default::default()
    };
    let err = spec.compile().unwrap_err();
    assert!(
        matches!(
            err,
            PeftError::InvalidPattern {
                field: "target_modules",
                ..
            }
        ),
        "{err}"
    );
}

fn segment() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "model",
        "layers",
        "self_attn",
        "mlp",
        "q_proj",
        "v_proj",
        "h",
        "attn",
        "proj",
        "0",
        "1",
        "12",
    ])
    .prop_map(str::to_string)
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..6).prop_map(|v| v.join("."))
}

proptest! {
    // A list entry matches a path exactly or as a dotted suffix, never as a bare suffix.
    #[test]
    fn list_targets_match_exact_or_dotted_suffix(prefix in path(), name in segment(), other in segment()) {
        let spec = TargetSpec { target_modules: Some(Targets::list([name.clone()])), ..Default::default() };
        let m = spec.compile().unwrap();
        prop_assert!(m.is_target(&name));
        let full = format!("{prefix}.{name}");
        prop_assert!(m.is_target(&full));
        let glued = format!("{prefix}x{name}");
        prop_assert!(!m.is_target(&glued));
        if other != name {
            let longer = format!("{prefix}.{name}.{other}");
            prop_assert!(!m.is_target(&longer));
        }
    }

    // A string target is a full-match regex: the literal name alone does not match a longer path.
    #[test]
    fn string_targets_must_match_the_whole_path(prefix in path(), name in segment()) {
        let spec = TargetSpec { target_modules: Some(Targets::pattern(regex::escape(&name))), ..Default::default() };
        let m = spec.compile().unwrap();
        prop_assert!(m.is_target(&name));
        let full = format!("{prefix}.{name}");
        prop_assert!(!m.is_target(&full));
        let spec = TargetSpec { target_modules: Some(Targets::pattern(format!(".*{}", regex::escape(&name)))), ..Default::default() };
        prop_assert!(spec.compile().unwrap().is_target(&full));
    }

    // Exclusion always wins over any target form.
    #[test]
    fn excluded_paths_are_never_targets(p in path(), as_regex in any::<bool>()) {
        let exclude = if as_regex { Targets::pattern(regex::escape(&p)) } else { Targets::list([p.clone()]) };
        let spec = TargetSpec {
            target_modules: Some(Targets::pattern(".*")),
            exclude_modules: Some(exclude),
            ..Default::default()
        };
        prop_assert_eq!(spec.compile().unwrap().check(&p), MatchResult::Excluded);
    }

    // layers_to_transform keeps exactly the listed layer indices (first index after `layers`).
    #[test]
    fn layers_to_transform_filters_by_index(layer in 0usize..40, keep in prop::collection::vec(0usize..40, 1..5), expert in 0usize..8) {
        let spec = TargetSpec {
            target_modules: Some(Targets::list(["down_proj"])),
            layers_to_transform: Some(LayerIndices::Many(keep.clone())),
            layers_pattern: Some(Targets::pattern("layers")),
            ..Default::default()
        };
        let m = spec.compile().unwrap();
        let path = format!("model.layers.{layer}.mlp.experts.{expert}.down_proj");
        prop_assert_eq!(m.is_target(&path), keep.contains(&layer));
        prop_assert_eq!(m.layer_index(&path), Some(layer));
    }

    // all-linear never takes the output head, and takes every other linear layer.
    #[test]
    fn all_linear_skips_only_the_head(layers in 1usize..5) {
        let modules = llama_modules(layers);
        let spec = TargetSpec { target_modules: Some(Targets::all_linear()), ..Default::default() };
        let got = spec.compile().unwrap().select(&modules).unwrap();
        prop_assert_eq!(got.len(), layers * 7);
        prop_assert!(!got.iter().any(|p| p == "lm_head" || p.contains("embed")));
    }
}
