//! Attention as one operation on the CPU backend (`Flex`), forward and backward.
//!
//! [`crate::nn::attention`] written with burn tensor operations is a dozen graph nodes per
//! layer: the grouped-query expansion of `k` and `v` (two copies), the score product, the
//! scale, the mask fill, the five passes of softmax, the value product, and as many
//! backward steps. Flex runs element-wise operations on one thread, so on a 2-core machine
//! half of the CPU idles through all of them. Measured with `train-step --layers 8` (LoRA on
//! SmolLM2-135M's architecture, 4 x 128 tokens, 2-core EPYC): attention took 0.17 s of a
//! 0.67 s step, while its products are 2% of the step's arithmetic.
//!
//! Here, for `Flex` and `Autodiff<Flex>`, each (batch, key/value head) pair is one task on
//! rayon's pool: the scores of the query heads that share the key/value head by `gemm`
//! (reading `q`, `k`, `v` through their strides, no expansion), mask and softmax in one pass
//! per row, then the value product. Under autodiff the operation is one graph node that keeps
//! `q`, `k`, `v` and the probabilities, and whose backward pass computes the three input
//! gradients per task the same way (`dV = P^T dO`, `dP = dO V^T`,
//! `dS = P (dP - rowsum(dP P))`, `dQ = dS K`, `dK = dS^T Q`, the last two scaled).
//!
//! The semantics are those of the generic path exactly: masked scores are set to `f32::MIN`
//! before the softmax, so a row whose keys are all masked attends uniformly, as there.
//! Other backends, and dtypes other than f32, take the generic path.

use std::sync::Arc;

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

use super::{FlexKind, Product, cast, exp, flex_kind, gemm};

/// The fused attention where `B` is `Flex` or `Autodiff<Flex>` (with or without
/// checkpointing) and the tensors are f32; `None` otherwise.
pub(crate) fn try_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    match flex_kind::<B>()? {
        FlexKind::Plain => {
            let (q, k, v) = (
                cast::<_, Tensor<Flex, 4>>(q.clone())?,
                cast::<_, Tensor<Flex, 4>>(k.clone())?,
                cast::<_, Tensor<Flex, 4>>(v.clone())?,
            );
            let mask = host_mask(mask)?;
            let (q, k, v) = (
                q.into_primitive().tensor(),
                k.into_primitive().tensor(),
                v.into_primitive().tensor(),
            );
            let inputs = Inputs::new(&q, &k, &v, mask.as_ref())?;
            let (out, _) = inputs.forward(scale as f32, false);
            cast(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(
                out,
            )))
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing>(q, k, v, mask, scale),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing>(q, k, v, mask, scale),
    }
}

/// The mask as booleans with its shape, `Some(None)` without a mask, `None` where it cannot
/// be read.
fn host_mask<B: Backend>(mask: Option<&Tensor<B, 4, Bool>>) -> Option<Option<HostMask>> {
    let Some(mask) = mask else {
        return Some(None);
    };
    let dims = mask.dims();
    let values = mask.to_data().to_vec::<bool>().ok()?;
    Some(Some(HostMask { values, dims }))
}

fn on_autodiff<B: Backend, C: CheckpointStrategy>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    type Ad<C> = Autodiff<Flex, C>;
    let (q, k, v) = (
        cast::<_, Tensor<Ad<C>, 4>>(q.clone())?
            .into_primitive()
            .tensor(),
        cast::<_, Tensor<Ad<C>, 4>>(k.clone())?
            .into_primitive()
            .tensor(),
        cast::<_, Tensor<Ad<C>, 4>>(v.clone())?
            .into_primitive()
            .tensor(),
    );
    let mask = host_mask(mask)?.map(Arc::new);
    let inputs = Inputs::new(&q.primitive, &k.primitive, &v.primitive, mask.as_deref())?;
    let scale = scale as f32;
    let out = match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, probs) = inputs.forward(scale, true);
            let state = AttentionState {
                q: q.primitive.clone(),
                k: k.primitive.clone(),
                v: v.primitive.clone(),
                probs: probs.unwrap_or_default(),
                mask: mask.clone(),
                scale,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(inputs.forward(scale, false).0),
    };
    cast(Tensor::<Ad<C>, 4>::from_primitive(TensorPrimitive::Float(
        out,
    )))
}

/// What the backward pass needs: the inputs and the attention probabilities
/// (`[batch, heads, queries, keys]`).
#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Vec<f32>,
    mask: Option<Arc<HostMask>>,
    scale: f32,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let inputs = Inputs::new(&s.q, &s.k, &s.v, s.mask.as_deref())
            .expect("the forward pass read these tensors");
        let [dq, dk, dv] = inputs.backward(&grad, &s.probs, s.scale);
        let [nq, nk, nv] = ops.parents;
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// A boolean mask `[mb, mh, ms, mt]` that broadcasts over `[batch, heads, queries, keys]`.
#[derive(Debug)]
struct HostMask {
    values: Vec<bool>,
    dims: [usize; 4],
}

impl HostMask {
    /// Whether key `j` is masked for query `i` of head `h` in batch `b`.
    fn masked(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let [mb, mh, ms, mt] = self.dims;
        let at = |x: usize, n: usize| if n == 1 { 0 } else { x };
        self.values[((at(b, mb) * mh + at(h, mh)) * ms + at(i, ms)) * mt + at(j, mt)]
    }
}

/// A 4-D f32 tensor's storage, start offset and strides (all non-negative).
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
}

impl<'a> View<'a> {
    fn new(t: &'a FlexTensor) -> Option<Self> {
        if t.dtype() != DType::F32 || !t.layout().has_positive_strides() {
            return None;
        }
        let s = t.layout().strides();
        let strides = [s[0], s[1], s[2], s[3]].map(|x| x as usize);
        Some(Self {
            data: t.storage::<f32>(),
            offset: t.layout().start_offset(),
            strides,
        })
    }

    /// The matrix of batch `b`, head `h`: its storage from its first element, row stride,
    /// column stride.
    fn matrix(&self, b: usize, h: usize) -> (&'a [f32], usize, usize) {
        let start = self.offset + b * self.strides[0] + h * self.strides[1];
        (&self.data[start..], self.strides[2], self.strides[3])
    }
}

/// The inputs of one attention call, as host views.
struct Inputs<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    mask: Option<&'a HostMask>,
    /// batch, query heads, key/value heads, queries, keys, head size, value size.
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
    dv: usize,
}

impl<'a> Inputs<'a> {
    /// `None` where the fused path does not apply (dtypes, strides, shapes).
    fn new(
        q: &'a FlexTensor,
        k: &'a FlexTensor,
        v: &'a FlexTensor,
        mask: Option<&'a HostMask>,
    ) -> Option<Self> {
        let dims = |t: &FlexTensor| -> Option<[usize; 4]> {
            t.shape().to_vec().as_slice().try_into().ok()
        };
        let ([b, h, s, d], [kb, kvh, t, kd], [vb, vh, vt, dv]) = (dims(q)?, dims(k)?, dims(v)?);
        let shapes_agree = kb == b && vb == b && vh == kvh && vt == t && kd == d && kvh > 0;
        if !shapes_agree || !h.is_multiple_of(kvh) {
            return None;
        }
        if let Some(m) = mask {
            let [mb, mh, ms, mt] = m.dims;
            let fits = |n: usize, full: usize| n == 1 || n == full;
            if !(fits(mb, b) && fits(mh, h) && fits(ms, s) && fits(mt, t)) {
                return None;
            }
        }
        Some(Self {
            q: View::new(q)?,
            k: View::new(k)?,
            v: View::new(v)?,
            mask,
            b,
            h,
            kvh,
            s,
            t,
            d,
            dv,
        })
    }

    /// The output `[batch, heads, queries, value size]` and, when `keep`, the
    /// probabilities.
    fn forward(&self, scale: f32, keep: bool) -> (FlexTensor, Option<Vec<f32>>) {
        let (s, t, d, dv) = (self.s, self.t, self.d, self.dv);
        let rep = self.h / self.kvh;
        let mut out = vec![0.0f32; self.b * self.h * s * dv];
        // The probabilities of every head when the backward pass needs them; otherwise one
        // head's at a time per task (a long prompt's scores are `heads x s x t` floats).
        let mut probs = if keep {
            vec![0.0f32; self.b * self.h * s * t]
        } else {
            Vec::new()
        };
        let task_probs: Vec<Option<&mut [f32]>> = if keep {
            probs.chunks_mut(rep * s * t).map(Some).collect()
        } else {
            (0..self.b * self.kvh).map(|_| None).collect()
        };
        out.par_chunks_mut(rep * s * dv)
            .zip(task_probs)
            .enumerate()
            .for_each(|(task, (out, kept))| {
                let (b, g) = (task / self.kvh, task % self.kvh);
                let (k, k_rs, k_cs) = self.k.matrix(b, g);
                let (v, v_rs, v_cs) = self.v.matrix(b, g);
                let mut scratch = Vec::new();
                let probs: &mut [f32] = match kept {
                    Some(p) => p,
                    None => {
                        scratch.resize(s * t, 0.0);
                        &mut scratch
                    }
                };
                // Each head's probabilities where they are kept, the one buffer otherwise.
                let stride = if keep { s * t } else { 0 };
                for r in 0..rep {
                    let head = g * rep + r;
                    let p = &mut probs[r * stride..r * stride + s * t];
                    let (q, q_rs, q_cs) = self.q.matrix(b, head);
                    // scores = scale q k^T
                    gemm(Product {
                        m: s,
                        n: t,
                        k: d,
                        dst: p,
                        dst_rs: t,
                        accumulate: false,
                        alpha: scale,
                        lhs: (q, q_rs, q_cs),
                        rhs: (k, k_cs, k_rs),
                        parallel: false,
                    });
                    for (i, row) in p.chunks_mut(t).enumerate() {
                        if let Some(m) = self.mask {
                            for (j, x) in row.iter_mut().enumerate() {
                                if m.masked(b, head, i, j) {
                                    *x = f32::MIN;
                                }
                            }
                        }
                        softmax_in_place(row);
                    }
                    // out = P v
                    gemm(Product {
                        m: s,
                        n: dv,
                        k: t,
                        dst: &mut out[r * s * dv..(r + 1) * s * dv],
                        dst_rs: dv,
                        accumulate: false,
                        alpha: 1.0,
                        lhs: (p, t, 1),
                        rhs: (v, v_rs, v_cs),
                        parallel: false,
                    });
                }
            });
        let out = flex(out, [self.b, self.h, s, dv]);
        (out, keep.then_some(probs))
    }

    /// `[dq, dk, dv]` from the output gradient `grad` and the kept probabilities.
    fn backward(&self, grad: &FlexTensor, probs: &[f32], scale: f32) -> [FlexTensor; 3] {
        let (s, t, d, dv) = (self.s, self.t, self.d, self.dv);
        let rep = self.h / self.kvh;
        let grad = if View::new(grad).is_some() {
            grad.clone()
        } else {
            grad.to_contiguous()
        };
        let go = View::new(&grad).expect("a contiguous f32 tensor");
        let mut dq = vec![0.0f32; self.b * self.h * s * d];
        let mut dk = vec![0.0f32; self.b * self.kvh * t * d];
        let mut dvs = vec![0.0f32; self.b * self.kvh * t * dv];
        dq.par_chunks_mut(rep * s * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dvs.par_chunks_mut(t * dv))
            .enumerate()
            .for_each(|(task, ((dq, dk), dvv))| {
                let (b, g) = (task / self.kvh, task % self.kvh);
                let (k, k_rs, k_cs) = self.k.matrix(b, g);
                let (v, v_rs, v_cs) = self.v.matrix(b, g);
                let mut ds = vec![0.0f32; s * t];
                for r in 0..rep {
                    let head = g * rep + r;
                    let first = (b * self.h + head) * s * t;
                    let p = &probs[first..first + s * t];
                    let (o, o_rs, o_cs) = go.matrix(b, head);
                    let (q, q_rs, q_cs) = self.q.matrix(b, head);
                    // dV += P^T dO
                    gemm(Product {
                        m: t,
                        n: dv,
                        k: s,
                        dst: dvv,
                        dst_rs: dv,
                        accumulate: r > 0,
                        alpha: 1.0,
                        lhs: (p, 1, t),
                        rhs: (o, o_rs, o_cs),
                        parallel: false,
                    });
                    // dP = dO V^T
                    gemm(Product {
                        m: s,
                        n: t,
                        k: dv,
                        dst: &mut ds,
                        dst_rs: t,
                        accumulate: false,
                        alpha: 1.0,
                        lhs: (o, o_rs, o_cs),
                        rhs: (v, v_cs, v_rs),
                        parallel: false,
                    });
                    // dS = P (dP - rowsum(dP P)), the softmax's backward pass; a masked
                    // score was set to a constant, so it passes no gradient (which matters
                    // in a row whose keys are all masked, where P is uniform, not 0).
                    for (i, (dsr, pr)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (x, pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot);
                        }
                        if let Some(m) = self.mask {
                            for (j, x) in dsr.iter_mut().enumerate() {
                                if m.masked(b, head, i, j) {
                                    *x = 0.0;
                                }
                            }
                        }
                    }
                    // dQ = scale dS K
                    gemm(Product {
                        m: s,
                        n: d,
                        k: t,
                        dst: &mut dq[r * s * d..(r + 1) * s * d],
                        dst_rs: d,
                        accumulate: false,
                        alpha: scale,
                        lhs: (&ds, t, 1),
                        rhs: (k, k_rs, k_cs),
                        parallel: false,
                    });
                    // dK += scale dS^T Q
                    gemm(Product {
                        m: t,
                        n: d,
                        k: s,
                        dst: dk,
                        dst_rs: d,
                        accumulate: r > 0,
                        alpha: scale,
                        lhs: (&ds, 1, t),
                        rhs: (q, q_rs, q_cs),
                        parallel: false,
                    });
                }
            });
        [
            flex(dq, [self.b, self.h, s, d]),
            flex(dk, [self.b, self.kvh, t, d]),
            flex(dvs, [self.b, self.kvh, t, dv]),
        ]
    }
}

fn flex(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `exp(x - max) / sum` over a row, in place.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}
