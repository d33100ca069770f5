//! BitFit (Ben Zaken et al., 2021, <https://arxiv.org/abs/2106.10199>): only the bias
//! terms of the model train; every weight stays frozen.
//!
//! There is nothing to add to the model: BitFit is a choice of trainable parameters,
//! [`BiasOnly`]. What this module adds is the check that the model *has* biases: many
//! current decoders have none (Llama, SmolLM2, Mistral), and freezing everything but
//! their biases would train nothing at all. Qwen2 (q, k, v biases) and GPT-2 (biases on
//! every linear layer and layer norm) have them.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::LinearConfig;
//! use peft_adapter::bitfit;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let with_bias = LinearConfig::new(4, 3).init::<B>(&device);
//! let frozen = bitfit::freeze_all_but_biases(with_bias).unwrap(); // only `bias` trains
//! assert_eq!(peft_core::trainable::trainable_paths(&frozen), vec!["bias".to_string()]);
//!
//! let no_bias = LinearConfig::new(4, 3).with_bias(false).init::<B>(&device);
//! let err = bitfit::freeze_all_but_biases(no_bias).unwrap_err();
//! assert!(err.to_string().contains("no bias"));
//! ```

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use peft_core::trainable::{BiasOnly, TrainablePolicy, freeze, is_adapter_segment};
use peft_core::{PeftError, Result};

struct BiasFinder {
    path: Vec<String>,
    found: Vec<(String, usize)>,
}

impl<B: Backend> ModuleVisitor<B> for BiasFinder {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.path.join(".");
        let in_adapter = self.path.iter().any(|s| is_adapter_segment(s));
        if BiasOnly.is_trainable(&path) && !in_adapter {
            self.found.push((path, param.shape().num_elements()));
        }
    }
}

/// The base model's bias parameters (paths and sizes), leaving out any adapter's own.
pub fn bias_parameters<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, usize)> {
    let mut v = BiasFinder {
        path: vec![],
        found: vec![],
    };
    model.visit(&mut v);
    v.found
}

/// The [`BiasOnly`] policy, after checking that the model has bias terms to train.
///
/// # Errors
/// [`PeftError::Unsupported`] when the model has no bias parameter, saying so.
pub fn policy<B: Backend, M: Module<B>>(model: &M) -> Result<BiasOnly> {
    if bias_parameters(model).is_empty() {
        return Err(PeftError::Unsupported(
            "BitFit trains only bias terms, but this model has no bias parameters, so it would \
             train nothing (Llama, SmolLM2 and Mistral have none; Qwen2 and GPT-2 have them). \
             Use LoRA, (IA)^3 or a bottleneck adapter for this model"
                .into(),
        ));
    }
    Ok(BiasOnly)
}

/// Freezes every parameter but the biases (BitFit), after checking there are some.
///
/// # Errors
/// As [`policy`].
pub fn freeze_all_but_biases<B: Backend, M: Module<B>>(model: M) -> Result<M> {
    let p = policy(&model)?;
    Ok(freeze(model, &p))
}
