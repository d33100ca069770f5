//! `peft train` and `peft eval`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use peft_core::config::{AdapterConfig, LoraFields};
use peft_core::format::write_atomic;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, Everything, freeze, trainable_report};
use peft_models::CausalLm;
use peft_models::tokenizer::Tokenizer;
use peft_train::data::{
    PrepareStats, Record, RenderOptions, Tokenized, load_splits, prepare, read_jsonl,
};
use peft_train::eval::{ExactMatch, exact_match};
use peft_train::trainer::{EvalLoss, TokenCrossEntropy, TrainOptions, evaluate_loss, train};
use serde::Serialize;

use crate::models::{Device, Lm, load_lm, load_tokenizer};
pub(crate) use peft_cli::settings::{Method, Resolved, TrainSettings, resolve_model};

/// Arguments of `peft train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML file with any of the options below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Options.
    #[command(flatten)]
    pub settings: TrainSettings,
}

pub(crate) fn targets_of(spec: &str) -> Targets {
    if spec == "all-linear" || spec.contains(['*', '(', '[', '|', '\\', '$', '^']) {
        Targets::Pattern(spec.to_string())
    } else {
        Targets::list(spec.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }
}

/// `peft train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let r = Resolved::from_settings(a.config.as_deref(), &a.settings)?;
    if r.grad_checkpointing {
        use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
        crate::with_backend!(a.device, |B, device| train_on::<
            burn::backend::Autodiff<B, BalancedCheckpointing>,
        >(&r, a.resume, &device))
    } else {
        crate::with_backend!(
            a.device,
            |B, device| train_on::<burn::backend::Autodiff<B>>(&r, a.resume, &device)
        )
    }
}

/// Scores before or after training.
#[derive(Debug, Clone, Serialize)]
struct Scores {
    exact_match: Option<(usize, usize)>,
    general_ppl: Option<f64>,
    val: Option<EvalLoss>,
}

/// What is scored before and after training.
struct EvalSets<'a> {
    records: &'a [Record],
    general: &'a [Tokenized],
    val: &'a [Tokenized],
}

fn score<B: Backend, M: CausalLm<B>>(
    model: &M,
    tok: &Tokenizer,
    r: &Resolved,
    sets: &EvalSets<'_>,
    label: &str,
    device: &B::Device,
) -> Result<(Scores, Option<ExactMatch>)> {
    let EvalSets {
        records: eval_records,
        general,
        val,
    } = *sets;
    let objective = TokenCrossEntropy { pad: pad_id(tok) };
    let general_ppl = (!general.is_empty())
        .then(|| evaluate_loss(model, &objective, general, 4, device).perplexity);
    let val = (!val.is_empty()).then(|| evaluate_loss(model, &objective, val, 8, device));
    let em = if eval_records.is_empty() {
        None
    } else {
        let bar = indicatif::ProgressBar::new(eval_records.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "{label}: exact match {{bar:30}} {{pos}}/{{len}} {{msg}} ETA {{eta}}"
        )) {
            bar.set_style(style);
        }
        let mut correct = 0;
        let em = exact_match(
            model,
            tok,
            eval_records,
            &r.render,
            r.max_new_tokens,
            16,
            device,
            |ans| {
                correct += usize::from(ans.correct);
                bar.inc(1);
                bar.set_message(format!("{correct} correct"));
            },
        )?;
        bar.finish_and_clear();
        Some(em)
    };
    Ok((
        Scores {
            exact_match: em.as_ref().map(|e| (e.correct, e.total)),
            general_ppl,
            val,
        },
        em,
    ))
}

pub(crate) fn pad_id(tok: &Tokenizer) -> u32 {
    tok.special_token("pad_token")
        .and_then(|t| tok.token_to_id(t))
        .or_else(|| tok.eos_token_ids().first().copied())
        .unwrap_or(0)
}

/// Plain text split into sequences of `seq_len` tokens, every token a target.
fn text_chunks(tok: &Tokenizer, text: &str, seq_len: usize) -> Result<Vec<Tokenized>> {
    let ids = tok.encode(text, false)?;
    Ok(ids
        .chunks(seq_len)
        .filter(|c| c.len() > 1)
        .map(|c| Tokenized {
            ids: c.to_vec(),
            trained: std::iter::once(false)
                .chain(std::iter::repeat_n(true, c.len() - 1))
                .collect(),
        })
        .collect())
}

/// What every method's run shares: the prepared data sets and the loop's options.
struct Prepared {
    train_set: Vec<Tokenized>,
    val_set: Vec<Tokenized>,
    eval_records: Vec<Record>,
    general: Vec<Tokenized>,
    stats: PrepareStats,
    options: TrainOptions,
}

impl Prepared {
    fn sets(&self) -> EvalSets<'_> {
        EvalSets {
            records: &self.eval_records,
            general: &self.general,
            val: &self.val_set,
        }
    }
}

/// Scores the model as loaded, before any adapter is added (none when resuming).
fn score_before<B: Backend, M: CausalLm<B>>(
    model: &M,
    r: &Resolved,
    resume: bool,
    tok: &Tokenizer,
    prep: &Prepared,
    device: &B::Device,
) -> Result<Option<Scores>> {
    println!("model: {} loaded", r.model.display());
    if resume {
        return Ok(None);
    }
    Ok(Some(
        score(model, tok, r, &prep.sets(), "before", device)?.0,
    ))
}

fn prepare_run(r: &Resolved, tok: &Tokenizer) -> Result<Prepared> {
    let (train_records, val_records) = load_splits(
        &r.data,
        r.val_data.as_deref(),
        r.val_fraction,
        r.options.seed,
    )?;
    let (train_set, stats) = prepare(tok, &train_records, &r.render, r.seq_len, r.pack)?;
    let (val_set, _) = if val_records.is_empty() {
        (Vec::new(), PrepareStats::default())
    } else {
        prepare(tok, &val_records, &r.render, r.seq_len, false)?
    };
    let eval_records = match &r.eval_data {
        Some(p) => read_jsonl(p)?,
        None => Vec::new(),
    };
    let general = match &r.general_text {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the general text {}", p.display()))?;
            text_chunks(tok, &text, r.seq_len.min(256))?
        }
        None => Vec::new(),
    };
    println!(
        "data: {} training examples ({} sequences{}), {} validation, {} test; {} cut to {} tokens ({} target tokens lost)",
        stats.records,
        stats.sequences,
        if r.pack { ", packed" } else { "" },
        val_set.len(),
        eval_records.len(),
        stats.truncated,
        r.seq_len,
        stats.truncated_tokens
    );
    let mut options = r.options.clone();
    let total = options.total_steps(train_set.len());
    options.warmup_steps = r
        .warmup_steps
        .unwrap_or((total as f64 * 0.03).ceil() as usize);
    if options.eval_every.is_none() && !val_set.is_empty() {
        options.eval_every = Some((total / 10).max(1));
    }
    Ok(Prepared {
        train_set,
        val_set,
        eval_records,
        general,
        stats,
        options,
    })
}

/// The prompt-learning config of the run, with peft's defaults for what is not given.
fn prompt_config(r: &Resolved) -> Result<peft_prompt::PromptConfig> {
    let n = r.num_virtual_tokens;
    Ok(match r.method {
        Method::Prompt => {
            let v = match &r.prompt_init_text {
                Some(t) => {
                    serde_json::json!({"num_virtual_tokens": n, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": t})
                }
                None => serde_json::json!({"num_virtual_tokens": n}),
            };
            peft_prompt::PromptConfig::PromptTuning(adapter_config(serde_json::from_value(v)?, r))
        }
        Method::PTuning => peft_prompt::PromptConfig::PTuning(adapter_config(
            serde_json::from_value(serde_json::json!({"num_virtual_tokens": n}))?,
            r,
        )),
        _ => peft_prompt::PromptConfig::PrefixTuning(adapter_config(
            serde_json::from_value(serde_json::json!({"num_virtual_tokens": n}))?,
            r,
        )),
    })
}

fn adapter_config<C: peft_core::config::MethodConfig>(fields: C, r: &Resolved) -> AdapterConfig<C> {
    AdapterConfig::new(fields)
        .with_task_type("CAUSAL_LM")
        .with_base_model(r.model.display().to_string())
}

/// The `model_type` of a Hugging Face directory (`llama` for GGUF files and unknowns).
fn model_type(path: &Path) -> String {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["model_type"].as_str().map(str::to_string))
        .unwrap_or_else(|| "llama".into())
}

pub(crate) fn lora_fields(r: &Resolved) -> LoraFields {
    LoraFields {
        r: r.rank,
        lora_alpha: r.alpha,
        lora_dropout: r.dropout,
        target_modules: Some(targets_of(&r.targets)),
        ..Default::default()
    }
}

fn train_on<B>(r: &Resolved, resume: bool, device: &B::Device) -> Result<()>
where
    B: AutodiffBackend + peft_qlora::QuantBackend,
    B::InnerBackend: peft_qlora::QuantBackend,
{
    let started = std::time::Instant::now();
    let tok = load_tokenizer(&r.model)?;
    let prep = prepare_run(r, &tok)?;
    B::seed(device, r.options.seed);
    let cfg_of = |fields| adapter_config(fields, r);
    let adapter_dir = r.out.join("adapter");
    match (r.method, &r.quantize) {
        (Method::Lora, None) => {
            let mut model: Lm<B> = load_lm(&r.model, &[], false, device)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let lora = lora_fields(r);
            match &mut model {
                Lm::Llama(m) => peft_lora::add_adapter(m, "default", &lora, device)?,
                Lm::Gpt2(m) => peft_lora::add_adapter(m, "default", &lora, device)?,
            };
            let model = freeze(model, &AdapterOnly);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    staged_dir(&adapter_dir, |dir| {
                        match m {
                            Lm::Llama(m) => {
                                peft_lora::save_adapter(m, "default", &cfg_of(lora.clone()), dir)?
                            }
                            Lm::Gpt2(m) => {
                                peft_lora::save_adapter(m, "default", &cfg_of(lora.clone()), dir)?
                            }
                        };
                        Ok(())
                    })
                },
            )
        }
        (Method::Lora, Some(q)) => {
            let quant =
                peft_qlora::QuantConfig::new().with_quant_type(peft_qlora::QuantType::parse(q)?);
            let mut model: peft_qlora::QloraLlama<B> =
                peft_qlora::load_qlora_llama(&r.model, &quant, device)?;
            let memory = peft_qlora::base_memory(&model);
            println!(
                "base quantized to {q}: {:.3} bytes per weight of the linear layers",
                memory.bytes_per_parameter()
            );
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let lora = lora_fields(r);
            peft_lora::add_adapter(&mut model, "default", &lora, device)?;
            let model = freeze(model, &AdapterOnly);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    staged_dir(&adapter_dir, |dir| {
                        peft_lora::save_adapter(m, "default", &cfg_of(lora.clone()), dir)?;
                        Ok(())
                    })
                },
            )
        }
        (Method::Full, _) => {
            let model: Lm<B> = load_lm(&r.model, &[], false, device)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let model = freeze(model, &Everything);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    let Lm::Llama(m) = m else {
                        bail!("full fine-tuning writes Llama-family models only in this build");
                    };
                    staged_dir(&r.out.join("model"), |dir| {
                        peft_models::export::save_llama_hf(m, Some(&tok), dir)?;
                        Ok(())
                    })
                },
            )
        }
        (Method::Ia3, _) => {
            let mut model: peft_adapter::Ia3Llama<B> = peft_models::load_llama(&r.model, device)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let mut fields = peft_adapter::ia3::default_fields(&model_type(&r.model))
                .context("(IA)^3 has no default targets for this model type")?;
            if r.targets != "all-linear" {
                fields.target_modules = Some(targets_of(&r.targets));
            }
            peft_adapter::ia3::add_adapter(&mut model, "default", &fields, device)?;
            let model = freeze(model, &AdapterOnly);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    staged_dir(&adapter_dir, |dir| {
                        peft_adapter::ia3::save_adapter(
                            m,
                            "default",
                            &adapter_config(fields.clone(), r),
                            dir,
                        )?;
                        Ok(())
                    })
                },
            )
        }
        (Method::Bottleneck, _) => {
            let mut model: peft_adapter::BottleneckLlama<B> =
                peft_models::load_llama(&r.model, device)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let fields = peft_adapter::bottleneck::BottleneckFields::seq_bn();
            peft_adapter::bottleneck::add_adapter(&mut model, "default", &fields, device)?;
            let model = freeze(model, &AdapterOnly);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    staged_dir(&adapter_dir, |dir| {
                        peft_adapter::bottleneck::save_adapter(
                            m,
                            "default",
                            &adapter_config(fields.clone(), r),
                            dir,
                        )?;
                        Ok(())
                    })
                },
            )
        }
        (Method::Prompt | Method::PTuning | Method::Prefix, _) => {
            let mut model: peft_prompt::PromptLearningLlama<B> =
                peft_models::load_llama(&r.model, device)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let config = prompt_config(r)?;
            let config =
                peft_prompt::add_adapter(&mut model, "default", &config, Some(&tok), device)?;
            let model = freeze(model, &AdapterOnly);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    staged_dir(&adapter_dir, |dir| {
                        peft_prompt::save_adapter(m, "default", &config, dir)?;
                        Ok(())
                    })
                },
            )
        }
        (Method::Bitfit, _) => {
            let model: peft_models::llama::Llama<B> = peft_models::load_llama(&r.model, device)?;
            let policy = peft_adapter::bitfit::policy(&model)?;
            let before = score_before(&model.valid(), r, resume, &tok, &prep, device)?;
            let model = freeze(model, &policy);
            run_method(
                r,
                resume,
                device,
                &tok,
                &prep,
                started,
                before,
                model,
                |m| {
                    // The trained biases, by module path (with the base model, all that changed).
                    let biases = peft_train::optim::trainable_tensors(&freeze(m.clone(), &policy));
                    staged_dir(&r.out.join("bitfit"), |dir| {
                        peft_core::format::TensorFile::write(
                            dir.join("biases.safetensors"),
                            biases,
                        )?;
                        Ok(())
                    })
                },
            )
        }
    }
}

/// Writes a directory of results through a temporary sibling moved into place whole
/// ([`peft_cli::output::staged`]), so a failure leaves no half-written adapter; returns it.
fn staged_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    peft_cli::output::staged(dir, write)?;
    Ok(dir.to_path_buf())
}

/// Scores, trains and reports a model whose method has been added and frozen; `save`
/// writes the result and returns where.
#[allow(clippy::too_many_arguments)]
fn run_method<B, M>(
    r: &Resolved,
    resume: bool,
    device: &B::Device,
    tok: &Tokenizer,
    prep: &Prepared,
    started: std::time::Instant,
    before: Option<Scores>,
    model: M,
    save: impl FnOnce(&M::InnerModule) -> Result<PathBuf>,
) -> Result<()>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + CausalLm<B>,
    M::InnerModule: CausalLm<B::InnerBackend>,
{
    let sets = prep.sets();
    println!("{}", trainable_report(&model));
    let objective = TokenCrossEntropy { pad: pad_id(tok) };
    let options = &prep.options;
    let done = train(
        model,
        &objective,
        &prep.train_set,
        &prep.val_set,
        options,
        &r.out,
        resume,
        device,
    )?;
    if !done.finished {
        println!(
            "paused at step {}; continue with the same command and --resume",
            done.state.step
        );
        return Ok(());
    }
    let model = done.model.valid();
    let adapter_dir = save(&model)?;
    let (after, em) = score(&model, tok, r, &sets, "after", device)?;
    if let Some(em) = &em {
        let mut lines = String::new();
        for a in &em.answers {
            let _ = writeln!(
                lines,
                "{}",
                serde_json::json!({"expected": a.expected, "got": a.got, "correct": a.correct})
            );
        }
        write_atomic(&r.out.join("answers.jsonl"), lines.as_bytes())?;
    }
    let table = report_table(before.as_ref(), &after);
    println!("\n{table}");
    let summary = summary(
        r,
        options,
        &done.state,
        done.model_step,
        &prep.stats,
        &table,
        started,
    );
    write_atomic(&r.out.join("README.md"), summary.as_bytes())?;
    let results = serde_json::json!({
        "before": before, "after": after, "model_step": done.model_step,
        "steps": done.state.step, "stopped_early": done.stopped_early,
        "tokens": done.state.tokens, "train_seconds": done.state.elapsed_s,
        "options": r,
    });
    write_atomic(
        &r.out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    println!(
        "wrote {} (the result), {}, {} and {} in {:.0} s",
        adapter_dir.display(),
        r.out.join("metrics.jsonl").display(),
        r.out.join("loss.png").display(),
        r.out.join("README.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn report_table(before: Option<&Scores>, after: &Scores) -> String {
    let mut t = String::from("| metric | before | after |\n|---|---|---|\n");
    let em = |s: Option<&Scores>| {
        s.and_then(|s| s.exact_match)
            .map(|(c, n)| format!("{:.1}% ({c}/{n})", 100.0 * c as f64 / n.max(1) as f64))
            .unwrap_or_else(|| "-".into())
    };
    let num = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    if after.exact_match.is_some() {
        let _ = writeln!(
            t,
            "| exact match (test) | {} | {} |",
            em(before),
            em(Some(after))
        );
    }
    if after.val.is_some() {
        let _ = writeln!(
            t,
            "| validation loss | {} | {} |",
            num(before.and_then(|b| b.val.map(|v| v.loss))),
            num(after.val.map(|v| v.loss))
        );
    }
    if after.general_ppl.is_some() {
        let _ = writeln!(
            t,
            "| general-text perplexity | {} | {} |",
            num(before.and_then(|b| b.general_ppl)),
            num(after.general_ppl)
        );
    }
    t
}

fn summary(
    r: &Resolved,
    options: &TrainOptions,
    state: &peft_train::checkpoint::TrainState,
    model_step: usize,
    stats: &PrepareStats,
    table: &str,
    started: std::time::Instant,
) -> String {
    let method = match r.method {
        Method::Lora => format!(
            "LoRA r={} alpha={} dropout={} on `{}`",
            r.rank, r.alpha, r.dropout, r.targets
        ),
        Method::Full => "full fine-tuning".to_string(),
        Method::Ia3 => "(IA)^3 with peft's default targets".to_string(),
        Method::Bottleneck => "bottleneck adapter (seq_bn, reduction factor 16)".to_string(),
        Method::Bitfit => "BitFit (biases only)".to_string(),
        Method::Prompt => format!("prompt tuning, {} virtual tokens", r.num_virtual_tokens),
        Method::PTuning => format!(
            "P-tuning (MLP encoder), {} virtual tokens",
            r.num_virtual_tokens
        ),
        Method::Prefix => format!("prefix tuning, {} virtual tokens", r.num_virtual_tokens),
    };
    format!(
        "# Fine-tuning run\n\n\
         - base model: `{}`\n- method: {method}\n- data: `{}` ({} records, {} cut to {} tokens)\n\
         - steps: {} (parameters of step {model_step} kept), {} tokens, lr {} ({:?} decay, {} warm-up), \
         batch {} x {} accumulation, seed {}\n- wall time: {:.0} s\n\n\
         ## Results\n\n{table}\n\
         Files: `adapter/` or `model/` (the result), `metrics.jsonl` (one line per step), \
         `loss.png`, `answers.jsonl` (the test answers after training), `results.json`, \
         `checkpoints/` (resume with `--resume`).\n",
        r.model.display(),
        r.data.display(),
        stats.records,
        stats.truncated,
        r.seq_len,
        state.step,
        state.tokens,
        options.lr,
        options.decay,
        options.warmup_steps,
        options.batch_size,
        options.grad_accum,
        options.seed,
        started.elapsed().as_secs_f64(),
    )
}

/// Arguments of `peft eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A Hugging Face model directory or a .gguf file (`smollm2`: the demo model).
    #[arg(long)]
    pub model: PathBuf,
    /// A JSONL file (`prompt` + `completion`, chat `messages`, or `text`).
    #[arg(long)]
    pub data: PathBuf,
    /// Adapters to evaluate with.
    #[command(flatten)]
    pub adapters: crate::models::AdapterArgs,
    /// Maximum tokens per sequence for the loss.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Sequences per batch for the loss.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest generated answer (exact match).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// A system message before every prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Skip generation (loss and perplexity only).
    #[arg(long)]
    pub no_generate: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// `peft eval`.
pub fn eval(a: &EvalArgs) -> Result<()> {
    crate::with_backend!(a.device, |B, device| eval_on::<B>(a, &device))
}

fn eval_on<B: Backend>(a: &EvalArgs, device: &B::Device) -> Result<()> {
    let model_path = resolve_model(&a.model);
    let tok = load_tokenizer(&model_path)?;
    let model =
        crate::models::load_any::<B>(&model_path, &a.adapters.adapters, a.adapters.merge, device)?;
    let records = read_jsonl(&a.data)?;
    let render = RenderOptions {
        completion_only: true,
        system: a.system.clone(),
    };
    let (examples, stats) = prepare(&tok, &records, &render, a.seq_len, false)?;
    let objective = TokenCrossEntropy { pad: pad_id(&tok) };
    let loss = evaluate_loss(&model, &objective, &examples, a.batch_size, device);
    let em = if a.no_generate {
        None
    } else {
        Some(exact_match(
            &model,
            &tok,
            &records,
            &render,
            a.max_new_tokens,
            a.batch_size,
            device,
            |_| {},
        )?)
    };
    let em = em.filter(|e| e.total > 0);
    if a.json {
        let v = serde_json::json!({
            "loss": loss.loss, "perplexity": loss.perplexity, "targets": loss.targets,
            "records": stats.records, "truncated": stats.truncated,
            "exact_match": em.as_ref().map(|e| serde_json::json!({
                "correct": e.correct, "total": e.total, "accuracy": e.accuracy(),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "records:     {} ({} cut to {} tokens)",
            stats.records, stats.truncated, a.seq_len
        );
        println!(
            "loss:        {:.4} over {} target tokens",
            loss.loss, loss.targets
        );
        println!("perplexity:  {:.3}", loss.perplexity);
        if let Some(e) = &em {
            println!(
                "exact match: {:.1}% ({}/{})",
                100.0 * e.accuracy(),
                e.correct,
                e.total
            );
        }
    }
    Ok(())
}
