//! The fuzz targets' seed corpora (`fuzz/corpus/<target>/`) replayed through the same entry
//! points the fuzzer calls (`fuzz/src/harness.rs`), as an ordinary test: a smoke version
//! of `cargo xtask fuzz` that needs neither nightly nor libFuzzer. Inputs the fuzzer found
//! crashing are kept in `fuzz/regressions/<target>/` and replayed too.

use std::path::{Path, PathBuf};

/// The repository root (the harness finds its fixture tokenizer there).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

#[allow(dead_code, missing_docs)]
#[path = "../../../fuzz/src/harness.rs"]
mod harness;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_target_has_seeds_and_replays_them_without_panicking() {
    let root = Path::new(REPO).join("fuzz");
    for (name, run) in harness::TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(
            !seeds.is_empty(),
            "fuzz target `{name}` has no seed corpus in fuzz/corpus/{name}/"
        );
        let regressions = inputs(&root.join("regressions").join(name));
        for input in seeds.iter().chain(&regressions) {
            let bytes = std::fs::read(input).expect("read a corpus file");
            // A panic fails the test and names the input through this message.
            let result = std::panic::catch_unwind(|| run(&bytes));
            assert!(
                result.is_ok(),
                "fuzz target `{name}` panicked on {}",
                input.display()
            );
        }
    }
}

#[test]
fn every_fuzz_target_binary_is_in_the_harness() {
    let dir = Path::new(REPO).join("fuzz/fuzz_targets");
    let mut binaries: Vec<String> = inputs(&dir)
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    binaries.sort();
    let mut listed: Vec<String> = harness::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        binaries, listed,
        "fuzz/fuzz_targets and harness::TARGETS disagree"
    );
}
