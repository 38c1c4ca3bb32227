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
use kfac_test_support::worker;

const LAUNCH: &str = env!("CARGO_BIN_EXE_kfac-launch");

/// One rank of the tests below (run by them under `kfac-launch`, never on
/// its own).
#[test]
#[ignore = "worker entry: run by its parent test"]
fn worker_entry() {
    let role = worker::role("KFAC_TEST_ROLE");
    let g = ShmGroup::from_env(ShmOptions {
        timeout: Duration::from_secs(20),
        slot_bytes: 4096,
    })
    .expect("join");
    let (rank, world) = (g.rank(), g.size());
    let cfg = match role.as_str() {
        "oom" => kfac_runtime::Config {
            inv_update_steps: 1,
            threads: 1,
            grad_worker_fraction: 0.5,
            ..config()
        },
        "fail_together" => kfac_runtime::Config {
            method: kfac_runtime::Method::Inverse,
            damping: kfac_runtime::Schedule::Constant(0.05),
            inv_update_steps: 1,
            threads: 1,
            ..kfac_runtime::Config::default()
        },
        _ => config(),
    };
    let mut p = Preconditioner::with_communicator(cfg, Box::new(g)).unwrap();
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
        "fail_together" => fail_together(p, rank, world),
        "oom" => out_of_memory(p, rank),
        "bytes" => bytes_moved(p, rank, world),
        other => panic!("unknown role {other}"),
    }
    worker::done(&role);
}

/// One step of a 1-layer Kronecker model whose A statistic is `a_diag`
/// (G = I), with a gradient of `cols` columns (3 is the right shape).
fn kron_step(
    p: &mut Preconditioner,
    id: kfac_runtime::LayerId,
    a_diag: [f32; 3],
    cols: usize,
) -> Result<kfac_runtime::StepStats, Error> {
    let a = faer::Mat::<f32>::from_fn(3, 3, |i, j| if i == j { a_diag[i] } else { 0.0 });
    let g = faer::Mat::<f32>::identity(2, 2);
    p.observe(
        id,
        kfac_runtime::Observation::Kronecker {
            a: a.as_ref(),
            g: g.as_ref(),
            samples: 4,
        },
    )?;
    let mut w = vec![0.25f32; 2 * cols];
    let grad = kfac_runtime::LayerGrad::from_row_major(id, &mut w, 2, cols, None)?;
    p.step(&mut [grad])
}

/// Fail-together (#10): an inversion that fails on its owner only (an
/// indefinite A statistic that damping cannot rescue), and a shape error
/// on one rank at step 5, end the step on every rank with an error naming
/// the failing rank and its cause, well within the collective timeout
/// (20 s here); the group stays usable and the next good step succeeds on
/// every rank.
fn fail_together(mut p: Preconditioner, rank: usize, world: usize) {
    use kfac_runtime::ErrorKind;
    let id = p
        .register("kron", LayerKind::Kronecker { a_dim: 3, g_dim: 2 })
        .unwrap();
    let good = [1.0f32, 0.5, 2.0];
    // Step 0: an indefinite A fails the Cholesky inversion on A's owner.
    let t0 = std::time::Instant::now();
    let err = kron_step(&mut p, id, [2.0, -1.5, 2.0], 3).unwrap_err();
    let took = t0.elapsed();
    println!("rank {rank}: {err} ({took:?})");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The step updated the factors, so every rank discarded the statistics
    // (#11): the error says so around its cause.
    let Error::StatisticsDiscarded { cause } = &err else {
        panic!("rank {rank}: expected StatisticsDiscarded, got {err:?}");
    };
    assert!(err.to_string().contains("discarded"), "{err}");
    assert_eq!(err.kind(), cause.kind());
    let err = &**cause;
    match err {
        Error::Kernel { .. } => assert_eq!(err.kind(), ErrorKind::Numerical),
        Error::RankFailed {
            rank: r,
            kind,
            cause,
        } => {
            assert_ne!(*r, rank);
            assert_eq!(*kind, ErrorKind::Numerical);
            assert!(cause.contains("kron"), "{cause}");
        }
        other => panic!("rank {rank}: unexpected {other:?}"),
    }
    assert_eq!(p.steps(), 0, "a failed step must not count");
    // Steps 0-4 with good data succeed everywhere (the bad statistic was
    // discarded, so even a small good one is definite).
    for s in 0..5 {
        kron_step(&mut p, id, good, 3).unwrap_or_else(|e| panic!("rank {rank} step {s}: {e}"));
    }
    // Step 5: rank 1 passes a gradient of the wrong shape.
    let cols = if rank == 1 { 4 } else { 3 };
    let t0 = std::time::Instant::now();
    let err = kron_step(&mut p, id, good, cols).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    println!("rank {rank}: {err}");
    if rank == 1 {
        assert_eq!(err.kind(), ErrorKind::Shape, "{err}");
    } else {
        assert!(
            matches!(
                &err,
                Error::RankFailed {
                    rank: 1,
                    kind: ErrorKind::Shape,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    kron_step(&mut p, id, good, 3).unwrap_or_else(|e| panic!("rank {rank} after: {e}"));
    assert_eq!(p.steps(), 6);
    let _ = world;
    println!("fail_together ok");
}

#[path = "common/faulty.rs"]
mod faulty;

#[global_allocator]
static ALLOC: faulty::Faulty = faulty::Faulty;

/// Out of memory in a distributed step (#11): in step `k` of a sweep,
/// rank 1 fails its `k`-th large allocation of the step (statistics packed
/// for the sum, the sums, new factors, decompositions, the buffers of the
/// shares, received decompositions and gradients, ...). Every step either
/// succeeds on both ranks or fails on both, rank 1 with `OutOfMemory` and
/// rank 0 with `RankFailed` naming it; nothing aborts, a failed step
/// changes nothing (the statistics are kept), and after the sweep both
/// ranks compute the same gradients. Embedding layers give large buffers
/// with next to no matrix multiply (whose per-call packing buffers abort,
/// as documented in `mem.rs`).
fn out_of_memory(mut p: Preconditioner, rank: usize) {
    use kfac_runtime::ErrorKind;
    const VOCAB: usize = 1 << 13;
    const DIM: usize = 16;
    const SWEEP: usize = 16;
    let ids: Vec<_> = (0..2)
        .map(|k| {
            p.register(
                &format!("emb{k}"),
                LayerKind::Embedding {
                    num_embeddings: VOCAB,
                    dim: DIM,
                },
            )
            .unwrap()
        })
        .collect();
    let tokens: Vec<usize> = (0..64).map(|t| (t * 16411 + rank) % VOCAB).collect();
    let og: Vec<f32> = (0..64 * DIM).map(|k| ((k * 5) % 7) as f32 - 3.0).collect();
    let mut grads: Vec<Vec<f32>> = vec![vec![0.0; VOCAB * DIM]; 2];
    let step = |p: &mut Preconditioner, grads: &mut Vec<Vec<f32>>, fail: Option<usize>| {
        for (k, &id) in ids.iter().enumerate() {
            p.observe(
                id,
                kfac_runtime::Observation::Embedding {
                    tokens: &tokens,
                    output_grads: faer::MatRef::from_row_major_slice(&og, 64, DIM),
                },
            )
            .unwrap();
            for (i, g) in grads[k].iter_mut().enumerate() {
                *g = ((i * 13 + k) % 17) as f32 * 0.01 - 0.08;
            }
        }
        let mut lg: Vec<_> = grads
            .iter_mut()
            .zip(&ids)
            .map(|(w, &id)| {
                kfac_runtime::LayerGrad::from_row_major(id, w, VOCAB, DIM, None).unwrap()
            })
            .collect();
        if let Some(k) = fail {
            faulty::arm(k);
        }
        let r = p.step(&mut lg);
        (r, faulty::disarm())
    };
    // Warm-up: the pool, scratch and every buffer of a step exist once.
    for _ in 0..2 {
        step(&mut p, &mut grads, None).0.unwrap();
    }
    let (mut ok, mut failed) = (0, 0);
    for k in 0..SWEEP {
        let before = p.steps();
        let (r, fired) = step(&mut p, &mut grads, (rank == 1).then_some(k));
        match r {
            Ok(_) => {
                ok += 1;
                println!("oom rank {rank} sweep {k}: ok");
            }
            Err(e) => {
                failed += 1;
                println!("oom rank {rank} sweep {k}: failed: {e}");
                if rank == 1 {
                    assert!(fired, "{e}");
                    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e:?}");
                } else {
                    assert!(
                        matches!(
                            &e,
                            Error::RankFailed {
                                rank: 1,
                                kind: ErrorKind::OutOfMemory,
                                ..
                            }
                        ),
                        "{e:?}"
                    );
                }
                assert_eq!(p.steps(), before, "a failed step must not count");
            }
        }
    }
    println!("oom rank {rank} ok {ok} failed {failed}");
    step(&mut p, &mut grads, None).0.unwrap();
    println!("hash {:016x}", fnv(&grads));
    println!("oom ok");
}

/// Prints the bytes this rank sent and received in a step that inverts
/// (step 0) and one that does not (step 1).
fn bytes_moved(mut p: Preconditioner, rank: usize, world: usize) {
    let dims = [(6usize, 5usize), (5, 4), (9, 3)];
    let ids: Vec<_> = dims
        .iter()
        .enumerate()
        .map(|(k, &(i, o))| {
            p.register(
                &format!("fc{k}"),
                LayerKind::Linear {
                    in_features: i,
                    out_features: o,
                    bias: true,
                },
            )
            .unwrap()
        })
        .collect();
    for step in 0..2 {
        let mut ws: Vec<Vec<f32>> = Vec::new();
        let mut bs: Vec<Vec<f32>> = Vec::new();
        for (k, (&(i, o), id)) in dims.iter().zip(&ids).enumerate() {
            let a: Vec<f32> = (0..4 * i).map(|x| ((x * 7 + k) % 5) as f32 - 2.0).collect();
            let g: Vec<f32> = (0..4 * o).map(|x| ((x * 3 + k) % 7) as f32 - 3.0).collect();
            p.observe(
                *id,
                kfac_runtime::Observation::Linear {
                    activations: faer::MatRef::from_row_major_slice(&a, 4, i),
                    output_grads: faer::MatRef::from_row_major_slice(&g, 4, o),
                },
            )
            .unwrap();
            ws.push(vec![0.01; o * i]);
            bs.push(vec![0.02; o]);
        }
        let mut grads = Vec::new();
        for ((w, b), (&(i, o), id)) in ws.iter_mut().zip(bs.iter_mut()).zip(dims.iter().zip(&ids)) {
            grads.push(kfac_runtime::LayerGrad::from_row_major(*id, w, o, i, Some(b)).unwrap());
        }
        let st = p.step(&mut grads).unwrap();
        println!(
            "bytes rank {rank} world {world} step {step} sent {} received {}",
            st.bytes_sent, st.bytes_received
        );
    }
    println!("bytes ok");
}

fn launch(n: usize, role: &str, env: &[(&str, &str)]) -> String {
    let mut c = Command::new(LAUNCH);
    c.args(["-n", &n.to_string(), "--timeout", "120", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(worker::args("worker_entry"))
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
    worker::assert_ran(&stdout, role, n);
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

#[test]
fn a_failure_on_one_rank_fails_the_step_on_every_rank_quickly() {
    for p in [2, 3] {
        launch(p, "fail_together", &[]);
    }
}

#[test]
fn out_of_memory_in_a_distributed_step_fails_every_rank_and_changes_nothing() {
    // bf16: every allocation of the f32 wire plus the converted copy and
    // the room for every rank's copy.
    {
        let out = launch(2, "oom", &[("KFAC_TEST_WIRE", "bf16")]);
        let outcome = |r: usize| -> Vec<bool> {
            out.lines()
                .filter(|l| l.contains(&format!("oom rank {r} sweep")))
                .map(|l| l.ends_with(": ok"))
                .collect()
        };
        let (r0, r1) = (outcome(0), outcome(1));
        assert_eq!(r0.len(), 16, "{out}");
        assert_eq!(r0, r1, "the ranks disagree on which steps failed:\n{out}");
        assert!(r0.iter().any(|&o| !o), "the limit never bit:\n{out}");
        // The last steps of the sweep fail no allocation: every large
        // allocation of a step was failed once.
        assert!(r0.last() == Some(&true), "the sweep is too short:\n{out}");
        let h = hashes(&out);
        assert!(h.len() == 2 && h[0] == h[1], "ranks disagree: {h:?}");
    }
}

/// `(rank, step, sent, received)` from the `bytes` role's output.
fn traffic(stdout: &str) -> Vec<(usize, usize, u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let i = l.find("bytes rank ")?;
            let w: Vec<&str> = l[i..].split_whitespace().collect();
            Some((
                w[2].parse().ok()?,
                w[6].parse().ok()?,
                w[8].parse().ok()?,
                w[10].parse().ok()?,
            ))
        })
        .collect()
}

/// Bytes moved per step for gradient-worker fractions 1, 1/2 and 1/P
/// (P = 4, eigen method, inversion at step 0 only), against the formulas
/// of `distributed` (hand-computed from the layer sizes):
///
/// * statistics: every rank sends and receives its packed triangles
///   (`4 Σ (d(d+1)/2)` bytes) and weights (`8 L`);
/// * decompositions: each factor (`4 (d² + d)` bytes) is sent once by its
///   owner; with f = 1 every other rank receives it;
/// * preconditioned gradients (f < 1 only): each layer's `V`
///   (`4 d_out d_in` bytes) is sent once by its lead, every step, and
///   received by the `P - f P` ranks outside its group.
#[test]
fn bytes_moved_per_step_match_the_documented_formulas() {
    let p = 4usize;
    let dims = [(6u64, 5u64), (5, 4), (9, 3)]; // (in, out), with bias
    let tri = |d: u64| d * (d + 1) / 2;
    let stats: u64 = dims
        .iter()
        .map(|&(i, o)| 4 * (tri(i + 1) + tri(o)))
        .sum::<u64>()
        + 8 * dims.len() as u64;
    let decomp: u64 = dims
        .iter()
        .map(|&(i, o)| 4 * ((i + 1) * (i + 1) + (i + 1) + o * o + o))
        .sum();
    let grads: u64 = dims.iter().map(|&(i, o)| 4 * o * (i + 1)).sum();
    let mut received_at_inversion = Vec::new();
    for (f, gsize) in [("1.0", 4u64), ("0.5", 2), ("0.25", 1)] {
        let t = traffic(&launch(p, "bytes", &[("KFAC_TEST_FRACTION", f)]));
        assert_eq!(t.len(), 2 * p, "{t:?}");
        let sum = |step: usize, sent: bool| -> u64 {
            t.iter()
                .filter(|x| x.1 == step)
                .map(|x| if sent { x.2 } else { x.3 })
                .sum()
        };
        let results = if gsize < p as u64 { grads } else { 0 };
        assert_eq!(sum(0, true), p as u64 * stats + decomp + results, "f={f}");
        assert_eq!(sum(1, true), p as u64 * stats + results, "f={f}");
        let nonmembers = (p as u64 - gsize) * grads;
        assert_eq!(sum(1, false), p as u64 * stats + nonmembers, "f={f}");
        if gsize == p as u64 {
            assert_eq!(sum(0, false), p as u64 * stats + (p as u64 - 1) * decomp);
        }
        // Members hold at most gsize copies of each decomposition.
        assert!(sum(0, false) <= p as u64 * stats + gsize * decomp + nonmembers);
        received_at_inversion.push(sum(0, false));
    }
    assert!(
        received_at_inversion[1] < received_at_inversion[0],
        "f = 1/2 must move fewer bytes than f = 1 at an inversion step: {received_at_inversion:?}"
    );
}
