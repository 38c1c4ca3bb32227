//! The MPI test program: run by `tests/mpi.rs` under `mpirun` (it needs
//! the `mpi` feature, which a plain `cargo test` does not enable, so the
//! test builds it with a nested `cargo build --features mpi`).
//!
//! ```text
//! mpirun -np P mpi_check <collectives|kfac|abort-exit|abort-panic|stuck>
//!        [--hier] [--node-id-mod K] [--segment-bytes N] [--timeout-secs S]
//! ```
//!
//! * `collectives`: every collective against values computed here with
//!   plain loops (sums folded in the order the communicator promises);
//!   prints `collectives ok` on every rank.
//! * `kfac`: the distributed K-FAC run of `tests/distributed.rs` on a shard
//!   per rank; every rank prints `hash <fnv of its result>`, rank 0 checks
//!   it against the single-process run and prints `values <f32 bits>`;
//!   prints `kfac ok` on every rank.
//! * `abort-exit` / `abort-panic`: the last rank exits (status 3) or
//!   panics while the others wait in a collective; the job must end with a
//!   non-zero status instead of hanging.
//! * `stuck`: the last rank sleeps instead of joining a collective; the
//!   others must report `CommError::Timeout` after `--timeout-secs`.
//!
//! `--hier` uses [`HierComm`] (nodes from `KFAC_NODE_SIZE`, or rank mod K
//! with `--node-id-mod K`), otherwise [`MpiComm`].
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::dist::{compare_with_single_process, config, fnv, run, N};
use kfac_runtime::comm::hier::{HierComm, HierOptions, NodeSplit, NODE_SIZE_VAR};
use kfac_runtime::comm::mpi::{MpiComm, MpiOptions};
use kfac_runtime::comm::shm::ShmOptions;
use kfac_runtime::comm::{as_bytes_mut, CommError, Communicator, ReduceType};
use kfac_runtime::Preconditioner;

struct Args {
    mode: String,
    hier: bool,
    node_id_mod: Option<u32>,
    segment_bytes: usize,
    timeout: Duration,
}

fn args() -> Args {
    let mut a = Args {
        mode: String::new(),
        hier: false,
        node_id_mod: None,
        segment_bytes: 256,
        timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--hier" => a.hier = true,
            "--node-id-mod" => {
                a.node_id_mod = Some(it.next().and_then(|v| v.parse().ok()).expect("K"))
            }
            "--segment-bytes" => {
                a.segment_bytes = it.next().and_then(|v| v.parse().ok()).expect("N")
            }
            "--timeout-secs" => {
                a.timeout =
                    Duration::from_secs(it.next().and_then(|v| v.parse().ok()).expect("secs"))
            }
            m => a.mode = m.to_string(),
        }
    }
    a
}

/// World ranks of each node in the order the communicator sums them
/// (computed here from the same rules, independently of `HierComm`).
fn groups(a: &Args, size: usize) -> Vec<Vec<usize>> {
    if !a.hier {
        return vec![(0..size).collect()];
    }
    let key = |r: usize| -> usize {
        match (a.node_id_mod, std::env::var(NODE_SIZE_VAR).ok()) {
            (Some(k), _) => r % k as usize,
            (None, Some(k)) => r / k.parse::<usize>().expect("KFAC_NODE_SIZE"),
            (None, None) => 0, // one machine
        }
    };
    let mut g: Vec<(usize, Vec<usize>)> = Vec::new();
    for r in 0..size {
        match g.iter_mut().find(|(k, _)| *k == key(r)) {
            Some((_, m)) => m.push(r),
            None => g.push((key(r), vec![r])),
        }
    }
    g.into_iter().map(|(_, m)| m).collect()
}

/// A value that makes float sums order-dependent: mantissa and exponent
/// both vary with the rank and the index.
fn val(r: usize, i: usize) -> f64 {
    let mut h = (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    let m = (h % 2001) as f64 - 1000.0;
    let e = ((h >> 16) % 24) as i32 - 12;
    m * 2f64.powi(e) + 0.1
}

/// The sum the communicator promises: within each node in rank order, then
/// the node sums in node order (a single node, or one rank per node, is
/// plain rank order).
fn expected<T: Copy + std::ops::Add<Output = T>>(g: &[Vec<usize>], x: impl Fn(usize) -> T) -> T {
    let flat = g.len() == 1 || g.iter().all(|m| m.len() == 1);
    let fold = |ranks: &mut dyn Iterator<Item = usize>| {
        let first = ranks.next().expect("a rank");
        ranks.fold(x(first), |a, r| a + x(r))
    };
    if flat {
        let mut all: Vec<usize> = g.iter().flatten().copied().collect();
        all.sort();
        return fold(&mut all.into_iter());
    }
    let sums: Vec<T> = g.iter().map(|m| fold(&mut m.iter().copied())).collect();
    sums[1..].iter().fold(sums[0], |a, &s| a + s)
}

fn make(a: &Args) -> Result<Box<dyn Communicator>, CommError> {
    let mpi = MpiOptions {
        timeout: a.timeout,
        segment_bytes: a.segment_bytes,
    };
    if a.hier {
        let split = match a.node_id_mod {
            Some(k) => {
                let r = MpiComm::world(mpi)?.rank();
                NodeSplit::NodeId(r as u32 % k)
            }
            None => NodeSplit::Auto,
        };
        let opts = HierOptions {
            mpi,
            shm: ShmOptions {
                timeout: a.timeout,
                slot_bytes: a.segment_bytes.max(64) / 64 * 64,
            },
            split,
        };
        Ok(Box::new(HierComm::world(opts)?))
    } else {
        Ok(Box::new(MpiComm::world(mpi)?))
    }
}

fn main() {
    let _universe = kfac_runtime::comm::mpi::init().expect("MPI init");
    // A panic must not unwind into MPI_Finalize while the other ranks wait
    // in a collective: abort the whole job instead.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        kfac_runtime::comm::mpi::abort_world(101);
    }));
    let a = args();
    let mut c = make(&a).expect("communicator");
    match a.mode.as_str() {
        "collectives" => collectives(&a, c.as_mut()),
        "kfac" => kfac(c),
        "abort-exit" | "abort-panic" => {
            let (me, p) = (c.rank(), c.size());
            let mut v = vec![1.0f32; 64];
            c.allreduce_f32(&mut v).expect("first allreduce");
            if me == p - 1 {
                if a.mode == "abort-exit" {
                    eprintln!("rank {me}: exiting early on purpose");
                    std::process::exit(3);
                }
                panic!("rank {me}: panicking on purpose");
            }
            for _ in 0..1000 {
                if let Err(e) = c.allreduce_f32(&mut v) {
                    println!("rank {me}: error as expected: {e}");
                    std::process::exit(4);
                }
            }
            println!("rank {me}: the collectives went on without rank {}", p - 1);
        }
        "stuck" => {
            // The last rank is alive but does not come: the others' wait is
            // bounded by the timeout. Pending MPI operations forbid a clean
            // MPI_Finalize, so everyone leaves with exit().
            let (me, p) = (c.rank(), c.size());
            if me == p - 1 {
                std::thread::sleep(a.timeout * 4);
                std::process::exit(6);
            }
            let mut v = vec![1.0f32; 64];
            match c.allreduce_f32(&mut v) {
                Err(e @ CommError::Timeout { .. }) => {
                    println!("rank {me}: timed out as expected: {e}");
                    std::process::exit(5);
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        m => panic!("unknown mode {m:?}"),
    }
}

fn collectives(a: &Args, c: &mut dyn Communicator) {
    let (me, p) = (c.rank(), c.size());
    let g = groups(a, p);
    let seg = a.segment_bytes;
    // allreduce, f32 and f64, lengths around the block and segment sizes
    for n in [
        0,
        1,
        3,
        p.saturating_sub(1),
        7 * p + 1,
        1000,
        seg / 4 * 3 + 5,
    ] {
        let mut v: Vec<f32> = (0..n).map(|i| val(me, i) as f32).collect();
        c.allreduce_f32(&mut v).expect("allreduce f32");
        for (i, x) in v.iter().enumerate() {
            let want = expected(&g, |r| val(r, i) as f32);
            assert_eq!(x.to_bits(), want.to_bits(), "allreduce f32 n={n} i={i}");
        }
        let mut v: Vec<f64> = (0..n).map(|i| val(me, i + 7)).collect();
        c.allreduce_f64(&mut v).expect("allreduce f64");
        for (i, x) in v.iter().enumerate() {
            let want = expected(&g, |r| val(r, i + 7));
            assert_eq!(x.to_bits(), want.to_bits(), "allreduce f64 n={n} i={i}");
        }
    }
    // unaligned bytes
    let n = 101;
    let mut raw = vec![0u8; n * 4 + 1];
    for i in 0..n {
        raw[1 + 4 * i..5 + 4 * i].copy_from_slice(&(val(me, i) as f32).to_ne_bytes());
    }
    c.allreduce_bytes(&mut raw[1..], ReduceType::F32)
        .expect("unaligned allreduce");
    for i in 0..n {
        let mut b = [0u8; 4];
        b.copy_from_slice(&raw[1 + 4 * i..5 + 4 * i]);
        let want = expected(&g, |r| val(r, i) as f32);
        assert_eq!(
            f32::from_ne_bytes(b).to_bits(),
            want.to_bits(),
            "unaligned i={i}"
        );
    }
    // reduce to every root; the others keep their data
    for root in 0..p {
        let n = seg / 4 + 3;
        let mine: Vec<f32> = (0..n).map(|i| val(me, i + root) as f32).collect();
        let mut v = mine.clone();
        c.reduce_f32(&mut v, root).expect("reduce");
        for (i, x) in v.iter().enumerate() {
            let want = if me == root {
                expected(&g, |r| val(r, i + root) as f32)
            } else {
                mine[i]
            };
            assert_eq!(x.to_bits(), want.to_bits(), "reduce root={root} i={i}");
        }
        let mut v: Vec<f64> = (0..n).map(|i| val(me, i)).collect();
        c.reduce_bytes(as_bytes_mut(&mut v), ReduceType::F64, root)
            .expect("reduce f64");
        if me == root {
            for (i, x) in v.iter().enumerate() {
                assert_eq!(x.to_bits(), expected(&g, |r| val(r, i)).to_bits());
            }
        }
    }
    // broadcast (and broadcast_discard) from every root
    let pattern = |root: usize, i: usize| ((root * 131 + i * 7) % 251) as u8;
    for root in 0..p {
        for n in [0, 5, 2 * seg + 3] {
            let mut v: Vec<u8> = if me == root {
                (0..n).map(|i| pattern(root, i)).collect()
            } else {
                vec![0xEE; n]
            };
            c.broadcast_bytes(&mut v, root).expect("broadcast");
            assert!(
                v.iter().enumerate().all(|(i, &b)| b == pattern(root, i)),
                "broadcast root={root} n={n}"
            );
            if me == root {
                c.broadcast_bytes(&mut v, root).expect("broadcast (root)");
            } else {
                c.broadcast_discard(n, root).expect("broadcast_discard");
            }
        }
    }
    // allgather with different sizes, one rank above several segments
    let len = |r: usize| (r * 37 + 5) % 23 + if r == 1 { 2 * seg + 7 } else { 0 };
    let byte = |r: usize, i: usize| ((r * 31 + i) % 251) as u8;
    let send: Vec<u8> = (0..len(me)).map(|i| byte(me, i)).collect();
    let (all, sizes) = c.allgather_bytes(&send).expect("allgather");
    let want: Vec<u8> = (0..p)
        .flat_map(|r| (0..len(r)).map(move |i| byte(r, i)))
        .collect();
    assert_eq!(
        sizes,
        (0..p).map(len).collect::<Vec<_>>(),
        "allgather sizes"
    );
    assert!(all == want, "allgather data");
    let (all, sizes) = c.allgather_bytes(&[]).expect("empty allgather");
    assert!(all.is_empty() && sizes == vec![0; p]);
    c.barrier().expect("barrier");
    // bad arguments: the same error on every rank, the communicator stays
    // usable
    let e = c.broadcast_bytes(&mut [0u8; 4], p).unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
    let e = c
        .allreduce_bytes(&mut [0u8; 6], ReduceType::F32)
        .unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
    if !a.hier {
        // Different lengths on different ranks (flat MPI compares
        // descriptors; the hierarchical one may only time out).
        let mut v = vec![1.0f32; if me == 0 { 4 } else { 8 }];
        let e = c.allreduce_f32(&mut v).unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
        if p > 1 {
            let e = c.broadcast_discard(4, me).unwrap_err();
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            // Only rank 0's arguments are invalid (6 bytes is not a whole
            // number of f32): it still takes part in the descriptor
            // exchange, so every rank fails together and the communicator
            // stays in step (checked by the allreduce below).
            let mut b = vec![0u8; if me == 0 { 6 } else { 8 }];
            let e = c.allreduce_bytes(&mut b, ReduceType::F32).unwrap_err();
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            // Only rank 1 is the root and discards.
            let e = c.broadcast_discard(4, 1).unwrap_err();
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
        }
    }
    let mut v = vec![1.0f32; 5];
    c.allreduce_f32(&mut v).expect("allreduce after errors");
    assert!(v.iter().all(|&x| x == p as f32));
    println!("collectives ok");
}

fn kfac(c: Box<dyn Communicator>) {
    let (rank, world) = (c.rank(), c.size());
    let mut p = Preconditioner::with_communicator(config(), c).expect("preconditioner");
    let per = N / world;
    let got = run(&mut p, rank * per..(rank + 1) * per).expect("distributed run");
    println!("hash {:016x}", fnv(&got));
    if rank == 0 {
        let (worst, tol) = compare_with_single_process(&got, world);
        println!("maxrel {worst:.3e} tol {tol:.3e}");
        let bits: Vec<String> = got
            .iter()
            .flatten()
            .map(|x| format!("{:08x}", x.to_bits()))
            .collect();
        println!("values {}", bits.join(","));
        assert!(
            worst <= tol,
            "distributed differs from single-process: {worst:.3e} > {tol:.3e}"
        );
    }
    println!("kfac ok");
}
