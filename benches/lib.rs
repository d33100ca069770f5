//! Shared pieces of the criterion benches (`cargo xtask bench`).
//!
//! Each bench group times a `baseline` and candidates in the same run, so the ratios that
//! `cargo xtask bench` prints compare like with like on whatever machine runs them.

use burn::prelude::*;

/// Waits for a result to be computed (backends may run asynchronously) and drops it.
pub fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.into_data();
}

pub mod train_step;
