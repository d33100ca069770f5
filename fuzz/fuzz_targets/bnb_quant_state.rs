#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::bnb_quant_state(data));
