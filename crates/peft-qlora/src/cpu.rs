//! Host kernels for the 4-bit products on the CPU backend `Flex`.
//!
//! `Flex` keeps tensors in host memory, so the kernels read the packed codes where they lie:
//!
//! - up to [`FUSED_ROWS`] rows (decoding one token, or a few): a fused product that decodes
//!   32 codes (16 bytes) at a time into registers and multiplies them into the rows straight
//!   away, against `x` reordered once so that the low and high nibbles line up with it. It
//!   reads 0.5 bytes per weight where the f32 product reads 4, and writes no f32 weight.
//! - more rows (prefill, training): the weight is decoded a tile at a time (about
//!   [`TILE_BYTES`]; tiles of columns, so that each tile is one slice of the inner dimension)
//!   into a buffer that lives for the one product (nothing stays allocated between
//!   products, so a QLoRA step's peak is below LoRA's by what the 4-bit weights save), and
//!   the `gemm` crate (Flex's own matmul kernels) multiplies by the tile. The decode is linear in the weight's size,
//!   the product `rows` times that; no f32 weight is ever allocated, so training allocates
//!   and frees nothing per layer beyond the output.
//!
//! With AVX-512 (checked at run time) a code is decoded by `vpermps`: the 16 code values sit
//! in one register and each 4-bit code is a lane index. Elsewhere a scalar loop does the same.

use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, TensorData, TensorMetadata};
use burn_flex::FlexTensor;
use peft_models::flex::{Product, contiguous, gemm};
use rayon::prelude::*;

use crate::backend::{
    MAP_VALUES, Q4Weight, QuantBackend, TABLE_LEN, portable_dequantize, portable_linear,
    portable_linear_transposed,
};

/// Rows up to which [`QuantBackend::q4_linear`] runs the fused product.
pub const FUSED_ROWS: usize = 4;

/// Outputs per parallel task of the fused product.
const OUTPUTS_PER_TASK: usize = 32;

/// Size of the decoded tile of the weight in the tiled product.
///
/// The tile lives for one product, and the allocations made while it lives (the next
/// activations) fill its hole only in part, so larger tiles leave more freed but resident
/// memory behind. A QLoRA step of SmolLM2-135M (flex, 2 cores) peaked at 956-967 MB of RSS
/// with 2 MiB tiles and at 952-954 MB with 1 MiB, at the same speed and live heap
/// (docs/benchmarks.md); with 256 KiB it was about 10% slower.
pub const TILE_BYTES: usize = 1 << 20;

/// A decode tile of `n` values for the duration of `f`: allocated per call, so that no
/// memory stays behind between products.
fn with_tile<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut tile = vec![0.0f32; n];
    f(&mut tile)
}

/// Products below this many multiply-adds run on one thread (as Flex's matmul decides).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

fn parallel(m: usize, n: usize, k: usize) -> bool {
    m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD
}

/// The two tensors of a [`Q4Weight`] of `Flex`, contiguous (clones of the same storage
/// when they already are).
struct Parts {
    codes: FlexTensor,
    values: FlexTensor,
}

/// The per-block absmax, read on the host.
enum HostAbsmax<'a> {
    Plain(&'a [f32]),
    Double {
        codes: &'a [i32],
        nested: &'a [f32],
        map: &'a [f32; 256],
        offset: f32,
    },
}

impl HostAbsmax<'_> {
    /// Block `b`'s absmax, with the same operations in the same order as the portable path.
    #[inline]
    fn get(&self, b: usize) -> f32 {
        match self {
            Self::Plain(a) => a[b],
            Self::Double {
                codes,
                nested,
                map,
                offset,
            } => {
                let code = (codes[b / 4].cast_unsigned() >> (8 * (b % 4))) & 255;
                map[code as usize] * nested[b / crate::quant::NESTED_BLOCKSIZE] + offset
            }
        }
    }
}

/// A [`Q4Weight`] of `Flex`, viewed on the host.
struct HostWeight<'a> {
    words: &'a [i32],
    table: [f32; 16],
    absmax: HostAbsmax<'a>,
    out: usize,
    inp: usize,
    bs: usize,
}

impl Parts {
    /// `None` where the kernels do not apply (other dtypes, a block size that is not a
    /// multiple of 16).
    fn new(w: &Q4Weight<Flex>) -> Option<Self> {
        if w.blocksize % 16 != 0 || w.codes.dtype() != DType::I32 || w.values.dtype() != DType::F32
        {
            return None;
        }
        Some(Self {
            codes: contiguous(&w.codes),
            values: contiguous(&w.values),
        })
    }

    /// `None` when a tensor is shorter than the layout of `w` says.
    fn view(&self, w: &Q4Weight<Flex>) -> Option<HostWeight<'_>> {
        let codes = self.codes.storage::<i32>();
        let values = self.values.storage::<f32>();
        let words = w.code_words();
        let table: [f32; TABLE_LEN] = values.get(..TABLE_LEN)?.try_into().ok()?;
        let absmax = match w.double_quant {
            None => HostAbsmax::Plain(values.get(w.absmax_values())?),
            Some(offset) => HostAbsmax::Double {
                codes: codes.get(w.scale_code_words())?,
                map: values.get(MAP_VALUES)?.try_into().ok()?,
                nested: values.get(w.nested_values())?,
                offset,
            },
        };
        Some(HostWeight {
            words: codes.get(..words)?,
            table,
            absmax,
            out: w.shape[0],
            inp: w.shape[1],
            bs: w.blocksize,
        })
    }
}

impl HostWeight<'_> {
    /// Writes block `b`'s values (scaled by its absmax) into `dst`, at most one block long.
    fn decode_block(&self, b: usize, dst: &mut [f32]) {
        let lut = self.table.map(|v| v * self.absmax.get(b));
        decode(
            &lut,
            &self.words[b * self.bs / 8..(b + 1) * self.bs / 8],
            dst,
        );
    }

    /// The f32 weight, row-major `[out, in]`.
    fn dequantize(&self) -> Vec<f32> {
        let mut dst = vec![0.0f32; self.out * self.inp];
        self.decode_rows(0, &mut dst);
        dst
    }

    /// Decodes rows `first..` of the weight into `dst` (whole rows; `first * in` a multiple of
    /// the block size).
    fn decode_rows(&self, first: usize, dst: &mut [f32]) {
        let start = first * self.inp;
        debug_assert_eq!(start % self.bs, 0);
        let chunk = (16_384 / self.bs).max(1) * self.bs;
        dst.par_chunks_mut(chunk).enumerate().for_each(|(c, d)| {
            let first_block = (start + c * chunk) / self.bs;
            for (k, block) in d.chunks_mut(self.bs).enumerate() {
                self.decode_block(first_block + k, block);
            }
        });
    }

    /// Rows of the weight per tile: about [`TILE_BYTES`], and a whole number of blocks (or
    /// the whole weight, in one tile).
    fn tile_rows(&self) -> usize {
        let step = self.bs / gcd(self.inp, self.bs);
        let target = (TILE_BYTES / 4 / self.inp).max(1);
        target.div_ceil(step).saturating_mul(step).min(self.out)
    }

    /// Runs `f(first_row, tile)` over the weight decoded a tile of rows at a time.
    fn for_each_tile(&self, mut f: impl FnMut(usize, &[f32])) {
        let tile = self.tile_rows();
        with_tile(tile * self.inp, |scratch| {
            let mut first = 0;
            while first < self.out {
                let rows = tile.min(self.out - first);
                let buf = &mut scratch[..rows * self.inp];
                self.decode_rows(first, buf);
                f(first, buf);
                first += rows;
            }
        });
    }

    /// `x W^T` for `x` `[rows, in]`, a tile of `W` at a time: tiles of columns when every
    /// row of `W` is whole blocks, of rows otherwise.
    fn tiled_linear(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp) = (self.out, self.inp);
        assert_eq!(x.len(), rows * inp);
        let mut y = vec![0.0f32; rows * out];
        if inp.is_multiple_of(self.bs) {
            // Tiles of columns split the inner dimension: y += x[:, k0..k0 + kt] tile^T, so
            // gemm packs each part of `x` once; tiles of rows would pack all of it per tile.
            let kt = self.column_tile();
            with_tile(out * kt, |scratch| {
                let mut k0 = 0;
                while k0 < inp {
                    let k = kt.min(inp - k0);
                    let tile = &mut scratch[..out * k];
                    self.decode_columns(k0, k, tile);
                    // rhs (k = i, n = o) is tile[o * k + i].
                    gemm(Product {
                        m: rows,
                        n: out,
                        k,
                        dst: &mut y,
                        dst_rs: out,
                        accumulate: k0 > 0,
                        alpha: 1.0,
                        lhs: (&x[k0..], inp, 1),
                        rhs: (tile, 1, k),
                        parallel: parallel(rows, out, k),
                    });
                    k0 += k;
                }
            });
            return y;
        }
        self.for_each_tile(|first, tile| {
            let t = tile.len() / inp;
            // y[:, first..first + t] = x tile^T: rhs (k = i, n = o) is tile[o * in + i].
            gemm(Product {
                m: rows,
                n: t,
                k: inp,
                dst: &mut y[first..],
                dst_rs: out,
                accumulate: false,
                alpha: 1.0,
                lhs: (x, inp, 1),
                rhs: (tile, 1, inp),
                parallel: parallel(rows, t, inp),
            });
        });
        y
    }

    /// Columns per tile of [`Self::tiled_linear`]: about [`TILE_BYTES`], whole blocks.
    fn column_tile(&self) -> usize {
        let target = (TILE_BYTES / 4 / self.out.max(1)).max(1);
        (target.div_ceil(self.bs) * self.bs).min(self.inp)
    }

    /// Decodes columns `k0..k0 + k` of every row into `dst` (`[out, k]`); `in`, `k0` and `k`
    /// are multiples of the block size.
    fn decode_columns(&self, k0: usize, k: usize, dst: &mut [f32]) {
        let per_row = self.inp / self.bs;
        let rows_per_task = (16_384 / k).max(1);
        dst.par_chunks_mut(k * rows_per_task)
            .enumerate()
            .for_each(|(c, d)| {
                for (r, row) in d.chunks_mut(k).enumerate() {
                    let o = c * rows_per_task + r;
                    for (j, block) in row.chunks_mut(self.bs).enumerate() {
                        self.decode_block(o * per_row + k0 / self.bs + j, block);
                    }
                }
            });
    }

    /// `g W` for `g` `[rows, out]`, a tile of `W` at a time.
    fn tiled_linear_transposed(&self, g: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp) = (self.out, self.inp);
        assert_eq!(g.len(), rows * out);
        let mut y = vec![0.0f32; rows * inp];
        self.for_each_tile(|first, tile| {
            let t = tile.len() / inp;
            // y += g[:, first..first + t] tile: rhs (k = o, n = i) is tile[o * in + i].
            gemm(Product {
                m: rows,
                n: inp,
                k: t,
                dst: &mut y,
                dst_rs: inp,
                accumulate: first > 0,
                alpha: 1.0,
                lhs: (&g[first..], out, 1),
                rhs: (tile, inp, 1),
                parallel: parallel(rows, inp, t),
            });
        });
        y
    }

    /// `y[r][o] = sum_i W[o][i] x[r][i]` for `rows` rows of `x`; only when every row of `W`
    /// is whole blocks.
    fn fused_linear(&self, x: &[f32], rows: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        let deinterleaved = simd_enabled().then(|| simd::deinterleave(x));
        #[cfg(target_arch = "x86_64")]
        let x = deinterleaved.as_deref().unwrap_or(x);
        let mut yt = vec![0.0f32; self.out * rows];
        yt.par_chunks_mut(rows * OUTPUTS_PER_TASK)
            .enumerate()
            .for_each(|(c, ys)| {
                for (k, yo) in ys.chunks_mut(rows).enumerate() {
                    self.row_dot(c * OUTPUTS_PER_TASK + k, x, yo);
                }
            });
        // `[out, rows]` to `[rows, out]`.
        let mut y = vec![0.0f32; rows * self.out];
        for (o, yo) in yt.chunks(rows).enumerate() {
            for (r, v) in yo.iter().enumerate() {
                y[r * self.out + o] = *v;
            }
        }
        y
    }

    fn row_dot(&self, o: usize, x: &[f32], y: &mut [f32]) {
        let per_row = self.inp / self.bs;
        #[cfg(target_arch = "x86_64")]
        if simd_enabled() {
            simd::row_dot(self, o, x, y);
            return;
        }
        let mut values = vec![0.0f32; self.bs];
        y.fill(0.0);
        for k in 0..per_row {
            self.decode_block(o * per_row + k, &mut values);
            for (r, yr) in y.iter_mut().enumerate() {
                let xs = &x[r * self.inp + k * self.bs..][..self.bs];
                *yr += dot(&values, xs);
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A dot product in eight independent sums, which the compiler vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j];
        }
    }
    acc.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(p, q)| p * q).sum::<f32>()
}

/// Writes `lut[code]` for the codes of `words` (8 per word, the first at bit 0) into `dst`.
fn decode(lut: &[f32; 16], words: &[i32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() && dst.len().is_multiple_of(16) {
        simd::decode(lut, words, dst);
        return;
    }
    for (w, d) in words.iter().zip(dst.chunks_mut(8)) {
        let w = w.cast_unsigned();
        for (j, v) in d.iter_mut().enumerate() {
            *v = lut[((w >> (4 * j)) & 15) as usize];
        }
    }
}

/// Tests set it to run the scalar loops on a CPU with AVX-512.
#[cfg(test)]
static SCALAR_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the AVX-512 kernels run: the CPU has them (and no test asked for the scalar loops).
#[cfg(target_arch = "x86_64")]
fn simd_enabled() -> bool {
    #[cfg(test)]
    if SCALAR_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    simd::available()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // AVX-512 intrinsics; every pointer access is bounds-checked first
mod simd {
    use std::arch::x86_64::{
        __m512, __m512i, _mm_loadl_epi64, _mm_loadu_si128, _mm512_and_si512,
        _mm512_castsi128_si512, _mm512_cvtepu8_epi32, _mm512_fmadd_ps, _mm512_loadu_ps,
        _mm512_permutexvar_epi32, _mm512_permutexvar_ps, _mm512_reduce_add_ps, _mm512_set1_epi32,
        _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps, _mm512_srli_epi32, _mm512_srlv_epi32,
        _mm512_storeu_ps,
    };
    use std::sync::OnceLock;

    use super::{FUSED_ROWS, HostWeight};

    pub(super) fn available() -> bool {
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// The 16 codes of two words as lane indices: lanes 0-7 from the first word, 8-15 from
    /// the second, lane `j` of each half shifted right by `4j`.
    #[target_feature(enable = "avx512f")]
    fn codes(pair: &[i32]) -> __m512i {
        assert!(pair.len() >= 2);
        // SAFETY: `pair` holds at least the 8 bytes `_mm_loadl_epi64` reads.
        let both = unsafe { _mm_loadl_epi64(pair.as_ptr().cast()) };
        let spread = _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_castsi128_si512(both),
        );
        let shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        _mm512_and_si512(_mm512_srlv_epi32(spread, shifts), _mm512_set1_epi32(15))
    }

    #[target_feature(enable = "avx512f")]
    fn load16(s: &[f32]) -> __m512 {
        assert!(s.len() >= 16);
        // SAFETY: 16 floats are in bounds.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }

    /// `dst.len()` is a multiple of 16 and `words` holds `dst.len() / 8` words.
    pub(super) fn decode(lut: &[f32; 16], words: &[i32], dst: &mut [f32]) {
        // SAFETY: `available()` checked AVX-512F on this CPU.
        unsafe { decode_avx512(lut, words, dst) }
    }

    #[target_feature(enable = "avx512f")]
    fn decode_avx512(lut: &[f32; 16], words: &[i32], dst: &mut [f32]) {
        let table = load16(lut);
        for (pair, out) in words.chunks_exact(2).zip(dst.chunks_exact_mut(16)) {
            let v = _mm512_permutexvar_ps(codes(pair), table);
            // SAFETY: `out` is 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
        }
    }

    /// One output of up to [`FUSED_ROWS`] rows of `x`, deinterleaved; `w.inp` is a multiple of
    /// `w.bs`.
    pub(super) fn row_dot(w: &HostWeight<'_>, o: usize, x: &[f32], y: &mut [f32]) {
        // SAFETY: `available()` checked AVX-512F on this CPU.
        unsafe { row_dot_avx512(w, o, x, y) }
    }

    /// `x` with each run of 32 values reordered as its 16 even-indexed values, then its 16
    /// odd-indexed ones: the order in which [`row_dot`] decodes the codes of 4 words.
    pub(super) fn deinterleave(x: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        for (src, dst) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            for j in 0..16 {
                dst[j] = src[2 * j];
                dst[16 + j] = src[2 * j + 1];
            }
        }
        out
    }

    /// 16 bytes of codes as two vectors of lane indices: the low nibbles (the codes of the
    /// even-indexed values of these 32) and the high nibbles (the odd-indexed ones).
    #[target_feature(enable = "avx512f")]
    fn nibbles(words: &[i32]) -> (__m512i, __m512i) {
        assert!(words.len() >= 4);
        // SAFETY: `words` holds the 16 bytes `_mm_loadu_si128` reads.
        let bytes = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(words.as_ptr().cast()) });
        (
            _mm512_and_si512(bytes, _mm512_set1_epi32(15)),
            _mm512_srli_epi32::<4>(bytes),
        )
    }

    /// One output of up to [`FUSED_ROWS`] rows of `x`, deinterleaved ([`deinterleave`]);
    /// `w.inp` is a multiple of `w.bs`, which is a multiple of 32.
    #[target_feature(enable = "avx512f")]
    fn row_dot_avx512(w: &HostWeight<'_>, o: usize, x: &[f32], y: &mut [f32]) {
        let rows = y.len();
        assert!(rows <= FUSED_ROWS && x.len() >= rows * w.inp && w.bs.is_multiple_of(32));
        let table = load16(&w.table);
        let per_row = w.inp / w.bs;
        let words_per_block = w.bs / 8;
        let mut acc = [_mm512_setzero_ps(); FUSED_ROWS];
        for k in 0..per_row {
            let b = o * per_row + k;
            let words = &w.words[b * words_per_block..(b + 1) * words_per_block];
            let mut block = [_mm512_setzero_ps(); FUSED_ROWS];
            for (j, quad) in words.chunks_exact(4).enumerate() {
                let (even, odd) = nibbles(quad);
                let (even, odd) = (
                    _mm512_permutexvar_ps(even, table),
                    _mm512_permutexvar_ps(odd, table),
                );
                let at = k * w.bs + 32 * j;
                for r in 0..rows {
                    let xs = &x[r * w.inp + at..];
                    block[r] = _mm512_fmadd_ps(even, load16(xs), block[r]);
                    block[r] = _mm512_fmadd_ps(odd, load16(&xs[16..]), block[r]);
                }
            }
            let scale = _mm512_set1_ps(w.absmax.get(b));
            for r in 0..rows {
                acc[r] = _mm512_fmadd_ps(block[r], scale, acc[r]);
            }
        }
        for (r, yr) in y.iter_mut().enumerate() {
            *yr = _mm512_reduce_add_ps(acc[r]);
        }
    }
}

fn flex_f32(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, Shape::from(shape)))
}

/// The dequantized weight as a Flex tensor, or `None` where the host kernels do not apply.
fn dequantize_host(w: &Q4Weight<Flex>) -> Option<FlexTensor> {
    let parts = Parts::new(w)?;
    let host = parts.view(w)?;
    Some(flex_f32(host.dequantize(), w.shape.to_vec()))
}

/// `[.., last]` with the last dimension replaced.
fn with_last(mut dims: Vec<usize>, last: usize) -> Vec<usize> {
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    dims
}

/// Runs `kernel` on the host view of `weight` and of `input` (`[.., k]`, f32), giving
/// `[.., n]`; `None` where the host kernels do not apply.
fn on_host(
    input: &FlexTensor,
    weight: &Q4Weight<Flex>,
    [k, n]: [usize; 2],
    kernel: impl FnOnce(&HostWeight<'_>, &[f32], usize) -> Vec<f32>,
) -> Option<FlexTensor> {
    if input.dtype() != DType::F32 {
        return None;
    }
    let parts = Parts::new(weight)?;
    let host = parts.view(weight)?;
    let rows = input.shape().num_elements() / k.max(1);
    let values = contiguous(input);
    let y = kernel(&host, &values.storage::<f32>()[..rows * k], rows);
    Some(flex_f32(y, with_last(input.shape().to_vec(), n)))
}

impl QuantBackend for Flex {
    fn q4_linear(x: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        let [out, inp] = weight.shape;
        let fused = inp.is_multiple_of(weight.blocksize);
        on_host(&x, weight, [inp, out], |host, xs, rows| {
            if fused && rows <= FUSED_ROWS {
                host.fused_linear(xs, rows)
            } else {
                host.tiled_linear(xs, rows)
            }
        })
        .unwrap_or_else(|| portable_linear::<Self>(x, weight))
    }

    fn q4_linear_transposed(g: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        let [out, inp] = weight.shape;
        on_host(&g, weight, [out, inp], |host, gs, rows| {
            host.tiled_linear_transposed(gs, rows)
        })
        .unwrap_or_else(|| portable_linear_transposed::<Self>(g, weight))
    }

    fn q4_dequantize(weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        dequantize_host(weight).unwrap_or_else(|| {
            portable_dequantize::<Self>(weight)
                .into_primitive()
                .tensor()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use burn::backend::Flex;
    use burn::prelude::*;
    use peft_core::inject::LinearWeight;

    use crate::quant::QuantizedWeight;
    use crate::{Linear4bit, QuantConfig};

    /// Products and dequantization of one layer, as host vectors.
    fn run(layer: &Linear4bit<Flex>, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
        let [_, inp] = layer.meta.shape;
        let xt = Tensor::<Flex, 2>::from_data(
            TensorData::new(x.to_vec(), [rows, inp]),
            &Default::default(),
        );
        let y = LinearWeight::forward(layer, xt)
            .into_data()
            .to_vec()
            .unwrap();
        let w = LinearWeight::weight(layer).into_data().to_vec().unwrap();
        (y, w)
    }

    /// The scalar loops (the path of CPUs without AVX-512) against the host dequantization
    /// (checked against bitsandbytes in tests/bitsandbytes.rs) and an f64 product, on the
    /// fused product (1 and 3 rows) and the tiled one (7 rows). On a CPU without AVX-512 the
    /// integration tests already take this path; here it runs on any CPU.
    #[test]
    fn scalar_loops_match_the_dequantized_weight() {
        super::SCALAR_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
        for (shape, bs) in [([40, 128], 64), ([24, 96], 32)] {
            let n = shape[0] * shape[1];
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
                .collect();
            let q = QuantizedWeight::quantize(&w, shape, &QuantConfig::new().with_blocksize(bs))
                .unwrap();
            let want_w = q.dequantize();
            let layer = Linear4bit::<Flex>::from_quantized(&q, None, &Default::default());
            for rows in [1, 3, 7] {
                let x: Vec<f32> = (0..rows * shape[1])
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                    .collect();
                let (y, got_w) = run(&layer, &x, rows);
                assert_eq!(got_w, want_w, "{shape:?}: dequantized weight");
                for r in 0..rows {
                    for o in 0..shape[0] {
                        let (mut s, mut abs) = (0.0f64, 0.0f64);
                        for i in 0..shape[1] {
                            let p = f64::from(x[r * shape[1] + i])
                                * f64::from(want_w[o * shape[1] + i]);
                            s += p;
                            abs += p.abs();
                        }
                        let got = f64::from(y[r * shape[0] + o]);
                        assert!(
                            (got - s).abs() <= 1e-5 * abs + 1e-7,
                            "{shape:?}, {rows} rows: y[{r}][{o}] = {got}, want {s}"
                        );
                    }
                }
            }
        }
        super::SCALAR_ONLY.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}
