//! The library side of the `peft` command line: what can be used, and tested, without
//! running the binary. Today that is the parsing and resolution of `peft train`'s options
//! ([`settings`]).

pub mod settings;
