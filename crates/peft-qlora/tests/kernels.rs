//! The 4-bit products on every path (flex's fused product and its dequantize-then-matmul
//! path, the portable burn ops on ndarray, the autodiff node's backward pass) against an f64
//! product with the host dequantization, which `bitsandbytes.rs` checks against bitsandbytes.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::inject::LinearWeight;
use peft_qlora::quant::QuantizedWeight;
use peft_qlora::{Linear4bit, QuantBackend, QuantConfig, QuantType};

use peft_testing::uniform as values;

/// `[out, in]`, block size, double quantization, data type: rows of whole blocks (the fused
/// product), rows that end inside a block and an odd element count (the fallback), one
/// block per row, FP4, and weights over 2 MiB that the tiled product takes in two tiles
/// (whole rows; the second with rows ending inside a block).
const CASES: [([usize; 2], usize, bool, QuantType); 7] = [
    ([1030, 640], 64, true, QuantType::Nf4),
    ([1031, 600], 64, false, QuantType::Fp4),
    ([48, 128], 64, true, QuantType::Nf4),
    ([40, 96], 32, false, QuantType::Nf4),
    ([33, 50], 64, true, QuantType::Nf4),
    ([16, 512], 512, true, QuantType::Fp4),
    ([24, 256], 128, false, QuantType::Fp4),
];

fn quantized(case: usize) -> (QuantizedWeight, Vec<f32>) {
    let (shape, bs, double, qt) = CASES[case];
    let w: Vec<f32> = values(shape[0] * shape[1], case as u64 + 7)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    let config = QuantConfig::new()
        .with_quant_type(qt)
        .with_blocksize(bs)
        .with_double_quant(double);
    let q = QuantizedWeight::quantize(&w, shape, &config).unwrap();
    let dequantized = q.dequantize();
    (q, dequantized)
}

/// `a [m, k] b^T` for `b [n, k]` (or `a b` for `b [k, n]` when `transposed`), in f64, with
/// the sum of absolute products of each output for a tolerance.
fn reference(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    transposed: bool,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut abs) = (0.0f64, 0.0f64);
            for l in 0..k {
                let bv = if transposed {
                    b[l * n + j]
                } else {
                    b[j * k + l]
                };
                let p = f64::from(a[i * k + l]) * f64::from(bv);
                s += p;
                abs += p.abs();
            }
            out.push((s, abs));
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[(f64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, (w, abs))) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs();
        assert!(
            err <= 1e-5 * abs + 1e-7,
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

fn forward_matches<Bk: QuantBackend>(backend: &str) {
    let device = Default::default();
    for case in 0..CASES.len() {
        let (q, w) = quantized(case);
        let [out, inp] = q.shape;
        let layer = Linear4bit::<Bk>::from_quantized(&q, None, &device);
        for rows in [1, 2, 4, 5, 17, 70] {
            let x = values(rows * inp, 100 + rows as u64);
            let xt =
                Tensor::<Bk, 3>::from_data(TensorData::new(x.clone(), [1, rows, inp]), &device);
            let y: Vec<f32> = LinearWeight::forward(&layer, xt)
                .into_data()
                .to_vec()
                .unwrap();
            let want = reference(&x, &w, rows, inp, out, false);
            assert_close(&y, &want, &format!("{backend} case {case}, {rows} rows"));
        }
    }
}

#[test]
fn flex_products_match_the_dequantized_weight() {
    forward_matches::<Flex>("flex");
}

#[test]
fn portable_products_match_the_dequantized_weight() {
    forward_matches::<NdArray>("ndarray");
}

/// Under autodiff the input gradient of `sum(c * (x W^T))` is `c W`, computed by the node's
/// backward pass from the codes.
fn input_gradient_matches<Bk>(backend: &str)
where
    Bk: AutodiffBackend + QuantBackend,
{
    let device = Default::default();
    for case in 0..CASES.len() {
        let (q, w) = quantized(case);
        let [out, inp] = q.shape;
        let layer = Linear4bit::<Bk>::from_quantized(&q, None, &device);
        for rows in [1, 6] {
            let x = values(rows * inp, 200 + rows as u64);
            let c = values(rows * out, 300 + rows as u64);
            let xt =
                Tensor::<Bk, 2>::from_data(TensorData::new(x, [rows, inp]), &device).require_grad();
            let ct = Tensor::<Bk, 2>::from_data(TensorData::new(c.clone(), [rows, out]), &device);
            let y = LinearWeight::forward(&layer, xt.clone());
            let grads = (y * ct).sum().backward();
            let gx: Vec<f32> = xt.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let want = reference(&c, &w, rows, out, inp, true);
            assert_close(
                &gx,
                &want,
                &format!("{backend} case {case}, {rows} rows: dL/dx"),
            );
        }
    }
}

#[test]
fn flex_backward_gives_the_input_gradient() {
    input_gradient_matches::<Autodiff<Flex>>("flex");
}

#[test]
fn portable_backward_gives_the_input_gradient() {
    input_gradient_matches::<Autodiff<NdArray>>("ndarray");
}

#[cfg(feature = "wgpu")]
mod wgpu {
    //! The CubeCL kernels (`peft_qlora::cube`), on wgpu: on a machine without a GPU through
    //! Mesa's software Vulkan driver.

    use super::*;
    use burn::backend::Wgpu;
    use burn::tensor::TensorPrimitive;

    #[test]
    fn wgpu_products_match_the_dequantized_weight() {
        forward_matches::<Wgpu>("wgpu");
    }

    #[test]
    fn wgpu_backward_gives_the_input_gradient() {
        input_gradient_matches::<Autodiff<Wgpu>>("wgpu");
    }

    /// The kernels themselves, called directly: each case takes them (none falls back to
    /// the portable path), for the forward product at 1 and 3 rows (the matrix-vector
    /// kernel where `in` is a multiple of 8) and 70 rows (two row tiles), and for the
    /// transposed product.
    #[test]
    fn cube_kernels_match_the_dequantized_weight() {
        let device = Default::default();
        for case in 0..CASES.len() {
            let (q, w) = quantized(case);
            let [out, inp] = q.shape;
            let layer = Linear4bit::<Wgpu>::from_quantized(&q, None, &device);
            let weight = layer.q4_weight();
            for rows in [1, 3, 70] {
                let x = values(rows * inp, 400 + rows as u64);
                let xt =
                    Tensor::<Wgpu, 2>::from_data(TensorData::new(x.clone(), [rows, inp]), &device)
                        .into_primitive()
                        .tensor();
                let y = if rows <= peft_qlora::cube::MATVEC_MAX_ROWS && inp % 8 == 0 {
                    peft_qlora::cube::q4_matvec(xt, &weight)
                } else {
                    peft_qlora::cube::q4_tiled(xt, &weight, false)
                };
                let y: Vec<f32> = Tensor::<Wgpu, 2>::from_primitive(TensorPrimitive::Float(
                    y.expect("the kernel takes f32 and i32 tensors"),
                ))
                .into_data()
                .to_vec()
                .unwrap();
                let want = reference(&x, &w, rows, inp, out, false);
                assert_close(&y, &want, &format!("wgpu kernel case {case}, {rows} rows"));

                let g = values(rows * out, 500 + rows as u64);
                let gt =
                    Tensor::<Wgpu, 2>::from_data(TensorData::new(g.clone(), [rows, out]), &device)
                        .into_primitive()
                        .tensor();
                let gx: Vec<f32> = Tensor::<Wgpu, 2>::from_primitive(TensorPrimitive::Float(
                    peft_qlora::cube::q4_tiled(gt, &weight, true).expect("f32 and i32 tensors"),
                ))
                .into_data()
                .to_vec()
                .unwrap();
                let want = reference(&g, &w, rows, out, inp, true);
                assert_close(
                    &gx,
                    &want,
                    &format!("wgpu transposed kernel case {case}, {rows} rows"),
                );
            }
        }
    }
}
