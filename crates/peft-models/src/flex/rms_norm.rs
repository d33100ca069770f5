//! RMSNorm, `y = w x / sqrt(mean(x^2) + eps)` over the last dimension, as one operation on
//! the CPU backend.
//!
//! As burn operations it is a square, a mean, an add, a square root, a reciprocal and two
//! products, each a graph node and a single-threaded pass. Here the rows are split over
//! rayon's pool, and under autodiff one node keeps `x` and the row factors
//! `r = 1 / sqrt(mean(x^2) + eps)`: with `g = dy w`,
//! `dx = r (g - x r^2 mean(g x))` and `dw = sum over rows of dy x r`.

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

use super::{FlexKind, contiguous_f32, dot, flex_kind, from_float, into_float};

/// Rows per rayon task (at least).
const ROWS_PER_TASK: usize = 16;

/// The fused norm where `B` is `Flex` or `Autodiff<Flex>`, the tensors are f32 and `w`
/// has the size of `x`'s last dimension; `None` otherwise.
pub(crate) fn try_rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    if x.dims()[D - 1] != w.dims()[0] {
        return None;
    }
    match flex_kind::<B>()? {
        FlexKind::Plain => {
            let xp = into_float::<Flex, B, D>(x.clone())?;
            let wp = into_float::<Flex, B, 1>(w.clone())?;
            let (y, _) = forward(&contiguous_f32(&xp)?, &contiguous_f32(&wp)?, eps as f32);
            from_float::<Flex, B, D>(y)
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing, D>(x, w, eps),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing, D>(x, w, eps),
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    &t.storage::<f32>()[..t.shape().num_elements()]
}

/// `y` and the row factors `r`.
fn forward(x: &FlexTensor, w: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
    let (xs, ws) = (values(x), values(w));
    let d = ws.len().max(1);
    let rows = xs.len() / d;
    let mut y = vec![0.0f32; xs.len()];
    let mut r = vec![0.0f32; rows];
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(r.par_chunks_mut(ROWS_PER_TASK))
        .zip(xs.par_chunks(d * ROWS_PER_TASK))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(d).zip(r.iter_mut()).zip(x.chunks(d)) {
                *r = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(ws) {
                    *y = w * (x * *r);
                }
            }
        });
    (FlexTensor::from_data(TensorData::new(y, x.shape())), r)
}

fn on_autodiff<B: Backend, C: CheckpointStrategy, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    type Ad<C> = Autodiff<Flex, C>;
    let xa = into_float::<Ad<C>, B, D>(x.clone())?;
    let wa = into_float::<Ad<C>, B, 1>(w.clone())?;
    let (xh, wh) = (
        contiguous_f32(&xa.primitive)?,
        contiguous_f32(&wa.primitive)?,
    );
    let (y, r) = forward(&xh, &wh, eps as f32);
    let out = match RmsNormBackward
        .prepare::<C>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(RmsNormState { x: xh, w: wh, r }, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    from_float::<Ad<C>, B, D>(out)
}

/// `x` and `w` (contiguous) and the row factors.
#[derive(Debug, Clone)]
struct RmsNormState {
    x: FlexTensor,
    w: FlexTensor,
    r: Vec<f32>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(&dy).expect("an f32 gradient");
        let RmsNormState { x, w, r } = ops.state;
        let (dys, xs, ws) = (values(&dy), values(&x), values(&w));
        let d = ws.len().max(1);
        let [nx, nw] = ops.parents;
        if let Some(node) = nx {
            let mut dx = vec![0.0f32; xs.len()];
            dx.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(r.par_chunks(ROWS_PER_TASK))
                .zip(
                    xs.par_chunks(d * ROWS_PER_TASK)
                        .zip(dys.par_chunks(d * ROWS_PER_TASK)),
                )
                .for_each(|((dx, r), (x, dy))| {
                    let mut g = vec![0.0f32; d];
                    for (((dx, &r), x), dy) in
                        dx.chunks_mut(d).zip(r).zip(x.chunks(d)).zip(dy.chunks(d))
                    {
                        for ((g, &dy), &w) in g.iter_mut().zip(dy).zip(ws) {
                            *g = dy * w;
                        }
                        let c = r * r * dot(&g, x) / d as f32;
                        for ((dx, &g), &x) in dx.iter_mut().zip(&g).zip(x) {
                            *dx = r * (g - x * c);
                        }
                    }
                });
            grads.register::<Flex>(
                node.id,
                FlexTensor::from_data(TensorData::new(dx, x.shape())),
            );
        }
        if let Some(node) = nw {
            let dw = xs
                .par_chunks(d * ROWS_PER_TASK)
                .zip(dys.par_chunks(d * ROWS_PER_TASK))
                .zip(r.par_chunks(ROWS_PER_TASK))
                .map(|((x, dy), r)| {
                    let mut part = vec![0.0f32; d];
                    for ((x, dy), &r) in x.chunks(d).zip(dy.chunks(d)).zip(r) {
                        for ((p, &x), &dy) in part.iter_mut().zip(x).zip(dy) {
                            *p += dy * x * r;
                        }
                    }
                    part
                })
                .reduce(
                    || vec![0.0f32; d],
                    |mut a, b| {
                        for (a, b) in a.iter_mut().zip(b) {
                            *a += b;
                        }
                        a
                    },
                );
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, [d])));
        }
    }
}
