//! The query-path fuzz target on stable Rust: the seed corpus plus a few hundred thousand
//! deterministic mutations through `meshup_dns::fuzzing::QueryHarness` (the same checks
//! the cargo-fuzz target in `fuzz/dns` runs). CI runs this; `cargo fuzz` explores further.

use std::time::{Duration, Instant};

use meshup_dns::fuzzing::{QueryHarness, seed_corpus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutated packets per run (override with MESHUP_DNS_FUZZ_ITERATIONS).
const DEFAULT_ITERATIONS: usize = 300_000;
const DEADLINE: Duration = Duration::from_secs(240);

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>], seed: &[u8]) -> Vec<u8> {
    let mut p = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..8) {
            0 if !p.is_empty() => {
                let i = rng.random_range(0..p.len());
                p[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !p.is_empty() => {
                let i = rng.random_range(0..p.len());
                p[i] = [0, 0xff, 0xc0, 0x3f, 0x40, 0x80, 41, 1][rng.random_range(0..8)];
            }
            2 if !p.is_empty() => {
                let n = rng.random_range(0..p.len());
                p.truncate(n);
            }
            3 => {
                let i = rng.random_range(0..=p.len());
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                p.splice(i..i, extra);
            }
            4 if p.len() > 12 => {
                // Header counts are where parsers go wrong.
                let i = rng.random_range(4..12);
                p[i] = rng.random();
            }
            5 => {
                // Splice another seed's tail.
                let other = &corpus[rng.random_range(0..corpus.len())];
                let cut = rng.random_range(0..=p.len());
                let from = rng.random_range(0..=other.len());
                p.truncate(cut);
                p.extend_from_slice(&other[from..]);
            }
            6 if p.len() > 3 => {
                // Flags byte: opcodes, QR, TC, Z, AD, CD.
                p[2] = rng.random();
                if rng.random_bool(0.5) {
                    p[3] = rng.random();
                }
            }
            _ => {
                let n = rng.random_range(0..64);
                p.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    p
}

#[test]
fn query_path_survives_mutated_packets() {
    let iterations = std::env::var("MESHUP_DNS_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let corpus = seed_corpus();
    assert!(
        corpus.len() > 100,
        "seed corpus too small: {}",
        corpus.len()
    );
    let mut harness = QueryHarness::new();
    for seed in &corpus {
        harness.check(seed);
    }
    let mut rng = StdRng::seed_from_u64(0x6d65_7368_7570);
    let started = Instant::now();
    for i in 0..iterations {
        let seed = &corpus[i % corpus.len()];
        let packet = mutate(&mut rng, &corpus, seed);
        harness.check(&packet);
        assert!(
            started.elapsed() < DEADLINE,
            "fuzz loop exceeded {DEADLINE:?} at {i}"
        );
    }
}
