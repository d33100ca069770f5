//! AdamW with decoupled weight decay, learning-rate schedules, gradient accumulation and
//! global-norm clipping, with state keyed by parameter path.
//!
//! burn's own optimizers key their state by `ParamId`, which is drawn afresh each time a
//! model is built, so a state saved by one process would not find its parameters in the
//! next. Here gradients and moments are keyed by the parameter's module path
//! (`model.layers.0.self_attn.q_proj.adapter.slots.0.lora_a`), which is the same in every
//! process that builds the same model, and state exists only for parameters that train.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW's hyper-parameters (defaults as `torch.optim.AdamW`, except the weight decay,
/// which is 0 as in Hugging Face's `TrainingArguments`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// How the learning rate evolves after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Constant after warm-up.
    Constant,
    /// Linear to zero at the last step.
    #[default]
    Linear,
    /// Half a cosine to zero at the last step.
    Cosine,
}

/// A learning-rate schedule: linear warm-up over `warmup` steps, then `decay`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// After warm-up.
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based), as transformers'
    /// `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` give it:
    /// `lr * step / warmup` during warm-up (so the first step of a warm-up uses 0), then
    /// the decay from `lr` at the end of warm-up to 0 at `total`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = (step - self.warmup) as f64 / span;
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr * (1.0 - progress).max(0.0),
            Decay::Cosine => {
                self.lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Gradients summed over the micro-batches of one optimizer step, by parameter path,
/// flattened.
#[derive(Debug)]
pub struct GradStore<B: Backend> {
    grads: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Default for GradStore<B> {
    fn default() -> Self {
        Self {
            grads: BTreeMap::new(),
        }
    }
}

impl<B: Backend> GradStore<B> {
    /// Adds the gradients of `module`'s trainable parameters from a backward pass.
    pub fn accumulate<AB, M>(&mut self, module: &M, grads: &AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        let mut v = GradCollector::<AB> {
            path: Vec::new(),
            grads,
            store: &mut self.grads,
        };
        module.visit(&mut v);
    }

    /// The (flattened) gradient of the parameter at `path`.
    pub fn get(&self, path: &str) -> Option<&Tensor<B, 1>> {
        self.grads.get(path)
    }

    /// The parameters' paths with their (flattened) gradients, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor<B, 1>)> {
        self.grads.iter().map(|(path, g)| (path.as_str(), g))
    }

    /// Number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether no parameter has a gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The global L2 norm of all gradients.
    pub fn global_norm(&self) -> f64 {
        let sum: f64 = self.grads.values().map(peft_core::fused::sum_squares).sum();
        sum.sqrt()
    }

    /// Scales every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        let grads = std::mem::take(&mut self.grads);
        self.grads = grads
            .into_iter()
            .map(|(k, g)| (k, peft_core::fused::scale(g, factor)))
            .collect();
    }

    /// Clips to a global norm of `max_norm` as `torch.nn.utils.clip_grad_norm_` does
    /// (`factor = min(1, max_norm / (norm + 1e-6))`). Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            self.scale(factor);
        }
        norm
    }
}

struct GradCollector<'a, AB: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a AB::Gradients,
    store: &'a mut BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GradCollector<'_, AB> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let Some(g) = param.val().grad(self.grads) else {
            return;
        };
        let n = g.shape().num_elements();
        let g = g.reshape([n]);
        let key = self.path.join(".");
        let sum = match self.store.remove(&key) {
            Some(prev) => prev + g,
            None => g,
        };
        self.store.insert(key, sum);
    }
}

/// AdamW's moments for each trainable parameter, by path, and the step count.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub steps: usize,
    moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One update of `module`'s trainable parameters from `grads` at learning rate `lr`, as
    /// `torch.optim.AdamW` computes it.
    pub fn step<AB, M>(&mut self, module: M, grads: GradStore<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        self.steps += 1;
        let mut mapper = AdamWMapper::<B> {
            path: Vec::new(),
            opt: self,
            grads: grads.grads,
            lr,
        };
        module.map(&mut mapper)
    }

    /// The moments as named tensors (`<path>.exp_avg`, `<path>.exp_avg_sq`), for a
    /// checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, TensorData)> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (k, (m, v)) in &self.moments {
            out.push((format!("{k}.exp_avg"), m.clone().into_data()));
            out.push((format!("{k}.exp_avg_sq"), v.clone().into_data()));
        }
        out
    }

    /// Restores the moments saved by [`state_tensors`](Self::state_tensors).
    ///
    /// # Errors
    /// A name without its pair.
    pub fn load_state(
        &mut self,
        steps: usize,
        tensors: impl IntoIterator<Item = (String, TensorData)>,
        device: &B::Device,
    ) -> Result<()> {
        let mut m: BTreeMap<String, Tensor<B, 1>> = BTreeMap::new();
        let mut v: BTreeMap<String, Tensor<B, 1>> = BTreeMap::new();
        for (k, data) in tensors {
            let n = data.shape.iter().product::<usize>();
            let t = Tensor::<B, 1>::from_data(data.convert::<f32>(), device).reshape([n]);
            if let Some(p) = k.strip_suffix(".exp_avg_sq") {
                v.insert(p.to_string(), t);
            } else if let Some(p) = k.strip_suffix(".exp_avg") {
                m.insert(p.to_string(), t);
            } else {
                return Err(TrainError::Config(format!(
                    "unexpected optimizer tensor `{k}`"
                )));
            }
        }
        self.moments.clear();
        for (k, mk) in m {
            let vk = v.remove(&k).ok_or_else(|| {
                TrainError::Config(format!("optimizer state of `{k}` has no exp_avg_sq"))
            })?;
            self.moments.insert(k, (mk, vk));
        }
        if let Some(k) = v.keys().next() {
            return Err(TrainError::Config(format!(
                "optimizer state of `{k}` has no exp_avg"
            )));
        }
        self.steps = steps;
        Ok(())
    }
}

struct AdamWMapper<'a, B: Backend> {
    path: Vec<String>,
    opt: &'a mut AdamW<B>,
    grads: BTreeMap<String, Tensor<B, 1>>,
    lr: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for AdamWMapper<'_, AB::InnerBackend> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let key = self.path.join(".");
        let Some(g) = self.grads.remove(&key) else {
            return param;
        };
        let c = &self.opt.config;
        let t = self.opt.steps as i32;
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let p = tensor.inner().reshape([n]);
        let update = peft_core::fused::AdamWUpdate {
            lr: self.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: t,
        };
        let (p, m, v) = peft_core::fused::adamw(p, g, self.opt.moments.remove(&key), &update);
        self.opt.moments.insert(key, (m, v));
        let p = Tensor::<AB, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// The trainable parameters of a module, by path (for checkpoints and "best" snapshots).
pub fn trainable_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, TensorData)> {
    struct V {
        path: Vec<String>,
        out: Vec<(String, TensorData)>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                self.out
                    .push((self.path.join("."), param.val().into_data()));
            }
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Replaces the values of `module`'s trainable parameters by `tensors` (by path), keeping
/// them trainable.
///
/// # Errors
/// A trainable parameter missing from `tensors`, a shape that differs, or a tensor that no
/// trainable parameter takes.
pub fn load_trainable<B: Backend, M: Module<B>>(
    module: M,
    tensors: Vec<(String, TensorData)>,
) -> Result<M> {
    struct L {
        path: Vec<String>,
        tensors: BTreeMap<String, TensorData>,
        errors: Vec<String>,
    }
    impl<B: Backend> ModuleMapper<B> for L {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if !param.is_require_grad() {
                return param;
            }
            let key = self.path.join(".");
            let Some(data) = self.tensors.remove(&key) else {
                self.errors.push(format!("`{key}` is missing"));
                return param;
            };
            let expected = param.shape().dims::<D>().to_vec();
            if data.shape.to_vec() != expected {
                self.errors.push(format!(
                    "`{key}` is {:?}, the model's is {expected:?}",
                    data.shape
                ));
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let t = Tensor::<B, D>::from_data(data.convert::<f32>(), &tensor.device())
                .set_require_grad(true);
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let mut l = L {
        path: Vec::new(),
        tensors: tensors.into_iter().collect(),
        errors: Vec::new(),
    };
    let module = module.map(&mut l);
    if let Some(k) = l.tensors.keys().next() {
        l.errors
            .push(format!("`{k}` is not a trainable parameter of this model"));
    }
    if l.errors.is_empty() {
        Ok(module)
    } else {
        Err(TrainError::Config(format!(
            "the saved parameters do not fit this model: {}",
            l.errors.join("; ")
        )))
    }
}
