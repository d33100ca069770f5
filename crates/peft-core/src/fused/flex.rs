//! Building blocks for operations fused by hand on the CPU backend `Flex`: which CPU backend
//! a generic `B` is, checked downcasts between generic and concrete tensors, and a
//! bounds-checked strided f32 product on the `gemm` crate (Flex's own matmul kernels).
//!
//! A fused operation recognises `Flex` or `Autodiff<Flex>` with [`flex_kind`], [`cast`]s its
//! tensors to the concrete type, works on host memory (rayon tasks, [`gemm()`]) and, under
//! autodiff, registers itself as one graph node with its own backward pass. The fused
//! operations of this crate ([`super::linear`], [`super::low_rank_add`]), of `peft-models`
//! (attention, SwiGLU, the token loss) and the 4-bit kernels of `peft-qlora` are written
//! this way.

pub use super::linear::{Pair, try_linear};
pub use super::low_rank::{Triple, try_low_rank_add, try_low_rank_add_dropout};

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::{Autodiff, Flex};
use burn::prelude::{Backend, Tensor};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};
use burn_flex::FlexTensor;

/// Which CPU backend `B` is, for the fused operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlexKind {
    /// `Flex`: the forward pass only.
    Plain,
    /// `Autodiff<Flex>` (no checkpointing).
    Autodiff,
    /// `Autodiff<Flex, BalancedCheckpointing>`.
    Balanced,
}

/// Which CPU backend `B` is; `None` for any other backend.
pub fn flex_kind<B: Backend>() -> Option<FlexKind> {
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
pub fn cast<T: 'static, U: 'static>(t: T) -> Option<U> {
    try_cast(t).ok()
}

/// `t` as a `U` when `T` is `U`; `t` back unchanged otherwise.
pub fn try_cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    match (Box::new(t) as Box<dyn Any>).downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(b) => Err(*b
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("the box holds a T"))),
    }
}

/// The float primitive of `t` as one of the backend `K`, when `B` is `K` (`None`
/// otherwise): how a fused operation takes its generic operands apart.
pub fn into_float<K: Backend, B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Option<FloatTensor<K>> {
    cast::<_, Tensor<K, D>>(t).map(|t| t.into_primitive().tensor())
}

/// A float primitive of the backend `K` as a `Tensor<B, D>`, when `B` is `K` (`None`
/// otherwise): how a fused operation hands its result back.
pub fn from_float<K: Backend, B: Backend, const D: usize>(
    p: FloatTensor<K>,
) -> Option<Tensor<B, D>> {
    cast(Tensor::<K, D>::from_primitive(TensorPrimitive::Float(p)))
}

/// Runs `f` compiled for the widest vector extension this CPU has (AVX-512, or AVX2 with
/// FMA; checked at run time), for element-wise loops that the compiler vectorises. `f` must
/// be inlined into the function compiled with those features, so pass the closure as
/// `simd(#[inline(always)] || ...)`. Without those extensions, `f` runs as it is.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        // 0: not checked yet, 1: baseline, 2: AVX2 + FMA, 3: AVX-512.
        static LEVEL: AtomicU8 = AtomicU8::new(0);
        let mut level = LEVEL.load(Ordering::Relaxed);
        if level == 0 {
            let has = |f: &str| match f {
                "avx512" => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx512dq")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                _ => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            };
            level = if has("avx512") {
                3
            } else if has("avx2") {
                2
            } else {
                1
            };
            LEVEL.store(level, Ordering::Relaxed);
        }
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level {
            // SAFETY: the CPU has the features `avx512` is compiled for (checked above);
            // the function itself is safe code.
            #[allow(unsafe_code)]
            3 => return unsafe { avx512(f) },
            // SAFETY: as above, for AVX2 and FMA.
            #[allow(unsafe_code)]
            2 => return unsafe { avx2(f) },
            _ => {}
        }
    }
    f()
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
pub fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| contiguous(t))
}

/// A 2-D f32 tensor read in place: its storage from the first element, row and column
/// strides, and shape.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    /// The storage from the first element on.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl<'a> Matrix<'a> {
    /// The view of a 2-D f32 tensor with non-negative strides (transposed views included);
    /// `None` otherwise.
    pub fn new(t: &'a FlexTensor) -> Option<Self> {
        let dims = t.shape().to_vec();
        if t.dtype() != DType::F32 || dims.len() != 2 || !t.layout().has_positive_strides() {
            return None;
        }
        let s = t.layout().strides();
        Some(Self {
            data: t.storage::<f32>().get(t.layout().start_offset()..)?,
            rs: usize::try_from(s[0]).ok()?,
            cs: usize::try_from(s[1]).ok()?,
            rows: dims[0],
            cols: dims[1],
        })
    }

    /// The transpose, read in place.
    pub fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            rows: self.cols,
            cols: self.rows,
            ..self
        }
    }

    /// As a product operand: (storage, row stride, column stride).
    pub fn operand(&self) -> (&'a [f32], usize, usize) {
        (self.data, self.rs, self.cs)
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

/// Products below this many multiply-adds run on one thread (as Flex's matmul decides).
pub const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// Whether an `m x k` by `k x n` product is worth splitting over rayon's pool.
pub fn parallel(m: usize, n: usize, k: usize) -> bool {
    m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD
}

/// `alpha lhs rhs` into a new row-major `[lhs.rows, rhs.cols]` buffer, which the product
/// writes without it being zero-filled first.
///
/// # Panics
/// When the inner dimensions differ, or an operand's strides reach past its storage.
#[allow(unsafe_code)] // the `gemm` crate takes raw pointers; the buffer starts uninitialised
pub fn matmul(lhs: Matrix<'_>, rhs: Matrix<'_>, alpha: f32) -> Vec<f32> {
    assert_eq!(lhs.cols, rhs.rows, "matmul: inner dimensions differ");
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0f32; m * n];
    }
    let last = |a: &Matrix<'_>| (a.rows - 1) * a.rs + (a.cols - 1) * a.cs;
    assert!(last(&lhs) < lhs.data.len(), "matmul: lhs out of bounds");
    assert!(last(&rhs) < rhs.data.len(), "matmul: rhs out of bounds");
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    let s = |v: usize| v as isize;
    // SAFETY: the asserts keep every element the product reads inside `lhs` and `rhs`, which
    // outlive the call. `dst` has room for `m * n` values; with `read_dst = false` the
    // `gemm` crate never reads the destination and writes each of its `m * n` elements
    // (row stride `n`, column stride 1) before returning, so all of them are initialised
    // when the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(n),
            false,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            0.0,
            alpha,
            false,
            false,
            false,
            if parallel(m, n, k) {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
        dst.set_len(m * n);
    }
    dst
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
