//! # peft-adapter
//!
//! Three parameter-efficient methods that are not low-rank:
//!
//! - [`ia3`]: (IA)^3 (Liu et al., 2022, <https://arxiv.org/abs/2205.05638>). A learned
//!   vector `l` scales a linear layer's output, `y = l * (W x + b)`, or, for the layers in
//!   `feedforward_modules`, its input, `y = W (l * x) + b`. Vectors start at ones, merge into
//!   the weights and unmerge; files are peft's (`ia3_l`), both ways.
//! - [`bottleneck`]: bottleneck adapters (Houlsby et al., 2019,
//!   <https://arxiv.org/abs/1902.00751>), `y + s * up(act(down(.)))` after a sublayer, in
//!   adapter-hub's layouts `seq_bn` (Pfeiffer: after the MLP), `double_seq_bn` (Houlsby:
//!   after attention and after the MLP) and `par_bn` (parallel to the MLP, scaled).
//! - [`bitfit`]: BitFit (Ben Zaken et al., 2021, <https://arxiv.org/abs/2106.10199>): only
//!   the biases train, with a clear error for a model that has none.
//!
//! (IA)^3 lives in the linear-layer slot ([`peft_core::inject::LinearAdapter`]), bottleneck
//! adapters in the sublayer slot ([`peft_core::inject::SublayerAdapter`]); both hold several
//! named adapters ([`peft_core::adapters::AdapterSet`]), switched, disabled and deleted with
//! [`peft_core::model`]'s functions. The model types [`Ia3Llama`], [`Ia3Gpt2`],
//! [`BottleneckLlama`] and [`BottleneckGpt2`] have those slots. Freeze with
//! [`peft_core::trainable::AdapterOnly`] for (IA)^3 and bottleneck adapters, and with
//! [`bitfit::policy`] (which checks there are biases) for BitFit. See docs/adapters.md.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use peft_adapter::bottleneck::{self, BottleneckFields};
//! use peft_adapter::{BottleneckLlama, Ia3Llama, ia3};
//! use peft_core::config::AdapterConfig;
//! use peft_core::model::set_active_adapters;
//! use peft_models::config::ModelConfig;
//! use peft_models::weights::SafetensorsSource;
//!
//! let device = Default::default();
//! let dir = std::path::Path::new("my-llama");
//! let ModelConfig::Llama(cfg) = ModelConfig::from_dir(dir)? else { panic!("not a Llama") };
//!
//! // (IA)^3 saved by Python's peft.
//! let mut model = Ia3Llama::<NdArray>::load(&cfg, &mut SafetensorsSource::open_dir(dir)?, &device)?;
//! ia3::load_adapter(&mut model, "my-ia3".as_ref(), "default", &device)?;
//!
//! // One bottleneck adapter per task on one frozen base, switched per task.
//! let mut model =
//!     BottleneckLlama::<NdArray>::load(&cfg, &mut SafetensorsSource::open_dir(dir)?, &device)?;
//! bottleneck::add_adapter(&mut model, "sentiment", &BottleneckFields::seq_bn(), &device)?;
//! bottleneck::add_adapter(&mut model, "ner", &BottleneckFields::double_seq_bn(), &device)?;
//! set_active_adapters(&mut model, &["ner"])?;
//! let config = AdapterConfig::new(BottleneckFields::double_seq_bn());
//! bottleneck::save_adapter(&model, "ner", &config, "ner-adapter".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bitfit;
pub mod bottleneck;
pub mod ia3;

use burn::nn::Linear;
use peft_core::adapters::AdaptedLinear;
use peft_core::inject::NoAdapter;

pub use bottleneck::{BottleneckAdapter, BottleneckFields, BottleneckSlot, Layout, NonLinearity};
pub use ia3::{Ia3Layer, Ia3Slot};

/// A Llama-family model with (IA)^3 slots on every linear layer.
pub type Ia3Llama<B> = peft_models::llama::LlamaForCausalLM<
    B,
    AdaptedLinear<B, Linear<B>, Ia3Slot<B>>,
    NoAdapter,
    NoAdapter,
    NoAdapter,
>;

/// GPT-2 with (IA)^3 slots on every linear (Conv1D) layer.
pub type Ia3Gpt2<B> =
    peft_models::gpt2::Gpt2LMHeadModel<B, AdaptedLinear<B, Linear<B>, Ia3Slot<B>>, NoAdapter>;

/// A Llama-family model with bottleneck-adapter slots after attention and after the MLP
/// (`model.layers.N.attn_adapter`, `model.layers.N.mlp_adapter`).
pub type BottleneckLlama<B> = peft_models::llama::LlamaForCausalLM<
    B,
    AdaptedLinear<B, Linear<B>, NoAdapter>,
    BottleneckSlot<B>,
    NoAdapter,
    NoAdapter,
>;

/// GPT-2 with bottleneck-adapter slots after attention and after the MLP
/// (`transformer.h.N.attn_adapter`, `transformer.h.N.mlp_adapter`).
pub type BottleneckGpt2<B> = peft_models::gpt2::Gpt2LMHeadModel<
    B,
    AdaptedLinear<B, Linear<B>, NoAdapter>,
    BottleneckSlot<B>,
>;

/// A Llama-family model with both (IA)^3 and bottleneck slots.
pub type Ia3BottleneckLlama<B> = peft_models::llama::LlamaForCausalLM<
    B,
    AdaptedLinear<B, Linear<B>, Ia3Slot<B>>,
    BottleneckSlot<B>,
    NoAdapter,
    NoAdapter,
>;

/// The model BitFit trains: the plain Llama (it adds no module; only biases train).
pub type BitFitLlama<B> = peft_models::llama::Llama<B>;

/// The model BitFit trains: the plain GPT-2.
pub type BitFitGpt2<B> = peft_models::gpt2::Gpt2<B>;

/// The Rust examples of docs/adapters.md, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/adapters.md")]
pub struct AdaptersGuideDoctests;
