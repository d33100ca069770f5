//! Fused operations for the CPU backend (`Flex`, and `Autodiff<Flex>` for training).
//!
//! Flex runs element-wise operations on one thread and each burn operation is a graph node
//! under autodiff, so a layer's small operations (attention's softmax and masking, the
//! SwiGLU gate) cost far more than their arithmetic. Each module here recognises the CPU
//! backend by type (a checked downcast), runs the whole operation as rayon tasks
//! over host memory and, under autodiff, registers it as one graph node with its own
//! backward pass. Every other backend, and dtypes other than f32, keep the burn ops.
//!
//! Public here, shared with the 4-bit host kernels of `peft-qlora`: [`gemm()`], a
//! bounds-checked strided f32 product on the `gemm` crate, and [`contiguous`].

pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod swiglu;

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::{Autodiff, Flex};
use burn::prelude::Backend;
use burn_flex::FlexTensor;

/// Which CPU backend `B` is, for the fused operations; `None` for any other backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlexKind {
    /// `Flex`: the forward pass only.
    Plain,
    /// `Autodiff<Flex>` (no checkpointing).
    Autodiff,
    /// `Autodiff<Flex, BalancedCheckpointing>`.
    Balanced,
}

fn flex_kind<B: Backend>() -> Option<FlexKind> {
    let id = TypeId::of::<B>();
    [
        (TypeId::of::<Flex>(), FlexKind::Plain),
        (
            TypeId::of::<Autodiff<Flex, NoCheckpointing>>(),
            FlexKind::Autodiff,
        ),
        (
            TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>(),
            FlexKind::Balanced,
        ),
    ]
    .into_iter()
    .find_map(|(t, kind)| (t == id).then_some(kind))
}

/// `t` as a `U` when `T` is `U` (a checked downcast; `None` otherwise).
fn cast<T: 'static, U: 'static>(t: T) -> Option<U> {
    (Box::new(t) as Box<dyn Any>)
        .downcast::<U>()
        .ok()
        .map(|b| *b)
}

/// `t` contiguous from offset 0: a clone of the same storage when it already is, a copy
/// otherwise.
pub fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// [`contiguous`] for an f32 tensor, `None` for any other dtype.
pub(crate) fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == burn::tensor::DType::F32).then(|| contiguous(t))
}

/// `e^x` in f32, branch-free so that loops over slices vectorize: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2` (ln 2 split in two parts, so `r` is exact to f32 rounding), `e^r` by its
/// degree-7 Taylor polynomial (truncation below 6e-9 relative), times `2^n` built in the
/// exponent bits. Within a few ulp of the exact value; 0 below -87.3 (where f32 `exp` turns
/// subnormal), `e^88.3` above 88.3 (where it nears overflow); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `dst[m, n] = alpha lhs[m, k] rhs[k, n]` (plus `dst` when `accumulate`), `dst` row-major
/// with row stride `dst_rs`, the operands as (storage from the first element, row stride,
/// column stride).
#[allow(missing_docs)] // the fields are the product's dimensions and operands, as above
pub struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: &'a mut [f32],
    pub dst_rs: usize,
    pub accumulate: bool,
    pub alpha: f32,
    pub lhs: (&'a [f32], usize, usize),
    pub rhs: (&'a [f32], usize, usize),
    /// Split the product over rayon's pool (worth it from about 192^3 multiply-adds).
    pub parallel: bool,
}

/// Runs a [`Product`] with the `gemm` crate (Flex's own matmul), after checking that every
/// element it touches is in bounds of its slice.
#[allow(unsafe_code)] // the `gemm` crate takes raw pointers and strides
pub fn gemm(p: Product<'_>) {
    if p.m == 0 || p.n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(p.dst_rs, 1, p.m, p.n) < p.dst.len(),
        "gemm: dst out of bounds"
    );
    if p.k == 0 {
        if !p.accumulate {
            for row in p.dst.chunks_mut(p.dst_rs).take(p.m) {
                row[..p.n].fill(0.0);
            }
        }
        return;
    }
    let (lhs, lhs_rs, lhs_cs) = p.lhs;
    let (rhs, rhs_rs, rhs_cs) = p.rhs;
    assert!(
        last(lhs_rs, lhs_cs, p.m, p.k) < lhs.len(),
        "gemm: lhs out of bounds"
    );
    assert!(
        last(rhs_rs, rhs_cs, p.k, p.n) < rhs.len(),
        "gemm: rhs out of bounds"
    );
    let s = |v: usize| v as isize;
    // SAFETY: the asserts above keep every index the product reads or writes inside the
    // slices, which outlive the call; `dst` is exclusively borrowed, so it overlaps neither
    // input.
    unsafe {
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            p.dst.as_mut_ptr(),
            1,
            s(p.dst_rs),
            p.accumulate,
            lhs.as_ptr(),
            s(lhs_cs),
            s(lhs_rs),
            rhs.as_ptr(),
            s(rhs_cs),
            s(rhs_rs),
            1.0,
            p.alpha,
            false,
            false,
            false,
            if p.parallel {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.000_37;
        }
        // 3 ulp of f32 is 3.6e-7 relative.
        assert!(worst < 3.6e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(100.0) > 1e38);
    }
}
