//! Distributed K-FAC across real processes over shared memory: results
//! equal the single-process result on the concatenated batch, are bitwise
//! reproducible, and do not depend on the gradient-worker fraction.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{second_moment, spectral_bound, to_f32, with_ones, Rng, M};
use faer::MatRef;
use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::{Communicator, Local};
use kfac_runtime::{
    Config, Error, LayerGrad, LayerKind, Method, Observation, Preconditioner, Schedule,
    WirePrecision,
};

const LAUNCH: &str = env!("CARGO_BIN_EXE_kfac-launch");
const N: usize = 12; // global batch, divisible by 2, 3, 4
const STEPS: usize = 3;
const DIMS: [(usize, usize); 2] = [(6, 5), (5, 4)]; // (in, out), with bias

struct Data {
    acts: Vec<M>,
    outs: Vec<M>,
    grads: Vec<M>, // d_out x (in + 1), bias last
}

fn data(step: usize) -> Data {
    let mut rng = Rng(1000 + step as u64);
    let acts = DIMS.iter().map(|&(i, _)| rng.mat(N, i, 1.0)).collect();
    let outs = DIMS.iter().map(|&(_, o)| rng.mat(N, o, 1.0)).collect();
    let grads = DIMS.iter().map(|&(i, o)| rng.mat(o, i + 1, 0.3)).collect();
    Data { acts, outs, grads }
}

fn config() -> Config {
    let fraction = std::env::var("KFAC_TEST_FRACTION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let wire = match std::env::var("KFAC_TEST_WIRE").as_deref() {
        Ok("bf16") => WirePrecision::Bf16,
        Ok("f16") => WirePrecision::F16,
        _ => WirePrecision::F32,
    };
    let method = match std::env::var("KFAC_TEST_METHOD").as_deref() {
        Ok("inverse") => Method::Inverse,
        _ => Method::Eigen,
    };
    Config {
        damping: Schedule::Constant(0.05),
        kl_clip: Some(1e-2),
        inv_update_steps: 2,
        method,
        threads: 1,
        grad_worker_fraction: fraction,
        wire,
        ..Config::default()
    }
}

/// Runs the model on `rows` of every step's batch; returns the
/// preconditioned gradients of every step, flattened.
fn run(p: &mut Preconditioner, rows: std::ops::Range<usize>) -> Result<Vec<Vec<f32>>, Error> {
    let ids: Vec<_> = DIMS
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
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for s in 0..STEPS {
        let d = data(s);
        for (k, id) in ids.iter().enumerate() {
            let a: Vec<f32> = rows
                .clone()
                .flat_map(|r| (0..d.acts[k].c).map(move |j| (r, j)))
                .map(|(r, j)| d.acts[k].at(r, j) as f32)
                .collect();
            let g: Vec<f32> = rows
                .clone()
                .flat_map(|r| (0..d.outs[k].c).map(move |j| (r, j)))
                .map(|(r, j)| d.outs[k].at(r, j) as f32)
                .collect();
            p.observe(
                *id,
                Observation::Linear {
                    activations: MatRef::from_row_major_slice(&a, rows.len(), d.acts[k].c),
                    output_grads: MatRef::from_row_major_slice(&g, rows.len(), d.outs[k].c),
                },
            )?;
        }
        let mut ws: Vec<Vec<f32>> = d
            .grads
            .iter()
            .map(|g| to_f32(&M::from_fn(g.r, g.c - 1, |i, j| g.at(i, j))))
            .collect();
        let mut bs: Vec<Vec<f32>> = d
            .grads
            .iter()
            .map(|g| (0..g.r).map(|i| g.at(i, g.c - 1) as f32).collect())
            .collect();
        let mut lg: Vec<LayerGrad<'_>> = Vec::new();
        for (((w, b), id), &(i, o)) in ws.iter_mut().zip(bs.iter_mut()).zip(&ids).zip(&DIMS) {
            lg.push(LayerGrad::from_row_major(*id, w, o, i, Some(b))?);
        }
        p.step(&mut lg)?;
        drop(lg);
        out.push(ws.into_iter().chain(bs).flatten().collect());
    }
    Ok(out)
}

fn fnv(v: &[Vec<f32>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v.iter().flatten() {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

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
                // single-process reference on the concatenated batch
                let mut q =
                    Preconditioner::with_communicator(config(), Box::new(Local::new())).unwrap();
                let want = run(&mut q, 0..N).unwrap();
                // tolerance: the factor sums differ only in rounding
                // (<= (N + P) eps relative per entry; plus half an ulp of
                // the wire format when statistics travel as bf16/f16),
                // amplified to first order by the condition number of
                // (A ⊗ G + damping I), bounded with Gershgorin.
                let d = data(0);
                let mut kappa: f64 = 1.0;
                for k in 0..DIMS.len() {
                    let a = second_moment(&with_ones(&d.acts[k], true));
                    let gm = second_moment(&d.outs[k]);
                    kappa = kappa.max((spectral_bound(&a) * spectral_bound(&gm) + 0.05) / 0.05);
                }
                let wire_eps = match config().wire {
                    WirePrecision::F32 => f32::EPSILON as f64,
                    WirePrecision::Bf16 => 2f64.powi(-8),
                    WirePrecision::F16 => 2f64.powi(-11),
                };
                let tol =
                    8.0 * kappa * (N + world) as f64 * f32::EPSILON as f64 + kappa * wire_eps / 2.0;
                let mut worst: f64 = 0.0;
                for (gs, ws) in got.iter().zip(&want) {
                    let num: f64 = gs
                        .iter()
                        .zip(ws)
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    let den: f64 = ws.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
                    worst = worst.max(num / den);
                }
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
