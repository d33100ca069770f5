//! One training step (forward, backward, optimizer) on the SmolLM2-135M architecture, for
//! LoRA, QLoRA and full fine-tuning: what `cargo xtask bench train` and the `train_step`
//! criterion bench time.
//!
//! The weights are random (normal, std 0.02; norms at one): a step costs the same whatever
//! the values, and the bench needs no download. The step is the one `peft-train`'s loop
//! runs: token cross-entropy over every position, backward, global-norm clipping at 1.0,
//! AdamW.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::config::LoraFields;
use peft_core::target::Targets;
use peft_core::trainable::{AdapterOnly, freeze};
use peft_models::CausalLm;
use peft_models::config::{LlamaConfig, ModelConfig};
use peft_models::weights::WeightSource;
use peft_train::data::Tokenized;
use peft_train::optim::{AdamW, AdamWConfig, GradStore};
use peft_train::trainer::{Objective, TokenCrossEntropy};

/// The fine-tuning methods the bench compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// LoRA on the frozen f32 base.
    Lora,
    /// LoRA on the NF4 base (block 64, double quantization).
    Qlora,
    /// Every parameter trains.
    Full,
}

impl Method {
    /// Parses `lora`, `qlora` or `full`.
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "lora" => Ok(Self::Lora),
            "qlora" => Ok(Self::Qlora),
            "full" => Ok(Self::Full),
            _ => Err(format!("unknown method `{s}` (lora, qlora, full)")),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Qlora => "qlora",
            Self::Full => "full",
        }
    }
}

/// The shape of the benchmarked step.
#[derive(Clone, Debug)]
pub struct StepShape {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// LoRA rank (alpha is twice the rank).
    pub rank: usize,
    /// Decoder layers (30 in SmolLM2-135M; fewer for a quick look).
    pub layers: usize,
}

impl Default for StepShape {
    /// The reference point of the comparison with Hugging Face peft: 4 sequences of 128
    /// tokens, r = 16, all 30 layers.
    fn default() -> Self {
        Self {
            batch: 4,
            seq_len: 128,
            rank: 16,
            layers: 30,
        }
    }
}

/// SmolLM2-135M's `config.json` (the fields that shape the computation).
pub const SMOLLM2_135M_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
  "rms_norm_eps": 1e-05, "rope_theta": 100000, "max_position_embeddings": 8192,
  "tie_word_embeddings": true, "hidden_act": "silu",
  "bos_token_id": 1, "eos_token_id": 2
}"#;

/// SmolLM2-135M's architecture with `layers` decoder layers.
///
/// # Panics
/// Never for the embedded config (a test parses it).
pub fn smollm2_config(layers: usize) -> LlamaConfig {
    let v: serde_json::Value =
        serde_json::from_str(SMOLLM2_135M_CONFIG).expect("the embedded config is JSON");
    match ModelConfig::from_json(&v, Path::new("SmolLM2-135M/config.json")) {
        Ok(ModelConfig::Llama(mut c)) => {
            c.num_hidden_layers = layers;
            c
        }
        other => panic!("the embedded SmolLM2 config does not parse as Llama: {other:?}"),
    }
}

/// A [`WeightSource`] that makes up every tensor a loader asks for: normal(0, `std`)
/// values, ones for normalisation weights, and no biases. Deterministic for a seed.
pub struct RandomWeights {
    path: PathBuf,
    state: u64,
    std: f32,
}

impl RandomWeights {
    /// A source seeded with `seed`.
    pub fn new(seed: u64, std: f32) -> Self {
        Self {
            path: PathBuf::from("<random weights>"),
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            std,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        !name.ends_with(".bias") && name != "lm_head.weight"
    }

    fn shape(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> peft_models::Result<TensorData> {
        let n: usize = expected.iter().product();
        let values: Vec<f32> = if name.contains("norm") {
            vec![1.0; n]
        } else {
            // Box-Muller, two normals per pair of uniforms.
            let mut v = Vec::with_capacity(n + 1);
            while v.len() < n {
                let (u1, u2) = (self.uniform(), self.uniform());
                let r = (-2.0 * u1.ln()).sqrt() * self.std;
                let t = std::f32::consts::TAU * u2;
                v.push(r * t.cos());
                v.push(r * t.sin());
            }
            v.truncate(n);
            v
        };
        Ok(TensorData::new(values, expected.to_vec()))
    }

    fn untaken(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Random token sequences of the step's shape, every position after the first a target
/// (as `labels = input_ids` in transformers).
pub fn random_batch(shape: &StepShape, vocab: usize, seed: u64) -> Vec<Tokenized> {
    let mut rng = RandomWeights::new(seed, 1.0);
    (0..shape.batch)
        .map(|_| Tokenized {
            ids: (0..shape.seq_len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect(),
            trained: vec![true; shape.seq_len],
        })
        .collect()
}

/// A model, its optimizer and a fixed batch: `step()` runs one training step.
pub struct Stepper<B: AutodiffBackend, M> {
    model: Option<M>,
    adam: AdamW<B::InnerBackend>,
    batch: Vec<Tokenized>,
    objective: TokenCrossEntropy,
    device: B::Device,
    /// Trainable parameters.
    pub trainable: usize,
    /// Seconds spent in each phase of the last step.
    pub phases: Phases,
}

/// Seconds spent in the phases of a step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// The forward pass and the loss.
    pub forward: f64,
    /// The backward pass.
    pub backward: f64,
    /// Collecting the gradients, clipping and AdamW.
    pub optimizer: f64,
}

impl<B, M> Stepper<B, M>
where
    B: AutodiffBackend,
    M: burn::module::AutodiffModule<B> + CausalLm<B>,
{
    fn new(model: M, shape: &StepShape, vocab: usize, device: &B::Device) -> Self {
        let trainable = peft_core::trainable::trainable_report(&model).trainable;
        Self {
            model: Some(model),
            adam: AdamW::new(AdamWConfig::default()),
            batch: random_batch(shape, vocab, 7),
            objective: TokenCrossEntropy { pad: 0 },
            device: device.clone(),
            trainable,
            phases: Phases::default(),
        }
    }

    /// The step as a boxed closure, with the number of trainable parameters.
    fn boxed(mut self) -> (StepFn, usize)
    where
        B: 'static,
        M: 'static,
    {
        let n = self.trainable;
        (
            Box::new(move || {
                let loss = self.step();
                (loss, self.phases)
            }),
            n,
        )
    }

    /// One step: forward, backward, clipping, AdamW. Returns the mean token loss (reading
    /// it waits for the forward pass on asynchronous backends).
    pub fn step(&mut self) -> f32 {
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        let refs: Vec<&Tokenized> = self.batch.iter().collect();
        let targets: usize = refs.iter().map(|e| self.objective.targets(e)).sum();
        let t = std::time::Instant::now();
        let loss = self.objective.loss(&model, &refs, &self.device);
        let value: f32 = loss.clone().into_scalar().elem();
        let t_forward = t.elapsed().as_secs_f64();
        let grads = (loss / targets as f64).backward();
        let t_backward = t.elapsed().as_secs_f64();
        let mut store = GradStore::<B::InnerBackend>::default();
        store.accumulate(&model, &grads);
        drop(grads);
        store.clip_global_norm(1.0);
        self.model = Some(self.adam.step(model, store, 1e-4));
        let t_all = t.elapsed().as_secs_f64();
        self.phases = Phases {
            forward: t_forward,
            backward: t_backward - t_forward,
            optimizer: t_all - t_backward,
        };
        value / targets as f32
    }
}

fn lora_fields(shape: &StepShape) -> LoraFields {
    LoraFields {
        r: shape.rank,
        lora_alpha: 2.0 * shape.rank as f64,
        lora_dropout: 0.0,
        target_modules: Some(Targets::list([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ])),
        ..LoraFields::default()
    }
}

/// A boxed training step returning the mean token loss and the time of its phases.
pub type StepFn = Box<dyn FnMut() -> (f32, Phases)>;

/// Builds the model of `method` and returns a boxed step function and the number of
/// trainable parameters.
///
/// # Errors
/// A model or adapter that cannot be built (a bug: the config is fixed).
pub fn stepper<B: AutodiffBackend + peft_qlora::QuantBackend>(
    method: Method,
    shape: &StepShape,
    device: &B::Device,
) -> Result<(StepFn, usize), String> {
    let config = smollm2_config(shape.layers);
    let vocab = config.vocab_size;
    let mut weights = RandomWeights::new(42, 0.02);
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match method {
        Method::Lora => {
            let mut m: peft_lora::LoraLlama<B> =
                peft_lora::LoraLlama::load(&config, &mut weights, device).map_err(|x| e(&x))?;
            peft_lora::add_adapter(&mut m, "default", &lora_fields(shape), device)
                .map_err(|x| e(&x))?;
            let m = freeze(m, &AdapterOnly);
            Ok(Stepper::<B, _>::new(m, shape, vocab, device).boxed())
        }
        Method::Qlora => {
            let quant = peft_qlora::QuantConfig::new();
            let mut m: peft_qlora::QloraLlama<B> = peft_qlora::with_quant_config(quant, || {
                peft_qlora::QloraLlama::load(&config, &mut weights, device)
            })
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
            peft_lora::add_adapter(&mut m, "default", &lora_fields(shape), device)
                .map_err(|x| e(&x))?;
            let m = freeze(m, &AdapterOnly);
            Ok(Stepper::<B, _>::new(m, shape, vocab, device).boxed())
        }
        Method::Full => {
            let m: peft_models::llama::Llama<B> =
                peft_models::llama::Llama::load(&config, &mut weights, device)
                    .map_err(|x| e(&x))?;
            Ok(Stepper::<B, _>::new(m, shape, vocab, device).boxed())
        }
    }
}

/// The process's peak resident memory in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_config_is_smollm2_135m() {
        let c = smollm2_config(30);
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim
            ),
            (49152, 576, 1536, 9, 3, 64)
        );
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn random_weights_have_the_asked_spread() {
        let mut w = RandomWeights::new(1, 0.02);
        let d = w.take("x.weight", &[100_000]).unwrap();
        let v = d.to_vec::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 5e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        let n = w.take("model.norm.weight", &[4]).unwrap();
        assert_eq!(n.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    }
}
