#![allow(missing_docs, clippy::unwrap_used)]
use burn::backend::Flex;
use peft_models::generate::greedy_batch;
use std::time::Instant;
fn main() {
    let device = Default::default();
    let m: peft_models::llama::Llama<Flex> =
        peft_models::load_llama(&peft_models::smollm2_gguf_path(), &device).unwrap();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| (0..100 + i).map(|t| (t * 31 % 4000 + 100) as u32).collect())
        .collect();
    for (b, n) in [(16usize, 1usize), (16, 8), (1, 8)] {
        let t = Instant::now();
        let out = greedy_batch(&m, &prompts[..b], n, &[], 0, &device).unwrap();
        println!(
            "batch {b}, {n} tokens: {:?} ({} each)",
            t.elapsed(),
            out[0].len()
        );
    }
}
