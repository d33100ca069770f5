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

use burn::prelude::*;
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
