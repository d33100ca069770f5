//! Blockwise 4-bit quantization and double quantization on the host, byte for byte as
//! bitsandbytes does it on the CPU.
//!
//! A tensor is flattened (row-major) and cut into blocks of `blocksize` values; the last
//! block may be shorter. Each block keeps `absmax = max |x|`; each value becomes the code
//! whose table value is nearest to `x / absmax`: bitsandbytes' CPU quantizer
//! (`quantize_4bit`, plain torch) clamps `x * (1 / absmax)` to [-1, 1] (the short last
//! block divides, `x / absmax`) and `torch.bucketize`s it against the midpoints of the
//! sorted table, so a value exactly on a midpoint takes the *lower* code. Two codes share a
//! byte, the first in the high nibble; an odd count is padded with the code of 0.
//!
//! Double quantization stores the absmax values as 8 bits: subtract their mean (the
//! `offset`), then quantize in blocks of 256 with the signed dynamic map, as bitsandbytes'
//! C++ CPU kernel `quantize_blockwise` does it (a 65536-entry lookup table of nearest
//! codes, indexed by `round((v + 1) / 2 * 65535)`). Dequantized, the absmax is
//! `map[q] * nested_absmax + offset`, in f32, as bitsandbytes computes it.

use crate::codes::{FP4, FP4_ORDER, NF4, dynamic_map};
use crate::error::{QloraError, Result};

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QuantType {
    /// 4-bit NormalFloat (the QLoRA default).
    #[default]
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantType {
    /// The 16 values, indexed by code.
    pub fn table(self) -> [f32; 16] {
        match self {
            Self::Nf4 => NF4,
            Self::Fp4 => FP4,
        }
    }

    /// bitsandbytes' name: `"nf4"` or `"fp4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// Parses `"nf4"` / `"fp4"` (any case).
    ///
    /// # Errors
    /// [`QloraError::InvalidConfig`] for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(Self::Nf4),
            "fp4" => Ok(Self::Fp4),
            _ => Err(QloraError::InvalidConfig(format!(
                "unknown 4-bit quant type `{s}`; use nf4 or fp4"
            ))),
        }
    }

    /// The code of every sorted position (identity for NF4, [`FP4_ORDER`] for FP4).
    fn order(self) -> [u8; 16] {
        match self {
            Self::Nf4 => std::array::from_fn(|i| i as u8),
            Self::Fp4 => FP4_ORDER,
        }
    }

    /// Midpoints between consecutive sorted values, computed in f32 as bitsandbytes does.
    fn bounds(self) -> [f32; 15] {
        let table = self.table();
        let order = self.order();
        std::array::from_fn(|i| (table[order[i] as usize] + table[order[i + 1] as usize]) / 2.0)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The block size of the nested (double) quantization, fixed by bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;

/// How to quantize: data type, block size, double quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantConfig {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Values per absmax block: one of [`BLOCK_SIZES`] (default 64).
    pub blocksize: usize,
    /// Whether the absmax values are themselves quantized to 8 bits (default true, as
    /// QLoRA does; needed for the 0.52 bytes per parameter).
    pub double_quant: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl QuantConfig {
    /// NF4, block size 64, double quantization: QLoRA's settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// With another data type.
    pub fn with_quant_type(mut self, quant_type: QuantType) -> Self {
        self.quant_type = quant_type;
        self
    }

    /// With another block size.
    pub fn with_blocksize(mut self, blocksize: usize) -> Self {
        self.blocksize = blocksize;
        self
    }

    /// With or without double quantization.
    pub fn with_double_quant(mut self, double_quant: bool) -> Self {
        self.double_quant = double_quant;
        self
    }

    /// Checks the block size.
    ///
    /// # Errors
    /// [`QloraError::InvalidConfig`] for a block size bitsandbytes does not accept.
    pub fn validate(&self) -> Result<()> {
        if !BLOCK_SIZES.contains(&self.blocksize) {
            return Err(QloraError::InvalidConfig(format!(
                "block size {} is not supported; use one of {BLOCK_SIZES:?} (64 is the default)",
                self.blocksize
            )));
        }
        Ok(())
    }
}

/// Blockwise 4-bit codes in bitsandbytes' layout, with plain f32 statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed4bit {
    /// Two codes per byte, the first in the high nibble: `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// One absmax per block: `ceil(n / blocksize)` values.
    pub absmax: Vec<f32>,
    /// Number of values.
    pub numel: usize,
    /// Values per block.
    pub blocksize: usize,
    /// The data type.
    pub quant_type: QuantType,
}

/// Quantizes `values` (a flattened tensor) as `bitsandbytes.functional.quantize_4bit` does
/// on the CPU with `compress_statistics=False`: same bytes, same absmax.
///
/// # Errors
/// [`QloraError::InvalidConfig`] for an unsupported block size.
pub fn quantize_4bit(
    values: &[f32],
    blocksize: usize,
    quant_type: QuantType,
) -> Result<Packed4bit> {
    QuantConfig::new().with_blocksize(blocksize).validate()?;
    let bounds = quant_type.bounds();
    let order = quant_type.order();
    let code_of = |scaled: f32| -> u8 {
        // torch.bucketize(right=False): the number of bounds strictly below the value.
        let i = bounds.iter().take_while(|&&b| b < scaled).count();
        order[i]
    };
    let n = values.len();
    let full = n - n % blocksize;
    let mut codes = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for block in values[..full].chunks(blocksize) {
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let inv = 1.0f32 / am.max(1e-38);
        codes.extend(block.iter().map(|&v| code_of((v * inv).clamp(-1.0, 1.0))));
    }
    if full < n {
        let rest = &values[full..];
        let am = rest.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-38);
        absmax.push(am);
        codes.extend(rest.iter().map(|&v| code_of((v / am).clamp(-1.0, 1.0))));
    }
    if codes.len() % 2 == 1 {
        codes.push(code_of(0.0));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    Ok(Packed4bit {
        packed,
        absmax,
        numel: n,
        blocksize,
        quant_type,
    })
}

/// The 4-bit codes of a packed buffer, one per value (high nibble first).
pub fn unpack_nibbles(packed: &[u8], numel: usize) -> Vec<u8> {
    packed
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .take(numel)
        .collect()
}

/// `table[code] * absmax[block]` for every value, in f32, as bitsandbytes dequantizes.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    numel: usize,
    blocksize: usize,
    quant_type: QuantType,
) -> Vec<f32> {
    let table = quant_type.table();
    unpack_nibbles(packed, numel)
        .into_iter()
        .enumerate()
        .map(|(i, c)| table[c as usize] * absmax[i / blocksize])
        .collect()
}

/// Blockwise 8-bit codes with f32 absmax, as `bitsandbytes.functional.quantize_blockwise`.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8bit {
    /// One code per value.
    pub codes: Vec<u8>,
    /// One absmax per block.
    pub absmax: Vec<f32>,
    /// Values per block.
    pub blocksize: usize,
}

/// bitsandbytes' C++ CPU lookup table: for 65536 evenly spaced points of [-1, 1], the index
/// of the first code whose upper midpoint is not below the point.
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    const LUT: usize = 65536;
    let mid: Vec<f32> = (0..255).map(|i| 0.5f32 * (code[i] + code[i + 1])).collect();
    let mut lut = vec![0u8; LUT];
    let mut idx = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT - 1) as f32;
        while idx < 255 && mid[idx] < val {
            idx += 1;
        }
        *slot = idx as u8;
    }
    lut
}

/// Quantizes `values` to 8 bits with the dynamic map in blocks of `blocksize`, as
/// bitsandbytes' CPU kernel (`cquantize_blockwise_cpu_fp32`) does.
pub fn quantize_blockwise_8bit(values: &[f32], blocksize: usize) -> Blockwise8bit {
    let lut = quantize_lut(&dynamic_map());
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        codes.extend(block.iter().map(|&v| {
            let v = (v * inv).clamp(-1.0, 1.0);
            // Truncation toward zero of a non-negative value, as the C++ cast does.
            let i = ((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize;
            lut[i.min(65535)]
        }));
    }
    Blockwise8bit {
        codes,
        absmax,
        blocksize,
    }
}

/// Double-quantized absmax values, as bitsandbytes' nested `QuantState`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// 8-bit codes of `absmax - offset`, one per 4-bit block (`weight.absmax`).
    pub codes: Vec<u8>,
    /// The absmax of every block of 256 codes (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean of the original absmax values (`nested_offset`).
    pub offset: f32,
}

impl DoubleQuant {
    /// Quantizes absmax values as `quantize_4bit(..., compress_statistics=True)` does:
    /// `offset = mean(absmax)`, then 8-bit blockwise codes of `absmax - offset`.
    pub fn quantize(absmax: &[f32]) -> Self {
        // torch's f32 mean sums with more precision than a naive f32 loop; summing in f64
        // and rounding once gives the correctly rounded mean.
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len() as f64) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let q = quantize_blockwise_8bit(&centred, NESTED_BLOCKSIZE);
        Self {
            codes: q.codes,
            nested_absmax: q.absmax,
            offset,
        }
    }

    /// The absmax values bitsandbytes dequantizes: `map[q] * nested_absmax + offset` (f32).
    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.nested_absmax[i / NESTED_BLOCKSIZE] + self.offset)
            .collect()
    }
}

/// A quantized weight on the host: codes, statistics and shape, in bitsandbytes' layout.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    /// The packed 4-bit codes; with `double` set, `codes.absmax` is empty (the file keeps
    /// only the 8-bit codes of the absmax).
    pub codes: Packed4bit,
    /// The double-quantized absmax, if any.
    pub double: Option<DoubleQuant>,
    /// The shape `[out, in]`.
    pub shape: [usize; 2],
}

impl QuantizedWeight {
    /// Quantizes a row-major `[out, in]` weight with `config`.
    ///
    /// # Errors
    /// [`QloraError::InvalidConfig`] for an unsupported block size, or a shape that does not
    /// match the number of values.
    pub fn quantize(values: &[f32], shape: [usize; 2], config: &QuantConfig) -> Result<Self> {
        config.validate()?;
        if values.len() != shape[0] * shape[1] {
            return Err(QloraError::InvalidConfig(format!(
                "{} values do not make a {shape:?} weight",
                values.len()
            )));
        }
        let mut codes = quantize_4bit(values, config.blocksize, config.quant_type)?;
        let double = config.double_quant.then(|| {
            let d = DoubleQuant::quantize(&codes.absmax);
            codes.absmax.clear();
            d
        });
        Ok(Self {
            codes,
            double,
            shape,
        })
    }

    /// The absmax values the dequantization uses (double-quantized ones dequantized).
    pub fn absmax(&self) -> Vec<f32> {
        match &self.double {
            Some(d) => d.dequantize(),
            None => self.codes.absmax.clone(),
        }
    }

    /// The dequantized weight, row-major `[out, in]`, as bitsandbytes computes it.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_4bit(
            &self.codes.packed,
            &self.absmax(),
            self.codes.numel,
            self.codes.blocksize,
            self.codes.quant_type,
        )
    }

    /// The configuration this weight was quantized with.
    pub fn config(&self) -> QuantConfig {
        QuantConfig {
            quant_type: self.codes.quant_type,
            blocksize: self.codes.blocksize,
            double_quant: self.double.is_some(),
        }
    }
}
