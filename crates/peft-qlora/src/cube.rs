//! CubeCL kernels for the 4-bit products on the GPU backends (`CubeBackend`: wgpu, CUDA).
//!
//! Both products decode the weight inside the matmul tile: a cube loads a tile of `x` and
//! decodes the matching tile of 4-bit codes into shared memory (code, table value, block
//! scale), multiplies, and moves on along the inner dimension. The f32 weight never exists
//! in device memory; what the products read from it is half a byte per weight plus the
//! per-block scales.
//!
//! - [`q4_tiled`]: `x W^T` (the forward pass) and `g W` (the input gradient), 64 x 64
//!   output tiles, 16 x 16 units each computing 4 x 4 outputs, 16 values of the inner
//!   dimension per step.
//! - [`q4_matvec`]: `x W^T` for a few rows of `x` (decoding, one token at a time): 8 output
//!   rows per cube, 32 units per row each reading whole 32-bit words (8 codes, one block
//!   scale) and a reduction in shared memory. A tiled product would start only
//!   `out / 64` cubes for one row of `x`, too few to keep a GPU busy.
//!
//! The block scales are resolved first (for double quantization: the 8-bit code through the
//! map, times the group's nested absmax, plus the offset), one f32 per block: 1/64 of the
//! weight's f32 size at the default block size.
//!
//! Only f32 activations and i32 words take these kernels; anything else (an f16 tensor on
//! the same backend) takes the portable path.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use crate::backend::{Q4Weight, QuantBackend, portable_linear, portable_linear_transposed};

/// Output tile side of [`q4_tiled`].
const TILE: usize = 64;
/// Inner-dimension step of [`q4_tiled`].
const STEP: usize = 16;
/// Units per side of [`q4_tiled`]'s cube; each computes `TILE / UNITS` squared outputs.
const UNITS: usize = 16;
/// Output rows per cube of [`q4_matvec`].
const MATVEC_ROWS: usize = 8;
/// Units per output row of [`q4_matvec`].
const MATVEC_LANES: usize = 32;
const _: () = assert!(
    MATVEC_LANES == 1 << 5,
    "the reduction takes 5 halving steps"
);

/// Rows of `x` up to which [`QuantBackend::q4_linear`] takes [`q4_matvec`].
pub const MATVEC_MAX_ROWS: usize = 8;

/// Weight element `idx` (row-major `[out, in]`): its 4-bit code through the table, times
/// its block's scale.
#[cube]
fn weight_at(
    words: &Array<i32>,
    table: &Array<f32>,
    scales: &Array<f32>,
    idx: usize,
    bs: usize,
) -> f32 {
    let word = words[idx / 8];
    let code = (word >> (((idx % 8) * 4) as i32)) & 15;
    table[code as usize] * scales[idx / bs]
}

/// `y[r, c] = sum_k x[r, k] w(k, c)` with `w(k, c) = W[c, k]`, or `W[k, c]` when
/// `transposed`; `x` is `[rows, inner]`, `y` `[rows, cols]`, `W` `[out, in]` (`in` given).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn q4_tiled_kernel(
    x: &Array<f32>,
    words: &Array<i32>,
    table: &Array<f32>,
    scales: &Array<f32>,
    y: &mut Array<f32>,
    rows: usize,
    cols: usize,
    inner: usize,
    inp: usize,
    bs: usize,
    #[comptime] transposed: bool,
) {
    let mut xs = SharedMemory::<f32>::new(TILE * STEP);
    let mut ws = SharedMemory::<f32>::new(STEP * TILE);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let unit = ty * UNITS + tx;
    let row0 = CUBE_POS_Y as usize * TILE;
    let col0 = CUBE_POS_X as usize * TILE;
    let per = TILE / UNITS;

    let mut acc = Array::<f32>::new(per * per);
    #[unroll]
    for i in 0..per * per {
        acc[i] = 0.0;
    }

    let mut k0 = 0usize;
    while k0 < inner {
        // Each unit loads TILE * STEP / UNITS^2 = 4 values of each tile.
        #[unroll]
        for l in 0..(TILE * STEP) / (UNITS * UNITS) {
            let e = unit + l * UNITS * UNITS;
            // x tile [TILE rows][STEP]: consecutive units read consecutive k.
            let xr = e / STEP;
            let xk = e % STEP;
            let (r, k) = (row0 + xr, k0 + xk);
            let mut xv = 0.0f32;
            if r < rows && k < inner {
                xv = x[r * inner + k];
            }
            xs[xr * STEP + xk] = xv;

            // w tile [STEP][TILE cols]: consecutive units read consecutive weight elements,
            // along `in` (k for the forward product, c for the transposed one).
            let mut wk = e % STEP;
            let mut wc = e / STEP;
            if comptime![transposed] {
                wk = e / TILE;
                wc = e % TILE;
            }
            let (k, c) = (k0 + wk, col0 + wc);
            let mut wv = 0.0f32;
            if k < inner && c < cols {
                let mut idx = c * inp + k;
                if comptime![transposed] {
                    idx = k * inp + c;
                }
                wv = weight_at(words, table, scales, idx, bs);
            }
            ws[wk * TILE + wc] = wv;
        }
        sync_cube();

        #[unroll]
        for kk in 0..STEP {
            #[unroll]
            for i in 0..per {
                let a = xs[(ty + i * UNITS) * STEP + kk];
                #[unroll]
                for j in 0..per {
                    acc[i * per + j] += a * ws[kk * TILE + tx + j * UNITS];
                }
            }
        }
        sync_cube();
        k0 += STEP;
    }

    #[unroll]
    for i in 0..per {
        let r = row0 + ty + i * UNITS;
        #[unroll]
        for j in 0..per {
            let c = col0 + tx + j * UNITS;
            if r < rows && c < cols {
                y[r * cols + c] = acc[i * per + j];
            }
        }
    }
}

/// `y[r, o] = sum_i x[r, i] W[o, i]` for row `r = CUBE_POS_Z`; `in` is a multiple of 8 and
/// `bs` of 8, so a word is 8 codes of one row and one block.
#[cube(launch)]
fn q4_matvec_kernel(
    x: &Array<f32>,
    words: &Array<i32>,
    table: &Array<f32>,
    scales: &Array<f32>,
    y: &mut Array<f32>,
    out: usize,
    inp: usize,
    bs: usize,
) {
    let mut partial = SharedMemory::<f32>::new(MATVEC_ROWS * MATVEC_LANES);
    let lane = UNIT_POS_X as usize;
    let local = UNIT_POS_Y as usize;
    let o = CUBE_POS_X as usize * MATVEC_ROWS + local;
    let r = CUBE_POS_Z as usize;
    let per_row = inp / 8;

    let mut acc = 0.0f32;
    if o < out {
        let first = o * per_row;
        let mut w = lane;
        while w < per_row {
            let word = words[first + w];
            let scale = scales[(first + w) * 8 / bs];
            let xb = r * inp + w * 8;
            let mut s = 0.0f32;
            #[unroll]
            for j in 0..8usize {
                let code = (word >> ((j * 4) as i32)) & 15;
                s += table[code as usize] * x[xb + j];
            }
            acc += s * scale;
            w += MATVEC_LANES;
        }
    }
    partial[local * MATVEC_LANES + lane] = acc;
    sync_cube();

    // log2(MATVEC_LANES) halving steps.
    #[unroll]
    for step in 1..6usize {
        let width = MATVEC_LANES >> step;
        if lane < width {
            let a = partial[local * MATVEC_LANES + lane + width];
            partial[local * MATVEC_LANES + lane] += a;
        }
        sync_cube();
    }
    if lane == 0 && o < out {
        y[r * out + o] = partial[local * MATVEC_LANES];
    }
}

type Cube<R, BT> = CubeBackend<R, f32, i32, BT>;

/// The parts the kernels read, contiguous, with the block scales resolved to f32; `None`
/// when a tensor is not f32 / i32 (the portable path takes those).
struct Parts<R: CubeRuntime> {
    words: CubeTensor<R>,
    table: CubeTensor<R>,
    scales: CubeTensor<R>,
}

fn parts<R: CubeRuntime, BT: BoolElement>(w: &Q4Weight<Cube<R, BT>>) -> Option<Parts<R>> {
    if w.codes.dtype != DType::I32 || w.values.dtype != DType::F32 {
        return None;
    }
    // The kernels index the 4-bit words from 0; the 8-bit codes after them go unread.
    Some(Parts {
        words: into_contiguous(w.codes.clone()),
        table: into_contiguous(w.table().into_primitive().tensor()),
        scales: into_contiguous(w.absmax().into_primitive().tensor()),
    })
}

/// `x` as a contiguous `[rows, last]` f32 tensor and its leading dimensions, or `None` when
/// it is not f32.
fn rows_of<R: CubeRuntime>(x: CubeTensor<R>) -> Option<(CubeTensor<R>, usize, Vec<usize>)> {
    if x.dtype != DType::F32 {
        return None;
    }
    let dims = x.shape().to_vec();
    let leading = dims[..dims.len() - 1].to_vec();
    let rows = leading.iter().product::<usize>();
    Some((into_contiguous(x), rows, leading))
}

fn output<R: CubeRuntime>(
    like: &CubeTensor<R>,
    mut leading: Vec<usize>,
    last: usize,
) -> CubeTensor<R> {
    leading.push(last);
    empty_device::<R, f32>(
        like.client.clone(),
        like.device.clone(),
        Shape::from(leading),
    )
}

/// `x W^T` (or `x W` when `transposed`) through the tiled kernel: `x` is `[.., inner]`.
pub fn q4_tiled<R: CubeRuntime, BT: BoolElement>(
    x: CubeTensor<R>,
    w: &Q4Weight<Cube<R, BT>>,
    transposed: bool,
) -> Option<CubeTensor<R>> {
    let [out, inp] = w.shape;
    let (inner, cols) = if transposed { (out, inp) } else { (inp, out) };
    let p = parts(w)?;
    let (x, rows, leading) = rows_of(x)?;
    let y = output(&x, leading, cols);
    let count = CubeCount::Static(cols.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1);
    let dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    q4_tiled_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_array_arg(),
        p.words.into_array_arg(),
        p.table.into_array_arg(),
        p.scales.into_array_arg(),
        y.clone().into_array_arg(),
        rows,
        cols,
        inner,
        inp,
        w.blocksize,
        transposed,
    );
    Some(y)
}

/// `x W^T` through the matrix-vector kernel, for at most [`MATVEC_MAX_ROWS`] rows and `in` a
/// multiple of 8.
pub fn q4_matvec<R: CubeRuntime, BT: BoolElement>(
    x: CubeTensor<R>,
    w: &Q4Weight<Cube<R, BT>>,
) -> Option<CubeTensor<R>> {
    let [out, inp] = w.shape;
    if !inp.is_multiple_of(8) || !w.blocksize.is_multiple_of(8) {
        return None;
    }
    let p = parts(w)?;
    let (x, rows, leading) = rows_of(x)?;
    let y = output(&x, leading, out);
    let count = CubeCount::Static(out.div_ceil(MATVEC_ROWS) as u32, 1, rows as u32);
    let dim = CubeDim::new_2d(MATVEC_LANES as u32, MATVEC_ROWS as u32);
    q4_matvec_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_array_arg(),
        p.words.into_array_arg(),
        p.table.into_array_arg(),
        p.scales.into_array_arg(),
        y.clone().into_array_arg(),
        out,
        inp,
        w.blocksize,
    );
    Some(y)
}

fn rows_in<R: CubeRuntime>(x: &CubeTensor<R>) -> usize {
    let dims = x.shape().to_vec();
    dims[..dims.len() - 1].iter().product()
}

/// The GPU backends (wgpu, CUDA) with f32 floats and i32 integers, which is what
/// `burn::backend::Wgpu` and `burn::backend::Cuda` are. The dequantization stays the
/// portable one (burn's element-wise kernels).
impl<R: CubeRuntime, BT: BoolElement> QuantBackend for Cube<R, BT> {
    fn q4_linear(x: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        if x.shape().num_elements() == 0 {
            return portable_linear::<Self>(x, weight);
        }
        let fast = if rows_in(&x) <= MATVEC_MAX_ROWS {
            q4_matvec(x.clone(), weight)
        } else {
            None
        };
        fast.or_else(|| q4_tiled(x.clone(), weight, false))
            .unwrap_or_else(|| portable_linear::<Self>(x, weight))
    }

    fn q4_linear_transposed(g: FloatTensor<Self>, weight: &Q4Weight<Self>) -> FloatTensor<Self> {
        if g.shape().num_elements() == 0 {
            return portable_linear_transposed::<Self>(g, weight);
        }
        q4_tiled(g.clone(), weight, true)
            .unwrap_or_else(|| portable_linear_transposed::<Self>(g, weight))
    }
}
