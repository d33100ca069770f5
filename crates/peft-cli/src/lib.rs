//! The library side of the `peft` command line: what can be used, and tested, without
//! running the binary: the parsing and resolution of `peft train`'s options
//! ([`settings`]) and output directories written all at once ([`output`]).

pub mod output;
pub mod settings;
