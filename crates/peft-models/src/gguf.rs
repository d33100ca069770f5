//! Reading GGUF files (llama.cpp's model format): metadata, tensor directory and
//! dequantization to f32, bit for bit as ggml and `gguf-py` compute it.
//!
//! # The format
//!
//! Everything is little-endian (big-endian GGUF files are refused):
//!
//! ```text
//! u8[4]  magic "GGUF"
//! u32    version                 2 or 3 (version 1 used u32 counts and is refused)
//! u64    tensor_count
//! u64    metadata_kv_count
//! kv[metadata_kv_count]          string key; u32 value_type; value
//! tensor_info[tensor_count]      string name; u32 n_dims; u64 dims[n_dims]; u32 ggml_type; u64 offset
//! zero padding up to a multiple of ALIGN
//! tensor data                    each tensor at data_start + offset, offsets multiples of ALIGN
//! ```
//!
//! A string is a u64 byte length and that many UTF-8 bytes. Value types are
//! `0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (1 byte), 8 string, 9 array,
//! 10 u64, 11 i64, 12 f64`; an array is a u32 element type, a u64 count and the elements
//! packed (an array of arrays nests the same way). `ALIGN` is the metadata value
//! `general.alignment` if present (a power of two), else 32.
//!
//! `dims[0]` is the innermost, contiguous dimension: a tensor with dims `[ne0, ne1]` is a
//! row-major `[ne1][ne0]` matrix, so its numpy / torch / burn shape is the dims reversed
//! ([`GgufTensorInfo::shape`]). For a linear layer `ne0 = in_features`, so the matrix is
//! already in the Hugging Face `[out, in]` layout. Quantized types store blocks of
//! `block_size` elements in `type_size` bytes; every row is quantized on its own, so `ne0`
//! is a multiple of the block size.
//!
//! # Safety on untrusted files
//!
//! Files come from the internet, so the parser never panics and never allocates from a
//! count it has not checked: every string length, array length, key count and tensor count
//! is checked against the bytes left in the file, arrays nest at most
//! [`MAX_ARRAY_NESTING`] deep, metadata arrays hold at most [`MAX_METADATA_ELEMENTS`]
//! elements in all, tensors have at most 4 dimensions whose product fits in an `i64`,
//! row lengths are multiples of the block size, offsets are aligned and every tensor's data
//! lies inside the file. Duplicate keys and tensor names are refused. A tensor of a type
//! this module does not know is accepted by [`GgufFile::open`] and refused, naming the
//! tensor and the type, when it is read. Metadata strings that are not valid UTF-8 are
//! kept with U+FFFD replacement characters (keys and tensor names must be valid UTF-8).
//!
//! ```no_run
//! use peft_models::gguf::GgufFile;
//!
//! let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let layers = file.require_u64("llama.block_count")?;
//! let (shape, values) = file.read_tensor_f32("blk.0.attn_k.weight")?; // [192, 576]
//! # Ok::<(), peft_models::ModelError>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The alignment of tensor data when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// How deep arrays of arrays may nest in metadata.
pub const MAX_ARRAY_NESTING: usize = 8;

/// The most elements all metadata arrays may hold together (real tokenizers hold about a
/// million; each element costs 32 bytes in memory).
pub const MAX_METADATA_ELEMENTS: u64 = 1 << 24;

/// The longest metadata key or tensor name accepted, in bytes.
pub const MAX_NAME_LEN: u64 = 1 << 16;

/// The largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 30;

/// Vectors are reserved for at most this many elements before their contents are read.
const MAX_PREALLOC: usize = 4096;

const MAGIC: [u8; 4] = *b"GGUF";
const FORMAT: &str = "GGUF";

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte; any non-zero byte reads as `true`, as in gguf-py).
    Bool(bool),
    /// Type 8.
    Str(String),
    /// Type 9: elements of one type (possibly arrays themselves).
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer: any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer: any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a float: the float types exactly, integers converted (64-bit integers
    /// may round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            #[allow(clippy::cast_precision_loss)]
            Self::U64(v) => Some(v as f64),
            #[allow(clippy::cast_precision_loss)]
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The GGUF value type id (0 = u8, ..., 8 = string, 9 = array, ..., 12 = f64).
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// The GGUF name of the value type (`UINT8`, ..., `STRING`, `ARRAY`, ..., `FLOAT64`), as
    /// gguf-py spells it.
    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id())
    }
}

fn value_type_name(id: u32) -> &'static str {
    match id {
        0 => "UINT8",
        1 => "INT8",
        2 => "UINT16",
        3 => "INT16",
        4 => "UINT32",
        5 => "INT32",
        6 => "FLOAT32",
        7 => "BOOL",
        8 => "STRING",
        9 => "ARRAY",
        10 => "UINT64",
        11 => "INT64",
        12 => "FLOAT64",
        _ => "unknown",
    }
}

/// A ggml tensor type. The types this module dequantizes have their own variant; every
/// other id is [`GgmlType::Other`] ([`GgmlType::from_id`] never puts a listed id there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// id 0: f32.
    F32,
    /// id 1: IEEE half.
    F16,
    /// id 30: bfloat16.
    BF16,
    /// id 2: 32 elements in 18 bytes (f16 scale, 4-bit values).
    Q4_0,
    /// id 3: 32 elements in 20 bytes (f16 scale and min, 4-bit values).
    Q4_1,
    /// id 6: 32 elements in 22 bytes (f16 scale, 5-bit values).
    Q5_0,
    /// id 7: 32 elements in 24 bytes (f16 scale and min, 5-bit values).
    Q5_1,
    /// id 8: 32 elements in 34 bytes (f16 scale, 8-bit values).
    Q8_0,
    /// id 10: 256 elements in 84 bytes.
    Q2_K,
    /// id 11: 256 elements in 110 bytes.
    Q3_K,
    /// id 12: 256 elements in 144 bytes.
    Q4_K,
    /// id 13: 256 elements in 176 bytes.
    Q5_K,
    /// id 14: 256 elements in 210 bytes.
    Q6_K,
    /// id 15: 256 elements in 292 bytes (f32 scale, 8-bit values, block sums).
    Q8_K,
    /// Any other id (IQ types, integer types, types newer than this module...).
    Other(u32),
}

/// (id, name, block size, type size) of the ggml types without their own variant, as
/// gguf-py 0.19's `GGML_QUANT_SIZES` lists them.
const OTHER_TYPES: &[(u32, &str, u64, u64)] = &[
    (9, "Q8_1", 32, 40),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// The type with this id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            other => Self::Other(other),
        }
    }

    /// The ggml id of the type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::Other(id) => id,
        }
    }

    fn layout(self) -> Option<(&'static str, u64, u64)> {
        Some(match self {
            Self::F32 => ("F32", 1, 4),
            Self::F16 => ("F16", 1, 2),
            Self::BF16 => ("BF16", 1, 2),
            Self::Q4_0 => ("Q4_0", 32, 18),
            Self::Q4_1 => ("Q4_1", 32, 20),
            Self::Q5_0 => ("Q5_0", 32, 22),
            Self::Q5_1 => ("Q5_1", 32, 24),
            Self::Q8_0 => ("Q8_0", 32, 34),
            Self::Q2_K => ("Q2_K", 256, 84),
            Self::Q3_K => ("Q3_K", 256, 110),
            Self::Q4_K => ("Q4_K", 256, 144),
            Self::Q5_K => ("Q5_K", 256, 176),
            Self::Q6_K => ("Q6_K", 256, 210),
            Self::Q8_K => ("Q8_K", 256, 292),
            Self::Other(id) => {
                let &(_, name, bs, ts) = OTHER_TYPES.iter().find(|t| t.0 == id)?;
                (name, bs, ts)
            }
        })
    }

    /// Elements per block (1 for the float types); `None` for an id whose layout is not
    /// known.
    pub fn block_size(self) -> Option<u64> {
        self.layout().map(|l| l.1)
    }

    /// Bytes per block; `None` for an id whose layout is not known.
    pub fn type_size(self) -> Option<u64> {
        self.layout().map(|l| l.2)
    }

    /// The ggml name (`Q4_K`, `IQ2_XXS`, ...), if the id is known.
    pub fn name(self) -> Option<&'static str> {
        self.layout().map(|l| l.0)
    }

    /// Whether [`dequantize`] handles this type (every variant but [`GgmlType::Other`]).
    pub fn can_dequantize(self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.id()),
        }
    }
}

/// The names of the types [`dequantize`] supports, for messages.
const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor name (`blk.0.attn_k.weight`).
    pub name: String,
    /// The dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major (numpy / torch / burn) order: the dims reversed. A tensor with
    /// no dims is a scalar (`[]`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// The number of elements (the product of the dims; saturates at `u64::MAX`, which a
    /// parsed file never reaches).
    pub fn num_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// The size of the data in bytes: `elements / block_size * type_size`. Fails for a type
    /// whose layout is unknown, a row length that is not a multiple of the block size, or
    /// an overflow.
    pub fn byte_size(&self) -> Result<u64> {
        self.byte_size_msg()
            .map_err(|m| ModelError::InvalidInput(format!("GGUF tensor `{}`: {m}", self.name)))
    }

    fn byte_size_msg(&self) -> std::result::Result<u64, String> {
        let ty = self.ggml_type;
        let (Some(bs), Some(ts)) = (ty.block_size(), ty.type_size()) else {
            return Err(format!("its type ({ty}) has no known block layout"));
        };
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("the element count of dims {:?} overflows", self.dims))?;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(bs) {
            return Err(format!(
                "its row length {ne0} is not a multiple of the {ty} block size {bs}"
            ));
        }
        (n / bs)
            .checked_mul(ts)
            .ok_or_else(|| format!("its byte size overflows ({n} elements of {ty})"))
    }
}

/// A parsed GGUF file: header, metadata and tensor directory. Tensor data stays in the file
/// until [`GgufFile::read_tensor_f32`] (or [`GgufFile::read_tensor_bytes`]) reads it.
#[derive(Clone)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    path: PathBuf,
    alignment: u64,
    data_start: u64,
    file_len: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .field("file_len", &self.file_len)
            .finish()
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor directory of the file at `path`, reading it
    /// through a buffer (tensor data is not read), and validates the directory against the
    /// file length.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| ModelError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| ModelError::io("read the metadata of", path, e))?
            .len();
        Parser::new(BufReader::new(file), len, path).parse()
    }

    /// Parses a whole GGUF file held in memory. `path` names it in errors and is where
    /// [`GgufFile::read_tensor_f32`] reads tensor data from; for data in memory use
    /// [`GgufFile::tensor_data`] and [`GgufFile::dequantize_tensor`].
    pub fn from_bytes(bytes: &[u8], path: PathBuf) -> Result<Self> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        Parser::new(bytes, len, &path).parse()
    }

    /// The file this was parsed from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data alignment (`general.alignment` or 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The length of the file when it was parsed.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The directory entry of a tensor.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn config_error(&self, key: &str, what: &str) -> ModelError {
        let message = match self.get(key) {
            None => format!("GGUF metadata key `{key}` is missing"),
            Some(v) => format!(
                "GGUF metadata key `{key}` is a {} but should be {what}",
                v.type_name()
            ),
        };
        ModelError::InvalidConfig {
            path: self.path.clone(),
            message,
        }
    }

    /// A metadata value that must be a non-negative integer; an [`ModelError::InvalidConfig`]
    /// naming the file and key otherwise.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(GgufValue::as_u64)
            .ok_or_else(|| self.config_error(key, "a non-negative integer"))
    }

    /// A metadata value that must be a number; an [`ModelError::InvalidConfig`] otherwise.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(GgufValue::as_f64)
            .ok_or_else(|| self.config_error(key, "a number"))
    }

    /// A metadata value that must be a string; an [`ModelError::InvalidConfig`] otherwise.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(GgufValue::as_str)
            .ok_or_else(|| self.config_error(key, "a string"))
    }

    /// A metadata value that must be an array; an [`ModelError::InvalidConfig`] otherwise.
    pub fn require_array(&self, key: &str) -> Result<&[GgufValue]> {
        self.get(key)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| self.config_error(key, "an array"))
    }

    fn find(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            expected: Vec::new(),
            path: self.path.clone(),
        })
    }

    fn invalid(&self, message: String) -> ModelError {
        invalid(&self.path, message)
    }

    /// (absolute start, length) of a tensor's data, checked against the file length.
    fn data_range(&self, info: &GgufTensorInfo) -> Result<(u64, usize)> {
        let size = info
            .byte_size_msg()
            .map_err(|m| self.tensor_type_error(info, m))?;
        let start = self.data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.file_len => {
                let len = usize::try_from(size)
                    .map_err(|_| self.invalid(format!("tensor `{}`: {size} bytes do not fit in memory", info.name)))?;
                Ok((start, len))
            }
            _ => Err(self.invalid(format!(
                "tensor `{}`: its data ({size} bytes at offset {} after the data start {}) runs past the end of the file ({} bytes); the file is truncated",
                info.name, info.offset, self.data_start, self.file_len
            ))),
        }
    }

    fn tensor_type_error(&self, info: &GgufTensorInfo, message: String) -> ModelError {
        if info.ggml_type.block_size().is_none() {
            ModelError::UnsupportedDtype {
                name: info.name.clone(),
                dtype: format!("GGML {}", info.ggml_type),
                path: self.path.clone(),
                hint: format!("; this build reads GGML types {SUPPORTED}"),
            }
        } else {
            self.invalid(format!("tensor `{}`: {message}", info.name))
        }
    }

    /// The raw (still quantized) bytes of a tensor, read from [`GgufFile::path`].
    pub fn read_tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.find(name)?;
        let (start, len) = self.data_range(info)?;
        let mut file = File::open(&self.path).map_err(|e| ModelError::io("open", &self.path, e))?;
        let now = file
            .metadata()
            .map_err(|e| ModelError::io("read the metadata of", &self.path, e))?
            .len();
        if now != self.file_len {
            return Err(self.invalid(format!(
                "the file is {now} bytes long but was {} bytes when its header was read; it changed in between",
                self.file_len
            )));
        }
        file.seek(SeekFrom::Start(start))
            .map_err(|e| ModelError::io("seek in", &self.path, e))?;
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf)
            .map_err(|e| ModelError::io("read tensor data from", &self.path, e))?;
        Ok(buf)
    }

    /// A tensor's bytes inside the whole file held in memory (`file` must be the bytes this
    /// was parsed from).
    pub fn tensor_data<'a>(&self, name: &str, file: &'a [u8]) -> Result<&'a [u8]> {
        let info = self.find(name)?;
        if u64::try_from(file.len()).ok() != Some(self.file_len) {
            return Err(self.invalid(format!(
                "the buffer given for tensor `{name}` is {} bytes but the file parsed was {} bytes",
                file.len(),
                self.file_len
            )));
        }
        let (start, len) = self.data_range(info)?;
        let start = usize::try_from(start)
            .map_err(|_| self.invalid(format!("tensor `{name}`: offset out of range")))?;
        file.get(start..start.saturating_add(len))
            .ok_or_else(|| self.invalid(format!("tensor `{name}`: data out of range")))
    }

    /// Dequantizes a tensor's bytes (as [`GgufFile::read_tensor_bytes`] or
    /// [`GgufFile::tensor_data`] return them) to f32, with the shape in row-major order.
    pub fn dequantize_tensor(&self, name: &str, data: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.find(name)?;
        let ty = info.ggml_type;
        if !ty.can_dequantize() {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("GGML {ty}"),
                path: self.path.clone(),
                hint: format!("; this build dequantizes GGML types {SUPPORTED}"),
            });
        }
        let n = usize::try_from(info.num_elements()).map_err(|_| {
            self.invalid(format!(
                "tensor `{name}` has too many elements for this machine"
            ))
        })?;
        let values = dequantize_impl(ty, data, n)
            .map_err(|m| self.invalid(format!("tensor `{name}`: {m}")))?;
        Ok((info.shape(), values))
    }

    /// Reads a tensor's data from [`GgufFile::path`] (at `data_start + offset`) and
    /// dequantizes it to f32. The shape is in row-major (torch) order, the dims reversed.
    /// Fails with [`ModelError::MissingTensor`] if there is no such tensor and
    /// [`ModelError::UnsupportedDtype`] if its type cannot be dequantized.
    pub fn read_tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.find(name)?;
        if !info.ggml_type.can_dequantize() {
            // Refuse before reading the data.
            return self.dequantize_tensor(name, &[]);
        }
        let bytes = self.read_tensor_bytes(name)?;
        self.dequantize_tensor(name, &bytes)
    }
}

fn invalid(path: &Path, message: String) -> ModelError {
    ModelError::InvalidFile {
        path: path.to_path_buf(),
        format: FORMAT,
        message,
    }
}

// ------------------------------------------------------------------------------------------
// Parser
// ------------------------------------------------------------------------------------------

struct Parser<'p, R> {
    reader: R,
    pos: u64,
    len: u64,
    path: &'p Path,
    /// Where in the file the parser is, for messages ("metadata key 3 (`general.name`)").
    context: String,
    metadata_elements: u64,
}

impl<'p, R: Read> Parser<'p, R> {
    fn new(reader: R, len: u64, path: &'p Path) -> Self {
        Self {
            reader,
            pos: 0,
            len,
            path,
            context: "the header".to_owned(),
            metadata_elements: 0,
        }
    }

    fn err(&self, message: impl fmt::Display) -> ModelError {
        invalid(
            self.path,
            format!("{}: {message} (at byte {})", self.context, self.pos),
        )
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, need: u64) -> ModelError {
        self.err(format_args!(
            "the file is truncated: {need} more bytes are needed but only {} are left of its {} bytes",
            self.remaining(),
            self.len
        ))
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        let need = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if need > self.remaining() {
            return Err(self.truncated(need));
        }
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.pos += need;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(self.truncated(need)),
            Err(e) => Err(ModelError::io("read", self.path, e)),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads `len` bytes after checking that the file holds them (so the allocation is
    /// bounded by the file length).
    fn bytes(&mut self, len: u64) -> Result<Vec<u8>> {
        if len > self.remaining() {
            return Err(self.truncated(len));
        }
        let n = usize::try_from(len).map_err(|_| self.truncated(len))?;
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    /// A name (metadata key or tensor name): strict UTF-8, at most [`MAX_NAME_LEN`] bytes.
    fn name(&mut self, what: &str) -> Result<String> {
        let len = self.u64()?;
        if len > MAX_NAME_LEN {
            return Err(self.err(format_args!(
                "the {what} is {len} bytes long; at most {MAX_NAME_LEN} are accepted"
            )));
        }
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes)
            .map_err(|e| self.err(format_args!("the {what} is not valid UTF-8 ({e})")))
    }

    /// A string value; invalid UTF-8 is replaced (and logged).
    fn string_value(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.bytes(len)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), context = %self.context, "GGUF string value is not valid UTF-8; replacing the bad bytes");
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::Str(self.string_value()?),
            9 => self.array_value(depth)?,
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(self.err(format_args!(
                    "unknown metadata value type {other} (known: 0 to 12)"
                )));
            }
        })
    }

    fn array_value(&mut self, depth: usize) -> Result<GgufValue> {
        if depth >= MAX_ARRAY_NESTING {
            return Err(self.err(format_args!(
                "arrays nest more than {MAX_ARRAY_NESTING} deep"
            )));
        }
        let elem = self.u32()?;
        let count = self.u64()?;
        let min_size: u64 = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => {
                return Err(self.err(format_args!(
                    "array of unknown element type {other} (known: 0 to 12)"
                )));
            }
        };
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() => {}
            _ => {
                return Err(self.err(format_args!(
                    "an array claims {count} elements of type {}, more than the {} bytes left in the file can hold; the file is truncated or corrupt",
                    value_type_name(elem),
                    self.remaining()
                )));
            }
        }
        self.metadata_elements = self.metadata_elements.saturating_add(count);
        if self.metadata_elements > MAX_METADATA_ELEMENTS {
            return Err(self.err(format_args!(
                "metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements in all; refusing to load them"
            )));
        }
        let mut values = Vec::with_capacity(
            usize::try_from(count)
                .unwrap_or(usize::MAX)
                .min(MAX_PREALLOC),
        );
        for _ in 0..count {
            values.push(self.value(elem, depth + 1)?);
        }
        Ok(GgufValue::Array(values))
    }

    /// Checks that `count` records of at least `min_size` bytes fit in what is left.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(self.err(format_args!(
                "the header claims {count} {what}, but the {} bytes left in the file cannot hold that many; the file is truncated or corrupt",
                self.remaining()
            ))),
        }
    }

    fn parse(mut self) -> Result<GgufFile> {
        let magic: [u8; 4] = self.array()?;
        if magic != MAGIC {
            return Err(self.err(format_args!(
                "bad magic {:?} (bytes {magic:02x?}); a GGUF file starts with \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version_bytes: [u8; 4] = self.array()?;
        let version = u32::from_le_bytes(version_bytes);
        match version {
            2 | 3 => {}
            1 => {
                return Err(self.err(
                    "GGUF version 1 (the 2023 draft with 32-bit counts) is not supported; convert the model again with a current llama.cpp",
                ));
            }
            _ if matches!(u32::from_be_bytes(version_bytes), 2 | 3) => {
                return Err(self.err(
                    "this is a big-endian GGUF file; only little-endian files are supported",
                ));
            }
            other => {
                return Err(self.err(format_args!(
                    "unsupported GGUF version {other} (supported: 2 and 3)"
                )));
            }
        }
        let tensor_count = self.u64()?;
        let kv_count = self.u64()?;
        // A key-value pair takes at least 13 bytes, a tensor info at least 24.
        self.check_count(kv_count, 8 + 4 + 1, "metadata entries")?;
        self.check_count(tensor_count, 8 + 4 + 4 + 8, "tensors")?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            self.context = format!("metadata entry {i}");
            let key = self.name("metadata key")?;
            self.context = format!("metadata entry {i} (`{key}`)");
            let ty = self.u32()?;
            let value = self.value(ty, 0)?;
            if metadata.contains_key(&key) {
                return Err(self.err("the key appears twice"));
            }
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
                _ => {
                    return Err(invalid(
                        self.path,
                        format!(
                            "metadata `general.alignment` is {v:?}; it must be a power of two up to {MAX_ALIGNMENT}"
                        ),
                    ));
                }
            },
        };

        let mut tensors = Vec::with_capacity(
            usize::try_from(tensor_count)
                .unwrap_or(usize::MAX)
                .min(MAX_PREALLOC),
        );
        let mut names = HashSet::new();
        for i in 0..tensor_count {
            self.context = format!("tensor info {i}");
            let name = self.name("tensor name")?;
            self.context = format!("tensor info {i} (`{name}`)");
            if !names.insert(name.clone()) {
                return Err(self.err("a tensor of this name appears twice"));
            }
            let n_dims = self.u32()?;
            if n_dims as usize > MAX_DIMS {
                return Err(self.err(format_args!(
                    "the tensor has {n_dims} dimensions; at most {MAX_DIMS} are allowed"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64()?);
            }
            let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            if n.is_none_or(|n| n > i64::MAX as u64) {
                return Err(self.err(format_args!(
                    "the dims {dims:?} hold more elements than a 64-bit count"
                )));
            }
            let ggml_type = GgmlType::from_id(self.u32()?);
            let offset = self.u64()?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        self.context = "the tensor directory".to_owned();
        let data_start = self
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| self.err("overflow"))?;

        for t in &tensors {
            let at = |m: String| invalid(self.path, format!("tensor `{}`: {m}", t.name));
            if !t.offset.is_multiple_of(alignment) {
                return Err(at(format!(
                    "its offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            if t.ggml_type.block_size().is_none() {
                // Unknown layout: refused when the tensor is read.
                continue;
            }
            let size = t.byte_size_msg().map_err(at)?;
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(size));
            if end.is_none_or(|end| end > self.len) {
                return Err(at(format!(
                    "its data ({size} bytes of {} at offset {} after the data start {data_start}) runs past the end of the file ({} bytes); the file is truncated",
                    t.ggml_type, t.offset, self.len
                )));
            }
        }

        tracing::debug!(
            path = %self.path.display(),
            version,
            metadata = metadata.len(),
            tensors = tensors.len(),
            data_start,
            "parsed GGUF header"
        );
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            path: self.path.to_path_buf(),
            alignment,
            data_start,
            file_len: self.len,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Dequantization
// ------------------------------------------------------------------------------------------

/// Dequantizes `n` elements of type `ty` stored in `bytes` (exactly `n / block_size *
/// type_size` bytes) to f32, bit for bit as ggml's `dequantize_row_*` and gguf-py's
/// `gguf.quants.dequantize` compute them (f16 fields converted exactly, products rounded
/// in the same order, no fused multiply-add).
///
/// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and
/// Q8_K; other types, an `n` that is not a multiple of the block size or a byte count that
/// does not match give [`ModelError::InvalidInput`].
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    dequantize_impl(ty, bytes, n)
        .map_err(|m| ModelError::InvalidInput(format!("cannot dequantize GGML {ty}: {m}")))
}

fn dequantize_impl(ty: GgmlType, bytes: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    let (Some(bs), Some(ts)) = (ty.block_size(), ty.type_size()) else {
        return Err(format!("the type {ty} has no known layout"));
    };
    if !ty.can_dequantize() {
        return Err(format!(
            "type {ty} is not supported (supported: {SUPPORTED})"
        ));
    }
    // bs and ts are small constants.
    let (bs, ts) = (bs as usize, ts as usize);
    if !n.is_multiple_of(bs) {
        return Err(format!(
            "{n} elements are not a multiple of the block size {bs}"
        ));
    }
    let expected = (n / bs)
        .checked_mul(ts)
        .ok_or_else(|| format!("{n} elements overflow the byte count"))?;
    if bytes.len() != expected {
        return Err(format!(
            "{n} elements of {ty} take {expected} bytes, but {} were given (the data is truncated or the type is wrong)",
            bytes.len()
        ));
    }
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (y, x) in out.iter_mut().zip(bytes.as_chunks::<4>().0) {
                *y = f32::from_le_bytes(*x);
            }
        }
        GgmlType::F16 => {
            for (y, x) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *y = f16_to_f32(u16::from_le_bytes(*x));
            }
        }
        GgmlType::BF16 => {
            for (y, x) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *y = f32::from_bits(u32::from(u16::from_le_bytes(*x)) << 16);
            }
        }
        GgmlType::Q4_0 => blocks::<18, 32>(bytes, &mut out, q4_0),
        GgmlType::Q4_1 => blocks::<20, 32>(bytes, &mut out, q4_1),
        GgmlType::Q5_0 => blocks::<22, 32>(bytes, &mut out, q5_0),
        GgmlType::Q5_1 => blocks::<24, 32>(bytes, &mut out, q5_1),
        GgmlType::Q8_0 => blocks::<34, 32>(bytes, &mut out, q8_0),
        GgmlType::Q2_K => blocks::<84, 256>(bytes, &mut out, q2_k),
        GgmlType::Q3_K => blocks::<110, 256>(bytes, &mut out, q3_k),
        GgmlType::Q4_K => blocks::<144, 256>(bytes, &mut out, q4_k),
        GgmlType::Q5_K => blocks::<176, 256>(bytes, &mut out, q5_k),
        GgmlType::Q6_K => blocks::<210, 256>(bytes, &mut out, q6_k),
        GgmlType::Q8_K => blocks::<292, 256>(bytes, &mut out, q8_k),
        GgmlType::Other(_) => {
            return Err(format!(
                "type {ty} is not supported (supported: {SUPPORTED})"
            ));
        }
    }
    Ok(out)
}

/// Applies a block dequantizer to every block (lengths checked by the caller).
fn blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: fn(&[u8; TS], &mut [f32; BS]),
) {
    for (x, y) in bytes
        .as_chunks::<TS>()
        .0
        .iter()
        .zip(out.as_chunks_mut::<BS>().0)
    {
        f(x, y);
    }
}

/// IEEE half to f32, exact; NaN payloads are kept (numpy's conversion).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man * 2^-24, exact in f32.
            #[allow(clippy::cast_precision_loss)]
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[inline]
fn half(x: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([x[i], x[i + 1]]))
}

fn q4_0(x: &[u8; 18], y: &mut [f32; 32]) {
    let d = half(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = d * f32::from(i16::from(qs[j] & 0xf) - 8);
        y[j + 16] = d * f32::from(i16::from(qs[j] >> 4) - 8);
    }
}

fn q4_1(x: &[u8; 20], y: &mut [f32; 32]) {
    let d = half(x, 0);
    let m = half(x, 2);
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = f32::from(qs[j] & 0xf) * d + m;
        y[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

fn q5_0(x: &[u8; 22], y: &mut [f32; 32]) {
    let d = half(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let qs = &x[6..22];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let q0 = (u32::from(qs[j] & 0xf) | xh0) as i32 - 16;
        let q1 = (u32::from(qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = d * q0 as f32;
        y[j + 16] = d * q1 as f32;
    }
}

fn q5_1(x: &[u8; 24], y: &mut [f32; 32]) {
    let d = half(x, 0);
    let m = half(x, 2);
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let qs = &x[8..24];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let q0 = u32::from(qs[j] & 0xf) | xh0;
        let q1 = u32::from(qs[j] >> 4) | xh1;
        y[j] = q0 as f32 * d + m;
        y[j + 16] = q1 as f32 * d + m;
    }
}

fn q8_0(x: &[u8; 34], y: &mut [f32; 32]) {
    let d = half(x, 0);
    for (yj, &q) in y.iter_mut().zip(&x[2..34]) {
        *yj = f32::from(q as i8) * d;
    }
}

fn q2_k(x: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &x[0..16];
    let qs = &x[16..80];
    let d = half(x, 80);
    let dmin = half(x, 82);
    for n in 0..2 {
        for j in 0..4 {
            let shift = 2 * j;
            for h in 0..2 {
                let sc = scales[8 * n + 2 * j + h];
                let dl = d * f32::from(sc & 0xf);
                let ml = dmin * f32::from(sc >> 4);
                for l in 0..16 {
                    let q = (qs[32 * n + 16 * h + l] >> shift) & 3;
                    y[128 * n + 32 * j + 16 * h + l] = dl * f32::from(q) - ml;
                }
            }
        }
    }
}

fn q3_k(x: &[u8; 110], y: &mut [f32; 256]) {
    let hmask = &x[0..32];
    let qs = &x[32..96];
    let sc = &x[96..108];
    let d = half(x, 108);
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0xf } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = f32::from(i16::from(low | (high << 4)) - 32);
    }
    for n in 0..2 {
        for j in 0..4 {
            let shift = 2 * j;
            let bit = 4 * n + j;
            for l in 0..32 {
                let k = 128 * n + 32 * j + l;
                let dl = d * scales[k / 16];
                let low = i16::from((qs[32 * n + l] >> shift) & 3);
                let high = if (hmask[l] >> bit) & 1 != 0 { 0 } else { 4 };
                y[k] = dl * f32::from(low - high);
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `k` of a Q4_K / Q5_K super-block.
#[inline]
fn scale_min_k4(k: usize, q: &[u8]) -> (u8, u8) {
    if k < 4 {
        (q[k] & 63, q[k + 4] & 63)
    } else {
        (
            (q[k + 4] & 0xf) | ((q[k - 4] >> 6) << 4),
            (q[k + 4] >> 4) | ((q[k] >> 6) << 4),
        )
    }
}

fn q4_k(x: &[u8; 144], y: &mut [f32; 256]) {
    let d = half(x, 0);
    let dmin = half(x, 2);
    let scales = &x[4..16];
    let qs = &x[16..144];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, mm1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, mm2) = (d * f32::from(s2), dmin * f32::from(m2));
        for l in 0..32 {
            let q = qs[32 * j + l];
            y[64 * j + l] = d1 * f32::from(q & 0xf) - mm1;
            y[64 * j + 32 + l] = d2 * f32::from(q >> 4) - mm2;
        }
    }
}

fn q5_k(x: &[u8; 176], y: &mut [f32; 256]) {
    let d = half(x, 0);
    let dmin = half(x, 2);
    let scales = &x[4..16];
    let qh = &x[16..48];
    let qs = &x[48..176];
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, mm1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, mm2) = (d * f32::from(s2), dmin * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * j), 1u8 << (2 * j + 1));
        for l in 0..32 {
            let q = qs[32 * j + l];
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * j + l] = d1 * f32::from((q & 0xf) + h1) - mm1;
            y[64 * j + 32 + l] = d2 * f32::from((q >> 4) + h2) - mm2;
        }
    }
}

fn q6_k(x: &[u8; 210], y: &mut [f32; 256]) {
    let ql = &x[0..128];
    let qh = &x[128..192];
    let sc = &x[192..208];
    let d = half(x, 208);
    let mut scales = [0f32; 16];
    for (s, &b) in scales.iter_mut().zip(sc) {
        *s = d * f32::from(b as i8);
    }
    for n in 0..2 {
        let (l6, h6, s6) = (
            &ql[64 * n..64 * n + 64],
            &qh[32 * n..32 * n + 32],
            &scales[8 * n..8 * n + 8],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = i16::from((l6[l] & 0xf) | ((h6[l] & 3) << 4)) - 32;
            let q2 = i16::from((l6[l + 32] & 0xf) | (((h6[l] >> 2) & 3) << 4)) - 32;
            let q3 = i16::from((l6[l] >> 4) | (((h6[l] >> 4) & 3) << 4)) - 32;
            let q4 = i16::from((l6[l + 32] >> 4) | (((h6[l] >> 6) & 3) << 4)) - 32;
            y[128 * n + l] = s6[is] * f32::from(q1);
            y[128 * n + l + 32] = s6[is + 2] * f32::from(q2);
            y[128 * n + l + 64] = s6[is + 4] * f32::from(q3);
            y[128 * n + l + 96] = s6[is + 6] * f32::from(q4);
        }
    }
}

fn q8_k(x: &[u8; 292], y: &mut [f32; 256]) {
    let d = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    for (yj, &q) in y.iter_mut().zip(&x[4..260]) {
        *yj = d * f32::from(q as i8);
    }
}
