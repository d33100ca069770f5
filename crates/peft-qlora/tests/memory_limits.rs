//! Files that claim huge tensors are refused before anything is allocated: the GGUF tensor
//! directory, the safetensors header (as peft-core, peft-models and peft-qlora read it)
//! and the bitsandbytes quant state. A counting allocator records the largest single
//! allocation while each file is parsed and read; it must stay far below what the file
//! claims (the files are a few hundred bytes).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use peft_core::format::TensorFile;
use peft_models::gguf::GgufFile;
use peft_models::weights::{SafetensorsSource, WeightSource};
use peft_qlora::BnbCheckpoint;

#[allow(unsafe_code)]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The largest allocation requested since the last reset.
    pub static LARGEST: AtomicUsize = AtomicUsize::new(0);

    /// Forwards to the system allocator and records the largest request.
    pub struct Counting;

    // SAFETY: every method forwards its arguments unchanged to `System`, so `System`'s
    // guarantees hold; the bookkeeping is one atomic operation and allocates nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// The most any of these small files may cause to be allocated at once.
const LIMIT: usize = 1 << 20;

/// Runs `f` and returns its result with the largest allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    counting::LARGEST.store(0, Ordering::SeqCst);
    let v = f();
    (v, counting::LARGEST.load(Ordering::SeqCst))
}

fn gguf_with_tensor(dims: &[u64], ggml_type: u32) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata
    let name = b"blk.0.attn_q.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ggml_type.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend([0u8; 64]);
    b
}

fn safetensors_with(header: &serde_json::Value, data: usize) -> Vec<u8> {
    let mut h = header.to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend(vec![0u8; data]);
    b
}

fn bnb_layer(shape: [u64; 2]) -> Vec<u8> {
    let state = serde_json::json!({
        "quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": shape,
    })
    .to_string();
    let p = "model.layers.0.self_attn.q_proj.weight";
    let n = state.len();
    let header = serde_json::json!({
        format!("{p}"): {"dtype": "U8", "shape": [32, 1], "data_offsets": [0, 32]},
        format!("{p}.absmax"): {"dtype": "F32", "shape": [1], "data_offsets": [32, 36]},
        format!("{p}.quant_map"): {"dtype": "F32", "shape": [16], "data_offsets": [36, 100]},
        format!("{p}.quant_state.bitsandbytes__nf4"): {"dtype": "U8", "shape": [n], "data_offsets": [100, 100 + n]},
    });
    let mut b = safetensors_with(&header, 100);
    b.extend(state.as_bytes());
    b
}

#[test]
fn files_claiming_huge_tensors_are_refused_before_allocating() {
    // GGUF: 2^20 x 2^20 f32 (4 TiB) in a 200-byte file, and dims whose product overflows.
    for (dims, want) in [
        (vec![1u64 << 20, 1 << 20], "past the end"),
        (vec![1u64 << 32, 1 << 32, 1 << 32], "more elements than"),
    ] {
        let bytes = gguf_with_tensor(&dims, 0);
        let (r, largest) =
            largest_allocation(|| GgufFile::from_bytes(&bytes, PathBuf::from("huge.gguf")));
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("blk.0.attn_q.weight") && msg.contains(want),
            "{dims:?}: {msg}"
        );
        assert!(largest < LIMIT, "{dims:?}: allocated {largest} bytes");
    }

    // safetensors: a 2^40 x 1024 f32 tensor in 16 bytes, and a shape whose product
    // overflows, through each reader of the project.
    for shape in [
        serde_json::json!([1u64 << 40, 1024]),
        serde_json::json!([1u64 << 62, 1u64 << 62]),
    ] {
        let header =
            serde_json::json!({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}});
        let bytes = safetensors_with(&header, 16);
        let (r, largest) = largest_allocation(|| {
            TensorFile::from_bytes(&bytes, PathBuf::from("adapter_model.safetensors"))
        });
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("adapter_model.safetensors") && msg.contains("not a valid safetensors"),
            "{shape}: {msg}"
        );
        assert!(
            largest < LIMIT,
            "{shape}: TensorFile allocated {largest} bytes"
        );
        let (r, largest) = largest_allocation(|| {
            SafetensorsSource::from_bytes(bytes.clone(), PathBuf::from("model.safetensors"))
        });
        assert!(r.is_err(), "{shape}: the model reader accepted it");
        assert!(
            largest < LIMIT,
            "{shape}: SafetensorsSource allocated {largest} bytes"
        );
        let (r, largest) = largest_allocation(|| {
            BnbCheckpoint::from_bytes(bytes.clone(), PathBuf::from("model.safetensors"))
                .map_err(|e| e.to_string())
        });
        assert!(r.is_err(), "{shape}: the 4-bit reader accepted it");
        assert!(
            largest < LIMIT,
            "{shape}: BnbCheckpoint allocated {largest} bytes"
        );
    }

    // safetensors whose header length is 2^40 bytes (in a 16-byte file), and a file longer
    // than its header says (trailing bytes).
    let mut huge_header = (1u64 << 40).to_le_bytes().to_vec();
    huge_header.extend(b"{}      ");
    let header = serde_json::json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}});
    let mut trailing = safetensors_with(&header, 8);
    trailing.extend([0u8; 100]);
    for (bytes, what) in [(huge_header, "header length"), (trailing, "trailing bytes")] {
        let (r, largest) = largest_allocation(|| {
            TensorFile::from_bytes(&bytes, PathBuf::from("adapter_model.safetensors"))
        });
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("not a valid safetensors"), "{what}: {msg}");
        assert!(largest < LIMIT, "{what}: allocated {largest} bytes");
        let r = SafetensorsSource::from_bytes(bytes.clone(), PathBuf::from("model.safetensors"));
        assert!(r.is_err(), "{what}: the model reader accepted it");
    }

    // bitsandbytes: a quant state claiming [2^20, 2^20] (a trillion 4-bit values over 32
    // bytes of codes) and one whose element count overflows.
    for (shape, want) in [
        ([1u64 << 20, 1 << 20], "bytes; 549755813888 are needed"),
        ([1u64 << 40, 1 << 40], "overflows"),
    ] {
        let bytes = bnb_layer(shape);
        let mut ckpt =
            BnbCheckpoint::from_bytes(bytes, PathBuf::from("model.safetensors")).unwrap();
        let (r, largest) = largest_allocation(|| {
            ckpt.read_linear("model.layers.0.self_attn.q_proj")
                .map_err(|e| e.to_string())
        });
        let msg = r.unwrap_err();
        assert!(
            msg.contains("self_attn.q_proj") && msg.contains(want),
            "{shape:?}: {msg}"
        );
        assert!(largest < LIMIT, "{shape:?}: allocated {largest} bytes");
        let (r, largest) = largest_allocation(|| {
            ckpt.take(
                "model.layers.0.self_attn.q_proj.weight",
                &[1 << 20, 1 << 20],
            )
        });
        assert!(r.is_err());
        assert!(largest < LIMIT, "{shape:?}: take allocated {largest} bytes");
    }
}
