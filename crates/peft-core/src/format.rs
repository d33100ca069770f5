//! `adapter_model.safetensors`: tensors under peft's key names, validated on load.
//!
//! peft saves an adapter's tensors under `base_model.model.<module path>.<name>` with no
//! adapter name in the key (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
//! in the Hugging Face layout (`lora_A` is `[r, in]`, `lora_B` is `[out, r]`). Prompt
//! methods save `prompt_embeddings` at the top level. [`peft_key`] builds those names.
//!
//! [`TensorFile`] reads a file, converts F16/BF16 to F32, and hands tensors out by key and
//! expected shape: a missing key, a wrong shape and a key nobody asked for are errors that
//! name the key and both shapes. Writing is atomic (a temporary file, then a rename).
//!
//! ```
//! use burn::tensor::TensorData;
//! use peft_core::format::{peft_key, TensorFile};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("adapter_model.safetensors");
//! let key = peft_key("model.layers.0.self_attn.q_proj", "lora_A.weight");
//! let a = TensorData::new(vec![1.0f32; 2 * 4], [2, 4]);
//! TensorFile::write(&path, vec![(key.clone(), a.clone())]).unwrap();
//!
//! let mut file = TensorFile::read(&path).unwrap();
//! assert_eq!(file.take(&key, &[2, 4], "").unwrap(), a);
//! file.finish().unwrap(); // nothing left over
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{PeftError, Result};
use crate::target::abbreviate;

/// File name of the weights in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix peft puts before every module path in an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// peft's key for tensor `name` (`lora_A.weight`, `ia3_l`, ...) of the module at `path`.
pub fn peft_key(path: &str, name: &str) -> String {
    format!("{PEFT_PREFIX}{path}.{name}")
}

/// Splits a peft key into the module path (without the prefix) and the tensor name that
/// follows one of the `markers` (`lora_A`, `lora_B`, ...): `("model.layers.0.q_proj",
/// "lora_A.weight")`. `None` when no marker is a segment of the key.
pub fn split_key<'k>(key: &'k str, markers: &[&str]) -> Option<(&'k str, &'k str)> {
    let key = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let mut offset = 0;
    for segment in key.split('.') {
        if markers.contains(&segment) && offset > 0 {
            return Some((&key[..offset - 1], &key[offset..]));
        }
        offset += segment.len() + 1;
    }
    None
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed to
/// disk, then renamed over `path`. A crash leaves either the old file or the new one (and
/// a temporary file, which the next write of `path` removes).
///
/// # Errors
/// [`PeftError::Io`]; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| PeftError::io("create directory", &dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    // Temporary files of earlier writes of the same file by killed processes.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let prefix = format!(".{name}.tmp");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(PeftError::io("write", path, e));
    }
    Ok(())
}

/// The tensors of a safetensors file, handed out by key and expected shape.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, TensorData>,
    metadata: HashMap<String, String>,
    base_model: Option<String>,
}

fn to_burn_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl TensorFile {
    /// Reads a safetensors file; float tensors are converted to F32.
    ///
    /// # Errors
    /// [`PeftError::Io`], [`PeftError::InvalidSafetensors`] for a malformed file and
    /// [`PeftError::UnsupportedDtype`] for a non-float tensor.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| PeftError::io("read", &path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses safetensors bytes; `path` is used in messages.
    ///
    /// # Errors
    /// As [`TensorFile::read`].
    pub fn from_bytes(bytes: &[u8], path: PathBuf) -> Result<Self> {
        let invalid = |message: String| PeftError::InvalidSafetensors {
            path: path.clone(),
            message,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| invalid(e.to_string()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (key, view) in st.tensors() {
            let dtype = to_burn_dtype(view.dtype()).ok_or_else(|| PeftError::UnsupportedDtype {
                key: key.clone(),
                dtype: format!("{:?}", view.dtype()),
                path: path.clone(),
            })?;
            let data =
                TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
            let data = if dtype == DType::F32 {
                data
            } else {
                data.convert::<f32>()
            };
            tensors.insert(key, data);
        }
        Ok(Self {
            path,
            tensors,
            metadata,
            base_model: None,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the base model the adapter was made for (`base_model_name_or_path` of its
    /// `adapter_config.json`), so that a missing, mis-shaped or unexpected tensor names it:
    /// an adapter loaded onto another model says which model it wants.
    pub fn with_base_model(mut self, base: Option<&str>) -> Self {
        self.base_model = base.filter(|b| !b.is_empty()).map(str::to_string);
        self
    }

    /// The base model in words, for messages.
    fn base_words(&self) -> String {
        match &self.base_model {
            Some(b) => format!("base model `{b}` (base_model_name_or_path in adapter_config.json)"),
            None => "another base model (adapter_config.json records no base_model_name_or_path)"
                .to_string(),
        }
    }

    /// The `__metadata__` of the file.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The keys not yet taken, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of a tensor not yet taken.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.to_vec())
    }

    /// Takes a tensor that must exist with the given shape and finite values. `hint`
    /// completes the shape-mismatch message ("whose `q_proj` is [out=576, in=576]", ...).
    ///
    /// # Errors
    /// [`PeftError::MissingTensor`], [`PeftError::ShapeMismatch`] or
    /// [`PeftError::NonFiniteTensor`].
    pub fn take(&mut self, key: &str, expected: &[usize], hint: &str) -> Result<TensorData> {
        match self.take_optional(key, expected, hint)? {
            Some(t) => Ok(t),
            None => Err(PeftError::MissingTensor {
                key: key.to_string(),
                expected: expected.to_vec(),
                path: self.path.clone(),
                base: self
                    .base_model
                    .as_ref()
                    .map(|b| format!(" (it was made for `{b}`)"))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Takes a tensor if present, checking its shape and that its values are finite.
    ///
    /// # Errors
    /// [`PeftError::ShapeMismatch`] or [`PeftError::NonFiniteTensor`].
    pub fn take_optional(
        &mut self,
        key: &str,
        expected: &[usize],
        hint: &str,
    ) -> Result<Option<TensorData>> {
        let Some(t) = self.tensors.remove(key) else {
            return Ok(None);
        };
        if t.shape.as_slice() != expected {
            let found = t.shape.to_vec();
            let hint = if hint.is_empty() {
                format!("whose layer has shape {found:?} here")
            } else {
                hint.to_string()
            };
            return Err(PeftError::ShapeMismatch {
                key: key.to_string(),
                expected: expected.to_vec(),
                found,
                context: format!(
                    "(the model loaded here is the one {hint}); the adapter was made for {}",
                    self.base_words()
                ),
                path: self.path.clone(),
            });
        }
        self.check_finite(key, &t)?;
        Ok(Some(t))
    }

    fn check_finite(&self, key: &str, t: &TensorData) -> Result<()> {
        // Tensors are held as f32 (see `from_bytes`).
        let Ok(values) = t.as_slice::<f32>() else {
            return Ok(());
        };
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            return Err(PeftError::NonFiniteTensor {
                key: key.to_string(),
                count,
                total: values.len(),
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Takes a tensor of any shape.
    pub fn take_any(&mut self, key: &str) -> Option<TensorData> {
        self.tensors.remove(key)
    }

    /// Succeeds when every tensor was taken.
    ///
    /// # Errors
    /// [`PeftError::UnexpectedTensors`] naming the keys left.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let keys: Vec<&String> = self.tensors.keys().collect();
        Err(PeftError::UnexpectedTensors {
            keys: abbreviate(&keys, 10),
            base: self.base_words(),
            path: self.path,
        })
    }

    /// Writes tensors as F32 (converting other float dtypes) with peft's metadata
    /// (`{"format": "pt"}`), atomically.
    ///
    /// # Errors
    /// [`PeftError::Io`], or [`PeftError::InvalidSafetensors`] for duplicate keys.
    pub fn write(path: impl AsRef<Path>, tensors: Vec<(String, TensorData)>) -> Result<()> {
        let path = path.as_ref();
        let mut seen = std::collections::HashSet::new();
        let mut owned = Vec::with_capacity(tensors.len());
        for (key, data) in tensors {
            if !seen.insert(key.clone()) {
                return Err(PeftError::InvalidSafetensors {
                    path: path.to_path_buf(),
                    message: format!("duplicate tensor key `{key}`"),
                });
            }
            let data = if data.dtype == DType::F32 {
                data
            } else {
                data.convert::<f32>()
            };
            owned.push((key, data));
        }
        let views = owned
            .iter()
            .map(|(k, d)| {
                TensorView::new(Dtype::F32, d.shape.to_vec(), d.as_bytes())
                    .map(|v| (k.clone(), v))
                    .map_err(|e| PeftError::InvalidSafetensors {
                        path: path.to_path_buf(),
                        message: format!("tensor `{k}`: {e}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| {
            PeftError::InvalidSafetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        write_atomic(path, &bytes)
    }
}
