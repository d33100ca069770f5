//! Operations that CPU training runs as one fused step, with the plain burn operations as
//! the meaning and the fallback.
//!
//! - [`linear`]: `x W`, the product of every linear layer.
//! - [`low_rank_add`]: `y + s (x A) B`, the low-rank update of LoRA and its relatives.
//! - [`dropout`]: the dropout in front of LoRA's update, and [`low_rank_add_dropout`], the
//!   update with its dropout as one operation.
//! - [`adamw`]: one AdamW update of a parameter and its moments; [`sum_squares`] and
//!   [`scale`] for clipping gradients by their global norm.
//!
//! On the CPU backend (`Flex` and `Autodiff<Flex>`, f32, feature `flex`, on by default) each
//! is one pass of `gemm` calls over host memory and, under autodiff, one graph node with its
//! own backward pass. burn's matmul on Flex zero-fills each output, then copies it into a
//! buffer of stricter alignment, and a LoRA path written with burn operations adds a scale
//! and a sum over the whole output, each single-threaded and each a graph node; measured on
//! a LoRA training step of SmolLM2-135M, see docs/benchmarks.md. Every other backend runs
//! the burn operations. [`flex`] has the pieces for writing such operations.

#[cfg(feature = "flex")]
mod adamw;
#[cfg(feature = "flex")]
mod dropout;
#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "flex")]
mod linear;
#[cfg(feature = "flex")]
mod low_rank;
#[cfg(feature = "flex")]
mod rank;

use burn::prelude::*;

/// `x w` for `x: [rows, in]` and `w: [in, out]`. On the CPU backend, `w` is read through its
/// strides (a transposed view costs nothing) and, under autodiff, the node keeps only what
/// the gradients of the tracked inputs need (`w` for `dx = dy w^T`, `x` for
/// `dw = x^T dy`).
pub fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, w) = match flex::try_linear(x, w) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    x.matmul(w)
}

/// `y + scale (x a) b` for `y: [rows, out]`, `x: [rows, in]`, `a: [in, r]`, `b: [r, out]`:
/// LoRA's update added to the base layer's output. On the CPU backend the update is added
/// into `y`'s buffer when `y` holds it alone, and under autodiff the node keeps `x`, `a`, `b`
/// and the `[rows, r]` product `x a`, never a full-size intermediate.
pub fn low_rank_add<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (y, a, b) = match flex::try_low_rank_add(y, x, a, b, scale) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    y + x.clone().matmul(a).matmul(b) * scale
}

/// `y + scale (dropout(x) a) b`: [`low_rank_add`] with LoRA's dropout applied to its input
/// (`torch.nn.Dropout`'s, as [`dropout`] draws it). On the CPU backend under autodiff it is
/// one node that keeps `x` and the mask's seed, not the dropped copy of `x`: the base
/// layer's node holds `x` already, so the dropout adds no buffer of `x`'s size per layer.
/// The identity dropout (`prob` 0, or no autodiff) makes it [`low_rank_add`].
pub fn low_rank_add_dropout<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
    prob: f64,
) -> Tensor<B, 2> {
    if prob == 0.0 || !B::ad_enabled(&x.device()) {
        return low_rank_add(y, x, a, b, scale);
    }
    #[cfg(feature = "flex")]
    let (y, a, b) = match flex::try_low_rank_add_dropout(y, x, a, b, scale, prob) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    low_rank_add(y, &dropout(x.clone(), prob), a, b, scale)
}

/// Dropout as `torch.nn.Dropout` in training: each element is zeroed with probability
/// `prob` and the survivors are scaled by `1 / (1 - prob)`. Like burn's `Dropout`, it is the
/// identity when `prob` is 0 or the backend does not track gradients. On the CPU backend
/// under autodiff the mask is drawn by a counter-based generator seeded from the backend's
/// (so `B::seed` makes it repeatable) in one parallel pass, and the backward pass draws it
/// again from the seed instead of keeping it; burn's `Dropout` there draws one element at a
/// time on one core and keeps an f32 mask as large as `x` until the backward pass.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
    if prob == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    #[cfg(feature = "flex")]
    let x = match dropout::try_dropout(x, prob) {
        Ok(y) => return y,
        Err(x) => x,
    };
    burn::nn::DropoutConfig::new(prob).init().forward(x)
}

/// The hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The update's number, from 1 (for the bias corrections).
    pub step: i32,
}

/// One AdamW update of a flattened parameter `p` with gradient `g` and moments `(m, v)`
/// (zeros when `None`), as `torch.optim.AdamW` computes it: `p *= 1 - lr wd`,
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `p -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Returns `(p, m, v)`. On the
/// CPU backend one parallel pass that updates the buffers in place where it holds them
/// alone.
pub fn adamw<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    u: &AdamWUpdate,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    #[cfg(feature = "flex")]
    let (p, g, moments) = match adamw::try_adamw(p, g, moments, u) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let (m, v) = moments.unwrap_or_else(|| (g.zeros_like(), g.zeros_like()));
    let m = m * u.beta1 + g.clone() * (1.0 - u.beta1);
    let v = v * u.beta2 + g.powi_scalar(2) * (1.0 - u.beta2);
    let bc1 = 1.0 - u.beta1.powi(u.step);
    let bc2 = 1.0 - u.beta2.powi(u.step);
    let p = if u.weight_decay > 0.0 {
        p * (1.0 - u.lr * u.weight_decay)
    } else {
        p
    };
    let denom = v.clone().sqrt() / bc2.sqrt() + u.eps;
    let p = p - m.clone() / denom * (u.lr / bc1);
    (p, m, v)
}

/// `sum t^2`, accumulated in f64 across parallel chunks on the CPU backend.
pub fn sum_squares<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    #[cfg(feature = "flex")]
    if let Some(s) = adamw::try_sum_squares(t) {
        return s;
    }
    let s: f32 = t.clone().powi_scalar(2).sum().into_scalar().elem();
    f64::from(s)
}

/// `t * factor`; on the CPU backend in place where `t` holds its buffer alone.
pub fn scale<B: Backend>(t: Tensor<B, 1>, factor: f64) -> Tensor<B, 1> {
    #[cfg(feature = "flex")]
    let t = match adamw::try_scale(t, factor) {
        Ok(t) => return t,
        Err(t) => t,
    };
    t * factor
}
