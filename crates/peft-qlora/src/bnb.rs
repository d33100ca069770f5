//! The bitsandbytes 4-bit serialization, read and written.
//!
//! transformers saves a bitsandbytes 4-bit linear layer `P` as
//!
//! | key | dtype, shape | contents |
//! |---|---|---|
//! | `P.weight` | U8 `[ceil(n/2), 1]` | packed codes, first value in the high nibble |
//! | `P.weight.absmax` | F32 `[blocks]`, or U8 with double quantization | per-block absmax |
//! | `P.weight.quant_map` | F32 `[16]` | the NF4 or FP4 table |
//! | `P.weight.nested_absmax` | F32 `[ceil(blocks/256)]` | double quantization only |
//! | `P.weight.nested_quant_map` | F32 `[256]` | double quantization only |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and `nested_blocksize`, `nested_dtype`, `nested_offset` |
//!
//! and `config.json` carries a `quantization_config` with `quant_method: "bitsandbytes"`.
//! [`BnbCheckpoint`] reads such a directory (one file or shards) and is a
//! [`WeightSource`] for `peft_models`' loaders; [`bnb_tensors`] and [`write_safetensors`]
//! write the same layout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use peft_models::weights::WeightSource;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use crate::error::{QloraError, Result};
use crate::linear::{Linear4bit, stage_quantized};
use crate::quant::{
    DoubleQuant, NESTED_BLOCKSIZE, Packed4bit, QuantConfig, QuantType, QuantizedWeight,
};

const QUANT_STATE: &str = "weight.quant_state.bitsandbytes__";

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A safetensors checkpoint (one file, or a directory with one file or shards) whose 4-bit
/// layers are in the bitsandbytes layout.
pub struct BnbCheckpoint {
    path: PathBuf,
    files: Vec<Vec<u8>>,
    entries: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
}

impl std::fmt::Debug for BnbCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnbCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// A 4-bit layer as read from a checkpoint: the quantized weight and its code tables.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbLinear {
    /// Codes and statistics.
    pub weight: QuantizedWeight,
    /// `weight.quant_map`.
    pub quant_map: Vec<f32>,
    /// `weight.nested_quant_map`, with double quantization.
    pub nested_quant_map: Option<Vec<f32>>,
}

fn shard_names(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| QloraError::io("read", &index, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| QloraError::checkpoint(&index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| QloraError::checkpoint(&index, "no `weight_map` object"))?;
    let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            if n.contains('/') || n.contains("..") {
                Err(QloraError::checkpoint(
                    &index,
                    format!("shard name `{n}` is not a plain file name"),
                ))
            } else {
                Ok(dir.join(n))
            }
        })
        .collect()
}

impl BnbCheckpoint {
    /// Opens a model directory (`model.safetensors` or sharded) or a single safetensors file.
    ///
    /// # Errors
    /// [`QloraError::Io`] or [`QloraError::InvalidCheckpoint`] for a missing or malformed file.
    pub fn open(path: &Path) -> Result<Self> {
        let shards = if path.is_dir() {
            shard_names(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut ckpt = Self {
            path: path.to_path_buf(),
            files: vec![],
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
        };
        for shard in shards {
            let bytes = std::fs::read(&shard).map_err(|e| QloraError::io("read", &shard, e))?;
            ckpt.add_file(&shard, bytes)?;
        }
        Ok(ckpt)
    }

    /// A checkpoint from the bytes of one safetensors file in memory (`path` names it in
    /// errors).
    ///
    /// # Errors
    /// [`QloraError::InvalidCheckpoint`] for malformed bytes.
    pub fn from_bytes(bytes: Vec<u8>, path: PathBuf) -> Result<Self> {
        let mut ckpt = Self {
            path: path.clone(),
            files: vec![],
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
        };
        ckpt.add_file(&path, bytes)?;
        Ok(ckpt)
    }

    fn add_file(&mut self, shard: &Path, bytes: Vec<u8>) -> Result<()> {
        let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| QloraError::checkpoint(shard, e.to_string()))?;
        let base = 8 + header;
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let (Some(start), Some(end)) = (base.checked_add(s), base.checked_add(e)) else {
                return Err(QloraError::checkpoint(
                    shard,
                    format!("tensor `{name}` has offsets that overflow"),
                ));
            };
            if end > bytes.len() || start > end {
                return Err(QloraError::checkpoint(
                    shard,
                    format!("tensor `{name}` extends past the end of the file (truncated?)"),
                ));
            }
            if self.entries.contains_key(&name) {
                return Err(QloraError::checkpoint(
                    shard,
                    format!("tensor `{name}` appears in more than one shard"),
                ));
            }
            self.entries.insert(
                name,
                Entry {
                    file: self.files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        self.files.push(bytes);
        Ok(())
    }

    fn bytes(&self, name: &str) -> Option<(&Entry, &[u8])> {
        self.entries
            .get(name)
            .map(|e| (e, &self.files[e.file][e.start..e.end]))
    }

    fn require(&mut self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        let (e, b) = self.bytes(name).ok_or_else(|| {
            QloraError::checkpoint(&self.path, format!("tensor `{name}` is missing"))
        })?;
        let out = (e.dtype, e.shape.clone(), b.to_vec());
        self.taken.insert(name.to_string());
        Ok(out)
    }

    fn floats(&mut self, name: &str) -> Result<Vec<f32>> {
        let (dtype, shape, bytes) = self.require(name)?;
        let dt = match dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(QloraError::checkpoint(
                    &self.path,
                    format!("tensor `{name}` is {other:?}; a float tensor was expected"),
                ));
            }
        };
        TensorData::from_bytes_vec(bytes, shape, dt)
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| QloraError::checkpoint(&self.path, format!("tensor `{name}`: {e:?}")))
    }

    /// The data type of the 4-bit layer whose weight is `{prefix}.weight`, if it is one.
    pub fn quant_type(&self, prefix: &str) -> Option<QuantType> {
        [QuantType::Nf4, QuantType::Fp4].into_iter().find(|q| {
            self.entries
                .contains_key(&format!("{prefix}.{QUANT_STATE}{q}"))
        })
    }

    /// Reads the 4-bit layer `prefix` (e.g. `model.layers.0.self_attn.q_proj`).
    ///
    /// # Errors
    /// [`QloraError::InvalidCheckpoint`] when the layer is not 4-bit or its tensors are
    /// missing or inconsistent.
    pub fn read_linear(&mut self, prefix: &str) -> Result<BnbLinear> {
        let path = self.path.clone();
        let bad = |m: String| QloraError::checkpoint(&path, format!("layer `{prefix}`: {m}"));
        let qt = self.quant_type(prefix).ok_or_else(|| {
            bad("no weight.quant_state.bitsandbytes__nf4/__fp4: not a 4-bit layer".into())
        })?;
        let (_, _, state) = self.require(&format!("{prefix}.{QUANT_STATE}{qt}"))?;
        let state: Value = serde_json::from_slice(&state)
            .map_err(|e| bad(format!("quant_state is not JSON: {e}")))?;
        let get_usize = |k: &str| state.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let blocksize =
            get_usize("blocksize").ok_or_else(|| bad("quant_state has no blocksize".into()))?;
        QuantConfig::new()
            .with_blocksize(blocksize)
            .validate()
            .map_err(|e| bad(e.to_string()))?;
        let shape = state.get("shape").cloned().unwrap_or(Value::Null);
        let dims: Option<Vec<usize>> = shape.as_array().and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                .collect()
        });
        let Some([out, inp]) = dims
            .as_deref()
            .map(<[usize]>::to_vec)
            .and_then(|d| <[usize; 2]>::try_from(d).ok())
        else {
            return Err(bad(format!("quant_state shape {shape} is not [out, in]")));
        };
        if let Some(t) = state.get("quant_type").and_then(Value::as_str)
            && QuantType::parse(t).ok() != Some(qt)
        {
            return Err(bad(format!("quant_state says {t} but its key says {qt}")));
        }
        let numel = out.checked_mul(inp).ok_or_else(|| {
            bad(format!(
                "quant_state shape [{out}, {inp}]: the element count overflows"
            ))
        })?;
        let blocks = numel.div_ceil(blocksize);
        // The packed codes may be stored as another dtype (`bnb_4bit_quant_storage`): the
        // bytes are the same.
        let (_, _, packed) = self.require(&format!("{prefix}.weight"))?;
        if packed.len() < numel.div_ceil(2) {
            return Err(bad(format!(
                "weight has {} bytes; {} are needed for {numel} 4-bit values",
                packed.len(),
                numel.div_ceil(2)
            )));
        }
        let packed = packed[..numel.div_ceil(2)].to_vec();
        let quant_map = self.floats(&format!("{prefix}.weight.quant_map"))?;
        if quant_map.len() != 16 {
            return Err(bad(format!(
                "quant_map has {} values, not 16",
                quant_map.len()
            )));
        }
        let absmax_key = format!("{prefix}.weight.absmax");
        let nested = state.get("nested_offset").is_some();
        let (absmax, double, nested_map) = if nested {
            let nb = get_usize("nested_blocksize").unwrap_or(NESTED_BLOCKSIZE);
            if nb != NESTED_BLOCKSIZE {
                return Err(bad(format!(
                    "nested_blocksize {nb} is not supported (bitsandbytes uses 256)"
                )));
            }
            let offset = state
                .get("nested_offset")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("nested_offset is not a number".into()))?
                as f32;
            let (dt, _, codes) = self.require(&absmax_key)?;
            if dt != Dtype::U8 || codes.len() != blocks {
                return Err(bad(format!(
                    "weight.absmax should be {blocks} uint8 codes, found {} bytes of {dt:?}",
                    codes.len()
                )));
            }
            let nested_absmax = self.floats(&format!("{prefix}.weight.nested_absmax"))?;
            if nested_absmax.len() != blocks.div_ceil(NESTED_BLOCKSIZE) {
                return Err(bad(format!(
                    "nested_absmax has {} values, {} expected",
                    nested_absmax.len(),
                    blocks.div_ceil(NESTED_BLOCKSIZE)
                )));
            }
            let map = self.floats(&format!("{prefix}.weight.nested_quant_map"))?;
            if map.len() != 256 {
                return Err(bad(format!(
                    "nested_quant_map has {} values, not 256",
                    map.len()
                )));
            }
            (
                vec![],
                Some(DoubleQuant {
                    codes,
                    nested_absmax,
                    offset,
                }),
                Some(map),
            )
        } else {
            let a = self.floats(&absmax_key)?;
            if a.len() != blocks {
                return Err(bad(format!(
                    "weight.absmax has {} values, {blocks} expected",
                    a.len()
                )));
            }
            (a, None, None)
        };
        Ok(BnbLinear {
            weight: QuantizedWeight {
                codes: Packed4bit {
                    packed,
                    absmax,
                    numel,
                    blocksize,
                    quant_type: qt,
                },
                double,
                shape: [out, inp],
            },
            quant_map,
            nested_quant_map: nested_map,
        })
    }

    /// Reads the 4-bit layer `prefix` onto the device, with its bias if the checkpoint
    /// has `{prefix}.bias`.
    ///
    /// # Errors
    /// As [`BnbCheckpoint::read_linear`].
    pub fn load_linear<B: Backend>(
        &mut self,
        prefix: &str,
        device: &B::Device,
    ) -> Result<Linear4bit<B>> {
        let l = self.read_linear(prefix)?;
        let bias_key = format!("{prefix}.bias");
        let bias = if self.entries.contains_key(&bias_key) {
            let b = self.floats(&bias_key)?;
            let n = b.len();
            Some(Tensor::from_data(TensorData::new(b, [n]), device))
        } else {
            None
        };
        let nested = l
            .nested_quant_map
            .clone()
            .unwrap_or_else(|| crate::codes::dynamic_map().to_vec());
        Ok(Linear4bit::from_quantized_with_tables(
            &l.weight,
            &l.quant_map,
            &nested,
            bias,
            device,
        ))
    }
}

impl WeightSource for BnbCheckpoint {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let prefix = name.strip_suffix(".weight");
        if let Some(p) = prefix.filter(|p| self.quant_type(p).is_some()) {
            let qt = self.quant_type(p)?;
            let (_, b) = self.bytes(&format!("{p}.{QUANT_STATE}{qt}"))?;
            let v: Value = serde_json::from_slice(b).ok()?;
            return v.get("shape")?.as_array().map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect()
            });
        }
        self.entries.get(name).map(|e| e.shape.clone())
    }

    /// A 4-bit weight is staged for the next `Linear4bit::from_dense` of its shape (so it
    /// keeps its exact bytes) and handed out as zeros of its shape; float tensors load as
    /// f32.
    fn take(&mut self, name: &str, expected: &[usize]) -> peft_models::Result<TensorData> {
        let to_model = |e: QloraError| peft_models::ModelError::InvalidInput(e.to_string());
        if let Some(prefix) = name.strip_suffix(".weight")
            && self.quant_type(prefix).is_some()
        {
            {
                let l = self.read_linear(prefix).map_err(to_model)?;
                if l.weight.shape[..] != *expected {
                    return Err(peft_models::ModelError::ShapeMismatch {
                        name: name.to_string(),
                        expected: expected.to_vec(),
                        found: l.weight.shape.to_vec(),
                        path: self.path.clone(),
                    });
                }
                if l.quant_map != l.weight.codes.quant_type.table()
                    || l.nested_quant_map
                        .as_ref()
                        .is_some_and(|m| m[..] != crate::codes::dynamic_map()[..])
                {
                    tracing::warn!(
                        "{name}: the checkpoint's code table differs from bitsandbytes' standard one; \
                         the standard table is used"
                    );
                }
                for k in ["absmax", "quant_map", "nested_absmax", "nested_quant_map"] {
                    self.taken.insert(format!("{name}.{k}"));
                }
                stage_quantized(l.weight);
                let [out, inp] = [expected[0], expected[1]];
                return Ok(TensorData::new(vec![0.0f32; out * inp], [out, inp]));
            }
        }
        if !self.entries.contains_key(name) {
            return Err(peft_models::ModelError::MissingTensor {
                name: name.to_string(),
                expected: expected.to_vec(),
                path: self.path.clone(),
            });
        }
        let shape = self.entries[name].shape.clone();
        if shape != expected {
            return Err(peft_models::ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
                path: self.path.clone(),
            });
        }
        let v = self.floats(name).map_err(to_model)?;
        Ok(TensorData::new(v, shape))
    }

    fn untaken(&self) -> Vec<String> {
        self.entries
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .cloned()
            .collect()
    }
}

/// One tensor to write: key, dtype, shape, little-endian bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An f32 tensor to write.
pub fn raw_f32(key: String, shape: Vec<usize>, values: &[f32]) -> RawTensor {
    (key, Dtype::F32, shape, f32_bytes(values))
}

/// bitsandbytes' `quant_state` JSON, key for key and formatted as Python's `json.dumps`.
fn quant_state_json(w: &QuantizedWeight) -> String {
    let c = &w.codes;
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{}, {}]",
        c.quant_type, c.blocksize, w.shape[0], w.shape[1]
    );
    if let Some(d) = &w.double {
        // Python writes the f32 offset widened to a double, in its shortest form.
        let off = serde_json::to_string(&f64::from(d.offset)).unwrap_or_else(|_| "0.0".into());
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {off}"
        ));
    }
    s.push('}');
    s
}

/// The tensors of a 4-bit layer under `prefix`, in the bitsandbytes layout (and the bias).
pub fn bnb_tensors<B: Backend>(prefix: &str, layer: &Linear4bit<B>) -> Vec<RawTensor> {
    let w = layer.to_quantized();
    let mut out = vec![(
        format!("{prefix}.weight"),
        Dtype::U8,
        vec![w.codes.packed.len(), 1],
        w.codes.packed.clone(),
    )];
    match &w.double {
        Some(d) => {
            out.push((
                format!("{prefix}.weight.absmax"),
                Dtype::U8,
                vec![d.codes.len()],
                d.codes.clone(),
            ));
            out.push(raw_f32(
                format!("{prefix}.weight.nested_absmax"),
                vec![d.nested_absmax.len()],
                &d.nested_absmax,
            ));
            let map = layer
                .nested_quant_map()
                .unwrap_or_else(|| crate::codes::dynamic_map().to_vec());
            out.push(raw_f32(
                format!("{prefix}.weight.nested_quant_map"),
                vec![map.len()],
                &map,
            ));
        }
        None => out.push(raw_f32(
            format!("{prefix}.weight.absmax"),
            vec![w.codes.absmax.len()],
            &w.codes.absmax,
        )),
    }
    let map = layer.quant_map();
    out.push(raw_f32(
        format!("{prefix}.weight.quant_map"),
        vec![map.len()],
        &map,
    ));
    let state = quant_state_json(&w).into_bytes();
    out.push((
        format!("{prefix}.{QUANT_STATE}{}", w.codes.quant_type),
        Dtype::U8,
        vec![state.len()],
        state,
    ));
    if let Some(b) = &layer.bias {
        let v = b
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default();
        out.push(raw_f32(format!("{prefix}.bias"), vec![v.len()], &v));
    }
    out
}

/// Writes tensors as a safetensors file (metadata `format: pt`, as transformers writes),
/// atomically.
///
/// # Errors
/// [`QloraError::Io`], or [`QloraError::InvalidCheckpoint`] for inconsistent tensors.
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| QloraError::checkpoint(path, format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| QloraError::checkpoint(path, e.to_string()))?;
    peft_core::format::write_atomic(path, &bytes)?;
    Ok(())
}

/// transformers' `quantization_config` for a 4-bit bitsandbytes model quantized with
/// `config` (f32 compute, uint8 storage, `lm_head` not quantized).
pub fn quantization_config_json(config: &QuantConfig) -> Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": config.quant_type.as_str(),
        "bnb_4bit_use_double_quant": config.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Whether `dir` is a Hugging Face directory saved with a 4-bit bitsandbytes
/// `quantization_config`.
pub fn is_bnb_checkpoint(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    let q = &v["quantization_config"];
    q["quant_method"] == "bitsandbytes" && (q["load_in_4bit"] == true || q["_load_in_4bit"] == true)
}
