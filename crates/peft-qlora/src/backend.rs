//! [`QuantBackend`]: the backend extension behind [`crate::Linear4bit`]'s products.
//!
//! Three operations take a 4-bit weight `W` (`[out, in]`, as [`Q4Weight`] primitives):
//!
//! - [`QuantBackend::q4_linear`]: `y = x W^T` (the forward pass);
//! - [`QuantBackend::q4_linear_transposed`]: `g W` (the input gradient);
//! - [`QuantBackend::q4_dequantize`]: `W` itself, in f32.
//!
//! Every method has a portable default made of burn tensor operations (unpack the codes with
//! shifts and masks, look the values up, scale each block, then a matmul), so a new backend
//! needs only `impl QuantBackend for MyBackend {}`. The CPU backend `Flex` overrides them with
//! host kernels that read the packed codes directly (`crate::cpu`), and the GPU backends
//! (`CubeBackend`: wgpu and CUDA) with CubeCL kernels that decode inside the matmul tile
//! (`crate::cube`, features `wgpu` / `cuda`).
//!
//! Under autodiff, [`QuantBackend::q4_linear`] is one graph node whose backward pass computes
//! `dL/dx = dL/dy W` by dequantizing `W` again: the node keeps only the 4-bit codes and the
//! statistics for the backward pass, never the f32 weight. A plain `x.matmul(W^T)` would keep
//! every layer's f32 weight alive from the forward pass to the backward pass, which is the
//! memory QLoRA exists to save.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{ElementConversion, Shape, TensorMetadata, TensorPrimitive};

/// A 4-bit weight as backend primitives: what the products need, nothing else.
#[derive(Clone, Debug)]
pub struct Q4Weight<B: Backend> {
    /// The codes, 8 per I32 word, code `j` of a word at bits `4j..4j+4`, in row-major
    /// order of the `[out, in]` weight, padded with zeros to whole blocks.
    pub words: IntTensor<B>,
    /// The 16 code values, f32.
    pub table: FloatTensor<B>,
    /// The per-block absmax, plain or double-quantized.
    pub stats: Q4Stats<B>,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Values per block.
    pub blocksize: usize,
}

/// The per-block scales of a [`Q4Weight`].
#[derive(Clone, Debug)]
pub enum Q4Stats<B: Backend> {
    /// One f32 absmax per block.
    Absmax(FloatTensor<B>),
    /// Double quantization: block `b`'s absmax is
    /// `map[code[b]] * nested_absmax[b / 256] + offset`.
    Double {
        /// The 8-bit codes, 4 per I32 word (code `j` at bits `8j..8j+8`), padded with zeros
        /// to whole groups of 256.
        codes: IntTensor<B>,
        /// One f32 per 256 blocks.
        nested_absmax: FloatTensor<B>,
        /// The 256 values of the 8-bit map.
        map: FloatTensor<B>,
        /// The mean absmax subtracted before the 8-bit quantization.
        offset: f32,
    },
}

impl<B: Backend> Q4Stats<B> {
    /// The absmax of each of `blocks` blocks, from burn tensor operations.
    pub fn resolve(&self, blocks: usize) -> Tensor<B, 1> {
        let float =
            |t: &FloatTensor<B>| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t.clone()));
        match self {
            Self::Absmax(a) => float(a),
            Self::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => {
                let codes = unpack_words(Tensor::<B, 1, Int>::from_primitive(codes.clone()), 8);
                let padded = codes.dims()[0];
                let groups = padded / crate::quant::NESTED_BLOCKSIZE;
                let v = float(map)
                    .select(0, codes)
                    .reshape([groups, crate::quant::NESTED_BLOCKSIZE])
                    * float(nested_absmax).reshape([groups, 1]);
                v.reshape([padded]).slice(0..blocks).add_scalar(*offset)
            }
        }
    }
}

impl<B: Backend> Q4Weight<B> {
    fn blocks(&self) -> usize {
        (self.shape[0] * self.shape[1]).div_ceil(self.blocksize)
    }
}

/// A backend that multiplies by 4-bit weights. See the [module docs](self).
pub trait QuantBackend: Backend {
    /// `x W^T`: `x` is `[.., in]`, the result `[.., out]`.
    fn q4_linear(x: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        portable_linear::<Self>(x, weight)
    }

    /// `g W`: `g` is `[.., out]`, the result `[.., in]` (the gradient of `x W^T` with
    /// respect to `x`).
    fn q4_linear_transposed(g: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        portable_linear_transposed::<Self>(g, weight)
    }

    /// The f32 weight `[out, in]`.
    fn q4_dequantize(weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        portable_dequantize::<Self>(weight)
            .into_primitive()
            .tensor()
    }
}

/// Unpacks I32 words on the device: `32 / bits` values per word, in order.
pub(crate) fn unpack_words<B: Backend>(words: Tensor<B, 1, Int>, bits: usize) -> Tensor<B, 1, Int> {
    let per = 32 / bits;
    let mask = (1i64 << bits) - 1;
    let n = words.dims()[0];
    let parts: Vec<Tensor<B, 1, Int>> = (0..per)
        .map(|j| {
            words
                .clone()
                .bitwise_right_shift_scalar(((bits * j) as i64).elem())
                .bitwise_and_scalar(mask.elem())
        })
        .collect();
    Tensor::stack::<2>(parts, 1).reshape([n * per])
}

/// The weight from burn tensor operations, on any backend.
pub fn portable_dequantize<B: Backend>(w: &Q4Weight<B>) -> Tensor<B, 2> {
    let [out, inp] = w.shape;
    let bs = w.blocksize;
    let blocks = w.blocks();
    let words = Tensor::<B, 1, Int>::from_primitive(w.words.clone());
    let table = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(w.table.clone()));
    let absmax = w.stats.resolve(blocks);
    let codes = unpack_words(words, 4).slice(0..blocks * bs);
    let values = table.select(0, codes).reshape([blocks, bs]) * absmax.reshape([blocks, 1]);
    values
        .reshape([blocks * bs])
        .slice(0..out * inp)
        .reshape([out, inp])
}

/// Views a `[.., last]` primitive as `[rows, last]`, returning the leading dimensions.
fn as_rows<B: Backend>(x: FloatTensor<B>, last: usize) -> (Tensor<B, 2>, Vec<usize>) {
    let dims = x.shape().to_vec();
    let rows = dims[..dims.len() - 1].iter().product::<usize>();
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::float_reshape(
        x,
        Shape::new([rows, last]),
    )));
    (x, dims[..dims.len() - 1].to_vec())
}

fn with_leading<B: Backend>(y: Tensor<B, 2>, mut leading: Vec<usize>) -> FloatTensor<B> {
    leading.push(y.dims()[1]);
    B::float_reshape(y.into_primitive().tensor(), Shape::from(leading))
}

/// [`QuantBackend::q4_linear`] from burn tensor operations.
pub fn portable_linear<B: Backend>(x: FloatTensor<B>, w: &Q4Weight<B>) -> FloatTensor<B> {
    let (x, leading) = as_rows::<B>(x, w.shape[1]);
    with_leading::<B>(x.matmul(portable_dequantize(w).transpose()), leading)
}

/// [`QuantBackend::q4_linear_transposed`] from burn tensor operations.
pub fn portable_linear_transposed<B: Backend>(
    g: FloatTensor<B>,
    w: &Q4Weight<B>,
) -> FloatTensor<B> {
    let (g, leading) = as_rows::<B>(g, w.shape[0]);
    with_leading::<B>(g.matmul(portable_dequantize(w)), leading)
}

/// The backward pass of [`QuantBackend::q4_linear`] under autodiff: `dL/dx = dL/dy W`,
/// dequantizing `W` again from the codes it kept.
#[derive(Debug)]
struct Q4LinearBackward;

impl<B: QuantBackend> Backward<B, 1> for Q4LinearBackward {
    type State = Q4Weight<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            B::q4_linear_transposed(g, &weight)
        });
    }
}

fn inner_weight<B: Backend, C: CheckpointStrategy>(w: &Q4Weight<Autodiff<B, C>>) -> Q4Weight<B> {
    Q4Weight {
        words: w.words.clone(),
        table: w.table.primitive.clone(),
        stats: match &w.stats {
            Q4Stats::Absmax(a) => Q4Stats::Absmax(a.primitive.clone()),
            Q4Stats::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => Q4Stats::Double {
                codes: codes.clone(),
                nested_absmax: nested_absmax.primitive.clone(),
                map: map.primitive.clone(),
                offset: *offset,
            },
        },
        shape: w.shape,
        blocksize: w.blocksize,
    }
}

impl<B: QuantBackend, C: CheckpointStrategy> QuantBackend for Autodiff<B, C> {
    fn q4_linear(x: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        let inner = inner_weight(weight);
        match Q4LinearBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::q4_linear(x.primitive, &inner);
                prep.finish(inner, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::q4_linear(x.primitive, &inner)),
        }
    }

    /// Untracked: only the backward pass of [`QuantBackend::q4_linear`] calls it.
    fn q4_linear_transposed(g: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        let y = B::q4_linear_transposed(g.primitive, &inner_weight(weight));
        <Self as AutodiffBackend>::from_inner(y)
    }

    fn q4_dequantize(weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::q4_dequantize(&inner_weight(weight)))
    }
}

#[cfg(feature = "ndarray")]
impl QuantBackend for burn::backend::NdArray {}
