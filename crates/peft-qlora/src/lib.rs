//! # peft-qlora
//!
//! QLoRA (Dettmers et al., 2023, <https://arxiv.org/abs/2305.14314>): the frozen base weight
//! is stored in blocks of 64 values as 4-bit NormalFloat (NF4) or FP4 codes with one absmax
//! per block, `w = code[q] * absmax`; double quantization stores the absmax values themselves
//! as 8-bit codes. LoRA adapters from `peft-lora` train on top. The byte layout and code
//! tables are those of bitsandbytes, so checkpoints move between the two.
//!
//! Status: the crate exists so the workspace has its final shape; the 4-bit storage lands
//! with the QLoRA work item (it implements [`peft_core::inject::LinearWeight`]).
