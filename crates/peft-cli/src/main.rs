//! The `peft` command line.
fn main() {}
