//! `peft reward`: a reward model (LoRA adapter + scalar `score` head) trained on preference
//! pairs with the Bradley-Terry loss.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::{AutodiffModule, ModuleDisplay};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use peft_core::model::merge_and_unload;
use peft_core::trainable::{AdapterOnly, freeze, trainable_report};
use peft_lora::LoraModel;
use peft_models::CausalLm;
use peft_models::tokenizer::Tokenizer;
use peft_rlhf::data::{Preference, read_preferences, tokenize_reward_pair};
use peft_rlhf::reward::{
    Reward, RewardConfig, RewardModel, RewardPair, evaluate_pairs, reward_adapter_config,
    save_reward_adapter,
};
use peft_train::data::split_validation;
use peft_train::trainer::train;

use crate::models::{Device, Lm, load_lm, load_tokenizer};
use crate::train::{Method, Resolved, TrainSettings, pad_id};

/// Arguments of `peft reward`.
#[derive(Args, Debug)]
pub struct RewardArgs {
    /// A TOML file with any of the options (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// TRL's center_rewards_coefficient: adds c * mean((r_chosen + r_rejected)^2) to keep
    /// rewards centred on zero (off by default).
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    /// Standard deviation of the head's initial weights (Llama's initializer_range).
    #[arg(long, default_value_t = 0.02)]
    pub head_init_std: f64,
    /// An adapter to start from (for example the SFT stage's), merged into the base first.
    #[arg(long = "from-adapter")]
    pub from_adapter: Vec<PathBuf>,
    /// The options shared with `peft train` (--data is a preference JSONL file:
    /// `prompt`, `chosen`, `rejected`, optionally `margin`).
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// `peft reward`.
pub fn run(a: &RewardArgs) -> Result<()> {
    let r = Resolved::from_settings(a.config.as_deref(), &a.settings)?;
    if r.method != Method::Lora {
        bail!("peft reward trains a LoRA adapter with a score head (--method lora)");
    }
    if let Some(c) = a.center_rewards_coefficient
        && !(c.is_finite() && c >= 0.0)
    {
        bail!("--center-rewards-coefficient must be a non-negative number, not {c}");
    }
    if !(a.head_init_std.is_finite() && a.head_init_std >= 0.0) {
        bail!(
            "--head-init-std must be a non-negative number, not {}",
            a.head_init_std
        );
    }
    crate::with_backend!(
        a.device,
        |B, device| reward_on::<burn::backend::Autodiff<B>>(a, &r, &device)
    )
}

fn reward_on<B: AutodiffBackend>(a: &RewardArgs, r: &Resolved, device: &B::Device) -> Result<()> {
    let started = std::time::Instant::now();
    let tok = load_tokenizer(&r.model)?;
    let prefs = read_preferences(&r.data)?;
    let (train_prefs, val_prefs) = match &r.val_data {
        Some(v) => (prefs, read_preferences(v)?),
        None => split_validation(prefs, r.val_fraction, r.options.seed),
    };
    let tokenize_all = |ps: &[Preference]| -> Result<Vec<RewardPair>> {
        ps.iter()
            .map(|p| {
                let mut pair = tokenize_reward_pair(&tok, p, &r.render)?;
                for s in [&mut pair.chosen, &mut pair.rejected] {
                    s.ids.truncate(r.seq_len);
                    s.trained.truncate(r.seq_len);
                }
                Ok(pair)
            })
            .collect()
    };
    let data = (tokenize_all(&train_prefs)?, tokenize_all(&val_prefs)?);
    println!(
        "data: {} training pairs, {} validation pairs",
        data.0.len(),
        data.1.len()
    );
    B::seed(device, r.options.seed);
    let model: Lm<B> = load_lm(&r.model, &a.from_adapter, true, device)
        .with_context(|| format!("loading {}", r.model.display()))?;
    let run = Run {
        a,
        r,
        tok: &tok,
        data: &data,
        started,
    };
    match model {
        Lm::Llama(m) => run.go(m, device),
        Lm::Gpt2(m) => run.go(m, device),
    }
}

struct Run<'a> {
    a: &'a RewardArgs,
    r: &'a Resolved,
    tok: &'a Tokenizer,
    data: &'a (Vec<RewardPair>, Vec<RewardPair>),
    started: std::time::Instant,
}

impl Run<'_> {
    fn go<B, L>(&self, mut lm: L, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend,
        L: LoraModel<B> + CausalLm<B> + AutodiffModule<B> + ModuleDisplay,
        L::InnerModule: LoraModel<B::InnerBackend> + CausalLm<B::InnerBackend> + ModuleDisplay,
    {
        let (a, r) = (self.a, self.r);
        let (train_set, val_set) = self.data;
        // Starting adapters are folded into the weights for good (delete_adapter would unmerge
        // them), so only the new adapter trains and disabling it gives the merged model.
        merge_and_unload(&mut lm, true)?;
        let lora = crate::train::lora_fields(r);
        peft_lora::add_adapter_full(&mut lm, "default", &lora, device)?;
        let hidden = lm
            .token_embedding()
            .map(|(_, _, d)| d)
            .context("this model exposes no token embedding, so the head's width is unknown")?;
        let lm = freeze(lm, &AdapterOnly);
        let model = RewardModel::new(lm, hidden, a.head_init_std, device);
        println!("{}", trainable_report(&model));
        let mut options = r.options.clone();
        let total = options.total_steps(train_set.len());
        options.warmup_steps = r
            .warmup_steps
            .unwrap_or((total as f64 * 0.03).ceil() as usize);
        if options.eval_every.is_none() && !val_set.is_empty() {
            options.eval_every = Some((total / 10).max(1));
        }
        let objective = Reward::new(
            RewardConfig {
                center_rewards_coefficient: a.center_rewards_coefficient,
            },
            pad_id(self.tok),
        );
        let before = (!val_set.is_empty()).then(|| {
            evaluate_pairs(
                &model.valid(),
                &objective,
                val_set,
                options.batch_size,
                device,
            )
        });
        let done = train(
            model, &objective, train_set, val_set, &options, &r.out, a.resume, device,
        )?;
        if !done.finished {
            println!("paused at step {}; continue with --resume", done.state.step);
            return Ok(());
        }
        let model = done.model.valid();
        let dir = r.out.join("adapter");
        let config = reward_adapter_config(lora, Some(r.model.display().to_string()));
        save_reward_adapter(&model, "default", &config, &dir)?;
        let after = (!val_set.is_empty())
            .then(|| evaluate_pairs(&model, &objective, val_set, options.batch_size, device));
        let table = table(before.as_deref(), after.as_deref());
        println!("\n{table}");
        let secs = self.started.elapsed().as_secs_f64();
        write_readme(&r.out, r, &options, done.state.step, &table, secs)?;
        let results = serde_json::json!({
            "before": before.map(|v| v.into_iter().collect::<std::collections::BTreeMap<_, _>>()),
            "after": after.map(|v| v.into_iter().collect::<std::collections::BTreeMap<_, _>>()),
            "steps": done.state.step, "model_step": done.model_step,
            // `peft ppo` and `peft grpo` check their --reward-from-adapter against this.
            "from_adapter": a.from_adapter.iter().map(|p| {
                std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string()
            }).collect::<Vec<_>>(),
            "train_seconds": done.state.elapsed_s, "options": r,
        });
        std::fs::write(
            r.out.join("results.json"),
            serde_json::to_string_pretty(&results)?,
        )?;
        println!(
            "wrote {} (adapter with its score head), {}, {} and {} in {secs:.0} s",
            dir.display(),
            r.out.join("metrics.jsonl").display(),
            r.out.join("loss.png").display(),
            r.out.join("README.md").display(),
        );
        Ok(())
    }
}

fn table(before: Option<&[(String, f64)]>, after: Option<&[(String, f64)]>) -> String {
    let get = |m: Option<&[(String, f64)]>, k: &str| {
        m.and_then(|m| {
            m.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| format!("{v:.4}"))
        })
        .unwrap_or_else(|| "-".into())
    };
    let mut s = String::from("| validation | before | after |\n|---|---|---|\n");
    for k in [
        "loss",
        "accuracy",
        "margin",
        "rewards_chosen",
        "rewards_rejected",
    ] {
        let _ = writeln!(s, "| {k} | {} | {} |", get(before, k), get(after, k));
    }
    s
}

fn write_readme(
    out: &Path,
    r: &Resolved,
    options: &peft_train::trainer::TrainOptions,
    steps: usize,
    table: &str,
    secs: f64,
) -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let text = format!(
        "# Reward model\n\nA LoRA adapter with a scalar `score` head (peft's `SEQ_CLS` layout, \
         `modules_to_save: [\"score\"]`) on `{}`, trained with the Bradley-Terry loss on `{}`.\n\n\
         Load it in Python with `AutoModelForSequenceClassification.from_pretrained(base, \
         num_labels=1)` and `PeftModel.from_pretrained(model, \"adapter\")`.\n\n\
         - command: `{}`\n- steps: {steps}, batch {} x {} accumulation, lr {}\n- LoRA: r={}, \
         alpha={}, targets `{}`\n- wall time: {secs:.0} s\n\n{table}\n\
         `metrics.jsonl` has the loss, `accuracy`, `margin` and the mean chosen and rejected \
         rewards of every step (`val_` on evaluation steps); `loss.png` plots the loss.\n",
        r.model.display(),
        r.data.display(),
        args.join(" "),
        options.batch_size,
        options.grad_accum,
        options.lr,
        r.rank,
        r.alpha,
        r.targets,
    );
    std::fs::write(out.join("README.md"), text)
        .with_context(|| format!("writing {}", out.join("README.md").display()))
}
