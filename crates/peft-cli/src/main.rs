//! The `peft` command line.
//!
//! `peft generate`, `peft logits` and `peft inspect` run Hugging Face and GGUF models;
//! `peft inspect-adapter` reads adapters in the Hugging Face PEFT format. Fine-tuning,
//! evaluation and merging join as their crates land (see README.md).

mod dpo;
mod grpo;
mod models;
mod ppo;
mod reward;
mod train;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peft_core::config::{AnyAdapterConfig, CONFIG_FILE};
use peft_core::format::{TensorFile, WEIGHTS_FILE, split_key};

/// Parameter-efficient fine-tuning of large language models, in Rust.
#[derive(Parser, Debug)]
#[command(name = "peft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (greedy unless sampling flags are given), streaming
    /// tokens as they come.
    Generate(models::GenerateArgs),
    /// Write the f32 logits of every position for the given token ids to a safetensors
    /// file (key `logits`, shape [positions, vocab]), for parity checks. Needs no tokenizer.
    Logits(models::LogitsArgs),
    /// Print a model's architecture, parameter count and the module paths PEFT methods can
    /// target.
    Inspect(models::InspectArgs),
    /// Fine-tune a model with LoRA (or fully, as a baseline) on JSONL data: checkpoints,
    /// metrics.jsonl, a loss plot, before/after scores, and the adapter in peft's format.
    Train(Box<train::TrainArgs>),
    /// Direct preference optimisation: train a LoRA adapter on (prompt, chosen, rejected)
    /// pairs, with the model before the adapter as the reference.
    Dpo(Box<dpo::DpoArgs>),
    /// Train a reward model: a LoRA adapter with a scalar score head, on (prompt, chosen,
    /// rejected) pairs with the Bradley-Terry loss; saved as peft's SEQ_CLS adapter.
    Reward(Box<reward::RewardArgs>),
    /// GRPO: sample several completions per prompt, score them with a reward model from
    /// `peft reward`, and train a LoRA adapter on the group-relative advantages.
    Grpo(Box<grpo::GrpoArgs>),
    /// PPO: sample completions, score them with a reward model from `peft reward`, and
    /// train a LoRA adapter and a value head with GAE, the clipped objective and a KL
    /// penalty to the model before the adapter.
    Ppo(Box<ppo::PpoArgs>),
    /// Loss, perplexity and exact-match accuracy of greedy answers on a JSONL file, with or
    /// without adapters.
    Eval(train::EvalArgs),
    /// Quantize a model's linear layers to 4 bits (NF4 or FP4, bitsandbytes' layout) and
    /// write a Hugging Face directory that transformers loads with bitsandbytes.
    Quantize(models::QuantizeArgs),
    /// Merge adapters into a base model (Hugging Face directory or GGUF) and write a
    /// Hugging Face directory that transformers loads.
    Merge(models::MergeArgs),
    /// Describe an adapter directory (adapter_config.json + adapter_model.safetensors):
    /// its method, targets, adapted modules and parameter count, checking that the tensors
    /// agree with the config.
    InspectAdapter {
        /// The adapter directory.
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Tensor-name markers of every method this build reads.
const MARKERS: &[&str] = &[
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "ia3_l",
];

fn inspect_adapter(dir: &PathBuf, json: bool) -> Result<()> {
    let config = AnyAdapterConfig::load(dir)
        .with_context(|| format!("reading {}", dir.join(CONFIG_FILE).display()))?;
    let file = TensorFile::read(dir.join(WEIGHTS_FILE))?;
    let mut modules: BTreeMap<String, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    let mut top_level = Vec::new();
    let mut params = 0usize;
    for key in file.keys() {
        let shape = file.shape(key).unwrap_or_default();
        params += shape.iter().product::<usize>();
        match split_key(key, MARKERS) {
            Some((module, name)) => modules
                .entry(module.to_string())
                .or_default()
                .push((name.to_string(), shape)),
            None => top_level.push((key.to_string(), shape)),
        }
    }
    let mut problems = Vec::new();
    if let AnyAdapterConfig::Lora(cfg) = &config {
        for (module, tensors) in &modules {
            let (r, _) = cfg.method.rank_and_alpha(module)?;
            let find = |n: &str| tensors.iter().find(|(t, _)| t == n).map(|(_, s)| s.clone());
            if let (Some(a), Some(b)) = (find("lora_A.weight"), find("lora_B.weight"))
                && (a.first() != Some(&r) || b.get(1) != Some(&r))
            {
                problems.push(format!(
                    "{module}: lora_A {a:?} / lora_B {b:?} do not have rank {r} from the config"
                ));
            }
        }
    }
    let common = config.common();
    if json {
        let report = serde_json::json!({
            "peft_type": common.peft_type,
            "base_model_name_or_path": common.base_model_name_or_path,
            "task_type": common.task_type,
            "parameters": params,
            "modules": modules.keys().collect::<Vec<_>>(),
            "top_level_tensors": top_level.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("adapter:    {}", dir.display());
        println!("peft_type:  {}", common.peft_type);
        println!(
            "base model: {}",
            common
                .base_model_name_or_path
                .as_deref()
                .unwrap_or("(not recorded)")
        );
        println!(
            "task:       {}",
            common.task_type.as_deref().unwrap_or("(not recorded)")
        );
        if let AnyAdapterConfig::Lora(c) = &config {
            let m = &c.method;
            println!(
                "lora:       r={} alpha={} scaling={} rslora={} dora={} dropout={}",
                m.r,
                m.lora_alpha,
                m.scaling(m.r, m.lora_alpha),
                m.use_rslora,
                m.use_dora,
                m.lora_dropout
            );
            if let Some(t) = &m.target_modules {
                println!("targets:    {t}");
            }
        }
        println!("parameters: {params}");
        println!("modules:    {}", modules.len());
        for (module, tensors) in &modules {
            let desc: Vec<String> = tensors.iter().map(|(n, s)| format!("{n} {s:?}")).collect();
            println!("  {module}: {}", desc.join(", "));
        }
        for (k, s) in &top_level {
            println!("  {k} {s:?}");
        }
        for p in &problems {
            println!("problem: {p}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} problem(s) found", problems.len())
    }
}

fn main() -> ExitCode {
    // Training reuses the same large buffers every step: keep them in the heap.
    peft_train::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => models::generate(a),
        Command::Logits(a) => models::logits(a),
        Command::Inspect(a) => models::inspect(a),
        Command::Merge(a) => models::merge(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => train::eval(a),
        Command::Dpo(a) => dpo::run(a),
        Command::Reward(a) => reward::run(a),
        Command::Grpo(a) => grpo::run(a),
        Command::Ppo(a) => ppo::run(a),
        Command::Quantize(a) => models::quantize(a),
        Command::InspectAdapter { dir, json } => inspect_adapter(dir, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The binary's own error report, on stderr where users look for it.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
