//! The seeded, bounded configuration every property test runs with.

use std::hash::{BuildHasher as _, RandomState};

use proptest::test_runner::{Config, RngSeed};

/// The environment variable that replays a run: the seed a failing test
/// printed.
pub const SEED_VAR: &str = "TRIBUTARY_PROPTEST_SEED";

/// Cases per property unless `PROPTEST_CASES` says otherwise: enough to
/// cover the shapes, few enough for CI (the whole file runs in seconds).
const DEFAULT_CASES: u32 = 512;

/// A proptest configuration with a fixed seed, printed so that a failure
/// (nextest shows a failing test's output) can be replayed exactly:
/// `TRIBUTARY_PROPTEST_SEED=<seed> cargo nextest run -p tributary-postgres --test decoders`.
/// No regression files are written: the printed seed is the record.
pub fn config() -> Config {
    let seed = match std::env::var(SEED_VAR) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={text:?} is not a u64")),
        Err(_) => RandomState::new().hash_one(std::time::SystemTime::now()),
    };
    eprintln!("proptest seed {seed} (replay with {SEED_VAR}={seed})");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}
