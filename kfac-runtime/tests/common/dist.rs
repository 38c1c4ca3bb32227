//! The model, data and single-process reference shared by the
//! distributed tests (shared memory here, MPI in `tests/mpi.rs` through the
//! `mpi_check` example): a two-layer model run for a few steps on a
//! shard of every step's batch.

use faer::MatRef;
use kfac_runtime::comm::Local;
use kfac_runtime::{
    Config, Error, LayerGrad, LayerKind, Method, Observation, Preconditioner, Schedule,
    WirePrecision,
};

use super::{second_moment, spectral_bound, to_f32, with_ones, Rng, M};

pub const N: usize = 12; // global batch, divisible by 2, 3, 4
pub const STEPS: usize = 3;
pub const DIMS: [(usize, usize); 2] = [(6, 5), (5, 4)]; // (in, out), with bias

pub struct Data {
    pub acts: Vec<M>,
    pub outs: Vec<M>,
    pub grads: Vec<M>, // d_out x (in + 1), bias last
}

pub fn data(step: usize) -> Data {
    let mut rng = Rng(1000 + step as u64);
    let acts = DIMS.iter().map(|&(i, _)| rng.mat(N, i, 1.0)).collect();
    let outs = DIMS.iter().map(|&(_, o)| rng.mat(N, o, 1.0)).collect();
    let grads = DIMS.iter().map(|&(i, o)| rng.mat(o, i + 1, 0.3)).collect();
    Data { acts, outs, grads }
}

pub fn config() -> Config {
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
pub fn run(p: &mut Preconditioner, rows: std::ops::Range<usize>) -> Result<Vec<Vec<f32>>, Error> {
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

pub fn fnv(v: &[Vec<f32>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v.iter().flatten() {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Runs the single-process reference on the whole batch and compares
/// `got` (a rank's result with `world` ranks) against it; returns the worst
/// relative difference of a step and the tolerance.
pub fn compare_with_single_process(got: &[Vec<f32>], world: usize) -> (f64, f64) {
    let mut q = Preconditioner::with_communicator(config(), Box::new(Local::new())).unwrap();
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
    let tol = 8.0 * kappa * (N + world) as f64 * f32::EPSILON as f64 + kappa * wire_eps / 2.0;
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
    (worst, tol)
}
