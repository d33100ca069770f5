//! peft-qlora against bitsandbytes: fixtures made by scripts/fixtures/qlora.py with
//! bitsandbytes' CPU quantizer and transformers' BitsAndBytesConfig.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Flex, NdArray};
use burn::prelude::*;
use peft_core::inject::LinearWeight;
use peft_models::{CausalLm, ForwardInput};
use peft_qlora::codes::{FP4, NF4, dynamic_map};
use peft_qlora::quant::{QuantizedWeight, dequantize_4bit, quantize_4bit};
use peft_qlora::{
    Linear4bit, QloraLlama, QuantBackend, QuantConfig, QuantType, base_memory, load_bnb_llama,
    load_qlora_llama, save_bnb_llama,
};
use safetensors::tensor::Dtype;

type B = NdArray;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Raw tensors of a safetensors file: dtype, shape, bytes.
fn read_raw(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[derive(Debug)]
struct Case {
    name: String,
    quant_type: QuantType,
    blocksize: usize,
    shape: Vec<usize>,
}

fn cases(json: &str) -> Vec<Case> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(json)).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            quant_type: QuantType::parse(c["quant_type"].as_str().unwrap()).unwrap(),
            blocksize: c["blocksize"].as_u64().unwrap() as usize,
            shape: c["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
        })
        .collect()
}

#[test]
fn code_tables_are_bitsandbytes() {
    let t = read_raw(&fixture("double.safetensors"));
    let nf4 = f32s(&t["nf4_bs64_300x64.quant_map"].2);
    let fp4 = f32s(&t["fp4_bs64_256x64.quant_map"].2);
    let map = f32s(&t["nf4_bs64_300x64.nested_quant_map"].2);
    assert_eq!(nf4, NF4.to_vec());
    assert_eq!(fp4, FP4.to_vec());
    assert_eq!(map, dynamic_map().to_vec());
}

/// Same bytes, same absmax, same dequantized values as bitsandbytes' quantize_4bit for NF4
/// and FP4, block sizes 32..4096, sizes not divisible by the block, odd sizes, zero
/// blocks and values exactly on the rounding midpoints.
#[test]
fn quantize_4bit_matches_bitsandbytes_bytes() {
    let t = read_raw(&fixture("blockwise.safetensors"));
    let all = cases("blockwise.json");
    assert!(all.len() >= 30, "{} cases", all.len());
    for c in &all {
        let input = f32s(&t[&format!("{}.input", c.name)].2);
        assert_eq!(input.len(), c.shape.iter().product::<usize>());
        let q = quantize_4bit(&input, c.blocksize, c.quant_type).unwrap();
        let packed = &t[&format!("{}.packed", c.name)];
        assert_eq!(packed.1, vec![input.len().div_ceil(2), 1], "{}", c.name);
        let diff = q
            .packed
            .iter()
            .zip(&packed.2)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(q.packed.len(), packed.2.len(), "{}", c.name);
        assert_eq!(diff, 0, "{}: {diff} bytes differ from bitsandbytes", c.name);
        let absmax = f32s(&t[&format!("{}.absmax", c.name)].2);
        assert_eq!(q.absmax, absmax, "{}: absmax", c.name);
        let deq = f32s(&t[&format!("{}.dequant", c.name)].2);
        let ours = dequantize_4bit(&q.packed, &q.absmax, input.len(), c.blocksize, c.quant_type);
        assert_eq!(ours, deq, "{}: dequantized values", c.name);
    }
}

/// Double quantization: the 8-bit absmax codes, offset, nested absmax and the dequantized
/// absmax and weight, as bitsandbytes computes them (compress_statistics=True).
#[test]
fn double_quantization_matches_bitsandbytes() {
    let t = read_raw(&fixture("double.safetensors"));
    let device = Default::default();
    for c in cases("double.json") {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].2.clone();
        let input = f32s(&get("input"));
        let shape = [c.shape[0], c.shape[1]];
        let config = QuantConfig::new()
            .with_quant_type(c.quant_type)
            .with_blocksize(c.blocksize)
            .with_double_quant(true);
        let q = QuantizedWeight::quantize(&input, shape, &config).unwrap();
        assert_eq!(q.codes.packed, get("packed"), "{}: packed codes", c.name);
        let d = q.double.as_ref().unwrap();
        let offset = f32s(&get("offset"))[0];
        assert!(
            (d.offset - offset).abs() <= offset.abs() * 2e-7,
            "{}: offset {} vs {offset}",
            c.name,
            d.offset
        );
        let qabsmax = get("qabsmax");
        let differ = d.codes.iter().zip(&qabsmax).filter(|(a, b)| a != b).count();
        assert_eq!(d.codes.len(), qabsmax.len());
        assert_eq!(differ, 0, "{}: {differ} absmax codes differ", c.name);
        let nested = f32s(&get("nested_absmax"));
        for (a, b) in d.nested_absmax.iter().zip(&nested) {
            assert!(
                (a - b).abs() <= b.abs() * 1e-6,
                "{}: nested {a} vs {b}",
                c.name
            );
        }
        // The offset is a float mean that torch sums in its own order: it may differ from
        // ours in the last bit, and every dequantized absmax moves with it. Allow a few
        // ulps of the statistics' scale.
        let scale = offset.abs() + nested.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let absmax_ref = f32s(&get("absmax_dequant"));
        for (a, b) in q.absmax().iter().zip(&absmax_ref) {
            assert!(
                (a - b).abs() <= 1e-6 * scale,
                "{}: absmax {a} vs {b}",
                c.name
            );
        }
        let deq_ref = f32s(&get("dequant"));
        let host = q.dequantize();
        let max_err = host
            .iter()
            .zip(&deq_ref)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // Within a few ulps of the weight scale (the absmax may carry the offset's last bit).
        let wmax = deq_ref.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            max_err <= 1e-6 * wmax,
            "{}: host dequantization off by {max_err}",
            c.name
        );
        // The device paths (unpack, lookup, nested scale) give the same values: burn tensor
        // ops on ndarray, the host kernel on flex.
        for (backend, dev) in [
            ("ndarray", device_weight::<NdArray>(&q)),
            ("flex", device_weight::<Flex>(&q)),
        ] {
            let max_dev = dev
                .iter()
                .zip(&deq_ref)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                max_dev <= 1e-6 * wmax,
                "{}: {backend} dequantization off by {max_dev}",
                c.name
            );
        }
        let layer = Linear4bit::<B>::from_quantized(&q, None, &device);
        // And the device copy reads back to the same bitsandbytes bytes.
        assert_eq!(layer.to_quantized(), q, "{}", c.name);
    }
}

fn device_weight<Bk: QuantBackend>(q: &QuantizedWeight) -> Vec<f32> {
    let layer = Linear4bit::<Bk>::from_quantized(q, None, &Default::default());
    layer.weight().into_data().to_vec().unwrap()
}

fn logits_fixture(dir: &str) -> (Vec<i64>, Vec<f32>, Vec<f32>, [usize; 2]) {
    let t = read_raw(&fixture(&format!("{dir}/logits.safetensors")));
    let ids: Vec<i64> = t["input_ids"]
        .2
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let shape = [t["logits"].1[0], t["logits"].1[1]];
    (ids, f32s(&t["logits"].2), f32s(&t["dense_logits"].2), shape)
}

fn logits<Bk: Backend, M: CausalLm<Bk>>(m: &M, ids: &[i64], device: &Bk::Device) -> Vec<f32> {
    let ids = Tensor::<Bk, 1, Int>::from_data(TensorData::new(ids.to_vec(), [ids.len()]), device)
        .unsqueeze::<2>();
    m.forward(ForwardInput::new(ids), None)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A checkpoint saved by transformers + bitsandbytes loads and gives transformers' logits.
/// The weights are bitsandbytes' exact dequantized values, so what is left is f32 rounding
/// in a different order of operations (the dense Llama fixture agrees with transformers to
/// about 1e-5 on these logits of magnitude ~1): 1e-4 is that with margin, while the
/// quantization error itself moves the logits by ~1 (see `dense_logits`).
#[test]
fn bitsandbytes_checkpoint_gives_transformers_logits() {
    checkpoint_logits::<NdArray>();
}

/// The same on flex, whose 4-bit products are host kernels: the whole sequence goes through
/// the dequantize-then-matmul path, prefixes of one and three tokens through the fused
/// product (causal attention makes a prefix's logits the first rows of the full ones).
#[test]
fn flex_kernels_give_transformers_logits() {
    kernels_give_transformers_logits::<Flex>();
}

/// The same on wgpu, whose 4-bit products are CubeCL kernels (`peft_qlora::cube`): the
/// whole sequence through the tiled kernel, the prefixes through the matrix-vector one.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kernels_give_transformers_logits() {
    kernels_give_transformers_logits::<burn::backend::Wgpu>();
}

fn kernels_give_transformers_logits<Bk: QuantBackend>() {
    checkpoint_logits::<Bk>();
    let device = Default::default();
    for dir in ["llama_gqa_nf4", "llama_gqa_fp4"] {
        let model: QloraLlama<Bk> = load_bnb_llama(&fixture(dir), &device).unwrap();
        let (ids, want, _, [_, vocab]) = logits_fixture(dir);
        for n in [1, 3] {
            let got = logits(&model, &ids[..n], &device);
            let d = max_diff(&got, &want[..n * vocab]);
            assert!(
                d < 1e-4,
                "{dir}: {n}-token logits differ from transformers by {d}"
            );
        }
    }
}

fn checkpoint_logits<Bk: QuantBackend>() {
    let device = Default::default();
    for dir in ["llama_gqa_nf4", "llama_gqa_fp4"] {
        let model: QloraLlama<Bk> = load_bnb_llama(&fixture(dir), &device).unwrap();
        let (ids, want, dense, _) = logits_fixture(dir);
        let got = logits(&model, &ids, &device);
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "{dir}: logits differ from transformers by {d}");
        assert!(
            max_diff(&dense, &want) > 1e-2,
            "{dir}: the 4-bit fixture is not quantized?"
        );
    }
}

/// Quantizing the dense f32 model here gives the bytes transformers + bitsandbytes saved
/// for the same model (NF4 with double quantization, FP4 without).
#[test]
fn quantizing_the_dense_model_gives_the_checkpoint_bytes() {
    let device = Default::default();
    let dense_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-models/tests/fixtures/llama_gqa");
    for (dir, config) in [
        ("llama_gqa_nf4", QuantConfig::new()),
        (
            "llama_gqa_fp4",
            QuantConfig::new()
                .with_quant_type(QuantType::Fp4)
                .with_double_quant(false),
        ),
    ] {
        let model: QloraLlama<B> = load_qlora_llama(&dense_dir, &config, &device).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_bnb_llama(&model, out.path()).unwrap();
        let ours = read_raw(&out.path().join("model.safetensors"));
        let theirs = read_raw(&fixture(&format!("{dir}/model.safetensors")));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{dir}: keys"
        );
        for (k, (dt, shape, bytes)) in &theirs {
            let (odt, oshape, obytes) = &ours[k];
            if k.contains("quant_state") {
                // The JSON holds the offset, a float mean: compared with a tolerance.
                let a: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                let b: serde_json::Value = serde_json::from_slice(obytes).unwrap();
                for f in [
                    "quant_type",
                    "blocksize",
                    "dtype",
                    "shape",
                    "nested_blocksize",
                ] {
                    assert_eq!(a[f], b[f], "{dir}: {k}: {f}");
                }
                if let Some(off) = a["nested_offset"].as_f64() {
                    let o = b["nested_offset"].as_f64().unwrap();
                    assert!(
                        (off - o).abs() <= off.abs() * 2e-7,
                        "{dir}: {k}: offset {o} vs {off}"
                    );
                }
                continue;
            }
            assert_eq!((dt, shape), (odt, oshape), "{dir}: {k}");
            if k.ends_with(".nested_absmax") {
                continue; // checked with a tolerance below: it depends on the f32 mean
            }
            assert_eq!(bytes, obytes, "{dir}: {k} differs from bitsandbytes");
        }
        for (k, (_, _, bytes)) in theirs.iter().filter(|(k, _)| k.ends_with(".nested_absmax")) {
            let d = max_diff(&f32s(bytes), &f32s(&ours[k].2));
            assert!(d < 1e-6, "{dir}: {k} off by {d}");
        }
    }
}

/// Save, load: the same bytes and the same logits; the saved config is a bitsandbytes one.
#[test]
fn save_then_load_round_trips() {
    let device = Default::default();
    let src = fixture("llama_gqa_nf4");
    let model: QloraLlama<B> = load_bnb_llama(&src, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_bnb_llama(&model, out.path()).unwrap();
    assert!(peft_qlora::is_bnb_checkpoint(out.path()));
    let ours = read_raw(&out.path().join("model.safetensors"));
    let theirs = read_raw(&src.join("model.safetensors"));
    for (k, v) in &theirs {
        if k.contains("quant_state") {
            let a: serde_json::Value = serde_json::from_slice(&v.2).unwrap();
            let b: serde_json::Value = serde_json::from_slice(&ours[k].2).unwrap();
            assert_eq!(a, b, "{k}");
        } else {
            assert_eq!(v, &ours[k], "{k}");
        }
    }
    let again: QloraLlama<B> = load_bnb_llama(out.path(), &device).unwrap();
    let ids = [1i64, 5, 9, 200, 3];
    assert_eq!(logits(&model, &ids, &device), logits(&again, &ids, &device));
}

/// The base weights take at most 0.52 bytes per parameter on the device (NF4, block 64,
/// double quantization) for layers of a realistic size (SmolLM2-135M's MLP: 576 x 1536).
#[test]
fn base_weights_take_at_most_0_52_bytes_per_parameter() {
    let device = Default::default();
    let w = Tensor::<B, 2>::random(
        [1536, 576],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        &device,
    );
    let l = Linear4bit::quantize(w, None, &QuantConfig::new()).unwrap();
    let bpp = l.device_bytes() as f64 / l.num_weights() as f64;
    assert!(bpp <= 0.52, "{bpp} bytes per parameter");
    assert!(bpp >= 0.5, "{bpp}: the codes alone take 0.5");
    // Without double quantization the f32 absmax adds 4/64 bytes.
    let w = Tensor::<B, 2>::random(
        [1536, 576],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        &device,
    );
    let l = Linear4bit::quantize(w, None, &QuantConfig::new().with_double_quant(false)).unwrap();
    let bpp = l.device_bytes() as f64 / l.num_weights() as f64;
    assert!((bpp - 0.5625).abs() < 0.001, "{bpp}");
    // The whole tiny model: its layers are 32 wide, so the code tables weigh more.
    let model: QloraLlama<B> = load_bnb_llama(&fixture("llama_gqa_nf4"), &device).unwrap();
    let m = base_memory(&model);
    assert_eq!(m.weights, 2 * (4 * 32 * 32 + 3 * 32 * 64 - 2 * 32 * 16));
    assert!(m.bytes_per_parameter() > 0.5);
}
