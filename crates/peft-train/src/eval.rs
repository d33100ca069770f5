//! Evaluation by generation: exact-match accuracy of greedy answers.

use burn::prelude::*;
use peft_models::CausalLm;
use peft_models::generate::greedy_batch;
use peft_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::data::{Record, RenderOptions, prompt_ids};
use crate::error::Result;

/// One evaluated example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The expected answer.
    pub expected: String,
    /// What the model answered.
    pub got: String,
    /// Whether they match (after trimming surrounding whitespace).
    pub correct: bool,
}

/// Exact-match accuracy over a set of records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExactMatch {
    /// Correct answers.
    pub correct: usize,
    /// Records with an expected answer.
    pub total: usize,
    /// Every answer, in order.
    pub answers: Vec<Answer>,
}

impl ExactMatch {
    /// `correct / total` (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Generates greedily for each record that has an expected answer (prompt and completion,
/// or a chat ending with the assistant's turn), `batch_size` prompts at a time, and
/// compares each answer with the expected one, whitespace at both ends ignored.
/// `on_answer` is called after each one (progress).
///
/// # Errors
/// A tokenizer, template or generation error.
#[allow(clippy::too_many_arguments)]
pub fn exact_match<B: Backend, M: CausalLm<B>>(
    model: &M,
    tok: &Tokenizer,
    records: &[Record],
    opts: &RenderOptions,
    max_new_tokens: usize,
    batch_size: usize,
    device: &B::Device,
    mut on_answer: impl FnMut(&Answer),
) -> Result<ExactMatch> {
    let mut eos: Vec<u32> = model.eos_token_ids();
    for &e in tok.eos_token_ids() {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let pad = eos.first().copied().unwrap_or(0);
    let mut items = Vec::new();
    for r in records {
        if let Some((messages, expected)) = r.prompt_and_answer() {
            items.push((prompt_ids(tok, &messages, opts)?, expected.to_string()));
        }
    }
    // Similar lengths together, so little of each batch is padding.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].0.len());
    let mut answers: Vec<Option<Answer>> = vec![None; items.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| items[i].0.clone()).collect();
        let outs = greedy_batch(model, &prompts, max_new_tokens, &eos, pad, device)?;
        for (&i, mut ids) in chunk.iter().zip(outs) {
            if ids.last().is_some_and(|t| eos.contains(t)) {
                ids.pop();
            }
            let got = tok.decode(&ids, true)?;
            let expected = items[i].1.clone();
            let correct = got.trim() == expected.trim();
            let a = Answer {
                expected,
                got,
                correct,
            };
            on_answer(&a);
            answers[i] = Some(a);
        }
    }
    let answers: Vec<Answer> = answers.into_iter().flatten().collect();
    Ok(ExactMatch {
        correct: answers.iter().filter(|a| a.correct).count(),
        total: answers.len(),
        answers,
    })
}
