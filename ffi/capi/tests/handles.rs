//! Handle lifetime and threads through the exported C functions: a freed
//! handle's value is refused even when the library has created new
//! handles since (no address reuse); a handle serves one call at a time
//! (`KFAC_ERR_BUSY`, never a race), checked with threads hammering one
//! handle against a single-threaded reference; `kfac_precond_create`
//! leaves the communicator with the caller when it fails; the callback
//! communicator's `timeout_ms` bounds a callback that does not return.

use std::ffi::{c_void, CStr, CString};
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kfac_capi::*;

use KfacStatus::*;

fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the library.
    unsafe { CStr::from_ptr(kfac_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn expect(got: KfacStatus, want: KfacStatus) {
    assert_eq!(got, want, "last error: {}", last_error());
}

fn config() -> KfacConfig {
    // SAFETY: all-zero is a valid KfacConfig, writable for its size.
    let mut c = unsafe { std::mem::zeroed::<KfacConfig>() };
    // SAFETY: as above.
    expect(
        unsafe { kfac_config_default(&mut c, size_of::<KfacConfig>()) },
        KFAC_OK,
    );
    c.threads = 1;
    c
}

/// A preconditioner over `comm` (NULL: single process) with one linear
/// layer `3 -> 2` with bias (id 0).
fn with_linear(comm: *mut KfacComm) -> *mut KfacPrecond {
    let mut p = ptr::null_mut();
    // SAFETY: valid config, `comm` NULL or live, writable output.
    expect(
        unsafe { kfac_precond_create(&config(), comm, &mut p) },
        KFAC_OK,
    );
    let name = CString::new("fc").unwrap();
    let mut id = 9;
    // SAFETY: live handle, NUL-terminated name, writable id.
    expect(
        unsafe { kfac_register_linear(p, name.as_ptr(), 3, 2, 1, &mut id) },
        KFAC_OK,
    );
    p
}

const N: usize = 4;
const A: [f32; N * 3] = [
    0.5, -1.0, 0.25, 1.5, 0.75, -0.5, -0.25, 0.125, 1.0, 0.0, -1.5, 2.0,
];
const G: [f32; N * 2] = [0.1, -0.2, 0.3, 0.05, -0.4, 0.25, 0.2, -0.1];

fn observe(p: usize) -> KfacStatus {
    // SAFETY: `A` holds N x 3 and `G` N x 2 floats; any handle value is
    // checked before use.
    unsafe { kfac_observe_linear(p as *mut _, 0, A.as_ptr(), N, 3, G.as_ptr(), 2) }
}

fn steps(p: usize) -> KfacStatus {
    let mut n = 0u64;
    // SAFETY: writable output; any handle value is checked before use.
    unsafe { kfac_steps(p as *const _, &mut n) }
}

/// The factors of layer 0 (A: 4 x 4 with the bias row, G: 2 x 2).
fn factors(p: usize) -> (KfacStatus, Vec<f32>) {
    let mut out = vec![f32::NAN; 16 + 4];
    let (a, g) = out.split_at_mut(16);
    // SAFETY: `a` holds 4 x 4 and `g` 2 x 2 floats.
    let st = unsafe { kfac_get_factors(p as *const _, 0, a.as_mut_ptr(), 4, g.as_mut_ptr(), 2) };
    (st, out)
}

fn step(p: *mut KfacPrecond) -> KfacStatus {
    let (mut w, mut b) = (vec![0.5f32; 6], vec![0.25f32; 2]);
    let g = KfacGrad {
        layer: 0,
        weight: w.as_mut_ptr(),
        ldw: 3,
        bias: b.as_mut_ptr(),
    };
    // SAFETY: one entry whose buffers hold 2 x 3 and 2 floats.
    unsafe { kfac_step(p, &g, 1, ptr::null_mut()) }
}

fn free(p: *mut KfacPrecond) {
    // SAFETY: any handle value is checked before use.
    expect(unsafe { kfac_precond_free(p) }, KFAC_OK);
}

#[test]
fn a_freed_handle_value_is_refused_while_new_handles_live() {
    let old = with_linear(ptr::null_mut());
    free(old);
    let mut old_comm = ptr::null_mut();
    // SAFETY: writable outputs; every handle passed is checked.
    unsafe {
        expect(kfac_comm_local(&mut old_comm), KFAC_OK);
        expect(kfac_comm_free(old_comm), KFAC_OK);
    }
    // New handles of the same sizes: an allocator hands the freed memory
    // out again at once, so a registry keyed by address would accept the
    // stale values as these new handles.
    let fresh: Vec<_> = (0..32).map(|_| with_linear(ptr::null_mut())).collect();
    let comms: Vec<_> = (0..32)
        .map(|_| {
            let mut c = ptr::null_mut();
            // SAFETY: writable output.
            expect(unsafe { kfac_comm_local(&mut c) }, KFAC_OK);
            c
        })
        .collect();
    assert!(
        !fresh.contains(&old),
        "a freed handle value was given out again"
    );
    assert!(
        !comms.contains(&old_comm),
        "a freed handle value was given out again"
    );
    let (mut r, mut w) = (7u32, 7u32);
    // SAFETY: stale values are refused without a dereference.
    unsafe {
        expect(observe(old as usize), KFAC_ERR_INVALID_HANDLE);
        expect(steps(old as usize), KFAC_ERR_INVALID_HANDLE);
        expect(kfac_precond_free(old), KFAC_ERR_INVALID_HANDLE);
        expect(
            kfac_comm_rank(old_comm, &mut r, &mut w),
            KFAC_ERR_INVALID_HANDLE,
        );
        expect(kfac_comm_free(old_comm), KFAC_ERR_INVALID_HANDLE);
    }
    // Every new handle still works, and is freed exactly once.
    for &p in &fresh {
        expect(observe(p as usize), KFAC_OK);
        expect(step(p), KFAC_OK);
        free(p);
    }
    for &c in &comms {
        // SAFETY: live handles, writable outputs.
        unsafe {
            expect(kfac_comm_rank(c, &mut r, &mut w), KFAC_OK);
            assert_eq!((r, w), (0, 1));
            expect(kfac_comm_free(c), KFAC_OK);
        }
    }
}

#[test]
fn a_failed_create_leaves_the_communicator_with_the_caller() {
    let mut c = ptr::null_mut();
    // SAFETY: writable output.
    expect(unsafe { kfac_comm_local(&mut c) }, KFAC_OK);
    let mut bad = config();
    bad.threads = 100_000; // refused by the configuration's validation
    let mut p = ptr::null_mut();
    let (mut r, mut w) = (7u32, 7u32);
    // SAFETY: valid pointers; `c` is live.
    unsafe {
        expect(
            kfac_precond_create(&bad, c, &mut p),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        assert!(p.is_null());
        // Still the caller's: usable, and takeable by a good create.
        expect(kfac_comm_rank(c, &mut r, &mut w), KFAC_OK);
        assert_eq!((r, w), (0, 1));
        // A failed load leaves it too.
        expect(
            kfac_load([1u8, 2, 3].as_ptr(), 3, c, &mut p),
            KFAC_ERR_CHECKPOINT,
        );
        expect(kfac_comm_rank(c, &mut r, &mut w), KFAC_OK);
    }
    let p = with_linear(c);
    expect(observe(p as usize), KFAC_OK);
    expect(step(p), KFAC_OK);
    free(p);
    // SAFETY: freed exactly once; the second free is refused.
    unsafe {
        expect(kfac_comm_free(c), KFAC_OK);
        expect(kfac_comm_free(c), KFAC_ERR_INVALID_HANDLE);
    }
}

/// Run by [`a_create_that_fails_for_lack_of_resources_leaves_the_communicator`]
/// in a child process of its own (it lowers the address-space limit of
/// the whole process).
#[test]
#[ignore = "run in a child process by a_create_that_fails_for_lack_of_resources_leaves_the_communicator"]
fn child_create_under_an_address_space_limit() {
    let mut c = ptr::null_mut();
    // SAFETY: writable output.
    expect(unsafe { kfac_comm_local(&mut c) }, KFAC_OK);
    let mut cfg = config();
    cfg.threads = 8;
    let vm_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Room for small allocations, not for the pool's 2 MiB thread stacks.
    let low = libc::rlimit {
        rlim_cur: (vm_kib + 1024) * 1024,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut p = ptr::null_mut();
    // SAFETY: valid rlimit structs; valid create arguments.
    let st = unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &low), 0);
        let st = kfac_precond_create(&cfg, c, &mut p);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0);
        st
    };
    assert_ne!(st, KFAC_OK, "the thread pool was built under the limit");
    assert!(p.is_null());
    let (mut r, mut w) = (7u32, 7u32);
    // SAFETY: `c` is live; writable outputs.
    expect(unsafe { kfac_comm_rank(c, &mut r, &mut w) }, KFAC_OK);
    let p = with_linear(c);
    expect(observe(p as usize), KFAC_OK);
    expect(step(p), KFAC_OK);
    free(p);
    // SAFETY: freed exactly once; the second free is refused.
    unsafe {
        expect(kfac_comm_free(c), KFAC_OK);
        expect(kfac_comm_free(c), KFAC_ERR_INVALID_HANDLE);
    }
    println!("child create ok: {st:?}");
}

#[test]
fn a_create_that_fails_for_lack_of_resources_leaves_the_communicator() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_create_under_an_address_space_limit",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("child create ok"), "{text}");
}

#[test]
fn threads_hammering_one_handle_get_ok_or_busy_and_match_a_serial_run() {
    let p = with_linear(ptr::null_mut()) as usize;
    let observed = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (observed, busy) = (Arc::clone(&observed), Arc::clone(&busy));
            std::thread::spawn(move || {
                for i in 0..300 {
                    let st = match (t + i) % 4 {
                        0 | 1 => {
                            let st = observe(p);
                            if st == KFAC_OK {
                                observed.fetch_add(1, Ordering::Relaxed);
                            }
                            st
                        }
                        2 => steps(p),
                        _ => {
                            // No step yet: no factors (KFAC_ERR_STATE).
                            let (st, _) = factors(p);
                            if st == KFAC_ERR_STATE {
                                KFAC_OK
                            } else {
                                st
                            }
                        }
                    };
                    assert!(
                        st == KFAC_OK || st == KFAC_ERR_BUSY,
                        "{st:?}: {}",
                        last_error()
                    );
                    if st == KFAC_ERR_BUSY {
                        busy.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no panic in a hammering thread");
    }
    let k = observed.load(Ordering::Relaxed);
    eprintln!("{k} observations, {} busy", busy.load(Ordering::Relaxed));
    assert!(k > 0);
    expect(step(p as *mut _), KFAC_OK);
    let (st, got) = factors(p);
    expect(st, KFAC_OK);
    assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
    // The same k observations, one thread.
    let q = with_linear(ptr::null_mut());
    for _ in 0..k {
        expect(observe(q as usize), KFAC_OK);
    }
    expect(step(q), KFAC_OK);
    let (st, want) = factors(q as usize);
    expect(st, KFAC_OK);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
    free(q);
    free(p as *mut _);
}

/// A gate the collectives below wait at until it is opened; counts calls.
struct Gate {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
    /// Callbacks that have returned.
    returned: AtomicUsize,
    /// The thread of the last callback.
    thread: Mutex<Option<std::thread::ThreadId>>,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
            returned: AtomicUsize::new(0),
            thread: Mutex::new(None),
        })
    }
    /// Called by a callback: counts the call, waits until open (60 s at
    /// most, so a broken test cannot hang).
    fn pass(&self) {
        *self.thread.lock().unwrap() = Some(std::thread::current().id());
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        self.cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.1 && Instant::now() < deadline {
            s = self.cv.wait_timeout(s, Duration::from_secs(1)).unwrap().0;
        }
    }
    fn calls(&self) -> usize {
        self.state.lock().unwrap().0
    }
    /// Waits until `n` calls have entered the gate.
    fn wait_calls(&self, n: usize) {
        let mut s = self.state.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.0 < n {
            assert!(Instant::now() < deadline, "no callback was called");
            s = self.cv.wait_timeout(s, Duration::from_secs(1)).unwrap().0;
        }
    }
    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// # Safety
/// `u` is a live `Gate`; `buf` holds `count` floats of `dtype`.
unsafe extern "C" fn gated_allreduce(
    u: *mut c_void,
    buf: *mut c_void,
    count: usize,
    dtype: KfacDtype,
) -> i32 {
    // SAFETY: the contract above.
    let gate = unsafe { &*u.cast::<Gate>() };
    gate.pass();
    // The other (imaginary) rank adds 1 to every element: written late
    // after a timeout, this must land in the library's buffer only.
    for i in 0..count {
        // SAFETY: `count` elements of `dtype`, aligned.
        unsafe {
            match dtype {
                KfacDtype::KFAC_DTYPE_F32 => *buf.cast::<f32>().add(i) += 1.0,
                KfacDtype::KFAC_DTYPE_F64 => *buf.cast::<f64>().add(i) += 1.0,
            }
        }
    }
    gate.returned.fetch_add(1, Ordering::SeqCst);
    0
}

/// # Safety
/// `u` is a live `Gate`.
unsafe extern "C" fn gated_broadcast(u: *mut c_void, _: *mut c_void, _: usize, _: u32) -> i32 {
    // SAFETY: the contract above.
    let gate = unsafe { &*u.cast::<Gate>() };
    gate.pass();
    gate.returned.fetch_add(1, Ordering::SeqCst);
    0
}

/// # Safety
/// `u` is a live `Gate`; `send` `bytes`, `recv` `2 * bytes` bytes.
unsafe extern "C" fn gated_allgather(
    u: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    bytes: usize,
) -> i32 {
    // SAFETY: the contract above.
    let gate = unsafe { &*u.cast::<Gate>() };
    gate.pass();
    for r in 0..2 {
        // SAFETY: `recv` holds two slots of `bytes`.
        unsafe {
            ptr::copy_nonoverlapping(send.cast::<u8>(), recv.cast::<u8>().add(r * bytes), bytes)
        };
    }
    gate.returned.fetch_add(1, Ordering::SeqCst);
    0
}

/// # Safety
/// `u` is a live `Gate`.
unsafe extern "C" fn gated_barrier(u: *mut c_void) -> i32 {
    // SAFETY: the contract above.
    let gate = unsafe { &*u.cast::<Gate>() };
    gate.pass();
    gate.returned.fetch_add(1, Ordering::SeqCst);
    0
}

/// Rank 0 of 2 over the gated callbacks.
fn gated_comm(gate: &Arc<Gate>, timeout_ms: u64) -> *mut KfacComm {
    gated_comm_sized(gate, timeout_ms, size_of::<KfacCollectives>())
}

/// As [`gated_comm`], passed with `struct_size` `size`.
fn gated_comm_sized(gate: &Arc<Gate>, timeout_ms: u64, size: usize) -> *mut KfacComm {
    // SAFETY: all-zero is valid; `kfac_collectives_init` writes its size.
    let mut c = unsafe { std::mem::zeroed::<KfacCollectives>() };
    // SAFETY: writable for its size.
    expect(
        unsafe { kfac_collectives_init(&mut c, size_of::<KfacCollectives>()) },
        KFAC_OK,
    );
    c.user_data = Arc::as_ptr(gate).cast_mut().cast();
    c.rank = 0;
    c.world_size = 2;
    c.allreduce = Some(gated_allreduce);
    c.broadcast = Some(gated_broadcast);
    c.allgather = Some(gated_allgather);
    c.barrier = Some(gated_barrier);
    c.timeout_ms = timeout_ms;
    c.struct_size = size;
    let mut h = ptr::null_mut();
    // SAFETY: valid struct and output; `gate` outlives every callback.
    expect(unsafe { kfac_comm_from_callbacks(&c, &mut h) }, KFAC_OK);
    h
}

/// Averages `w` (2 x 3) and `b` (2) over the two "ranks".
fn allreduce_grads(p: usize, w: &mut [f32; 6], b: &mut [f32; 2]) -> KfacStatus {
    let g = KfacGrad {
        layer: 0,
        weight: w.as_mut_ptr(),
        ldw: 3,
        bias: b.as_mut_ptr(),
    };
    // SAFETY: one entry whose buffers hold 2 x 3 and 2 floats.
    unsafe { kfac_allreduce_gradients(p as *mut _, &g, 1) }
}

#[test]
fn a_handle_in_use_by_another_thread_is_busy_then_usable() {
    let gate = Gate::new();
    let comm = gated_comm(&gate, 0);
    let p = with_linear(comm) as usize;
    // Another thread is inside a call on `p` (held at the gate).
    let t = std::thread::spawn(move || {
        let (mut w, mut b) = ([1.0f32; 6], [2.0f32; 2]);
        (allreduce_grads(p, &mut w, &mut b), w, b)
    });
    gate.wait_calls(1);
    let mut n = 0usize;
    // SAFETY: any handle value is checked before use.
    unsafe {
        expect(kfac_num_layers(p as *const _, &mut n), KFAC_ERR_BUSY);
        expect(kfac_precond_free(p as *mut _), KFAC_ERR_BUSY);
    }
    expect(steps(p), KFAC_ERR_BUSY);
    expect(observe(p), KFAC_ERR_BUSY);
    gate.open();
    let (st, w, b) = t.join().unwrap();
    expect(st, KFAC_OK);
    // (x + 1) / 2 with the imaginary rank's 1 added.
    assert_eq!((w, b), ([1.0; 6], [1.5; 2]));
    // SAFETY: as above.
    unsafe {
        expect(kfac_num_layers(p as *const _, &mut n), KFAC_OK);
        assert_eq!(n, 1);
        expect(kfac_precond_free(p as *mut _), KFAC_OK);
        expect(kfac_comm_free(comm), KFAC_OK);
    }
}

#[test]
fn a_callback_that_does_not_return_times_out_and_fails_the_communicator() {
    let gate = Gate::new();
    let comm = gated_comm(&gate, 300);
    let p = with_linear(comm) as usize;
    let (mut w, mut b) = ([1.0f32; 6], [2.0f32; 2]);
    let t0 = Instant::now();
    expect(allreduce_grads(p, &mut w, &mut b), KFAC_ERR_COMM);
    let waited = t0.elapsed();
    assert!(last_error().contains("timeout_ms"), "{}", last_error());
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    let calls = gate.calls();
    assert_eq!(calls, 1);
    // Failed for good: the next collective fails without calling back.
    expect(allreduce_grads(p, &mut w, &mut b), KFAC_ERR_COMM);
    assert!(last_error().contains("failed"), "{}", last_error());
    assert_eq!(gate.calls(), calls);
    // The handle itself is fine (not busy, not poisoned).
    expect(steps(p), KFAC_OK);
    // Free while the callback is still inside: nothing waits for it.
    free(p as *mut _);
    // SAFETY: a live handle.
    expect(unsafe { kfac_comm_free(comm) }, KFAC_OK);
    // The late callback returns and writes into the library's buffer,
    // never into the caller's gradients.
    gate.open();
    let deadline = Instant::now() + Duration::from_secs(60);
    while gate.returned.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "the callback never returned");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!((w, b), ([1.0; 6], [2.0; 2]));
    // `gate` (the user_data) outlives the callback: it returned.
}

#[test]
fn a_bounded_callback_communicator_averages_like_an_unbounded_one() {
    let gate = Gate::new();
    gate.open();
    let full = size_of::<KfacCollectives>();
    // The layout before `timeout_ms` (its last 8 bytes): unbounded, so the
    // 60 s written there is not read.
    let older = full - size_of::<u64>();
    for (timeout_ms, size, own_thread) in [
        (0, full, false),
        (60_000, full, true),
        (60_000, older, false),
    ] {
        let comm = gated_comm_sized(&gate, timeout_ms, size);
        let p = with_linear(comm) as usize;
        let (mut w, mut b) = ([1.0f32; 6], [2.0f32; 2]);
        expect(allreduce_grads(p, &mut w, &mut b), KFAC_OK);
        assert_eq!((w, b), ([1.0; 6], [1.5; 2]), "timeout_ms {timeout_ms}");
        // Bounded: the callbacks run on the communicator's own thread;
        // unbounded: on the caller's.
        let on = gate.thread.lock().unwrap().expect("a callback ran");
        assert_eq!(
            on != std::thread::current().id(),
            own_thread,
            "{timeout_ms} {size}"
        );
        free(p as *mut _);
        // SAFETY: a live handle.
        expect(unsafe { kfac_comm_free(comm) }, KFAC_OK);
    }
}
