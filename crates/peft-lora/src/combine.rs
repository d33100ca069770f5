//! A new adapter from a weighted combination of existing ones, as peft's
//! `add_weighted_adapter`:
//!
//! - `linear`: `A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i`, `B = sum_i sqrt(|w_i s_i|) B_i`
//!   (equal ranks; a rough approximation of the weighted sum, with cross terms);
//! - `cat`: `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`, `B = [B_1, B_2, ...]`, rank the sum of
//!   the ranks: exactly `sum_i w_i s_i B_i A_i`;
//! - `svd`: the truncated SVD of `sum_i w_i s_i B_i A_i` to a given rank (the best
//!   approximation of that rank), `B = U_r S_r`, `A = V_r^T`.
//!
//! The new adapter has `lora_alpha = r`, so its scale is 1.

use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::prelude::*;
use peft_core::config::LoraFields;
use peft_core::inject::LinearWeight;
use peft_core::linalg::{Matrix, svd_of_product};
use peft_core::model::AdaptableModel;
use peft_core::target::{ModuleKind, TargetSpec, Targets};
use peft_core::{PeftError, Result};

use crate::{LoraLayer, LoraSlot};

/// How [`add_weighted_adapter`] combines adapters (peft's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// `"linear"`: weighted sums of the A and B matrices; all ranks must be equal.
    Linear,
    /// `"cat"`: concatenation; the new rank is the sum of the ranks.
    Cat,
    /// `"svd"`: truncated SVD of the weighted delta, to `rank` (default: the largest
    /// rank of the combined adapters).
    Svd {
        /// The new rank (peft's `svd_rank`).
        rank: Option<usize>,
    },
}

/// Adds adapter `new_name`, the combination of `adapters` with `weights` (negative
/// weights subtract), on every linear layer that holds at least one of them, and returns
/// the config to save it with ([`crate::save_adapter`]): `r` the new rank, `lora_alpha = r`,
/// `target_modules` the adapted layers (by name when that selects exactly them).
/// With one adapter, `linear` is used whatever `combination` says (as in peft).
///
/// Only plain LoRA on linear layers combines: DoRA and `lora_bias` adapters, and adapters on
/// embeddings, are refused.
///
/// # Errors
/// Unknown adapter names, a taken `new_name`, `weights` of the wrong length, unequal ranks
/// with `linear`, DoRA or `lora_bias` sources.
pub fn add_weighted_adapter<B, M, W>(
    model: &mut M,
    adapters: &[&str],
    weights: &[f64],
    new_name: &str,
    combination: Combination,
) -> Result<LoraFields>
where
    B: Backend,
    W: LinearWeight<B>,
    M: AdaptableModel<B, Weight = W, Linear = LoraSlot<B>>,
{
    if adapters.is_empty() || adapters.len() != weights.len() {
        return Err(PeftError::Adapter(format!(
            "add_weighted_adapter needs one weight per adapter, got {} adapters and {} weights",
            adapters.len(),
            weights.len()
        )));
    }
    // The largest rank of each source over the layers (peft: max of r and rank_pattern).
    let mut ranks = vec![0usize; adapters.len()];
    let mut problem = None;
    let mut taken = false;
    model.visit_linears(&mut |path, layer| {
        taken |= layer.adapter.get(new_name).is_some();
        for (i, name) in adapters.iter().enumerate() {
            if let Some(l) = layer.adapter.get(name) {
                ranks[i] = ranks[i].max(l.rank());
                if l.magnitude.is_some() || l.lora_b_bias.is_some() {
                    problem.get_or_insert(format!(
                        "adapter `{name}` at `{path}` uses DoRA or lora_bias; only plain LoRA \
                         adapters can be combined"
                    ));
                }
            }
        }
    });
    if taken {
        return Err(PeftError::Adapter(format!(
            "an adapter named `{new_name}` already exists; delete it first or pick another name"
        )));
    }
    if let Some(p) = problem {
        return Err(PeftError::Unsupported(p));
    }
    if let Some(i) = ranks.iter().position(|&r| r == 0) {
        return Err(PeftError::Adapter(format!(
            "no linear layer holds an adapter named `{}`",
            adapters[i]
        )));
    }
    let combination = if adapters.len() == 1 {
        Combination::Linear
    } else {
        combination
    };
    let new_rank = match combination {
        Combination::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(PeftError::Unsupported(format!(
                    "combination \"linear\" needs adapters of equal rank, found ranks {ranks:?}; \
                     use \"cat\" or \"svd\""
                )));
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd { rank } => {
            rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1))
        }
    };
    if new_rank == 0 {
        return Err(PeftError::Adapter(
            "the combined rank must be positive".into(),
        ));
    }
    let mut adapted = Vec::new();
    model.map_linears(&mut |path, layer| {
        let sources: Vec<(&LoraLayer<B>, f64)> = adapters
            .iter()
            .zip(weights)
            .filter_map(|(n, &w)| layer.adapter.get(n).map(|l| (l, w)))
            .collect();
        let Some((first, _)) = sources.first() else {
            return Ok(());
        };
        let device = first.lora_a.val().device();
        let (inp, out) = (layer.base.in_features(), layer.base.out_features());
        let (a, b) = match combination {
            Combination::Linear => linear(&sources),
            Combination::Cat => cat(&sources, new_rank, inp, out, &device),
            Combination::Svd { .. } => svd_combine(&sources, new_rank, &device)?,
        };
        let lora = LoraLayer {
            lora_a: Param::from_tensor(a.detach()),
            lora_b: Param::from_tensor(b.detach()),
            magnitude: None,
            lora_b_bias: None,
            dropout: DropoutConfig::new(first.dropout.prob).init(),
            scaling: 1.0,
            merged_norm: None,
        };
        layer.adapter.insert(new_name, lora)?;
        adapted.push(path.to_string());
        Ok(())
    })?;
    Ok(LoraFields {
        r: new_rank,
        lora_alpha: new_rank as f64,
        target_modules: Some(targets_for(&model.modules(), &adapted)?),
        ..LoraFields::default()
    })
}

/// peft's `linear`: square roots of the weighted scales on both sides, the sign on A.
fn linear<B: Backend>(sources: &[(&LoraLayer<B>, f64)]) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let mut a: Option<Tensor<B, 2>> = None;
    let mut b: Option<Tensor<B, 2>> = None;
    for (l, w) in sources {
        let ws = w * l.scaling;
        let root = ws.abs().sqrt();
        let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
        let ta = l.lora_a.val() * (sign * root);
        let tb = l.lora_b.val() * root;
        a = Some(match a {
            Some(x) => x + ta,
            None => ta,
        });
        b = Some(match b {
            Some(x) => x + tb,
            None => tb,
        });
    }
    // `sources` is never empty here.
    match (a, b) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("linear combination of no adapter"),
    }
}

/// peft's `cat`: the present adapters side by side from rank 0, zero-padded to `rank`.
fn cat<B: Backend>(
    sources: &[(&LoraLayer<B>, f64)],
    rank: usize,
    inp: usize,
    out: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let mut a_parts: Vec<Tensor<B, 2>> = sources
        .iter()
        .map(|(l, w)| l.lora_a.val() * (w * l.scaling))
        .collect();
    let mut b_parts: Vec<Tensor<B, 2>> = sources.iter().map(|(l, _)| l.lora_b.val()).collect();
    let used: usize = sources.iter().map(|(l, _)| l.rank()).sum();
    if used < rank {
        a_parts.push(Tensor::zeros([inp, rank - used], device));
        b_parts.push(Tensor::zeros([rank - used, out], device));
    }
    (Tensor::cat(a_parts, 1), Tensor::cat(b_parts, 0))
}

/// peft's `svd`: the best rank-`rank` approximation of `sum_i w_i s_i B_i A_i`.
fn svd_combine<B: Backend>(
    sources: &[(&LoraLayer<B>, f64)],
    rank: usize,
    device: &B::Device,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    // delta = [w_1 s_1 B_1, ...] [A_1; ...]: [out, R] x [R, in].
    let bc = Tensor::cat(
        sources
            .iter()
            .map(|(l, w)| l.lora_b.val().transpose() * (w * l.scaling))
            .collect(),
        1,
    );
    let ac = Tensor::cat(
        sources
            .iter()
            .map(|(l, _)| l.lora_a.val().transpose())
            .collect(),
        0,
    );
    let bc = Matrix::from_tensor_data(&bc.into_data())?;
    let ac = Matrix::from_tensor_data(&ac.into_data())?;
    let (out, inp) = (bc.rows, ac.cols);
    let d = svd_of_product(&bc, &ac).truncate(rank);
    let mut a = Matrix::zeros(rank, inp); // V_r^T
    let mut b = Matrix::zeros(out, rank); // U_r S_r
    for (k, &s) in d.s.iter().enumerate() {
        for j in 0..inp {
            a.set(k, j, d.vt.get(k, j));
        }
        for i in 0..out {
            b.set(i, k, d.u.get(i, k) * s);
        }
    }
    Ok((
        Tensor::from_data(a.transpose().to_tensor_data(), device),
        Tensor::from_data(b.transpose().to_tensor_data(), device),
    ))
}

/// `target_modules` for a set of adapted paths: their last names when those select
/// exactly these paths, else the paths themselves.
fn targets_for(modules: &[peft_core::target::ModuleInfo], adapted: &[String]) -> Result<Targets> {
    let mut names: Vec<String> = Vec::new();
    for p in adapted {
        let leaf = p.rsplit('.').next().unwrap_or(p).to_string();
        if !names.contains(&leaf) {
            names.push(leaf);
        }
    }
    let by_name = Targets::List(names);
    let spec = TargetSpec {
        target_modules: Some(by_name.clone()),
        ..TargetSpec::default()
    };
    let linears: Vec<_> = modules
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Linear | ModuleKind::OutputHead))
        .cloned()
        .collect();
    let mut selected = spec.compile()?.select(&linears).unwrap_or_default();
    let mut want = adapted.to_vec();
    selected.sort();
    want.sort();
    Ok(if selected == want {
        by_name
    } else {
        Targets::List(adapted.to_vec())
    })
}
