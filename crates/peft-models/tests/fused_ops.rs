//! The fused operations of the CPU backend (`Flex`, `Autodiff<Flex>`) against the generic
//! ones (burn tensor operations, here on ndarray). Attention: outputs and the gradients of
//! `q`, `k` and `v`, with grouped-query heads, strided inputs, causal and padding masks, and
//! a row whose keys are all masked. SwiGLU: outputs and both gradients, saturated gates
//! included. The summed cross-entropy: value and gradient, under a scaled loss. RMSNorm:
//! output and the gradients of the input and the weight. Rotary embeddings: output and
//! input gradient.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::backend::AutodiffBackend;
use peft_models::nn::{
    attention, attention_mask, fused_attention, fused_cross_entropy_sum, swiglu,
};

use peft_testing::uniform as values;

struct Case {
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
    causal: bool,
    padding: bool,
}

const CASES: [Case; 6] = [
    // SmolLM2's grouping (3 query heads per key/value head), causal, padded.
    Case {
        b: 2,
        h: 6,
        kvh: 2,
        s: 9,
        t: 9,
        d: 8,
        causal: true,
        padding: true,
    },
    // One head per key/value head, no mask.
    Case {
        b: 1,
        h: 3,
        kvh: 3,
        s: 5,
        t: 7,
        d: 4,
        causal: false,
        padding: false,
    },
    // Cached keys: more keys than queries, causal.
    Case {
        b: 2,
        h: 4,
        kvh: 1,
        s: 3,
        t: 8,
        d: 16,
        causal: true,
        padding: false,
    },
    // Padding that masks every key of the first sequence's first rows.
    Case {
        b: 2,
        h: 2,
        kvh: 1,
        s: 4,
        t: 4,
        d: 4,
        causal: true,
        padding: true,
    },
    // Several blocks of query rows, each stopping at its own last visible key.
    Case {
        b: 2,
        h: 3,
        kvh: 1,
        s: 70,
        t: 70,
        d: 8,
        causal: true,
        padding: true,
    },
    // Several blocks over cached keys.
    Case {
        b: 1,
        h: 2,
        kvh: 2,
        s: 40,
        t: 75,
        d: 4,
        causal: true,
        padding: false,
    },
];

/// `(output, dq, dk, dv)` of `sum(c * attention(q, k, v))`, with `q`, `k`, `v` made as the
/// models make them: `[b, s, heads, d]` views with heads moved before positions.
fn run<B: AutodiffBackend>(case: &Case, seed: u64, fused: bool) -> [Vec<f32>; 4] {
    let device = Default::default();
    let Case {
        b,
        h,
        kvh,
        s,
        t,
        d,
        causal,
        padding,
    } = *case;
    let bshd = |heads: usize, n: usize, seed: u64| {
        Tensor::<B, 4>::from_data(
            TensorData::new(values(b * n * heads * d, seed), [b, n, heads, d]),
            &device,
        )
        .require_grad()
    };
    let (q0, k0, v0) = (
        bshd(h, s, seed),
        bshd(kvh, t, seed + 1),
        bshd(kvh, t, seed + 2),
    );
    let pad: Vec<Vec<bool>> = (0..b)
        .map(|i| (0..t).map(|j| !(padding && i == 0 && j < 2)).collect())
        .collect();
    let mask = (causal || padding).then(|| {
        attention_mask::<B>(
            b,
            s,
            t - s,
            0,
            causal,
            padding.then_some(pad.as_slice()),
            &device,
        )
    });
    let (q, k, v) = (
        q0.clone().swap_dims(1, 2),
        k0.clone().swap_dims(1, 2),
        v0.clone().swap_dims(1, 2),
    );
    let scale = (d as f64).powf(-0.5);
    let out = if fused {
        fused_attention(&q, &k, &v, mask.as_ref(), scale).expect("flex fuses attention")
    } else {
        attention(q, k, v, mask.as_ref(), scale)
    };
    let c = Tensor::<B, 4>::from_data(
        TensorData::new(values(b * h * s * d, seed + 3), [b, h, s, d]),
        &device,
    );
    let grads = (out.clone() * c).sum().backward();
    let v = |t: Tensor<B::InnerBackend, 4>| t.into_data().to_vec::<f32>().unwrap();
    [
        out.into_data().to_vec::<f32>().unwrap(),
        v(q0.grad(&grads).unwrap()),
        v(k0.grad(&grads).unwrap()),
        v(v0.grad(&grads).unwrap()),
    ]
}

/// f32 sums in another order (and another `exp`, within a few ulp): gradients that cancel
/// (`dS = P (dP - rowsum(dP P))`) differ by ~1e-5 on values of order 0.1; a wrong term
/// moves them by order 0.1.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-5 + 1e-4 * w.abs(),
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

#[test]
fn fused_attention_matches_the_generic_one() {
    for (n, case) in CASES.iter().enumerate() {
        let want = run::<Autodiff<NdArray>>(case, 10 * n as u64, false);
        let got = run::<Autodiff<Flex>>(case, 10 * n as u64, true);
        for (what, (g, w)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_close(g, w, &format!("case {n}: {what}"));
        }
        // Without autodiff (inference) the forward pass is the same.
        let device = Default::default();
        let Case {
            b,
            h,
            kvh,
            s,
            t,
            d,
            causal,
            ..
        } = *case;
        let make = |heads: usize, n: usize, seed: u64| {
            Tensor::<Flex, 4>::from_data(
                TensorData::new(values(b * n * heads * d, seed), [b, n, heads, d]),
                &device,
            )
            .swap_dims(1, 2)
        };
        let seed = 10 * n as u64;
        let mask = causal.then(|| attention_mask::<Flex>(b, s, t - s, 0, true, None, &device));
        let plain = fused_attention(
            &make(h, s, seed),
            &make(kvh, t, seed + 1),
            &make(kvh, t, seed + 2),
            mask.as_ref(),
            (d as f64).powf(-0.5),
        )
        .expect("flex fuses attention");
        if !case.padding {
            assert_close(
                &plain.into_data().to_vec::<f32>().unwrap(),
                &want[0],
                &format!("case {n}: inference"),
            );
        }
    }
}

/// `(y, d gate, d up)` of `sum(c * f(gate, up))` for a strided gate (a transposed view).
fn gated<B: AutodiffBackend>(
    f: impl Fn(Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>,
) -> [Vec<f32>; 3] {
    let device = Default::default();
    let [b, s, n] = [2, 5, 37];
    // Gates over [-12, 12] and a few far out, where the sigmoid saturates.
    let mut g = values(b * s * n, 1)
        .iter()
        .map(|v| v * 12.0)
        .collect::<Vec<_>>();
    g[3] = 95.0;
    g[4] = -95.0;
    g[5] = -30.0;
    let gate = Tensor::<B, 3>::from_data(TensorData::new(g, [b, n, s]), &device).require_grad();
    let up = Tensor::<B, 3>::from_data(TensorData::new(values(b * s * n, 2), [b, s, n]), &device)
        .require_grad();
    let c = Tensor::<B, 3>::from_data(TensorData::new(values(b * s * n, 3), [b, s, n]), &device);
    let y = f(gate.clone().swap_dims(1, 2), up.clone());
    let grads = (y.clone() * c).sum().backward();
    let v = |t: Tensor<B::InnerBackend, 3>| t.into_data().to_vec::<f32>().unwrap();
    [
        y.into_data().to_vec::<f32>().unwrap(),
        v(gate.grad(&grads).unwrap()),
        v(up.grad(&grads).unwrap()),
    ]
}

#[test]
fn fused_swiglu_matches_the_generic_one() {
    let want = gated::<Autodiff<NdArray>>(|g, u| silu(g) * u);
    let got = gated::<Autodiff<Flex>>(swiglu);
    for (what, (g, w)) in ["y", "d gate", "d up"].iter().zip(got.iter().zip(&want)) {
        assert_close(g, w, &format!("swiglu {what}"));
    }
}

/// `(loss, dz)` of `0.5 * CE(z, t)` for logits of magnitude up to 30.
fn token_loss<B: AutodiffBackend>(
    f: impl Fn(Tensor<B, 2>, Tensor<B, 2, Int>) -> Tensor<B, 1>,
) -> [Vec<f32>; 2] {
    let device = Default::default();
    let [n, v] = [7, 300];
    let z: Vec<f32> = values(n * v, 9).iter().map(|x| x * 30.0).collect();
    let z = Tensor::<B, 2>::from_data(TensorData::new(z, [n, v]), &device).require_grad();
    let t: Vec<i64> = vec![0, 299, 5, 5, 150, 42, 7];
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(t, [n, 1]), &device);
    let loss = f(z.clone(), t) * 0.5;
    let grads = loss.backward();
    [
        loss.into_data().to_vec::<f32>().unwrap(),
        z.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
    ]
}

#[test]
fn fused_cross_entropy_matches_the_generic_one() {
    let want = token_loss::<Autodiff<NdArray>>(|z, t| -log_softmax(z, 1).gather(1, t).sum());
    let got = token_loss::<Autodiff<Flex>>(|z, t| {
        fused_cross_entropy_sum(z.clone(), &t).unwrap_or_else(|_| panic!("flex fuses the loss"))
    });
    assert_close(&got[0], &want[0], "loss");
    assert_close(&got[1], &want[1], "dz");
    // A target outside the vocabulary is left to the generic path (which reports it).
    let device = Default::default();
    let z = Tensor::<Flex, 2>::zeros([2, 3], &device);
    let t = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![1i64, 3], [2, 1]), &device);
    assert!(fused_cross_entropy_sum(z, &t).is_err());
}

/// `(y, dx, dw)` of `sum(c * rms_norm(x))` for a strided `x` (a transposed view) and a
/// weight away from one.
fn normed<B: AutodiffBackend>(fused: bool) -> [Vec<f32>; 3] {
    let device = Default::default();
    let [b, s, n] = [2, 5, 37];
    let x = Tensor::<B, 3>::from_data(TensorData::new(values(b * s * n, 11), [b, n, s]), &device)
        .require_grad();
    let w = Tensor::<B, 1>::from_data(
        TensorData::new(values(n, 12).iter().map(|v| 1.0 + v).collect(), [n]),
        &device,
    )
    .require_grad();
    let c = Tensor::<B, 3>::from_data(TensorData::new(values(b * s * n, 13), [b, s, n]), &device);
    let norm = peft_models::nn::RmsNorm {
        weight: burn::module::Param::from_tensor(w.clone()),
        eps: 1e-5,
    };
    let xs = x.clone().swap_dims(1, 2);
    let y = if fused {
        peft_models::nn::fused_rms_norm(&xs, &norm.weight.val(), norm.eps)
            .expect("flex fuses the norm")
    } else {
        norm.forward(xs)
    };
    let grads = (y.clone() * c).sum().backward();
    let dw = norm.weight.grad(&grads).unwrap();
    [
        y.into_data().to_vec::<f32>().unwrap(),
        x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        dw.into_data().to_vec::<f32>().unwrap(),
    ]
}

#[test]
fn fused_rms_norm_matches_the_generic_one() {
    let want = normed::<Autodiff<NdArray>>(false);
    let got = normed::<Autodiff<Flex>>(true);
    for (what, (g, w)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
        assert_close(g, w, what);
    }
}

/// `(y, dx)` of `sum(c * rope(x))` at positions 3..8, three heads of size 8.
fn rotated<B: AutodiffBackend>(fused: bool) -> [Vec<f32>; 2] {
    let device = Default::default();
    let [b, s, h, d] = [2, 5, 3, 8];
    let x = Tensor::<B, 4>::from_data(
        TensorData::new(values(b * s * h * d, 21), [b, s, h, d]),
        &device,
    )
    .require_grad();
    let c = Tensor::<B, 4>::from_data(
        TensorData::new(values(b * s * h * d, 22), [b, s, h, d]),
        &device,
    );
    let inv_freq: Vec<f64> = (0..d / 2)
        .map(|i| 10000f64.powf(-2.0 * i as f64 / d as f64))
        .collect();
    let (cos, sin) = peft_models::nn::rope_tables_for_heads::<B>(&inv_freq, 3..8, h, &device);
    let y = if fused {
        peft_models::nn::fused_rope(&x, &cos, &sin).expect("flex fuses the rotation")
    } else {
        peft_models::nn::apply_rope_bshd(x.clone(), &cos, &sin)
    };
    let grads = (y.clone() * c).sum().backward();
    [
        y.into_data().to_vec::<f32>().unwrap(),
        x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
    ]
}

#[test]
fn fused_rope_matches_the_generic_one() {
    let want = rotated::<Autodiff<NdArray>>(false);
    let got = rotated::<Autodiff<Flex>>(true);
    for (what, (g, w)) in ["y", "dx"].iter().zip(got.iter().zip(&want)) {
        assert_close(g, w, what);
    }
}
