//! Training data: JSONL records in the common shapes, rendered with the model's chat
//! template into token ids with a mask of the tokens that carry the loss.
//!
//! Each line of a JSONL file is one object of one of these shapes:
//!
//! | shape | fields | loss on |
//! |---|---|---|
//! | plain text | `text` | every token |
//! | prompt and completion | `prompt`, `completion` | the completion (all tokens with `completion_only = false`) |
//! | chat | `messages`: `[{"role", "content"}, ...]` | the assistant turns (all tokens with `completion_only = false`) |
//!
//! Prompts and completions are rendered with the chat template when the tokenizer has one
//! (the prompt as the user's message, the completion as the assistant's answer), else
//! concatenated as they are with an end-of-sequence token after the completion.

use std::path::Path;

use peft_models::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One training record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A conversation; the assistant turns are the targets.
    Chat {
        /// The messages, in order.
        messages: Vec<ChatMessage>,
    },
    /// A prompt and the completion to learn.
    PromptCompletion {
        /// The prompt (the user's message with a chat template).
        prompt: String,
        /// The completion (the assistant's answer).
        completion: String,
    },
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
}

impl Record {
    /// The prompt and the expected answer, for records that have one (exact-match
    /// evaluation): a prompt and completion, or a chat whose last message is the
    /// assistant's.
    pub fn prompt_and_answer(&self) -> Option<(Vec<ChatMessage>, &str)> {
        match self {
            Self::PromptCompletion { prompt, completion } => {
                Some((vec![ChatMessage::user(prompt.clone())], completion.as_str()))
            }
            Self::Chat { messages } => match messages.split_last() {
                Some((last, rest)) if last.role == "assistant" && !rest.is_empty() => {
                    Some((rest.to_vec(), last.content.as_str()))
                }
                _ => None,
            },
            Self::Text { .. } => None,
        }
    }
}

/// Reads a JSONL file of [`Record`]s. Blank lines are skipped.
///
/// # Errors
/// [`TrainError::Data`] naming the file and line of a line that is not JSON or has none of
/// the known shapes, or when the file holds no record.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
    parse_jsonl(&text, path)
}

/// Parses JSONL text (see [`read_jsonl`]); `path` names the source in errors.
///
/// # Errors
/// As [`read_jsonl`].
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |msg: String| TrainError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let record: Record = serde_json::from_value(value).map_err(|_| {
            err(
                "expected an object with `text`, with `prompt` and `completion`, or with \
                 `messages` (a list of {\"role\", \"content\"})"
                    .into(),
            )
        })?;
        if let Record::Chat { messages } = &record {
            if messages.is_empty() {
                return Err(err("`messages` is empty".into()));
            }
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err(err(
                    "`messages` has no assistant turn, so nothing would be learned".into(),
                ));
            }
        }
        out.push(record);
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            msg: "the file holds no record".into(),
        });
    }
    Ok(out)
}

/// How records become tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderOptions {
    /// Loss only on completions and assistant turns (the prompt tokens are masked).
    pub completion_only: bool,
    /// A system message put before every prompt (with a chat template).
    pub system: Option<String>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            completion_only: true,
            system: None,
        }
    }
}

/// A tokenized example: ids and, for each id, whether predicting it counts in the loss.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tokenized {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `trained[i]`: token `i` is a target (predicted from the tokens before it). The first
    /// token never is.
    pub trained: Vec<bool>,
}

impl Tokenized {
    /// Number of target tokens.
    pub fn targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }

    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }
}

/// Renders a conversation's prompt for generation: the token ids after which the model
/// should answer.
///
/// # Errors
/// A chat template error, or a tokenizer error.
pub fn prompt_ids(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    opts: &RenderOptions,
) -> Result<Vec<u32>> {
    let messages = with_system(messages, opts);
    if tok.chat_template().is_some() {
        let text = tok.apply_chat_template(&messages, true)?;
        Ok(tok.encode(&text, false)?)
    } else {
        let text: String = messages.iter().map(|m| m.content.as_str()).collect();
        Ok(tok.encode(&text, true)?)
    }
}

fn with_system(messages: &[ChatMessage], opts: &RenderOptions) -> Vec<ChatMessage> {
    match &opts.system {
        Some(s) if messages.first().is_none_or(|m| m.role != "system") => {
            std::iter::once(ChatMessage::system(s.clone()))
                .chain(messages.iter().cloned())
                .collect()
        }
        _ => messages.to_vec(),
    }
}

/// Tokenizes one record.
///
/// Prompt and answer are encoded separately and joined, so the prompt's ids are exactly
/// those [`prompt_ids`] gives at evaluation time.
///
/// # Errors
/// A chat record on a tokenizer without a chat template, a prompt and completion on a
/// tokenizer with neither a chat template nor an end-of-sequence token, a template whose
/// rendering of a longer conversation does not extend that of a shorter one, a tokenizer
/// error.
pub fn tokenize(tok: &Tokenizer, record: &Record, opts: &RenderOptions) -> Result<Tokenized> {
    let mut out = Tokenized::default();
    let eos = tok.eos_token_ids().first().copied();
    match record {
        Record::Text { text } => {
            out.push(&tok.encode(text, true)?, true);
            if let Some(e) = eos {
                out.push(&[e], true);
            }
        }
        Record::PromptCompletion { prompt, completion } if tok.chat_template().is_none() => {
            if eos.is_none() {
                return Err(TrainError::Config(
                    "the tokenizer has neither a chat template nor an end-of-sequence token \
                     (`eos_token` in tokenizer_config.json, `eos_token_id` in \
                     generation_config.json or config.json), so where a completion ends \
                     cannot be learned; add one of them to the model directory"
                        .into(),
                ));
            }
            out.push(&tok.encode(prompt, true)?, !opts.completion_only);
            out.push(&tok.encode(completion, false)?, true);
            if let Some(e) = eos {
                out.push(&[e], true);
            }
        }
        Record::PromptCompletion { prompt, completion } => {
            let messages = vec![
                ChatMessage::user(prompt.clone()),
                ChatMessage::assistant(completion.clone()),
            ];
            render_chat(tok, &with_system(&messages, opts), opts, &mut out)?;
        }
        Record::Chat { messages } => {
            if tok.chat_template().is_none() {
                return Err(TrainError::Config(
                    "chat records (`messages`) need a tokenizer with a chat template".into(),
                ));
            }
            render_chat(tok, &with_system(messages, opts), opts, &mut out)?;
        }
    }
    if let Some(first) = out.trained.first_mut() {
        *first = false;
    }
    Ok(out)
}

/// Renders a conversation turn by turn: the text up to each assistant turn's generation
/// prompt is context, the assistant's text up to the next turn is target.
fn render_chat(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    opts: &RenderOptions,
    out: &mut Tokenized,
) -> Result<()> {
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let context = tok.apply_chat_template(&messages[..i], true)?;
        let full = tok.apply_chat_template(&messages[..=i], false)?;
        let (Some(ctx_new), Some(answer)) = (
            context.strip_prefix(done.as_str()),
            full.strip_prefix(context.as_str()),
        ) else {
            return Err(TrainError::Config(
                "the chat template renders a conversation differently from its beginning, so \
                 prompt and answer cannot be told apart; use prompt/completion records"
                    .into(),
            ));
        };
        out.push(&tok.encode(ctx_new, false)?, !opts.completion_only);
        out.push(&tok.encode(answer, false)?, true);
        done = full;
    }
    Ok(())
}

/// What preparing a dataset did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStats {
    /// Records read.
    pub records: usize,
    /// Examples cut to the sequence length.
    pub truncated: usize,
    /// Target tokens cut away by truncation.
    pub truncated_tokens: usize,
    /// Examples left out because no target token remained.
    pub dropped: usize,
    /// Sequences after packing.
    pub sequences: usize,
}

/// Tokenizes records, truncates each to `seq_len` tokens and, with `pack`, packs short
/// examples together into sequences of at most `seq_len` tokens (whole examples only; the
/// first token of each packed example is not a target, so nothing is learned across the
/// boundary).
///
/// # Errors
/// As [`tokenize`]; [`TrainError::Config`] when no example has a target token left.
pub fn prepare(
    tok: &Tokenizer,
    records: &[Record],
    opts: &RenderOptions,
    seq_len: usize,
    pack: bool,
) -> Result<(Vec<Tokenized>, PrepareStats)> {
    if seq_len < 2 {
        return Err(TrainError::Config(format!(
            "the sequence length must be at least 2 tokens, not {seq_len}"
        )));
    }
    let mut stats = PrepareStats {
        records: records.len(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(records.len());
    for r in records {
        let mut t = tokenize(tok, r, opts)?;
        if t.ids.len() > seq_len {
            let before = t.targets();
            t.ids.truncate(seq_len);
            t.trained.truncate(seq_len);
            stats.truncated += 1;
            stats.truncated_tokens += before - t.targets();
        }
        if t.targets() == 0 {
            stats.dropped += 1;
            continue;
        }
        examples.push(t);
    }
    if examples.is_empty() {
        return Err(TrainError::Config(format!(
            "no example has a target token within {seq_len} tokens ({} records, {} cut)",
            stats.records, stats.truncated
        )));
    }
    if pack {
        let mut packed: Vec<Tokenized> = Vec::new();
        let mut cur = Tokenized::default();
        for mut e in examples {
            if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() > seq_len {
                packed.push(std::mem::take(&mut cur));
            }
            e.trained[0] = false;
            cur.ids.extend(e.ids);
            cur.trained.extend(e.trained);
        }
        if !cur.ids.is_empty() {
            packed.push(cur);
        }
        examples = packed;
    }
    stats.sequences = examples.len();
    Ok((examples, stats))
}

/// Splits off `fraction` of the records (at least one, when there are two or more) as a
/// validation set, chosen by `seed`. Returns `(train, validation)`.
pub fn split_validation<T>(records: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if records.len() < 2 || fraction <= 0.0 {
        return (records, Vec::new());
    }
    let n_val = ((records.len() as f64 * fraction).round() as usize).clamp(1, records.len() - 1);
    let order = shuffled(records.len(), seed ^ 0x005e_ed0f_5917);
    let mut is_val = vec![false; records.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (r, v) in records.into_iter().zip(is_val) {
        if v { val.push(r) } else { train.push(r) }
    }
    (train, val)
}

/// SplitMix64: a small, fast, well-mixed generator whose whole state is one `u64`, so the
/// data order is a pure function of the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift; the bias for n far below 2^64 is negligible.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The indices `0..n` in the order `seed` gives (Fisher-Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
    v
}

/// A batch ready for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Ids `[batch][len]`, right-padded with `pad` to the longest sequence.
    pub ids: Vec<Vec<u32>>,
    /// Flat positions `b * len + i` whose hidden state predicts a target.
    pub positions: Vec<usize>,
    /// The target id at each of `positions` (the token at `i + 1`).
    pub targets: Vec<u32>,
    /// Padded length.
    pub len: usize,
    /// Tokens that are not padding.
    pub real_tokens: usize,
}

impl Batch {
    /// Builds a batch from examples; pads with `pad`.
    pub fn new(examples: &[&Tokenized], pad: u32) -> Self {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len());
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (b, e) in examples.iter().enumerate() {
            let mut row = e.ids.clone();
            row.resize(len, pad);
            ids.push(row);
            for i in 1..e.ids.len() {
                if e.trained[i] {
                    positions.push(b * len + i - 1);
                    targets.push(e.ids[i]);
                }
            }
        }
        Self {
            ids,
            positions,
            targets,
            len,
            real_tokens: examples.iter().map(|e| e.ids.len()).sum(),
        }
    }
}

/// Reads the records of a data file and, when given, a validation file; with no validation
/// file, `val_fraction` of the data is held out.
///
/// # Errors
/// As [`read_jsonl`].
pub fn load_splits(
    data: &Path,
    val_data: Option<&Path>,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<Record>, Vec<Record>)> {
    let records = read_jsonl(data)?;
    match val_data {
        Some(v) => Ok((records, read_jsonl(v)?)),
        None => Ok(split_validation(records, val_fraction, seed)),
    }
}
