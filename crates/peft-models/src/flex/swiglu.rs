//! `silu(gate) * up`, the gated unit of Llama's MLP, as one operation on the CPU backend.
//!
//! As burn operations it is a sigmoid, two products and their backward steps, each a pass
//! over `tokens x intermediate` values on one thread (a libm `exp` per value). Here it is one
//! parallel pass forward and one backward, under autodiff one graph node that keeps `gate`
//! and `up` (which the projections' own nodes keep anyway):
//! `d gate = dy up s (1 + gate (1 - s))`, `d up = dy gate s`, with `s = sigmoid(gate)`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{FlexKind, contiguous_f32, exp, flex_kind, from_float, into_float, simd};

/// Values per rayon task.
const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The fused gate where `B` is `Flex` or `Autodiff<Flex>` and the tensors are f32 of one
/// shape; `None` otherwise.
pub(crate) fn try_swiglu<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    match flex_kind::<B>()? {
        FlexKind::Plain => {
            let g = into_float::<Flex, B, D>(gate.clone())?;
            let u = into_float::<Flex, B, D>(up.clone())?;
            let y = forward(&contiguous_f32(&g)?, &contiguous_f32(&u)?);
            from_float::<Flex, B, D>(y)
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing, D>(gate, up),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing, D>(gate, up),
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    &t.storage::<f32>()[..t.shape().num_elements()]
}

fn like(t: &FlexTensor, values: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, t.shape()))
}

fn forward(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let (gs, us) = (values(g), values(u));
    let mut y = vec![0.0f32; gs.len()];
    y.par_chunks_mut(CHUNK)
        .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            simd(
                #[inline(always)]
                || {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g * sigmoid(g) * u;
                    }
                },
            )
        });
    like(g, y)
}

fn on_autodiff<B: Backend, C: CheckpointStrategy, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    type Ad<C> = Autodiff<Flex, C>;
    let g = into_float::<Ad<C>, B, D>(gate.clone())?;
    let u = into_float::<Ad<C>, B, D>(up.clone())?;
    let (gh, uh) = (contiguous_f32(&g.primitive)?, contiguous_f32(&u.primitive)?);
    let y = forward(&gh, &uh);
    let out = match SwigluBackward
        .prepare::<C>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gh, uh), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    from_float::<Ad<C>, B, D>(out)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// `gate` and `up`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(&dy).expect("an f32 gradient");
        let (g, u) = ops.state;
        let (dys, gs, us) = (values(&dy), values(&g), values(&u));
        let mut dg = vec![0.0f32; gs.len()];
        let mut du = vec![0.0f32; gs.len()];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                dys.par_chunks(CHUNK)
                    .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK))),
            )
            .for_each(|((dg, du), (dy, (g, u)))| {
                simd(
                    #[inline(always)]
                    || {
                        for i in 0..dg.len() {
                            let s = sigmoid(g[i]);
                            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                            du[i] = dy[i] * g[i] * s;
                        }
                    },
                )
            });
        let [ng, nu] = ops.parents;
        if let Some(node) = ng {
            grads.register::<Flex>(node.id, like(&g, dg));
        }
        if let Some(node) = nu {
            grads.register::<Flex>(node.id, like(&u, du));
        }
    }
}
