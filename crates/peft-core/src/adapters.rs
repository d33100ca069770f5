//! Named adapters: several adapters of one method at one point, switched, disabled,
//! merged, unmerged and deleted by name.
//!
//! [`AdapterSet`] holds the adapters of one method at one injection point, each under a
//! name (`"default"`, `"task_a"`, ...), with the set of active names, the merged names and a
//! "disabled" switch. [`AdaptedLinear`] is a linear layer: a frozen [`LinearWeight`] and an
//! adapter slot. With adapters disabled, its output is the base layer's, bit for bit.

use std::marker::PhantomData;

use burn::module::Module;
use burn::prelude::*;

use crate::error::{PeftError, Result};
use crate::inject::{
    EmbeddingAdapter, KvAdapter, LinearAdapter, LinearWeight, NoAdapter, SublayerAdapter,
};

/// Name-based control of the adapters held at one point. Implemented by [`AdapterSet`],
/// [`NoAdapter`] (which holds none) and pairs (which hold the names of both sides).
pub trait AdapterControl {
    /// The names of the adapters held here, in insertion order.
    fn adapter_names(&self) -> Vec<String>;
    /// The names that are active.
    fn active_adapters(&self) -> Vec<String>;
    /// Makes exactly the given names active, among those held here; names not held here
    /// are ignored (they may belong to another point or method).
    fn set_active(&mut self, names: &[String]);
    /// Disables (or re-enables) every adapter here; disabled, the point is the identity.
    fn set_disabled(&mut self, disabled: bool);
    /// Whether adapters here are disabled.
    fn is_disabled(&self) -> bool;
    /// Removes the adapter of that name; returns whether it was held here.
    fn remove(&mut self, name: &str) -> bool;
    /// The names merged into the base weight.
    fn merged_adapters(&self) -> Vec<String>;
}

/// Merging control for the adapter slot of a linear layer.
pub trait LinearAdapterControl<B: Backend>: LinearAdapter<B> + AdapterControl {
    /// Folds the named adapters (all active ones when `None`) into `weight` / `bias` and
    /// marks them merged. With `safe`, refuses a result holding NaN or infinity.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] where a method cannot merge; [`PeftError::Adapter`] for a
    /// non-finite result under `safe`.
    fn merge_adapters(
        &mut self,
        names: Option<&[String]>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        safe: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)>;

    /// Takes every merged adapter back out of `weight` / `bias`, newest first.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] where a method cannot unmerge.
    fn unmerge_adapters(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)>;
}

impl AdapterControl for NoAdapter {
    fn adapter_names(&self) -> Vec<String> {
        vec![]
    }
    fn active_adapters(&self) -> Vec<String> {
        vec![]
    }
    fn set_active(&mut self, _names: &[String]) {}
    fn set_disabled(&mut self, _disabled: bool) {}
    fn is_disabled(&self) -> bool {
        false
    }
    fn remove(&mut self, _name: &str) -> bool {
        false
    }
    fn merged_adapters(&self) -> Vec<String> {
        vec![]
    }
}

impl<B: Backend> LinearAdapterControl<B> for NoAdapter {
    fn merge_adapters(
        &mut self,
        _names: Option<&[String]>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        _safe: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight, bias))
    }

    fn unmerge_adapters(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight, bias))
    }
}

/// The named adapters of one method at one point.
///
/// The adapters' parameters live in `slots` (so their module paths are
/// `...<point>.slots.<index>.<param>`); names, activity and merge state are runtime state.
#[derive(Module, Debug)]
pub struct AdapterSet<B: Backend, A> {
    /// The adapters, in insertion order.
    pub slots: Vec<A>,
    #[module(skip)]
    names: Vec<String>,
    #[module(skip)]
    active: Vec<String>,
    #[module(skip)]
    merged: Vec<String>,
    #[module(skip)]
    disabled: bool,
    backend: PhantomData<B>,
}

impl<B: Backend, A> Default for AdapterSet<B, A> {
    fn default() -> Self {
        Self {
            slots: vec![],
            names: vec![],
            active: vec![],
            merged: vec![],
            disabled: false,
            backend: PhantomData,
        }
    }
}

impl<B: Backend, M> AdapterSet<B, M> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an adapter under a new name. The first adapter added becomes active; later ones
    /// are inactive until [`AdapterControl::set_active`] names them (as in peft).
    ///
    /// # Errors
    /// [`PeftError::Adapter`] if the name is taken or empty.
    pub fn insert(&mut self, name: &str, adapter: M) -> Result<()> {
        validate_adapter_name(name)?;
        if self.names.iter().any(|n| n == name) {
            return Err(PeftError::Adapter(format!(
                "an adapter named `{name}` already exists here; delete it first or pick another name"
            )));
        }
        self.slots.push(adapter);
        self.names.push(name.to_string());
        if self.active.is_empty() {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// The adapter of that name.
    pub fn get(&self, name: &str) -> Option<&M> {
        self.index(name).map(|i| &self.slots[i])
    }

    /// The adapter of that name, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut M> {
        self.index(name).map(|i| &mut self.slots[i])
    }

    /// Pairs of (name, adapter).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &M)> {
        self.names.iter().map(String::as_str).zip(self.slots.iter())
    }

    /// Active adapters that are not merged, in insertion order: those the forward pass
    /// applies on top of the base weight.
    pub fn applied(&self) -> impl Iterator<Item = &M> {
        self.iter()
            .filter(|(n, _)| !self.disabled && self.is_active(n) && !self.is_merged(n))
            .map(|(_, m)| m)
    }

    /// Whether an adapter is active.
    pub fn is_active(&self, name: &str) -> bool {
        self.active.iter().any(|n| n == name)
    }

    /// Whether an adapter is merged into the base weight.
    pub fn is_merged(&self, name: &str) -> bool {
        self.merged.iter().any(|n| n == name)
    }

    /// Number of adapters held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no adapter is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// Adapter names become module-path segments and file-name parts: they must be non-empty
/// and made of letters, digits, `_` and `-`.
///
/// # Errors
/// [`PeftError::Adapter`] for an invalid name.
pub fn validate_adapter_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(PeftError::Adapter(format!(
            "invalid adapter name {name:?}: use letters, digits, `_` or `-`"
        )));
    }
    Ok(())
}

impl<B: Backend, M> AdapterControl for AdapterSet<B, M> {
    fn adapter_names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn active_adapters(&self) -> Vec<String> {
        self.active.clone()
    }
    fn set_active(&mut self, names: &[String]) {
        self.active = self
            .names
            .iter()
            .filter(|n| names.contains(n))
            .cloned()
            .collect();
    }
    fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }
    fn is_disabled(&self) -> bool {
        self.disabled
    }
    fn remove(&mut self, name: &str) -> bool {
        let Some(i) = self.index(name) else {
            return false;
        };
        self.slots.remove(i);
        self.names.remove(i);
        self.active.retain(|n| n != name);
        self.merged.retain(|n| n != name);
        true
    }
    fn merged_adapters(&self) -> Vec<String> {
        self.merged.clone()
    }
}

fn check_finite<B: Backend>(name: &str, w: &Tensor<B, 2>, b: Option<&Tensor<B, 1>>) -> Result<()> {
    let bad_w = !w.clone().is_finite().all().into_scalar().to_bool();
    let bad_b = b.is_some_and(|b| !b.clone().is_finite().all().into_scalar().to_bool());
    if bad_w || bad_b {
        return Err(PeftError::Adapter(format!(
            "merging adapter `{name}` would produce NaN or infinite weights; the merge was refused \
             and the layer left as it was. The adapter is probably broken (diverged training?)"
        )));
    }
    Ok(())
}

impl<B: Backend, M: LinearAdapter<B>> LinearAdapter<B> for AdapterSet<B, M> {
    fn adapt_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.applied().fold(x, |x, m| m.adapt_input(x))
    }

    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        self.applied()
            .fold(output, |y, m| m.adapt_output(input, base, y))
    }
}

impl<B: Backend, M: LinearAdapter<B>> LinearAdapterControl<B> for AdapterSet<B, M> {
    fn merge_adapters(
        &mut self,
        names: Option<&[String]>,
        mut weight: Tensor<B, 2>,
        mut bias: Option<Tensor<B, 1>>,
        safe: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let wanted: Vec<String> = match names {
            Some(n) => self
                .names
                .iter()
                .filter(|x| n.contains(x))
                .cloned()
                .collect(),
            None => self.active.clone(),
        };
        for name in wanted {
            if self.is_merged(&name) {
                tracing::warn!("adapter `{name}` is already merged; skipping it");
                continue;
            }
            let Some(i) = self.index(&name) else { continue };
            let (w, b) = self.slots[i].merge(weight.clone(), bias.clone())?;
            if safe {
                check_finite(&name, &w, b.as_ref())?;
            }
            weight = w;
            bias = b;
            self.merged.push(name);
        }
        Ok((weight, bias))
    }

    fn unmerge_adapters(
        &mut self,
        mut weight: Tensor<B, 2>,
        mut bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        while let Some(name) = self.merged.last().cloned() {
            let Some(i) = self.index(&name) else {
                self.merged.pop();
                continue;
            };
            let (w, b) = self.slots[i].unmerge(weight, bias)?;
            weight = w;
            bias = b;
            self.merged.pop();
        }
        Ok((weight, bias))
    }
}

impl<B: Backend, M: SublayerAdapter<B>> SublayerAdapter<B> for AdapterSet<B, M> {
    fn forward(&self, input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3> {
        self.applied().fold(output, |y, m| m.forward(input, y))
    }
}

impl<B: Backend, M: EmbeddingAdapter<B>> EmbeddingAdapter<B> for AdapterSet<B, M> {
    fn adapt_lookup(&self, ids: &Tensor<B, 2, Int>, embeddings: Tensor<B, 3>) -> Tensor<B, 3> {
        self.applied()
            .fold(embeddings, |e, m| m.adapt_lookup(ids, e))
    }

    fn virtual_tokens(&self, batch: usize) -> Option<Tensor<B, 3>> {
        let parts: Vec<_> = self
            .applied()
            .filter_map(|m| m.virtual_tokens(batch))
            .collect();
        (!parts.is_empty()).then(|| Tensor::cat(parts, 1))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.applied()
            .map(EmbeddingAdapter::num_virtual_tokens)
            .sum()
    }
}

impl<B: Backend, M: KvAdapter<B>> KvAdapter<B> for AdapterSet<B, M> {
    fn prefix(&self, layer: usize, batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let (ks, vs): (Vec<_>, Vec<_>) = self
            .applied()
            .filter_map(|m| m.prefix(layer, batch))
            .unzip();
        (!ks.is_empty()).then(|| (Tensor::cat(ks, 2), Tensor::cat(vs, 2)))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.applied().map(KvAdapter::num_virtual_tokens).sum()
    }
}

impl<A: AdapterControl, C: AdapterControl> AdapterControl for (A, C) {
    fn adapter_names(&self) -> Vec<String> {
        let mut v = self.0.adapter_names();
        v.extend(self.1.adapter_names());
        v
    }
    fn active_adapters(&self) -> Vec<String> {
        let mut v = self.0.active_adapters();
        v.extend(self.1.active_adapters());
        v
    }
    fn set_active(&mut self, names: &[String]) {
        self.0.set_active(names);
        self.1.set_active(names);
    }
    fn set_disabled(&mut self, disabled: bool) {
        self.0.set_disabled(disabled);
        self.1.set_disabled(disabled);
    }
    fn is_disabled(&self) -> bool {
        self.0.is_disabled() && self.1.is_disabled()
    }
    fn remove(&mut self, name: &str) -> bool {
        let a = self.0.remove(name);
        let c = self.1.remove(name);
        a || c
    }
    fn merged_adapters(&self) -> Vec<String> {
        let mut v = self.0.merged_adapters();
        v.extend(self.1.merged_adapters());
        v
    }
}

impl<B: Backend, A: LinearAdapterControl<B>, C: LinearAdapterControl<B>> LinearAdapterControl<B>
    for (A, C)
{
    fn merge_adapters(
        &mut self,
        names: Option<&[String]>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        safe: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let (w, b) = self.0.merge_adapters(names, weight, bias, safe)?;
        self.1.merge_adapters(names, w, b, safe)
    }

    fn unmerge_adapters(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let (w, b) = self.1.unmerge_adapters(weight, bias)?;
        self.0.unmerge_adapters(w, b)
    }
}

/// A linear layer with an adapter slot: `adapter.adapt_output(x, base, base(adapter.adapt_input(x)))`.
///
/// Its module path is the Hugging Face path of the layer (`model.layers.0.self_attn.q_proj`);
/// the frozen weight sits under `base`, the adapters under `adapter`.
#[derive(Module, Debug)]
pub struct AdaptedLinear<B: Backend, W, A> {
    /// The frozen weight storage.
    pub base: W,
    /// The adapter slot.
    pub adapter: A,
    /// Ties the layer to its backend.
    pub backend: PhantomData<B>,
}

impl<B: Backend, W: LinearWeight<B>, A: Default> AdaptedLinear<B, W, A> {
    /// A layer with no adapter yet.
    pub fn new(base: W) -> Self {
        Self {
            base,
            adapter: A::default(),
            backend: PhantomData,
        }
    }
}

impl<B: Backend, W: LinearWeight<B>, A: LinearAdapterControl<B>> AdaptedLinear<B, W, A> {
    /// The layer's output. With adapters disabled (or none active) this is exactly the
    /// base layer's output.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.adapter.is_disabled() {
            return self.base.forward(x);
        }
        let y = self.base.forward(self.adapter.adapt_input(x.clone()));
        self.adapter.adapt_output(&x, &self.base, y)
    }

    /// Merges the named adapters (all active ones when `None`) into the base weight.
    ///
    /// # Errors
    /// As [`LinearAdapterControl::merge_adapters`]; the layer is unchanged on error.
    pub fn merge(&mut self, names: Option<&[String]>, safe: bool) -> Result<()> {
        let mut adapter = self.adapter.clone();
        let (w, b) = adapter.merge_adapters(names, self.base.weight(), self.base.bias(), safe)?;
        self.base.set_weight(w, b)?;
        self.adapter = adapter;
        Ok(())
    }

    /// Takes every merged adapter back out of the base weight.
    ///
    /// # Errors
    /// As [`LinearAdapterControl::unmerge_adapters`]; the layer is unchanged on error.
    pub fn unmerge(&mut self) -> Result<()> {
        let mut adapter = self.adapter.clone();
        let (w, b) = adapter.unmerge_adapters(self.base.weight(), self.base.bias())?;
        self.base.set_weight(w, b)?;
        self.adapter = adapter;
        Ok(())
    }
}
