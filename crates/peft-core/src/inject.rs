//! The injection points: small traits through which a PEFT method changes a model.
//!
//! A decoder block offers a few places where a method can act. Each is one trait here;
//! the architectures in `peft-models` expose every one of them, and each method crate (or a
//! user's own crate) implements the traits for its method:
//!
//! | point | trait | methods |
//! |---|---|---|
//! | a linear layer's output, `y = W x + delta(x)` | [`LinearAdapter`] | LoRA, rsLoRA, DoRA, (IA)^3 |
//! | a linear layer's frozen weight storage | [`LinearWeight`] | dense f32, NF4/FP4 (QLoRA) |
//! | after a sublayer (attention or MLP) | [`SublayerAdapter`] | bottleneck adapters |
//! | the input embeddings | [`EmbeddingAdapter`] | prompt tuning, P-tuning, LoRA on embeddings |
//! | attention keys and values | [`KvAdapter`] | prefix tuning |
//! | which parameters train | [`crate::trainable::TrainablePolicy`] | BitFit, `modules_to_save`, full |
//! | the head | [`Head`] | value heads, classification heads |
//!
//! A model is generic over the module type at each point ([`PeftSlots`] names a set of
//! them); [`NoAdapter`] makes the plain model;
//! [`crate::adapters::AdapterSet`] holds several *named* adapters of one method at a point,
//! and a tuple `(X, Y)` composes two methods at the same point (LoRA plus (IA)^3, say), each
//! with its own names.

use burn::module::{Module, ModuleDisplay};
use burn::prelude::*;

use crate::error::{PeftError, Result};

/// The frozen weight storage of a linear layer: dense f32, or 4-bit with statistics.
///
/// Weights are exchanged in the Hugging Face layout `[out, in]`; storage may keep any
/// layout internally (burn's `Linear` keeps `[in, out]`).
pub trait LinearWeight<B: Backend>: Module<B> + ModuleDisplay {
    /// Builds the storage from a dense weight in the Hugging Face layout `[out, in]` and
    /// an optional bias (as a checkpoint loader does). Quantized storage quantizes here.
    fn from_dense(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self
    where
        Self: Sized;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// `y = x W^T + b` over the last dimension of `x`.
    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
    /// The weight, dequantized, in the Hugging Face layout `[out, in]`.
    fn weight(&self) -> Tensor<B, 2>;
    /// The bias, if the layer has one.
    fn bias(&self) -> Option<Tensor<B, 1>>;
    /// Replaces the weight (`[out, in]`) and bias, as merging does. The new values are
    /// detached from any autodiff graph and keep the old parameters' ids and trainability.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] for storage that cannot be rewritten (for example a
    /// quantized weight that must first be dequantized).
    fn set_weight(&mut self, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Result<()>;
}

/// What a PEFT method does at a linear layer.
///
/// The layer computes `adapt_output(x, base, base.forward(adapt_input(x)))`. LoRA adds
/// `scale * B(A(x))` in [`adapt_output`](Self::adapt_output); (IA)^3 multiplies the output
/// by a vector, or (on feed-forward layers) the input in [`adapt_input`](Self::adapt_input).
pub trait LinearAdapter<B: Backend>: Module<B> + ModuleDisplay {
    /// Transforms the layer's input before the base weight sees it. Default: identity.
    fn adapt_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x
    }

    /// Transforms the base output. `input` is the layer's input as the caller gave it.
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D>;

    /// The weight and bias with this adapter folded in (`[out, in]`).
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] where the method cannot be merged (the default).
    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let _ = (weight, bias);
        Err(PeftError::Unsupported(
            "this adapter cannot be merged into the weight".into(),
        ))
    }

    /// The inverse of [`merge`](Self::merge).
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] where the method cannot be unmerged (the default).
    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let _ = (weight, bias);
        Err(PeftError::Unsupported(
            "this adapter cannot be unmerged from the weight".into(),
        ))
    }
}

/// What a method does after a sublayer (attention or MLP), before the residual addition.
///
/// `input` is the sublayer's input, `output` its output; a sequential bottleneck adapter
/// returns `output + up(act(down(output)))`, a parallel one `output + s * up(act(down(input)))`.
pub trait SublayerAdapter<B: Backend>: Module<B> + ModuleDisplay {
    /// The adapted sublayer output.
    fn forward(&self, input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// What a method does to the input embeddings.
pub trait EmbeddingAdapter<B: Backend>: Module<B> + ModuleDisplay {
    /// Adjusts looked-up embeddings `[batch, seq, d]` given the token ids (LoRA on
    /// embeddings). Default: identity.
    fn adapt_lookup(&self, ids: &Tensor<B, 2, Int>, embeddings: Tensor<B, 3>) -> Tensor<B, 3> {
        let _ = ids;
        embeddings
    }

    /// Virtual-token embeddings `[batch, n, d]` to prepend to the sequence (prompt tuning,
    /// P-tuning). Default: none.
    fn virtual_tokens(&self, batch: usize) -> Option<Tensor<B, 3>> {
        let _ = batch;
        None
    }

    /// The number of virtual tokens [`virtual_tokens`](Self::virtual_tokens) prepends.
    fn num_virtual_tokens(&self) -> usize {
        0
    }
}

/// What a method adds to the attention keys and values (prefix tuning).
pub trait KvAdapter<B: Backend>: Module<B> + ModuleDisplay {
    /// Key and value prefixes for decoder layer `layer`, each
    /// `[batch, num_kv_heads, num_virtual_tokens, head_dim]`, or `None`.
    fn prefix(&self, layer: usize, batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)>;

    /// The number of virtual positions [`prefix`](Self::prefix) adds.
    fn num_virtual_tokens(&self) -> usize {
        0
    }
}

/// A head on the final hidden states: the LM head, a value head, a classifier.
pub trait Head<B: Backend>: Module<B> + ModuleDisplay {
    /// Maps hidden states `[batch, seq, d]` to outputs `[batch, seq, k]`.
    fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// A bundle naming the type used at each injection point, for writing model types briefly.
///
/// Architectures are generic over their slot *module* types (burn's derive needs that);
/// a bundle names all of them at once, as in `Llama<B, SlotLinear<B, P>, P::Sublayer, ...>`.
/// [`Plain`] is the unadapted model; a method crate defines its own bundle, and a user can
/// combine several (a pair `(X, Y)` at a point composes two methods).
pub trait PeftSlots<B: Backend>: Clone + Send + core::fmt::Debug + 'static {
    /// Frozen weight storage of every linear layer.
    type Weight: LinearWeight<B>;
    /// The adapter at every linear layer.
    type Linear: crate::adapters::LinearAdapterControl<B> + Default;
    /// The adapter after each sublayer.
    type Sublayer: SublayerAdapter<B> + crate::adapters::AdapterControl + Default;
    /// The adapter on the input embeddings.
    type Embedding: EmbeddingAdapter<B> + crate::adapters::AdapterControl + Default;
    /// The adapter on the attention keys and values.
    type KeyValue: KvAdapter<B> + crate::adapters::AdapterControl + Default;
}

/// An adapter that does nothing, at any point: the plain model's slot type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoAdapter;

impl core::fmt::Display for NoAdapter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("NoAdapter")
    }
}

use burn::empty;
empty!(NoAdapter);

impl<B: Backend> LinearAdapter<B> for NoAdapter {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        _input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        output
    }

    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight, bias))
    }

    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((weight, bias))
    }
}

impl<B: Backend> SublayerAdapter<B> for NoAdapter {
    fn forward(&self, _input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3> {
        output
    }
}

impl<B: Backend> EmbeddingAdapter<B> for NoAdapter {}

impl<B: Backend> KvAdapter<B> for NoAdapter {
    fn prefix(&self, _layer: usize, _batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        None
    }
}

/// The unadapted model: dense weights (burn's `Linear`) and no adapter anywhere.
#[derive(Clone, Debug, Default)]
pub struct Plain;

impl<B: Backend> PeftSlots<B> for Plain {
    type Weight = burn::nn::Linear<B>;
    type Linear = NoAdapter;
    type Sublayer = NoAdapter;
    type Embedding = NoAdapter;
    type KeyValue = NoAdapter;
}

/// Two methods at the same point: `A` acts first, then `C` (inputs are adapted by `A` then
/// `C`; outputs by `A` then `C`).
impl<B: Backend, A: LinearAdapter<B>, C: LinearAdapter<B>> LinearAdapter<B> for (A, C) {
    fn adapt_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.1.adapt_input(self.0.adapt_input(x))
    }

    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let out = self.0.adapt_output(input, base, output);
        self.1.adapt_output(input, base, out)
    }

    fn merge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let (w, b) = self.0.merge(weight, bias)?;
        self.1.merge(w, b)
    }

    fn unmerge(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let (w, b) = self.1.unmerge(weight, bias)?;
        self.0.unmerge(w, b)
    }
}

impl<B: Backend, A: SublayerAdapter<B>, C: SublayerAdapter<B>> SublayerAdapter<B> for (A, C) {
    fn forward(&self, input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3> {
        let out = self.0.forward(input, output);
        self.1.forward(input, out)
    }
}

impl<B: Backend, A: EmbeddingAdapter<B>, C: EmbeddingAdapter<B>> EmbeddingAdapter<B> for (A, C) {
    fn adapt_lookup(&self, ids: &Tensor<B, 2, Int>, embeddings: Tensor<B, 3>) -> Tensor<B, 3> {
        self.1
            .adapt_lookup(ids, self.0.adapt_lookup(ids, embeddings))
    }

    fn virtual_tokens(&self, batch: usize) -> Option<Tensor<B, 3>> {
        match (self.0.virtual_tokens(batch), self.1.virtual_tokens(batch)) {
            (Some(a), Some(c)) => Some(Tensor::cat(vec![a, c], 1)),
            (a, c) => a.or(c),
        }
    }

    fn num_virtual_tokens(&self) -> usize {
        self.0.num_virtual_tokens() + self.1.num_virtual_tokens()
    }
}

impl<B: Backend, A: KvAdapter<B>, C: KvAdapter<B>> KvAdapter<B> for (A, C) {
    fn prefix(&self, layer: usize, batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        match (self.0.prefix(layer, batch), self.1.prefix(layer, batch)) {
            (Some((ka, va)), Some((kc, vc))) => {
                Some((Tensor::cat(vec![ka, kc], 2), Tensor::cat(vec![va, vc], 2)))
            }
            (a, c) => a.or(c),
        }
    }

    fn num_virtual_tokens(&self) -> usize {
        self.0.num_virtual_tokens() + self.1.num_virtual_tokens()
    }
}

/// `t^T` laid out contiguously. A transposed view as a linear layer's weight made the CPU
/// matmul about 2x slower (width 2048, flex, `cargo xtask bench lora`), so weights are
/// copied into burn's `[in, out]` layout once, when they are stored.
fn contiguous_transpose<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 2> {
    let device = t.device();
    Tensor::from_data(t.transpose().into_data(), &device)
}

impl<B: Backend> LinearWeight<B> for burn::nn::Linear<B> {
    fn from_dense(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        burn::nn::Linear {
            weight: burn::module::Param::from_tensor(contiguous_transpose(weight)),
            bias: bias.map(burn::module::Param::from_tensor),
        }
    }

    fn in_features(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    fn out_features(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One 2-D product over all leading dimensions. burn's `linear` op broadcasts the
        // weight to the input's rank instead, and its backward pass then copies the
        // transposed weight into a new buffer on every call (a reshape of a transposed
        // view); a 2-D matmul's backward reads the transposed weight in place. Measured on
        // a LoRA training step of SmolLM2-135M (flex, 2 cores): see docs/benchmarks.md.
        let dims = x.dims();
        let inp = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let w = self.weight.val();
        let out = w.dims()[1];
        let y = crate::fused::linear(x.reshape([rows, inp]), w);
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        };
        let mut out_dims = dims;
        out_dims[D - 1] = out;
        y.reshape(out_dims)
    }

    fn weight(&self) -> Tensor<B, 2> {
        self.weight.val().transpose()
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(|b| b.val())
    }

    fn set_weight(&mut self, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Result<()> {
        let [out, inp] = weight.dims();
        if [inp, out] != self.weight.shape().dims::<2>() {
            return Err(PeftError::Unsupported(format!(
                "cannot set a [{out}, {inp}] weight on a linear layer of shape [out={}, in={}]",
                self.out_features(),
                self.in_features()
            )));
        }
        let rg = self.weight.is_require_grad();
        self.weight = burn::module::Param::initialized(
            self.weight.id,
            contiguous_transpose(weight.detach()).set_require_grad(rg),
        );
        match (&mut self.bias, bias) {
            (Some(old), Some(new)) => {
                let rg = old.is_require_grad();
                *old = burn::module::Param::initialized(old.id, new.detach().set_require_grad(rg));
            }
            (None, None) | (Some(_), None) => {}
            (None, Some(_)) => {
                return Err(PeftError::Unsupported(
                    "cannot add a bias to a linear layer that has none".into(),
                ));
            }
        }
        Ok(())
    }
}
