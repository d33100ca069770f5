//! [`super::low_rank_add`] on the CPU backend.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, TensorMetadata};
use burn_flex::FlexTensor;

use super::dropout::Mask;
use super::flex::{
    FlexKind, Matrix, Product, contiguous_f32, flex_kind, from_float, gemm, into_float, matmul,
    parallel,
};
use super::rank;

/// Three operands handed back.
pub type Triple<B> = (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>);

/// [`super::low_rank_add`] as the fused operation, where `B` is a CPU backend, every
/// tensor is f32 and the shapes agree.
///
/// # Errors
/// `(y, a, b)`, unchanged, where the fused path does not apply.
pub fn try_low_rank_add<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Result<Tensor<B, 2>, Triple<B>> {
    try_low_rank_add_dropout(y, x, a, b, scale, 0.0)
}

/// [`super::low_rank_add_dropout`] as the fused operation, where `B` is a CPU backend,
/// every tensor is f32 and the shapes agree. Without autodiff dropout is the identity and
/// `prob` is not read.
///
/// # Errors
/// `(y, a, b)`, unchanged, where the fused path does not apply.
pub fn try_low_rank_add_dropout<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
    prob: f64,
) -> Result<Tensor<B, 2>, Triple<B>> {
    let ([rows, out], [xr, inp], [ai, r], [br, bo]) = (y.dims(), x.dims(), a.dims(), b.dims());
    if xr != rows || ai != inp || br != r || bo != out || y.dtype() != DType::F32 {
        return Err((y, a, b));
    }
    let scale = scale as f32;
    match flex_kind::<B>() {
        Some(FlexKind::Plain) => plain(y, x, a, b, scale),
        Some(FlexKind::Autodiff) => on_autodiff::<B, NoCheckpointing>(y, x, a, b, scale, prob),
        Some(FlexKind::Balanced) => {
            on_autodiff::<B, BalancedCheckpointing>(y, x, a, b, scale, prob)
        }
        None => Err((y, a, b)),
    }
}

/// Whether `m` is row-major with no gaps (row stride = columns, unit column stride).
fn dense(m: &Matrix<'_>) -> bool {
    m.cs == 1 && m.rs == m.cols
}

/// `alpha x a`, `[rows, r]`: the rank kernel when the layouts allow, the general product
/// otherwise.
fn narrow(x: Matrix<'_>, a: Matrix<'_>, alpha: f32) -> Vec<f32> {
    if rank::supported(a.cols) && x.cs == 1 && dense(&a) {
        rank::narrow(x.data, x.rs, x.rows, x.cols, a.data, a.cols, alpha)
    } else {
        matmul(x, a, alpha)
    }
}

/// `alpha u^T x` for a dense `u` `[rows, r]` and `x` `[rows, n]`: `[r, n]`.
fn outer_t(u: &[f32], r: usize, x: Matrix<'_>, alpha: f32) -> Vec<f32> {
    if rank::supported(r) && x.cs == 1 {
        rank::outer_t(u, r, x.data, x.rs, x.rows, x.cols, alpha)
    } else {
        let um = Matrix {
            data: u,
            rs: r,
            cs: 1,
            rows: x.rows,
            cols: r,
        };
        matmul(um.t(), x, alpha)
    }
}

/// `dst (+)= alpha t b` for a dense `t` `[rows, r]` and a row-major `dst` `[rows, out]`.
fn widen_into(t: &[f32], b: Matrix<'_>, alpha: f32, dst: &mut [f32], accumulate: bool) {
    let (r, out) = (b.rows, b.cols);
    let rows = t.len() / r.max(1);
    if rank::supported(r) && dense(&b) {
        rank::widen(t, r, b.data, out, alpha, &mut dst[..rows * out], accumulate);
    } else {
        gemm(Product {
            m: rows,
            n: out,
            k: r,
            dst,
            dst_rs: out,
            accumulate,
            alpha,
            lhs: (t, r, 1),
            rhs: b.operand(),
            parallel: parallel(rows, out, r),
        });
    }
}

/// `y + scale t b` into `y`'s own buffer (copied first only when it is shared or strided).
fn add_into(y: FlexTensor, t: &[f32], b: Matrix<'_>, scale: f32) -> FlexTensor {
    let [rows, out]: [usize; 2] = y.shape().to_vec().try_into().expect("a 2-D output");
    let mut y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.to_contiguous()
    };
    // Copy-on-write: the buffer is written in place when this tensor holds it alone.
    widen_into(t, b, scale, &mut y.storage_mut::<f32>()[..rows * out], true);
    y
}

/// `t = x a` (`[rows, r]`), the row count and `b`'s view; `None` where a tensor is not a
/// 2-D f32 matrix with non-negative strides.
fn first_product<'b>(
    x: &FlexTensor,
    a: &FlexTensor,
    b: &'b FlexTensor,
) -> Option<(Vec<f32>, usize, Matrix<'b>)> {
    let (xm, am, bm) = (Matrix::new(x)?, Matrix::new(a)?, Matrix::new(b)?);
    Some((narrow(xm, am, 1.0), xm.rows, bm))
}

fn plain<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f32,
) -> Result<Tensor<B, 2>, Triple<B>> {
    let prim = |t: &Tensor<B, 2>| into_float::<Flex, B, 2>(t.clone());
    let (Some(xp), Some(ap), Some(bp)) = (prim(x), prim(&a), prim(&b)) else {
        return Err((y, a, b));
    };
    let Some((t, _, bm)) = first_product(&xp, &ap, &bp) else {
        return Err((y, a, b));
    };
    let yp = into_float::<Flex, B, 2>(y).expect("B is Flex");
    let out = add_into(yp, &t, bm, scale);
    Ok(from_float::<Flex, B, 2>(out).expect("B is Flex"))
}

fn on_autodiff<B: Backend, C: CheckpointStrategy>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f32,
    prob: f64,
) -> Result<Tensor<B, 2>, Triple<B>> {
    type Ad<C> = Autodiff<Flex, C>;
    let prim = |t: &Tensor<B, 2>| into_float::<Ad<C>, B, 2>(t.clone());
    let (Some(xa), Some(aa), Some(ba)) = (prim(x), prim(&a), prim(&b)) else {
        return Err((y, a, b));
    };
    // With dropout the product reads a masked copy of `x` that is dropped straight after;
    // the node keeps `x` itself (which the base layer's node holds anyway) and the mask's
    // seed, and masks again in the backward pass.
    let (input, mask) = if prob > 0.0 {
        let Some(x) = contiguous_f32(&xa.primitive) else {
            return Err((y, a, b));
        };
        (x, Some(Mask::new(1.0 - prob)))
    } else {
        (xa.primitive.clone(), None)
    };
    let dropped = mask.map(|m| m.forward(&input));
    let Some((t, rows, bm)) = first_product(
        dropped.as_ref().unwrap_or(&input),
        &aa.primitive,
        &ba.primitive,
    ) else {
        return Err((y, a, b));
    };
    drop(dropped);
    let ya = into_float::<Ad<C>, B, 2>(y).expect("B is Autodiff<Flex, C>");
    let y_node = ya.node.clone();
    let out = add_into(ya.primitive, &t, bm, scale);
    let (x_tracked, a_tracked, b_tracked) = (xa.is_tracked(), aa.is_tracked(), ba.is_tracked());
    let state = LowRankState {
        x: a_tracked.then_some(input),
        a: x_tracked.then(|| aa.primitive.clone()),
        b: (x_tracked || a_tracked).then(|| ba.primitive.clone()),
        t: b_tracked.then(|| FlexTensor::from_data(TensorData::new(t, [rows, bm.rows]))),
        scale,
        mask,
    };
    let out = match LowRankBackward
        .prepare::<C>([y_node, xa.node.clone(), aa.node.clone(), ba.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(from_float::<Ad<C>, B, 2>(out).expect("B is Autodiff<Flex, C>"))
}

/// What the backward pass reads, each only when a tracked input's gradient needs it:
/// `x` for `da`, `a` for `dx`, `b` for both, `t = x a` for `db`; and the dropout mask
/// applied to `x` in the forward pass, if any.
#[derive(Debug, Clone)]
struct LowRankState {
    x: Option<FlexTensor>,
    a: Option<FlexTensor>,
    b: Option<FlexTensor>,
    t: Option<FlexTensor>,
    scale: f32,
    mask: Option<Mask>,
}

#[derive(Debug)]
struct LowRankBackward;

impl Backward<Flex, 4> for LowRankBackward {
    type State = LowRankState;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(&dy).expect("an f32 gradient");
        let dym = Matrix::new(&dy).expect("a 2-D f32 gradient");
        let [ny, nx, na, nb] = ops.parents;
        let s = ops.state;
        let flex2 =
            |v: Vec<f32>, r: usize, c: usize| FlexTensor::from_data(TensorData::new(v, [r, c]));
        // u = scale dy b^T, [rows, r]: what x and a receive through the update.
        let u = s.b.as_ref().map(|b| {
            let bm = Matrix::new(b).expect("the forward pass read b");
            let u = if dense(&bm) {
                let bt = rank::transpose(bm.data, bm.rows, bm.cols);
                let btm = Matrix {
                    data: &bt,
                    rs: bm.rows,
                    cs: 1,
                    rows: bm.cols,
                    cols: bm.rows,
                };
                narrow(dym, btm, s.scale)
            } else {
                matmul(dym, bm.t(), s.scale)
            };
            (u, bm.rows)
        });
        if let (Some(node), Some(a), Some((u, r))) = (&nx, &s.a, &u) {
            // dx = u a^T
            let am = Matrix::new(a).expect("the forward pass read a");
            let dx = if dense(&am) {
                let at = rank::transpose(am.data, am.rows, *r);
                let atm = Matrix {
                    data: &at,
                    rs: am.rows,
                    cs: 1,
                    rows: *r,
                    cols: am.rows,
                };
                let mut dx = vec![0.0f32; dym.rows * am.rows];
                widen_into(u, atm, 1.0, &mut dx, false);
                dx
            } else {
                let um = Matrix {
                    data: u,
                    rs: *r,
                    cs: 1,
                    rows: dym.rows,
                    cols: *r,
                };
                matmul(um, am.t(), 1.0)
            };
            let dx = flex2(dx, dym.rows, am.rows);
            // Through the dropout: the same mask again.
            let dx = match &s.mask {
                Some(mask) => mask.backward(dx),
                None => dx,
            };
            grads.register::<Flex>(node.id, dx);
        }
        if let (Some(node), Some(x), Some((u, r))) = (&na, &s.x, &u) {
            // da = x^T u, with the forward pass's dropped copy of x when it had one.
            let dropped = s.mask.map(|mask| mask.forward(x));
            let xm = Matrix::new(dropped.as_ref().unwrap_or(x)).expect("the forward pass read x");
            let dat = outer_t(u, *r, xm, 1.0);
            grads.register::<Flex>(
                node.id,
                flex2(rank::transpose(&dat, *r, xm.cols), xm.cols, *r),
            );
        }
        if let (Some(node), Some(t)) = (&nb, &s.t) {
            // db = scale t^T dy
            let tm = Matrix::new(t).expect("the forward pass made t");
            let db = outer_t(tm.data, tm.cols, dym, s.scale);
            grads.register::<Flex>(node.id, flex2(db, tm.cols, dym.cols));
        }
        if let Some(node) = ny {
            // The base output's gradient is the incoming one, as it is.
            grads.register::<Flex>(node.id, dy);
        }
    }
}
