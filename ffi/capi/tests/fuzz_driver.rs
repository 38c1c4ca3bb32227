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

/// The saved cases of `dir`: every regular file except the README (`.md`)
/// and hidden files. An error when the directory cannot be read.
fn saved_cases(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !name.starts_with('.') && !name.ends_with(".md") {
            cases.push(path);
        }
    }
    cases.sort();
    Ok(cases)
}

/// Replays every saved case of `dir`; the number replayed. Refuses a
/// missing directory and one without any case, so that a lost corpus
/// cannot pass as "every case replayed cleanly".
fn replay_saved(dir: &std::path::Path) -> Result<usize, String> {
    let cases = saved_cases(dir)?;
    if cases.is_empty() {
        return Err(format!("{} holds no saved case", dir.display()));
    }
    let mut replayed = 0;
    for path in &cases {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let summary = driver::run(&data);
        if summary.calls == 0 {
            return Err(format!("{} decodes to no call", path.display()));
        }
        replayed += 1;
    }
    Ok(replayed)
}

#[test]
fn saved_fuzz_regressions_replay_cleanly() {
    let dir = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/regressions"
    ));
    // counted independently of `saved_cases`: names starting with "crash-",
    // "leak-", "timeout-" or "oom-" (what cargo-fuzz saves)
    let present = std::fs::read_dir(dir)
        .expect("fuzz/regressions exists")
        .filter(|e| {
            let n = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            ["crash-", "leak-", "timeout-", "oom-"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .count();
    let replayed = replay_saved(dir).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("replayed {replayed} saved inputs");
    assert!(present >= 1, "no saved crash in {}", dir.display());
    assert_eq!(replayed, present, "every saved case is replayed");
}

#[test]
fn replay_refuses_a_missing_or_empty_corpus() {
    let dir = std::env::temp_dir().join(format!("kfac-fuzz-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(replay_saved(&dir).is_err(), "a missing directory");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "only a readme").unwrap();
    std::fs::write(dir.join(".hidden"), [1u8, 2, 3]).unwrap();
    let e = replay_saved(&dir).unwrap_err();
    assert!(e.contains("no saved case"), "{e}");
    std::fs::write(dir.join("crash-empty"), []).unwrap();
    let e = replay_saved(&dir).unwrap_err();
    assert!(e.contains("no call"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
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
