//! Target-module selection with Python peft's exact semantics.
//!
//! peft decides, for every module path of the model (`model.layers.3.self_attn.q_proj`),
//! whether a PEFT method wraps it. This module reproduces `check_target_module_exists`
//! (peft 0.21) rule for rule:
//!
//! 1. `exclude_modules` wins: a string is a regex that must match the *whole* path; a list
//!    matches a path exactly or as a dotted suffix (`"q_proj"` excludes `a.b.q_proj`).
//! 2. A module named in `modules_to_save` (or under one) is never an adapter target.
//! 3. `target_modules` as a string is a regex that must match the whole path
//!    (Python's `re.fullmatch`). As a list, an entry matches a path exactly, or as a dotted
//!    suffix.
//! 4. `layers_to_transform` (an index or a list of indices) then filters list matches (not
//!    exact matches, not regex targets) by the *first* numbered segment after
//!    `layers_pattern` (`layers`, `h`, ...; any segment when no pattern is given).
//! 5. `all-linear` (any case) targets every linear layer except the output head.
//!
//! `rank_pattern` / `alpha_pattern` keys are regexes matched against the end of a path at a
//! dot boundary (peft's `get_pattern_key`); the first key that matches wins.
//!
//! ```
//! use peft_core::target::{TargetSpec, Targets};
//!
//! let spec = TargetSpec {
//!     target_modules: Some(Targets::list(["q_proj", "v_proj"])),
//!     layers_to_transform: Some(vec![0].into()),
//!     ..TargetSpec::default()
//! };
//! let matcher = spec.compile().unwrap();
//! assert!(matcher.is_target("model.layers.0.self_attn.q_proj"));
//! assert!(!matcher.is_target("model.layers.1.self_attn.q_proj"));
//! assert!(!matcher.is_target("model.layers.0.self_attn.k_proj"));
//! ```

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// peft's shorthand for "every linear layer but the output head".
pub const ALL_LINEAR: &str = "all-linear";

/// `target_modules` (and `exclude_modules`, `layers_pattern`) as peft's config holds them:
/// one string (a regex, or `all-linear`) or a list of names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// A regular expression that must match the whole module path, or `all-linear`.
    Pattern(String),
    /// Names matched exactly or as a dotted suffix of the module path.
    List(Vec<String>),
}

impl Targets {
    /// A list of names.
    pub fn list<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::List(names.into_iter().map(Into::into).collect())
    }

    /// A regular expression (full match).
    pub fn pattern(pattern: impl Into<String>) -> Self {
        Self::Pattern(pattern.into())
    }

    /// `all-linear`.
    pub fn all_linear() -> Self {
        Self::Pattern(ALL_LINEAR.to_string())
    }

    /// True for the `all-linear` shorthand (case-insensitive, as in peft).
    pub fn is_all_linear(&self) -> bool {
        matches!(self, Self::Pattern(p) if p.eq_ignore_ascii_case(ALL_LINEAR))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pattern(p) => write!(f, "{p:?}"),
            Self::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single index.
    One(usize),
    /// Several indices.
    Many(Vec<usize>),
}

impl From<Vec<usize>> for LayerIndices {
    fn from(v: Vec<usize>) -> Self {
        Self::Many(v)
    }
}

impl From<usize> for LayerIndices {
    fn from(v: usize) -> Self {
        Self::One(v)
    }
}

impl LayerIndices {
    fn is_active(&self) -> bool {
        match self {
            Self::One(_) => true,
            Self::Many(v) => !v.is_empty(),
        }
    }

    fn contains(&self, index: usize) -> bool {
        match self {
            Self::One(i) => *i == index,
            Self::Many(v) => v.contains(&index),
        }
    }
}

/// What kind of layer a module path names, as far as target selection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// A linear (or GPT-2 Conv1D) layer that is not the output head.
    Linear,
    /// The output head (`lm_head`, a classifier); linear, but excluded from `all-linear`.
    OutputHead,
    /// A token embedding table.
    Embedding,
    /// Anything else (attention blocks, norms, containers).
    Other,
}

/// A module of a model, as reported to target selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Its kind.
    pub kind: ModuleKind,
}

impl ModuleInfo {
    /// A new entry.
    pub fn new(path: impl Into<String>, kind: ModuleKind) -> Self {
        Self {
            path: path.into(),
            kind,
        }
    }
}

/// The outcome of matching one module path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchResult {
    /// The module is a target.
    Target,
    /// The module was excluded (by `exclude_modules` or because it is in `modules_to_save`).
    Excluded,
    /// The module is not a target.
    NotTargeted,
}

/// The target-selection fields of a PEFT config, as written in `adapter_config.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// Which modules to adapt.
    #[serde(default)]
    pub target_modules: Option<Targets>,
    /// Which modules never to adapt.
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    /// Restrict list targets to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer container (`layers`, `h`, ...), used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<Targets>,
    /// Modules trained and saved in full; they are never adapter targets.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// A compiled [`TargetSpec`].
#[derive(Clone, Debug)]
pub struct TargetMatcher {
    spec: TargetSpec,
    target_regex: Option<Regex>,
    exclude_regex: Option<Regex>,
    save_regexes: Vec<Regex>,
    layer_regexes: Vec<Regex>,
}

fn compile(field: &'static str, pattern: &str, full: String) -> Result<Regex> {
    Regex::new(&full).map_err(|e| PeftError::InvalidPattern {
        field,
        pattern: pattern.to_string(),
        message: e.to_string(),
    })
}

/// `re.fullmatch(p, key)`.
fn full_match_regex(field: &'static str, p: &str) -> Result<Regex> {
    compile(field, p, format!("^(?:{p})$"))
}

fn matches_name_or_suffix(key: &str, names: &[String]) -> bool {
    names.iter().any(|n| {
        key == n
            || (key.len() > n.len()
                && key.ends_with(n.as_str())
                && key.as_bytes()[key.len() - n.len() - 1] == b'.')
    })
}

impl TargetSpec {
    /// Compiles the regular expressions of this spec.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`] when a pattern is not a valid regular expression.
    pub fn compile(&self) -> Result<TargetMatcher> {
        let target_regex = match &self.target_modules {
            Some(t @ Targets::Pattern(p)) if !t.is_all_linear() => {
                Some(full_match_regex("target_modules", p)?)
            }
            _ => None,
        };
        let exclude_regex = match &self.exclude_modules {
            Some(Targets::Pattern(p)) => Some(full_match_regex("exclude_modules", p)?),
            _ => None,
        };
        let save_regexes = self
            .modules_to_save
            .iter()
            .flatten()
            .map(|m| compile("modules_to_save", m, format!(r"^(?:^|.*\.){m}(?:$|\..*)")))
            .collect::<Result<Vec<_>>>()?;
        let layer_regexes = match &self.layers_pattern {
            None => vec![],
            Some(Targets::Pattern(p)) if p.is_empty() => vec![],
            Some(Targets::Pattern(p)) => vec![p.clone()],
            Some(Targets::List(l)) => l.clone(),
        }
        .iter()
        .map(|p| {
            compile(
                "layers_pattern",
                p,
                format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\."),
            )
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(TargetMatcher {
            spec: self.clone(),
            target_regex,
            exclude_regex,
            save_regexes,
            layer_regexes,
        })
    }

    /// Resolves `all-linear` against a model's modules: the target list becomes the full
    /// paths of every linear layer that is not the output head (as peft does).
    pub fn resolve_all_linear(&self, modules: &[ModuleInfo]) -> TargetSpec {
        let mut spec = self.clone();
        if spec
            .target_modules
            .as_ref()
            .is_some_and(Targets::is_all_linear)
        {
            let mut names: Vec<String> = modules
                .iter()
                .filter(|m| m.kind == ModuleKind::Linear)
                .map(|m| m.path.clone())
                .collect();
            names.sort();
            names.dedup();
            spec.target_modules = Some(Targets::List(names));
        }
        spec
    }
}

impl TargetMatcher {
    /// The spec this matcher was compiled from.
    pub fn spec(&self) -> &TargetSpec {
        &self.spec
    }

    /// Matches one module path, as peft's `check_target_module_exists` does.
    ///
    /// `all-linear` cannot be decided from a path alone; resolve it first with
    /// [`TargetSpec::resolve_all_linear`] (done by [`TargetMatcher::select`]). Unresolved, it
    /// matches nothing.
    pub fn check(&self, key: &str) -> MatchResult {
        let excluded = match &self.spec.exclude_modules {
            Some(Targets::Pattern(_)) => {
                self.exclude_regex.as_ref().is_some_and(|r| r.is_match(key))
            }
            Some(Targets::List(l)) => matches_name_or_suffix(key, l),
            None => false,
        };
        if excluded {
            return MatchResult::Excluded;
        }
        if self.save_regexes.iter().any(|r| r.is_match(key)) {
            return MatchResult::Excluded;
        }
        let found = match &self.spec.target_modules {
            None => false,
            Some(Targets::Pattern(_)) => {
                self.target_regex.as_ref().is_some_and(|r| r.is_match(key))
            }
            Some(Targets::List(l)) if l.iter().any(|n| n == key) => true,
            Some(Targets::List(l)) => {
                let found = matches_name_or_suffix(key, l);
                match self
                    .spec
                    .layers_to_transform
                    .as_ref()
                    .filter(|i| i.is_active())
                {
                    Some(indices) if found => {
                        self.layer_index(key).is_some_and(|i| indices.contains(i))
                    }
                    _ => found,
                }
            }
        };
        if found {
            MatchResult::Target
        } else {
            MatchResult::NotTargeted
        }
    }

    /// True when `key` is a target.
    pub fn is_target(&self, key: &str) -> bool {
        self.check(key) == MatchResult::Target
    }

    /// The layer index peft reads from a path: the first numbered segment after
    /// `layers_pattern`, or after any segment when no pattern is set.
    pub fn layer_index(&self, key: &str) -> Option<usize> {
        let caps = if self.layer_regexes.is_empty() {
            static ANY: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
            ANY.get_or_init(|| {
                #[allow(clippy::unwrap_used)] // a constant pattern, checked by the tests
                Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").unwrap()
            })
            .captures(key)
        } else {
            self.layer_regexes.iter().find_map(|r| r.captures(key))
        }?;
        caps.name("idx")?.as_str().parse().ok()
    }

    /// Selects the targets among a model's modules. `all-linear` is resolved here.
    ///
    /// # Errors
    /// [`PeftError::NoTargetMatched`] when nothing matched, listing the paths that exist.
    pub fn select(&self, modules: &[ModuleInfo]) -> Result<Vec<String>> {
        let resolved;
        let matcher = if self
            .spec
            .target_modules
            .as_ref()
            .is_some_and(Targets::is_all_linear)
        {
            resolved = self.spec.resolve_all_linear(modules).compile()?;
            &resolved
        } else {
            self
        };
        let mut targets = Vec::new();
        let mut excluded = 0usize;
        for m in modules {
            match matcher.check(&m.path) {
                MatchResult::Target => targets.push(m.path.clone()),
                MatchResult::Excluded => excluded += 1,
                MatchResult::NotTargeted => {}
            }
        }
        if targets.is_empty() {
            let targetable: Vec<&str> = modules
                .iter()
                .filter(|m| m.kind != ModuleKind::Other)
                .map(|m| m.path.as_str())
                .collect();
            let mut note = String::new();
            if excluded > 0 {
                note.push_str(&format!(
                    " ({excluded} module(s) matched but were excluded by exclude_modules or modules_to_save)"
                ));
            }
            if let Some(l) = &self.spec.layers_to_transform {
                note.push_str(&format!(" with layers_to_transform {l:?}"));
            }
            return Err(PeftError::NoTargetMatched {
                targets: self
                    .spec
                    .target_modules
                    .as_ref()
                    .map_or_else(|| "(none given)".to_string(), ToString::to_string),
                excluded: note,
                count: targetable.len(),
                available: abbreviate(&targetable, 40),
            });
        }
        Ok(targets)
    }
}

/// Joins names with ", ", keeping the first `max` and counting the rest.
pub fn abbreviate<S: AsRef<str>>(names: &[S], max: usize) -> String {
    let mut s = names
        .iter()
        .take(max)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > max {
        s.push_str(&format!(", ... ({} more)", names.len() - max));
    }
    s
}

/// `rank_pattern` / `alpha_pattern` lookup with peft's `get_pattern_key` semantics.
///
/// Each key is a regex matched at a dot boundary against the end of the module path
/// (`^(.*\.)?(key)$`); the first key in insertion order that matches wins.
#[derive(Clone, Debug, Default)]
pub struct PatternMap<V> {
    entries: Vec<(String, Regex, V)>,
}

impl<V: Clone> PatternMap<V> {
    /// Compiles a pattern map. `field` names the config field for error messages.
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`] for a key that is not a valid regex.
    pub fn new<I>(field: &'static str, entries: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, V)>,
    {
        let entries = entries
            .into_iter()
            .map(|(k, v)| {
                let re = compile(field, &k, format!(r"^(.*\.)?({k})$"))?;
                Ok((k, re, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { entries })
    }

    /// The value for a module path, or `None` when no key matches.
    pub fn get(&self, path: &str) -> Option<V> {
        self.entries
            .iter()
            .find(|(_, re, _)| re.is_match(path))
            .map(|(_, _, v)| v.clone())
    }

    /// Keys that match none of the given paths (peft warns about these).
    pub fn unused_keys<'a>(&self, paths: impl IntoIterator<Item = &'a str> + Clone) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, re, _)| !paths.clone().into_iter().any(|p| re.is_match(p)))
            .map(|(k, _, _)| k.clone())
            .collect()
    }
}

impl<V: Clone> PatternMap<V> {
    /// Builds a map from a `BTreeMap` as deserialized (`serde_json` with `preserve_order`
    /// keeps the file's order in [`serde_json::Map`]; prefer [`PatternMap::new`] with it).
    ///
    /// # Errors
    /// [`PeftError::InvalidPattern`] for a key that is not a valid regex.
    pub fn from_btree(field: &'static str, map: &BTreeMap<String, V>) -> Result<Self> {
        Self::new(field, map.iter().map(|(k, v)| (k.clone(), v.clone())))
    }
}
