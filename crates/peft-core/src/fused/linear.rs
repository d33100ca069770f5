//! [`super::linear`] on the CPU backend.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn_flex::FlexTensor;

use super::flex::{FlexKind, Matrix, contiguous_f32, flex_kind, from_float, into_float, matmul};

/// Two operands handed back.
pub type Pair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// [`super::linear`] as the fused operation, where `B` is a CPU backend and both operands
/// are f32 with non-negative strides; the operands back otherwise.
///
/// # Errors
/// The operands, unchanged, where the fused path does not apply.
pub fn try_linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Result<Tensor<B, 2>, Pair<B>> {
    if x.dims()[1] != w.dims()[0] {
        return Err((x, w));
    }
    match flex_kind::<B>() {
        Some(FlexKind::Plain) => plain(x, w),
        Some(FlexKind::Autodiff) => on_autodiff::<B, NoCheckpointing>(x, w),
        Some(FlexKind::Balanced) => on_autodiff::<B, BalancedCheckpointing>(x, w),
        None => Err((x, w)),
    }
}

fn flex2(values: Vec<f32>, rows: usize, cols: usize) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [rows, cols]))
}

fn product(x: &FlexTensor, w: &FlexTensor) -> Option<FlexTensor> {
    let (xm, wm) = (Matrix::new(x)?, Matrix::new(w)?);
    Some(flex2(matmul(xm, wm, 1.0), xm.rows, wm.cols))
}

fn plain<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Result<Tensor<B, 2>, Pair<B>> {
    let (xf, wf) = (
        into_float::<Flex, B, 2>(x.clone()),
        into_float::<Flex, B, 2>(w.clone()),
    );
    let y = match (xf, wf) {
        (Some(xf), Some(wf)) => product(&xf, &wf),
        _ => None,
    };
    match y {
        Some(y) => Ok(from_float::<Flex, B, 2>(y).expect("B is Flex")),
        None => Err((x, w)),
    }
}

fn on_autodiff<B: Backend, C: CheckpointStrategy>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Pair<B>> {
    type Ad<C> = Autodiff<Flex, C>;
    let (Some(xa), Some(wa)) = (
        into_float::<Ad<C>, B, 2>(x.clone()),
        into_float::<Ad<C>, B, 2>(w.clone()),
    ) else {
        return Err((x, w));
    };
    let Some(y) = product(&xa.primitive, &wa.primitive) else {
        return Err((x, w));
    };
    let state = LinearState {
        x: wa.is_tracked().then(|| xa.primitive.clone()),
        w: xa.is_tracked().then(|| wa.primitive.clone()),
    };
    let out = match LinearBackward
        .prepare::<C>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(from_float::<Ad<C>, B, 2>(out).expect("B is Autodiff<Flex, C>"))
}

/// What the backward pass reads: `x` when `w` is tracked, `w` when `x` is.
#[derive(Debug, Clone)]
struct LinearState {
    x: Option<FlexTensor>,
    w: Option<FlexTensor>,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(&dy).expect("an f32 gradient");
        let dym = Matrix::new(&dy).expect("a 2-D f32 gradient");
        let [nx, nw] = ops.parents;
        let LinearState { x, w } = ops.state;
        if let (Some(node), Some(w)) = (nx, w) {
            // dx = dy w^T
            let wm = Matrix::new(&w).expect("the forward pass read w");
            grads.register::<Flex>(node.id, flex2(matmul(dym, wm.t(), 1.0), dym.rows, wm.rows));
        }
        if let (Some(node), Some(x)) = (nw, x) {
            // dw = x^T dy
            let xm = Matrix::new(&x).expect("the forward pass read x");
            grads.register::<Flex>(node.id, flex2(matmul(xm.t(), dym, 1.0), xm.cols, dym.cols));
        }
    }
}
