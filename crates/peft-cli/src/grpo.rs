//! `peft grpo`: group-relative policy optimisation of a LoRA adapter against a reward model
//! trained with `peft reward`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::{AutodiffModule, ModuleDisplay};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use peft_core::config::AdapterConfig;
use peft_core::model::{merge_and_unload, set_adapters_disabled};
use peft_core::trainable::{AdapterOnly, freeze, trainable_report};
use peft_lora::LoraModel;
use peft_models::CausalLm;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_rlhf::data::{answer_suffix, as_trained};
use peft_rlhf::dpo::token_logps_at;
use peft_rlhf::grpo::{Grpo, GrpoConfig, ReferenceFn, RewardFn};
use peft_rlhf::reward::{RewardModel, load_reward_adapter, sequence_rewards};
use peft_train::TrainError;
use peft_train::data::{Tokenized, prompt_ids, split_validation};
use peft_train::trainer::train;
use serde::Deserialize;

use crate::models::{Device, Lm, load_lm, load_tokenizer};
use crate::train::{Method, Resolved, TrainSettings, pad_id};

/// Arguments of `peft grpo`.
#[derive(Args, Debug)]
pub struct GrpoArgs {
    /// A TOML file with any of the options (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// The reward model: an adapter directory written by `peft reward` (LoRA + score head)
    /// for the same base model.
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Adapters the reward model was trained over (its `peft reward --from-adapter`),
    /// folded into its base before the reward adapter is loaded (repeatable).
    #[arg(long = "reward-from-adapter")]
    pub reward_from_adapter: Vec<PathBuf>,
    /// Completions sampled per prompt (TRL's num_generations).
    #[arg(long, default_value_t = 4)]
    pub num_generations: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// KL coefficient against the model without the new adapter (0: no reference pass).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    /// Clip range of the ratio (lower; also upper unless --epsilon-high is given).
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher).
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// group (default), batch or none.
    #[arg(long, default_value = "group")]
    pub scale_rewards: String,
    /// grpo (default) or dr_grpo.
    #[arg(long, default_value = "grpo")]
    pub loss_type: String,
    /// An adapter to start from (for example the SFT stage's), merged into the base first;
    /// the merged model is the reference.
    #[arg(long = "from-adapter")]
    pub from_adapter: Vec<PathBuf>,
    /// The options shared with `peft train` (--data is JSONL with a `prompt` on each line,
    /// for example a preference file; --max-new-tokens bounds each completion).
    #[command(flatten)]
    pub settings: TrainSettings,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
}

/// Each prompt as a user turn rendered with the chat template, cut to `--seq-len` tokens.
pub(crate) fn prompts_as_ids(
    tok: &Tokenizer,
    prompts: Vec<String>,
    r: &Resolved,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .into_iter()
        .map(|p| {
            let mut ids = prompt_ids(tok, &[ChatMessage::user(p)], &r.render)?;
            ids.truncate(r.seq_len);
            Ok(ids)
        })
        .collect()
}

pub(crate) fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(line).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("expected an object with a `prompt` string: {e}"),
        })?;
        out.push(p.prompt);
    }
    if out.is_empty() {
        bail!("{} holds no prompt", path.display());
    }
    Ok(out)
}

/// `peft grpo`.
pub fn run(a: &GrpoArgs) -> Result<()> {
    let r = Resolved::from_settings(a.config.as_deref(), &a.settings)?;
    if r.method != Method::Lora {
        bail!("peft grpo trains a LoRA adapter (--method lora)");
    }
    let cfg = GrpoConfig {
        num_generations: a.num_generations,
        max_completion_length: r.max_new_tokens,
        temperature: a.temperature,
        beta: a.beta,
        epsilon_low: a.epsilon,
        epsilon_high: a.epsilon_high.unwrap_or(a.epsilon),
        scale_rewards: a.scale_rewards.parse().map_err(anyhow::Error::msg)?,
        loss_type: a.loss_type.parse().map_err(anyhow::Error::msg)?,
        seed: r.options.seed,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    check_reward_model(&a.reward_model, &a.reward_from_adapter)?;
    crate::with_backend!(a.device, |B, device| grpo_on::<burn::backend::Autodiff<B>>(
        a, &r, &cfg, &device
    ))
}

fn grpo_on<B: AutodiffBackend>(
    a: &GrpoArgs,
    r: &Resolved,
    cfg: &GrpoConfig,
    device: &B::Device,
) -> Result<()> {
    let started = std::time::Instant::now();
    let tok = load_tokenizer(&r.model)?;
    let to_ids = |ps: Vec<String>| prompts_as_ids(&tok, ps, r);
    let prompts = read_prompts(&r.data)?;
    let (train_p, val_p) = match &r.val_data {
        Some(v) => (prompts, read_prompts(v)?),
        None => split_validation(prompts, r.val_fraction, r.options.seed),
    };
    let (train_set, val_set) = (to_ids(train_p)?, to_ids(val_p)?);
    println!(
        "data: {} training prompts, {} validation prompts, {} completions each",
        train_set.len(),
        val_set.len(),
        cfg.num_generations
    );
    let pad = pad_id(&tok);
    let reward = reward_fn::<B::InnerBackend>(
        &r.model,
        &a.reward_from_adapter,
        &a.reward_model,
        &tok,
        pad,
        device,
    )?;
    B::seed(device, r.options.seed);
    let model: Lm<B> = load_lm(&r.model, &a.from_adapter, true, device)
        .with_context(|| format!("loading {}", r.model.display()))?;
    let job = Job {
        r,
        reward_model: &a.reward_model,
        resume: a.resume,
        cfg,
        pad,
        train_set: &train_set,
        val_set: &val_set,
        started,
    };
    match model {
        Lm::Llama(m) => job.go(m, reward, device),
        Lm::Gpt2(m) => job.go(m, reward, device),
    }
}

/// The reward model (base, with the adapters it was trained over folded in, + reward
/// adapter with its head) as a scoring function.
///
/// A completion that ended is scored as the reward model's training answers end (the chat
/// template's tokens after an answer in place of the end-of-sequence token), so the reward
/// is read at the token it was trained to read it at.
pub(crate) fn reward_fn<B: Backend>(
    model: &Path,
    base_adapters: &[PathBuf],
    adapter: &Path,
    tok: &Tokenizer,
    pad: u32,
    device: &B::Device,
) -> Result<RewardFn> {
    fn wrap<B: Backend, L: LoraModel<B> + CausalLm<B> + 'static>(
        lm: L,
        adapter: &Path,
        suffix: Vec<u32>,
        pad: u32,
        device: &B::Device,
    ) -> Result<RewardFn> {
        let hidden = lm
            .token_embedding()
            .map(|(_, _, d)| d)
            .context("this model exposes no token embedding")?;
        let eos = lm.eos_token_ids();
        let mut rm = RewardModel::new(lm, hidden, 0.0, device);
        load_reward_adapter(&mut rm, adapter, "reward", device)
            .with_context(|| format!("loading the reward model {}", adapter.display()))?;
        let device = device.clone();
        Ok(Box::new(move |samples: &[(Vec<u32>, Vec<u32>)]| {
            let seqs: Vec<Tokenized> = samples
                .iter()
                .map(|(p, c)| {
                    let ids = as_trained(p, c, &eos, &suffix);
                    let n = ids.len();
                    Tokenized {
                        ids,
                        trained: vec![false; n],
                    }
                })
                .collect();
            let refs: Vec<&Tokenized> = seqs.iter().collect();
            sequence_rewards(&rm, &refs, pad, &device)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap_or_default()
        }))
    }
    let suffix = answer_suffix(tok)?;
    let base: Lm<B> = load_lm(model, base_adapters, true, device)
        .with_context(|| format!("loading {} for the reward model", model.display()))?;
    match base {
        Lm::Llama(mut m) => {
            merge_and_unload(&mut m, true)?;
            wrap(m, adapter, suffix, pad, device)
        }
        Lm::Gpt2(mut m) => {
            merge_and_unload(&mut m, true)?;
            wrap(m, adapter, suffix, pad, device)
        }
    }
}

/// Checks `--reward-model`: that it is an adapter directory, and `--reward-from-adapter`
/// against what `peft reward` recorded in the `results.json` beside the reward adapter (when
/// there is one): a reward head trained over an SFT adapter scores garbage on the bare base,
/// and nothing else would say so.
pub(crate) fn check_reward_model(reward_model: &Path, given: &[PathBuf]) -> Result<()> {
    if !reward_model.join("adapter_config.json").exists() {
        bail!(
            "--reward-model {}: no adapter_config.json there (give the adapter directory that \
             `peft reward` wrote, <out>/adapter)",
            reward_model.display()
        );
    }
    let Some(results) = reward_model.parent().map(|d| d.join("results.json")) else {
        return Ok(());
    };
    let Ok(text) = std::fs::read_to_string(&results) else {
        return Ok(());
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let Some(recorded) = v.get("from_adapter").and_then(|a| a.as_array()) else {
        return Ok(());
    };
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let recorded: Vec<PathBuf> = recorded
        .iter()
        .filter_map(|p| p.as_str().map(PathBuf::from))
        .collect();
    let same = recorded.len() == given.len()
        && recorded
            .iter()
            .zip(given)
            .all(|(a, b)| canon(a) == canon(b));
    if !same {
        let list = |ps: &[PathBuf]| {
            if ps.is_empty() {
                "none".to_string()
            } else {
                ps.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        bail!(
            "the reward model {} was trained over the adapters [{}] (its --from-adapter, as \
             {} records), but --reward-from-adapter gives [{}]; pass the same ones so it scores \
             on the model it was trained on",
            reward_model.display(),
            list(&recorded),
            results.display(),
            list(given)
        );
    }
    Ok(())
}

struct Job<'a> {
    r: &'a Resolved,
    reward_model: &'a Path,
    resume: bool,
    cfg: &'a GrpoConfig,
    pad: u32,
    train_set: &'a [Vec<u32>],
    val_set: &'a [Vec<u32>],
    started: std::time::Instant,
}

impl Job<'_> {
    fn go<B, L>(&self, mut lm: L, reward: RewardFn, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend,
        L: LoraModel<B> + CausalLm<B> + AutodiffModule<B> + ModuleDisplay,
        L::InnerModule:
            LoraModel<B::InnerBackend> + CausalLm<B::InnerBackend> + ModuleDisplay + 'static,
    {
        let r = self.r;
        // Starting adapters are folded into the weights for good (delete_adapter would unmerge
        // them), so only the new adapter trains and disabling it gives the merged model.
        merge_and_unload(&mut lm, true)?;
        let lora = crate::train::lora_fields(r);
        peft_lora::add_adapter_full(&mut lm, "default", &lora, device)?;
        let lm = freeze(lm, &AdapterOnly);
        println!("{}", trainable_report(&lm));
        // The reference shares the frozen weights (burn tensors are reference-counted) and
        // runs with the adapter disabled: the model before this run.
        let reference: Option<ReferenceFn> = if self.cfg.beta > 0.0 {
            let mut m = lm.valid();
            set_adapters_disabled(&mut m, true)?;
            let (pad, device) = (self.pad, device.clone());
            Some(Box::new(move |seqs: &[&Tokenized], temperature: f64| {
                token_logps_at(&m, seqs, pad, temperature, &device)
                    .0
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .unwrap_or_default()
            }))
        } else {
            None
        };
        let objective = Grpo::new(self.cfg.clone(), self.pad, reward, reference);
        let mut options = r.options.clone();
        let total = options.total_steps(self.train_set.len());
        options.warmup_steps = r.warmup_steps.unwrap_or(0);
        if options.eval_every.is_none() && !self.val_set.is_empty() {
            options.eval_every = Some((total / 5).max(1));
        }
        let done = train(
            lm,
            &objective,
            self.train_set,
            self.val_set,
            &options,
            &r.out,
            self.resume,
            device,
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
        peft_lora::save_adapter_full(&model, "default", &config, &dir)?;
        let lines = peft_train::metrics::read(&r.out.join("metrics.jsonl"))?;
        let reward_at = |i: usize| {
            lines
                .get(i)
                .and_then(|l| l.extra.get("reward"))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let secs = self.started.elapsed().as_secs_f64();
        let summary = format!(
            "# GRPO\n\nA LoRA adapter on `{}` trained with GRPO against the reward model `{}` \
             ({} completions per prompt, at most {} tokens, temperature {}, beta {}).\n\n\
             - command: `{}`\n- steps: {}\n- mean sampled reward: first step {:.4}, last step \
             {:.4}\n- wall time: {secs:.0} s\n\n`metrics.jsonl` has, per step, `reward`, \
             `reward_std`, `frac_reward_zero_std`, `completion_length`, `clip_ratio` (and `kl` \
             with beta > 0).\n",
            r.model.display(),
            self.reward_model.display(),
            self.cfg.num_generations,
            self.cfg.max_completion_length,
            self.cfg.temperature,
            self.cfg.beta,
            std::env::args().collect::<Vec<_>>().join(" "),
            done.state.step,
            reward_at(0),
            reward_at(lines.len().saturating_sub(1)),
        );
        std::fs::write(r.out.join("README.md"), &summary)?;
        println!(
            "mean sampled reward: first step {:.4}, last step {:.4}",
            reward_at(0),
            reward_at(lines.len().saturating_sub(1))
        );
        println!(
            "wrote {} (adapter), {}, {} and {} in {secs:.0} s",
            dir.display(),
            r.out.join("metrics.jsonl").display(),
            r.out.join("loss.png").display(),
            r.out.join("README.md").display()
        );
        Ok(())
    }
}
