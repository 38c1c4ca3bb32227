//! Distributed K-FAC across real processes over shared memory: results
//! equal the single-process result on the concatenated batch, are bitwise
//! reproducible, and do not depend on the gradient-worker fraction.

mod common;

use std::process::Command;
use std::time::Duration;

use common::dist::{compare_with_single_process, config, fnv, run, N};
use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::Communicator;
use kfac_runtime::{Error, LayerKind, Preconditioner};

const LAUNCH: &str = env!("CARGO_BIN_EXE_kfac-launch");

#[test]
fn worker_entry() {
    let Ok(role) = std::env::var("KFAC_TEST_ROLE") else {
        return;
    };
    let g = ShmGroup::from_env(ShmOptions {
        timeout: Duration::from_secs(20),
        slot_bytes: 4096,
    })
    .expect("join");
    let (rank, world) = (g.rank(), g.size());
    let mut p = Preconditioner::with_communicator(config(), Box::new(g)).unwrap();
    match role.as_str() {
        "dist" => {
            let per = N / world;
            let got = run(&mut p, rank * per..(rank + 1) * per).unwrap();
            println!("hash {:016x}", fnv(&got));
            if rank == 0 {
                let (worst, tol) = compare_with_single_process(&got, world);
                println!("maxrel {worst:.3e} tol {tol:.3e}");
                assert!(
                    worst <= tol,
                    "distributed differs from single-process: {worst:.3e} > {tol:.3e}"
                );
            }
            println!("dist ok");
        }
        "mismatch" => {
            if rank == 1 {
                p.register(
                    "extra",
                    LayerKind::Linear {
                        in_features: 2,
                        out_features: 2,
                        bias: false,
                    },
                )
                .unwrap();
            }
            let err = run(&mut p, 0..N / world).unwrap_err();
            println!("got: {err}");
            assert!(
                matches!(&err, Error::Distributed { reason } if reason.contains("differs")),
                "{err}"
            );
            println!("mismatch ok");
        }
        other => panic!("unknown role {other}"),
    }
}

fn launch(n: usize, role: &str, env: &[(&str, &str)]) -> String {
    let mut c = Command::new(LAUNCH);
    c.args(["-n", &n.to_string(), "--timeout", "120", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "worker_entry",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KFAC_TEST_ROLE", role);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "P={n} {role} {env:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(&format!("{role} ok")).count(), n, "{stdout}");
    stdout
}

fn hashes(stdout: &str) -> Vec<String> {
    let mut h: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.find("hash ").map(|i| l[i + 5..].trim().to_string()))
        .collect();
    h.sort();
    h
}

#[test]
fn distributed_equals_single_process_and_is_bitwise_reproducible() {
    for p in [2, 3, 4] {
        let first = hashes(&launch(p, "dist", &[]));
        assert_eq!(first.len(), p);
        assert!(
            first.windows(2).all(|w| w[0] == w[1]),
            "ranks disagree: {first:?}"
        );
        let second = hashes(&launch(p, "dist", &[]));
        assert_eq!(first, second, "P={p}: two runs differ");
    }
}

#[test]
fn every_gradient_worker_fraction_gives_the_same_result() {
    let p = 4;
    let mut seen = Vec::new();
    for f in ["1.0", "0.25", "0.5"] {
        for method in ["eigen", "inverse"] {
            let h = hashes(&launch(
                p,
                "dist",
                &[("KFAC_TEST_FRACTION", f), ("KFAC_TEST_METHOD", method)],
            ));
            assert!(h.windows(2).all(|w| w[0] == w[1]), "f={f}: ranks disagree");
            seen.push((method, h[0].clone()));
        }
    }
    for m in ["eigen", "inverse"] {
        let hs: Vec<_> = seen
            .iter()
            .filter(|(k, _)| *k == m)
            .map(|(_, h)| h)
            .collect();
        assert!(
            hs.windows(2).all(|w| w[0] == w[1]),
            "{m}: strategies differ: {hs:?}"
        );
    }
}

#[test]
fn low_precision_wire_stays_close_to_single_process() {
    for wire in ["bf16", "f16"] {
        launch(2, "dist", &[("KFAC_TEST_WIRE", wire)]);
    }
}

#[test]
fn mismatched_layer_lists_are_detected_on_every_rank() {
    launch(3, "mismatch", &[]);
}
