//! # peft-rlhf
//!
//! Preference optimisation on PEFT-adapted models: the SFT objective (token cross-entropy
//! with completion-only masking), reward models trained with the Bradley-Terry loss
//! `-log sigmoid(r_chosen - r_rejected)`, DPO (Rafailov et al., 2023,
//! <https://arxiv.org/abs/2305.18290>) with TRL's loss variants, and PPO. The reference model
//! is the same model with its adapter disabled, so no second copy of the weights is held.
//!
//! Status: the crate exists so the workspace has its final shape; the objectives land with
//! the RLHF work item.
