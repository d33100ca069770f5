//! The traits from a user's point of view: two PEFT methods written here, outside
//! peft-core (a low-rank adapter and an output scaling), composed on one small model with a
//! bottleneck after each block, with several named adapters. Each test runs on every
//! backend compiled in (`peft_testing::backend_tests!`).
//!
//! The invariants every method must keep are checked here for the machinery itself:
//! disabled equals base (bit for bit), merged equals unmerged, unmerge restores the weights,
//! save-then-load equals before, and only adapter parameters get gradients and optimizer state.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tolerance};
use peft_core::adapters::{AdaptedLinear, AdapterControl, AdapterSet, LinearAdapterControl};
use peft_core::format::{TensorFile, peft_key};
use peft_core::inject::{LinearAdapter, LinearWeight, NoAdapter, PeftSlots, SublayerAdapter};
use peft_core::model::{self, AdaptableModel, SlotLinear};
use peft_core::target::{ModuleInfo, ModuleKind, TargetSpec, Targets};
use peft_core::trainable::{AdapterOnly, freeze, trainable_paths, trainable_report};
use peft_core::{PeftError, Result};

// ---- a user's first method: low rank, y + s * (x A^T) B^T ----

#[derive(Module, Debug)]
struct LowRank<B: Backend> {
    a: Param<Tensor<B, 2>>, // [r, in]
    b: Param<Tensor<B, 2>>, // [out, r]
    scale: f64,
}

impl<B: Backend> LowRank<B> {
    fn random(r: usize, inp: usize, out: usize, scale: f64, device: &B::Device) -> Self {
        let d = Distribution::Normal(0.0, 0.5);
        Self {
            a: Param::from_tensor(Tensor::random([r, inp], d, device)),
            b: Param::from_tensor(Tensor::random([out, r], d, device)),
            scale,
        }
    }

    fn delta(&self) -> Tensor<B, 2> {
        self.b.val().matmul(self.a.val()) * self.scale
    }
}

impl<B: Backend> LinearAdapter<B> for LowRank<B> {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let a = self.a.val().transpose().unsqueeze::<D>();
        let b = self.b.val().transpose().unsqueeze::<D>();
        output + input.clone().matmul(a).matmul(b) * self.scale
    }

    fn merge(
        &mut self,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((w + self.delta(), b))
    }

    fn unmerge(
        &mut self,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Ok((w - self.delta(), b))
    }
}

// ---- a user's second method: scale the output by a learned vector ----

#[derive(Module, Debug)]
struct Scale<B: Backend> {
    l: Param<Tensor<B, 1>>,
}

impl<B: Backend> LinearAdapter<B> for Scale<B> {
    fn adapt_output<const D: usize, W: LinearWeight<B>>(
        &self,
        _input: &Tensor<B, D>,
        _base: &W,
        output: Tensor<B, D>,
    ) -> Tensor<B, D> {
        output * self.l.val().unsqueeze::<D>()
    }

    fn merge(
        &mut self,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let l = self.l.val();
        Ok((w * l.clone().unsqueeze_dim(1), b.map(|b| b * l)))
    }

    fn unmerge(
        &mut self,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let l = self.l.val();
        Ok((w / l.clone().unsqueeze_dim(1), b.map(|b| b / l)))
    }
}

// ---- a sublayer method: a bottleneck after each block ----

#[derive(Module, Debug)]
struct Bottleneck<B: Backend> {
    down: Linear<B>,
    up: Linear<B>,
}

impl<B: Backend> SublayerAdapter<B> for Bottleneck<B> {
    fn forward(&self, _input: &Tensor<B, 3>, output: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = burn::tensor::activation::relu(self.down.forward(output.clone()));
        output + self.up.forward(h)
    }
}

// ---- the bundle: both linear methods composed, named adapters everywhere ----

#[derive(Clone, Debug)]
struct Methods;

impl<B: Backend> PeftSlots<B> for Methods {
    type Weight = Linear<B>;
    type Linear = (AdapterSet<B, LowRank<B>>, AdapterSet<B, Scale<B>>);
    type Sublayer = AdapterSet<B, Bottleneck<B>>;
    type Embedding = NoAdapter;
    type KeyValue = NoAdapter;
}

// ---- a small model written with slots, as peft-models' architectures are ----
//
// The struct is generic over its slot *module* types with no trait bounds (burn's derive
// maps them between backends); the bounds sit on the impl blocks. The derive reserves
// the generic names `M` and `S` for itself.

#[derive(Module, Debug)]
struct Block<B: Backend, Lin, Sub> {
    up: Lin,
    down: Lin,
    mlp_adapter: Sub,
    backend: core::marker::PhantomData<B>,
}

#[derive(Module, Debug)]
struct TinyNet<B: Backend, Lin, Sub> {
    layers: Vec<Block<B, Lin, Sub>>,
    lm_head: Linear<B>,
}

/// The model with the bundle `Methods` at its slots.
type Net<B> = TinyNet<B, SlotLinear<B, Methods>, <Methods as PeftSlots<B>>::Sublayer>;

const D: usize = 6;
const H: usize = 10;

fn new_net<B: Backend>(layers: usize, device: &B::Device) -> Net<B> {
    let layers = (0..layers)
        .map(|_| Block {
            up: AdaptedLinear::new(LinearConfig::new(D, H).init(device)),
            down: AdaptedLinear::new(LinearConfig::new(H, D).init(device)),
            mlp_adapter: AdapterSet::default(),
            backend: core::marker::PhantomData,
        })
        .collect();
    TinyNet {
        layers,
        lm_head: LinearConfig::new(D, 3).with_bias(false).init(device),
    }
}

impl<B, W, A, S> TinyNet<B, AdaptedLinear<B, W, A>, S>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B> + Default,
    S: SublayerAdapter<B>,
{
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut h = x;
        for block in &self.layers {
            let out = block
                .down
                .forward(burn::tensor::activation::gelu(block.up.forward(h.clone())));
            let out = block.mlp_adapter.forward(&h, out);
            h = h + out;
        }
        self.lm_head.forward(h)
    }
}

impl<B, W, A, S> AdaptableModel<B> for TinyNet<B, AdaptedLinear<B, W, A>, S>
where
    B: Backend,
    W: LinearWeight<B>,
    A: LinearAdapterControl<B>,
    S: SublayerAdapter<B> + AdapterControl,
{
    type Weight = W;
    type Linear = A;
    type Sublayer = S;
    type Embedding = NoAdapter;
    type KeyValue = NoAdapter;

    fn modules(&self) -> Vec<ModuleInfo> {
        let mut v = Vec::new();
        for i in 0..self.layers.len() {
            v.push(ModuleInfo::new(format!("layers.{i}"), ModuleKind::Other));
            v.push(ModuleInfo::new(
                format!("layers.{i}.up"),
                ModuleKind::Linear,
            ));
            v.push(ModuleInfo::new(
                format!("layers.{i}.down"),
                ModuleKind::Linear,
            ));
        }
        v.push(ModuleInfo::new("lm_head", ModuleKind::OutputHead));
        v
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B, W, A>)) {
        for (i, b) in self.layers.iter().enumerate() {
            f(&format!("layers.{i}.up"), &b.up);
            f(&format!("layers.{i}.down"), &b.down);
        }
    }

    fn map_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut AdaptedLinear<B, W, A>) -> Result<()>,
    ) -> Result<()> {
        for (i, b) in self.layers.iter_mut().enumerate() {
            f(&format!("layers.{i}.up"), &mut b.up)?;
            f(&format!("layers.{i}.down"), &mut b.down)?;
        }
        Ok(())
    }

    fn map_sublayers(&mut self, f: &mut dyn FnMut(&str, &mut S) -> Result<()>) -> Result<()> {
        for (i, b) in self.layers.iter_mut().enumerate() {
            f(&format!("layers.{i}.mlp_adapter"), &mut b.mlp_adapter)?;
        }
        Ok(())
    }
}

/// Adds a low-rank adapter named `name` to the layers `targets` selects (as a LoRA crate would).
fn add_low_rank<B: Backend>(
    net: &mut Net<B>,
    name: &str,
    targets: Targets,
    r: usize,
    device: &B::Device,
) -> Result<Vec<String>> {
    let spec = TargetSpec {
        target_modules: Some(targets),
        ..Default::default()
    };
    let selected = spec.compile()?.select(&net.modules())?;
    net.map_linears(&mut |path, l| {
        if selected.iter().any(|s| s == path) {
            let (inp, out) = (l.base.in_features(), l.base.out_features());
            l.adapter
                .0
                .insert(name, LowRank::random(r, inp, out, 0.5, device))?;
        }
        Ok(())
    })?;
    Ok(selected)
}

fn input<B: Backend>(device: &B::Device) -> Tensor<B, 3> {
    Tensor::random([2, 3, D], Distribution::Normal(0.0, 1.0), device)
}

fn assert_close<B: Backend, const N: usize>(a: Tensor<B, N>, b: Tensor<B, N>) {
    a.into_data()
        .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-4));
}

fn disabled_adapters_give_the_base_output_bit_for_bit<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(2, device);
    let x = input::<B>(device);
    let base = net.forward(x.clone());
    add_low_rank(&mut net, "a", Targets::list(["up", "down"]), 2, device).unwrap();
    net.map_linears(&mut |_, l| {
        let n = l.base.out_features();
        l.adapter.1.insert(
            "s",
            Scale {
                l: Param::from_tensor(Tensor::full([n], 1.5, device)),
            },
        )
    })
    .unwrap();
    net.map_sublayers(&mut |_, s| {
        s.insert(
            "bn",
            Bottleneck {
                down: LinearConfig::new(D, 2).init(device),
                up: LinearConfig::new(2, D).init(device),
            },
        )
    })
    .unwrap();
    let adapted = net.forward(x.clone());
    let diff = (adapted.clone() - base.clone())
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>();
    assert!(diff > 1e-3, "the adapters changed nothing ({diff})");

    model::set_adapters_disabled(&mut net, true).unwrap();
    assert_eq!(net.forward(x.clone()).into_data(), base.into_data());
    model::set_adapters_disabled(&mut net, false).unwrap();
    assert_eq!(net.forward(x).into_data(), adapted.into_data());
}

fn merging_equals_unmerged_and_unmerge_restores_weights<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(2, device);
    add_low_rank(
        &mut net,
        "a",
        Targets::pattern(r"layers\.\d\.(up|down)"),
        3,
        device,
    )
    .unwrap();
    net.map_linears(&mut |_, l| {
        let n = l.base.out_features();
        let v = Tensor::random([n], Distribution::Uniform(0.5, 1.5), device);
        l.adapter.1.insert(
            "s",
            Scale {
                l: Param::from_tensor(v),
            },
        )
    })
    .unwrap();
    let x = input::<B>(device);
    let unmerged = net.forward(x.clone());
    let w_before: Vec<_> = net.layers.iter().map(|b| b.up.base.weight.val()).collect();

    model::merge_adapters(&mut net, None, true).unwrap();
    assert_eq!(
        net.layers[0].up.adapter.merged_adapters(),
        vec!["a".to_string(), "s".to_string()]
    );
    assert_close(net.forward(x.clone()), unmerged.clone());
    let w_merged = net.layers[0].up.base.weight.val();
    assert!(
        (w_merged - w_before[0].clone())
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>()
            > 1e-3
    );

    model::unmerge_adapters(&mut net).unwrap();
    assert!(net.layers[0].up.adapter.merged_adapters().is_empty());
    for (b, w) in net.layers.iter().zip(w_before) {
        assert_close(b.up.base.weight.val(), w);
    }
    assert_close(net.forward(x), unmerged);
}

fn safe_merge_refuses_non_finite_results<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(1, device);
    net.map_linears(&mut |_, l| {
        let n = l.base.out_features();
        let mut v = vec![1.0f32; n];
        v[0] = f32::INFINITY;
        l.adapter.1.insert(
            "bad",
            Scale {
                l: Param::from_tensor(Tensor::from_floats(v.as_slice(), device)),
            },
        )
    })
    .unwrap();
    let w_before = net.layers[0].up.base.weight.val();
    let err = model::merge_adapters(&mut net, None, true).unwrap_err();
    assert!(matches!(err, PeftError::Adapter(_)), "{err}");
    assert!(
        err.to_string().contains("layers.0.up") && err.to_string().contains("NaN or infinite"),
        "{err}"
    );
    // The layer that failed is untouched and nothing is marked merged.
    assert_eq!(
        net.layers[0].up.base.weight.val().into_data(),
        w_before.into_data()
    );
    assert!(net.layers[0].up.adapter.merged_adapters().is_empty());
}

fn named_adapters_switch_and_delete<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(2, device);
    let x = input::<B>(device);
    add_low_rank(&mut net, "a", Targets::list(["up"]), 2, device).unwrap();
    add_low_rank(&mut net, "b", Targets::list(["down"]), 2, device).unwrap();
    assert_eq!(model::adapter_names(&mut net).unwrap(), vec!["a", "b"]);

    // Only "b" active: same as a model holding "b" alone.
    model::set_active_adapters(&mut net, &["b"]).unwrap();
    let only_b = net.forward(x.clone());
    let mut b_alone = net.clone();
    model::delete_adapter(&mut b_alone, "a").unwrap();
    assert_eq!(model::adapter_names(&mut b_alone).unwrap(), vec!["b"]);
    assert_close(b_alone.forward(x.clone()), only_b.clone());

    // Both active differs from either alone.
    model::set_active_adapters(&mut net, &["a", "b"]).unwrap();
    let both = net.forward(x.clone());
    assert!((both - only_b).abs().max().into_scalar().elem::<f32>() > 1e-4);

    let err = model::set_active_adapters(&mut net, &["c"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`c`") && err.contains("a, b"), "{err}");
    let err = net.layers[0]
        .up
        .adapter
        .0
        .insert("a", LowRank::random(1, D, H, 1.0, device))
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

fn only_adapter_parameters_train<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(2, device);
    add_low_rank(&mut net, "a", Targets::list(["up", "down"]), 2, device).unwrap();
    let net = freeze(net, &AdapterOnly);

    let report = trainable_report(&net);
    let lora = 2 * ((2 * D + 2 * H) + (2 * H + 2 * D)); // per layer: up [2,6]+[10,2], down [2,10]+[6,2]
    let base = 2 * ((D * H + H) + (H * D + D)) + D * 3;
    assert_eq!(report.trainable, lora);
    assert_eq!(report.total, lora + base);
    assert!(report.to_string().starts_with(&format!(
        "trainable params: {lora} || all params: {}",
        lora + base
    )));
    let paths = trainable_paths(&net);
    assert!(paths.iter().all(|p| p.contains(".adapter.")), "{paths:?}");

    let x = input::<B>(device);
    let before = net.clone();
    let loss = net.forward(x).powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &net);
    assert_eq!(
        grads.len(),
        paths.len(),
        "gradients for exactly the adapter parameters"
    );
    let mut optim = AdamWConfig::new().init::<B, Net<B>>();
    let after = optim.step(1e-2, net, grads);
    assert_eq!(
        optim.to_record().len(),
        paths.len(),
        "optimizer state for exactly the adapter parameters"
    );

    for (b0, b1) in before.layers.iter().zip(&after.layers) {
        assert_eq!(
            b0.up.base.weight.val().into_data(),
            b1.up.base.weight.val().into_data()
        );
        assert_eq!(
            b0.down.base.bias.as_ref().map(|b| b.val().into_data()),
            b1.down.base.bias.as_ref().map(|b| b.val().into_data())
        );
        let a0 = b0.up.adapter.0.get("a").unwrap().a.val();
        let a1 = b1.up.adapter.0.get("a").unwrap().a.val();
        assert!(
            (a0 - a1).abs().max().into_scalar().elem::<f32>() > 1e-4,
            "adapter did not move"
        );
    }
    assert_eq!(
        before.lm_head.weight.val().into_data(),
        after.lm_head.weight.val().into_data()
    );
}

fn adapters_save_and_load_under_peft_keys<B: AutodiffBackend>(device: &B::Device) {
    let mut net = new_net::<B>(2, device);
    add_low_rank(&mut net, "default", Targets::list(["down"]), 2, device).unwrap();
    let x = input::<B>(device);
    let expected = net.forward(x.clone());

    // Save: peft's layout, [r, in] and [out, r], no adapter name in the key.
    let mut tensors = Vec::new();
    net.visit_linears(&mut |path, l| {
        if let Some(a) = l.adapter.0.get("default") {
            tensors.push((peft_key(path, "lora_A.weight"), a.a.val().into_data()));
            tensors.push((peft_key(path, "lora_B.weight"), a.b.val().into_data()));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adapter_model.safetensors");
    TensorFile::write(&file, tensors).unwrap();

    // Load into a model with the same base weights and no adapter.
    let mut fresh = net.clone();
    model::delete_adapter(&mut fresh, "default").unwrap();
    let mut st = TensorFile::read(&file).unwrap();
    fresh
        .map_linears(&mut |path, l| {
            let (inp, out) = (l.base.in_features(), l.base.out_features());
            if path.ends_with("down") {
                let a = st.take(&peft_key(path, "lora_A.weight"), &[2, inp], "")?;
                let b = st.take(&peft_key(path, "lora_B.weight"), &[out, 2], "")?;
                l.adapter.0.insert(
                    "default",
                    LowRank {
                        a: Param::from_data(a, device),
                        b: Param::from_data(b, device),
                        scale: 0.5,
                    },
                )?;
            }
            Ok(())
        })
        .unwrap();
    st.finish().unwrap();
    assert_eq!(fresh.forward(x).into_data(), expected.into_data());
}

fn merge_and_unload_keeps_the_merged_weights_and_removes_the_adapters<B: AutodiffBackend>(
    device: &B::Device,
) {
    let mut net = new_net::<B>(2, device);
    let x = input::<B>(device);
    let base = net.forward(x.clone());
    add_low_rank(&mut net, "sft", Targets::list(["up", "down"]), 2, device).unwrap();
    let adapted = net.forward(x.clone());
    assert!(
        (adapted.clone() - base.clone())
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>()
            > 1e-3
    );
    // Merged already (as a loader with `merge` leaves it) or not: both fold in once.
    let mut premerged = net.clone();
    model::merge_adapters(&mut premerged, None, true).unwrap();
    for m in [&mut net, &mut premerged] {
        model::merge_and_unload(m, true).unwrap();
        assert!(model::adapter_names(m).unwrap().is_empty());
        assert_close(m.forward(x.clone()), adapted.clone());
    }
    // A new adapter on top: disabled, the model is the merged one, not the original base
    // (delete_adapter would have unmerged "sft" first).
    add_low_rank(&mut net, "dpo", Targets::list(["up"]), 2, device).unwrap();
    model::set_adapters_disabled(&mut net, true).unwrap();
    assert_close(net.forward(x.clone()), adapted.clone());
    model::set_adapters_disabled(&mut net, false).unwrap();
    model::delete_adapter(&mut net, "dpo").unwrap();
    assert_close(net.forward(x.clone()), adapted);

    // A bottleneck after a sublayer does not merge: refused, and nothing changes.
    let mut with_bn = new_net::<B>(1, device);
    add_low_rank(&mut with_bn, "a", Targets::list(["up"]), 2, device).unwrap();
    with_bn
        .map_sublayers(&mut |_, s| {
            s.insert(
                "bn",
                Bottleneck {
                    down: LinearConfig::new(D, 2).init(device),
                    up: LinearConfig::new(2, D).init(device),
                },
            )
        })
        .unwrap();
    let before = with_bn.forward(x.clone());
    let err = model::merge_and_unload(&mut with_bn, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`bn` at layers.0.mlp_adapter"), "{err}");
    assert_eq!(model::adapter_names(&mut with_bn).unwrap(), vec!["a", "bn"]);
    assert!(with_bn.layers[0].up.adapter.merged_adapters().is_empty());
    assert_eq!(with_bn.forward(x).into_data(), before.into_data());
}

peft_testing::backend_tests!(
    disabled_adapters_give_the_base_output_bit_for_bit,
    merging_equals_unmerged_and_unmerge_restores_weights,
    safe_merge_refuses_non_finite_results,
    named_adapters_switch_and_delete,
    only_adapter_parameters_train,
    adapters_save_and_load_under_peft_keys,
    merge_and_unload_keeps_the_merged_weights_and_removes_the_adapters,
);
