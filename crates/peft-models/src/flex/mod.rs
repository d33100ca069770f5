//! Fused operations for the CPU backend (`Flex`, and `Autodiff<Flex>` for training).
//!
//! Flex runs element-wise operations on one thread and each burn operation is a graph node
//! under autodiff, so a layer's small operations (attention's softmax and masking, the
//! SwiGLU gate) cost far more than their arithmetic. Each module here recognises the CPU
//! backend by type (a checked downcast), runs the whole operation as rayon tasks
//! over host memory and, under autodiff, registers it as one graph node with its own
//! backward pass. Every other backend, and dtypes other than f32, keep the burn ops.
//!
//! The building blocks (which backend `B` is, checked downcasts, [`gemm()`], a bounds-checked
//! strided f32 product on the `gemm` crate, and [`contiguous`]) are `peft_core::fused::flex`'s,
//! re-exported here.

pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod swiglu;

pub(crate) use peft_core::fused::flex::{
    FlexKind, cast, contiguous_f32, flex_kind, from_float, into_float, simd, try_cast,
};
pub use peft_core::fused::flex::{Product, contiguous, gemm};

/// `e^x` in f32, branch-free so that loops over slices vectorize: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2` (ln 2 split in two parts, so `r` is exact to f32 rounding), `e^r` by its
/// degree-7 Taylor polynomial (truncation below 6e-9 relative), times `2^n` built in the
/// exponent bits. Within a few ulp of the exact value; 0 below -87.3 (where f32 `exp` turns
/// subnormal), `e^88.3` above 88.3 (where it nears overflow); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Lanes of the reductions below: independent partial results that the compiler keeps in
/// vector registers (an f32 sum in one accumulator is a serial chain that cannot vectorize).
const LANES: usize = 16;

/// The largest value of `xs` (negative infinity when empty; NaN is skipped, as `f32::max`).
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    acc.iter().fold(rest, |a, &x| a.max(x))
}

/// `sum_i xs[i] ys[i]` over the shorter of the two, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn dot(xs: &[f32], ys: &[f32]) -> f32 {
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut acc = [0.0f32; LANES];
    let (mut xc, mut yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    for (x, y) in (&mut xc).zip(&mut yc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let rest: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + rest
}

/// `sum_i xs[i]`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_of(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `exp(x - max) / sum` over a row, in place: three vectorizable passes.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = max_of(row);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / sum_of(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.000_37;
        }
        // 3 ulp of f32 is 3.6e-7 relative.
        assert!(worst < 3.6e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(100.0) > 1e38);
    }

    #[test]
    fn the_lane_reductions_match_plain_loops() {
        use super::{dot, max_of, softmax_in_place, sum_of};
        for n in [0usize, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let ys: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7).collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&xs), want_max, "max of {n}");
            let want_sum: f64 = xs.iter().map(|&x| f64::from(x)).sum();
            assert!(
                (f64::from(sum_of(&xs)) - want_sum).abs() < 1e-4,
                "sum of {n}"
            );
            let want_dot: f64 = xs.iter().zip(&ys).map(|(&x, &y)| f64::from(x * y)).sum();
            assert!(
                (f64::from(dot(&xs, &ys)) - want_dot).abs() < 1e-4,
                "dot of {n}"
            );
            if n > 0 {
                let mut row = xs.clone();
                softmax_in_place(&mut row);
                let z: f64 = xs
                    .iter()
                    .map(|&x| (f64::from(x) - f64::from(want_max)).exp())
                    .sum();
                for (p, &x) in row.iter().zip(&xs) {
                    let want = (f64::from(x) - f64::from(want_max)).exp() / z;
                    assert!((f64::from(*p) - want).abs() < 1e-6, "softmax of {n}");
                }
            }
        }
    }
}
