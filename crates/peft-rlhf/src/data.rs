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
