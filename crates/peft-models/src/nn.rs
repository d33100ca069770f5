//! Building blocks shared by the architectures: norms with Hugging Face parameter names,
//! rotary embeddings, attention masks and the attention core.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, TensorData};

use crate::error::Result;
use crate::weights::WeightSource;

/// RMSNorm as transformers computes it: `weight * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale, `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Loads `{prefix}.weight`.
    ///
    /// # Errors
    /// As [`WeightSource::take`].
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self> {
        let w = src.take(&format!("{prefix}.weight"), &[d])?;
        Ok(Self {
            weight: Param::from_data(w, device),
            eps,
        })
    }

    /// Normalises over the last dimension. On the CPU backend (`Flex`, `Autodiff<Flex>`,
    /// f32, feature `flex`) one parallel pass forward and one backward, one graph node under
    /// autodiff; burn operations elsewhere.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(y) = fused_rms_norm(&x, &self.weight.val(), self.eps) {
            return y;
        }
        let var = x.clone().powi_scalar(2).mean_dim(D - 1);
        let x = x * (var + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze::<D>()
    }
}

/// [`RmsNorm`]'s computation as one fused operation, where the backend has one: on the CPU
/// backend (`Flex`, `Autodiff<Flex>`, f32, feature `flex`) a parallel pass over the rows
/// and, under autodiff, one node that keeps `x` and the row factors. `None` on other
/// backends; [`RmsNorm::forward`] takes this path whenever it applies.
pub fn fused_rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "flex")]
    {
        crate::flex::rms_norm::try_rms_norm(x, weight, eps)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, weight, eps);
        None
    }
}

/// LayerNorm as transformers computes it (biased variance), with `weight` and `bias`.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale, `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift, `[d]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    ///
    /// # Errors
    /// As [`WeightSource::take`].
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self> {
        let w = src.take(&format!("{prefix}.weight"), &[d])?;
        let b = src.take(&format!("{prefix}.bias"), &[d])?;
        Ok(Self {
            weight: Param::from_data(w, device),
            bias: Param::from_data(b, device),
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(D - 1);
        let x = centered * (var + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze::<D>() + self.bias.val().unsqueeze::<D>()
    }
}

/// Cosine and sine tables for rotary embeddings at the given absolute positions
/// (transformers' layout: the two halves of the head share frequencies), repeated for each
/// of `heads` heads: `[seq, heads, head_dim]`, the layout of activations
/// `[batch, seq, heads, head_dim]` straight out of a projection, so that
/// [`apply_rope_bshd`] broadcasts the tables over the batch only (a contiguous row per
/// example, which CPU backends vectorise) rather than over heads and batch.
pub fn rope_tables_for_heads<B: Backend>(
    inv_freq: &[f64],
    positions: std::ops::Range<usize>,
    heads: usize,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let half = inv_freq.len();
    let n = positions.len();
    let mut cos = Vec::with_capacity(n * heads * half * 2);
    let mut sin = Vec::with_capacity(n * heads * half * 2);
    for p in positions {
        // transformers computes the angles in f32; so do we, then take cos/sin accurately.
        let angles: Vec<f32> = inv_freq.iter().map(|f| (*f as f32) * (p as f32)).collect();
        let c: Vec<f32> = angles.iter().map(|a| f64::from(*a).cos() as f32).collect();
        let s: Vec<f32> = angles.iter().map(|a| f64::from(*a).sin() as f32).collect();
        for _ in 0..heads * 2 {
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, heads, half * 2]), device),
        Tensor::from_data(TensorData::new(sin, [n, heads, half * 2]), device),
    )
}

/// Applies rotary embeddings to `x: [batch, seq, heads, head_dim]` with the tables of
/// [`rope_tables_for_heads`]: `x * cos + rotate_half(x) * sin`. On the CPU backend
/// (`Flex`, `Autodiff<Flex>`, f32, feature `flex`) one parallel pass each way, one graph
/// node under autodiff; burn operations elsewhere.
pub fn apply_rope_bshd<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Tensor<B, 4> {
    if let Some(y) = fused_rope(&x, cos, sin) {
        return y;
    }
    let [b, s, h, d] = x.dims();
    let n = s * h * d;
    let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3).reshape([b, n]);
    // As rows `[batch, seq * heads * head_dim]` times one shared row: the broadcast a CPU
    // backend runs as a vectorised loop (a 4-D broadcast walks element by element).
    let (cos, sin) = (cos.clone().reshape([1, n]), sin.clone().reshape([1, n]));
    (x.reshape([b, n]) * cos + rotated * sin).reshape([b, s, h, d])
}

/// [`apply_rope_bshd`] as one fused operation, where the backend has one: on the CPU
/// backend (`Flex`, `Autodiff<Flex>`, f32, feature `flex`) one parallel pass each way and
/// one node under autodiff. `None` on other backends; [`apply_rope_bshd`] takes this path
/// whenever it applies.
pub fn fused_rope<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "flex")]
    {
        crate::flex::rope::try_rope(x, cos, sin)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, cos, sin);
        None
    }
}

/// Which key positions each query may attend to, `[batch, 1, queries, keys]` (true =
/// masked out). Keys are `prefix` always-visible positions followed by `past + queries`
/// positions; query `i` sees keys up to its own position (causal) and, with a padding
/// mask `[batch, past + queries]` (1 = real token), only real tokens.
pub fn attention_mask<B: Backend>(
    batch: usize,
    queries: usize,
    past: usize,
    prefix: usize,
    causal: bool,
    padding: Option<&[Vec<bool>]>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let keys = prefix + past + queries;
    let mut m = vec![false; batch * queries * keys];
    for b in 0..batch {
        for i in 0..queries {
            for j in prefix..keys {
                let kp = j - prefix;
                let future = causal && kp > past + i;
                let pad = padding.is_some_and(|p| !p[b].get(kp).copied().unwrap_or(true));
                m[(b * queries + i) * keys + j] = future || pad;
            }
        }
    }
    Tensor::<B, 3, Bool>::from_data(TensorData::new(m, [batch, queries, keys]), device)
        .unsqueeze_dim(1)
}

/// `silu(gate) * up`, the gated unit of Llama-family MLPs (SwiGLU). On the CPU backend
/// (`Flex`, `Autodiff<Flex>`, f32, feature `flex`) one parallel pass forward and one
/// backward, one graph node under autodiff; burn operations elsewhere.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(y) = crate::flex::swiglu::try_swiglu(&gate, &up) {
        return y;
    }
    silu(gate) * up
}

/// `sum_i -log softmax(z_i)[t_i]` for logits `z` `[n, vocab]` and targets `t` `[n, 1]` as
/// one fused operation, where the backend has one: on the CPU backend (`Flex`,
/// `Autodiff<Flex>`, f32, feature `flex`) one parallel pass per row, and under autodiff one
/// node that keeps only `softmax(z) - onehot(t)`, written over the logits' buffer when `z`
/// holds it alone.
///
/// # Errors
/// `z` back, unchanged, on other backends and for a target outside the vocabulary.
pub fn fused_cross_entropy_sum<B: Backend>(
    z: Tensor<B, 2>,
    targets: &Tensor<B, 2, Int>,
) -> std::result::Result<Tensor<B, 1>, Tensor<B, 2>> {
    #[cfg(feature = "flex")]
    {
        crate::flex::cross_entropy::try_cross_entropy_sum(z, targets)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = targets;
        Err(z)
    }
}

/// [`attention`] as one fused operation, where the backend has one: on the CPU backend
/// (`Flex` and `Autodiff<Flex>`, f32 tensors, feature `flex`) each (batch, key/value head)
/// pair is a task on rayon's pool and, under autodiff, the whole attention is one graph node
/// with its own backward pass. `None` on other backends; [`attention`] takes this path
/// whenever it applies.
pub fn fused_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "flex")]
    {
        crate::flex::attention::try_attention(q, k, v, mask, scale)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, k, v, mask, scale);
        None
    }
}

/// `softmax(q k^T * scale + mask) v` with grouped-query attention: `q: [b, h, s, d]`,
/// `k, v: [b, kv_heads, t, d]` where `h` is a multiple of `kv_heads`.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    if let Some(o) = fused_attention(&q, &k, &v, mask, scale) {
        return o;
    }
    let [b, h, _, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let (k, v) = if kvh == h {
        (k, v)
    } else {
        let rep = h / kvh;
        let expand = |x: Tensor<B, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kvh, rep, t, d])
                .reshape([b, h, t, d])
        };
        (expand(k), expand(v))
    };
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask.clone(), f32::MIN);
    }
    softmax(scores, 3).matmul(v)
}

/// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
    x * (inner.tanh() + 1.0) * 0.5
}
