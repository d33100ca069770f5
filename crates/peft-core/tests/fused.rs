//! The fused operations of the CPU backend (`Flex`, `Autodiff<Flex>`) against the same
//! computation in burn tensor operations on ndarray: outputs and the gradient of every
//! input, with transposed (strided) operands, frozen and trained inputs, and a base output
//! that something else still holds (which the in-place update must not change).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use peft_core::fused::flex::{try_linear, try_low_rank_add};

/// The fused product; a test failure where it does not apply.
fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    try_linear(x, w).unwrap_or_else(|_| panic!("flex fuses the product"))
}

/// The fused update; a test failure where it does not apply.
fn low_rank_add<B: Backend>(
    y: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    s: f64,
) -> Tensor<B, 2> {
    try_low_rank_add(y, x, a, b, s).unwrap_or_else(|_| panic!("flex fuses the update"))
}
use peft_testing::uniform;

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn mat<B: Backend>(rows: usize, cols: usize, seed: u64, transposed: bool) -> Tensor<B, 2> {
    let device = Default::default();
    if transposed {
        Tensor::<B, 2>::from_data(
            TensorData::new(uniform(rows * cols, seed), [cols, rows]),
            &device,
        )
        .transpose()
    } else {
        Tensor::from_data(
            TensorData::new(uniform(rows * cols, seed), [rows, cols]),
            &device,
        )
    }
}

/// `(y, dx, dw)` of `sum(c * x w)`; `fused` picks `linear`, otherwise burn's matmul.
fn linear_case<B: AutodiffBackend>(
    track_x: bool,
    track_w: bool,
    w_transposed: bool,
    fused: bool,
) -> Vec<Vec<f32>> {
    let (m, k, n) = (37, 29, 41);
    let x = mat::<B>(m, k, 1, false);
    let w = mat::<B>(k, n, 2, w_transposed);
    let (x, w) = (
        if track_x { x.require_grad() } else { x },
        if track_w { w.require_grad() } else { w },
    );
    let y = if fused {
        linear(x.clone(), w.clone())
    } else {
        x.clone().matmul(w.clone())
    };
    let c = mat::<B>(m, n, 3, false);
    let grads = (y.clone() * c).sum().backward();
    let mut out = vec![vals(y)];
    if track_x {
        out.push(vals(x.grad(&grads).unwrap()));
    }
    if track_w {
        out.push(vals(w.grad(&grads).unwrap()));
    }
    out
}

#[test]
fn fused_linear_matches_burn_matmul() {
    for (track_x, track_w) in [(true, false), (false, true), (true, true)] {
        for transposed in [false, true] {
            let want = linear_case::<Autodiff<NdArray>>(track_x, track_w, transposed, false);
            let got = linear_case::<Autodiff<Flex>>(track_x, track_w, transposed, true);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                close(
                    g,
                    w,
                    &format!("x {track_x}, w {track_w}, transposed {transposed}: output {i}"),
                );
            }
        }
    }
    // Without autodiff.
    let got = linear(mat::<Flex>(5, 7, 4, false), mat::<Flex>(7, 3, 5, true));
    let want = mat::<NdArray>(5, 7, 4, false).matmul(mat::<NdArray>(7, 3, 5, true));
    close(&vals(got), &vals(want), "inference");
}

/// `(out, dy, dx, da, db)` of `sum(c * (y + s (x a) b))` where `y = x0 w0` is a base
/// layer's output; `keep_y` holds on to `y` (and checks that it is unchanged).
fn low_rank_case<B: AutodiffBackend>(
    fused: bool,
    keep_y: bool,
    track_x: bool,
    a_transposed: bool,
) -> Vec<Vec<f32>> {
    let (m, inp, r, out) = (23, 19, 4, 31);
    let x = mat::<B>(m, inp, 6, false);
    let x = if track_x { x.require_grad() } else { x };
    let w0 = mat::<B>(inp, out, 7, false).require_grad();
    let a = mat::<B>(inp, r, 8, a_transposed).require_grad();
    let b = mat::<B>(r, out, 9, false).require_grad();
    let y = x.clone().matmul(w0.clone());
    let kept = keep_y.then(|| (y.clone(), vals(y.clone())));
    let z = if fused {
        low_rank_add(y, &x, a.clone(), b.clone(), 0.75)
    } else {
        y + x.clone().matmul(a.clone()).matmul(b.clone()) * 0.75
    };
    if let Some((y, before)) = kept {
        assert_eq!(
            vals(y),
            before,
            "the base output that is still held changed"
        );
    }
    let c = mat::<B>(m, out, 10, false);
    let grads = (z.clone() * c).sum().backward();
    let mut res = vec![
        vals(z),
        vals(w0.grad(&grads).unwrap()),
        vals(a.grad(&grads).unwrap()),
        vals(b.grad(&grads).unwrap()),
    ];
    if track_x {
        res.push(vals(x.grad(&grads).unwrap()));
    }
    res
}

#[test]
fn fused_low_rank_add_matches_burn_ops() {
    // A dense `a` takes the rank kernels, a transposed one the general product.
    for a_transposed in [false, true] {
        for keep_y in [false, true] {
            for track_x in [false, true] {
                let case = (keep_y, track_x, a_transposed);
                let want = low_rank_case::<Autodiff<NdArray>>(false, keep_y, track_x, a_transposed);
                let got = low_rank_case::<Autodiff<Flex>>(true, keep_y, track_x, a_transposed);
                let names = ["output", "d w0 (through y)", "da", "db", "dx"];
                for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
                    close(
                        g,
                        w,
                        &format!("(keep_y, track_x, a transposed) {case:?}: {name}"),
                    );
                }
            }
        }
    }
    // Without autodiff.
    let run = |fused: bool| -> Vec<f32> {
        let (x, a, b) = (
            mat::<Flex>(6, 5, 11, false),
            mat::<Flex>(5, 2, 12, false),
            mat::<Flex>(2, 4, 13, true),
        );
        let y = mat::<Flex>(6, 4, 14, false);
        if fused {
            vals(low_rank_add(y, &x, a, b, 2.0))
        } else {
            vals(y + x.matmul(a).matmul(b) * 2.0)
        }
    };
    close(&run(true), &run(false), "inference");
}

#[test]
fn other_backends_get_their_operands_back() {
    let (x, w) = (
        mat::<NdArray>(3, 4, 1, false),
        mat::<NdArray>(4, 2, 2, false),
    );
    let (x2, w2) = try_linear(x.clone(), w.clone()).expect_err("ndarray is not fused");
    assert_eq!(vals(x2), vals(x.clone()));
    assert_eq!(vals(w2), vals(w));
    let (a, b) = (
        mat::<NdArray>(4, 1, 3, false),
        mat::<NdArray>(1, 2, 4, false),
    );
    let y = mat::<NdArray>(3, 2, 5, false);
    assert!(try_low_rank_add(y, &x, a, b, 1.0).is_err());
    // Shapes that do not agree are refused on the CPU backend too.
    let bad = try_linear(mat::<Flex>(3, 4, 1, false), mat::<Flex>(5, 2, 2, false));
    assert!(bad.is_err());
}

#[test]
fn fused_adamw_matches_the_burn_ops() {
    use peft_core::fused::{AdamWUpdate, adamw};
    fn run<B: Backend>(wd: f64, keep_p: bool) -> Vec<Vec<f32>> {
        let device = Default::default();
        let t = |seed: u64| {
            Tensor::<B, 1>::from_data(TensorData::new(uniform(40_000, seed), [40_000]), &device)
        };
        let mut p = t(1);
        let mut moments = None;
        let mut out = Vec::new();
        for step in 1..=3 {
            let u = AdamWUpdate {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
                step,
            };
            // A copy of the parameter held elsewhere must not change.
            let held = keep_p.then(|| (p.clone(), vals(p.clone())));
            let (np, m, v) = adamw(p, t(10 + step as u64), moments, &u);
            if let Some((held, before)) = held {
                assert_eq!(vals(held), before, "a held parameter changed");
            }
            out.push(vals(np.clone()));
            p = np;
            moments = Some((m, v));
        }
        let (m, v) = moments.unwrap();
        out.push(vals(m));
        out.push(vals(v));
        out
    }
    for wd in [0.0, 0.1] {
        for keep_p in [false, true] {
            let want = run::<NdArray>(wd, keep_p);
            let got = run::<Flex>(wd, keep_p);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                close(
                    g,
                    w,
                    &format!("weight decay {wd}, held {keep_p}: output {i}"),
                );
            }
        }
    }
}

#[test]
fn fused_sum_of_squares_and_scaling_match_the_burn_ops() {
    use peft_core::fused::{scale, sum_squares};
    let device = Default::default();
    let values = uniform(70_001, 3);
    let want: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let t = Tensor::<Flex, 1>::from_data(TensorData::new(values.clone(), [70_001]), &device);
    let got = sum_squares(&t);
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "sum of squares {got}, want {want}"
    );
    let held = t.clone();
    let scaled = vals(scale(t, 0.25));
    assert_eq!(vals(held), values, "a held tensor changed");
    let want: Vec<f32> = values.iter().map(|v| v * 0.25).collect();
    assert_eq!(scaled, want);
}

/// `(x, c, y, dx)` of `sum(c * dropout(x))` for a `[rows, cols]` `x` (made transposed when
/// asked).
fn dropout_case<B: AutodiffBackend>(
    p: f64,
    transposed: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (rows, cols) = (96, 200);
    // Away from zero, so that a zero output means a dropped element.
    let x = mat::<B>(rows, cols, 11, transposed)
        .abs()
        .add_scalar(0.5)
        .require_grad();
    let c = mat::<B>(rows, cols, 12, false);
    let y = peft_core::fused::dropout(x.clone(), p);
    let grads = (y.clone() * c.clone()).sum().backward();
    let dx = x.grad(&grads).unwrap();
    (vals(x.inner()), vals(c.inner()), vals(y.inner()), vals(dx))
}

/// Checks `y` and `dx` against torch.nn.Dropout's definition: every element either zeroed
/// or scaled by `1 / (1 - p)`, its gradient the same, and about `p` of them dropped
/// (within 5 standard deviations). Returns which elements were kept.
fn check_dropout(p: f64, case: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>), what: &str) -> Vec<bool> {
    let (x, c, y, dx) = case;
    let keep = 1.0 - p;
    let kept: Vec<bool> = y.iter().map(|&v| v != 0.0).collect();
    let want_y: Vec<f32> = x
        .iter()
        .zip(&kept)
        .map(|(&x, &k)| if k { x * (1.0 / keep) as f32 } else { 0.0 })
        .collect();
    let want_dx: Vec<f32> = c
        .iter()
        .zip(&kept)
        .map(|(&c, &k)| if k { c * (1.0 / keep) as f32 } else { 0.0 })
        .collect();
    close(&y, &want_y, &format!("{what}: output"));
    close(&dx, &want_dx, &format!("{what}: gradient"));
    let n = y.len() as f64;
    let dropped = kept.iter().filter(|&&k| !k).count() as f64;
    let sd = (n * p * keep).sqrt();
    assert!(
        (dropped - n * p).abs() <= 5.0 * sd,
        "{what}: {dropped} of {n} dropped at p = {p}"
    );
    kept
}

#[test]
fn fused_dropout_is_torch_dropout_and_repeatable_under_a_seed() {
    type Ad = Autodiff<Flex>;
    let device = Default::default();
    for (p, transposed) in [(0.05, false), (0.1, true), (0.5, false)] {
        let what = format!("flex, p = {p}, transposed {transposed}");
        check_dropout(p, dropout_case::<Ad>(p, transposed), &what);
    }
    // burn's Dropout on another backend keeps the same contract.
    check_dropout(
        0.1,
        dropout_case::<Autodiff<NdArray>>(0.1, false),
        "ndarray",
    );

    // The backend's seed fixes the masks; calls after it draw new ones.
    <Ad as Backend>::seed(&device, 5);
    let first = check_dropout(0.1, dropout_case::<Ad>(0.1, false), "seeded");
    let second = check_dropout(0.1, dropout_case::<Ad>(0.1, false), "seeded, second call");
    <Ad as Backend>::seed(&device, 5);
    let again = check_dropout(0.1, dropout_case::<Ad>(0.1, false), "seeded again");
    assert_eq!(first, again, "the same seed gives the same mask");
    assert_ne!(first, second, "a second call draws a new mask");

    // The identity without autodiff and at p = 0.
    let x = mat::<Flex>(8, 9, 3, false);
    assert_eq!(vals(peft_core::fused::dropout(x.clone(), 0.3)), vals(x));
    let x = mat::<Ad>(8, 9, 3, false);
    assert_eq!(vals(peft_core::fused::dropout(x.clone(), 0.0)), vals(x));
}

/// The operands of a low-rank update with dropout: `x` `[64, 48]`, `a` `[48, r]`, `b`
/// `[r, 40]`, the base output `y0` and the weights `c` of the loss `sum(c * out)`.
struct DropoutUpdate {
    r: usize,
    x_transposed: bool,
    a_transposed: bool,
    track_x: bool,
}

impl DropoutUpdate {
    const ROWS: usize = 64;
    const IN: usize = 48;
    const OUT: usize = 40;

    /// `[out, dy0, da, db, dx]` (`dx` only when tracked) of `sum(c * (y0 + s (d(x) a) b))`,
    /// where `d` is the fused dropout at `p` when `kept` is `None`, and otherwise the
    /// given mask written as burn operations.
    fn run<B: AutodiffBackend>(&self, p: f64, kept: Option<&[bool]>) -> Vec<Vec<f32>> {
        let device = Default::default();
        let x = mat::<B>(Self::ROWS, Self::IN, 21, self.x_transposed);
        let x = if self.track_x { x.require_grad() } else { x };
        let a = mat::<B>(Self::IN, self.r, 22, self.a_transposed).require_grad();
        let b = mat::<B>(self.r, Self::OUT, 23, false).require_grad();
        let y0 = mat::<B>(Self::ROWS, Self::OUT, 24, false).require_grad();
        let c = mat::<B>(Self::ROWS, Self::OUT, 25, false);
        // `y0 * 1`: the base output is a node of its own, as a layer's output is.
        let y = y0.clone() * 1.0;
        let z = match kept {
            None => peft_core::fused::low_rank_add_dropout(y, &x, a.clone(), b.clone(), 0.75, p),
            Some(kept) => {
                let scale: Vec<f32> = kept
                    .iter()
                    .map(|&k| if k { (1.0 / (1.0 - p)) as f32 } else { 0.0 })
                    .collect();
                let m = Tensor::<B, 2>::from_data(
                    TensorData::new(scale, [Self::ROWS, Self::IN]),
                    &device,
                );
                y + (x.clone() * m).matmul(a.clone()).matmul(b.clone()) * 0.75
            }
        };
        let grads = (z.clone() * c).sum().backward();
        let mut res = vec![
            vals(z),
            vals(y0.grad(&grads).unwrap()),
            vals(a.grad(&grads).unwrap()),
            vals(b.grad(&grads).unwrap()),
        ];
        if self.track_x {
            res.push(vals(x.grad(&grads).unwrap()));
        }
        res
    }
}

#[test]
fn fused_low_rank_add_with_dropout_is_dropout_then_the_update() {
    type Ad = Autodiff<Flex>;
    type Balanced =
        Autodiff<Flex, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
    let device = Default::default();
    let names = ["output", "dy0", "da", "db", "dx"];
    // r = 16 takes the rank kernels, r = 5 and a transposed `a` the general product; a
    // transposed `x` is copied to a contiguous one first.
    let cases = [
        (0.1, 16, false, false),
        (0.3, 5, false, true),
        (0.5, 16, true, false),
    ];
    for (p, r, x_transposed, a_transposed) in cases {
        let what =
            format!("p = {p}, r = {r}, x transposed {x_transposed}, a transposed {a_transposed}");
        let tracked = DropoutUpdate {
            r,
            x_transposed,
            a_transposed,
            track_x: true,
        };
        <Ad as Backend>::seed(&device, 9);
        let got = tracked.run::<Ad>(p, None);
        // x's gradient comes only through the update here, so it is zero exactly where the
        // dropout dropped an element; the whole computation with that mask as burn
        // operations on ndarray must then give every output and gradient.
        let kept: Vec<bool> = got[4].iter().map(|&g| g != 0.0).collect();
        let n = kept.len() as f64;
        let dropped = kept.iter().filter(|&&k| !k).count() as f64;
        assert!(
            (dropped - n * p).abs() <= 5.0 * (n * p * (1.0 - p)).sqrt(),
            "{what}: {dropped} of {n} dropped"
        );
        let want = tracked.run::<Autodiff<NdArray>>(p, Some(&kept));
        for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            close(g, w, &format!("{what}: {name}"));
        }

        // The same seed, with x frozen (the node keeps x only for da) and under balanced
        // checkpointing: the same mask, the same results.
        let frozen = DropoutUpdate {
            track_x: false,
            ..tracked
        };
        let want = frozen.run::<Autodiff<NdArray>>(p, Some(&kept));
        <Ad as Backend>::seed(&device, 9);
        let got = frozen.run::<Ad>(p, None);
        for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            close(g, w, &format!("{what}, x frozen: {name}"));
        }
        <Balanced as Backend>::seed(&device, 9);
        let got = frozen.run::<Balanced>(p, None);
        for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            close(g, w, &format!("{what}, x frozen, balanced: {name}"));
        }
    }

    // Without dropout, and without autodiff, it is the update.
    let plain = DropoutUpdate {
        r: 16,
        x_transposed: false,
        a_transposed: false,
        track_x: true,
    };
    let want = plain.run::<Autodiff<NdArray>>(0.0, Some(&[true; 64 * 48]));
    for (name, (g, w)) in names
        .iter()
        .zip(plain.run::<Ad>(0.0, None).iter().zip(&want))
    {
        close(g, w, &format!("p = 0: {name}"));
    }
    let (x, a, b, y) = (
        mat::<Flex>(6, 5, 11, false),
        mat::<Flex>(5, 2, 12, false),
        mat::<Flex>(2, 4, 13, true),
        mat::<Flex>(6, 4, 14, false),
    );
    close(
        &vals(peft_core::fused::low_rank_add_dropout(
            y.clone(),
            &x,
            a.clone(),
            b.clone(),
            2.0,
            0.5,
        )),
        &vals(y + x.matmul(a).matmul(b) * 2.0),
        "inference",
    );
}
