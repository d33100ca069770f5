//! The GGUF reader against gguf-py 0.19 (`fixtures/gguf`, made by
//! `scripts/fixtures/gguf.py`): metadata of every value type and tensor directory as
//! `gguf.GGUFReader` reads them, dequantization of every supported ggml type bit for bit
//! as `gguf.quants.dequantize` computes it, hostile inputs (truncations, absurd counts,
//! bad offsets, random mutations) that must fail cleanly, and, where it is present, the
//! real SmolLM2-135M GGUF.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;

use peft_models::ModelError;
use peft_models::gguf::{GgmlType, GgufFile, GgufValue, dequantize};
use proptest::prelude::*;
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn expected_json() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap()
}

fn tiny_bytes() -> Vec<u8> {
    std::fs::read(fixture("tiny.gguf")).unwrap()
}

fn message(e: &ModelError) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------
// Against gguf-py
// ---------------------------------------------------------------------------------------

/// Checks a value against what GGUFReader reported: `types` is the reader's type chain
/// (`["ARRAY", "ARRAY", "INT32"]`), `want` the value.
fn check_value(key: &str, v: &GgufValue, types: &[Value], want: &Value) {
    let ty = types[0].as_str().unwrap();
    assert_eq!(v.type_name(), ty, "{key}: type");
    match v {
        GgufValue::U8(x) => assert_eq!(u64::from(*x), want.as_u64().unwrap(), "{key}"),
        GgufValue::U16(x) => assert_eq!(u64::from(*x), want.as_u64().unwrap(), "{key}"),
        GgufValue::U32(x) => assert_eq!(u64::from(*x), want.as_u64().unwrap(), "{key}"),
        GgufValue::U64(x) => assert_eq!(*x, want.as_u64().unwrap(), "{key}"),
        GgufValue::I8(x) => assert_eq!(i64::from(*x), want.as_i64().unwrap(), "{key}"),
        GgufValue::I16(x) => assert_eq!(i64::from(*x), want.as_i64().unwrap(), "{key}"),
        GgufValue::I32(x) => assert_eq!(i64::from(*x), want.as_i64().unwrap(), "{key}"),
        GgufValue::I64(x) => assert_eq!(*x, want.as_i64().unwrap(), "{key}"),
        // The fixture gives the exact f64 value of the f32.
        GgufValue::F32(x) => assert_eq!(f64::from(*x), want.as_f64().unwrap(), "{key}"),
        GgufValue::F64(x) => assert_eq!(x.to_bits(), want.as_f64().unwrap().to_bits(), "{key}"),
        GgufValue::Bool(x) => assert_eq!(*x, want.as_bool().unwrap(), "{key}"),
        GgufValue::Str(x) => assert_eq!(x, want.as_str().unwrap(), "{key}"),
        GgufValue::Array(items) => {
            let want = want.as_array().unwrap();
            assert_eq!(items.len(), want.len(), "{key}: array length");
            for (i, (item, w)) in items.iter().zip(want).enumerate() {
                check_value(&format!("{key}[{i}]"), item, &types[1..], w);
            }
        }
    }
}

fn check_file_against_gguf_py(label: &str) {
    let all = expected_json();
    let want = &all[label];
    let file = GgufFile::open(fixture(&format!("{label}.gguf"))).unwrap();
    assert_eq!(u64::from(file.version), want["version"].as_u64().unwrap());
    assert_eq!(file.alignment(), want["alignment"].as_u64().unwrap());
    assert_eq!(file.data_start(), want["data_start"].as_u64().unwrap());
    assert_eq!(file.file_len(), want["file_len"].as_u64().unwrap());

    let meta = want["metadata"].as_object().unwrap();
    assert_eq!(
        file.metadata.keys().collect::<BTreeSet<_>>(),
        meta.keys().collect::<BTreeSet<_>>(),
        "{label}: metadata keys"
    );
    for (key, w) in meta {
        check_value(
            key,
            file.get(key).unwrap(),
            w["types"].as_array().unwrap(),
            &w["value"],
        );
    }

    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(file.tensors.len(), tensors.len());
    for (t, w) in file.tensors.iter().zip(tensors) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let dims: Vec<u64> = w["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(
            u64::from(t.ggml_type.id()),
            w["type"].as_u64().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(
            t.ggml_type.to_string(),
            w["type_name"].as_str().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(t.offset, w["offset"].as_u64().unwrap(), "{}", t.name);
        let rev: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(t.shape(), rev);
        assert_eq!(t.num_elements(), dims.iter().product::<u64>());
        assert!(file.tensor(&t.name).is_some());
    }
}

#[test]
fn metadata_and_directory_equal_gguf_py_reader() {
    check_file_against_gguf_py("tiny");
    check_file_against_gguf_py("aligned64");
}

#[test]
fn metadata_accessors() {
    let file = GgufFile::open(fixture("tiny.gguf")).unwrap();
    let get = |k: &str| file.get(k).unwrap();
    assert_eq!(get("test.u8").as_u64(), Some(200));
    assert_eq!(get("test.i8").as_u64(), None);
    assert_eq!(get("test.i8").as_i64(), Some(-100));
    assert_eq!(get("test.i8").as_f64(), Some(-100.0));
    assert_eq!(get("test.u64").as_u64(), Some((1 << 63) + 5));
    assert_eq!(get("test.u64").as_i64(), None);
    assert_eq!(
        get("test.f32").as_f64(),
        Some(f64::from("3.14159".parse::<f32>().unwrap()))
    );
    assert_eq!(get("test.f32").as_u64(), None);
    assert_eq!(get("test.bool_true").as_bool(), Some(true));
    assert_eq!(get("test.string").as_str(), Some("héllo wörld ✓ 日本"));
    assert_eq!(get("test.string").as_array(), None);
    assert_eq!(get("test.string_array").as_array().unwrap().len(), 4);
    let nested = get("test.nested_array").as_array().unwrap();
    assert_eq!(nested[1].as_array().unwrap()[1].as_i64(), Some(5));

    assert_eq!(file.require_u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(file.require_str("general.architecture").unwrap(), "fixture");
    let e = file.require_u64("test.string").unwrap_err();
    assert!(matches!(e, ModelError::InvalidConfig { .. }), "{e}");
    assert!(message(&e).contains("test.string") && message(&e).contains("STRING"));
    let e = file.require_f64("no.such.key").unwrap_err();
    assert!(message(&e).contains("no.such.key") && message(&e).contains("missing"));
}

fn expected_tensors() -> Vec<u8> {
    std::fs::read(fixture("expected.safetensors")).unwrap()
}

fn assert_bits_equal(what: &str, got: &[f32], want: &[u8]) {
    assert_eq!(got.len() * 4, want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want.chunks_exact(4)).enumerate() {
        let w = u32::from_le_bytes(w.try_into().unwrap());
        assert_eq!(
            g.to_bits(),
            w,
            "{what}[{i}]: {g} ({:#010x}) != {} ({w:#010x})",
            g.to_bits(),
            f32::from_bits(w)
        );
    }
}

#[test]
fn every_type_dequantizes_bit_exactly_like_gguf_py() {
    let st_bytes = expected_tensors();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    for label in ["tiny", "aligned64"] {
        let path = fixture(&format!("{label}.gguf"));
        let file = GgufFile::open(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mem = GgufFile::from_bytes(&bytes, path.clone()).unwrap();
        for t in &file.tensors {
            let want = st.tensor(&format!("{label}/{}", t.name)).unwrap();
            let (shape, values) = file.read_tensor_f32(&t.name).unwrap();
            assert_eq!(shape, want.shape(), "{}", t.name);
            assert_bits_equal(&t.name, &values, want.data());

            // The same through the in-memory path and the free function.
            let data = mem.tensor_data(&t.name, &bytes).unwrap();
            assert_eq!(data, file.read_tensor_bytes(&t.name).unwrap());
            assert_eq!(data.len() as u64, t.byte_size().unwrap());
            let (shape2, values2) = mem.dequantize_tensor(&t.name, data).unwrap();
            assert_eq!(shape2, shape);
            assert_bits_equal(&t.name, &values2, want.data());
            let n = t.num_elements() as usize;
            assert_bits_equal(
                &t.name,
                &dequantize(t.ggml_type, data, n).unwrap(),
                want.data(),
            );
            seen.insert(t.ggml_type.to_string());
            checked += 1;
        }
    }
    assert_eq!(checked, st.names().len(), "every expected tensor checked");
    let all: BTreeSet<String> = [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K", "Q8_K",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, all, "every supported type is in the fixture");
}

#[test]
fn ggml_type_table() {
    for id in 0..64 {
        let t = GgmlType::from_id(id);
        assert_eq!(t.id(), id);
        assert_eq!(t.block_size().is_some(), t.type_size().is_some());
    }
    assert_eq!(GgmlType::from_id(12), GgmlType::Q4_K);
    assert_eq!(GgmlType::Q4_K.block_size(), Some(256));
    assert_eq!(GgmlType::Q4_K.type_size(), Some(144));
    assert_eq!(GgmlType::Q4_1.to_string(), "Q4_1");
    assert_eq!(GgmlType::from_id(16).to_string(), "IQ2_XXS");
    assert_eq!(GgmlType::from_id(16).block_size(), Some(256));
    assert!(!GgmlType::from_id(16).can_dequantize());
    assert_eq!(GgmlType::from_id(999).block_size(), None);
    assert!(GgmlType::from_id(999).to_string().contains("999"));
}

#[test]
fn dequantize_checks_its_arguments() {
    // 17 bytes are not one Q4_0 block; 33 elements are not a whole number of blocks.
    assert!(dequantize(GgmlType::Q4_0, &[0; 17], 32).is_err());
    assert!(dequantize(GgmlType::Q4_0, &[0; 18], 33).is_err());
    assert!(dequantize(GgmlType::Q6_K, &[0; 210], 256).is_ok());
    assert!(dequantize(GgmlType::F32, &[0; 7], 2).is_err());
    let e = dequantize(GgmlType::from_id(16), &[0; 66], 256).unwrap_err();
    assert!(message(&e).contains("IQ2_XXS"), "{e}");
    assert!(dequantize(GgmlType::Q8_0, &[], 0).unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// Hostile inputs
// ---------------------------------------------------------------------------------------

/// A minimal GGUF writer for hand-made (mostly broken) files.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, tensors: u64, kvs: u64) -> Self {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(tensors).u64(kvs);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to `align` and appends `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self.0.extend(std::iter::repeat_n(0x11, n));
        self
    }
    fn parse(&self) -> Result<GgufFile, ModelError> {
        GgufFile::from_bytes(&self.0, PathBuf::from("hostile.gguf"))
    }
}

fn parse_err(raw: &Raw) -> String {
    let e = raw.parse().unwrap_err();
    assert!(
        matches!(e, ModelError::InvalidFile { format: "GGUF", .. }),
        "{e:?}"
    );
    let m = message(&e);
    assert!(m.contains("hostile.gguf"), "names the file: {m}");
    m
}

#[test]
fn a_hand_made_file_parses() {
    // The baseline for the broken variants below.
    let mut r = Raw::header(3, 2, 1);
    r.kv_u32("x.y", 7)
        .tensor("a", &[4, 2], 0, 0)
        .tensor("b", &[32], 8, 32);
    r.data(32, 32).data(32, 34);
    let f = r.parse().unwrap();
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensor("a").unwrap().shape(), vec![2, 4]);
    let (shape, v) = f.dequantize_tensor("a", &[0; 32]).unwrap();
    assert_eq!((shape, v), (vec![2, 4], vec![0.0; 8]));
}

#[test]
fn wrong_magic_and_versions() {
    let mut bytes = tiny_bytes();
    bytes[0] = b'X';
    let e = GgufFile::from_bytes(&bytes, "m.gguf".into()).unwrap_err();
    assert!(message(&e).contains("magic"), "{e}");
    assert!(
        GgufFile::from_bytes(b"", "m.gguf".into()).is_err(),
        "empty file"
    );

    let m = parse_err(&Raw::header(1, 0, 0));
    assert!(m.contains("version 1"), "{m}");
    let m = parse_err(&Raw::header(3u32.swap_bytes(), 0, 0));
    assert!(m.contains("big-endian"), "{m}");
    let m = parse_err(&Raw::header(7, 0, 0));
    assert!(m.contains("version 7"), "{m}");

    // Version 2 has the same layout as 3.
    let mut bytes = tiny_bytes();
    bytes[4] = 2;
    let f = GgufFile::from_bytes(&bytes, fixture("tiny.gguf")).unwrap();
    assert_eq!(f.version, 2);
    let v3 = GgufFile::open(fixture("tiny.gguf")).unwrap();
    assert_eq!(f.tensors, v3.tensors);
    assert_eq!(f.metadata, v3.metadata);
}

#[test]
fn every_truncation_fails_cleanly() {
    let bytes = tiny_bytes();
    let full = GgufFile::from_bytes(&bytes, "t.gguf".into()).unwrap();
    // Where the last tensor's data ends; after it comes only padding.
    let data_end = full
        .tensors
        .iter()
        .map(|t| full.data_start() + t.offset + t.byte_size().unwrap())
        .max()
        .unwrap() as usize;
    assert!(data_end <= bytes.len());
    let header = full.data_start() as usize;
    let cuts = (0..header + 64).chain((header..bytes.len()).step_by(7));
    for cut in cuts {
        let r = GgufFile::from_bytes(&bytes[..cut], "t.gguf".into());
        if cut < data_end {
            let e = r.expect_err("a truncated file must be refused");
            assert!(
                matches!(e, ModelError::InvalidFile { .. }),
                "cut {cut}: {e:?}"
            );
            assert!(message(&e).contains("truncated"), "cut {cut}: {e}");
        } else {
            r.unwrap();
        }
    }

    // The same through open() on real files.
    let dir = tempfile::tempdir().unwrap();
    for cut in (0..bytes.len()).step_by(331) {
        let p = dir.path().join("cut.gguf");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = GgufFile::open(&p).unwrap_err();
        assert!(message(&e).contains("truncated"), "cut {cut}: {e}");
        assert!(message(&e).contains("cut.gguf"), "cut {cut}: {e}");
    }
}

#[test]
fn a_file_truncated_after_opening_is_refused_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    let bytes = tiny_bytes();
    std::fs::write(&p, &bytes).unwrap();
    let f = GgufFile::open(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let last = &f.tensors.last().unwrap().name;
    let e = f.read_tensor_f32(last).unwrap_err();
    assert!(message(&e).contains("t.gguf"), "{e}");
}

#[test]
fn absurd_counts_are_refused_without_allocating() {
    let m = parse_err(&Raw::header(3, 1 << 60, 0));
    assert!(m.contains("tensors"), "{m}");
    let m = parse_err(&Raw::header(3, 0, 1 << 60));
    assert!(m.contains("metadata"), "{m}");
    let m = parse_err(&Raw::header(3, u64::MAX, u64::MAX));
    assert!(m.contains("cannot hold"), "{m}");

    // A 2^60-byte key, and a 2^60-byte string value.
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 60);
    r.0.extend_from_slice(&[b'a'; 64]);
    let m = parse_err(&r);
    assert!(m.contains("metadata key"), "{m}");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(1 << 60);
    r.0.extend_from_slice(&[b'a'; 64]);
    let m = parse_err(&r);
    assert!(m.contains("truncated") && m.contains("`k`"), "{m}");
    // u64::MAX bytes.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(u64::MAX);
    parse_err(&r);

    // Arrays of 2^60 elements, of u8 and of strings; a count times size that overflows.
    for (elem, count) in [(0u32, 1u64 << 60), (8, 1 << 60), (10, u64::MAX / 2)] {
        let mut r = Raw::header(3, 0, 1);
        r.str("arr").u32(9).u32(elem).u64(count);
        r.0.extend_from_slice(&[0; 256]);
        let m = parse_err(&r);
        assert!(m.contains("`arr`") && m.contains("elements"), "{m}");
    }

    // Arrays nested deeper than anyone needs (and deeper than the stack could take).
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..100_000 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let m = parse_err(&r);
    assert!(m.contains("nest"), "{m}");

    // A 2^60-byte tensor name.
    let mut r = Raw::header(3, 1, 0);
    r.u64(1 << 60);
    r.0.extend_from_slice(&[b'a'; 64]);
    let m = parse_err(&r);
    assert!(m.contains("tensor name"), "{m}");
}

#[test]
fn bad_tensor_directories_are_refused() {
    // Data running past the end of the file.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1000], 0, 0).data(32, 3996);
    let m = parse_err(&r);
    assert!(m.contains("`w`") && m.contains("truncated"), "{m}");
    // The same with the offset pushing it out, and an offset near u64::MAX.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[8], 0, 64).data(32, 64);
    assert!(parse_err(&r).contains("past the end"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[8], 0, u64::MAX - 31).data(32, 64);
    parse_err(&r);

    // An offset that is not a multiple of the alignment.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[4], 0, 4).data(32, 64);
    let m = parse_err(&r);
    assert!(m.contains("`w`") && m.contains("alignment"), "{m}");

    // general.alignment: 64 is honoured, 48 is refused.
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("w", &[4], 0, 32)
        .data(64, 64);
    let m = parse_err(&r);
    assert!(m.contains("alignment 64"), "{m}");
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 48);
    assert!(parse_err(&r).contains("general.alignment"));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 0);
    parse_err(&r);

    // Duplicate tensor names and keys.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .data(32, 64);
    let m = parse_err(&r);
    assert!(m.contains("`w`") && m.contains("twice"), "{m}");
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    assert!(parse_err(&r).contains("twice"));

    // Five dims; dims whose product overflows u64 (and i64).
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(32, 32);
    assert!(parse_err(&r).contains("dimensions"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1 << 32, 1 << 32, 2], 0, 0).data(32, 32);
    assert!(parse_err(&r).contains("elements"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1 << 62, 2], 0, 0).data(32, 32);
    parse_err(&r);
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[u64::MAX], 0, 0).data(32, 32);
    parse_err(&r);

    // A Q4_0 row of 16 elements (the block is 32).
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[16, 2], 2, 0).data(32, 64);
    let m = parse_err(&r);
    assert!(m.contains("`w`") && m.contains("block size"), "{m}");

    // Unknown metadata value types and array element types.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u64(0);
    assert!(parse_err(&r).contains("value type 13"));
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(77).u64(0);
    assert!(parse_err(&r).contains("element type 77"));

    // Names that are not UTF-8.
    let mut r = Raw::header(3, 0, 1);
    r.u64(2);
    r.0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(4).u32(0);
    assert!(parse_err(&r).contains("UTF-8"));
}

#[test]
fn unknown_tensor_types_fail_when_read_naming_tensor_and_type() {
    let mut r = Raw::header(3, 3, 0);
    r.tensor("ok", &[8], 0, 0)
        .tensor("weird", &[8], 99, 32)
        .tensor("iq", &[256], 16, 64)
        .data(32, 32 + 32 + 66);
    let bytes = r.0.clone();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("types.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(
        f.read_tensor_f32("ok").unwrap().1,
        vec![f32::from_bits(0x1111_1111); 8]
    );
    for (name, ty) in [("weird", "99"), ("iq", "IQ2_XXS")] {
        let e = f.read_tensor_f32(name).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedDtype { .. }), "{e:?}");
        let m = message(&e);
        assert!(
            m.contains(name) && m.contains(ty) && m.contains("types.gguf"),
            "{m}"
        );
    }
    // Known layout: the raw bytes can still be read.
    assert_eq!(f.read_tensor_bytes("iq").unwrap().len(), 66);
    let e = f.read_tensor_f32("absent").unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    assert!(message(&e).contains("absent"));
}

#[test]
fn bad_buffers_for_in_memory_reads() {
    let bytes = tiny_bytes();
    let f = GgufFile::from_bytes(&bytes, "t.gguf".into()).unwrap();
    assert!(f.tensor_data("q4_k", &bytes[..100]).is_err());
    let e = f.dequantize_tensor("q4_k", &[0; 10]).unwrap_err();
    assert!(message(&e).contains("q4_k"), "{e}");
}

/// Parses possibly broken bytes; when they parse, reads and dequantizes every tensor.
/// Nothing may panic; errors are fine.
fn exercise(bytes: &[u8]) {
    if let Ok(f) = GgufFile::from_bytes(bytes, "fuzz.gguf".into()) {
        for t in &f.tensors {
            let _ = t.byte_size();
            let _ = t.shape();
            if let Ok(data) = f.tensor_data(&t.name, bytes) {
                let _ = f.dequantize_tensor(&t.name, data);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        header_only in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = tiny_bytes();
        // Most interesting bytes are in the header (counts, lengths, types, offsets).
        let span = if header_only { 2176 } else { bytes.len() };
        for (i, b) in &edits {
            bytes[i.index(span)] = *b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        exercise(&bytes);
    }

    #[test]
    fn mutated_counts_never_panic(field in 0usize..4, value in any::<u64>()) {
        // The header's u32/u64 fields set to arbitrary values.
        let mut bytes = tiny_bytes();
        let (at, len) = [(4, 4), (8, 8), (16, 8), (24, 8)][field];
        bytes[at..at + len].copy_from_slice(&value.to_le_bytes()[..len]);
        exercise(&bytes);
    }
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M file, where present
// ---------------------------------------------------------------------------------------

#[test]
fn smollm2_gguf_where_present() {
    let path = peft_models::smollm2_gguf_path();
    if !path.exists() {
        println!(
            "skipped: {} not found (run `cargo xtask fetch-model smollm2`)",
            path.display()
        );
        return;
    }
    // Facts computed by gguf-py from this file (scripts/fixtures/gguf.py -> smollm2.json).
    let want: Value =
        serde_json::from_slice(&std::fs::read(fixture("smollm2.json")).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.file_len(), want["file_len"].as_u64().unwrap());
    assert_eq!(
        f.tensors.len() as u64,
        want["tensor_count"].as_u64().unwrap()
    );
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(f.require_u64("llama.block_count").unwrap(), 30);
    assert_eq!(
        f.require_array("tokenizer.ggml.tokens").unwrap().len() as u64,
        want["tokenizer.ggml.tokens.len"].as_u64().unwrap()
    );
    assert_eq!(
        f.require_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    for (name, w) in want["tensors"].as_object().unwrap() {
        let (shape, values) = f.read_tensor_f32(name).unwrap();
        let want_shape: Vec<usize> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{name}");
        assert_eq!(
            f.tensor(name).unwrap().ggml_type.to_string(),
            w["type_name"].as_str().unwrap()
        );
        let bits: Vec<u32> = values[..8].iter().map(|v| v.to_bits()).collect();
        let want_bits: Vec<u32> = w["first8_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(bits, want_bits, "{name}");
    }
    assert_eq!(
        f.read_tensor_f32("blk.0.attn_k.weight").unwrap().0,
        vec![192, 576]
    );
}
