//! The MPI communicators under `mpirun`: collectives equal hand-computed
//! sums, a distributed K-FAC run equals the single-process run (and the
//! flat MPI sum equals the shared-memory one bit for bit), and a rank that
//! dies or hangs ends the job instead of hanging it.
//!
//! A plain `cargo test` does not enable the `mpi` feature, so the program
//! these tests run (`examples/mpi_check.rs`) is built here with a nested
//! `cargo build --features mpi`. Without `mpirun` on the `PATH` the tests
//! print a notice and pass, unless `KFAC_REQUIRE_MPI=1` (set in CI), which
//! makes a missing MPI a failure.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kfac_test_support::{built, find_tool, Job, Ranks, Require};

/// Bound on one mpirun job.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// One job at a time: 4 busy-polling ranks per job already fill 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// `mpirun`, or `None` after printing why the test is skipped; panics
/// when `KFAC_REQUIRE_MPI=1` forbids skipping.
fn require_mpirun() -> Option<PathBuf> {
    find_tool("mpirun", Require::Mpi)
}

/// Builds `examples/mpi_check.rs` with the `mpi` feature, once, in the
/// same target directory and profile as this test.
fn check_program() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        built(
            &[
                "-p",
                "kfac-runtime",
                "--features",
                "mpi",
                "--example",
                "mpi_check",
            ],
            "examples/mpi_check",
        )
    })
    .clone()
}

/// Runs `mpi_check args` as `np` ranks; kills the job (and fails) after
/// `JOB_TIMEOUT`.
fn mpi_job(mpirun: &Path, np: usize, args: &[&str], env: &[(&str, &str)]) -> Job {
    let exe = check_program();
    let ranks = env
        .iter()
        .fold(Ranks::mpirun(mpirun, np), |r, (k, v)| r.env(k, v))
        .timeout(JOB_TIMEOUT);
    ranks.run(&exe, args)
}

fn expect_ok(j: &Job, what: &str, marker: &str, np: usize) {
    j.expect_ok(what);
    assert_eq!(
        j.stdout.matches(marker).count(),
        np,
        "{what}: expected {np} x {marker:?}:\n{}",
        j.stdout
    );
    eprintln!("{what}: {:.2} s", j.secs);
}

/// The communicator variants: (description, ranks, extra args, env).
type Variant = (
    &'static str,
    usize,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const VARIANTS: [Variant; 5] = [
    ("mpi P=2", 2, &[], &[]),
    ("mpi P=4", 4, &[], &[]),
    (
        "hier 2 nodes x 2",
        4,
        &["--hier"],
        &[("KFAC_NODE_SIZE", "2")],
    ),
    (
        "hier 2 interleaved nodes x 2",
        4,
        &["--hier", "--node-id-mod", "2"],
        &[],
    ),
    (
        "hier 1 node x 4",
        4,
        &["--hier"],
        &[("KFAC_NODE_SIZE", "4")],
    ),
];

#[test]
fn mpi_collectives_equal_hand_computed_sums() {
    let Some(mpirun) = require_mpirun() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut variants = VARIANTS.to_vec();
    variants.push((
        "hier 1 rank per node",
        4,
        &["--hier"],
        &[("KFAC_NODE_SIZE", "1")],
    ));
    variants.push(("hier 2 + 1", 3, &["--hier"], &[("KFAC_NODE_SIZE", "2")]));
    for (what, np, extra, env) in variants {
        // 256-byte segments: every collective crosses several segments.
        let mut args = vec!["collectives", "--segment-bytes", "256"];
        args.extend_from_slice(extra);
        let j = mpi_job(&mpirun, np, &args, env);
        expect_ok(&j, what, "collectives ok", np);
    }
}

fn line_values<'a>(stdout: &'a str, key: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.find(key).map(|i| l[i + key.len()..].trim()))
        .collect()
}

#[test]
fn mpi_kfac_equals_single_process_and_runs_agree() {
    let Some(mpirun) = require_mpirun() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut runs: Vec<(&str, String, Vec<f32>, f64)> = Vec::new();
    for (what, np, extra, env) in VARIANTS {
        let mut args = vec!["kfac"];
        args.extend_from_slice(extra);
        let j = mpi_job(&mpirun, np, &args, env);
        expect_ok(&j, what, "kfac ok", np);
        let hashes = line_values(&j.stdout, "hash ");
        assert_eq!(hashes.len(), np, "{what}: {}", j.stdout);
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "{what}: ranks disagree: {hashes:?}"
        );
        let tol: f64 = line_values(&j.stdout, " tol ")[0].parse().unwrap();
        let values: Vec<f32> = line_values(&j.stdout, "values ")[0]
            .split(',')
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
            .collect();
        runs.push((what, hashes[0].to_string(), values, tol));
    }
    // Flat MPI and a single shared-memory node both sum in rank order: the
    // same bits.
    let hash = |w: &str| runs.iter().find(|r| r.0 == w).unwrap().1.clone();
    assert_eq!(hash("mpi P=4"), hash("hier 1 node x 4"));
    // Every pair of runs agrees within the rounding tolerance (each is
    // within `tol` of the single-process run, checked by its rank 0).
    for a in &runs {
        for b in &runs {
            let num: f64 =
                a.2.iter()
                    .zip(&b.2)
                    .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
            let den: f64 = b.2.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
            assert_eq!(a.2.len(), b.2.len());
            assert!(
                num / den <= a.3 + b.3,
                "{} vs {}: {:.3e} > {:.3e}",
                a.0,
                b.0,
                num / den,
                a.3 + b.3
            );
        }
    }
}

#[test]
fn mpi_rank_that_dies_or_hangs_ends_the_job() {
    let Some(mpirun) = require_mpirun() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases: [Variant; 4] = [
        ("mpi: a rank exits", 2, &["abort-exit"], &[]),
        (
            "hier: a rank panics",
            4,
            &["abort-panic", "--hier"],
            &[("KFAC_NODE_SIZE", "2")],
        ),
        (
            "mpi: a rank hangs",
            2,
            &["stuck", "--timeout-secs", "2"],
            &[],
        ),
        (
            "hier: a rank hangs",
            4,
            &["stuck", "--hier", "--timeout-secs", "2"],
            &[("KFAC_NODE_SIZE", "2")],
        ),
    ];
    for (what, np, args, env) in cases {
        let j = mpi_job(&mpirun, np, args, env);
        assert!(
            !j.ok,
            "{what}: the job succeeded:\n{}\n{}",
            j.stdout, j.stderr
        );
        if args[0] == "stuck" {
            assert!(
                j.stdout.contains("timed out as expected"),
                "{what}: no rank reported the timeout:\n{}\n{}",
                j.stdout,
                j.stderr
            );
        }
        eprintln!("{what}: ended with {} after {:.2} s", j.status, j.secs);
    }
}
