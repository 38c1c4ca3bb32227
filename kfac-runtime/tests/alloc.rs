//! Steady-state steps keep no new memory and allocate no kernel scratch
//! of their own: every kernel's scratch is sized once (per layer at
//! registration, per pool thread at the first inversion) and reused. What
//! a step may hold at once beyond that is its results, kept until the
//! commit: the new factors of a factor update (`4 (d_A² + d_G²)` bytes per
//! layer), the layer's gradient gathered with its bias and the
//! preconditioned gradient (`2 · 4 d_out d_A` per layer), `O(L)`
//! bookkeeping, and the packing buffers of the matrix multiply underneath
//! (the `gemm` crate allocates them per call and frees them on return: at
//! most `kc x (n + threads x mc)` elements with `kc <= 512`; see
//! `kfac-runtime/src/mem.rs`). Measured with a counting global allocator
//! over all threads: bytes live after a call (must not grow) and the peak
//! of bytes live during it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use faer::MatRef;
use kfac_runtime::{Config, LayerGrad, LayerKind, Observation, Preconditioner};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn grow(by: i64) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        grow(-(layout.size() as i64));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grow(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Starts a measurement: the bytes live now (the peak restarts from them).
fn start() -> i64 {
    let now = LIVE.load(Ordering::SeqCst);
    PEAK.store(now, Ordering::SeqCst);
    now
}

/// Ends a measurement begun at `base`: (bytes kept, peak bytes above
/// `base`).
fn end(base: i64) -> (i64, i64) {
    (
        LIVE.load(Ordering::SeqCst) - base,
        PEAK.load(Ordering::SeqCst) - base,
    )
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
        let mut run = |p: &mut Preconditioner| -> ((i64, i64), (i64, i64)) {
            let c0 = start();
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
            let observed = end(c0);
            let mut grads: Vec<LayerGrad<'_>> = Vec::new();
            for ((w, b), (&(i, o), id)) in
                ws.iter_mut().zip(bs.iter_mut()).zip(DIMS.iter().zip(&ids))
            {
                grads.push(LayerGrad::from_row_major(*id, w, o, i, Some(b)).unwrap());
            }
            let c2 = start();
            p.step(&mut grads).unwrap();
            (observed, end(c2))
        };
        // Warm-up: the first step inverts (scratch grows once); the next
        // ones settle every lazily grown buffer.
        for _ in 0..3 {
            run(&mut p);
        }
        let results: i64 = DIMS
            .iter()
            .map(|&(i, o)| 4 * ((i + 1) * (i + 1) + o * o) + 2 * 4 * o * (i + 1))
            .map(|b| b as i64)
            .sum();
        // The multiply's packing buffers (per call, freed on return) and
        // O(L) bookkeeping: the step's products here are at most
        // 192 x 256 x 256, whose packed operands take well under 256 KiB.
        let packing = 256 * 1024;
        let bound = results + packing;
        for s in 0..3 {
            let ((ok, opeak), (sk, speak)) = run(&mut p);
            println!(
                "precompute {precompute} step {s}: observe keeps {ok} B (peak {opeak} B), \
                 step keeps {sk} B (peak {speak} B, bound {bound})"
            );
            assert_eq!(ok, 0, "observe kept memory in steady state");
            assert!(
                opeak <= packing,
                "observe peaked at {opeak} B > packing {packing}"
            );
            assert_eq!(sk, 0, "the step kept memory in steady state");
            assert!(
                speak <= bound,
                "the step peaked at {speak} B > bound {bound}"
            );
        }
    }
}
