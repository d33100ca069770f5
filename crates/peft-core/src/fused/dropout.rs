//! [`super::dropout`] on the CPU backend.
//!
//! The mask comes from a counter-based generator: element `i` of a call with seed `s` is
//! kept when the top 32 bits of `splitmix64(s + i * golden)` fall below `keep * 2^32`. The
//! seed is drawn from the backend's generator (so `B::seed` makes runs repeatable), the
//! pass is split over rayon tasks (the mask does not depend on how), and the backward pass
//! draws the same mask again from the seed instead of keeping it.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, Distribution, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::flex::{FlexKind, contiguous_f32, flex_kind, from_float, simd, try_cast};

const CHUNK: usize = 1 << 14;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The mask of one call: a seed and the kept fraction.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mask {
    seed: u64,
    /// Elements whose draw is below this are kept (`keep * 2^32`).
    threshold: u64,
    /// `1 / keep`, the survivors' scale.
    scale: f32,
}

impl Mask {
    /// A mask keeping `keep` of the elements, seeded from Flex's generator.
    pub(super) fn new(keep: f64) -> Self {
        // Three uniform f32 draws from Flex's generator, mixed into one 64-bit seed.
        let draws = Tensor::<Flex, 1>::random([3], Distribution::Default, &Default::default())
            .into_data()
            .to_vec::<f32>()
            .expect("f32 draws");
        let seed = draws.iter().fold(0u64, |s, d| {
            splitmix64(s ^ u64::from(d.to_bits())).wrapping_add(GOLDEN)
        });
        Self::with_seed(seed, keep)
    }

    fn with_seed(seed: u64, keep: f64) -> Self {
        Self {
            seed,
            threshold: (keep * 4_294_967_296.0) as u64,
            scale: (1.0 / keep) as f32,
        }
    }

    /// Whether element `i` is kept.
    #[inline(always)]
    fn keeps(&self, i: usize) -> bool {
        let h = splitmix64(self.seed.wrapping_add((i as u64).wrapping_mul(GOLDEN)));
        (h >> 32) < self.threshold
    }

    /// `dst[j] = src[j] * (scale or 0)` for the elements `start..start + src.len()`.
    fn apply(&self, start: usize, src: &[f32], dst: &mut [f32]) {
        simd(
            #[inline(always)]
            || {
                for (j, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
                    *d = if self.keeps(start + j) {
                        s * self.scale
                    } else {
                        0.0
                    };
                }
            },
        );
    }

    /// [`Self::apply`] with `dst` as its own source.
    fn apply_in_place(&self, start: usize, dst: &mut [f32]) {
        simd(
            #[inline(always)]
            || {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = if self.keeps(start + j) {
                        *d * self.scale
                    } else {
                        0.0
                    };
                }
            },
        );
    }

    /// The masked copy of the contiguous f32 `x`.
    pub(super) fn forward(&self, x: &FlexTensor) -> FlexTensor {
        let n = x.shape().num_elements();
        let src = &x.storage::<f32>()[..n];
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (d, s))| self.apply(c * CHUNK, s, d));
        FlexTensor::from_data(TensorData::new(out, x.shape()))
    }

    /// The mask applied to the contiguous f32 `g` in its own buffer (copied first when
    /// shared).
    pub(super) fn backward(&self, mut g: FlexTensor) -> FlexTensor {
        let n = g.shape().num_elements();
        g.storage_mut::<f32>()[..n]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, d)| self.apply_in_place(c * CHUNK, d));
        g
    }
}

#[inline(always)]
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// [`super::dropout`] as the fused operation, where `B` is `Autodiff<Flex>` and `x` is f32.
///
/// # Errors
/// `x`, unchanged, where the fused path does not apply.
pub(super) fn try_dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    prob: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    match flex_kind::<B>() {
        Some(FlexKind::Autodiff) => on_autodiff::<B, NoCheckpointing, D>(x, prob),
        Some(FlexKind::Balanced) => on_autodiff::<B, BalancedCheckpointing, D>(x, prob),
        _ => Err(x),
    }
}

fn on_autodiff<B: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<B, D>,
    prob: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    type Ad<C> = Autodiff<Flex, C>;
    let xa = try_cast::<_, Tensor<Ad<C>, D>>(x)?
        .into_primitive()
        .tensor();
    let mask = Mask::new(1.0 - prob);
    let input = contiguous_f32(&xa.primitive).expect("an f32 tensor");
    let out = mask.forward(&input);
    drop(input);
    let out = match DropoutBackward
        .prepare::<C>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(mask, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(from_float::<Ad<C>, B, D>(out).expect("B is Autodiff<Flex, C>"))
}

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    type State = Mask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let dy = contiguous_f32(&dy).expect("an f32 gradient");
            grads.register::<Flex>(node.id, ops.state.backward(dy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_does_not_depend_on_how_the_pass_is_split() {
        let mask = Mask::with_seed(7, 0.9);
        let src: Vec<f32> = (0..1000).map(|i| i as f32 + 1.0).collect();
        let mut whole = vec![0.0; 1000];
        mask.apply(0, &src, &mut whole);
        let mut parts = vec![0.0; 1000];
        mask.apply(0, &src[..333], &mut parts[..333]);
        mask.apply(333, &src[333..], &mut parts[333..]);
        assert_eq!(whole, parts);
        let dropped = whole.iter().filter(|&&v| v == 0.0).count();
        assert!(
            (50..=150).contains(&dropped),
            "{dropped} of 1000 dropped at p = 0.1"
        );
    }
}
