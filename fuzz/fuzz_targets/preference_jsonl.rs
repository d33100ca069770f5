#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::preference_jsonl(data));
