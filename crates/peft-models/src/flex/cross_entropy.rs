//! The summed token cross-entropy `sum_i logsumexp(z_i) - z_i[t_i]` as one operation on the
//! CPU backend.
//!
//! As burn operations it is a chain of passes over the `[tokens, vocab]` logits on one thread
//! (max, subtract, a libm `exp` per logit, sum, gather, divide, scatter, the surrogate
//! product), and the surrogate's autodiff node keeps both the logits and the gradient: for
//! 512 tokens of a 49,152-word vocabulary, 200 MB. Here each row is one task: its maximum,
//! then `exp` and the sum in one pass that writes the probabilities, then `softmax - onehot`
//! in place. Under autodiff the node keeps only that gradient (100 MB); the backward pass
//! scales it by the incoming gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{
    FlexKind, contiguous, exp, flex_kind, from_float, into_float, max_of, simd, sum_of, try_cast,
};

/// The fused loss where `B` is `Flex` or `Autodiff<Flex>`, the logits are f32 and every
/// target is a valid column; the logits back otherwise.
pub(crate) fn try_cross_entropy_sum<B: Backend>(
    z: Tensor<B, 2>,
    targets: &Tensor<B, 2, Int>,
) -> Result<Tensor<B, 1>, Tensor<B, 2>> {
    let [n, v] = z.dims();
    let Some(kind) = flex_kind::<B>() else {
        return Err(z);
    };
    if targets.dims() != [n, 1] || z.dtype() != DType::F32 {
        return Err(z);
    }
    let t: Option<Vec<usize>> = targets
        .to_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .ok()
        .and_then(|t| {
            t.into_iter()
                .map(|t| usize::try_from(t).ok().filter(|&t| t < v))
                .collect()
        });
    let Some(t) = t else {
        return Err(z);
    };
    Ok(match kind {
        FlexKind::Plain => {
            let z = into_float::<Flex, B, 2>(z).expect("B is Flex");
            let (nll, _) = loss(z, &t, false);
            try_cast(scalar::<Flex>(nll)).unwrap_or_else(|_| unreachable!("B is Flex"))
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing>(z, &t),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing>(z, &t),
    })
}

fn scalar<B: Backend>(x: f64) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(vec![x as f32], [1]), &Default::default())
}

/// The summed loss and, when `grad`, `softmax(z) - onehot(t)` (`[n, vocab]`), written over
/// the logits' own buffer when this tensor holds it alone (the logits are not needed after
/// the loss, and a 49,152-word vocabulary makes them 100 MB for 512 tokens), over a copy
/// otherwise.
fn loss(z: FlexTensor, targets: &[usize], grad: bool) -> (f64, Option<FlexTensor>) {
    let [n, v]: [usize; 2] = z.shape().to_vec().try_into().expect("2-D logits");
    if !grad {
        let z = contiguous(&z);
        let total = z.storage::<f32>()[..n * v]
            .par_chunks(v)
            .enumerate()
            .map(|(i, zr)| {
                simd(
                    #[inline(always)]
                    || {
                        let m = max_of(zr);
                        let mut s = [0.0f32; 16];
                        let mut chunks = zr.chunks_exact(16);
                        for c in &mut chunks {
                            for (acc, &z) in s.iter_mut().zip(c) {
                                *acc += exp(z - m);
                            }
                        }
                        let rest: f32 = chunks.remainder().iter().map(|&z| exp(z - m)).sum();
                        f64::from((s.iter().sum::<f32>() + rest).ln() + m - zr[targets[i]])
                    },
                )
            })
            .sum();
        return (total, None);
    }
    let mut c = if z.is_contiguous() && z.layout().start_offset() == 0 && z.is_unique() {
        z
    } else {
        FlexTensor::from_data(TensorData::new(
            z.to_contiguous().storage::<f32>()[..n * v].to_vec(),
            [n, v],
        ))
    };
    let total = c.storage_mut::<f32>()[..n * v]
        .par_chunks_mut(v)
        .enumerate()
        .map(|(i, row)| {
            simd(
                #[inline(always)]
                || {
                    // The row's logits become its probabilities, then its gradient.
                    let m = max_of(row);
                    let t = targets[i];
                    let zt = row[t];
                    for x in row.iter_mut() {
                        *x = exp(*x - m);
                    }
                    let s = sum_of(row);
                    let inv = 1.0 / s;
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                    row[t] -= 1.0;
                    f64::from(s.ln() + m - zt)
                },
            )
        })
        .sum();
    (total, Some(c))
}

fn on_autodiff<B: Backend, C: CheckpointStrategy>(
    z: Tensor<B, 2>,
    targets: &[usize],
) -> Tensor<B, 1> {
    type Ad<C> = Autodiff<Flex, C>;
    let z = into_float::<Ad<C>, B, 2>(z).expect("B is Autodiff<Flex, C>");
    let node = z.node.clone();
    let out = match CrossEntropyBackward
        .prepare::<C>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (nll, c) = loss(z.primitive, targets, true);
            let nll = scalar::<Flex>(nll).into_primitive().tensor();
            prep.finish(c.expect("asked for the gradient"), nll)
        }
        OpsKind::UnTracked(prep) => {
            let (nll, _) = loss(z.primitive, targets, false);
            prep.finish(scalar::<Flex>(nll).into_primitive().tensor())
        }
    };
    from_float::<Ad<C>, B, 1>(out).expect("B is Autodiff<Flex, C>")
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// `softmax(z) - onehot(t)`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        let g = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(g)).into_scalar();
        let [node] = ops.parents;
        let Some(node) = node else { return };
        let mut c = ops.state;
        if g != 1.0 {
            let n = c.shape().num_elements();
            c.storage_mut::<f32>()[..n]
                .par_chunks_mut(1 << 14)
                .for_each(|x| x.iter_mut().for_each(|x| *x *= g));
        }
        grads.register::<Flex>(node.id, c);
    }
}
