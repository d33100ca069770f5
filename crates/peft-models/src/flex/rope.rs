//! Rotary embeddings, `x cos + rotate_half(x) sin` over `[batch, positions, heads, head
//! size]`, as one operation on the CPU backend.
//!
//! As burn operations it is two strided slices, a negation, a concatenation, two products
//! with broadcast tables and a sum, each a graph node and a single-threaded pass. Here it is
//! one parallel pass each way. With `h` half the head size, the forward pass is
//! `y[j] = x[j] c[j] - x[j+h] s[j]`, `y[j+h] = x[j+h] c[j+h] + x[j] s[j+h]`, and the
//! backward pass its transpose:
//! `dx[j] = dy[j] c[j] + dy[j+h] s[j+h]`, `dx[j+h] = dy[j+h] c[j+h] - dy[j] s[j]`.

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

use super::{FlexKind, contiguous_f32, flex_kind, from_float, into_float};

/// Heads per rayon task (at least).
const HEADS_PER_TASK: usize = 64;

/// The fused rotation where `B` is `Flex` or `Autodiff<Flex>`, the tensors are f32, the
/// head size is even and the tables are `[positions, heads, head size]`; `None` otherwise.
pub(crate) fn try_rope<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Option<Tensor<B, 4>> {
    let [_, s, h, d] = x.dims();
    if cos.dims() != [s, h, d] || sin.dims() != [s, h, d] || d % 2 != 0 {
        return None;
    }
    match flex_kind::<B>()? {
        FlexKind::Plain => {
            let p = |t: &Tensor<B, 3>| into_float::<Flex, B, 3>(t.clone());
            let (c, sn) = (contiguous_f32(&p(cos)?)?, contiguous_f32(&p(sin)?)?);
            let xp = into_float::<Flex, B, 4>(x.clone())?;
            let y = rotate(&contiguous_f32(&xp)?, &c, &sn, false);
            from_float::<Flex, B, 4>(y)
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing>(x, cos, sin),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing>(x, cos, sin),
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    &t.storage::<f32>()[..t.shape().num_elements()]
}

/// The rotation of `x` (`backward`: its transpose) with tables covering one example.
fn rotate(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, backward: bool) -> FlexTensor {
    let shape = x.shape();
    let d = shape[3];
    let half = d / 2;
    let (xs, cs, ss) = (values(x), values(cos), values(sin));
    let per_example = cs.len().max(1);
    let mut y = vec![0.0f32; xs.len()];
    y.par_chunks_mut(d * HEADS_PER_TASK)
        .zip(xs.par_chunks(d * HEADS_PER_TASK))
        .enumerate()
        .for_each(|(task, (y, x))| {
            let first = task * d * HEADS_PER_TASK;
            for (n, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let at = (first + n * d) % per_example;
                let (c, s) = (&cs[at..at + d], &ss[at..at + d]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                let (c1, c2) = c.split_at(half);
                let (s1, s2) = s.split_at(half);
                if backward {
                    for j in 0..half {
                        y1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                        y2[j] = x2[j] * c2[j] - x1[j] * s1[j];
                    }
                } else {
                    for j in 0..half {
                        y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                        y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
                    }
                }
            }
        });
    FlexTensor::from_data(TensorData::new(y, shape))
}

fn on_autodiff<B: Backend, C: CheckpointStrategy>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Option<Tensor<B, 4>> {
    type Ad<C> = Autodiff<Flex, C>;
    // The tables are constants: their values, without their graph nodes.
    let p = |t: &Tensor<B, 3>| into_float::<Ad<C>, B, 3>(t.clone()).map(|t| t.primitive);
    let (cos, sin) = (contiguous_f32(&p(cos)?)?, contiguous_f32(&p(sin)?)?);
    let xa = into_float::<Ad<C>, B, 4>(x.clone())?;
    let y = rotate(&contiguous_f32(&xa.primitive)?, &cos, &sin, false);
    let out = match RopeBackward
        .prepare::<C>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos, sin), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    from_float::<Ad<C>, B, 4>(out)
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// The cosine and sine tables.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let dy = contiguous_f32(&dy).expect("an f32 gradient");
        let (cos, sin) = ops.state;
        let [nx] = ops.parents;
        if let Some(node) = nx {
            grads.register::<Flex>(node.id, rotate(&dy, &cos, &sin, true));
        }
    }
}
