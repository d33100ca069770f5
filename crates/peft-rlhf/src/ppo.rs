//! PPO for RLHF (Schulman et al., 2017, <https://arxiv.org/abs/1707.06347>; Ouyang et al.,
//! 2022), the pieces of TRL's `PPOTrainer`: the per-token KL penalty against the reference,
//! the reward model's score at the last completion token, GAE, whitened advantages, and
//! the clipped policy and value losses.
//!
//! Per-token quantities are `[sequences, T]` row-major with a 0/1 mask of real completion
//! tokens. The rollout quantities (KL, rewards, GAE, whitening) carry no gradient and are
//! plain `f32` slices; the losses are tensors.
//!
//! - KL: `logr = ref - logp`; `k1`: `-logr`, `k3`: `exp(logr) - 1 - logr`.
//! - Rewards: `r_t = -kl_coef kl_t`, plus the score at the last real token.
//! - GAE: `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lambda A_{t+1}`,
//!   returns `A + V`.
//! - Policy loss: masked mean of `max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`,
//!   `rho = exp(logp - logp_old)`.
//! - Value loss: `0.5` masked mean of `max((v - R)^2, (clip(v, V_old - c, V_old + c) - R)^2)`.

use std::cell::{Cell, RefCell};

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use peft_models::generate::{GenerationConfig, Sampler, next_token};
use peft_models::{CausalLm, ForwardInput, KvCache};
use peft_train::data::{Batch, Tokenized};
use peft_train::trainer::Objective;
use serde::{Deserialize, Serialize};

/// How the per-token KL is estimated (TRL's `kl_estimator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - ref` (unbiased, can be negative).
    #[default]
    K1,
    /// `exp(ref - logp) - 1 - (ref - logp)` (unbiased, never negative).
    K3,
}

/// Per-token KL of the policy from the reference (0 where `mask` is 0).
pub fn kl_per_token(
    logprobs: &[f32],
    ref_logprobs: &[f32],
    mask: &[f32],
    estimator: KlEstimator,
) -> Vec<f32> {
    logprobs
        .iter()
        .zip(ref_logprobs)
        .zip(mask)
        .map(|((&lp, &rf), &m)| {
            let logr = rf - lp;
            let kl = match estimator {
                KlEstimator::K1 => -logr,
                KlEstimator::K3 => logr.exp() - 1.0 - logr,
            };
            kl * m
        })
        .collect()
}

/// Per-token rewards `[n, t]`: `-kl_coef kl`, plus `scores[i]` at the last real token of
/// sequence `i` (`lengths[i] - 1`). Returns `(rewards, non_score_rewards)`.
pub fn rewards_with_kl(
    kl: &[f32],
    scores: &[f32],
    lengths: &[usize],
    t: usize,
    kl_coef: f64,
) -> (Vec<f32>, Vec<f32>) {
    let non_score: Vec<f32> = kl.iter().map(|&k| -(kl_coef as f32) * k).collect();
    let mut rewards = non_score.clone();
    for (i, (&s, &len)) in scores.iter().zip(lengths).enumerate() {
        if len > 0 {
            rewards[i * t + len.min(t) - 1] += s;
        }
    }
    (rewards, non_score)
}

/// Generalised advantage estimation over `[n, t]` rewards and values (masked positions
/// count as 0). Returns `(advantages, returns)`, 0 where `mask` is 0.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    mask: &[f32],
    t: usize,
    gamma: f64,
    lambda: f64,
) -> (Vec<f32>, Vec<f32>) {
    let (gamma, lambda) = (gamma as f32, lambda as f32);
    let n = rewards.len() / t.max(1);
    let mut adv = vec![0f32; rewards.len()];
    let mut ret = vec![0f32; rewards.len()];
    for i in 0..n {
        let row = i * t;
        let mut last = 0f32;
        for j in (0..t).rev() {
            let v = values[row + j] * mask[row + j];
            let next = if j + 1 < t {
                values[row + j + 1] * mask[row + j + 1]
            } else {
                0.0
            };
            let delta = rewards[row + j] + gamma * next - v;
            last = delta + gamma * lambda * last;
            adv[row + j] = last * mask[row + j];
            ret[row + j] = adv[row + j] + v;
        }
    }
    (adv, ret)
}

/// `(x - mean) / sqrt(var + 1e-8)` over the masked entries (variance with Bessel's
/// correction, as TRL's `masked_whiten`), 0 where `mask` is 0.
pub fn masked_whiten(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let n: f64 = mask.iter().map(|&m| f64::from(m)).sum();
    if n < 2.0 {
        return x.iter().zip(mask).map(|(_, _)| 0.0).collect();
    }
    let mean = x
        .iter()
        .zip(mask)
        .map(|(&v, &m)| f64::from(v * m))
        .sum::<f64>()
        / n;
    let var = x
        .iter()
        .zip(mask)
        .map(|(&v, &m)| (f64::from(v) - mean).powi(2) * f64::from(m))
        .sum::<f64>()
        / n
        * (n / (n - 1.0));
    let inv = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .zip(mask)
        .map(|(&v, &m)| ((f64::from(v) - mean) * inv) as f32 * m)
        .collect()
}

/// The clipped PPO policy loss and its statistics.
#[derive(Debug, Clone)]
pub struct PolicyLoss<B: Backend> {
    /// The masked mean loss (one element, with gradient).
    pub loss: Tensor<B, 1>,
    /// Share of tokens where clipping was active (`policy/clipfrac`).
    pub clipfrac: f64,
    /// `0.5 mean((logp - logp_old)^2)` over real tokens (`policy/approxkl`).
    pub approxkl: f64,
}

fn masked_mean<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let n = mask.clone().sum().clamp_min(1.0);
    (x * mask).sum() / n
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    f64::from(t.into_scalar().elem::<f32>())
}

/// PPO's clipped policy loss from per-token log-probabilities `[n, t]` under the current
/// policy (`logprobs`, with gradient) and the rollout policy (`old`), whitened
/// `advantages` and the mask.
pub fn ppo_policy_loss<B: Backend>(
    logprobs: Tensor<B, 2>,
    old: Tensor<B, 2>,
    advantages: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cliprange: f64,
) -> PolicyLoss<B> {
    let diff = logprobs - old;
    let ratio = diff.clone().exp();
    let l1 = advantages.clone().neg() * ratio.clone();
    let l2 = advantages.neg() * ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
    let clipped = l2.clone().detach().greater(l1.clone().detach()).float();
    let loss = masked_mean(l1.max_pair(l2), mask.clone());
    let d = diff.detach();
    PolicyLoss {
        loss,
        clipfrac: scalar(masked_mean(clipped, mask.clone())),
        approxkl: 0.5 * scalar(masked_mean(d.clone() * d, mask)),
    }
}

/// PPO's clipped value loss `0.5 mean(max((v - R)^2, (clip(v) - R)^2))` over real tokens,
/// with the share of tokens where the clipped term was the larger (`val/clipfrac`).
pub fn ppo_value_loss<B: Backend>(
    vpred: Tensor<B, 2>,
    old_values: Tensor<B, 2>,
    returns: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cliprange_value: f64,
) -> (Tensor<B, 1>, f64) {
    let lo = old_values.clone() - cliprange_value;
    let hi = old_values + cliprange_value;
    let clipped = vpred.clone().max_pair(lo).min_pair(hi);
    let l1 = (vpred - returns.clone()).powi_scalar(2);
    let l2 = (clipped - returns).powi_scalar(2);
    let frac = l2.clone().detach().greater(l1.clone().detach()).float();
    let loss = masked_mean(l1.max_pair(l2), mask.clone()) * 0.5;
    (loss, scalar(masked_mean(frac, mask)))
}

/// A policy with a value head (TRL's `AutoModelForCausalLMWithValueHead`): the adapted
/// language model and `v_head`, a `Linear(hidden, 1)` on the same final hidden states.
///
/// Its `logits` are the language model's `[.., vocab]` with the value appended as one more
/// column (`[.., vocab + 1]`), so one forward gives both; [`policy_terms`] splits them.
/// Sample from it with [`Ppo`] (which drops the value column), not with peft-models'
/// generation.
#[derive(Module, Debug)]
pub struct PolicyWithValue<B: Backend, L> {
    /// The policy (its adapter trains).
    pub lm: L,
    /// The value head, `hidden -> 1`, with bias.
    pub v_head: burn::nn::Linear<B>,
}

impl<B: Backend, L> PolicyWithValue<B, L> {
    /// Wraps `lm` with a fresh, trainable value head of width `hidden` (normal, std
    /// `init_std`). Freeze the language model's base before wrapping it.
    pub fn new(lm: L, hidden: usize, init_std: f64, device: &B::Device) -> Self {
        let v_head = burn::nn::LinearConfig::new(hidden, 1)
            .with_initializer(burn::nn::Initializer::Normal {
                mean: 0.0,
                std: init_std,
            })
            .init(device);
        Self { lm, v_head }
    }
}

impl<B: Backend, L: CausalLm<B>> CausalLm<B> for PolicyWithValue<B, L> {
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.lm.hidden(input, cache)
    }

    /// The language model's logits with the value as the last column.
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let v = self.v_head.forward(hidden.clone());
        Tensor::cat(vec![self.lm.logits(hidden), v], 2)
    }

    fn new_cache(&self) -> KvCache<B> {
        self.lm.new_cache()
    }

    /// The language model's vocabulary plus the value column.
    fn vocab_size(&self) -> usize {
        self.lm.vocab_size() + 1
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.lm.eos_token_ids()
    }
}

/// Log-probabilities and values at every target token of `seqs` (`[targets]` each, sequence
/// by sequence), from a model whose last logit column is the value
/// ([`PolicyWithValue`]), with the sequence each token belongs to. The log-probabilities
/// are those of sampling at `temperature` (`log_softmax(logits / temperature)`), as TRL's
/// `PPOTrainer` takes them for the rollouts, the reference and the updates alike.
pub fn policy_terms<B: Backend, M: CausalLm<B>>(
    model: &M,
    seqs: &[&Tokenized],
    pad: u32,
    temperature: f64,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>, Vec<usize>) {
    let batch = Batch::new(seqs, pad);
    let (b, len) = (batch.ids.len(), batch.len);
    let n = batch.positions.len();
    if n == 0 {
        return (
            Tensor::zeros([0], device),
            Tensor::zeros([0], device),
            Vec::new(),
        );
    }
    let flat: Vec<i32> = batch.ids.iter().flatten().map(|&t| t as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, len]), device);
    let hidden = model.hidden(ForwardInput::new(ids), None);
    let d = hidden.dims()[2];
    let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
    let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(pos, [n]), device);
    let out = model.logits(hidden.reshape([b * len, d]).select(0, pos).unsqueeze::<3>());
    let w = out.dims()[2];
    let out = out.reshape([n, w]);
    let logits = out.clone().slice([0..n, 0..w - 1]);
    let logits = if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    };
    let values = out.slice([0..n, w - 1..w]).reshape([n]);
    let tg: Vec<i32> = batch.targets.iter().map(|&t| t as i32).collect();
    let tg = Tensor::<B, 1, Int>::from_data(TensorData::new(tg, [n]), device).unsqueeze_dim(1);
    let logp = log_softmax(logits, 1).gather(1, tg).reshape([n]);
    let owner = batch.positions.iter().map(|&p| p / len).collect();
    (logp, values, owner)
}

/// PPO's options (TRL's `PPOConfig` names and defaults where they apply).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    /// Most tokens per completion.
    pub max_completion_length: usize,
    /// Sampling temperature (TRL: 0.7).
    pub temperature: f64,
    /// KL penalty coefficient (TRL: 0.05).
    pub kl_coef: f64,
    /// KL estimator.
    pub kl_estimator: KlEstimator,
    /// Discount (TRL: 1.0).
    pub gamma: f64,
    /// GAE's lambda (TRL: 0.95).
    pub lam: f64,
    /// Policy clip range (TRL: 0.2).
    pub cliprange: f64,
    /// Value clip range (TRL: 0.2).
    pub cliprange_value: f64,
    /// Value loss coefficient (TRL: 0.1).
    pub vf_coef: f64,
    /// Optimizer steps on each rollout (TRL's `num_ppo_epochs`, one mini-batch each).
    pub ppo_epochs: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            max_completion_length: 53,
            temperature: 0.7,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ppo_epochs: 4,
            seed: 42,
        }
    }
}

impl PpoConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// No completion tokens, no epochs, a non-positive temperature, or a negative
    /// coefficient or clip range.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_completion_length == 0 || self.ppo_epochs == 0 {
            return Err("the completion length and ppo_epochs must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "the temperature must be positive, not {}",
                self.temperature
            ));
        }
        let nonneg = [
            self.kl_coef,
            self.gamma,
            self.lam,
            self.cliprange,
            self.cliprange_value,
            self.vf_coef,
        ];
        if nonneg.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err("kl_coef, gamma, lam, the clip ranges and vf_coef must be >= 0".into());
        }
        Ok(())
    }
}

/// One rollout: the sampled sequences and what the update needs, flat over completion
/// tokens (sequence by sequence).
#[derive(Debug, Clone)]
struct Rollout {
    seqs: Vec<Tokenized>,
    old_logp: Vec<f32>,
    old_values: Vec<f32>,
    advantages: Vec<f32>,
    returns: Vec<f32>,
    uses: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    rollouts: usize,
    sequences: usize,
    kl: f64,
    scores: f64,
    non_score: f64,
    length: f64,
    updates: usize,
    clipfrac: f64,
    approxkl: f64,
    pg: f64,
    vf: f64,
    vf_clipfrac: f64,
}

/// PPO as an objective of `peft-train`'s loop, on a [`PolicyWithValue`]. Examples are
/// prompts (token ids with the generation prompt). A call with no rollout in hand samples
/// one completion per prompt, scores it with the reward function, takes the reference's
/// per-token log-probabilities (the adapter-disabled model) for the KL penalty, and runs
/// GAE; that rollout then serves `ppo_epochs` consecutive optimizer steps (the prompts of
/// those later calls are not used), so the ratio and the clipping act from the second one.
/// Use `grad_accum = 1` and no validation set.
///
/// Metrics, with TRL's names: `objective/kl`, `objective/scores`,
/// `objective/non_score_reward`, `objective/rlhf_reward` (on rollout steps),
/// `policy/clipfrac`, `policy/approxkl`, `loss/policy`, `loss/value`, `val/clipfrac`,
/// `completion_length`.
pub struct Ppo {
    /// Options.
    pub config: PpoConfig,
    /// Padding id.
    pub pad: u32,
    reward: crate::grpo::RewardFn,
    reference: Option<crate::grpo::ReferenceFn>,
    rollout: RefCell<Option<Rollout>>,
    calls: Cell<u64>,
    sums: RefCell<Sums>,
}

impl std::fmt::Debug for Ppo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ppo")
            .field("config", &self.config)
            .field("pad", &self.pad)
            .field("reference", &self.reference.is_some())
            .finish_non_exhaustive()
    }
}

impl Ppo {
    /// PPO with a reward function and the reference's per-token log-probabilities (`None`:
    /// no KL penalty).
    pub fn new(
        config: PpoConfig,
        pad: u32,
        reward: crate::grpo::RewardFn,
        reference: Option<crate::grpo::ReferenceFn>,
    ) -> Self {
        Self {
            config,
            pad,
            reward,
            reference,
            rollout: RefCell::new(None),
            calls: Cell::new(0),
            sums: RefCell::new(Sums::default()),
        }
    }

    /// Samples one completion per prompt from the policy columns of `model`'s logits.
    fn sample<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) -> Vec<(Vec<u32>, Vec<u32>)> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        let eos = model.eos_token_ids();
        let cfg = GenerationConfig {
            max_new_tokens: self.config.max_completion_length,
            do_sample: true,
            temperature: self.config.temperature,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let mut sampler = Sampler::new(
                self.config
                    .seed
                    .wrapping_add(call.wrapping_mul(1_000_003))
                    .wrapping_add(i as u64),
            );
            let mut cache = model.new_cache();
            let mut input: Vec<u32> = (*p).clone();
            let mut seen = input.clone();
            let mut completion = Vec::new();
            for _ in 0..self.config.max_completion_length {
                let n = input.len();
                let ids: Vec<i32> = input.iter().map(|&t| t as i32).collect();
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
                let h = model.hidden(ForwardInput::new(ids), Some(&mut cache));
                let [_, s, d] = h.dims();
                let out = model.logits(h.slice([0..1, s - 1..s, 0..d]).detach());
                let mut row: Vec<f32> = out
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .unwrap_or_default();
                row.pop(); // the value column
                if row.is_empty() {
                    break;
                }
                let t = next_token(&mut row, &seen, &cfg, &mut sampler);
                completion.push(t);
                seen.push(t);
                if eos.contains(&t) {
                    break;
                }
                input = vec![t];
            }
            out.push(((*p).clone(), completion));
        }
        out
    }

    fn new_rollout<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) -> Rollout {
        let samples = self.sample(model, prompts, device);
        let scores = (self.reward)(&samples);
        let seqs: Vec<Tokenized> = samples
            .iter()
            .map(|(p, c)| Tokenized {
                ids: p.iter().chain(c).copied().collect(),
                trained: (0..p.len() + c.len()).map(|i| i >= p.len()).collect(),
            })
            .collect();
        let refs: Vec<&Tokenized> = seqs.iter().collect();
        let (logp, values, owner) =
            policy_terms(model, &refs, self.pad, self.config.temperature, device);
        let vec = |t: Tensor<B, 1>| -> Vec<f32> {
            t.detach()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap_or_default()
        };
        let (old_logp, old_values) = (vec(logp), vec(values));
        let ref_logp = self
            .reference
            .as_ref()
            .map(|f| f(&refs, self.config.temperature))
            .filter(|r| r.len() == old_logp.len())
            .unwrap_or_else(|| old_logp.clone());
        // Lay the flat tokens out as [sequences, t] for the per-sequence computations.
        let lengths: Vec<usize> = samples.iter().map(|(_, c)| c.len()).collect();
        let t = lengths.iter().copied().max().unwrap_or(0).max(1);
        let ns = samples.len();
        let mut starts = vec![0usize; ns + 1];
        for (i, &l) in lengths.iter().enumerate() {
            starts[i + 1] = starts[i] + l;
        }
        debug_assert_eq!(starts[ns], owner.len());
        let pad_out = |flat: &[f32]| -> Vec<f32> {
            let mut m = vec![0f32; ns * t];
            for i in 0..ns {
                for j in 0..lengths[i] {
                    m[i * t + j] = flat[starts[i] + j];
                }
            }
            m
        };
        let flatten = |m: &[f32]| -> Vec<f32> {
            (0..ns)
                .flat_map(|i| (0..lengths[i]).map(|j| m[i * t + j]).collect::<Vec<_>>())
                .collect()
        };
        let mask: Vec<f32> = (0..ns)
            .flat_map(|i| {
                let l = lengths[i];
                (0..t).map(move |j| if j < l { 1.0 } else { 0.0 })
            })
            .collect();
        let (lp, rp, vals) = (pad_out(&old_logp), pad_out(&ref_logp), pad_out(&old_values));
        let kl = kl_per_token(&lp, &rp, &mask, self.config.kl_estimator);
        let (rewards, non_score) = rewards_with_kl(&kl, &scores, &lengths, t, self.config.kl_coef);
        let (adv, ret) = gae(
            &rewards,
            &vals,
            &mask,
            t,
            self.config.gamma,
            self.config.lam,
        );
        let white = masked_whiten(&adv, &mask);
        {
            let mut s = self.sums.borrow_mut();
            s.rollouts += 1;
            s.sequences += ns;
            s.kl += kl.iter().map(|&x| f64::from(x)).sum::<f64>();
            s.non_score += non_score.iter().map(|&x| f64::from(x)).sum::<f64>();
            s.scores += scores.iter().map(|&x| f64::from(x)).sum::<f64>();
            s.length += lengths.iter().sum::<usize>() as f64;
        }
        Rollout {
            seqs,
            old_logp,
            old_values,
            advantages: flatten(&white),
            returns: flatten(&ret),
            uses: 0,
        }
    }
}

impl Ppo {
    fn needs_rollout(&self) -> bool {
        self.rollout
            .borrow()
            .as_ref()
            .is_none_or(|r| r.uses >= self.config.ppo_epochs)
    }
}

impl Objective for Ppo {
    type Example = Vec<u32>;

    /// Samples and scores a new rollout when the last one is used up, with the model
    /// without autodiff (no graph per generated token).
    fn rollout<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) {
        if self.needs_rollout() {
            let r = self.new_rollout(model, prompts, device);
            *self.rollout.borrow_mut() = Some(r);
        }
    }

    fn loss<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        prompts: &[&Vec<u32>],
        device: &B::Device,
    ) -> Tensor<B, 1> {
        if self.needs_rollout() {
            let r = self.new_rollout(model, prompts, device);
            *self.rollout.borrow_mut() = Some(r);
        }
        let mut guard = self.rollout.borrow_mut();
        let Some(ro) = guard.as_mut() else {
            return Tensor::zeros([1], device);
        };
        ro.uses += 1;
        let refs: Vec<&Tokenized> = ro.seqs.iter().collect();
        let (logp, vpred, owner) =
            policy_terms(model, &refs, self.pad, self.config.temperature, device);
        let n = owner.len();
        if n == 0 || n != ro.old_logp.len() {
            return Tensor::zeros([1], device);
        }
        let row = |v: &[f32]| {
            Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [n]), device).unsqueeze::<2>()
        };
        let ones = row(&vec![1.0; n]);
        let pl = ppo_policy_loss(
            logp.unsqueeze::<2>(),
            row(&ro.old_logp),
            row(&ro.advantages),
            ones.clone(),
            self.config.cliprange,
        );
        let (vf, vf_clip) = ppo_value_loss(
            vpred.unsqueeze::<2>(),
            row(&ro.old_values),
            row(&ro.returns),
            ones,
            self.config.cliprange_value,
        );
        let loss = pl.loss.clone() + vf.clone() * self.config.vf_coef;
        {
            let mut s = self.sums.borrow_mut();
            s.updates += 1;
            s.clipfrac += pl.clipfrac;
            s.approxkl += pl.approxkl;
            s.pg += scalar(pl.loss.detach());
            s.vf += scalar(vf.detach());
            s.vf_clipfrac += vf_clip;
        }
        // The loop divides by the examples of the step: scale the mean back to a sum.
        loss * prompts.len() as f64
    }

    fn targets(&self, _: &Vec<u32>) -> usize {
        1
    }

    fn tokens(&self, p: &Vec<u32>) -> usize {
        p.len() + self.config.max_completion_length
    }

    fn take_metrics(&self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut *self.sums.borrow_mut());
        let mut v = Vec::new();
        if s.sequences > 0 {
            let n = s.sequences as f64;
            v.push(("objective/kl".into(), s.kl / n));
            v.push(("objective/scores".into(), s.scores / n));
            v.push(("objective/non_score_reward".into(), s.non_score / n));
            v.push(("objective/rlhf_reward".into(), (s.scores + s.non_score) / n));
            v.push(("completion_length".into(), s.length / n));
        }
        if s.updates > 0 {
            let u = s.updates as f64;
            v.push(("policy/clipfrac".into(), s.clipfrac / u));
            v.push(("policy/approxkl".into(), s.approxkl / u));
            v.push(("loss/policy".into(), s.pg / u));
            v.push(("loss/value".into(), s.vf / u));
            v.push(("val/clipfrac".into(), s.vf_clipfrac / u));
        }
        v
    }
}
