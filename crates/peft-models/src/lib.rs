//! # peft-models
//!
//! Real architectures written with adapter slots at every injection point of
//! [`peft_core::inject`]: the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2), GPT-2 and
//! BERT, loading Hugging Face directories (safetensors, sharded or not) and GGUF files, with
//! module paths equal to the Hugging Face names so peft target names and adapter keys work
//! as they are.
//!
//! Status: the crate exists so the workspace has its final shape; the architectures land
//! with the models work item (they implement [`peft_core::model::AdaptableModel`]).
