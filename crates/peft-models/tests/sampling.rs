//! The sampling distribution against transformers' logits processors
//! (`fixtures/sampling.json`, made by `scripts/fixtures/sampling.py`), and the sampler's
//! draws against that distribution.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use peft_models::generate::{GenerationConfig, Sampler, next_token, sampling_distribution};
use serde_json::Value;

/// Settings, logits, seen ids and transformers' probabilities.
type Case = (GenerationConfig, Vec<f32>, Vec<u32>, Vec<f64>);

fn cases() -> Vec<Case> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sampling.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let cfg = GenerationConfig {
                do_sample: true,
                repetition_penalty: c["repetition_penalty"].as_f64().unwrap(),
                temperature: c["temperature"].as_f64().unwrap(),
                top_k: c["top_k"].as_u64().unwrap() as usize,
                top_p: c["top_p"].as_f64().unwrap(),
                ..Default::default()
            };
            let f = |k: &str| {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect::<Vec<f64>>()
            };
            let logits = f("logits").into_iter().map(|x| x as f32).collect();
            let seen = f("seen").into_iter().map(|x| x as u32).collect();
            (cfg, logits, seen, f("probs"))
        })
        .collect()
}

#[test]
fn the_distribution_matches_transformers_processors() {
    for (cfg, logits, seen, expected) in cases() {
        let dist = sampling_distribution(&logits, &seen, &cfg);
        let mut ours = vec![0.0; logits.len()];
        for (t, p) in dist {
            ours[t as usize] = p;
        }
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{cfg:?}: token {i}: ours {a}, transformers {b}"
            );
            assert_eq!(*a == 0.0, *b == 0.0, "{cfg:?}: token {i} kept differently");
        }
    }
}

#[test]
fn draws_follow_the_distribution() {
    let (cfg, logits, seen, expected) = cases().swap_remove(5);
    let mut sampler = Sampler::new(7);
    let n = 20_000;
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[next_token(&mut logits.clone(), &seen, &cfg, &mut sampler) as usize] += 1;
    }
    for (i, (c, p)) in counts.iter().zip(&expected).enumerate() {
        let freq = *c as f64 / n as f64;
        // 5 standard deviations of a binomial proportion, plus a floor for tiny p.
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3;
        assert!(
            (freq - p).abs() < tol,
            "token {i}: drawn {freq}, expected {p}"
        );
    }
}

#[test]
fn greedy_takes_the_first_maximum_after_the_penalty() {
    let cfg = GenerationConfig {
        repetition_penalty: 2.0,
        ..Default::default()
    };
    let mut logits = vec![1.0, 3.0, 3.0, 2.0];
    // Token 1 was seen: 3.0 / 2 = 1.5, so the first maximum is token 2.
    assert_eq!(next_token(&mut logits, &[1], &cfg, &mut Sampler::new(0)), 2);
    let mut logits = vec![1.0, 3.0, 3.0, 2.0];
    assert_eq!(
        next_token(
            &mut logits,
            &[],
            &GenerationConfig::default(),
            &mut Sampler::new(0)
        ),
        1
    );
}
