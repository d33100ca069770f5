//! `peft dpo`: direct preference optimisation of a LoRA adapter.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use peft_core::config::{AdapterConfig, LoraFields};
use peft_core::model::merge_and_unload;
use peft_core::trainable::{AdapterOnly, freeze, trainable_report};
use peft_rlhf::data::{read_preferences, tokenize_preference};
use peft_rlhf::dpo::{Dpo, DpoConfig, PreferencePair, reference_logps, reference_logps_of};
use peft_train::data::split_validation;
use peft_train::trainer::{evaluate_loss, train};

use crate::models::{Device, Lm, load_lm, load_tokenizer};
use crate::train::{Method, Resolved, TrainSettings, pad_id};

/// Arguments of `peft dpo`.
#[derive(Args, Debug)]
pub struct DpoArgs {
    /// A TOML file with any of the options (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// DPO's beta: how far the policy may move from the reference (default 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// sigmoid (default), robust, hinge or ipo.
    #[arg(long, default_value = "sigmoid")]
    pub loss_type: String,
    /// Label smoothing of the sigmoid and robust losses, in [0, 0.5).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// An adapter to start from (for example the SFT stage's), merged into the base first;
    /// the merged model is the reference.
    #[arg(long = "from-adapter")]
    pub from_adapter: Vec<PathBuf>,
    /// The options shared with `peft train` (--data is a preference JSONL file:
    /// `prompt`, `chosen`, `rejected`).
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// `peft dpo`.
pub fn run(a: &DpoArgs) -> Result<()> {
    let r = Resolved::from_settings(a.config.as_deref(), &a.settings)?;
    if r.method != Method::Lora {
        bail!("peft dpo trains a LoRA adapter (--method lora)");
    }
    let cfg = DpoConfig {
        beta: a.beta,
        loss_type: a.loss_type.parse().map_err(anyhow::Error::msg)?,
        label_smoothing: a.label_smoothing,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    crate::with_backend!(a.device, |B, device| dpo_on::<burn::backend::Autodiff<B>>(
        a, &r, &cfg, &device
    ))
}

fn dpo_on<B: AutodiffBackend>(
    a: &DpoArgs,
    r: &Resolved,
    cfg: &DpoConfig,
    device: &B::Device,
) -> Result<()> {
    let started = std::time::Instant::now();
    let tok = load_tokenizer(&r.model)?;
    let prefs = read_preferences(&r.data)?;
    let (train_prefs, val_prefs) = match &r.val_data {
        Some(v) => (prefs, read_preferences(v)?),
        None => split_validation(prefs, r.val_fraction, r.options.seed),
    };
    let tokenize_all = |ps: &[peft_rlhf::data::Preference]| -> Result<Vec<PreferencePair>> {
        ps.iter()
            .map(|p| {
                let mut pair = tokenize_preference(&tok, p, &r.render)?;
                for s in [&mut pair.chosen, &mut pair.rejected] {
                    s.ids.truncate(r.seq_len);
                    s.trained.truncate(r.seq_len);
                }
                Ok(pair)
            })
            .collect()
    };
    let mut train_set = tokenize_all(&train_prefs)?;
    let mut val_set = tokenize_all(&val_prefs)?;
    println!(
        "data: {} training pairs, {} validation pairs",
        train_set.len(),
        val_set.len()
    );
    B::seed(device, r.options.seed);
    // The starting adapters are merged: the result is both the reference and the base the
    // DPO adapter trains on.
    let mut model: Lm<B> = load_lm(&r.model, &a.from_adapter, true, device)
        .with_context(|| format!("loading {}", r.model.display()))?;
    // The merged weights stay and the starting adapters go, so only the new one trains and
    // disabling it gives the merged model.
    match &mut model {
        Lm::Llama(m) => merge_and_unload(m, true)?,
        Lm::Gpt2(m) => merge_and_unload(m, true)?,
    }
    let pad = pad_id(&tok);
    let reference_started = std::time::Instant::now();
    let reference_pairs = {
        let reference = model.valid();
        // Only the pairs the run takes: a run shorter than an epoch skips the rest.
        let used = r.options.examples_used(train_set.len());
        let n = reference_logps_of(
            &reference,
            &mut train_set,
            &used,
            r.options.batch_size,
            pad,
            device,
        );
        reference_logps(&reference, &mut val_set, r.options.batch_size, pad, device);
        n
    };
    println!(
        "reference log-probabilities of {reference_pairs} training and {} validation pairs in \
         {:.0} s",
        val_set.len(),
        reference_started.elapsed().as_secs_f64()
    );
    let lora = LoraFields {
        r: r.rank,
        lora_alpha: r.alpha,
        lora_dropout: r.dropout,
        target_modules: Some(crate::train::targets_of(&r.targets)),
        ..Default::default()
    };
    match &mut model {
        Lm::Llama(m) => peft_lora::add_adapter(m, "default", &lora, device)?,
        Lm::Gpt2(m) => peft_lora::add_adapter(m, "default", &lora, device)?,
    };
    let model = freeze(model, &AdapterOnly);
    println!("{}", trainable_report(&model));
    let mut options = r.options.clone();
    let total = options.total_steps(train_set.len());
    options.warmup_steps = r
        .warmup_steps
        .unwrap_or((total as f64 * 0.03).ceil() as usize);
    if options.eval_every.is_none() && !val_set.is_empty() {
        options.eval_every = Some((total / 10).max(1));
    }
    let objective = Dpo::new(cfg.clone(), pad);
    let before = (!val_set.is_empty()).then(|| {
        let l = evaluate_loss(
            &model.valid(),
            &objective,
            &val_set,
            options.batch_size,
            device,
        );
        (l.loss, objective.take_metrics_map())
    });
    let done = train(
        model, &objective, &train_set, &val_set, &options, &r.out, a.resume, device,
    )?;
    if !done.finished {
        println!("paused at step {}; continue with --resume", done.state.step);
        return Ok(());
    }
    let model = done.model.valid();
    let dir = r.out.join("adapter");
    let config = AdapterConfig::new(lora)
        .with_task_type("CAUSAL_LM")
        .with_base_model(r.model.display().to_string());
    // Staged: a failure half-way leaves no half-written adapter.
    peft_cli::output::staged(&dir, |dir| {
        match &model {
            Lm::Llama(m) => peft_lora::save_adapter(m, "default", &config, dir)?,
            Lm::Gpt2(m) => peft_lora::save_adapter(m, "default", &config, dir)?,
        };
        Ok(())
    })?;
    let mut results = serde_json::json!({
        "steps": done.state.step, "model_step": done.model_step,
        "train_seconds": done.state.elapsed_s, "reference_pairs": reference_pairs,
        "options": r,
    });
    if let Some((loss_before, mut m_before)) = before {
        let after = evaluate_loss(&model, &objective, &val_set, options.batch_size, device);
        let mut m_after = objective.take_metrics_map();
        println!("\n| validation | before | after |\n|---|---|---|");
        println!("| DPO loss | {loss_before:.4} | {:.4} |", after.loss);
        for k in ["margin", "accuracy", "rewards_chosen", "rewards_rejected"] {
            println!(
                "| {k} | {:.4} | {:.4} |",
                m_before.get(k).copied().unwrap_or(f64::NAN),
                m_after.get(k).copied().unwrap_or(f64::NAN)
            );
        }
        m_before.insert("loss".into(), loss_before);
        m_after.insert("loss".into(), after.loss);
        let mean = |f: fn(&PreferencePair) -> f64| {
            val_set.iter().map(f).sum::<f64>() / val_set.len() as f64
        };
        results["before"] = serde_json::json!(m_before);
        results["after"] = serde_json::json!(m_after);
        // The reference's own preference: the mean log-probability of each answer.
        results["reference"] = serde_json::json!({
            "val_logp_chosen": mean(|p| p.ref_chosen),
            "val_logp_rejected": mean(|p| p.ref_rejected),
        });
    }
    peft_core::format::write_atomic(
        &r.out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    println!(
        "wrote {} (adapter), {}, {} and {} in {:.0} s",
        dir.display(),
        r.out.join("metrics.jsonl").display(),
        r.out.join("loss.png").display(),
        r.out.join("results.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

trait MetricsMap {
    fn take_metrics_map(&self) -> std::collections::BTreeMap<String, f64>;
}

impl MetricsMap for Dpo {
    fn take_metrics_map(&self) -> std::collections::BTreeMap<String, f64> {
        use peft_train::trainer::Objective;
        self.take_metrics().into_iter().collect()
    }
}
