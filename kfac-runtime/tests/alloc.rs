//! Steady-state steps allocate no kernel scratch: every kernel's scratch
//! is sized once (per layer at registration, per pool thread at the first
//! inversion) and reused. What a step may allocate is its results, held
//! until the commit: the new factors of a factor update (`4 (d_A² + d_G²)`
//! bytes per layer), the layer's gradient gathered with its bias and the
//! preconditioned gradient (`2 · 4 d_out d_A` per layer), and `O(L)`
//! bookkeeping. Measured with a counting global allocator over all threads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use faer::MatRef;
use kfac_runtime::{Config, LayerGrad, LayerKind, Observation, Preconditioner};

struct Counting;

static BYTES: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn counters() -> (u64, u64) {
    (BYTES.load(Ordering::SeqCst), COUNT.load(Ordering::SeqCst))
}

const N: usize = 64;
/// (in, out), with bias: d_A = in + 1.
const DIMS: [(usize, usize); 2] = [(255, 192), (127, 64)];

#[test]
fn steady_state_steps_allocate_only_their_results() {
    for precompute in [false, true] {
        let mut p = Preconditioner::new(Config {
            threads: 2,
            inv_update_steps: 1000,
            precompute_denominators: precompute,
            ..Config::default()
        })
        .unwrap();
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
                .unwrap()
            })
            .collect();
        let acts: Vec<Vec<f32>> = DIMS
            .iter()
            .map(|&(i, _)| {
                (0..N * i)
                    .map(|x| ((x * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect()
            })
            .collect();
        let outs: Vec<Vec<f32>> = DIMS
            .iter()
            .map(|&(_, o)| {
                (0..N * o)
                    .map(|x| ((x * 13 % 97) as f32 - 48.0) / 480.0)
                    .collect()
            })
            .collect();
        let mut ws: Vec<Vec<f32>> = DIMS.iter().map(|&(i, o)| vec![0.01; i * o]).collect();
        let mut bs: Vec<Vec<f32>> = DIMS.iter().map(|&(_, o)| vec![0.02; o]).collect();
        let mut run = |p: &mut Preconditioner| -> ((u64, u64), (u64, u64)) {
            let c0 = counters();
            for (k, &(i, o)) in DIMS.iter().enumerate() {
                p.observe(
                    ids[k],
                    Observation::Linear {
                        activations: MatRef::from_row_major_slice(&acts[k], N, i),
                        output_grads: MatRef::from_row_major_slice(&outs[k], N, o),
                    },
                )
                .unwrap();
            }
            let c1 = counters();
            let mut grads: Vec<LayerGrad<'_>> = Vec::new();
            for ((w, b), (&(i, o), id)) in
                ws.iter_mut().zip(bs.iter_mut()).zip(DIMS.iter().zip(&ids))
            {
                grads.push(LayerGrad::from_row_major(*id, w, o, i, Some(b)).unwrap());
            }
            let c2 = counters();
            p.step(&mut grads).unwrap();
            let c3 = counters();
            ((c1.0 - c0.0, c1.1 - c0.1), (c3.0 - c2.0, c3.1 - c2.1))
        };
        // Warm-up: the first step inverts (scratch grows once); the next
        // ones settle every lazily grown buffer.
        for _ in 0..3 {
            run(&mut p);
        }
        let results: u64 = DIMS
            .iter()
            .map(|&(i, o)| 4 * ((i + 1) * (i + 1) + o * o) + 2 * 4 * o * (i + 1))
            .map(|b| b as u64)
            .sum();
        let bound = results + 16 * 1024;
        // The smallest kernel scratch a per-call allocation would add: the
        // eigen preconditioning temporary of the larger layer.
        let scratch = 4 * (DIMS[0].1 * (DIMS[0].0 + 1)) as u64;
        assert!(bound - results < scratch, "the bound must be able to fail");
        for s in 0..3 {
            let ((ob, oc), (sb, sc)) = run(&mut p);
            println!("precompute {precompute} step {s}: observe {ob} B in {oc}, step {sb} B in {sc} (bound {bound})");
            assert_eq!((ob, oc), (0, 0), "observe allocated in steady state");
            assert!(sb <= bound, "step allocated {sb} bytes > bound {bound}");
            assert!(sc <= 64, "step made {sc} allocations");
        }
    }
}
