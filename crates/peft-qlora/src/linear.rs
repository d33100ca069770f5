//! [`Linear4bit`]: a frozen linear layer whose weight lives on the device as 4-bit codes.
//!
//! Device layout (every tensor a burn constant, never a parameter, so no optimizer state
//! and no gradient):
//!
//! | tensor | dtype | contents, in order |
//! |---|---|---|
//! | `codes` | `Int` (I32) | the 4-bit codes, 8 per 32-bit word, code `j` at bits `4j..4j+4`, padded to whole blocks; with double quantization the 8-bit absmax codes, 4 per word, padded to whole groups of 256 blocks |
//! | `values` | f32 | the 16 code values (`weight.quant_map`); without double quantization one absmax per block; with it the 256 values of the dynamic map (`weight.nested_quant_map`) and one nested absmax per 256 blocks |
//!
//! Two tensors, not one per statistic: each tensor costs a few hundred bytes of records
//! (its storage handle, shape and strides, and under autodiff a graph node) in the layer and
//! again in every product's graph node, and with five of them per layer that bookkeeping
//! ate 0.3 MB of the 370 MB a 4-bit SmolLM2-135M saves (docs/benchmarks.md).
//!
//! I32 words are what every backend here stores natively (WGSL has no 8-bit integers), and
//! they keep the codes at 4 bits per value: 0.5 bytes per parameter, plus 1/64 byte for the
//! double-quantized absmax at block size 64.
//!
//! The products go through [`QuantBackend`] (see [`crate::backend`]): a portable path of burn
//! tensor ops on every backend (unpack the codes with shifts and masks, look the values up,
//! scale each block by its absmax, then `x W^T + b`), host kernels on the CPU backend `Flex`.
//! Under autodiff the product is one node whose backward pass gives the input gradient
//! `dL/dx = dL/dy W` (what LoRA above needs), dequantizing again instead of keeping the f32
//! weight, and nothing for the base.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions, TensorData, TensorPrimitive};
use peft_core::PeftError;
use peft_core::inject::LinearWeight;

use crate::backend::{MAP_LEN, MAP_VALUES, Q4Weight, QuantBackend, TABLE_LEN};
use crate::codes::dynamic_map;
use crate::error::{QloraError, Result};
use crate::quant::{DoubleQuant, NESTED_BLOCKSIZE, Packed4bit, QuantConfig, QuantizedWeight};

thread_local! {
    static CONFIG: Cell<QuantConfig> = Cell::new(QuantConfig::default());
    static PENDING: RefCell<Option<QuantizedWeight>> = const { RefCell::new(None) };
}

/// Runs `f` with `config` as the quantization [`LinearWeight::from_dense`] uses on this
/// thread (NF4, block 64, double quantization otherwise), then restores the previous one.
///
/// This is how a generic loader such as `peft_models::load_llama::<_, Linear4bit<_>, ..>`
/// quantizes with another setting: [`crate::load_quantized_llama`] does it for you.
///
/// # Errors
/// [`QloraError::InvalidConfig`] for an unsupported block size (then `f` is not run).
pub fn with_quant_config<R>(config: QuantConfig, f: impl FnOnce() -> R) -> Result<R> {
    config.validate()?;
    struct Restore(QuantConfig);
    impl Drop for Restore {
        fn drop(&mut self) {
            CONFIG.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CONFIG.with(|c| c.replace(config)));
    Ok(f())
}

/// The configuration [`LinearWeight::from_dense`] quantizes with on this thread.
pub fn current_quant_config() -> QuantConfig {
    CONFIG.with(Cell::get)
}

/// Hands an already quantized weight to the next [`LinearWeight::from_dense`] on this
/// thread of the same shape, which then uses it instead of quantizing (how a bitsandbytes
/// checkpoint loads through the generic model loaders, keeping its exact bytes).
pub(crate) fn stage_quantized(weight: QuantizedWeight) {
    PENDING.with(|p| *p.borrow_mut() = Some(weight));
}

fn take_staged(shape: [usize; 2]) -> Option<QuantizedWeight> {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        match p.as_ref() {
            Some(q) if q.shape == shape => p.take(),
            _ => None,
        }
    })
}

/// Shape and settings of a [`Linear4bit`], kept on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear4bitMeta {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Data type, block size, double quantization.
    pub config: QuantConfig,
    /// The double quantization's offset (mean absmax); 0 without it.
    pub offset: f32,
}

/// A frozen linear layer with a blockwise 4-bit weight (NF4 or FP4), bitsandbytes-compatible.
#[derive(Module, Debug)]
pub struct Linear4bit<B: Backend> {
    /// The 4-bit codes, 8 per I32 word, then (with double quantization) the 8-bit absmax
    /// codes, 4 per word: the layout of [`Q4Weight::codes`].
    pub codes: Tensor<B, 1, Int>,
    /// The 16 code values, then the per-block absmax or (with double quantization) the 256
    /// values of the 8-bit map and one nested absmax per 256 blocks: the layout of
    /// [`Q4Weight::values`].
    pub values: Tensor<B, 1>,
    /// The bias, a (frozen unless a policy trains it) parameter.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Shape and settings.
    #[module(skip)]
    pub meta: Linear4bitMeta,
}

fn int_options<B: Backend>(device: &B::Device) -> TensorCreationOptions<B> {
    TensorCreationOptions::new(device.clone()).with_dtype(DType::I32)
}

/// Packs values below `2^bits` into I32 words, `32 / bits` per word, the first at bit 0.
fn pack_words(values: &[u8], bits: usize) -> impl Iterator<Item = i32> + '_ {
    let per = 32 / bits;
    values.chunks(per).map(move |c| {
        c.iter()
            .enumerate()
            .fold(0u32, |w, (j, &v)| w | (u32::from(v) << (bits * j)))
            .cast_signed()
    })
}

fn unpack_words_host(words: &[i32], bits: usize) -> Vec<u8> {
    let per = 32 / bits;
    let mask = (1u32 << bits) - 1;
    words
        .iter()
        .flat_map(|&w| {
            let w = w.cast_unsigned();
            (0..per).map(move |j| ((w >> (bits * j)) & mask) as u8)
        })
        .collect()
}

fn floats<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn ints<B: Backend>(v: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), int_options::<B>(device))
}

fn host_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

fn host_i32<B: Backend>(t: &Tensor<B, 1, Int>) -> Vec<i32> {
    t.to_data()
        .convert::<i32>()
        .to_vec::<i32>()
        .unwrap_or_default()
}

impl<B: Backend> Linear4bit<B> {
    /// Puts a quantized weight on the device, with the standard code tables.
    pub fn from_quantized(
        q: &QuantizedWeight,
        bias: Option<Tensor<B, 1>>,
        device: &B::Device,
    ) -> Self {
        let nested_map = dynamic_map().to_vec();
        Self::from_quantized_with_tables(q, &q.codes.quant_type.table(), &nested_map, bias, device)
    }

    /// Puts a quantized weight on the device with the given code tables (as read from a
    /// checkpoint's `quant_map` and `nested_quant_map`).
    ///
    /// # Panics
    /// If `table` does not hold 16 values, or (with double quantization) `nested_map` 256:
    /// the layout of [`Q4Weight::values`] has room for exactly those. The bitsandbytes
    /// loader checks both and reports a malformed file as an error.
    pub fn from_quantized_with_tables(
        q: &QuantizedWeight,
        table: &[f32],
        nested_map: &[f32],
        bias: Option<Tensor<B, 1>>,
        device: &B::Device,
    ) -> Self {
        assert_eq!(table.len(), TABLE_LEN, "a 4-bit code table has 16 values");
        assert!(
            q.double.is_none() || nested_map.len() == MAP_LEN,
            "the 8-bit map of double quantization has 256 values, not {}",
            nested_map.len()
        );
        let c = &q.codes;
        let blocks = c.numel.div_ceil(c.blocksize);
        let mut codes = crate::quant::unpack_nibbles(&c.packed, c.numel);
        codes.resize(blocks * c.blocksize, 0);
        let scale_codes = q.double.as_ref().map(|d| {
            let mut qa = d.codes.clone();
            qa.resize(blocks.div_ceil(NESTED_BLOCKSIZE) * NESTED_BLOCKSIZE, 0);
            qa
        });
        // Exact capacities: the tensors take the vectors' allocations as they are, so a
        // vector grown by appending would keep up to twice the codes' bytes.
        let mut words =
            Vec::with_capacity(codes.len() / 8 + scale_codes.as_ref().map_or(0, |qa| qa.len() / 4));
        words.extend(pack_words(&codes, 4));
        if let Some(qa) = &scale_codes {
            words.extend(pack_words(qa, 8));
        }
        let stats_len = match &q.double {
            Some(d) => MAP_LEN + d.nested_absmax.len(),
            None => c.absmax.len(),
        };
        let mut values = Vec::with_capacity(TABLE_LEN + stats_len);
        values.extend_from_slice(table);
        let offset = match &q.double {
            Some(d) => {
                values.extend_from_slice(nested_map);
                values.extend_from_slice(&d.nested_absmax);
                d.offset
            }
            None => {
                values.extend_from_slice(&c.absmax);
                0.0
            }
        };
        Self {
            codes: ints(words, device),
            values: floats(values, device),
            bias: bias.map(Param::from_tensor),
            meta: Linear4bitMeta {
                shape: q.shape,
                config: q.config(),
                offset,
            },
        }
    }

    /// Quantizes a dense `[out, in]` weight with `config` onto its device.
    ///
    /// # Errors
    /// [`QloraError::InvalidConfig`] for an unsupported block size.
    pub fn quantize(
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        config: &QuantConfig,
    ) -> Result<Self> {
        let device = weight.device();
        let shape = weight.dims();
        let q = QuantizedWeight::quantize(&host_f32(&weight), shape, config)?;
        Ok(Self::from_quantized(&q, bias.map(Tensor::detach), &device))
    }

    /// Reads the codes and statistics back from the device, in bitsandbytes' layout.
    pub fn to_quantized(&self) -> QuantizedWeight {
        let m = &self.meta;
        let numel = m.shape[0] * m.shape[1];
        let bs = m.config.blocksize;
        let w = self.q4_weight();
        let blocks = w.blocks();
        let all_codes = host_i32(&self.codes);
        let values = host_f32(&self.values);
        let mut codes = unpack_words_host(all_codes.get(..w.code_words()).unwrap_or_default(), 4);
        codes.truncate(numel);
        let qt = m.config.quant_type;
        if codes.len() % 2 == 1 {
            // bitsandbytes pads an odd count with the code of 0.
            let zero = crate::quant::quantize_4bit(&[0.0; 1], bs, qt)
                .map(|p| p.packed[0] >> 4)
                .unwrap_or(0);
            codes.push(zero);
        }
        let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let part = |r: Range<usize>| values.get(r).map(<[f32]>::to_vec).unwrap_or_default();
        let double = m.config.double_quant.then(|| {
            let mut c =
                unpack_words_host(all_codes.get(w.scale_code_words()).unwrap_or_default(), 8);
            c.truncate(blocks);
            DoubleQuant {
                codes: c,
                nested_absmax: part(w.nested_values()),
                offset: m.offset,
            }
        });
        let absmax = if double.is_some() {
            vec![]
        } else {
            part(w.absmax_values())
        };
        QuantizedWeight {
            codes: Packed4bit {
                packed,
                absmax,
                numel,
                blocksize: bs,
                quant_type: qt,
            },
            double,
            shape: m.shape,
        }
    }

    /// The code table on the device, read back (`weight.quant_map`).
    pub fn quant_map(&self) -> Vec<f32> {
        host_f32(&self.values.clone().slice(0..TABLE_LEN))
    }

    /// The nested map read back (`weight.nested_quant_map`), with double quantization.
    pub fn nested_quant_map(&self) -> Option<Vec<f32>> {
        self.meta
            .config
            .double_quant
            .then(|| host_f32(&self.values.clone().slice(MAP_VALUES)))
    }

    /// The per-block absmax as the dequantization uses it, on the device.
    pub fn block_absmax(&self) -> Tensor<B, 1> {
        self.q4_weight().absmax()
    }

    /// The codes, tables and block statistics as [`QuantBackend`] takes them.
    pub fn q4_weight(&self) -> Q4Weight<B> {
        Q4Weight {
            codes: self.codes.clone().into_primitive(),
            values: self.values.clone().into_primitive().tensor(),
            shape: self.meta.shape,
            blocksize: self.meta.config.blocksize,
            double_quant: self.meta.config.double_quant.then_some(self.meta.offset),
        }
    }

    /// Bytes the quantized weight occupies on the device (codes, statistics and tables;
    /// the bias is not counted).
    pub fn device_bytes(&self) -> usize {
        fn size<B: Backend, const D: usize, K: burn::tensor::BasicOps<B>>(
            t: &Tensor<B, D, K>,
        ) -> usize {
            t.shape().num_elements() * t.dtype().size()
        }
        size(&self.codes) + size(&self.values)
    }

    /// Number of weight parameters (`out * in`).
    pub fn num_weights(&self) -> usize {
        self.meta.shape[0] * self.meta.shape[1]
    }
}

impl<B: QuantBackend> LinearWeight<B> for Linear4bit<B> {
    /// Quantizes with [`current_quant_config`] (NF4, block 64, double quantization unless
    /// [`with_quant_config`] says otherwise), or takes the weight a bitsandbytes checkpoint
    /// loader staged for this layer. An unsupported configured block size cannot occur:
    /// [`with_quant_config`] validates it.
    fn from_dense(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        let device = weight.device();
        let shape = weight.dims();
        let q = match take_staged(shape) {
            Some(q) => q,
            None => {
                let config = current_quant_config();
                QuantizedWeight::quantize(&host_f32(&weight), shape, &config)
                    .or_else(|_| {
                        QuantizedWeight::quantize(
                            &host_f32(&weight),
                            shape,
                            &QuantConfig::default(),
                        )
                    })
                    .unwrap_or_else(|_| unreachable_quantize(shape))
            }
        };
        Self::from_quantized(&q, bias.map(Tensor::detach), &device)
    }

    fn in_features(&self) -> usize {
        self.meta.shape[1]
    }

    fn out_features(&self) -> usize {
        self.meta.shape[0]
    }

    /// `x W^T + b` through [`QuantBackend::q4_linear`]: on `Flex` a host kernel that reads
    /// the codes directly; under autodiff one node that keeps the codes, not the f32 weight,
    /// for the backward pass.
    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = B::q4_linear(x.into_primitive().tensor(), &self.q4_weight());
        let y = Tensor::from_primitive(TensorPrimitive::Float(y));
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
            None => y,
        }
    }

    fn weight(&self) -> Tensor<B, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(B::q4_dequantize(&self.q4_weight())))
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    /// Requantizes `weight` with this layer's settings (lossy: see
    /// [`crate::merge_requantize`] for the error it makes).
    fn set_weight(
        &mut self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> peft_core::Result<()> {
        let [out, inp] = weight.dims();
        if [out, inp] != self.meta.shape {
            return Err(PeftError::Unsupported(format!(
                "cannot set a [{out}, {inp}] weight on a 4-bit layer of shape {:?}",
                self.meta.shape
            )));
        }
        let device = weight.device();
        let q =
            QuantizedWeight::quantize(&host_f32(&weight.detach()), [out, inp], &self.meta.config)
                .map_err(|e| PeftError::Unsupported(e.to_string()))?;
        let table = self.quant_map();
        let nested = self
            .nested_quant_map()
            .unwrap_or_else(|| dynamic_map().to_vec());
        let old_bias = self.bias.take();
        let mut new = Self::from_quantized_with_tables(&q, &table, &nested, None, &device);
        new.bias = match (old_bias, bias) {
            (Some(old), Some(b)) => {
                let rg = old.is_require_grad();
                Some(Param::initialized(old.id, b.detach().set_require_grad(rg)))
            }
            (old, None) => old,
            (None, Some(_)) => {
                return Err(PeftError::Unsupported(
                    "cannot add a bias to a 4-bit linear layer that has none".into(),
                ));
            }
        };
        *self = new;
        Ok(())
    }
}

/// The default configuration is always valid; this only satisfies the types.
fn unreachable_quantize(shape: [usize; 2]) -> QuantizedWeight {
    let numel = shape[0] * shape[1];
    QuantizedWeight {
        codes: Packed4bit {
            packed: vec![0; numel.div_ceil(2)],
            absmax: vec![0.0; numel.div_ceil(64)],
            numel,
            blocksize: 64,
            quant_type: crate::quant::QuantType::Nf4,
        },
        double: None,
        shape,
    }
}

impl From<QloraError> for PeftError {
    fn from(e: QloraError) -> Self {
        match e {
            QloraError::Peft(p) => p,
            other => PeftError::Unsupported(other.to_string()),
        }
    }
}
