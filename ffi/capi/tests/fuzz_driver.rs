//! The C-API fuzz driver (`fuzz/driver.rs`, run under libFuzzer and
//! sanitizers by `cargo +nightly fuzz run c_api`) on stable, in CI: random
//! byte strings decoded into call sequences, and every saved regression
//! input in `fuzz/regressions/`. The driver asserts that no panic crosses
//! the boundary, that every failure carries a message and that freed
//! handles are refused (uses and double frees of any handle freed earlier
//! in the run, also after new handles were created); a crash or hang fails
//! the test.

#[path = "../../../fuzz/driver.rs"]
mod driver;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_call_sequences_through_the_c_api(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = driver::run(&data);
    }
}

#[test]
fn saved_fuzz_regressions_replay_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz/regressions exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let _ = driver::run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    eprintln!("replayed {n} saved inputs");
}

/// The random inputs above reach deep states, not just early errors: over
/// a fixed set of inputs, observations, steps and checkpoint round trips
/// succeed many times (so the driver really exercises them).
#[test]
fn random_inputs_reach_successful_steps_and_reloads() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = driver::Summary::default();
    for _ in 0..400 {
        let data: Vec<u8> = (0..1500)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        let r = driver::run(&data);
        total.calls += r.calls;
        total.observed += r.observed;
        total.steps += r.steps;
        total.reloads += r.reloads;
        total.errors += r.errors;
        total.stale += r.stale;
    }
    eprintln!("{total:?}");
    assert!(total.observed >= 50, "{total:?}");
    assert!(total.steps >= 20, "{total:?}");
    assert!(total.reloads >= 20, "{total:?}");
    assert!(total.stale >= 20, "{total:?}");
}
