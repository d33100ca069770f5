#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::model_config(data));
