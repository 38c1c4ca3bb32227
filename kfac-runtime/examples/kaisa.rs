//! Bytes moved and time per stage of a distributed step for gradient-worker
//! fractions f = 1, 1/2 and 1/P (KAISA), on ResNet-50-like layer shapes.
//! Run P ranks with the launcher:
//!
//! ```text
//! cargo build --release -p kfac-runtime --example kaisa --bin kfac-launch
//! target/release/kfac-launch -n 4 -- target/release/examples/kaisa
//! ```
//!
//! Each rank runs, per fraction, one step that inverts and one that does
//! not (`inv_update_steps = 2`); rank 0 prints the payload bytes summed over
//! the ranks (`StepStats::bytes_sent` / `bytes_received`) and the slowest
//! rank's preconditioning time. With f < 1 only the ranks outside a layer's
//! group receive its preconditioned gradient (members keep their own), so
//! the between value moves fewer bytes than f = 1 at an inversion step and
//! each layer is preconditioned by `f P` ranks instead of `P`.

use std::time::Duration;

use faer::MatRef;
use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::Communicator;
use kfac_runtime::{Config, LayerGrad, LayerKind, Observation, Precision, Preconditioner};

/// `(in, out)` with bias: a few ResNet-50 1x1/3x3 shapes, scaled down.
const DIMS: [(usize, usize); 6] = [
    (255, 64),
    (575, 64),
    (255, 128),
    (1151, 128),
    (511, 256),
    (1023, 100),
];
const BATCH: usize = 32;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 - 500.0) / 500.0)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = ShmGroup::from_env(ShmOptions {
        timeout: Duration::from_secs(120),
        slot_bytes: 1 << 20,
    })?;
    let (rank, world) = (group.rank(), group.size());
    let mut comm: Box<dyn Communicator> = Box::new(group);
    if rank == 0 {
        println!("P = {world}, {} layers, batch {BATCH} per rank", DIMS.len());
        println!(
            "{:>6} {:>22} {:>22} {:>22} {:>14}",
            "f",
            "sent MB (invert step)",
            "recv MB (invert step)",
            "recv MB (other step)",
            "precond ms"
        );
    }
    for f in [1.0, 0.5, 1.0 / world as f64] {
        let cfg = Config {
            threads: 1,
            inv_update_steps: 2,
            eigen_precision: Precision::F32,
            grad_worker_fraction: f,
            ..Config::default()
        };
        let mut p = Preconditioner::with_communicator(cfg, comm)?;
        let ids: Vec<_> = DIMS
            .iter()
            .enumerate()
            .map(|(k, &(i, o))| {
                p.register(
                    &format!("l{k}"),
                    LayerKind::Linear {
                        in_features: i,
                        out_features: o,
                        bias: true,
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        let mut rows = Vec::new();
        for s in 0..2 {
            for (k, &(i, o)) in DIMS.iter().enumerate() {
                let a = data(BATCH * i, 10 * k + rank + s);
                let g = data(BATCH * o, 100 * k + rank + s);
                p.observe(
                    ids[k],
                    Observation::Linear {
                        activations: MatRef::from_row_major_slice(&a, BATCH, i),
                        output_grads: MatRef::from_row_major_slice(&g, BATCH, o),
                    },
                )?;
            }
            let mut ws: Vec<Vec<f32>> = DIMS.iter().map(|&(i, o)| data(i * o, 7)).collect();
            let mut bs: Vec<Vec<f32>> = DIMS.iter().map(|&(_, o)| data(o, 8)).collect();
            let mut grads = Vec::new();
            for ((w, b), (&(i, o), id)) in
                ws.iter_mut().zip(bs.iter_mut()).zip(DIMS.iter().zip(&ids))
            {
                grads.push(LayerGrad::from_row_major(*id, w, o, i, Some(b))?);
            }
            let st = p.step(&mut grads)?;
            rows.push([
                st.bytes_sent as f64,
                st.bytes_received as f64,
                st.times.preconditioning.as_secs_f64(),
            ]);
        }
        // Sums (bytes) and maximum (time) over the ranks, on rank 0.
        comm = p.take_communicator();
        let mut v: Vec<f64> = rows.iter().flatten().copied().collect();
        let mine = rows[0][2].max(rows[1][2]);
        comm.allreduce_f64(&mut v)?;
        let (all, _) = comm.allgather_bytes(&mine.to_le_bytes())?;
        let slowest = all
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .fold(0.0, f64::max);
        if rank == 0 {
            println!(
                "{:>6.3} {:>22.3} {:>22.3} {:>22.3} {:>14.2}",
                f,
                v[0] / 1e6,
                v[1] / 1e6,
                v[4] / 1e6,
                slowest * 1e3
            );
        }
    }
    Ok(())
}
