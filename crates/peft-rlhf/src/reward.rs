//! Reward models: a scalar head on a PEFT-adapted causal language model, trained on
//! preference pairs with the Bradley-Terry loss.
//!
//! The model is transformers' `LlamaForSequenceClassification` with one label: the final
//! hidden state of the last real (non-padding) token of each sequence goes through `score`,
//! a `Linear(hidden, 1)` without bias. The loss of a pair is TRL's `RewardTrainer` loss
//!
//! `-log sigmoid(r_chosen - r_rejected - margin)` (+ `c (r_chosen + r_rejected)^2` with a
//! centring coefficient `c`),
//!
//! and the head trains with the adapter and is saved with it the way peft saves
//! `modules_to_save` (`base_model.model.score.weight`, `"modules_to_save": ["score"]`,
//! `"task_type": "SEQ_CLS"`), so Python's peft loads it into
//! `AutoModelForSequenceClassification`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use peft_core::config::{AdapterConfig, LoraFields};
use peft_core::model::{AdaptableModel, ModelLinear};
use peft_core::target::ModuleInfo;
use peft_core::{PeftError, Result as PeftResult};
use peft_lora::{LoraEmbeddingSlot, LoraModel};
use peft_models::{CausalLm, ForwardInput, KvCache};
use peft_train::data::{Batch, Tokenized};
use peft_train::trainer::Objective;

/// The module path of the reward head, as transformers names it.
pub const SCORE: &str = "score";

/// A causal language model with a scalar `score` head: its "logits" are rewards
/// `[batch, seq, 1]`, one per position, as `LlamaForSequenceClassification`'s are before it
/// picks the last real token (see [`sequence_rewards`]).
///
/// Implements [`CausalLm`] (so `peft-train`'s loop trains it), `AdaptableModel` and
/// [`LoraModel`] by delegating to the inner model, with `score` as a whole module for
/// `modules_to_save`.
#[derive(Module, Debug)]
pub struct RewardModel<B: Backend, L> {
    /// The (adapted) language model; its output head is not used.
    pub lm: L,
    /// The reward head, `hidden -> 1`, no bias.
    pub score: Linear<B>,
}

impl<B: Backend, L> RewardModel<B, L> {
    /// Wraps `lm` with a fresh head of width `hidden`, initialised as transformers does
    /// (normal, standard deviation `init_std`, 0.02 in Llama's config). The head is
    /// trainable; freeze the language model's base before wrapping it.
    pub fn new(lm: L, hidden: usize, init_std: f64, device: &B::Device) -> Self {
        let score = LinearConfig::new(hidden, 1)
            .with_bias(false)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: init_std,
            })
            .init(device);
        Self { lm, score }
    }

    /// The head's weight in the Hugging Face layout `[1, hidden]`.
    pub fn score_weight(&self) -> Tensor<B, 2> {
        self.score.weight.val().transpose()
    }
}

impl<B: Backend, L: CausalLm<B>> CausalLm<B> for RewardModel<B, L> {
    fn hidden(&self, input: ForwardInput<'_, B>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.lm.hidden(input, cache)
    }

    /// Rewards `[batch, seq, 1]` from hidden states.
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.score.forward(hidden)
    }

    fn new_cache(&self) -> KvCache<B> {
        self.lm.new_cache()
    }

    fn vocab_size(&self) -> usize {
        1
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.lm.eos_token_ids()
    }
}

impl<B: Backend, L: AdaptableModel<B>> AdaptableModel<B> for RewardModel<B, L> {
    type Weight = L::Weight;
    type Linear = L::Linear;
    type Sublayer = L::Sublayer;
    type Embedding = L::Embedding;
    type KeyValue = L::KeyValue;

    fn modules(&self) -> Vec<ModuleInfo> {
        self.lm.modules()
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &ModelLinear<B, Self>)) {
        self.lm.visit_linears(f);
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut ModelLinear<B, Self>) -> PeftResult<()>,
    ) -> PeftResult<()> {
        self.lm.map_linears(f)
    }

    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Sublayer) -> PeftResult<()>,
    ) -> PeftResult<()> {
        self.lm.map_sublayers(f)
    }

    fn map_embedding(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Embedding) -> PeftResult<()>,
    ) -> PeftResult<()> {
        self.lm.map_embedding(f)
    }

    fn map_kv(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::KeyValue) -> PeftResult<()>,
    ) -> PeftResult<()> {
        self.lm.map_kv(f)
    }
}

impl<B: Backend, L: LoraModel<B>> LoraModel<B> for RewardModel<B, L> {
    fn whole_modules(&self) -> Vec<String> {
        let mut v = self.lm.whole_modules();
        v.push(SCORE.to_string());
        v
    }

    fn tied_modules(&self) -> Vec<(String, String)> {
        self.lm.tied_modules()
    }

    fn module_tensors(&self, path: &str) -> Vec<(String, TensorData)> {
        if path == SCORE {
            vec![("weight".to_string(), self.score_weight().into_data())]
        } else {
            self.lm.module_tensors(path)
        }
    }

    fn set_module_tensor(&mut self, path: &str, name: &str, data: TensorData) -> PeftResult<()> {
        if path != SCORE {
            return self.lm.set_module_tensor(path, name, data);
        }
        let expected = self.score_weight().dims().to_vec();
        if name != "weight" {
            return Err(PeftError::Unsupported(format!(
                "the reward head `{SCORE}` has no tensor `{name}` (it has a weight only, no bias)"
            )));
        }
        if data.shape.as_slice() != expected.as_slice() {
            return Err(PeftError::Unsupported(format!(
                "`{SCORE}.weight` is {expected:?} in this model, the adapter holds {:?}",
                data.shape
            )));
        }
        let p = &self.score.weight;
        let (id, rg, device) = (p.id, p.is_require_grad(), p.val().device());
        let t = Tensor::<B, 2>::from_data(data, &device)
            .transpose()
            .set_require_grad(rg);
        self.score.weight = Param::initialized(id, t);
        Ok(())
    }

    fn token_embedding(&self) -> Option<(String, usize, usize)> {
        self.lm.token_embedding()
    }

    fn embedding_loras(&self) -> Option<&LoraEmbeddingSlot<B>> {
        self.lm.embedding_loras()
    }

    fn embedding_loras_mut(&mut self) -> Option<&mut LoraEmbeddingSlot<B>> {
        self.lm.embedding_loras_mut()
    }
}

/// The LoRA config of a reward adapter: `fields` with `score` in `modules_to_save` and the
/// `SEQ_CLS` task type, as peft writes for `AutoModelForSequenceClassification`.
pub fn reward_adapter_config(
    mut fields: LoraFields,
    base_model: Option<String>,
) -> AdapterConfig<LoraFields> {
    let mut mts = fields.modules_to_save.take().unwrap_or_default();
    if !mts.iter().any(|m| m == SCORE) {
        mts.push(SCORE.to_string());
    }
    fields.modules_to_save = Some(mts);
    let cfg = AdapterConfig::new(fields).with_task_type("SEQ_CLS");
    match base_model {
        Some(b) => cfg.with_base_model(b),
        None => cfg,
    }
}

/// Saves the LoRA adapter `name` of a reward model with its head into `dir` (peft's layout;
/// the head under `base_model.model.score.weight`).
///
/// # Errors
/// No adapter named `name`, I/O errors.
pub fn save_reward_adapter<B, L>(
    model: &RewardModel<B, L>,
    name: &str,
    config: &AdapterConfig<LoraFields>,
    dir: &Path,
) -> PeftResult<PathBuf>
where
    B: Backend,
    L: LoraModel<B>,
{
    let has_score = config
        .method
        .modules_to_save
        .as_ref()
        .is_some_and(|m| m.iter().any(|s| s == SCORE));
    if !has_score {
        return Err(PeftError::Adapter(
            "a reward adapter's config must list `score` in modules_to_save (see \
             reward_adapter_config), or the head would not be saved"
                .into(),
        ));
    }
    peft_lora::save_adapter_full(model, name, config, dir)
}

/// Loads a reward adapter (peft's `SEQ_CLS` LoRA with `score` in `modules_to_save`, saved by
/// Python's peft or by [`save_reward_adapter`]) into `model` under `name`, head included.
///
/// # Errors
/// A config without `score` in `modules_to_save` (not a reward adapter), and every error of
/// `peft_lora::load_adapter_full`.
pub fn load_reward_adapter<B, L>(
    model: &mut RewardModel<B, L>,
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> PeftResult<Vec<String>>
where
    B: Backend,
    L: LoraModel<B>,
{
    let cfg = AdapterConfig::<LoraFields>::load(dir)?;
    if !cfg
        .method
        .modules_to_save
        .as_ref()
        .is_some_and(|m| m.iter().any(|s| s == SCORE))
    {
        return Err(PeftError::Adapter(format!(
            "{} is not a reward adapter: its modules_to_save does not list `score` (train one \
             with `peft reward`, or save peft's AutoModelForSequenceClassification adapter)",
            dir.display()
        )));
    }
    peft_lora::load_adapter_full(model, dir, name, device)
}

/// The reward of each sequence `[sequences]`: the model's score at the last token of each
/// (right padding with `pad` never reaches it, since attention is causal).
///
/// transformers picks the rightmost token that is not `pad_token_id`; the two agree unless a
/// sequence ends with the padding id itself.
pub fn sequence_rewards<B: Backend, M: CausalLm<B>>(
    model: &M,
    seqs: &[&Tokenized],
    pad: u32,
    device: &B::Device,
) -> Tensor<B, 1> {
    let batch = Batch::new(seqs, pad);
    let (b, len) = (batch.ids.len(), batch.len);
    if b == 0 || len == 0 {
        return Tensor::zeros([b], device);
    }
    let flat: Vec<i32> = batch.ids.iter().flatten().map(|&t| t as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, len]), device);
    let hidden = model.hidden(ForwardInput::new(ids), None);
    let d = hidden.dims()[2];
    let last: Vec<i32> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i * len + s.ids.len().max(1) - 1) as i32)
        .collect();
    let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [b]), device);
    let picked = hidden.reshape([b * len, d]).select(0, last);
    model.logits(picked.unsqueeze::<3>()).reshape([b])
}

/// The options of the reward loss (TRL's `RewardConfig`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RewardConfig {
    /// `center_rewards_coefficient`: adds `c * mean((r_chosen + r_rejected)^2)`, which keeps
    /// rewards centred on zero (Eisenstein et al., 2023). `None`: off.
    pub center_rewards_coefficient: Option<f64>,
}

/// The Bradley-Terry loss of each pair, `-log sigmoid(r_c - r_r - margin)`, plus the
/// centring term `c (r_c + r_r)^2` when `center` is given (TRL's loss is the mean).
pub fn bradley_terry_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    center: Option<f64>,
) -> Tensor<B, 1> {
    let mut delta = chosen.clone() - rejected.clone();
    if let Some(m) = margin {
        delta = delta - m;
    }
    let loss = log_sigmoid(delta).neg();
    match center {
        Some(c) => loss + (chosen + rejected).powi_scalar(2) * c,
        None => loss,
    }
}

/// A preference pair for reward modelling: prompt + each completion, and an optional
/// margin by which the chosen one should win (TRL's `margin` column).
#[derive(Clone, Debug, PartialEq)]
pub struct RewardPair {
    /// Prompt + chosen completion.
    pub chosen: Tokenized,
    /// Prompt + rejected completion.
    pub rejected: Tokenized,
    /// The margin (0 when the data gives none).
    pub margin: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    pairs: usize,
    chosen: f64,
    rejected: f64,
    margin: f64,
    correct: usize,
}

/// The Bradley-Terry reward objective for `peft-train`'s loop, on a [`RewardModel`] (any
/// model whose `logits` are one score per position). Metrics (means over the step):
/// `accuracy` (share of pairs ranked right), `margin` (`r_chosen - r_rejected`),
/// `rewards_chosen`, `rewards_rejected`.
#[derive(Debug)]
pub struct Reward {
    /// Options.
    pub config: RewardConfig,
    /// Padding id.
    pub pad: u32,
    sums: RefCell<Sums>,
}

impl Reward {
    /// The reward objective with these options.
    pub fn new(config: RewardConfig, pad: u32) -> Self {
        Self {
            config,
            pad,
            sums: RefCell::new(Sums::default()),
        }
    }
}

impl Objective for Reward {
    type Example = RewardPair;

    fn loss<B: Backend, M: CausalLm<B>>(
        &self,
        model: &M,
        pairs: &[&RewardPair],
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let k = pairs.len();
        let seqs: Vec<&Tokenized> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let r = sequence_rewards(model, &seqs, self.pad, device);
        let rc = r.clone().slice(0..k);
        let rr = r.slice(k..2 * k);
        let margin = pairs.iter().any(|p| p.margin != 0.0).then(|| {
            let m: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(m, [k]), device)
        });
        let losses = bradley_terry_loss(
            rc.clone(),
            rr.clone(),
            margin,
            self.config.center_rewards_coefficient,
        );
        let vals = |t: Tensor<B, 1>| -> Vec<f32> {
            t.detach()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap_or_default()
        };
        let (c, j) = (vals(rc), vals(rr));
        let mut s = self.sums.borrow_mut();
        for (c, r) in c.iter().zip(&j) {
            s.pairs += 1;
            s.chosen += f64::from(*c);
            s.rejected += f64::from(*r);
            s.margin += f64::from(c - r);
            s.correct += usize::from(c > r);
        }
        losses.sum()
    }

    fn targets(&self, _: &RewardPair) -> usize {
        1
    }

    fn tokens(&self, p: &RewardPair) -> usize {
        p.chosen.ids.len() + p.rejected.ids.len()
    }

    fn take_metrics(&self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut *self.sums.borrow_mut());
        if s.pairs == 0 {
            return Vec::new();
        }
        let n = s.pairs as f64;
        vec![
            ("accuracy".into(), s.correct as f64 / n),
            ("margin".into(), s.margin / n),
            ("rewards_chosen".into(), s.chosen / n),
            ("rewards_rejected".into(), s.rejected / n),
        ]
    }
}

/// Scores `pairs` without training: the mean loss, accuracy and margin (for before/after
/// tables), `batch_size` pairs at a time.
pub fn evaluate_pairs<B: Backend, M: CausalLm<B>>(
    model: &M,
    objective: &Reward,
    pairs: &[RewardPair],
    batch_size: usize,
    device: &B::Device,
) -> Vec<(String, f64)> {
    let refs: Vec<&RewardPair> = pairs.iter().collect();
    let mut sum = 0.0;
    for chunk in refs.chunks(batch_size.max(1)) {
        let l: f32 = objective.loss(model, chunk, device).into_scalar().elem();
        sum += f64::from(l);
    }
    let mut out = vec![("loss".to_string(), sum / pairs.len().max(1) as f64)];
    out.extend(objective.take_metrics());
    out
}
