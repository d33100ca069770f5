//! Text generation with a KV cache: greedy decoding, temperature, top-k, top-p and
//! repetition penalty, stopping at end-of-sequence tokens, with a callback per token for
//! streaming.
//!
//! The logits processors run in transformers' order: repetition penalty, temperature,
//! top-k, top-p. Without sampling options decoding is greedy (the first maximum wins, as
//! `torch.argmax`).

use burn::prelude::*;

use crate::error::{ModelError, Result};
use crate::{CausalLm, ForwardInput};

/// Decoding options.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// How many tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sample from the distribution (otherwise greedy).
    pub do_sample: bool,
    /// Softmax temperature (sampling only).
    pub temperature: f64,
    /// Keep the `k` most likely tokens (0 = all; sampling only).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p` (1.0 = all; sampling only).
    pub top_p: f64,
    /// transformers' repetition penalty (1.0 = none): seen tokens' positive logits are
    /// divided by it, negative ones multiplied.
    pub repetition_penalty: f64,
    /// Tokens that end generation (the model's end-of-sequence ids by default).
    pub eos_token_ids: Vec<u32>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_ids: vec![],
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a non-positive temperature or penalty, or a top-p
    /// outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if self.do_sample && (self.temperature <= 0.0 || !self.temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be positive, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.repetition_penalty <= 0.0 || !self.repetition_penalty.is_finite() {
            return Err(ModelError::InvalidInput(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A small deterministic generator (SplitMix64) for sampling.
#[derive(Clone, Debug)]
pub struct Sampler {
    state: u64,
}

impl Sampler {
    /// A sampler with a seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The distribution sampling draws from: transformers' repetition penalty, temperature,
/// top-k (ties with the k-th value kept, as transformers keeps them) and top-p, in that
/// order. Returns the kept token ids, most likely first, with their probabilities.
pub fn sampling_distribution(
    logits: &[f32],
    seen: &[u32],
    cfg: &GenerationConfig,
) -> Vec<(u32, f64)> {
    let mut scores = logits.to_vec();
    apply_repetition_penalty(&mut scores, seen, cfg.repetition_penalty);
    let t = cfg.temperature as f32;
    if t != 1.0 {
        scores.iter_mut().for_each(|s| *s /= t);
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        let kth = scores[idx[cfg.top_k - 1]];
        idx.retain(|&i| scores[i] >= kth);
    }
    let max = scores[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from(scores[i] - max).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        // Keep a token while the mass of the tokens above it is below top_p.
        let mut above = 0.0;
        let keep = probs
            .iter()
            .take_while(|p| {
                let k = above < cfg.top_p;
                above += **p;
                k
            })
            .count()
            .max(1);
        idx.truncate(keep);
        probs.truncate(keep);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    idx.into_iter().map(|i| i as u32).zip(probs).collect()
}

fn apply_repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if let Some(l) = scores.get_mut(t as usize)
            && done.insert(t)
        {
            *l = if *l < 0.0 { *l * p } else { *l / p };
        }
    }
}

/// Picks the next token from one position's logits: the first maximum when not sampling
/// (as `torch.argmax`), else a draw from [`sampling_distribution`].
pub fn next_token(
    logits: &mut [f32],
    seen: &[u32],
    cfg: &GenerationConfig,
    sampler: &mut Sampler,
) -> u32 {
    if !cfg.do_sample {
        apply_repetition_penalty(logits, seen, cfg.repetition_penalty);
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let dist = sampling_distribution(logits, seen, cfg);
    let r = sampler.next_f64();
    let mut acc = 0.0;
    for &(t, p) in &dist {
        acc += p;
        if r < acc {
            return t;
        }
    }
    dist.last().map_or(0, |d| d.0)
}

/// Generates after `prompt`, calling `on_token` with each new token as it is produced;
/// returns the new tokens (the end-of-sequence token included when one stopped it).
///
/// # Errors
/// [`ModelError::InvalidInput`] for an empty prompt, an id outside the vocabulary or bad
/// options.
pub fn generate<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt is empty".into()));
    }
    let vocab = model.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::InvalidInput(format!(
            "token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let eos = if cfg.eos_token_ids.is_empty() {
        model.eos_token_ids()
    } else {
        cfg.eos_token_ids.clone()
    };
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(cfg.seed);
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    for _ in 0..cfg.max_new_tokens {
        let ids: Vec<i32> = input.iter().map(|&t| t as i32).collect();
        let n = ids.len();
        let ids =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device).unsqueeze::<2>();
        // Only the last position's logits are needed: project just its hidden state.
        let hidden = model.hidden(ForwardInput::new(ids), Some(&mut cache));
        let [_, s, d] = hidden.dims();
        let last = model.logits(hidden.slice([0..1, s - 1..s, 0..d]));
        let mut row: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| ModelError::InvalidInput(format!("{e:?}")))?;
        let t = next_token(&mut row, &seen, cfg, &mut sampler);
        on_token(t);
        out.push(t);
        seen.push(t);
        if eos.contains(&t) {
            break;
        }
        input = vec![t];
    }
    Ok(out)
}

/// Greedy decoding of several prompts at once, left-padded into one batch with a padding
/// mask, with a KV cache. Returns each prompt's new tokens (up to and including the first
/// end-of-sequence token of `eos`, or `max_new_tokens` of them).
///
/// Rotary position embeddings depend only on the distance between positions, and padding
/// is masked out of attention, so each answer is the one [`generate`] gives for that prompt
/// alone (up to floating-point rounding); a batch reads the weights once per step for all
/// prompts, which is what makes it faster.
///
/// # Errors
/// [`ModelError::InvalidInput`] for an empty prompt or an id outside the vocabulary.
pub fn greedy_batch<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    pad: u32,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    let vocab = model.vocab_size();
    for p in prompts {
        if p.is_empty() {
            return Err(ModelError::InvalidInput("a prompt is empty".into()));
        }
        if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
    }
    let batch = prompts.len();
    let mut out = vec![Vec::new(); batch];
    if batch == 0 || max_new_tokens == 0 {
        return Ok(out);
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut padding: Vec<Vec<bool>> = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(false, len - p.len())
                .chain(std::iter::repeat_n(true, p.len()))
                .collect()
        })
        .collect();
    let mut input: Vec<i32> = prompts
        .iter()
        .flat_map(|p| {
            std::iter::repeat_n(pad as i32, len - p.len()).chain(p.iter().map(|&t| t as i32))
        })
        .collect();
    let mut step_len = len;
    let mut done = vec![false; batch];
    let mut cache = model.new_cache();
    for _ in 0..max_new_tokens {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [batch, step_len]), device);
        let hidden = model.hidden(
            ForwardInput {
                ids,
                padding: Some(&padding),
            },
            Some(&mut cache),
        );
        let [_, s, d] = hidden.dims();
        let logits = model.logits(hidden.slice([0..batch, s - 1..s, 0..d]));
        let next: Vec<i64> = logits
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| ModelError::InvalidInput(format!("{e:?}")))?;
        input = Vec::with_capacity(batch);
        for (b, &t) in next.iter().enumerate() {
            let t = t as u32;
            if !done[b] {
                out[b].push(t);
                done[b] = eos.contains(&t);
            }
            input.push(if done[b] { pad as i32 } else { t as i32 });
            padding[b].push(true);
        }
        step_len = 1;
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}
