//! The options of `peft train` (and `peft dpo`): flags, the TOML file of `--config`, and
//! their resolution into a run's settings with every default filled in.
//!
//! ```
//! use std::path::Path;
//! use peft_cli::settings::{Method, Resolved, TrainSettings};
//!
//! let toml = "model = \"model.gguf\"\ndata = \"train.jsonl\"\nout = \"run\"\nrank = 8\n";
//! let s = TrainSettings::from_toml_str(toml, Path::new("configs/run.toml"))?;
//! let r = Resolved::from_settings(None, &s)?;
//! assert_eq!(r.method, Method::Lora);
//! assert_eq!(r.data, Path::new("configs/train.jsonl"));
//! assert_eq!((r.rank, r.alpha), (8, 16.0));
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use peft_models::smollm2_gguf_path;
use peft_train::data::RenderOptions;
use peft_train::optim::{AdamWConfig, Decay};
use peft_train::trainer::TrainOptions;
use serde::{Deserialize, Serialize};

/// The options of `peft train`, from flags and from the TOML file of `--config` (flags
/// win). Paths in the file are relative to the file.
#[derive(Args, Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// The base model: a Hugging Face directory or a .gguf file (`smollm2`: the demo model,
    /// fetched by `cargo xtask fetch-model smollm2`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The method: lora, qlora (LoRA over an NF4 base; or lora with --quantize), ia3,
    /// adapter (bottleneck, seq_bn), bitfit, prompt, p-tuning, prefix, or full (full
    /// fine-tuning, the baseline). docs/choosing-a-method.md compares them.
    #[arg(long)]
    pub method: Option<String>,
    /// Training data (JSONL: `text`; `prompt` + `completion`; or chat `messages`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation data (JSONL); without it `val_fraction` of the data is held out.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Share of the data held out for validation when no --val-data is given (default 0.05).
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// A JSONL test set scored by exact match of greedy answers before and after training.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// A plain-text file whose perplexity is measured before and after training (how much
    /// general ability the run cost).
    #[arg(long)]
    pub general_text: Option<PathBuf>,
    /// The output directory (adapter, metrics.jsonl, loss.png, README.md, checkpoints/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps (default: as many as --epochs take).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the training data (default 1).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Peak learning rate (default 2e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Sequences per micro-batch (default 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Maximum tokens per sequence; longer examples are cut and counted (default 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Pack short examples together into sequences of --seq-len tokens.
    #[arg(long)]
    pub pack: Option<bool>,
    /// LoRA rank (default 16).
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (default 2 x rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout (default 0.05).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Target modules, comma-separated names, or all-linear (default).
    #[arg(long)]
    pub targets: Option<String>,
    /// Quantize the frozen base to 4 bits (nf4 or fp4) for QLoRA.
    #[arg(long)]
    pub quantize: Option<String>,
    /// Seed of the adapter's initialisation, the data order and dropout (default 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Warm-up steps (default: 3% of the steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning-rate decay after warm-up: linear (default), cosine or constant.
    #[arg(long)]
    pub schedule: Option<String>,
    /// AdamW's decoupled weight decay (default 0).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (default 1.0; 0 turns clipping off).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Evaluate the validation loss every N steps (default: 10 times per run).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N steps (default 50, and at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Stop after N evaluations without a better validation loss, keeping the best adapter.
    #[arg(long)]
    pub patience: Option<usize>,
    /// A system message before every prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Train on prompt tokens too (default: loss on completions and assistant turns only).
    #[arg(long)]
    pub train_on_prompt: Option<bool>,
    /// Longest generated answer in exact-match evaluation (default 64 tokens).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Recompute activations in the backward pass instead of keeping them (less memory,
    /// more compute).
    #[arg(long)]
    pub grad_checkpointing: Option<bool>,
    /// Pause after this step with a checkpoint; continue later with --resume.
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Virtual tokens of prompt tuning, P-tuning and prefix tuning (default 20).
    #[arg(long)]
    pub num_virtual_tokens: Option<usize>,
    /// Initialise prompt tuning from the embeddings of this text (peft's TEXT init).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
}

macro_rules! merge_fields {
    ($a:expr, $b:expr, $($f:ident),* $(,)?) => {
        TrainSettings { $($f: $a.$f.clone().or_else(|| $b.$f.clone()),)* }
    };
}

impl TrainSettings {
    /// `self` where set, else `other`.
    pub fn or(&self, other: &Self) -> Self {
        merge_fields!(
            self,
            other,
            model,
            method,
            data,
            val_data,
            val_fraction,
            eval_data,
            general_text,
            out,
            max_steps,
            epochs,
            lr,
            batch_size,
            grad_accum,
            seq_len,
            pack,
            rank,
            alpha,
            dropout,
            targets,
            quantize,
            seed,
            warmup_steps,
            schedule,
            weight_decay,
            max_grad_norm,
            eval_every,
            save_every,
            patience,
            system,
            train_on_prompt,
            max_new_tokens,
            grad_checkpointing,
            stop_at,
            num_virtual_tokens,
            prompt_init_text,
        )
    }

    /// Reads a TOML file; relative paths become relative to the file's directory.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, or has an unknown key or a value of the wrong
    /// type; the message names the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses the TOML text of the config file at `path` (named in errors); relative paths
    /// become relative to the file's directory.
    ///
    /// # Errors
    /// As [`TrainSettings::from_file`].
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let mut s: Self = toml::from_str(text)
            .with_context(|| format!("in the config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &mut Option<PathBuf>| {
            if let Some(p) = p
                && p.is_relative()
                && p.as_os_str() != "smollm2"
            {
                *p = base.join(&*p);
            }
        };
        rel(&mut s.model);
        rel(&mut s.data);
        rel(&mut s.val_data);
        rel(&mut s.eval_data);
        rel(&mut s.general_text);
        rel(&mut s.out);
        Ok(s)
    }
}

/// The fully resolved options of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    /// The base model (a Hugging Face directory or a .gguf file).
    pub model: PathBuf,
    /// The method.
    pub method: Method,
    /// Training data (JSONL).
    pub data: PathBuf,
    /// Validation data, if given.
    pub val_data: Option<PathBuf>,
    /// Share of the data held out when there is no validation file.
    pub val_fraction: f64,
    /// The exact-match test set, if given.
    pub eval_data: Option<PathBuf>,
    /// The plain text whose perplexity is measured, if given.
    pub general_text: Option<PathBuf>,
    /// The output directory.
    pub out: PathBuf,
    /// Maximum tokens per sequence.
    pub seq_len: usize,
    /// Whether short examples are packed together.
    pub pack: bool,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA dropout.
    pub dropout: f64,
    /// Target modules (`all-linear`, a pattern, or comma-separated names).
    pub targets: String,
    /// How records become tokens.
    pub render: RenderOptions,
    /// Longest generated answer in exact-match evaluation.
    pub max_new_tokens: usize,
    /// The training loop's options.
    pub options: TrainOptions,
    /// Whether activations are recomputed in the backward pass.
    pub grad_checkpointing: bool,
    /// Warm-up steps, if set (else 3% of the steps).
    pub warmup_steps: Option<usize>,
    /// `nf4` or `fp4` for a 4-bit base (QLoRA).
    pub quantize: Option<String>,
    /// Virtual tokens of the prompt methods.
    pub num_virtual_tokens: usize,
    /// Text whose embeddings initialise prompt tuning, if set.
    pub prompt_init_text: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
/// The fine-tuning method of a run.
pub enum Method {
    /// LoRA (and QLoRA with a 4-bit base).
    Lora,
    /// Full fine-tuning.
    Full,
    /// (IA)^3.
    Ia3,
    /// A bottleneck adapter.
    Bottleneck,
    /// BitFit (biases only).
    Bitfit,
    /// Prompt tuning.
    Prompt,
    /// P-tuning.
    PTuning,
    /// Prefix tuning.
    Prefix,
}

/// The model path, with `smollm2` standing for the demo model in the model cache.
pub fn resolve_model(p: &Path) -> PathBuf {
    if p.as_os_str() == "smollm2" && !p.exists() {
        smollm2_gguf_path()
    } else {
        p.to_path_buf()
    }
}

impl Resolved {
    /// Resolves flags over the config file (when given) and fills in the defaults.
    ///
    /// # Errors
    /// A config file that cannot be read or parsed, a missing `model`, `data` or `out`, or
    /// an unknown method, schedule or quantization.
    pub fn from_settings(config: Option<&Path>, settings: &TrainSettings) -> Result<Self> {
        let s = match config {
            Some(c) => settings.or(&TrainSettings::from_file(c)?),
            None => settings.clone(),
        };
        let model = resolve_model(
            &s.model
                .context("--model is required (or `model` in --config)")?,
        );
        let data = s
            .data
            .context("--data is required (or `data` in --config)")?;
        let out = s.out.context("--out is required (or `out` in --config)")?;
        let method = match s.method.as_deref().unwrap_or("lora") {
            "lora" | "qlora" => Method::Lora,
            "full" => Method::Full,
            "ia3" => Method::Ia3,
            "adapter" | "bottleneck" => Method::Bottleneck,
            "bitfit" => Method::Bitfit,
            "prompt" => Method::Prompt,
            "p-tuning" => Method::PTuning,
            "prefix" => Method::Prefix,
            m => bail!(
                "unknown --method `{m}`; use lora, qlora, ia3, adapter, bitfit, prompt, p-tuning, prefix or full"
            ),
        };
        let quantize = match (s.method.as_deref(), &s.quantize) {
            (_, Some(q)) => Some(q.to_ascii_lowercase()),
            (Some("qlora"), None) => Some("nf4".to_string()),
            _ => None,
        };
        if let Some(q) = &quantize {
            if method != Method::Lora {
                bail!("--quantize {q} trains LoRA over the 4-bit base: use --method lora or qlora");
            }
            if !matches!(q.as_str(), "nf4" | "fp4") {
                bail!("--quantize takes nf4 or fp4, not `{q}`");
            }
        }
        let rank = s.rank.unwrap_or(16);
        let decay = match s.schedule.as_deref().unwrap_or("linear") {
            "linear" => Decay::Linear,
            "cosine" => Decay::Cosine,
            "constant" => Decay::Constant,
            o => bail!("unknown --schedule `{o}`; use linear, cosine or constant"),
        };
        let options = TrainOptions {
            lr: s.lr.unwrap_or(2e-4),
            batch_size: s.batch_size.unwrap_or(4),
            grad_accum: s.grad_accum.unwrap_or(1),
            max_steps: s.max_steps,
            epochs: s.epochs.unwrap_or(1.0),
            warmup_steps: 0,
            decay,
            adamw: AdamWConfig {
                weight_decay: s.weight_decay.unwrap_or(0.0),
                ..Default::default()
            },
            max_grad_norm: match s.max_grad_norm {
                Some(n) if n <= 0.0 => None,
                Some(n) => Some(n),
                None => Some(1.0),
            },
            seed: s.seed.unwrap_or(42),
            eval_every: s.eval_every,
            save_every: Some(s.save_every.unwrap_or(50)),
            keep_checkpoints: 2,
            early_stopping_patience: s.patience,
            progress: true,
            stop_at: s.stop_at,
        };
        Ok(Self {
            model,
            method,
            data,
            val_data: s.val_data,
            val_fraction: s.val_fraction.unwrap_or(0.05),
            eval_data: s.eval_data,
            general_text: s.general_text,
            out,
            seq_len: s.seq_len.unwrap_or(512),
            pack: s.pack.unwrap_or(false),
            rank,
            alpha: s.alpha.unwrap_or(2.0 * rank as f64),
            dropout: s.dropout.unwrap_or(0.05),
            targets: s.targets.unwrap_or_else(|| "all-linear".into()),
            render: RenderOptions {
                completion_only: !s.train_on_prompt.unwrap_or(false),
                system: s.system,
            },
            max_new_tokens: s.max_new_tokens.unwrap_or(64),
            options,
            grad_checkpointing: s.grad_checkpointing.unwrap_or(false),
            warmup_steps: s.warmup_steps,
            quantize,
            num_virtual_tokens: s.num_virtual_tokens.unwrap_or(20),
            prompt_init_text: s.prompt_init_text,
        })
    }
}
