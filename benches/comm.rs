//! Shared-memory collectives and the distributed step.
//!
//! * `allreduce_p2`: allreduce (f32 sum) of 1 MiB .. 256 MiB between two
//!   processes (this bench and a partner process it starts), against a plain
//!   `memcpy` of the same bytes in the same run. Throughput is the payload
//!   size per call.
//! * `distributed_step`: a full preconditioner step (statistics, reduction,
//!   eigendecompositions split across owners, preconditioning, KL clipping)
//!   for ResNet-50 layer shapes with P = 1 and P = 2 (one thread per rank).
//!
//! The partner runs the same collectives in lockstep: before each measured
//! call, rank 0 broadcasts a command (what to run next, or stop).
#![allow(missing_docs)]

use std::hint::black_box;
use std::process::{Child, Command};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use faer::MatRef;
use kfac::runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac::runtime::comm::{CommError, Communicator, Local, ReduceType};
use kfac::runtime::{
    Config, LayerGrad, LayerId, LayerKind, Observation, Precision, Preconditioner, Schedule,
};
use std::sync::{Arc, Mutex};

const SHAPES: [(usize, usize); 3] = [(64, 577), (256, 2305), (1000, 2049)];
const BATCH: usize = 32;
const CMD_STOP: u64 = 0;
const CMD_STEP: u64 = 1;
const CMD_ALLREDUCE: u64 = 2;

mod common;
use common::data;

fn opts() -> ShmOptions {
    ShmOptions {
        timeout: Duration::from_secs(600),
        slot_bytes: 8 << 20,
    }
}

fn command(g: &mut dyn Communicator, cmd: &mut [u64; 2]) {
    let mut b = [0f64; 2];
    if g.rank() == 0 {
        b = [cmd[0] as f64, cmd[1] as f64];
    }
    let bytes = kfac::runtime::comm::as_bytes_mut(&mut b);
    g.broadcast_bytes(bytes, 0).unwrap();
    *cmd = [b[0] as u64, b[1] as u64];
}

struct Model {
    p: Preconditioner,
    ids: Vec<LayerId>,
    acts: Vec<Vec<f32>>,
    outs: Vec<Vec<f32>>,
    ws: Vec<Vec<f32>>,
    bs: Vec<Vec<f32>>,
}

fn model(comm: Box<dyn Communicator>) -> Model {
    let cfg = Config {
        threads: 1,
        inv_update_steps: 1,
        eigen_precision: Precision::F32,
        damping: Schedule::Constant(1e-3),
        ..Config::default()
    };
    let mut p = Preconditioner::with_communicator(cfg, comm).unwrap();
    let ids = SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(o, d))| {
            p.register(
                &format!("l{i}"),
                LayerKind::Linear {
                    in_features: d - 1,
                    out_features: o,
                    bias: true,
                },
            )
            .unwrap()
        })
        .collect();
    Model {
        p,
        ids,
        acts: SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(_, d))| data(BATCH * (d - 1), 10 + i as u64))
            .collect(),
        outs: SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(o, _))| data(BATCH * o, 20 + i as u64))
            .collect(),
        ws: SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(o, d))| data(o * (d - 1), 30 + i as u64))
            .collect(),
        bs: SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(o, _))| data(o, 40 + i as u64))
            .collect(),
    }
}

fn model_step(m: &mut Model) {
    for (k, id) in m.ids.iter().enumerate() {
        let (o, d) = SHAPES[k];
        m.p.observe(
            *id,
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&m.acts[k], BATCH, d - 1),
                output_grads: MatRef::from_row_major_slice(&m.outs[k], BATCH, o),
            },
        )
        .unwrap();
    }
    let mut grads: Vec<LayerGrad<'_>> = m
        .ws
        .iter_mut()
        .zip(m.bs.iter_mut())
        .zip(&m.ids)
        .zip(SHAPES)
        .map(|(((w, b), id), (o, d))| LayerGrad::from_row_major(*id, w, o, d - 1, Some(b)).unwrap())
        .collect();
    black_box(m.p.step(&mut grads).unwrap());
}

/// One group shared by the command channel and the preconditioner.
#[derive(Clone)]
struct Shared(Arc<Mutex<ShmGroup>>);

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut ShmGroup) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
}

impl Communicator for Shared {
    fn rank(&self) -> usize {
        self.with(|g| g.rank())
    }
    fn size(&self) -> usize {
        self.with(|g| g.size())
    }
    fn allreduce_bytes(&mut self, d: &mut [u8], t: ReduceType) -> Result<(), CommError> {
        self.with(|g| g.allreduce_bytes(d, t))
    }
    fn reduce_bytes(&mut self, d: &mut [u8], t: ReduceType, root: usize) -> Result<(), CommError> {
        self.with(|g| g.reduce_bytes(d, t, root))
    }
    fn broadcast_bytes(&mut self, d: &mut [u8], root: usize) -> Result<(), CommError> {
        self.with(|g| g.broadcast_bytes(d, root))
    }
    fn broadcast_discard(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        self.with(|g| g.broadcast_discard(len, root))
    }
    fn allgather_bytes(&mut self, s: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        self.with(|g| g.allgather_bytes(s))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.with(|g| g.barrier())
    }
}

/// The partner process: follows rank 0's commands.
fn partner() {
    let mut g = Shared(Arc::new(Mutex::new(ShmGroup::from_env(opts()).unwrap())));
    let mut buf: Vec<f32> = Vec::new();
    let mut m: Option<Model> = None;
    loop {
        let mut cmd = [0u64; 2];
        command(&mut g, &mut cmd);
        match cmd[0] {
            CMD_ALLREDUCE => {
                buf.resize(cmd[1] as usize, 1.0);
                g.allreduce_f32(&mut buf).unwrap();
            }
            CMD_STEP => model_step(m.get_or_insert_with(|| model(Box::new(g.clone())))),
            _ => return,
        }
    }
}

fn spawn_partner(group: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("KFAC_BENCH_PARTNER", "1")
        .env("KFAC_RANK", "1")
        .env("KFAC_WORLD_SIZE", "2")
        .env("KFAC_GROUP", group)
        .spawn()
        .unwrap()
}

fn bench_allreduce(c: &mut Criterion) {
    let group_name = format!("bench-ar-{}", std::process::id());
    let mut child = spawn_partner(&group_name);
    let mut g = ShmGroup::join(&group_name, 0, 2, opts()).unwrap();
    let mut grp = c.benchmark_group("allreduce_p2");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for mib in [1usize, 4, 16, 64, 256] {
        let n = mib << 18; // f32 values
        let mut buf = vec![1.0f32; n];
        let src = vec![1.0f32; n];
        let mut dst = vec![0.0f32; n];
        grp.throughput(Throughput::Bytes((n * 4) as u64));
        grp.bench_with_input(
            BenchmarkId::new("shm_allreduce", format!("{mib}MiB")),
            &n,
            |b, &n| {
                b.iter(|| {
                    let mut cmd = [CMD_ALLREDUCE, n as u64];
                    command(&mut g, &mut cmd);
                    g.allreduce_f32(&mut buf).unwrap();
                })
            },
        );
        grp.bench_with_input(
            BenchmarkId::new("memcpy", format!("{mib}MiB")),
            &n,
            |b, _| {
                b.iter(|| {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                })
            },
        );
    }
    grp.finish();
    let mut cmd = [CMD_STOP, 0];
    command(&mut g, &mut cmd);
    drop(g);
    let _ = child.wait();
}

fn bench_step(c: &mut Criterion) {
    let mut grp = c.benchmark_group("distributed_step");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    let mut single = model(Box::new(Local::new()));
    grp.bench_function("P1", |b| b.iter(|| model_step(&mut single)));
    drop(single);

    let group_name = format!("bench-step-{}", std::process::id());
    let mut child = spawn_partner(&group_name);
    let mut g = Shared(Arc::new(Mutex::new(
        ShmGroup::join(&group_name, 0, 2, opts()).unwrap(),
    )));
    let mut m = model(Box::new(g.clone()));
    grp.bench_function("P2", |b| {
        b.iter(|| {
            let mut cmd = [CMD_STEP, 0];
            command(&mut g, &mut cmd);
            model_step(&mut m);
        })
    });
    grp.finish();
    let mut cmd = [CMD_STOP, 0];
    command(&mut g, &mut cmd);
    drop(m);
    let _ = child.wait();
}

fn main() {
    if std::env::var("KFAC_BENCH_PARTNER").is_ok() {
        partner();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_allreduce(&mut c);
    bench_step(&mut c);
    c.final_summary();
}
