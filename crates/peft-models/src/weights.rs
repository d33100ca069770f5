//! Where weights come from: Hugging Face safetensors (single file or sharded) or GGUF.
//!
//! A [`WeightSource`] hands out tensors by their Hugging Face name and expected shape, as
//! f32, and reports what it was asked for but did not have. Loaders take every tensor they
//! need, then call [`WeightSource::finish`], which reports tensors nobody claimed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::tensor::Dtype;

use crate::error::{ModelError, Result};

/// Tensors by Hugging Face name.
pub trait WeightSource {
    /// The checkpoint's path, for messages.
    fn path(&self) -> &Path;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor's shape (row-major), if it exists.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads a tensor as f32 with the given shape.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`],
    /// [`ModelError::UnsupportedDtype`] or an I/O / format error.
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<TensorData>;
    /// Names never taken.
    fn untaken(&self) -> Vec<String>;

    /// Takes a tensor if present.
    ///
    /// # Errors
    /// As [`WeightSource::take`], except for a missing tensor.
    fn take_optional(&mut self, name: &str, expected: &[usize]) -> Result<Option<TensorData>> {
        if self.contains(name) {
            self.take(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Warns about tensors nobody claimed (a loader decides which leftovers are harmless).
    fn finish(&self) {
        let left = self.untaken();
        if !left.is_empty() {
            tracing::warn!(
                "{}: {} tensor(s) not used by the architecture: {}",
                self.path().display(),
                left.len(),
                peft_core::target::abbreviate(&left, 8)
            );
        }
    }
}

fn check_shape(name: &str, found: &[usize], expected: &[usize], path: &Path) -> Result<()> {
    if found != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Refuses a weight with NaN or infinite values, naming it and the file.
///
/// # Errors
/// [`ModelError::InvalidFile`].
pub(crate) fn check_finite(name: &str, values: &[f32], path: &Path) -> Result<()> {
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(ModelError::InvalidFile {
            path: path.to_path_buf(),
            format: "weights",
            message: format!(
                "tensor `{name}` holds {count} NaN or infinite value(s) out of {}; the file is \
                 corrupt",
                values.len()
            ),
        });
    }
    Ok(())
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Weights from `model.safetensors`, or from the shards listed in
/// `model.safetensors.index.json`. F32, F16 and BF16 tensors load as f32.
pub struct SafetensorsSource {
    path: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
    entries: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
}

impl std::fmt::Debug for SafetensorsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSource")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl SafetensorsSource {
    /// Opens the weights of a Hugging Face model directory.
    ///
    /// # Errors
    /// [`ModelError::MissingFile`] when there is neither `model.safetensors` nor an index;
    /// [`ModelError::InvalidFile`] for a malformed or truncated file.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shards: Vec<PathBuf> = if single.exists() {
            vec![single.clone()]
        } else if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| ModelError::io("read", &index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::InvalidFile {
                    path: index.clone(),
                    format: "JSON",
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::InvalidFile {
                    path: index.clone(),
                    format: "safetensors index",
                    message: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(ModelError::InvalidFile {
                        path: index.clone(),
                        format: "safetensors index",
                        message: format!("shard name `{n}` is not a plain file name"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(ModelError::MissingFile {
                path: single,
                hint: "only pytorch_model.bin is present; convert it to safetensors \
                       (transformers: model.save_pretrained(dir, safe_serialization=True))"
                    .into(),
            });
        } else {
            return Err(ModelError::MissingFile {
                path: single,
                hint: "expected model.safetensors or model.safetensors.index.json in the model directory".into(),
            });
        };
        let mut src = Self {
            path: dir.to_path_buf(),
            files: vec![],
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
        };
        for shard in shards {
            if !shard.exists() {
                return Err(ModelError::MissingFile {
                    path: shard,
                    hint: "listed in model.safetensors.index.json".into(),
                });
            }
            let bytes = std::fs::read(&shard).map_err(|e| ModelError::io("read", &shard, e))?;
            src.add_file(shard, bytes)?;
        }
        Ok(src)
    }

    /// Weights from safetensors bytes in memory (`path` is used in messages).
    ///
    /// # Errors
    /// [`ModelError::InvalidFile`] for malformed bytes.
    pub fn from_bytes(bytes: Vec<u8>, path: PathBuf) -> Result<Self> {
        let mut src = Self {
            path: path.clone(),
            files: vec![],
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
        };
        src.add_file(path, bytes)?;
        Ok(src)
    }

    fn add_file(&mut self, path: PathBuf, bytes: Vec<u8>) -> Result<()> {
        let invalid = |message: String| ModelError::InvalidFile {
            path: path.clone(),
            format: "safetensors",
            message,
        };
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let data_start = 8 + header_len;
        let file = self.files.len();
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let (Some(start), Some(end)) =
                (data_start.checked_add(start), data_start.checked_add(end))
            else {
                return Err(invalid(format!(
                    "tensor `{name}` has offsets that overflow"
                )));
            };
            if end > bytes.len() || start > end {
                return Err(invalid(format!(
                    "tensor `{name}` extends past the end of the file (truncated?)"
                )));
            }
            if self.entries.contains_key(&name) {
                return Err(invalid(format!(
                    "tensor `{name}` appears in more than one shard"
                )));
            }
            self.entries.insert(
                name,
                Entry {
                    file,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        self.files.push((path, bytes));
        Ok(())
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let Some(e) = self.entries.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                expected: expected.to_vec(),
                path: self.path.clone(),
            });
        };
        let file_path = &self.files[e.file].0;
        check_shape(name, &e.shape, expected, file_path)?;
        let dtype = match e.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                    path: file_path.clone(),
                    hint: if matches!(other, Dtype::U8 | Dtype::I8) {
                        " (a quantized checkpoint? 4-bit bitsandbytes checkpoints load through peft-qlora)".into()
                    } else {
                        String::new()
                    },
                });
            }
        };
        let bytes = self.files[e.file].1[e.start..e.end].to_vec();
        let elem = dtype.size();
        if bytes.len() != e.shape.iter().product::<usize>() * elem {
            return Err(ModelError::InvalidFile {
                path: file_path.clone(),
                format: "safetensors",
                message: format!(
                    "tensor `{name}` has {} bytes for shape {:?} of {dtype:?}",
                    bytes.len(),
                    e.shape
                ),
            });
        }
        let data = TensorData::from_bytes_vec(bytes, e.shape.clone(), dtype);
        let data = if dtype == DType::F32 {
            data
        } else {
            data.convert::<f32>()
        };
        if let Ok(values) = data.as_slice::<f32>() {
            check_finite(name, values, file_path)?;
        }
        self.taken.insert(name.to_string());
        Ok(data)
    }

    fn untaken(&self) -> Vec<String> {
        self.entries
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .cloned()
            .collect()
    }
}
