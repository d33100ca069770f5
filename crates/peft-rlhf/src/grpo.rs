//! GRPO (Shao et al., 2024, <https://arxiv.org/abs/2402.03300>) as TRL's `GRPOTrainer`
//! computes it: `G` completions are sampled per prompt, scored by a reward function (a
//! reward model), and each completion's advantage is its reward relative to its group,
//! `A_i = (r_i - mean_group) / (std_group + 1e-4)`; no value head. The per-token loss is
//!
//! `-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)`
//!
//! with `rho = exp(logp - logp_old)` (one optimisation pass per generation, so `logp_old`
//! is `logp` detached and only the gradient of `rho` acts) and the KL term against the
//! reference (the model with its adapter disabled) when `beta > 0` (TRL's default is 0).

use std::cell::{Cell, RefCell};
use std::str::FromStr;

use burn::prelude::*;
use peft_models::CausalLm;
use peft_models::generate::{GenerationConfig, generate};
use peft_train::data::Tokenized;
use peft_train::trainer::Objective;
use serde::{Deserialize, Serialize};

use crate::dpo::token_logps_at;

/// How rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation (+ 1e-4).
    #[default]
    Group,
    /// Divide by the whole batch's standard deviation (+ 1e-4).
    Batch,
    /// Only subtract the group mean (Dr. GRPO).
    None,
}

impl FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "group" => Self::Group,
            "batch" => Self::Batch,
            "none" => Self::None,
            o => {
                return Err(format!(
                    "unknown reward scaling `{o}`; use group, batch or none"
                ));
            }
        })
    }
}

/// How the per-token losses are reduced (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Mean over sequences of each sequence's token mean (the original GRPO).
    #[default]
    Grpo,
    /// Mean over all completion tokens of the batch.
    Bnpo,
    /// Sum over tokens divided by `sequences * max_completion_length` (Dr. GRPO).
    DrGrpo,
}

impl FromStr for GrpoLossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            o => {
                return Err(format!(
                    "unknown GRPO loss `{o}`; use grpo, bnpo or dr_grpo"
                ));
            }
        })
    }
}

/// Sample standard deviation (Bessel-corrected, as TRL's `nanstd`); NaN below 2 values.
fn std_dev(v: &[f32]) -> f32 {
    let n = v.len() as f64;
    if v.len() < 2 {
        return f32::NAN;
    }
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    var.sqrt() as f32
}

/// Group-relative advantages of `rewards` laid out group after group, `g` per group.
pub fn group_advantages(rewards: &[f32], g: usize, scale: ScaleRewards) -> Vec<f32> {
    let g = g.max(1);
    let batch_std = std_dev(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(g) {
        let mean = group.iter().sum::<f32>() / group.len() as f32;
        let std = match scale {
            ScaleRewards::Group => std_dev(group),
            ScaleRewards::Batch => batch_std,
            ScaleRewards::None => 0.0,
        };
        for &r in group {
            out.push(match scale {
                ScaleRewards::None => r - mean,
                _ => (r - mean) / (std + 1e-4),
            });
        }
    }
    out
}

/// Per-token GRPO loss and statistics over `[n, t]` tensors.
#[derive(Debug, Clone)]
pub struct GrpoTerms<B: Backend> {
    /// The per-token loss `[n, t]` (multiply by the mask before reducing).
    pub per_token: Tensor<B, 2>,
    /// The per-token KL `exp(ref - logp) - (ref - logp) - 1` when a reference was given.
    pub kl: Option<Tensor<B, 2>>,
    /// 1 where the clip was active (`rho` below `1 - eps_low` with `A < 0`, or above
    /// `1 + eps_high` with `A > 0`), else 0.
    pub clipped: Tensor<B, 2>,
}

/// GRPO's per-token loss from the current (`logprobs`, with gradient) and rollout
/// (`old`) log-probabilities `[n, t]`, the advantages (`[n, 1]` per sequence, or any shape
/// that broadcasts to `[n, t]`), and the reference's log-probabilities for the KL term
/// (`beta > 0`).
pub fn grpo_per_token<B: Backend>(
    logprobs: Tensor<B, 2>,
    old: Tensor<B, 2>,
    reference: Option<Tensor<B, 2>>,
    adv: Tensor<B, 2>,
    beta: f64,
    epsilon_low: f64,
    epsilon_high: f64,
) -> GrpoTerms<B> {
    let coef1 = (logprobs.clone() - old).exp();
    let coef2 = coef1.clone().clamp(1.0 - epsilon_low, 1.0 + epsilon_high);
    let l1 = coef1.clone() * adv.clone();
    let l2 = coef2 * adv.clone();
    let mut per_token = l1.min_pair(l2).neg();
    let c = coef1.detach();
    let pos = adv.clone().greater_elem(0.0).float();
    let neg = adv.lower_elem(0.0).float();
    let clipped = c.clone().lower_elem(1.0 - epsilon_low).float() * neg
        + c.greater_elem(1.0 + epsilon_high).float() * pos;
    let kl = reference.map(|r| {
        let d = r - logprobs;
        d.clone().exp() - d - 1.0
    });
    if let (Some(kl), true) = (&kl, beta != 0.0) {
        per_token = per_token + kl.clone() * beta;
    }
    GrpoTerms {
        per_token,
        kl,
        clipped,
    }
}

/// Reduces a per-token loss `[n, t]` with the mask as `loss_type` says (a mean: TRL's
/// loss of the batch).
pub fn reduce_grpo<B: Backend>(
    per_token: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    loss_type: GrpoLossType,
    max_completion_length: usize,
) -> Tensor<B, 1> {
    let [n, _] = per_token.dims();
    let masked = per_token * mask.clone();
    match loss_type {
        GrpoLossType::Grpo => {
            let per_seq = masked.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
            per_seq.mean().reshape([1])
        }
        GrpoLossType::Bnpo => masked.sum().reshape([1]) / mask.sum().clamp_min(1.0),
        GrpoLossType::DrGrpo => masked.sum().reshape([1]) / (n * max_completion_length) as f64,
    }
}

/// GRPO's options (TRL's `GRPOConfig` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpoConfig {
    /// Completions sampled per prompt (at least 2).
    pub num_generations: usize,
    /// Most tokens per completion.
    pub max_completion_length: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// KL coefficient against the reference (0: no reference pass).
    pub beta: f64,
    /// Lower clip range.
    pub epsilon_low: f64,
    /// Upper clip range.
    pub epsilon_high: f64,
    /// Reward scaling.
    pub scale_rewards: ScaleRewards,
    /// Loss reduction; the training loop takes `grpo` and `dr_grpo`, whose normaliser is
    /// known before sampling.
    pub loss_type: GrpoLossType,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            max_completion_length: 64,
            temperature: 1.0,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            scale_rewards: ScaleRewards::Group,
            loss_type: GrpoLossType::Grpo,
            seed: 42,
        }
    }
}

impl GrpoConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// Fewer than 2 generations, no completion tokens, a non-positive temperature, a
    /// negative beta or clip range, or the `bnpo` loss (not available in the loop).
    pub fn validate(&self) -> Result<(), String> {
        if self.num_generations < 2 {
            return Err(format!(
                "GRPO needs at least 2 generations per prompt to compare, not {}",
                self.num_generations
            ));
        }
        if self.max_completion_length == 0 {
            return Err("the completion length must be at least 1 token".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "the temperature must be positive, not {}",
                self.temperature
            ));
        }
        if !(self.beta >= 0.0 && self.epsilon_low >= 0.0 && self.epsilon_high >= 0.0) {
            return Err("beta and the clip ranges must not be negative".into());
        }
        if self.loss_type == GrpoLossType::Bnpo {
            return Err(
                "the bnpo loss normalises by the token count of the sampled batch, which the \
                 training loop cannot know in advance; use grpo or dr_grpo"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A sampled (prompt, completion) pair of token sequences.
pub type Sample = (Vec<u32>, Vec<u32>);

/// Scores (prompt, completion) token sequences, one reward each.
pub type RewardFn = Box<dyn Fn(&[Sample]) -> Vec<f32>>;

/// Per-token log-probabilities of the completion tokens of sequences under the reference
/// (flat, in [`token_logps`](crate::dpo::token_logps)'s order) at the given sampling
/// temperature (see [`crate::dpo::token_logps_at`]).
pub type ReferenceFn = Box<dyn Fn(&[&Tokenized], f64) -> Vec<f32>>;

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    groups: usize,
    completions: usize,
    reward: f64,
    reward_std: f64,
    zero_std: usize,
    length: f64,
    clip: f64,
    kl: f64,
    tokens: f64,
}

/// GRPO as an objective of `peft-train`'s loop: each example is a prompt (token ids, the
/// chat template's generation prompt included); a step samples `num_generations`
/// completions per prompt from the model being trained. Metrics: `reward`, `reward_std`
/// (mean within-group standard deviation), `frac_reward_zero_std`, `completion_length`,
/// `clip_ratio`, and `kl` when a reference is given.
pub struct Grpo {
    /// Options.
    pub config: GrpoConfig,
    /// Padding id.
    pub pad: u32,
    reward: RewardFn,
    reference: Option<ReferenceFn>,
    calls: Cell<u64>,
    sums: RefCell<Sums>,
    /// Completions sampled by `rollout` for the next `loss` call on the same prompts.
    prepared: RefCell<Option<Vec<Sample>>>,
}

impl std::fmt::Debug for Grpo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grpo")
            .field("config", &self.config)
            .field("pad", &self.pad)
            .field("reference", &self.reference.is_some())
            .finish_non_exhaustive()
    }
}

impl Grpo {
    /// GRPO with a reward function and, for `beta > 0`, the reference's log-probabilities.
    pub fn new(
        config: GrpoConfig,
        pad: u32,
        reward: RewardFn,
        reference: Option<ReferenceFn>,
    ) -> Self {
        Self {
            config,
            pad,
            reward,
            reference,
            calls: Cell::new(0),
            sums: RefCell::new(Sums::default()),
            prepared: RefCell::new(None),
        }
    }

    /// Samples the completions of `prompts` (`num_generations` each, group after group).
    fn sample<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) -> Vec<(Vec<u32>, Vec<u32>)> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        let g = self.config.num_generations;
        let mut out = Vec::with_capacity(prompts.len() * g);
        for (i, p) in prompts.iter().enumerate() {
            for k in 0..g {
                let cfg = GenerationConfig {
                    max_new_tokens: self.config.max_completion_length,
                    do_sample: true,
                    temperature: self.config.temperature,
                    seed: self
                        .config
                        .seed
                        .wrapping_add(call.wrapping_mul(1_000_003))
                        .wrapping_add((i * g + k) as u64),
                    ..Default::default()
                };
                // An empty or out-of-vocabulary prompt was refused when the data was read;
                // a failure here leaves an empty completion, which gets no loss.
                let c = generate(model, p, &cfg, device, |_| {}).unwrap_or_default();
                out.push(((*p).clone(), c));
            }
        }
        out
    }
}

impl Objective for Grpo {
    type Example = Vec<u32>;

    /// Samples the completions with the model without autodiff (no graph per token).
    fn rollout<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) {
        let samples = self.sample(model, prompts, device);
        *self.prepared.borrow_mut() = Some(samples);
    }

    fn loss<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let g = self.config.num_generations;
        // The completions `rollout` sampled for these prompts, else (evaluation) sample now.
        let prepared = self.prepared.borrow_mut().take().filter(|s| {
            s.len() == prompts.len() * g
                && s.chunks(g.max(1))
                    .zip(prompts)
                    .all(|(grp, p)| grp.iter().all(|(q, _)| q == *p))
        });
        let samples = match prepared {
            Some(s) => s,
            None => self.sample(model, prompts, device),
        };
        let rewards = (self.reward)(&samples);
        let adv = group_advantages(&rewards, g, self.config.scale_rewards);
        let seqs: Vec<Tokenized> = samples
            .iter()
            .map(|(p, c)| Tokenized {
                ids: p.iter().chain(c).copied().collect(),
                trained: (0..p.len() + c.len()).map(|i| i >= p.len()).collect(),
            })
            .collect();
        let refs: Vec<&Tokenized> = seqs.iter().collect();
        let (logp, owner) = token_logps_at(model, &refs, self.pad, self.config.temperature, device);
        let n = owner.len();
        {
            let mut s = self.sums.borrow_mut();
            s.groups += prompts.len();
            s.completions += samples.len();
            s.reward += rewards.iter().map(|&r| f64::from(r)).sum::<f64>();
            for grp in rewards.chunks(g) {
                let sd = std_dev(grp);
                s.reward_std += f64::from(sd);
                s.zero_std += usize::from(sd.abs() < 1e-6);
            }
            s.length += samples.iter().map(|(_, c)| c.len() as f64).sum::<f64>();
        }
        if n == 0 {
            return Tensor::zeros([1], device);
        }
        // Work on the flat [1, n] token axis: every per-token term is elementwise, and the
        // reduction weights each token by 1/len(its sequence) (grpo) or 1/max_len (dr_grpo).
        let lens: Vec<usize> = samples.iter().map(|(_, c)| c.len()).collect();
        let token_adv: Vec<f32> = owner.iter().map(|&s| adv[s]).collect();
        let weight: Vec<f32> = owner
            .iter()
            .map(|&s| match self.config.loss_type {
                GrpoLossType::DrGrpo => 1.0 / self.config.max_completion_length as f32,
                _ => 1.0 / lens[s].max(1) as f32,
            })
            .collect();
        let row = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device);
        let reference = (self.config.beta > 0.0)
            .then(|| {
                self.reference
                    .as_ref()
                    .map(|f| f(&refs, self.config.temperature))
            })
            .flatten()
            .filter(|r| r.len() == n)
            .map(|r| row(r).unsqueeze::<2>());
        let lp = logp.unsqueeze::<2>();
        let terms = grpo_per_token(
            lp.clone(),
            lp.detach(),
            reference,
            row(token_adv).unsqueeze::<2>(),
            self.config.beta,
            self.config.epsilon_low,
            self.config.epsilon_high,
        );
        {
            let mut s = self.sums.borrow_mut();
            s.tokens += n as f64;
            s.clip += f64::from(terms.clipped.sum().into_scalar().elem::<f32>());
            if let Some(kl) = &terms.kl {
                s.kl += f64::from(kl.clone().detach().sum().into_scalar().elem::<f32>());
            }
        }
        (terms.per_token * row(weight).unsqueeze::<2>()).sum()
    }

    fn targets(&self, _: &Vec<u32>) -> usize {
        self.config.num_generations
    }

    fn tokens(&self, p: &Vec<u32>) -> usize {
        self.config.num_generations * (p.len() + self.config.max_completion_length)
    }

    fn take_metrics(&self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut *self.sums.borrow_mut());
        if s.completions == 0 {
            return Vec::new();
        }
        let c = s.completions as f64;
        let mut v = vec![
            ("reward".into(), s.reward / c),
            ("reward_std".into(), s.reward_std / s.groups.max(1) as f64),
            (
                "frac_reward_zero_std".into(),
                s.zero_std as f64 / s.groups.max(1) as f64,
            ),
            ("completion_length".into(), s.length / c),
            ("clip_ratio".into(), s.clip / s.tokens.max(1.0)),
        ];
        if self.config.beta > 0.0 && self.reference.is_some() {
            v.push(("kl".into(), s.kl / s.tokens.max(1.0)));
        }
        v
    }
}
