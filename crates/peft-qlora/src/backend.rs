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
use core::ops::Range;

/// Number of code values at the start of [`Q4Weight::values`].
pub const TABLE_LEN: usize = 16;

/// Number of values of the 8-bit map that follows the code table in [`Q4Weight::values`]
/// with double quantization.
pub const MAP_LEN: usize = 256;

/// Where the 8-bit map lies in [`Q4Weight::values`] (double quantization).
pub(crate) const MAP_VALUES: Range<usize> = TABLE_LEN..TABLE_LEN + MAP_LEN;

/// A 4-bit weight as backend primitives: what the products need, nothing else.
///
/// Two tensors hold it, one of integers and one of floats, so that a layer keeps two
/// tensor records (and each product's graph node two handles) where a dense layer keeps
/// one; five separate tensors cost a 4-bit layer more memory in bookkeeping than the
/// tables themselves (docs/benchmarks.md).
#[derive(Clone, Debug)]
pub struct Q4Weight<B: Backend> {
    /// The 4-bit codes, 8 per I32 word, code `j` of a word at bits `4j..4j+4`, in row-major
    /// order of the `[out, in]` weight, padded with zeros to whole blocks
    /// ([`Self::code_words`] words). With double quantization the 8-bit absmax codes
    /// follow: 4 per I32 word (code `j` at bits `8j..8j+8`), padded with zeros to whole
    /// groups of 256 blocks.
    pub codes: IntTensor<B>,
    /// f32: the 16 code values; then, without double quantization, one absmax per block;
    /// with it, the 256 values of the 8-bit map followed by one nested absmax per 256
    /// blocks.
    pub values: FloatTensor<B>,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Values per block.
    pub blocksize: usize,
    /// With double quantization, the mean absmax subtracted before the 8-bit quantization:
    /// block `b`'s absmax is `map[code[b]] * nested_absmax[b / 256] + offset`. `None`
    /// without it.
    pub double_quant: Option<f32>,
}

impl<B: Backend> Q4Weight<B> {
    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        (self.shape[0] * self.shape[1]).div_ceil(self.blocksize)
    }

    /// Number of I32 words of 4-bit codes at the start of [`Self::codes`].
    pub fn code_words(&self) -> usize {
        self.blocks() * self.blocksize / 8
    }

    /// Number of groups of 256 blocks (one nested absmax each).
    fn groups(&self) -> usize {
        self.blocks().div_ceil(crate::quant::NESTED_BLOCKSIZE)
    }

    /// Where the 8-bit absmax codes lie in [`Self::codes`] (double quantization), padded
    /// to whole groups.
    pub(crate) fn scale_code_words(&self) -> Range<usize> {
        let start = self.code_words();
        start..start + self.groups() * crate::quant::NESTED_BLOCKSIZE / 4
    }

    /// Where the per-block absmax lies in [`Self::values`] (without double quantization).
    pub(crate) fn absmax_values(&self) -> Range<usize> {
        TABLE_LEN..TABLE_LEN + self.blocks()
    }

    /// Where the nested absmax lies in [`Self::values`] (double quantization).
    pub(crate) fn nested_values(&self) -> Range<usize> {
        MAP_VALUES.end..MAP_VALUES.end + self.groups()
    }

    /// The 16 code values, from burn tensor operations.
    pub fn table(&self) -> Tensor<B, 1> {
        self.values_tensor().slice(0..TABLE_LEN)
    }

    fn values_tensor(&self) -> Tensor<B, 1> {
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(self.values.clone()))
    }

    /// The absmax of each block, from burn tensor operations.
    pub fn absmax(&self) -> Tensor<B, 1> {
        let blocks = self.blocks();
        let values = self.values_tensor();
        match self.double_quant {
            None => values.slice(self.absmax_values()),
            Some(offset) => {
                let groups = self.groups();
                let padded = groups * crate::quant::NESTED_BLOCKSIZE;
                let codes = Tensor::<B, 1, Int>::from_primitive(self.codes.clone())
                    .slice(self.scale_code_words());
                let codes = unpack_words(codes, 8);
                let map = values.clone().slice(MAP_VALUES);
                let nested = values.slice(self.nested_values());
                let v = map
                    .select(0, codes)
                    .reshape([groups, crate::quant::NESTED_BLOCKSIZE])
                    * nested.reshape([groups, 1]);
                v.reshape([padded]).slice(0..blocks).add_scalar(offset)
            }
        }
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
    let words = Tensor::<B, 1, Int>::from_primitive(w.codes.clone()).slice(0..w.code_words());
    let absmax = w.absmax();
    let codes = unpack_words(words, 4);
    let values = w.table().select(0, codes).reshape([blocks, bs]) * absmax.reshape([blocks, 1]);
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
        codes: w.codes.clone(),
        values: w.values.primitive.clone(),
        shape: w.shape,
        blocksize: w.blocksize,
        double_quant: w.double_quant,
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
