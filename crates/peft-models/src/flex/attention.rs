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
use burn::tensor::{DType, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{
    FlexKind, Product, cast, dot, flex_kind, from_float, gemm, into_float, simd, softmax_in_place,
};

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
            let mask = host_mask(mask, k.dims()[2])?;
            let (q, k, v) = (
                q.into_primitive().tensor(),
                k.into_primitive().tensor(),
                v.into_primitive().tensor(),
            );
            let inputs = Inputs::new(&q, &k, &v, mask.as_ref())?;
            let (out, _) = inputs.forward(scale as f32, false);
            from_float::<Flex, B, 4>(out)
        }
        FlexKind::Autodiff => on_autodiff::<B, NoCheckpointing>(q, k, v, mask, scale),
        FlexKind::Balanced => on_autodiff::<B, BalancedCheckpointing>(q, k, v, mask, scale),
    }
}

/// The mask as booleans with its shape, `Some(None)` without a mask, `None` where it cannot
/// be read.
fn host_mask<B: Backend>(
    mask: Option<&Tensor<B, 4, Bool>>,
    keys: usize,
) -> Option<Option<HostMask>> {
    let Some(mask) = mask else {
        return Some(None);
    };
    let dims = mask.dims();
    if dims[3] != keys && dims[3] != 1 {
        return None;
    }
    let values = mask.to_data().to_vec::<bool>().ok()?;
    Some(Some(HostMask::new(values, dims, keys)))
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
        into_float::<Ad<C>, B, 4>(q.clone())?,
        into_float::<Ad<C>, B, 4>(k.clone())?,
        into_float::<Ad<C>, B, 4>(v.clone())?,
    );
    let mask = host_mask(mask, k.primitive.shape()[2])?.map(Arc::new);
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
    from_float::<Ad<C>, B, 4>(out)
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

/// A boolean mask `[mb, mh, ms, t]` that broadcasts over `[batch, heads, queries, keys]`,
/// with, for each of its rows, the end of the keys a query may see (one past the last
/// unmasked key; every key when all are masked, as the generic path then attends uniformly).
#[derive(Debug)]
struct HostMask {
    values: Vec<bool>,
    dims: [usize; 4],
    limits: Vec<usize>,
}

impl HostMask {
    /// The mask `values` of shape `dims`, its key dimension broadcast to `t` keys.
    fn new(values: Vec<bool>, dims: [usize; 4], t: usize) -> Self {
        let [mb, mh, ms, mt] = dims;
        let values: Vec<bool> = if mt == t {
            values
        } else {
            values
                .iter()
                .flat_map(|&v| std::iter::repeat_n(v, t))
                .collect()
        };
        let limits = (0..mb * mh * ms)
            .map(|r| {
                let row = &values[r * t..(r + 1) * t];
                row.iter().rposition(|&m| !m).map_or(t, |j| j + 1)
            })
            .collect();
        Self {
            values,
            dims: [mb, mh, ms, t],
            limits,
        }
    }

    fn index(&self, b: usize, h: usize, i: usize) -> usize {
        let [mb, mh, ms, _] = self.dims;
        let at = |x: usize, n: usize| if n == 1 { 0 } else { x };
        (at(b, mb) * mh + at(h, mh)) * ms + at(i, ms)
    }

    /// The mask of query `i` of head `h` in batch `b` over the keys (true = masked).
    fn row(&self, b: usize, h: usize, i: usize) -> &[bool] {
        let t = self.dims[3];
        &self.values[self.index(b, h, i) * t..][..t]
    }

    /// One past the last key that query `i` of head `h` in batch `b` may see.
    fn limit(&self, b: usize, h: usize, i: usize) -> usize {
        self.limits[self.index(b, h, i)]
    }
}

/// Query rows per block: a block's products stop at the last key any of its rows may see,
/// which skips about half of a causal mask's work.
const BLOCK: usize = 32;

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

    /// One past the last key any of the query rows `i0..i0 + rows` of `head` in batch `b`
    /// may see.
    fn keys_for(&self, b: usize, head: usize, i0: usize, rows: usize) -> usize {
        self.mask.map_or(self.t, |m| {
            (i0..i0 + rows)
                .map(|i| m.limit(b, head, i))
                .max()
                .unwrap_or(0)
        })
    }

    /// The output and, when `keep`, the probabilities (`[batch, heads, queries, keys]`).
    /// The output's storage is `[batch, queries, heads, value size]`, the layout the output
    /// projection reads, under a `[batch, heads, queries, value size]` view.
    fn forward(&self, scale: f32, keep: bool) -> (FlexTensor, Option<Vec<f32>>) {
        let (s, t, d, dv) = (self.s, self.t, self.d, self.dv);
        let rep = self.h / self.kvh;
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
        // Each (batch, key/value head) task writes its heads' outputs, `[rep, s, dv]`.
        let outs: Vec<Vec<f32>> = task_probs
            .into_par_iter()
            .enumerate()
            .map(|(task, mut kept)| {
                let (b, g) = (task / self.kvh, task % self.kvh);
                let (k, k_rs, k_cs) = self.k.matrix(b, g);
                let (v, v_rs, v_cs) = self.v.matrix(b, g);
                let mut out = vec![0.0f32; rep * s * dv];
                let mut scores = vec![0.0f32; BLOCK.min(s) * t];
                for r in 0..rep {
                    let head = g * rep + r;
                    let (q, q_rs, q_cs) = self.q.matrix(b, head);
                    for i0 in (0..s).step_by(BLOCK) {
                        let rows = BLOCK.min(s - i0);
                        let n = self.keys_for(b, head, i0, rows);
                        let p = &mut scores[..rows * n];
                        // scores = scale q k^T over the keys the block may see
                        gemm(Product {
                            m: rows,
                            n,
                            k: d,
                            dst: p,
                            dst_rs: n,
                            accumulate: false,
                            alpha: scale,
                            lhs: (&q[i0 * q_rs..], q_rs, q_cs),
                            rhs: (k, k_cs, k_rs),
                            parallel: false,
                        });
                        simd(
                            #[inline(always)]
                            || {
                                for (ii, row) in p.chunks_mut(n.max(1)).enumerate() {
                                    if let Some(m) = self.mask {
                                        let mrow = m.row(b, head, i0 + ii);
                                        for (x, &masked) in row.iter_mut().zip(mrow) {
                                            *x = if masked { f32::MIN } else { *x };
                                        }
                                    }
                                    softmax_in_place(row);
                                    if let Some(kept) = kept.as_deref_mut() {
                                        kept[(r * s + i0 + ii) * t..][..n].copy_from_slice(row);
                                    }
                                }
                            },
                        );
                        // out = P v
                        gemm(Product {
                            m: rows,
                            n: dv,
                            k: n,
                            dst: &mut out[(r * s + i0) * dv..],
                            dst_rs: dv,
                            accumulate: false,
                            alpha: 1.0,
                            lhs: (p, n, 1),
                            rhs: (v, v_rs, v_cs),
                            parallel: false,
                        });
                    }
                }
                out
            })
            .collect();
        let out = self.interleave_refs(&outs.iter().collect::<Vec<_>>(), rep, s, dv);
        (out, keep.then_some(probs))
    }

    /// The tasks' `[heads of the group, rows, width]` blocks (one per batch and key/value
    /// group) as one `[batch, rows, heads, width]` buffer, returned as a `[batch, heads,
    /// rows, width]` view of it.
    fn interleave_refs(
        &self,
        parts: &[&Vec<f32>],
        per: usize,
        rows: usize,
        width: usize,
    ) -> FlexTensor {
        let heads = per * self.kvh;
        let mut all = vec![0.0f32; self.b * rows * heads * width];
        all.par_chunks_mut((rows * heads * width).max(1))
            .enumerate()
            .for_each(|(b, dst)| {
                for (g, part) in parts[b * self.kvh..(b + 1) * self.kvh].iter().enumerate() {
                    for r in 0..per {
                        for i in 0..rows {
                            dst[(i * heads + g * per + r) * width..][..width]
                                .copy_from_slice(&part[(r * rows + i) * width..][..width]);
                        }
                    }
                }
            });
        flex(all, [self.b, rows, heads, width]).transpose(1, 2)
    }

    /// `[dq, dk, dv]` from the output gradient `grad` and the kept probabilities, each
    /// stored `[batch, positions, heads, size]` under a `[batch, heads, positions, size]`
    /// view (the layout of the projections they flow back to).
    fn backward(&self, grad: &FlexTensor, probs: &[f32], scale: f32) -> [FlexTensor; 3] {
        let (s, t, d, dv) = (self.s, self.t, self.d, self.dv);
        let rep = self.h / self.kvh;
        let grad = if View::new(grad).is_some() {
            grad.clone()
        } else {
            grad.to_contiguous()
        };
        let go = View::new(&grad).expect("a contiguous f32 tensor");
        let parts: Vec<[Vec<f32>; 3]> = (0..self.b * self.kvh)
            .into_par_iter()
            .map(|task| {
                let (b, g) = (task / self.kvh, task % self.kvh);
                let (k, k_rs, k_cs) = self.k.matrix(b, g);
                let (v, v_rs, v_cs) = self.v.matrix(b, g);
                let mut dq = vec![0.0f32; rep * s * d];
                let mut dk = vec![0.0f32; t * d];
                let mut dvv = vec![0.0f32; t * dv];
                let mut ds = vec![0.0f32; BLOCK.min(s) * t];
                for r in 0..rep {
                    let head = g * rep + r;
                    let ph = &probs[(b * self.h + head) * s * t..][..s * t];
                    let (o, o_rs, o_cs) = go.matrix(b, head);
                    let (q, q_rs, q_cs) = self.q.matrix(b, head);
                    for i0 in (0..s).step_by(BLOCK) {
                        let rows = BLOCK.min(s - i0);
                        let n = self.keys_for(b, head, i0, rows);
                        let p = &ph[i0 * t..];
                        let o_blk = &o[i0 * o_rs..];
                        // dV += P^T dO
                        gemm(Product {
                            m: n,
                            n: dv,
                            k: rows,
                            dst: &mut dvv,
                            dst_rs: dv,
                            accumulate: true,
                            alpha: 1.0,
                            lhs: (p, 1, t),
                            rhs: (o_blk, o_rs, o_cs),
                            parallel: false,
                        });
                        // dP = dO V^T
                        let dsb = &mut ds[..rows * n];
                        gemm(Product {
                            m: rows,
                            n,
                            k: dv,
                            dst: dsb,
                            dst_rs: n,
                            accumulate: false,
                            alpha: 1.0,
                            lhs: (o_blk, o_rs, o_cs),
                            rhs: (v, v_cs, v_rs),
                            parallel: false,
                        });
                        // dS = P (dP - rowsum(dP P)), the softmax's backward pass; a masked
                        // score was set to a constant, so it passes no gradient (which
                        // matters in a row whose keys are all masked, where P is uniform).
                        simd(
                            #[inline(always)]
                            || {
                                for (ii, dsr) in dsb.chunks_mut(n.max(1)).enumerate() {
                                    let pr = &p[ii * t..][..n];
                                    let dot = dot(dsr, pr);
                                    for (x, pv) in dsr.iter_mut().zip(pr) {
                                        *x = pv * (*x - dot);
                                    }
                                    if let Some(m) = self.mask {
                                        let mrow = m.row(b, head, i0 + ii);
                                        for (x, &masked) in dsr.iter_mut().zip(mrow) {
                                            *x = if masked { 0.0 } else { *x };
                                        }
                                    }
                                }
                            },
                        );
                        // dQ = scale dS K
                        gemm(Product {
                            m: rows,
                            n: d,
                            k: n,
                            dst: &mut dq[(r * s + i0) * d..],
                            dst_rs: d,
                            accumulate: false,
                            alpha: scale,
                            lhs: (dsb, n, 1),
                            rhs: (k, k_rs, k_cs),
                            parallel: false,
                        });
                        // dK += scale dS^T Q
                        gemm(Product {
                            m: n,
                            n: d,
                            k: rows,
                            dst: &mut dk,
                            dst_rs: d,
                            accumulate: true,
                            alpha: scale,
                            lhs: (dsb, 1, n),
                            rhs: (&q[i0 * q_rs..], q_rs, q_cs),
                            parallel: false,
                        });
                    }
                }
                [dq, dk, dvv]
            })
            .collect();
        let pick = |i: usize| parts.iter().map(|p| &p[i]).collect::<Vec<_>>();
        [
            self.interleave_refs(&pick(0), rep, s, d),
            self.interleave_refs(&pick(1), 1, t, d),
            self.interleave_refs(&pick(2), 1, t, dv),
        ]
    }
}

fn flex(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
