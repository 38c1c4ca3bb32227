//! Every status the header documents is produced by the C functions for the
//! documented cause (each test triggers it through the exported `kfac_*`
//! functions and checks the status, that a message was set, and that the
//! handle still works afterwards); `kfac_status_string` names every status;
//! the configuration presets convert to exactly the Rust presets; and the
//! `struct_size` rules of the extensible structs hold.

use std::ffi::{c_void, CStr, CString};
use std::mem::size_of;
use std::ptr;

use kfac_capi::*;
use kfac_runtime::Config;

use KfacStatus::*;

fn last_error() -> String {
    // SAFETY: kfac_last_error returns a NUL-terminated string owned by the
    // library, valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(kfac_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `got == want` and that a message was recorded.
#[track_caller]
fn expect(got: KfacStatus, want: KfacStatus) {
    assert_eq!(got, want, "last error: {}", last_error());
    if want != KFAC_OK {
        assert!(!last_error().is_empty(), "{want:?} without a message");
    }
}

fn config() -> KfacConfig {
    // SAFETY: all-zero is a valid KfacConfig; the pointer is writable for
    // `size_of::<KfacConfig>()` bytes.
    let mut c = unsafe { std::mem::zeroed::<KfacConfig>() };
    // SAFETY: as above.
    expect(
        unsafe { kfac_config_default(&mut c, size_of::<KfacConfig>()) },
        KFAC_OK,
    );
    c.threads = 1;
    c
}

fn create(c: &KfacConfig) -> *mut KfacPrecond {
    let mut p = ptr::null_mut();
    // SAFETY: valid config and output pointer.
    expect(
        unsafe { kfac_precond_create(c, ptr::null_mut(), &mut p) },
        KFAC_OK,
    );
    p
}

/// A preconditioner with one linear layer `3 -> 2` with bias (id 0).
fn with_linear() -> *mut KfacPrecond {
    let p = create(&config());
    let mut id = 99;
    let name = CString::new("fc").unwrap();
    // SAFETY: live handle, NUL-terminated name, writable id.
    expect(
        unsafe { kfac_register_linear(p, name.as_ptr(), 3, 2, 1, &mut id) },
        KFAC_OK,
    );
    assert_eq!(id, 0);
    p
}

const N: usize = 4;

/// Activations `N x 3` and output gradients `N x 2` (dense).
fn batch(seed: u32) -> (Vec<f32>, Vec<f32>) {
    let f = |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0;
    (
        (0..N * 3).map(f).collect(),
        (0..N * 2).map(|i| f(i + 77)).collect(),
    )
}

fn observe(p: *mut KfacPrecond, a: &[f32], g: &[f32]) -> KfacStatus {
    // SAFETY: `a` holds N x 3 and `g` N x 2 floats.
    unsafe { kfac_observe_linear(p, 0, a.as_ptr(), N, 3, g.as_ptr(), 2) }
}

fn step(p: *mut KfacPrecond, layer: u32) -> KfacStatus {
    let (mut w, mut b) = (vec![0.5f32; 6], vec![0.25f32; 2]);
    let g = KfacGrad {
        layer,
        weight: w.as_mut_ptr(),
        ldw: 3,
        bias: b.as_mut_ptr(),
    };
    // SAFETY: one entry whose buffers hold 2 x 3 and 2 floats.
    unsafe { kfac_step(p, &g, 1, ptr::null_mut()) }
}

fn free(p: *mut KfacPrecond) {
    // SAFETY: a live handle.
    expect(unsafe { kfac_precond_free(p) }, KFAC_OK);
}

/// The handle still observes and steps after the failure just checked.
fn still_works(p: *mut KfacPrecond) {
    let (a, g) = batch(5);
    expect(observe(p, &a, &g), KFAC_OK);
    expect(step(p, 0), KFAC_OK);
}

#[test]
fn null_pointers_are_kfac_err_null() {
    let p = with_linear();
    let (a, g) = batch(1);
    let name = CString::new("x").unwrap();
    let mut id = 0;
    // SAFETY: every non-NULL pointer is valid; the NULL ones are refused.
    unsafe {
        expect(
            kfac_observe_linear(p, 0, ptr::null(), N, 3, g.as_ptr(), 2),
            KFAC_ERR_NULL,
        );
        expect(
            kfac_observe_linear(p, 0, a.as_ptr(), N, 3, ptr::null(), 2),
            KFAC_ERR_NULL,
        );
        expect(
            kfac_register_linear(p, ptr::null(), 1, 1, 0, &mut id),
            KFAC_ERR_NULL,
        );
        expect(
            kfac_register_linear(ptr::null_mut(), name.as_ptr(), 1, 1, 0, &mut id),
            KFAC_ERR_NULL,
        );
        expect(kfac_step(p, ptr::null(), 1, ptr::null_mut()), KFAC_ERR_NULL);
        expect(
            kfac_precond_create(ptr::null(), ptr::null_mut(), &mut ptr::null_mut()),
            KFAC_ERR_NULL,
        );
        expect(
            kfac_config_default(ptr::null_mut(), size_of::<KfacConfig>()),
            KFAC_ERR_NULL,
        );
        expect(
            kfac_comm_from_callbacks(ptr::null(), &mut ptr::null_mut()),
            KFAC_ERR_NULL,
        );
        expect(kfac_steps(p, ptr::null_mut()), KFAC_ERR_NULL);
        expect(kfac_save_size(ptr::null(), &mut 0), KFAC_ERR_NULL);
        // NULL to a free function is a no-op, not an error.
        expect(kfac_precond_free(ptr::null_mut()), KFAC_OK);
        expect(kfac_comm_free(ptr::null_mut()), KFAC_OK);
    }
    still_works(p);
    free(p);
}

#[test]
fn unknown_layer_id_is_invalid_argument_not_shape() {
    let p = with_linear();
    let (a, g) = batch(2);
    // SAFETY: valid buffers; layer 7 was never registered.
    expect(
        unsafe { kfac_observe_linear(p, 7, a.as_ptr(), N, 3, g.as_ptr(), 2) },
        KFAC_ERR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains('7'), "{}", last_error());
    expect(observe(p, &a, &g), KFAC_OK);
    expect(step(p, 7), KFAC_ERR_INVALID_ARGUMENT);
    still_works(p);
    free(p);
}

#[test]
fn invalid_arguments_are_refused_with_kfac_err_invalid_argument() {
    let p = with_linear();
    let name = CString::new("other").unwrap();
    let empty = CString::new("").unwrap();
    let mut id = 0;
    // SAFETY: valid pointers throughout; the values are what is refused.
    unsafe {
        // A bias flag other than 0/1, an empty name, an unknown layout, a
        // duplicate name.
        expect(
            kfac_register_linear(p, name.as_ptr(), 2, 2, 2, &mut id),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        expect(
            kfac_register_linear(p, empty.as_ptr(), 2, 2, 0, &mut id),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        expect(
            kfac_register_conv2d(
                p,
                name.as_ptr(),
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                0,
                1,
                1,
                7,
                0,
                &mut id,
            ),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        expect(
            kfac_register_conv2d(
                p,
                name.as_ptr(),
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                0,
                1,
                1,
                0,
                2,
                &mut id,
            ),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        let fc = CString::new("fc").unwrap();
        expect(
            kfac_register_linear(p, fc.as_ptr(), 3, 2, 1, &mut id),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        let mut n = 0usize;
        expect(kfac_num_layers(p, &mut n), KFAC_OK);
        assert_eq!(n, 1, "a refused registration registered a layer");
        // Overlapping gradient buffers.
        let (a, g) = batch(3);
        expect(observe(p, &a, &g), KFAC_OK);
        let mut w = vec![0.0f32; 6];
        let entry = KfacGrad {
            layer: 0,
            weight: w.as_mut_ptr(),
            ldw: 3,
            bias: w.as_mut_ptr().add(4),
        };
        expect(
            kfac_step(p, &entry, 1, ptr::null_mut()),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        // Communicator arguments.
        let group = CString::new("kfac-status-test").unwrap();
        let mut c = ptr::null_mut();
        expect(
            kfac_comm_shm_join(group.as_ptr(), 2, 2, 1000, &mut c),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        expect(kfac_comm_shm_from_env(0, &mut c), KFAC_ERR_INVALID_ARGUMENT);
        expect(kfac_comm_mpi(0, 2, 1000, &mut c), KFAC_ERR_INVALID_ARGUMENT);
        if kfac_has_mpi() == 0 {
            expect(kfac_comm_mpi(0, 0, 1000, &mut c), KFAC_ERR_INVALID_ARGUMENT);
        }
        assert!(c.is_null());
    }
    still_works(p);
    free(p);
}

#[test]
fn non_finite_kl_clip_and_bad_config_fields_are_refused() {
    type Edit = Box<dyn Fn(&mut KfacConfig)>;
    let bad: Vec<(&str, Edit)> = vec![
        ("kl_clip NaN", Box::new(|c| c.kl_clip = f64::NAN)),
        ("kl_clip Inf", Box::new(|c| c.kl_clip = f64::INFINITY)),
        ("kl_clip -Inf", Box::new(|c| c.kl_clip = f64::NEG_INFINITY)),
        ("damping NaN", Box::new(|c| c.damping = f64::NAN)),
        ("damping 0", Box::new(|c| c.damping = 0.0)),
        ("factor_decay 1", Box::new(|c| c.factor_decay = 1.0)),
        ("method 2", Box::new(|c| c.method = 2)),
        ("eigen_f64 3", Box::new(|c| c.eigen_f64 = 3)),
        ("precompute 3", Box::new(|c| c.precompute_denominators = 3)),
        ("compat 9", Box::new(|c| c.kfac_pytorch_compat = 9)),
        ("wire 3", Box::new(|c| c.wire = 3)),
        ("inv_update_steps 0", Box::new(|c| c.inv_update_steps = 0)),
        (
            "grad_worker_fraction 0",
            Box::new(|c| c.grad_worker_fraction = 0.0),
        ),
    ];
    for (what, set) in bad {
        let mut c = config();
        set(&mut c);
        let mut p = ptr::null_mut();
        // SAFETY: a full-size config and a writable output.
        let st = unsafe { kfac_precond_create(&c, ptr::null_mut(), &mut p) };
        assert_eq!(st, KFAC_ERR_INVALID_ARGUMENT, "{what}: {}", last_error());
        assert!(p.is_null(), "{what}");
    }
    // kl_clip <= 0 (finite) disables clipping.
    let mut c = config();
    c.kl_clip = -1.0;
    assert_eq!(c.to_runtime().unwrap().kl_clip, None);
    free(create(&c));
}

#[test]
fn shape_mismatches_are_kfac_err_shape() {
    let p = with_linear();
    let (a, g) = batch(4);
    // SAFETY: valid buffers; lda 2 < 3 columns; a linear observation of an
    // embedding layer.
    unsafe {
        expect(
            kfac_observe_linear(p, 0, a.as_ptr(), N, 2, g.as_ptr(), 2),
            KFAC_ERR_SHAPE,
        );
        let name = CString::new("emb").unwrap();
        let mut id = 0;
        expect(
            kfac_register_embedding(p, name.as_ptr(), 5, 2, &mut id),
            KFAC_OK,
        );
        expect(
            kfac_observe_linear(p, id, a.as_ptr(), N, 3, g.as_ptr(), 2),
            KFAC_ERR_SHAPE,
        );
    }
    free(p);
}

#[test]
fn nan_activations_are_kfac_err_non_finite() {
    let p = with_linear();
    let (mut a, g) = batch(6);
    a[5] = f32::NAN;
    expect(observe(p, &a, &g), KFAC_ERR_NON_FINITE);
    still_works(p);
    free(p);
}

/// #11 item 4: a finite activation of 1e30 (its square overflows f32) is
/// refused at observe, and the handle keeps stepping through and past the
/// next inverse updates (before, every step failed from the next inverse
/// update on).
#[test]
fn overflowing_finite_activations_are_refused_at_observe() {
    let p = with_linear();
    for s in 0..25u32 {
        let (mut a, g) = batch(s);
        if s % 3 == 0 {
            let good = a.clone();
            a[4] = 1e30;
            expect(observe(p, &a, &g), KFAC_ERR_NON_FINITE);
            assert!(last_error().contains("overflow"), "{}", last_error());
            a = good;
        }
        expect(observe(p, &a, &g), KFAC_OK);
        expect(step(p, 0), KFAC_OK);
    }
    free(p);
}

#[test]
fn calls_out_of_order_are_kfac_err_state() {
    let p = with_linear();
    let mut s = KfacStepStats {
        struct_size: std::mem::size_of::<KfacStepStats>(),
        ..Default::default()
    };
    // SAFETY: live handle, writable output.
    expect(unsafe { kfac_last_stats(p, &mut s) }, KFAC_ERR_STATE);
    // A step before any observation.
    expect(step(p, 0), KFAC_ERR_STATE);
    still_works(p);
    // Registration after the first step.
    let name = CString::new("late").unwrap();
    let mut id = 0;
    // SAFETY: valid pointers.
    expect(
        unsafe { kfac_register_linear(p, name.as_ptr(), 2, 2, 0, &mut id) },
        KFAC_ERR_STATE,
    );
    let mut steps = 0u64;
    // SAFETY: live handle, writable outputs (read-only calls on a const
    // pointer).
    unsafe {
        let q: *const KfacPrecond = p;
        expect(kfac_steps(q, &mut steps), KFAC_OK);
        expect(kfac_last_stats(q, &mut s), KFAC_OK);
    }
    assert_eq!(steps, 1);
    assert_eq!(s.step, 0);
    free(p);
}

/// The checkpoint of a preconditioner that has stepped once.
fn checkpoint(p: *mut KfacPrecond) -> Vec<u8> {
    let mut size = 0usize;
    let mut written = 0usize;
    // SAFETY: live handle; `buf` has `size` writable bytes.
    unsafe {
        expect(kfac_save_size(p, &mut size), KFAC_OK);
        let mut buf = vec![0u8; size];
        expect(kfac_save(p, buf.as_mut_ptr(), size, &mut written), KFAC_OK);
        assert_eq!(written, size);
        buf
    }
}

#[test]
fn corrupted_or_truncated_checkpoints_are_kfac_err_checkpoint() {
    let p = with_linear();
    still_works(p);
    let buf = checkpoint(p);
    for bad in [
        {
            let mut b = buf.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        },
        buf[..buf.len() - 1].to_vec(),
        buf[..3].to_vec(),
    ] {
        let mut q = ptr::null_mut();
        // SAFETY: `bad` is readable for its length.
        expect(
            unsafe { kfac_load(bad.as_ptr(), bad.len(), ptr::null_mut(), &mut q) },
            KFAC_ERR_CHECKPOINT,
        );
        assert!(q.is_null());
    }
    free(p);
}

#[test]
fn short_save_buffer_is_kfac_err_buffer_too_small_and_writes_nothing() {
    let p = with_linear();
    still_works(p);
    let size = checkpoint(p).len();
    let mut buf = vec![0u8; size - 1];
    let mut written = 12345usize;
    // SAFETY: `buf` has `size - 1` writable bytes, as passed.
    expect(
        unsafe { kfac_save(p, buf.as_mut_ptr(), size - 1, &mut written) },
        KFAC_ERR_BUFFER_TOO_SMALL,
    );
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(written, 12345);
    free(p);
}

#[test]
fn freed_foreign_or_taken_handles_are_kfac_err_invalid_handle() {
    let p = with_linear();
    free(p);
    let (a, g) = batch(7);
    expect(observe(p, &a, &g), KFAC_ERR_INVALID_HANDLE);
    let mut n = 0u64;
    // SAFETY: `p` is freed (refused without a dereference); `foreign`
    // points to memory that is not a handle.
    unsafe {
        expect(kfac_steps(p, &mut n), KFAC_ERR_INVALID_HANDLE);
        expect(kfac_precond_free(p), KFAC_ERR_INVALID_HANDLE);
        let mut foreign = [0u64; 16];
        let fp = foreign.as_mut_ptr().cast::<KfacPrecond>();
        expect(kfac_steps(fp, &mut n), KFAC_ERR_INVALID_HANDLE);
        // A communicator handle is not a preconditioner handle.
        let mut c = ptr::null_mut();
        expect(kfac_comm_local(&mut c), KFAC_OK);
        expect(
            kfac_steps(c.cast::<KfacPrecond>(), &mut n),
            KFAC_ERR_INVALID_HANDLE,
        );
        // A communicator's connection can be taken once.
        let cfg = config();
        let mut q = ptr::null_mut();
        expect(kfac_precond_create(&cfg, c, &mut q), KFAC_OK);
        let mut q2 = ptr::null_mut();
        expect(
            kfac_precond_create(&cfg, c, &mut q2),
            KFAC_ERR_INVALID_HANDLE,
        );
        let (mut r, mut w) = (9, 9);
        expect(kfac_comm_rank(c, &mut r, &mut w), KFAC_ERR_INVALID_HANDLE);
        expect(kfac_comm_free(c), KFAC_OK);
        expect(kfac_comm_free(c), KFAC_ERR_INVALID_HANDLE);
        free(q);
    }
}

unsafe extern "C" fn failing_allreduce(
    _: *mut c_void,
    _: *mut c_void,
    _: usize,
    _: KfacDtype,
) -> i32 {
    -1
}
unsafe extern "C" fn failing_broadcast(_: *mut c_void, _: *mut c_void, _: usize, _: u32) -> i32 {
    -2
}
unsafe extern "C" fn failing_allgather(
    _: *mut c_void,
    _: *const c_void,
    _: *mut c_void,
    _: usize,
) -> i32 {
    -3
}
unsafe extern "C" fn failing_barrier(_: *mut c_void) -> i32 {
    -4
}

fn failing_collectives(world_size: u32) -> KfacCollectives {
    // SAFETY: all-zero is a valid KfacCollectives (NULL pointers, None).
    let mut c = unsafe { std::mem::zeroed::<KfacCollectives>() };
    // SAFETY: `c` is writable for its size.
    expect(
        unsafe { kfac_collectives_init(&mut c, size_of::<KfacCollectives>()) },
        KFAC_OK,
    );
    assert_eq!(c.struct_size, size_of::<KfacCollectives>());
    assert!(c.allreduce.is_none() && c.user_data.is_null() && c.world_size == 0);
    c.rank = 0;
    c.world_size = world_size;
    c.allreduce = Some(failing_allreduce);
    c.broadcast = Some(failing_broadcast);
    c.allgather = Some(failing_allgather);
    c.barrier = Some(failing_barrier);
    c
}

#[test]
fn a_failing_callback_collective_is_kfac_err_comm() {
    let coll = failing_collectives(2);
    let mut c = ptr::null_mut();
    let mut p = ptr::null_mut();
    let name = CString::new("fc").unwrap();
    let mut id = 0;
    let (a, g) = batch(8);
    // SAFETY: valid pointers; the callbacks need no user data.
    unsafe {
        expect(kfac_comm_from_callbacks(&coll, &mut c), KFAC_OK);
        expect(kfac_precond_create(&config(), c, &mut p), KFAC_OK);
        expect(
            kfac_register_linear(p, name.as_ptr(), 3, 2, 1, &mut id),
            KFAC_OK,
        );
        expect(observe(p, &a, &g), KFAC_OK);
        expect(step(p, 0), KFAC_ERR_COMM);
        let (mut w, mut b) = (vec![0.5f32; 6], vec![0.25f32; 2]);
        let entry = KfacGrad {
            layer: 0,
            weight: w.as_mut_ptr(),
            ldw: 3,
            bias: b.as_mut_ptr(),
        };
        expect(kfac_allreduce_gradients(p, &entry, 1), KFAC_ERR_COMM);
        assert!(last_error().contains("callback"), "{}", last_error());
        // A missing callback is NULL; a rank outside the world is invalid.
        let mut missing = failing_collectives(2);
        missing.barrier = None;
        let mut h = ptr::null_mut();
        expect(kfac_comm_from_callbacks(&missing, &mut h), KFAC_ERR_NULL);
        let mut outside = failing_collectives(2);
        outside.rank = 2;
        expect(
            kfac_comm_from_callbacks(&outside, &mut h),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        assert!(h.is_null());
        free(p);
        expect(kfac_comm_free(c), KFAC_OK);
    }
}

#[test]
fn a_caught_panic_is_kfac_err_panic() {
    expect(kfac_test_panic(), KFAC_ERR_PANIC);
    assert!(last_error().contains("panic"));
}

/// `KFAC_ERR_NUMERICAL` needs a factor that is not positive definite after
/// damping. With the inverse method, activations whose outer product is
/// rank one and so large that the damping vanishes in f32 rounding give
/// a Cholesky pivot that is zero or negative, which the runtime reports.
#[test]
fn a_factor_that_is_not_positive_definite_is_kfac_err_numerical() {
    let mut c = config();
    c.method = KfacMethod::KFAC_METHOD_INVERSE as u32;
    c.kl_clip = 0.0;
    c.damping = 1e-12;
    let p = create(&c);
    let name = CString::new("fc").unwrap();
    let mut id = 0;
    // SAFETY: valid pointers.
    expect(
        unsafe { kfac_register_linear(p, name.as_ptr(), 3, 2, 0, &mut id) },
        KFAC_OK,
    );
    // Rank-one activations of magnitude ~1e17 (squares ~1e34, finite).
    let a: Vec<f32> = (0..N).flat_map(|_| [1.0e17f32, 1.3e17, 0.7e17]).collect();
    let (_, g) = batch(9);
    expect(observe(p, &a, &g), KFAC_OK);
    let (mut w, _) = (vec![0.5f32; 6], ());
    let entry = KfacGrad {
        layer: 0,
        weight: w.as_mut_ptr(),
        ldw: 3,
        bias: ptr::null_mut(),
    };
    // SAFETY: one entry, a 2 x 3 weight buffer, no bias.
    let st = unsafe { kfac_step(p, &entry, 1, ptr::null_mut()) };
    expect(st, KFAC_ERR_NUMERICAL);
    free(p);
}

#[test]
fn status_strings_name_every_status_and_unknown_values() {
    let s = |v: i32| {
        let p = kfac_status_string(v);
        assert!(!p.is_null());
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_string()
    };
    let all = [
        (KFAC_OK, "KFAC_OK"),
        (KFAC_ERR_NULL, "KFAC_ERR_NULL"),
        (KFAC_ERR_INVALID_ARGUMENT, "KFAC_ERR_INVALID_ARGUMENT"),
        (KFAC_ERR_SHAPE, "KFAC_ERR_SHAPE"),
        (KFAC_ERR_NON_FINITE, "KFAC_ERR_NON_FINITE"),
        (KFAC_ERR_STATE, "KFAC_ERR_STATE"),
        (KFAC_ERR_NUMERICAL, "KFAC_ERR_NUMERICAL"),
        (KFAC_ERR_COMM, "KFAC_ERR_COMM"),
        (KFAC_ERR_CHECKPOINT, "KFAC_ERR_CHECKPOINT"),
        (KFAC_ERR_BUFFER_TOO_SMALL, "KFAC_ERR_BUFFER_TOO_SMALL"),
        (KFAC_ERR_INVALID_HANDLE, "KFAC_ERR_INVALID_HANDLE"),
        (KFAC_ERR_PANIC, "KFAC_ERR_PANIC"),
        (KFAC_ERR_RESOURCE, "KFAC_ERR_RESOURCE"),
        (KFAC_ERR_BUSY, "KFAC_ERR_BUSY"),
        (KFAC_ERR_NO_MEMORY, "KFAC_ERR_NO_MEMORY"),
    ];
    for (i, (st, name)) in all.iter().enumerate() {
        assert_eq!(*st as i32, i as i32);
        assert_eq!(KfacStatus::from_code(i as i32), Some(*st));
        assert!(
            s(i as i32).starts_with(&format!("{name}: ")),
            "{}",
            s(i as i32)
        );
    }
    for v in [-1, all.len() as i32, 1000, i32::MAX, i32::MIN] {
        assert_eq!(s(v), "unknown status");
        assert_eq!(KfacStatus::from_code(v), None);
    }
}

#[test]
fn presets_convert_to_exactly_the_rust_presets() {
    // SAFETY: writable structs of the passed size.
    unsafe {
        let mut c = std::mem::zeroed::<KfacConfig>();
        expect(
            kfac_config_kfac_pytorch(&mut c, size_of::<KfacConfig>()),
            KFAC_OK,
        );
        assert_eq!(c.struct_size, size_of::<KfacConfig>());
        assert_eq!(c.to_runtime().unwrap(), Config::kfac_pytorch());
        let mut d = std::mem::zeroed::<KfacConfig>();
        expect(
            kfac_config_default(&mut d, size_of::<KfacConfig>()),
            KFAC_OK,
        );
        assert_eq!(d.to_runtime().unwrap(), Config::default());
        assert_ne!(c, d);
        // And both create a preconditioner.
        free(create(&c));
        free(create(&d));
    }
}

/// A config followed by spare bytes, as a caller built against a newer
/// header would pass it.
#[repr(C)]
struct Wide {
    cfg: KfacConfig,
    tail: [u8; 32],
}

#[test]
fn struct_size_rules_of_kfac_config() {
    let cur = size_of::<KfacConfig>();
    // No padding anywhere (so none at the end for a future field to use):
    // the fields' sizes add up to the struct's.
    assert_eq!(cur, size_of::<usize>() + 5 * 8 + 2 * 8 + 8 * 4 + 8 + 8);
    let (v1, v2) = (cur - 16, cur - 8);
    assert_eq!(
        size_of::<KfacCollectives>(),
        2 * size_of::<usize>() + 8 + 4 * size_of::<usize>() + 8
    );
    // SAFETY: every pointer below has the size passed with it (or the
    // struct_size is refused before anything past it is read or written).
    unsafe {
        let mut w = Wide {
            cfg: std::mem::zeroed(),
            tail: [0xee; 32],
        };
        // The writer zeroes the bytes it does not know and sets the size.
        expect(kfac_config_default(&mut w.cfg, cur + 16), KFAC_OK);
        assert_eq!(w.cfg.struct_size, cur + 16);
        assert!(w.tail[..16].iter().all(|&b| b == 0));
        assert!(w.tail[16..].iter().all(|&b| b == 0xee));
        // ... and the reader accepts what the writer wrote.
        let mut p = ptr::null_mut();
        expect(
            kfac_precond_create(&w.cfg, ptr::null_mut(), &mut p),
            KFAC_OK,
        );
        free(p);
        // A non-zero byte past the known fields is refused.
        w.tail[15] = 1;
        let mut q = ptr::null_mut();
        expect(
            kfac_precond_create(&w.cfg, ptr::null_mut(), &mut q),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        assert!(q.is_null());
        // The layout before `memory_budget` (`v1`): accepted, and
        // read with no budget; the writer leaves the field alone.
        let mut c = config();
        c.memory_budget = 1;
        c.refresh_tolerance = -1.0;
        c.struct_size = v1;
        expect(kfac_precond_create(&c, ptr::null_mut(), &mut q), KFAC_OK);
        let mut id = 0u32;
        expect(
            kfac_register_linear(q, c"fc".as_ptr(), 8, 4, 1, &mut id),
            KFAC_OK,
        );
        free(q);
        // With the field read, that budget of one byte refuses the layer
        // (the layout before `refresh_tolerance`, `v2`, reads it and not
        // the invalid tolerance).
        c.struct_size = v2;
        expect(kfac_precond_create(&c, ptr::null_mut(), &mut q), KFAC_OK);
        expect(
            kfac_register_linear(q, c"fc".as_ptr(), 8, 4, 1, &mut id),
            KFAC_ERR_NO_MEMORY,
        );
        assert!(
            last_error().contains("memory budget exceeded"),
            "{}",
            last_error()
        );
        free(q);
        // The whole struct reads the tolerance: the invalid one is refused.
        c.struct_size = cur;
        expect(
            kfac_precond_create(&c, ptr::null_mut(), &mut q),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        assert!(
            last_error().contains("refresh_tolerance"),
            "{}",
            last_error()
        );
        let mut z = std::mem::zeroed::<KfacConfig>();
        z.memory_budget = 77;
        z.refresh_tolerance = 0.5;
        expect(kfac_config_default(&mut z, v1), KFAC_OK);
        assert_eq!((z.struct_size, z.memory_budget), (v1, 77));
        expect(kfac_config_default(&mut z, v2), KFAC_OK);
        assert_eq!(
            (z.struct_size, z.memory_budget, z.refresh_tolerance),
            (v2, 0, 0.5)
        );
        expect(kfac_config_default(&mut z, cur), KFAC_OK);
        assert_eq!(z.refresh_tolerance, 0.0);
        // Smaller than any layout, between layouts, zero, garbage: refused.
        for bad in [
            v1 - 8,
            v1 + 4,
            v2 + 4,
            0,
            KFAC_MAX_STRUCT_SIZE + 1,
            usize::MAX,
        ] {
            let mut c = config();
            c.struct_size = bad;
            expect(
                kfac_precond_create(&c, ptr::null_mut(), &mut q),
                KFAC_ERR_INVALID_ARGUMENT,
            );
            assert!(last_error().contains("struct_size"), "{}", last_error());
            let mut z = std::mem::zeroed::<KfacConfig>();
            expect(kfac_config_default(&mut z, bad), KFAC_ERR_INVALID_ARGUMENT);
            assert_eq!(z.struct_size, 0, "a refused size was written");
        }
        // The same rules for the collectives (a size below its own: with
        // `KfacConfig`'s, larger than `KfacCollectives`, the read went past
        // `coll` and the outcome depended on the stack's contents).
        let mut coll = failing_collectives(1);
        coll.struct_size = size_of::<KfacCollectives>() - 1;
        let mut h = ptr::null_mut();
        expect(
            kfac_comm_from_callbacks(&coll, &mut h),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        let mut z = std::mem::zeroed::<KfacCollectives>();
        expect(kfac_collectives_init(&mut z, 3), KFAC_ERR_INVALID_ARGUMENT);
        expect(
            kfac_collectives_init(&mut z, usize::MAX),
            KFAC_ERR_INVALID_ARGUMENT,
        );
        assert_eq!(z.struct_size, 0);
    }
}

#[test]
fn read_only_getters_take_const_handles() {
    let p = with_linear();
    still_works(p);
    still_works(p);
    let q: *const KfacPrecond = p;
    let (mut steps, mut layers, mut size) = (0u64, 0usize, 0usize);
    // SAFETY: live handle, writable outputs.
    unsafe {
        expect(kfac_steps(q, &mut steps), KFAC_OK);
        expect(kfac_num_layers(q, &mut layers), KFAC_OK);
        expect(kfac_save_size(q, &mut size), KFAC_OK);
    }
    assert_eq!((steps, layers), (2, 1));
    assert!(size > 0);
    free(p);
}
