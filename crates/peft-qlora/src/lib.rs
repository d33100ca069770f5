//! # peft-qlora
//!
//! QLoRA (Dettmers et al., 2023, <https://arxiv.org/abs/2305.14314>): the frozen base weight
//! is stored in blocks of 64 values as 4-bit NormalFloat (NF4) or FP4 codes with one absmax
//! per block, `w = code[q] * absmax`; double quantization stores the absmax values
//! themselves as 8-bit codes, `absmax = map[q2] * nested_absmax + offset`. LoRA adapters
//! from `peft-lora` train on top: `y = x W_4bit^T + s B A x`, only `A` and `B` learning.
//!
//! The code tables, rounding, byte layout and serialization are bitsandbytes' (checked
//! byte for byte against fixtures made by bitsandbytes, `scripts/fixtures/qlora.py`), so
//! 4-bit checkpoints move between transformers + bitsandbytes and this crate.
//!
//! - [`quant`]: host-side blockwise quantization ([`quant::quantize_4bit`],
//!   [`quant::DoubleQuant`], [`quant::QuantizedWeight`]).
//! - [`Linear4bit`]: the frozen 4-bit layer, a [`peft_core::inject::LinearWeight`] that keeps
//!   only the codes and statistics on the device (about 0.517 bytes per weight).
//! - [`backend`]: [`QuantBackend`], the backend extension behind the 4-bit products: portable
//!   burn ops everywhere, host kernels on `Flex` (the CPU), and an autodiff node that keeps
//!   the codes rather than the f32 weight for the backward pass.
//! - [`bnb`]: the bitsandbytes checkpoint layout, read and written.
//! - [`model`]: [`QloraLlama`], loading ([`load_qlora_llama`]), quantizing a loaded model
//!   ([`quantize_llama`]), saving ([`save_bnb_llama`]), merging ([`merge_requantize`],
//!   [`merge_to_dense`]) and the memory measurement ([`base_memory`]).
//!
//! ```no_run
//! use burn::backend::{Autodiff, NdArray};
//! use peft_core::config::LoraFields;
//! use peft_qlora::{QloraLlama, QuantConfig, base_memory, load_qlora_llama};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! // A dense checkpoint is quantized layer by layer as it loads (NF4, block 64, double
//! // quantization); a bitsandbytes 4-bit directory loads with its own bytes.
//! let mut model: QloraLlama<B> =
//!     load_qlora_llama(std::path::Path::new("SmolLM2-135M"), &QuantConfig::new(), &device)?;
//! println!("{:.3} bytes per base weight", base_memory(&model).bytes_per_parameter());
//! let fields = LoraFields { r: 16, ..LoraFields::default() };
//! peft_lora::add_adapter(&mut model, "default", &fields, &device)?;
//! // ... train the adapter as with peft-lora; the 4-bit base gets no gradient.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backend;
pub mod bnb;
pub mod codes;
#[cfg(feature = "flex")]
mod cpu;
#[cfg(feature = "cubecl")]
pub mod cube;
pub mod error;
pub mod linear;
pub mod model;
pub mod quant;

pub use backend::{Q4Weight, QuantBackend};
pub use bnb::{BnbCheckpoint, is_bnb_checkpoint};
pub use error::{QloraError, Result};
pub use linear::{Linear4bit, current_quant_config, with_quant_config};
pub use model::{
    BaseMemory, MergeReport, QloraLlama, RequantError, base_memory, dequantize_llama,
    load_bnb_llama, load_qlora_llama, load_quantized_llama, map_llama_weights, merge_requantize,
    merge_to_dense, quantize_llama, save_bnb_llama,
};
pub use quant::{QuantConfig, QuantType};
