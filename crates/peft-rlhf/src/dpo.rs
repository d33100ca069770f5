//! Direct preference optimisation with TRL's loss variants.

use std::cell::RefCell;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, log_softmax, relu};
use peft_models::{CausalLm, ForwardInput};
use peft_train::data::{Batch, Tokenized};
use peft_train::trainer::Objective;
use serde::{Deserialize, Serialize};

/// TRL's DPO losses, over `delta = (pi_c - ref_c) - (pi_r - ref_r)` (log-probabilities of
/// the chosen and rejected completions under the policy and the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// `-logsigmoid(beta delta) (1 - eps) - logsigmoid(-beta delta) eps` (eps: label
    /// smoothing, conservative DPO; eps = 0 is the original DPO).
    Sigmoid,
    /// Robust DPO: `(-(1 - eps) logsigmoid(beta delta) + eps logsigmoid(-beta delta)) / (1 - 2 eps)`.
    Robust,
    /// `relu(1 - beta delta)` (SLiC).
    Hinge,
    /// IPO: `(delta_avg - 1 / (2 beta))^2` with the log-ratios averaged over completion
    /// tokens, as TRL does.
    Ipo,
}

impl FromStr for DpoLossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sigmoid" => Self::Sigmoid,
            "robust" => Self::Robust,
            "hinge" => Self::Hinge,
            "ipo" => Self::Ipo,
            o => {
                return Err(format!(
                    "unknown DPO loss `{o}`; use sigmoid, robust, hinge or ipo"
                ));
            }
        })
    }
}

/// DPO's options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    /// How far the policy may move from the reference (TRL's `beta`).
    pub beta: f64,
    /// Which loss.
    pub loss_type: DpoLossType,
    /// Label smoothing `eps` for `sigmoid` and `robust` (in `[0, 0.5)`).
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

impl DpoConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// A non-positive beta, or label smoothing outside `[0, 0.5)`.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(format!("beta must be positive, not {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "label smoothing must lie in [0, 0.5), not {}",
                self.label_smoothing
            ));
        }
        Ok(())
    }
}

/// Per-pair results of [`dpo_loss`].
#[derive(Debug, Clone)]
pub struct DpoTerms<B: Backend> {
    /// The loss of each pair (TRL's loss is their mean).
    pub losses: Tensor<B, 1>,
    /// `beta (pi_c - ref_c)`, detached.
    pub chosen_rewards: Tensor<B, 1>,
    /// `beta (pi_r - ref_r)`, detached.
    pub rejected_rewards: Tensor<B, 1>,
}

/// The DPO loss of each pair from summed log-probabilities `[pairs]` of the chosen and
/// rejected completions under the policy (`pc`, `pr`) and the reference (`rc`, `rr`), and
/// the completions' token counts (`nc`, `nr`, used by IPO).
pub fn dpo_loss<B: Backend>(
    cfg: &DpoConfig,
    pc: Tensor<B, 1>,
    pr: Tensor<B, 1>,
    rc: Tensor<B, 1>,
    rr: Tensor<B, 1>,
    nc: Tensor<B, 1>,
    nr: Tensor<B, 1>,
) -> DpoTerms<B> {
    let chosen = pc - rc;
    let rejected = pr - rr;
    let beta = cfg.beta;
    let eps = cfg.label_smoothing;
    let delta = chosen.clone() - rejected.clone();
    let losses = match cfg.loss_type {
        DpoLossType::Sigmoid => {
            log_sigmoid(delta.clone() * beta).neg() * (1.0 - eps)
                - log_sigmoid(delta * (-beta)) * eps
        }
        DpoLossType::Robust => {
            (log_sigmoid(delta.clone() * beta) * (-(1.0 - eps))
                + log_sigmoid(delta * (-beta)) * eps)
                / (1.0 - 2.0 * eps)
        }
        DpoLossType::Hinge => relu((delta * (-beta)) + 1.0),
        DpoLossType::Ipo => {
            let avg = chosen.clone() / nc.clamp_min(1.0) - rejected.clone() / nr.clamp_min(1.0);
            (avg - 1.0 / (2.0 * beta)).powi_scalar(2)
        }
    };
    DpoTerms {
        losses,
        chosen_rewards: (chosen * beta).detach(),
        rejected_rewards: (rejected * beta).detach(),
    }
}

/// The log-probability of every target token of `seqs` (`[targets]`, sequence by sequence,
/// in position order), with the index of the sequence each belongs to.
pub fn token_logps<B: Backend, M: CausalLm<B>>(
    model: &M,
    seqs: &[&Tokenized],
    pad: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, Vec<usize>) {
    token_logps_at(model, seqs, pad, 1.0, device)
}

/// As [`token_logps`], of the distribution sampling at `temperature` draws from
/// (`log_softmax(logits / temperature)`), as TRL's PPO and GRPO trainers take them: with
/// completions sampled at that temperature, the ratios and KL estimates are then about the
/// distribution they came from.
pub fn token_logps_at<B: Backend, M: CausalLm<B>>(
    model: &M,
    seqs: &[&Tokenized],
    pad: u32,
    temperature: f64,
    device: &B::Device,
) -> (Tensor<B, 1>, Vec<usize>) {
    let batch = Batch::new(seqs, pad);
    let (b, len) = (batch.ids.len(), batch.len);
    let n = batch.positions.len();
    if n == 0 {
        return (Tensor::zeros([0], device), Vec::new());
    }
    let flat: Vec<i32> = batch.ids.iter().flatten().map(|&t| t as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, len]), device);
    let hidden = model.hidden(ForwardInput::new(ids), None);
    let d = hidden.dims()[2];
    let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
    let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(pos, [n]), device);
    let logits = model.logits(hidden.reshape([b * len, d]).select(0, pos).unsqueeze::<3>());
    let v = logits.dims()[2];
    let tg: Vec<i32> = batch.targets.iter().map(|&t| t as i32).collect();
    let tg = Tensor::<B, 1, Int>::from_data(TensorData::new(tg, [n]), device).unsqueeze_dim(1);
    let owner = batch.positions.iter().map(|&p| p / len).collect();
    let logits = logits.reshape([n, v]);
    let logits = if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    };
    (log_softmax(logits, 1).gather(1, tg).reshape([n]), owner)
}

/// The summed log-probability of each sequence's target tokens (`[sequences]`), and their
/// counts: the log-probability of a completion given its prompt.
pub fn sequence_logps<B: Backend, M: CausalLm<B>>(
    model: &M,
    seqs: &[&Tokenized],
    pad: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, Vec<usize>) {
    let b = seqs.len();
    let counts: Vec<usize> = seqs.iter().map(|s| s.targets()).collect();
    let (token_logps, owner) = token_logps(model, seqs, pad, device);
    let n = owner.len();
    if n == 0 {
        return (Tensor::zeros([b], device), counts);
    }
    // Sum per sequence with a [b, n] membership matrix (differentiable, no scatter).
    let mut member = vec![0f32; b * n];
    for (j, &s) in owner.iter().enumerate() {
        member[s * n + j] = 1.0;
    }
    let member = Tensor::<B, 2>::from_data(TensorData::new(member, [b, n]), device);
    (
        member.matmul(token_logps.unsqueeze_dim(1)).reshape([b]),
        counts,
    )
}

/// A preference pair ready for DPO: the prompt with each completion (targets on the
/// completion only) and the reference's log-probabilities of each.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Prompt + chosen completion.
    pub chosen: Tokenized,
    /// Prompt + rejected completion.
    pub rejected: Tokenized,
    /// The reference model's log-probability of the chosen completion.
    pub ref_chosen: f64,
    /// The reference model's log-probability of the rejected completion.
    pub ref_rejected: f64,
}

/// Computes the reference log-probabilities of `pairs` with `reference` (the model
/// without the adapter being trained), `batch_size` pairs at a time.
pub fn reference_logps<B: Backend, M: CausalLm<B>>(
    reference: &M,
    pairs: &mut [PreferencePair],
    batch_size: usize,
    pad: u32,
    device: &B::Device,
) {
    for chunk in pairs.chunks_mut(batch_size.max(1)) {
        let seqs: Vec<&Tokenized> = chunk
            .iter()
            .map(|p| &p.chosen)
            .chain(chunk.iter().map(|p| &p.rejected))
            .collect();
        let (lp, _) = sequence_logps(reference, &seqs, pad, device);
        let lp: Vec<f32> = lp.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let k = chunk.len();
        for (i, p) in chunk.iter_mut().enumerate() {
            p.ref_chosen = f64::from(lp[i]);
            p.ref_rejected = f64::from(lp[k + i]);
        }
    }
}

/// As [`reference_logps`], for the pairs at `indices` only (repeats allowed), batched by
/// length so that little padding is computed. Every other pair's log-probabilities become
/// NaN, so a loss that reaches one fails loudly instead of training on a made-up
/// reference. With `peft_train`'s `TrainOptions::examples_used` as `indices`, a run
/// shorter than an epoch skips the pairs it never sees. Returns how many pairs it
/// computed.
pub fn reference_logps_of<B: Backend, M: CausalLm<B>>(
    reference: &M,
    pairs: &mut [PreferencePair],
    indices: &[usize],
    batch_size: usize,
    pad: u32,
    device: &B::Device,
) -> usize {
    let mut wanted: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| i < pairs.len())
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    // A batch pads every sequence to its longest, chosen and rejected alike.
    wanted.sort_by_key(|&i| pairs[i].chosen.ids.len().max(pairs[i].rejected.ids.len()));
    let mut subset: Vec<PreferencePair> = wanted.iter().map(|&i| pairs[i].clone()).collect();
    reference_logps(reference, &mut subset, batch_size, pad, device);
    for p in pairs.iter_mut() {
        p.ref_chosen = f64::NAN;
        p.ref_rejected = f64::NAN;
    }
    for (&i, p) in wanted.iter().zip(subset) {
        pairs[i].ref_chosen = p.ref_chosen;
        pairs[i].ref_rejected = p.ref_rejected;
    }
    wanted.len()
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    pairs: usize,
    chosen: f64,
    rejected: f64,
    margin: f64,
    correct: usize,
}

/// DPO as an objective of `peft-train`'s loop: the loss of a step is the mean over its
/// pairs. Metrics (means over the step): `rewards_chosen`, `rewards_rejected`, `margin`,
/// `accuracy` (share of pairs whose chosen reward is the higher).
#[derive(Debug)]
pub struct Dpo {
    /// Options.
    pub config: DpoConfig,
    /// Padding id.
    pub pad: u32,
    sums: RefCell<Sums>,
}

impl Dpo {
    /// DPO with these options.
    pub fn new(config: DpoConfig, pad: u32) -> Self {
        Self {
            config,
            pad,
            sums: RefCell::new(Sums::default()),
        }
    }
}

impl Objective for Dpo {
    type Example = PreferencePair;

    fn loss<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        pairs: &[&PreferencePair],
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let k = pairs.len();
        let seqs: Vec<&Tokenized> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let (lp, counts) = sequence_logps(model, &seqs, self.pad, device);
        let pc = lp.clone().slice(0..k);
        let pr = lp.slice(k..2 * k);
        let f = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [k]), device);
        let rc = f(pairs.iter().map(|p| p.ref_chosen as f32).collect());
        let rr = f(pairs.iter().map(|p| p.ref_rejected as f32).collect());
        let nc = f(counts[..k].iter().map(|&c| c as f32).collect());
        let nr = f(counts[k..].iter().map(|&c| c as f32).collect());
        let t = dpo_loss(&self.config, pc, pr, rc, rr, nc, nr);
        let cr: Vec<f32> = t
            .chosen_rewards
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let rj: Vec<f32> = t
            .rejected_rewards
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let mut s = self.sums.borrow_mut();
        for (c, r) in cr.iter().zip(&rj) {
            s.pairs += 1;
            s.chosen += f64::from(*c);
            s.rejected += f64::from(*r);
            s.margin += f64::from(c - r);
            s.correct += usize::from(c > r);
        }
        t.losses.sum()
    }

    fn targets(&self, _: &PreferencePair) -> usize {
        1
    }

    fn tokens(&self, p: &PreferencePair) -> usize {
        p.chosen.ids.len() + p.rejected.ids.len()
    }

    fn take_metrics(&self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut *self.sums.borrow_mut());
        if s.pairs == 0 {
            return Vec::new();
        }
        let n = s.pairs as f64;
        vec![
            ("rewards_chosen".into(), s.chosen / n),
            ("rewards_rejected".into(), s.rejected / n),
            ("margin".into(), s.margin / n),
            ("accuracy".into(), s.correct as f64 / n),
        ]
    }
}
