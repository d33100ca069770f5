//! Operations that CPU training runs as one fused step, with the plain burn operations as
//! the meaning and the fallback.
//!
//! - [`linear`]: `x W`, the product of every linear layer.
//! - [`low_rank_add`]: `y + s (x A) B`, the low-rank update of LoRA and its relatives.
//!
//! On the CPU backend (`Flex` and `Autodiff<Flex>`, f32, feature `flex`, on by default) each
//! is one pass of `gemm` calls over host memory and, under autodiff, one graph node with its
//! own backward pass. burn's matmul on Flex zero-fills each output, then copies it into a
//! buffer of stricter alignment, and a LoRA path written with burn operations adds a scale
//! and a sum over the whole output, each single-threaded and each a graph node; measured on
//! a LoRA training step of SmolLM2-135M, see docs/benchmarks.md. Every other backend runs
//! the burn operations. [`flex`] has the pieces for writing such operations.

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
