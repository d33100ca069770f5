//! # peft-testing
//!
//! Runs one test body on every burn backend compiled in, in the style of candle's
//! `test_device!`: `ndarray` and `flex` always (the CPU backends), `wgpu` when the crate is
//! built with the `wgpu` feature (on a machine without a GPU it runs through Mesa's
//! software Vulkan driver), and `cuda` with the `cuda` feature where an NVIDIA driver is
//! present. A backend that is not compiled in, or has no device here, prints why it was
//! skipped and passes.
//!
//! Write the body once, generic over an autodiff backend, and list it in
//! [`backend_tests!`]: each body becomes a module with one `#[test]` per backend.
//!
//! ```
//! use burn::prelude::*;
//! use burn::tensor::backend::AutodiffBackend;
//!
//! fn adds<B: AutodiffBackend>(device: &B::Device) {
//!     let x = Tensor::<B, 1>::from_floats([1.0, 2.0], device);
//!     let y = x.clone() + x;
//!     assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
//! }
//!
//! peft_testing::backend_tests!(adds);
//! # fn main() {}
//! ```
//!
//! Enable `wgpu` for the whole workspace with `--features peft-testing/wgpu`, `cuda` with
//! `--features peft-testing/cuda`.

use burn::tensor::backend::AutodiffBackend;

/// A test body generic over the backend. [`backend_tests!`] implements it for you.
pub trait BackendTest {
    /// Runs the body on `B`.
    fn run<B: AutodiffBackend>(&self, device: &B::Device);
}

/// The ndarray CPU backend, with autodiff.
#[cfg(feature = "ndarray")]
pub type NdArrayAd = burn::backend::Autodiff<burn::backend::NdArray>;
/// The flex CPU backend, with autodiff.
#[cfg(feature = "flex")]
pub type FlexAd = burn::backend::Autodiff<burn::backend::Flex>;
/// The wgpu backend, with autodiff.
#[cfg(feature = "wgpu")]
pub type WgpuAd = burn::backend::Autodiff<burn::backend::Wgpu>;
/// The CUDA backend, with autodiff.
#[cfg(feature = "cuda")]
pub type CudaAd = burn::backend::Autodiff<burn::backend::Cuda>;

fn skip(backend: &str, why: &str) {
    // Test output: cargo test shows it with --nocapture, and in the failure report.
    println!("skipped on {backend}: {why}");
}

/// Runs `t` on ndarray (or says why not).
pub fn run_ndarray<T: BackendTest>(t: &T) {
    #[cfg(feature = "ndarray")]
    t.run::<NdArrayAd>(&Default::default());
    #[cfg(not(feature = "ndarray"))]
    {
        let _ = t;
        skip(
            "ndarray",
            "peft-testing was built without the `ndarray` feature",
        );
    }
}

/// Runs `t` on flex (or says why not).
pub fn run_flex<T: BackendTest>(t: &T) {
    #[cfg(feature = "flex")]
    t.run::<FlexAd>(&Default::default());
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        skip("flex", "peft-testing was built without the `flex` feature");
    }
}

/// Runs `t` on wgpu (or says why not).
pub fn run_wgpu<T: BackendTest>(t: &T) {
    #[cfg(feature = "wgpu")]
    {
        if std::env::var_os("PEFT_SKIP_WGPU").is_some() {
            skip("wgpu", "PEFT_SKIP_WGPU is set");
            return;
        }
        t.run::<WgpuAd>(&Default::default());
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = t;
        skip(
            "wgpu",
            "built without the `wgpu` feature (use --features peft-testing/wgpu)",
        );
    }
}

/// Whether an NVIDIA driver is present on this machine.
pub fn cuda_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidia0").exists()
}

/// Runs `t` on CUDA where a driver is present (or says why not).
pub fn run_cuda<T: BackendTest>(t: &T) {
    #[cfg(feature = "cuda")]
    {
        if !cuda_driver_present() {
            skip("cuda", "no NVIDIA driver on this machine");
            return;
        }
        t.run::<CudaAd>(&Default::default());
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        skip(
            "cuda",
            "built without the `cuda` feature (use --features peft-testing/cuda)",
        );
    }
}

/// Generates, for each generic test body `fn name<B: AutodiffBackend>(device: &B::Device)`,
/// a module `name` with the tests `ndarray`, `flex`, `wgpu` and `cuda`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        $(
            #[allow(non_snake_case)]
            mod $name {
                struct Body;
                impl $crate::BackendTest for Body {
                    fn run<B: ::burn::tensor::backend::AutodiffBackend>(&self, device: &B::Device) {
                        super::$name::<B>(device)
                    }
                }
                #[test]
                fn ndarray() {
                    $crate::run_ndarray(&Body)
                }
                #[test]
                fn flex() {
                    $crate::run_flex(&Body)
                }
                #[test]
                fn wgpu() {
                    $crate::run_wgpu(&Body)
                }
                #[test]
                fn cuda() {
                    $crate::run_cuda(&Body)
                }
            }
        )+
    };
}

/// `n` deterministic values in `[-1, 1)` from `seed` (a linear congruential generator), for
/// test inputs that need no random-number crate and are the same on every run.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
