//! What a model implements so PEFT methods can find and change its layers, and the
//! model-wide adapter operations built on it.
//!
//! burn has no forward hooks and no module replacement, so architectures are written with
//! adapter slots and implement [`AdaptableModel`] to enumerate them by their Hugging Face
//! module paths. The free functions here (activate, disable, merge, unmerge, delete) work
//! on any such model, for any method.

use burn::prelude::*;

use crate::adapters::{AdaptedLinear, AdapterControl, LinearAdapterControl};
use crate::error::{PeftError, Result};
use crate::inject::{EmbeddingAdapter, KvAdapter, LinearWeight, PeftSlots, SublayerAdapter};
use crate::target::ModuleInfo;

/// The linear-layer type of a model with slot bundle `P`.
pub type SlotLinear<B, P> =
    AdaptedLinear<B, <P as PeftSlots<B>>::Weight, <P as PeftSlots<B>>::Linear>;

/// The linear-layer type of a model `M`.
pub type ModelLinear<B, M> =
    AdaptedLinear<B, <M as AdaptableModel<B>>::Weight, <M as AdaptableModel<B>>::Linear>;

/// A model whose injection points PEFT methods can reach.
///
/// Architectures are generic over the *module* types of their slots (burn's derive maps
/// generic modules between backends, so the struct carries no trait bounds) and implement
/// this trait for the slot types that satisfy the injection-point traits. Paths are the
/// Hugging Face module paths (`model.layers.3.self_attn.q_proj`); for the non-linear
/// points, an architecture chooses stable paths ending in `_adapter` and documents them
/// (the Llama family uses `model.layers.N.attn_adapter` / `mlp_adapter`).
pub trait AdaptableModel<B: Backend> {
    /// Frozen weight storage of the linear layers.
    type Weight: LinearWeight<B>;
    /// The adapter slot of the linear layers.
    type Linear: LinearAdapterControl<B>;
    /// The adapter slot after each sublayer.
    type Sublayer: SublayerAdapter<B> + AdapterControl;
    /// The adapter slot on the input embeddings.
    type Embedding: EmbeddingAdapter<B> + AdapterControl;
    /// The adapter slot on the attention keys and values.
    type KeyValue: KvAdapter<B> + AdapterControl;

    /// Every module of the model with its kind, for target selection (including modules
    /// that cannot be adapted, so error messages can list what exists).
    fn modules(&self) -> Vec<ModuleInfo>;

    /// Visits every linear layer.
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &ModelLinear<B, Self>));

    /// Changes every linear layer in place; stops at the first error.
    ///
    /// # Errors
    /// Whatever `f` returns.
    #[allow(clippy::type_complexity)] // a plain callback; an alias would pin its lifetime
    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut ModelLinear<B, Self>) -> Result<()>,
    ) -> Result<()>;

    /// Changes every sublayer adapter slot in place. Default: the model has none.
    ///
    /// # Errors
    /// Whatever `f` returns.
    fn map_sublayers(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Sublayer) -> Result<()>,
    ) -> Result<()> {
        let _ = f;
        Ok(())
    }

    /// Changes the embedding adapter slot in place. Default: the model has none.
    ///
    /// # Errors
    /// Whatever `f` returns.
    fn map_embedding(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Self::Embedding) -> Result<()>,
    ) -> Result<()> {
        let _ = f;
        Ok(())
    }

    /// Changes the key/value adapter slot in place. Default: the model has none.
    ///
    /// # Errors
    /// Whatever `f` returns.
    fn map_kv(&mut self, f: &mut dyn FnMut(&str, &mut Self::KeyValue) -> Result<()>) -> Result<()> {
        let _ = f;
        Ok(())
    }
}

/// Applies `f` to the adapter slot at every injection point of the model.
fn for_each_slot<B, M>(model: &mut M, f: &mut dyn FnMut(&mut dyn AdapterControl)) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    model.map_linears(&mut |_, l| {
        f(&mut l.adapter);
        Ok(())
    })?;
    model.map_sublayers(&mut |_, s| {
        f(s);
        Ok(())
    })?;
    model.map_embedding(&mut |_, e| {
        f(e);
        Ok(())
    })?;
    model.map_kv(&mut |_, k| {
        f(k);
        Ok(())
    })
}

/// The names of every adapter in the model, in first-seen order.
pub fn adapter_names<B, M>(model: &mut M) -> Result<Vec<String>>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    let mut names: Vec<String> = Vec::new();
    for_each_slot::<B, M>(model, &mut |s| {
        for n in s.adapter_names() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    })?;
    Ok(names)
}

/// Makes exactly the named adapters active everywhere.
///
/// # Errors
/// [`PeftError::Adapter`] if a name is held nowhere in the model (listing those that are).
pub fn set_active_adapters<B, M>(model: &mut M, names: &[&str]) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    let known = adapter_names::<B, M>(model)?;
    for n in names {
        if !known.iter().any(|k| k == n) {
            return Err(unknown_adapter(n, &known));
        }
    }
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    for_each_slot::<B, M>(model, &mut |s| s.set_active(&names))
}

/// Disables (or re-enables) every adapter: disabled, the model computes exactly the base
/// model. Merged adapters are unmerged first, as peft does.
///
/// # Errors
/// Unmerging can fail for a method that cannot unmerge.
pub fn set_adapters_disabled<B, M>(model: &mut M, disabled: bool) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    if disabled {
        unmerge_adapters::<B, M>(model)?;
    }
    for_each_slot::<B, M>(model, &mut |s| s.set_disabled(disabled))
}

/// Deletes an adapter everywhere (unmerging the model first if it is merged).
///
/// # Errors
/// [`PeftError::Adapter`] if no layer holds it.
pub fn delete_adapter<B, M>(model: &mut M, name: &str) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    let known = adapter_names::<B, M>(model)?;
    if !known.iter().any(|k| k == name) {
        return Err(unknown_adapter(name, &known));
    }
    let mut merged = false;
    model
        .visit_linears(&mut |_, l| merged |= l.adapter.merged_adapters().iter().any(|m| m == name));
    if merged {
        unmerge_adapters::<B, M>(model)?;
    }
    for_each_slot::<B, M>(model, &mut |s| {
        s.remove(name);
    })
}

/// Merges the named adapters (all active ones when `None`) into every linear layer's base
/// weight. With `safe`, a layer whose merged weight would hold NaN or infinity stops the
/// merge with an error (layers merged before it stay merged and can be unmerged).
///
/// # Errors
/// As [`AdaptedLinear::merge`].
pub fn merge_adapters<B, M>(model: &mut M, names: Option<&[&str]>, safe: bool) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    let names: Option<Vec<String>> = names.map(|n| n.iter().map(|s| s.to_string()).collect());
    model.map_linears(&mut |path, l| {
        l.merge(names.as_deref(), safe).map_err(|e| match e {
            PeftError::Adapter(m) => PeftError::Adapter(format!("{path}: {m}")),
            other => other,
        })
    })
}

/// Folds the active adapters into the base weights for good and removes every adapter, as
/// peft's `merge_and_unload` does: afterwards the model computes what it computed with its
/// active adapters, and holds none. Unlike [`delete_adapter`], which takes a merged adapter
/// back out of the weights before removing it, this keeps the merged weights, so it cannot
/// be undone. It is how a new stage starts on top of adapters trained before: a new
/// adapter added afterwards, when disabled, gives the merged model, not the original base.
///
/// # Errors
/// [`PeftError::Unsupported`] when an adapter sits at a point that does not merge (after a
/// sublayer, on the embeddings, on the keys and values); the model is then unchanged.
/// Otherwise as [`merge_adapters`].
pub fn merge_and_unload<B, M>(model: &mut M, safe: bool) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    let mut unmergeable: Vec<String> = Vec::new();
    let mut note = |path: &str, names: Vec<String>| {
        for n in names {
            unmergeable.push(format!("`{n}` at {path}"));
        }
    };
    model.map_sublayers(&mut |p, s| {
        note(p, s.adapter_names());
        Ok(())
    })?;
    model.map_embedding(&mut |p, s| {
        note(p, s.adapter_names());
        Ok(())
    })?;
    model.map_kv(&mut |p, s| {
        note(p, s.adapter_names());
        Ok(())
    })?;
    if !unmergeable.is_empty() {
        return Err(PeftError::Unsupported(format!(
            "cannot fold these adapters into the weights, their method does not merge: {}",
            unmergeable.join(", ")
        )));
    }
    model.map_linears(&mut |path, l| {
        let merged = l.adapter.merged_adapters();
        let wanted: Vec<String> = l
            .adapter
            .active_adapters()
            .into_iter()
            .filter(|n| !merged.contains(n))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        l.merge(Some(&wanted), safe).map_err(|e| match e {
            PeftError::Adapter(m) => PeftError::Adapter(format!("{path}: {m}")),
            other => other,
        })
    })?;
    for name in adapter_names::<B, M>(model)? {
        for_each_slot::<B, M>(model, &mut |s| {
            s.remove(&name);
        })?;
    }
    Ok(())
}

/// Takes every merged adapter back out of every linear layer.
///
/// # Errors
/// As [`AdaptedLinear::unmerge`].
pub fn unmerge_adapters<B, M>(model: &mut M) -> Result<()>
where
    B: Backend,
    M: AdaptableModel<B>,
{
    model.map_linears(&mut |_, l| l.unmerge())
}

fn unknown_adapter(name: &str, known: &[String]) -> PeftError {
    PeftError::Adapter(format!(
        "no adapter named `{name}` in this model; it has: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}
