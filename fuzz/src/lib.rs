//! The entry points of the fuzz targets, one per parser: each takes arbitrary bytes, runs
//! them through the parser and what the project does next with the result, and must never
//! panic. The same functions replay the seed corpora in `peft-cli`'s test suite
//! (`crates/peft-cli/tests/fuzz_corpus.rs` includes `harness.rs`).

/// The repository root, where the fixtures the harness needs (a small tokenizer) live.
pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

mod harness;

pub use harness::*;
