#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::adapter_config(data));
