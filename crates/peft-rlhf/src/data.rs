//! Preference data: JSONL lines with a `prompt`, a `chosen` and a `rejected` completion
//! (strings, or lists of chat messages for the answer turns).

use std::path::Path;

use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_train::data::{Record, RenderOptions, tokenize};
use peft_train::{Result, TrainError};
use serde::Deserialize;

use crate::dpo::PreferencePair;
use crate::reward::RewardPair;

/// One preference record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Preference {
    /// The prompt (the user's message).
    pub prompt: String,
    /// The preferred answer.
    pub chosen: String,
    /// The other answer.
    pub rejected: String,
    /// For reward models: how much better the chosen answer should score (TRL's `margin`
    /// column); absent means 0.
    #[serde(default)]
    pub margin: Option<f64>,
}

/// Reads preference records; a bad line is named with its number.
///
/// # Errors
/// [`TrainError::Data`] for a line that is not a JSON object with `prompt`, `chosen` and
/// `rejected` strings, or a file with no record.
pub fn read_preferences(path: &Path) -> Result<Vec<Preference>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
    parse_preferences(&text, path)
}

/// Parses preference JSONL text (see [`read_preferences`]); `path` names the source in
/// errors.
///
/// # Errors
/// As [`read_preferences`].
pub fn parse_preferences(text: &str, path: &Path) -> Result<Vec<Preference>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Preference = serde_json::from_str(line).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("expected {{\"prompt\", \"chosen\", \"rejected\"}} strings: {e}"),
        })?;
        out.push(p);
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: "the file holds no preference pair".into(),
        });
    }
    Ok(out)
}

/// Tokenizes a preference as two prompt-completion examples (loss on the completions),
/// rendered with the chat template like `peft train` renders them. The reference
/// log-probabilities are left at 0 (see [`crate::dpo::reference_logps`]).
///
/// # Errors
/// A template or tokenizer error.
pub fn tokenize_preference(
    tok: &Tokenizer,
    p: &Preference,
    opts: &RenderOptions,
) -> Result<PreferencePair> {
    let one = |completion: &str| {
        tokenize(
            tok,
            &Record::PromptCompletion {
                prompt: p.prompt.clone(),
                completion: completion.to_string(),
            },
            opts,
        )
    };
    Ok(PreferencePair {
        chosen: one(&p.chosen)?,
        rejected: one(&p.rejected)?,
        ref_chosen: 0.0,
        ref_rejected: 0.0,
    })
}

/// The prompt as chat messages (for generation).
pub fn prompt_messages(p: &Preference) -> Vec<ChatMessage> {
    vec![ChatMessage::user(p.prompt.clone())]
}

/// Tokenizes a preference for reward modelling: each full conversation (prompt and
/// answer, rendered with the chat template), scored at its last token.
///
/// # Errors
/// A template or tokenizer error.
pub fn tokenize_reward_pair(
    tok: &Tokenizer,
    p: &Preference,
    opts: &RenderOptions,
) -> Result<RewardPair> {
    let pair = tokenize_preference(tok, p, opts)?;
    Ok(RewardPair {
        chosen: pair.chosen,
        rejected: pair.rejected,
        margin: p.margin.unwrap_or(0.0),
    })
}

/// The tokens a conversation has after an assistant answer's text, as the chat template
/// renders it (for ChatML, `<|im_end|>` and a newline); without a chat template, the
/// end-of-sequence token that [`tokenize_preference`] appends. A reward model trained on
/// [`tokenize_reward_pair`] read every training reward at the last of these; empty when the
/// tokenizer knows neither.
///
/// # Errors
/// A template or tokenizer error.
pub fn answer_suffix(tok: &Tokenizer) -> Result<Vec<u32>> {
    let eos: Vec<u32> = tok.eos_token_ids().first().copied().into_iter().collect();
    if tok.chat_template().is_none() {
        return Ok(eos);
    }
    const MARK: &str = "MARK8C1F";
    let user = ChatMessage::user("x".to_string());
    let context = tok.apply_chat_template(std::slice::from_ref(&user), true)?;
    let full = tok.apply_chat_template(&[user, ChatMessage::assistant(MARK.to_string())], false)?;
    // A template that rewrites the answer text gives no suffix to find: fall back to the
    // end-of-sequence token.
    match full
        .strip_prefix(context.as_str())
        .and_then(|a| a.strip_prefix(MARK))
    {
        Some(tail) if !tail.is_empty() => Ok(tok.encode(tail, false)?),
        _ => Ok(eos),
    }
}

/// A sampled completion of `prompt` as the reward model's training answers end: when its
/// last token is an end-of-sequence token (one of `eos`), that token gives way to
/// `suffix` ([`answer_suffix`]), so the reward is read where training read it. A
/// completion cut at the length limit is kept as it is.
pub fn as_trained(prompt: &[u32], completion: &[u32], eos: &[u32], suffix: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    if !suffix.is_empty() && completion.last().is_some_and(|t| eos.contains(t)) {
        ids.pop();
        ids.extend_from_slice(suffix);
    }
    ids
}
