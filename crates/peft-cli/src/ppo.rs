//! `peft ppo`: PPO of a LoRA adapter with a value head against a reward model trained with
//! `peft reward`, with a KL penalty to the model before the adapter.

use std::path::PathBuf;

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
use peft_models::generate::greedy_batch;
use peft_models::tokenizer::Tokenizer;
use peft_rlhf::dpo::token_logps_at;
use peft_rlhf::grpo::{ReferenceFn, RewardFn, Sample};
use peft_rlhf::ppo::{KlEstimator, PolicyWithValue, Ppo, PpoConfig};
use peft_train::data::Tokenized;
use peft_train::trainer::train;

use crate::grpo::{check_reward_model, prompts_as_ids, read_prompts, reward_fn};
use crate::models::{Device, Lm, load_lm, load_tokenizer};
use crate::train::{Method, Resolved, TrainSettings, pad_id};

/// Arguments of `peft ppo`.
#[derive(Args, Debug)]
pub struct PpoArgs {
    /// A TOML file with any of the options (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// The reward model: an adapter directory written by `peft reward` for the same base.
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Sampling temperature (TRL's default 0.7).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Adapters the reward model was trained over (its `peft reward --from-adapter`),
    /// folded into its base before the reward adapter is loaded (repeatable).
    #[arg(long = "reward-from-adapter")]
    pub reward_from_adapter: Vec<PathBuf>,
    /// KL penalty coefficient against the model without the new adapter.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// k1 (default) or k3.
    #[arg(long, default_value = "k1")]
    pub kl_estimator: String,
    /// Discount.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    /// GAE's lambda.
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Policy clip range.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    /// Value clip range.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Value loss coefficient.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Optimizer steps per rollout (TRL's num_ppo_epochs, one mini-batch each).
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// An adapter to start from (for example the SFT stage's), merged into the base first;
    /// the merged model is the reference.
    #[arg(long = "from-adapter")]
    pub from_adapter: Vec<PathBuf>,
    /// The options shared with `peft train` (--data: JSONL with a `prompt` per line;
    /// --val-data: prompts whose greedy answers the reward model scores before and after
    /// training; --batch-size: prompts per rollout; --max-new-tokens bounds each
    /// completion).
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// `peft ppo`.
pub fn run(a: &PpoArgs) -> Result<()> {
    let r = Resolved::from_settings(a.config.as_deref(), &a.settings)?;
    if r.method != Method::Lora {
        bail!("peft ppo trains a LoRA adapter (--method lora)");
    }
    if r.options.grad_accum != 1 {
        bail!("peft ppo takes --grad-accum 1: each rollout is one mini-batch");
    }
    let cfg = PpoConfig {
        max_completion_length: r.max_new_tokens,
        temperature: a.temperature,
        kl_coef: a.kl_coef,
        kl_estimator: match a.kl_estimator.as_str() {
            "k1" => KlEstimator::K1,
            "k3" => KlEstimator::K3,
            o => bail!("unknown KL estimator `{o}`; use k1 or k3"),
        },
        gamma: a.gamma,
        lam: a.lam,
        cliprange: a.cliprange,
        cliprange_value: a.cliprange_value,
        vf_coef: a.vf_coef,
        ppo_epochs: a.ppo_epochs,
        seed: r.options.seed,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    check_reward_model(&a.reward_model, &a.reward_from_adapter)?;
    crate::with_backend!(a.device, |B, device| ppo_on::<burn::backend::Autodiff<B>>(
        a, &r, &cfg, &device
    ))
}

fn ppo_on<B: AutodiffBackend>(
    a: &PpoArgs,
    r: &Resolved,
    cfg: &PpoConfig,
    device: &B::Device,
) -> Result<()> {
    let started = std::time::Instant::now();
    let tok = load_tokenizer(&r.model)?;
    let to_ids = |ps: Vec<String>| prompts_as_ids(&tok, ps, r);
    let prompts = to_ids(read_prompts(&r.data)?)?;
    // Validation prompts: their greedy answers are scored before and after (no split of
    // --data otherwise: every prompt there is for rollouts).
    let val_prompts = match &r.val_data {
        Some(v) => to_ids(read_prompts(v)?)?,
        None => Vec::new(),
    };
    println!(
        "data: {} prompts, {} validation prompts",
        prompts.len(),
        val_prompts.len()
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
        resume: a.resume,
        cfg,
        pad,
        prompts: &prompts,
        val_prompts: &val_prompts,
        tok: &tok,
        started,
    };
    match model {
        Lm::Llama(m) => job.go(m, reward, device),
        Lm::Gpt2(m) => job.go(m, reward, device),
    }
}

struct Job<'a> {
    r: &'a Resolved,
    resume: bool,
    cfg: &'a PpoConfig,
    pad: u32,
    prompts: &'a [Vec<u32>],
    val_prompts: &'a [Vec<u32>],
    tok: &'a Tokenizer,
    started: std::time::Instant,
}

/// The reward model's scores of a model's greedy answers to the validation prompts.
struct ValScores {
    /// Mean score.
    reward: f64,
    /// Mean answer length in tokens.
    length: f64,
    /// (answer text, score) per prompt.
    answers: Vec<(String, f32)>,
}

impl ValScores {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "reward": self.reward, "completion_length": self.length })
    }
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
        let hidden = lm.token_embedding().map(|(_, _, d)| d).context(
            "this model exposes no token embedding, so the value head's width is unknown",
        )?;
        let lm = freeze(lm, &AdapterOnly);
        // The reference shares the frozen weights and runs with the adapter disabled.
        let reference: ReferenceFn = {
            let mut m = lm.valid();
            set_adapters_disabled(&mut m, true)?;
            let (pad, device) = (self.pad, device.clone());
            Box::new(move |seqs: &[&Tokenized], temperature: f64| {
                token_logps_at(&m, seqs, pad, temperature, &device)
                    .0
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .unwrap_or_default()
            })
        };
        // The reward model scores the rollouts and, before and after, the validation answers.
        let reward = std::rc::Rc::new(reward);
        let before = self.score_val(&lm.valid(), &reward, device)?;
        let model = PolicyWithValue::new(lm, hidden, 0.02, device);
        println!("{}", trainable_report(&model));
        let for_rollouts: RewardFn = {
            let reward = reward.clone();
            Box::new(move |samples| reward(samples))
        };
        let objective = Ppo::new(self.cfg.clone(), self.pad, for_rollouts, Some(reference));
        let mut options = r.options.clone();
        options.warmup_steps = r.warmup_steps.unwrap_or(0);
        options.eval_every = None;
        let done = train(
            model,
            &objective,
            self.prompts,
            &[],
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
        peft_lora::save_adapter_full(&model.lm, "default", &config, &dir)?;
        let after = self.score_val(&model.lm, &reward, device)?;
        let lines = peft_train::metrics::read(&r.out.join("metrics.jsonl"))?;
        let rollout_metric = |k: &str| -> Vec<f64> {
            lines
                .iter()
                .filter_map(|l| l.extra.get(k).copied())
                .collect()
        };
        let scores = rollout_metric("objective/scores");
        let kls = rollout_metric("objective/kl");
        let (first, last) = (
            scores.first().copied().unwrap_or(f64::NAN),
            scores.last().copied().unwrap_or(f64::NAN),
        );
        let mut val_table = String::new();
        if let (Some(b), Some(a)) = (&before, &after) {
            val_table = format!(
                "| validation prompts, greedy answers | before | after |\n|---|---|---|\n\
                 | mean reward-model score | {:.4} | {:.4} |\n\
                 | mean answer length (tokens) | {:.1} | {:.1} |\n",
                b.reward, a.reward, b.length, a.length
            );
            println!("\n{val_table}");
            let answers: String = b
                .answers
                .iter()
                .zip(&a.answers)
                .map(|((tb, sb), (ta, sa))| {
                    serde_json::json!({
                        "before": tb, "score_before": sb, "after": ta, "score_after": sa,
                    })
                    .to_string()
                        + "\n"
                })
                .collect();
            peft_core::format::write_atomic(&r.out.join("answers.jsonl"), answers.as_bytes())?;
        }
        let results = serde_json::json!({
            "before": before.as_ref().map(ValScores::json),
            "after": after.as_ref().map(ValScores::json),
            "rollouts": {
                "scores": scores, "kl": kls,
            },
            "steps": done.state.step, "train_seconds": done.state.elapsed_s, "options": r,
        });
        peft_core::format::write_atomic(
            &r.out.join("results.json"),
            serde_json::to_string_pretty(&results)?.as_bytes(),
        )?;
        let secs = self.started.elapsed().as_secs_f64();
        let summary = format!(
            "# PPO\n\nA LoRA adapter on `{}` trained with PPO (value head, GAE, KL penalty \
             {} to the model before the adapter) against a reward model.\n\n- command: `{}`\n\
             - steps: {} ({} rollouts)\n- mean reward-model score of the rollouts: first \
             {first:.4}, last {last:.4}\n- wall time: {secs:.0} s\n\n{val_table}\n\
             `metrics.jsonl` has \
             TRL's `objective/kl`, `objective/scores`, `objective/rlhf_reward`, \
             `policy/clipfrac`, `policy/approxkl`, `loss/policy`, `loss/value`, \
             `val/clipfrac`. The value head is not saved (it is in the checkpoints).\n",
            r.model.display(),
            self.cfg.kl_coef,
            std::env::args().collect::<Vec<_>>().join(" "),
            done.state.step,
            scores.len(),
        );
        std::fs::write(r.out.join("README.md"), &summary)?;
        println!("mean reward-model score of the rollouts: first {first:.4}, last {last:.4}");
        println!(
            "wrote {} (adapter), {}, {}, {} and {} in {secs:.0} s",
            dir.display(),
            r.out.join("metrics.jsonl").display(),
            r.out.join("loss.png").display(),
            r.out.join("README.md").display(),
            r.out.join("results.json").display()
        );
        Ok(())
    }

    /// Scores `model`'s greedy answers to the validation prompts with the reward model
    /// (`None` without validation prompts).
    fn score_val<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        reward: &RewardFn,
        device: &B::Device,
    ) -> Result<Option<ValScores>> {
        if self.val_prompts.is_empty() {
            return Ok(None);
        }
        let eos = model.eos_token_ids();
        let mut samples: Vec<Sample> = Vec::with_capacity(self.val_prompts.len());
        for chunk in self.val_prompts.chunks(self.r.options.batch_size.max(1)) {
            let outs = greedy_batch(
                model,
                chunk,
                self.cfg.max_completion_length,
                &eos,
                self.pad,
                device,
            )?;
            samples.extend(chunk.iter().cloned().zip(outs));
        }
        let scores = reward(&samples);
        let n = samples.len() as f64;
        let mut answers = Vec::with_capacity(samples.len());
        for ((_, c), &s) in samples.iter().zip(&scores) {
            let text = self.tok.decode(c, true)?;
            answers.push((text, s));
        }
        Ok(Some(ValScores {
            reward: scores.iter().map(|&s| f64::from(s)).sum::<f64>() / n,
            length: samples.iter().map(|(_, c)| c.len()).sum::<usize>() as f64 / n,
            answers,
        }))
    }
}
