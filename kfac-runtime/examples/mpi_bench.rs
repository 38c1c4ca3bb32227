//! Allreduce bandwidth under `mpirun`: our [`MpiComm`] beside a plain
//! `MPI_Allreduce` (rsmpi's `all_reduce_into`, `MPI_SUM`) on the same
//! buffer sizes in the same run, and the hierarchical communicator beside
//! the shared-memory group alone (all ranks on this machine: one node).
//!
//! ```text
//! cargo build --release -p kfac-runtime --features mpi --example mpi_bench
//! mpirun -np 2 target/release/examples/mpi_bench [--reps R] [--segment-kib K]
//! ```
//!
//! Each cell is the payload (f32 buffer of the given size) divided by the
//! median time of `R` timed calls (after 2 warm-up calls), in GiB/s; every
//! timed call starts after a barrier. Rank 0 prints the table.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use kfac_runtime::comm::hier::{HierComm, HierOptions, NodeSplit};
use kfac_runtime::comm::mpi::{MpiComm, MpiOptions};
use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::Communicator;
use mpi::collective::SystemOperation;
use mpi::traits::CommunicatorCollectives;

const SIZES_MIB: [usize; 4] = [1, 4, 16, 64];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `reps` calls of `f`, each after a barrier.
fn time(reps: usize, sync: &mut dyn FnMut(), mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        sync();
        f();
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync();
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    median(t)
}

fn main() {
    let universe = kfac_runtime::comm::mpi::init()
        .expect("MPI init")
        .expect("this program initializes MPI itself");
    let reps: usize = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let segment_kib: usize = std::env::args()
        .skip_while(|a| a != "--segment-kib")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(MpiOptions::default().segment_bytes >> 10);
    let world = universe.world();
    let mpi_opts = MpiOptions {
        segment_bytes: segment_kib << 10,
        ..MpiOptions::default()
    };
    let mut ours = MpiComm::world(mpi_opts).expect("MpiComm");
    let (rank, size) = (ours.rank(), ours.size());
    let shm_opts = ShmOptions {
        timeout: Duration::from_secs(120),
        ..ShmOptions::default()
    };
    // The shared-memory group alone: rank 0 names it, MPI spreads the name.
    let mut name = [0u8; 64];
    if rank == 0 {
        let n = format!("bench-{}", std::process::id());
        name[..n.len()].copy_from_slice(n.as_bytes());
    }
    ours.broadcast_bytes(&mut name, 0).expect("name");
    let name = String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_string();
    let mut shm = ShmGroup::join(&name, rank, size, shm_opts).expect("ShmGroup");
    let mut hier = HierComm::world(HierOptions {
        mpi: mpi_opts,
        shm: shm_opts,
        split: NodeSplit::Shared,
    })
    .expect("HierComm");

    let mut rows = Vec::new();
    for mib in SIZES_MIB {
        let n = (mib << 20) / 4;
        let send: Vec<f32> = (0..n)
            .map(|i| (i % 1000) as f32 * 1e-3 + rank as f32)
            .collect();
        let mut recv = vec![0f32; n];
        let mut buf = send.clone();
        let mut sync = || world.barrier();
        let t_mpi = time(reps, &mut sync, || {
            world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum())
        });
        let t_ours = time(reps, &mut sync, || {
            buf.copy_from_slice(&send);
            ours.allreduce_f32(&mut buf).expect("MpiComm allreduce");
        });
        // The copy above is part of the timed call; time it alone and
        // take it out, so the column is the allreduce only.
        let t_copy = time(reps, &mut sync, || buf.copy_from_slice(&send));
        let t_shm = time(reps, &mut sync, || {
            buf.copy_from_slice(&send);
            shm.allreduce_f32(&mut buf).expect("ShmGroup allreduce");
        });
        let t_hier = time(reps, &mut sync, || {
            buf.copy_from_slice(&send);
            hier.allreduce_f32(&mut buf).expect("HierComm allreduce");
        });
        let gib = |t: f64| (mib as f64 / 1024.0) / (t - t_copy).max(1e-9);
        rows.push(format!(
            "{mib:>5}  {:>16.2}  {:>14.2}  {:>14.2}  {:>14.2}",
            gib(t_mpi + t_copy),
            gib(t_ours),
            gib(t_shm),
            gib(t_hier)
        ));
    }
    if rank == 0 {
        println!(
            "allreduce (f32 sum), {size} ranks on {} node(s), median of {reps}, GiB/s of payload; MpiComm segments of {segment_kib} KiB",
            hier.nodes()
        );
        println!("  MiB  MPI_Allreduce(sum)  MpiComm (ours)  ShmGroup alone  HierComm (ours)");
        for r in rows {
            println!("{r}");
        }
    }
}
