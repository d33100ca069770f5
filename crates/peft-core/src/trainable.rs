//! Which parameters train, and the trainable-parameter report.
//!
//! Freezing sets `require_grad` per parameter from its module path. burn's optimizers skip
//! parameters that do not require a gradient and create their state lazily, so frozen
//! weights get neither gradients nor optimizer state.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::LinearConfig;
//! use peft_core::trainable::{freeze, trainable_report, BiasOnly};
//!
//! type B = Autodiff<NdArray>;
//! let layer = LinearConfig::new(4, 3).init::<B>(&Default::default());
//! let layer = freeze(layer, &BiasOnly); // BitFit: only biases train
//! let report = trainable_report(&layer);
//! assert_eq!((report.trainable, report.total), (3, 15));
//! println!("{report}"); // trainable params: 3 || all params: 15 || trainable%: 20.0000
//! ```

use std::fmt;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

/// Decides from a parameter's module path (`model.layers.0.self_attn.q_proj.base.weight`)
/// whether it trains.
pub trait TrainablePolicy {
    /// Whether the parameter at `path` trains.
    fn is_trainable(&self, path: &str) -> bool;
}

impl<F: Fn(&str) -> bool> TrainablePolicy for F {
    fn is_trainable(&self, path: &str) -> bool {
        self(path)
    }
}

/// Whether a path segment names an adapter slot: `adapter` (the slot of
/// [`crate::adapters::AdaptedLinear`]) or a name ending in `_adapter` (the sublayer,
/// embedding and key/value slots of the architectures).
pub fn is_adapter_segment(segment: &str) -> bool {
    segment == "adapter" || segment.ends_with("_adapter")
}

/// Only adapter parameters train (the default of every PEFT method).
#[derive(Clone, Copy, Debug, Default)]
pub struct AdapterOnly;

impl TrainablePolicy for AdapterOnly {
    fn is_trainable(&self, path: &str) -> bool {
        path.split('.').any(is_adapter_segment)
    }
}

/// Only bias terms train (BitFit, Ben Zaken et al., 2021).
#[derive(Clone, Copy, Debug, Default)]
pub struct BiasOnly;

impl TrainablePolicy for BiasOnly {
    fn is_trainable(&self, path: &str) -> bool {
        path.rsplit('.').next() == Some("bias")
    }
}

/// Every parameter trains (full fine-tuning, the baseline).
#[derive(Clone, Copy, Debug, Default)]
pub struct Everything;

impl TrainablePolicy for Everything {
    fn is_trainable(&self, _path: &str) -> bool {
        true
    }
}

/// Whole modules train in full, as peft's `modules_to_save`: a name matches a module path
/// exactly or as a dotted suffix, and every parameter under that module trains.
#[derive(Clone, Debug, Default)]
pub struct ModulesToSave(pub Vec<String>);

impl TrainablePolicy for ModulesToSave {
    fn is_trainable(&self, path: &str) -> bool {
        // Every proper prefix of the parameter path is a module path.
        let segments: Vec<&str> = path.split('.').collect();
        (1..segments.len()).any(|end| {
            let module = segments[..end].join(".");
            self.0
                .iter()
                .any(|m| module == *m || module.ends_with(&format!(".{m}")))
        })
    }
}

/// Either policy: `Any(a, b)` trains what `a` or `b` trains.
#[derive(Clone, Debug, Default)]
pub struct Any<P, Q>(pub P, pub Q);

impl<P: TrainablePolicy, Q: TrainablePolicy> TrainablePolicy for Any<P, Q> {
    fn is_trainable(&self, path: &str) -> bool {
        self.0.is_trainable(path) || self.1.is_trainable(path)
    }
}

struct Freezer<'a, P> {
    path: Vec<String>,
    policy: &'a P,
}

impl<P> Freezer<'_, P> {
    fn param_path(&self) -> String {
        self.path.join(".")
    }
}

impl<B: Backend, P: TrainablePolicy> ModuleMapper<B> for Freezer<'_, P> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let train = self.policy.is_trainable(&self.param_path());
        param.set_require_grad(train)
    }
}

/// Sets every float parameter's `require_grad` from `policy` and returns the module.
pub fn freeze<B: Backend, M: Module<B>, P: TrainablePolicy>(module: M, policy: &P) -> M {
    module.map(&mut Freezer {
        path: vec![],
        policy,
    })
}

/// Trainable and total parameter counts, as peft's `print_trainable_parameters` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainableReport {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All parameters.
    pub total: usize,
}

impl TrainableReport {
    /// Trainable share in percent.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl fmt::Display for TrainableReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            group_thousands(self.trainable),
            group_thousands(self.total),
            self.percent()
        )
    }
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Counter {
    report: TrainableReport,
    path: Vec<String>,
    trainable_paths: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for Counter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n = param.shape().num_elements();
        self.report.total += n;
        if param.is_require_grad() {
            self.report.trainable += n;
            self.trainable_paths.push(self.path.join("."));
        }
    }
}

/// Counts trainable and total float parameters of a module. On a backend without
/// autodiff nothing requires a gradient, so `trainable` is 0 there.
pub fn trainable_report<B: Backend, M: Module<B>>(module: &M) -> TrainableReport {
    let mut c = Counter {
        report: TrainableReport::default(),
        path: vec![],
        trainable_paths: vec![],
    };
    module.visit(&mut c);
    c.report
}

/// The module paths of the parameters that train.
pub fn trainable_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<String> {
    let mut c = Counter {
        report: TrainableReport::default(),
        path: vec![],
        trainable_paths: vec![],
    };
    module.visit(&mut c);
    c.trainable_paths
}
