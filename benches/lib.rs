//! Shared pieces of the criterion benches (`cargo xtask bench`).
//!
//! Each bench group times a `baseline` and candidates in the same run, so the ratios that
//! `cargo xtask bench` prints compare like with like on whatever machine runs them.

use burn::module::{Module, Param};
use burn::prelude::*;
use peft_core::Result;
use peft_core::inject::{LinearAdapter, LinearWeight};

/// Waits for a result to be computed (backends may run asynchronously) and drops it.
pub fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.into_data();
}

/// A minimal low-rank adapter, `y + (x A^T) B^T`, for timing the adapter machinery.
#[derive(Module, Debug)]
pub struct LowRank<B: Backend> {
    /// `[r, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[out, r]`.
    pub b: Param<Tensor<B, 2>>,
}

impl<B: Backend> LowRank<B> {
    /// A random adapter of rank `r`.
    pub fn new(r: usize, inp: usize, out: usize, device: &B::Device) -> Self {
        let d = burn::tensor::Distribution::Normal(0.0, 0.02);
        Self {
            a: Param::from_tensor(Tensor::random([r, inp], d, device)),
            b: Param::from_tensor(Tensor::random([out, r], d, device)),
        }
    }
}

impl<B: Backend> LinearAdapter<B> for LowRank<B> {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let a = self.a.val().transpose().unsqueeze::<D>();
        let b = self.b.val().transpose().unsqueeze::<D>();
        output + input.clone().matmul(a).matmul(b)
    }

    fn merge(
        &mut self,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((w + self.b.val().matmul(self.a.val()), b))
    }
}
