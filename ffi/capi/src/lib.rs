//! # kfac-capi: the C ABI of kfac (packaged as `libkfac.so`/`libkfac.a` by `kfac-ffi`)
//!
//! A thin layer over `kfac-runtime`: argument checks, conversions, error
//! mapping. The header `include/kfac.h` is generated from this file by
//! cbindgen (`ffi/cbindgen.toml`) and checked in; a test fails when it is
//! stale.
//!
//! Conventions (repeated in the header):
//! * Every function returns a [`KfacStatus`]; `KFAC_OK` is 0. On any other
//!   status, [`kfac_last_error`] gives a message for the calling thread, and
//!   every handle and buffer is as it was before the call.
//! * Handles are opaque; each `*_create`/`*_join` has a `*_free`. Freed or
//!   foreign handles are detected (a registry of live handles) and refused
//!   with `KFAC_ERR_INVALID_HANDLE`, never dereferenced.
//! * Matrices are `float`, row-major, with a leading dimension (elements
//!   between the starts of consecutive rows) `>=` the row length.
//! * No panic crosses the boundary: each entry point catches it, reports
//!   `KFAC_ERR_PANIC`, and marks the handle it was using as poisoned.
//! * A handle may be used from any thread, but not from two threads at once.

#![allow(clippy::missing_safety_doc)] // every function has a `# Safety` section

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use faer::{MatMut, MatRef};
use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::{Communicator, Local};
use kfac_runtime::{
    Compat, Config, Conv2dSpec, Error, ImageLayout, LayerGrad, LayerId, LayerKind, Method,
    Observation, Precision, Preconditioner, Schedule, WirePrecision,
};

/// Version of the C ABI: bumped on any incompatible change of a function or
/// struct in this header.
pub const KFAC_ABI_VERSION: u32 = 1;

/// Status of every call. `KFAC_OK` is 0; details of any other status are in
/// `kfac_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacStatus {
    /// Success.
    KFAC_OK = 0,
    /// A required pointer was NULL.
    KFAC_ERR_NULL = 1,
    /// A value is out of range (sizes, flags, configuration).
    KFAC_ERR_INVALID_ARGUMENT = 2,
    /// Sizes or leading dimensions do not fit the layer.
    KFAC_ERR_SHAPE = 3,
    /// An input holds NaN or Inf.
    KFAC_ERR_NON_FINITE = 4,
    /// Calls out of order (e.g. `kfac_step` without observations).
    KFAC_ERR_STATE = 5,
    /// A numerical failure (not positive definite, no convergence).
    KFAC_ERR_NUMERICAL = 6,
    /// A collective failed (dead or stuck peer, timeout, mismatch).
    KFAC_ERR_COMM = 7,
    /// A checkpoint was refused (truncated, corrupted, incompatible).
    KFAC_ERR_CHECKPOINT = 8,
    /// A caller buffer is too small.
    KFAC_ERR_BUFFER_TOO_SMALL = 9,
    /// A freed, foreign or poisoned handle.
    KFAC_ERR_INVALID_HANDLE = 10,
    /// An internal panic was caught (the handle is now poisoned).
    KFAC_ERR_PANIC = 11,
}

use KfacStatus::*;

/// Inversion method.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacMethod {
    /// Eigendecompositions.
    KFAC_METHOD_EIGEN = 0,
    /// Damped Cholesky inverses.
    KFAC_METHOD_INVERSE = 1,
}

/// Memory layout of conv2d tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacLayout {
    /// (batch, channel, height, width).
    KFAC_LAYOUT_NCHW = 0,
    /// (batch, height, width, channel).
    KFAC_LAYOUT_NHWC = 1,
}

/// Preconditioner settings; fill with `kfac_config_default` then adjust.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KfacConfig {
    /// Tikhonov damping (> 0). Default 1e-3.
    pub damping: f64,
    /// Running-average decay of the factors, in [0, 1). Default 0.95.
    pub factor_decay: f64,
    /// KL clipping threshold; <= 0 disables. Default 1e-3.
    pub kl_clip: f64,
    /// Learning rate used by KL clipping (>= 0). Default 0.1.
    pub lr: f64,
    /// Factors are updated every this many steps (>= 1). Default 1.
    pub factor_update_steps: u64,
    /// Inverses are recomputed every this many steps (>= 1). Default 10.
    pub inv_update_steps: u64,
    /// Eigen or inverse method, a `KfacMethod` value (a plain integer here,
    /// so any value C stores is well-defined and an unknown one is refused).
    /// Default `KFAC_METHOD_EIGEN`.
    pub method: u32,
    /// 1: eigendecompositions in f64 (default), 0: in f32.
    pub eigen_f64: u32,
    /// 1: precompute 1/(l_G l_A^T + damping) at the inverse step. Default 0.
    pub precompute_denominators: u32,
    /// 1: reproduce kfac-pytorch 0.4's numbers. Default 0.
    pub kfac_pytorch_compat: u32,
    /// Worker threads (0: one per core). Default 0.
    pub threads: u32,
    /// Gradient-worker fraction in (0, 1]. Default 1.
    pub grad_worker_fraction: f64,
    /// Factor statistics on the wire: 0 f32 (default), 1 bf16, 2 f16.
    pub wire: u32,
}

/// Statistics of the last step (times in seconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KfacStepStats {
    /// Index of the step (0 for the first).
    pub step: u64,
    /// 1 when the factors were updated.
    pub factors_updated: u32,
    /// 1 when the inverses were recomputed.
    pub inverses_updated: u32,
    /// KL-clipping factor applied.
    pub kl_scale: f64,
    /// Factor statistics (observe calls) and running averages.
    pub factor_update_s: f64,
    /// Eigendecompositions or inversions.
    pub inversion_s: f64,
    /// Preconditioning and KL clipping.
    pub preconditioning_s: f64,
    /// Collectives.
    pub communication_s: f64,
    /// The whole step plus the observe calls before it.
    pub total_s: f64,
    /// Bytes of state held.
    pub state_bytes: u64,
}

/// A layer's gradient for `kfac_step`, preconditioned in place. `weight`
/// is `out x in` row-major with leading dimension `ldw` (PyTorch layout:
/// conv2d `C_out x (C_in kh kw)`, embedding `num x dim`); `bias` has `out`
/// values, or is NULL for layers without bias.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KfacGrad {
    /// Layer id from `kfac_register_*`.
    pub layer: u32,
    /// Weight gradient.
    pub weight: *mut f32,
    /// Leading dimension of `weight` (>= its number of columns).
    pub ldw: usize,
    /// Bias gradient or NULL.
    pub bias: *mut f32,
}

/// A communicator (single process or shared-memory group). Opaque.
pub struct KfacComm {
    inner: Option<Box<dyn Communicator>>,
}

/// A K-FAC preconditioner. Opaque.
pub struct KfacPrecond {
    inner: Preconditioner,
    poisoned: bool,
}

// ---- errors and handles ----

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let s = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(s).unwrap_or_default());
}

struct Fail(KfacStatus, String);

type R<T> = Result<T, Fail>;

fn fail<T>(status: KfacStatus, msg: impl Into<String>) -> R<T> {
    Err(Fail(status, msg.into()))
}

fn map_err(e: Error) -> Fail {
    use kfac_runtime::ErrorKind as K;
    let status = match e.kind() {
        K::InvalidArgument | K::UnknownLayer => KFAC_ERR_INVALID_ARGUMENT,
        K::Shape => KFAC_ERR_SHAPE,
        K::NonFinite => KFAC_ERR_NON_FINITE,
        K::State => KFAC_ERR_STATE,
        K::Numerical => KFAC_ERR_NUMERICAL,
        K::Comm | K::PeerFailed => KFAC_ERR_COMM,
        K::Checkpoint => KFAC_ERR_CHECKPOINT,
        _ => KFAC_ERR_INVALID_ARGUMENT,
    };
    Fail(status, e.to_string())
}

const TAG_PRECOND: u8 = 1;
const TAG_COMM: u8 = 2;

fn registry() -> &'static Mutex<HashMap<usize, u8>> {
    static R: OnceLock<Mutex<HashMap<usize, u8>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn register_handle(addr: usize, tag: u8) {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(addr, tag);
}

fn live(addr: usize, tag: u8) -> bool {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&addr)
        == Some(&tag)
}

fn unregister(addr: usize, tag: u8) -> bool {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    if r.get(&addr) == Some(&tag) {
        r.remove(&addr);
        true
    } else {
        false
    }
}

/// Runs an entry point: catches panics and records the error message.
fn guard(f: impl FnOnce() -> R<()>) -> KfacStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => KFAC_OK,
        Ok(Err(Fail(s, m))) => {
            set_error(m);
            s
        }
        Err(p) => {
            let m = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal panic caught at the C boundary: {m}"));
            KFAC_ERR_PANIC
        }
    }
}

/// Validates a preconditioner handle and runs `f` on it; a panic inside
/// marks the handle poisoned.
unsafe fn with_precond(p: *mut KfacPrecond, f: impl FnOnce(&mut Preconditioner) -> R<()>) -> R<()> {
    if p.is_null() {
        return fail(KFAC_ERR_NULL, "preconditioner handle is NULL");
    }
    if !live(p as usize, TAG_PRECOND) {
        return fail(
            KFAC_ERR_INVALID_HANDLE,
            "not a live preconditioner handle (freed or foreign)",
        );
    }
    // SAFETY: `p` is registered as a live preconditioner created by
    // `Box::into_raw`, and the caller does not use it concurrently.
    let h = unsafe { &mut *p };
    if h.poisoned {
        return fail(
            KFAC_ERR_INVALID_HANDLE,
            "preconditioner is poisoned by an earlier internal panic",
        );
    }
    match catch_unwind(AssertUnwindSafe(|| f(&mut h.inner))) {
        Ok(r) => r,
        Err(e) => {
            h.poisoned = true;
            std::panic::resume_unwind(e)
        }
    }
}

fn out_ptr<T>(p: *mut T, what: &str) -> R<()> {
    if p.is_null() {
        return fail(KFAC_ERR_NULL, format!("{what} is NULL"));
    }
    Ok(())
}

// ---- version and errors ----

/// The last error message of the calling thread (empty when none). The
/// string is owned by the library and valid until the next failing call on
/// this thread.
#[no_mangle]
pub extern "C" fn kfac_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version as a static string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn kfac_version_string() -> *const c_char {
    static V: OnceLock<CString> = OnceLock::new();
    V.get_or_init(|| CString::new(env!("CARGO_PKG_VERSION")).unwrap_or_default())
        .as_ptr()
}

/// The library version as `major * 10000 + minor * 100 + patch`.
#[no_mangle]
pub extern "C" fn kfac_version() -> u32 {
    let p = |s: &str| s.parse::<u32>().unwrap_or(0);
    p(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
        + p(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + p(env!("CARGO_PKG_VERSION_PATCH"))
}

/// The C ABI version (`KFAC_ABI_VERSION` of the header this library was
/// built with); compare it with the header's constant at start-up.
#[no_mangle]
pub extern "C" fn kfac_abi_version() -> u32 {
    KFAC_ABI_VERSION
}

/// Provokes an internal panic inside the library (for testing that no panic
/// crosses the boundary). Always returns `KFAC_ERR_PANIC`.
#[no_mangle]
pub extern "C" fn kfac_test_panic() -> KfacStatus {
    guard(|| panic!("requested by kfac_test_panic"))
}

// ---- configuration ----

/// Fills `out` with the documented defaults.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KfacConfig`.
#[no_mangle]
pub unsafe extern "C" fn kfac_config_default(out: *mut KfacConfig) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        let d = Config::default();
        let c = KfacConfig {
            damping: d.damping.at(0),
            factor_decay: d.factor_decay,
            kl_clip: d.kl_clip.unwrap_or(0.0),
            lr: d.lr.at(0),
            factor_update_steps: d.factor_update_steps,
            inv_update_steps: d.inv_update_steps,
            method: KfacMethod::KFAC_METHOD_EIGEN as u32,
            eigen_f64: 1,
            precompute_denominators: 0,
            kfac_pytorch_compat: 0,
            threads: 0,
            grad_worker_fraction: 1.0,
            wire: 0,
        };
        // SAFETY: checked non-NULL; the caller provides writable memory.
        unsafe { out.write(c) };
        Ok(())
    })
}

fn to_config(c: &KfacConfig) -> R<Config> {
    let flag = |v: u32, what: &str| -> R<bool> {
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => fail(
                KFAC_ERR_INVALID_ARGUMENT,
                format!("{what} must be 0 or 1, got {v}"),
            ),
        }
    };
    let cfg = Config {
        damping: Schedule::Constant(c.damping),
        factor_decay: c.factor_decay,
        kl_clip: if c.kl_clip > 0.0 {
            Some(c.kl_clip)
        } else {
            None
        },
        lr: Schedule::Constant(c.lr),
        factor_update_steps: c.factor_update_steps,
        inv_update_steps: c.inv_update_steps,
        method: match c.method {
            0 => Method::Eigen,
            1 => Method::Inverse,
            m => {
                return fail(
                    KFAC_ERR_INVALID_ARGUMENT,
                    format!("method {m} is not 0 (eigen) or 1 (inverse)"),
                )
            }
        },
        eigen_precision: if flag(c.eigen_f64, "eigen_f64")? {
            Precision::F64
        } else {
            Precision::F32
        },
        precompute_denominators: flag(c.precompute_denominators, "precompute_denominators")?,
        exclude: Vec::new(),
        compat: if flag(c.kfac_pytorch_compat, "kfac_pytorch_compat")? {
            Compat::KfacPytorch
        } else {
            Compat::Native
        },
        threads: c.threads as usize,
        grad_worker_fraction: c.grad_worker_fraction,
        wire: match c.wire {
            0 => WirePrecision::F32,
            1 => WirePrecision::Bf16,
            2 => WirePrecision::F16,
            w => {
                return fail(
                    KFAC_ERR_INVALID_ARGUMENT,
                    format!("wire {w} is not 0, 1 or 2"),
                )
            }
        },
    };
    cfg.validate().map_err(map_err)?;
    Ok(cfg)
}

// ---- communicators ----

fn new_comm(c: Box<dyn Communicator>, out: *mut *mut KfacComm) {
    let raw = Box::into_raw(Box::new(KfacComm { inner: Some(c) }));
    register_handle(raw as usize, TAG_COMM);
    // SAFETY: `out` was checked non-NULL by the caller of this helper.
    unsafe { out.write(raw) };
}

/// A single-process communicator (world size 1).
///
/// # Safety
/// `out` must be NULL or writable. The caller owns `*out` and frees it with
/// `kfac_comm_free`, also after `kfac_precond_create` has taken over its
/// connection.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_local(out: *mut *mut KfacComm) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        new_comm(Box::new(Local::new()), out);
        Ok(())
    })
}

/// Joins the shared-memory group of this process's environment
/// (`KFAC_RANK`, `KFAC_WORLD_SIZE`, `KFAC_GROUP` as set by `kfac-launch`, or
/// `RANK`/`WORLD_SIZE`, Open MPI's or MPICH's variables), waiting at most
/// `timeout_ms` for every wait. Blocks until every rank has joined.
///
/// # Safety
/// As `kfac_comm_local`.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_shm_from_env(
    timeout_ms: u64,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if timeout_ms == 0 {
            return fail(KFAC_ERR_INVALID_ARGUMENT, "timeout_ms must be > 0");
        }
        let opts = ShmOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..ShmOptions::default()
        };
        let g = ShmGroup::from_env(opts).map_err(|e| Fail(KFAC_ERR_COMM, e.to_string()))?;
        new_comm(Box::new(g), out);
        Ok(())
    })
}

/// 1 when this libkfac was built with MPI support (cargo feature `mpi`), so
/// that `kfac_comm_mpi` works; 0 otherwise.
#[no_mangle]
pub extern "C" fn kfac_has_mpi() -> u32 {
    cfg!(feature = "mpi") as u32
}

/// A communicator over the caller's MPI communicator, passed as its Fortran
/// handle `MPI_Comm_c2f(comm)` (an `MPI_Fint`, `int` in Open MPI and
/// MPICH), so that this header needs no `mpi.h` and works with any MPI.
/// The communicator is duplicated (`MPI_Comm_dup`): kfac's traffic never
/// mixes with the caller's, and `comm` stays the caller's to free. kfac
/// neither initializes nor finalizes MPI: the caller initializes it before
/// this call and finalizes it after `kfac_comm_free` and
/// `kfac_precond_free` of every preconditioner using the handle. kfac calls
/// MPI only inside kfac calls on this handle (or the preconditioner owning
/// its connection), on the calling thread: `MPI_Init` suffices when that is
/// the thread that initialized MPI; otherwise initialize with at least
/// `MPI_THREAD_SERIALIZED`.
///
/// `hierarchical` 0: collectives over MPI alone (reductions in a fixed rank
/// order, bitwise reproducible for a fixed world size). 1: shared memory
/// inside each machine (ranks of one `MPI_COMM_TYPE_SHARED` domain, or
/// `KFAC_NODE_SIZE` consecutive ranks when that variable is set) and MPI
/// between one leader per machine. Every wait is bounded by `timeout_ms`
/// (each MPI stage of a collective, i.e. each segment of at most 256 KiB,
/// and each shared-memory round), so a large collective may take longer in
/// all but never hangs. Collective over `comm`: every rank makes the same
/// call.
///
/// `KFAC_ERR_INVALID_ARGUMENT` when the library was built without MPI
/// (`kfac_has_mpi() == 0`), `KFAC_ERR_COMM` when MPI is not initialized,
/// already finalized, or `comm` is `MPI_COMM_NULL` or an intercommunicator.
///
/// # Safety
/// `out` as `kfac_comm_local`; `fortran_comm` a handle from `MPI_Comm_c2f`
/// of the MPI library libkfac is linked against.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_mpi(
    fortran_comm: i32,
    hierarchical: u32,
    timeout_ms: u64,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if timeout_ms == 0 {
            return fail(KFAC_ERR_INVALID_ARGUMENT, "timeout_ms must be > 0");
        }
        if hierarchical > 1 {
            return fail(
                KFAC_ERR_INVALID_ARGUMENT,
                format!("hierarchical must be 0 or 1, got {hierarchical}"),
            );
        }
        #[cfg(feature = "mpi")]
        {
            use kfac_runtime::comm::hier::{HierComm, HierOptions};
            use kfac_runtime::comm::mpi::{MpiComm, MpiOptions};
            let timeout = Duration::from_millis(timeout_ms);
            let mpi_opts = MpiOptions {
                timeout,
                ..MpiOptions::default()
            };
            let err = |e: kfac_runtime::comm::CommError| Fail(KFAC_ERR_COMM, e.to_string());
            if !mpi::is_initialized() || mpi::is_finalized() {
                return fail(
                    KFAC_ERR_COMM,
                    "MPI is not initialized (or already finalized); call MPI_Init first",
                );
            }
            // SAFETY: MPI is initialized; MPI_Comm_f2c accepts any Fortran
            // handle value of this MPI (the caller's contract).
            let raw = unsafe { mpi::ffi::MPI_Comm_f2c(fortran_comm) };
            let c: Box<dyn Communicator> = if hierarchical == 1 {
                let opts = HierOptions {
                    mpi: mpi_opts,
                    shm: ShmOptions {
                        timeout,
                        ..ShmOptions::default()
                    },
                    ..HierOptions::default()
                };
                // SAFETY: `raw` is a communicator handle of the linked MPI
                // (checked for MPI_COMM_NULL/intercommunicators inside).
                Box::new(unsafe { HierComm::from_raw(raw, opts) }.map_err(err)?)
            } else {
                // SAFETY: as above.
                Box::new(unsafe { MpiComm::from_raw(raw, mpi_opts) }.map_err(err)?)
            };
            new_comm(c, out);
            Ok(())
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = fortran_comm;
            fail(
                KFAC_ERR_INVALID_ARGUMENT,
                "this libkfac was built without MPI (build kfac-ffi with --features mpi)",
            )
        }
    })
}

/// Joins (rank 0: creates) the shared-memory group `group` as `rank` of
/// `world_size`. Blocks until every rank has joined, at most `timeout_ms`.
///
/// # Safety
/// `group` must be NULL or a NUL-terminated string; `out` as
/// `kfac_comm_local`.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_shm_join(
    group: *const c_char,
    rank: u32,
    world_size: u32,
    timeout_ms: u64,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if group.is_null() {
            return fail(KFAC_ERR_NULL, "group is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated by contract.
        let name = unsafe { CStr::from_ptr(group) }
            .to_str()
            .map_err(|_| Fail(KFAC_ERR_INVALID_ARGUMENT, "group is not UTF-8".into()))?;
        if timeout_ms == 0 {
            return fail(KFAC_ERR_INVALID_ARGUMENT, "timeout_ms must be > 0");
        }
        let opts = ShmOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..ShmOptions::default()
        };
        let g = ShmGroup::join(name, rank as usize, world_size as usize, opts)
            .map_err(|e| Fail(KFAC_ERR_COMM, e.to_string()))?;
        new_comm(Box::new(g), out);
        Ok(())
    })
}

/// Element type of a reduction in a [`KfacCollectives`] callback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacDtype {
    /// `float`.
    KFAC_DTYPE_F32 = 0,
    /// `double`.
    KFAC_DTYPE_F64 = 1,
}

/// Caller-provided collectives, so that K-FAC's communication goes through
/// the training stack's own NCCL/Gloo/MPI communicator. Every callback
/// returns 0 on success and any other value on failure (reported as
/// `KFAC_ERR_COMM`); all ranks call them in the same order. The library
/// calls them only from inside kfac calls on the owning preconditioner, on
/// the calling thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KfacCollectives {
    /// Passed to every callback.
    pub user_data: *mut core::ffi::c_void,
    /// This rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// In-place sum of `count` elements of `dtype` across ranks.
    pub allreduce: Option<
        unsafe extern "C" fn(
            user_data: *mut core::ffi::c_void,
            buf: *mut core::ffi::c_void,
            count: usize,
            dtype: KfacDtype,
        ) -> i32,
    >,
    /// Copies `bytes` bytes of `root`'s `buf` into every rank's `buf`.
    pub broadcast: Option<
        unsafe extern "C" fn(
            user_data: *mut core::ffi::c_void,
            buf: *mut core::ffi::c_void,
            bytes: usize,
            root: u32,
        ) -> i32,
    >,
    /// Gathers `bytes` bytes from every rank into `recv` (`world_size *
    /// bytes`, rank order). Every rank passes the same `bytes`.
    pub allgather: Option<
        unsafe extern "C" fn(
            user_data: *mut core::ffi::c_void,
            send: *const core::ffi::c_void,
            recv: *mut core::ffi::c_void,
            bytes: usize,
        ) -> i32,
    >,
    /// Returns once every rank has called it.
    pub barrier: Option<unsafe extern "C" fn(user_data: *mut core::ffi::c_void) -> i32>,
}

struct Callbacks(KfacCollectives);

// SAFETY: the caller promises (header docs) that its callbacks and
// `user_data` may be used from the thread that calls into the library.
unsafe impl Send for Callbacks {}

impl Callbacks {
    fn rc(&self, what: &'static str, rc: i32) -> Result<(), kfac_runtime::comm::CommError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(kfac_runtime::comm::CommError::Os {
                call: what,
                reason: format!("callback returned {rc}"),
            })
        }
    }
}

impl Communicator for Callbacks {
    fn rank(&self) -> usize {
        self.0.rank as usize
    }
    fn size(&self) -> usize {
        self.0.world_size as usize
    }
    fn allreduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: kfac_runtime::comm::ReduceType,
    ) -> Result<(), kfac_runtime::comm::CommError> {
        let (dtype, e) = match ty {
            kfac_runtime::comm::ReduceType::F32 => (KfacDtype::KFAC_DTYPE_F32, 4),
            kfac_runtime::comm::ReduceType::F64 => (KfacDtype::KFAC_DTYPE_F64, 8),
        };
        let f = self
            .0
            .allreduce
            .ok_or(kfac_runtime::comm::CommError::InvalidArgument {
                reason: "no allreduce callback".into(),
            })?;
        // SAFETY: the callback contract (header): `buf` holds `count`
        // elements of `dtype`, valid for the call.
        let rc = unsafe {
            f(
                self.0.user_data,
                data.as_mut_ptr().cast(),
                data.len() / e,
                dtype,
            )
        };
        self.rc("allreduce callback", rc)
    }
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: kfac_runtime::comm::ReduceType,
        root: usize,
    ) -> Result<(), kfac_runtime::comm::CommError> {
        // A sum on every rank; non-roots restore their input.
        let keep = (self.rank() != root).then(|| data.to_vec());
        self.allreduce_bytes(data, ty)?;
        if let Some(k) = keep {
            data.copy_from_slice(&k);
        }
        Ok(())
    }
    fn broadcast_bytes(
        &mut self,
        data: &mut [u8],
        root: usize,
    ) -> Result<(), kfac_runtime::comm::CommError> {
        let f = self
            .0
            .broadcast
            .ok_or(kfac_runtime::comm::CommError::InvalidArgument {
                reason: "no broadcast callback".into(),
            })?;
        // SAFETY: `data` is valid for `len` bytes during the call.
        let rc = unsafe {
            f(
                self.0.user_data,
                data.as_mut_ptr().cast(),
                data.len(),
                root as u32,
            )
        };
        self.rc("broadcast callback", rc)
    }
    fn allgather_bytes(
        &mut self,
        send: &[u8],
    ) -> Result<(Vec<u8>, Vec<usize>), kfac_runtime::comm::CommError> {
        let f = self
            .0
            .allgather
            .ok_or(kfac_runtime::comm::CommError::InvalidArgument {
                reason: "no allgather callback".into(),
            })?;
        let world = self.size();
        // sizes first, then the payloads padded to the largest
        let mine = (send.len() as u64).to_le_bytes();
        let mut sizes_raw = vec![0u8; 8 * world];
        // SAFETY: `recv` holds world * 8 bytes.
        let rc = unsafe {
            f(
                self.0.user_data,
                mine.as_ptr().cast(),
                sizes_raw.as_mut_ptr().cast(),
                8,
            )
        };
        self.rc("allgather callback", rc)?;
        let sizes: Vec<usize> = sizes_raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize)
            .collect();
        let max = sizes.iter().copied().max().unwrap_or(0);
        let mut padded = send.to_vec();
        padded.resize(max, 0);
        let mut all = vec![0u8; max * world];
        if max > 0 {
            // SAFETY: `send` `max` bytes, `recv` `world * max` bytes.
            let rc = unsafe {
                f(
                    self.0.user_data,
                    padded.as_ptr().cast(),
                    all.as_mut_ptr().cast(),
                    max,
                )
            };
            self.rc("allgather callback", rc)?;
        }
        let mut out = Vec::with_capacity(sizes.iter().sum());
        for (r, &s) in sizes.iter().enumerate() {
            out.extend_from_slice(&all[r * max..r * max + s]);
        }
        Ok((out, sizes))
    }
    fn barrier(&mut self) -> Result<(), kfac_runtime::comm::CommError> {
        let f = self
            .0
            .barrier
            .ok_or(kfac_runtime::comm::CommError::InvalidArgument {
                reason: "no barrier callback".into(),
            })?;
        // SAFETY: callback contract.
        let rc = unsafe { f(self.0.user_data) };
        self.rc("barrier callback", rc)
    }
}

/// A communicator built from caller-provided collectives (copied; every
/// callback must be non-NULL, `rank < world_size`).
///
/// # Safety
/// `collectives` NULL or readable; its callbacks and `user_data` stay valid
/// while any preconditioner using the communicator lives; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_from_callbacks(
    collectives: *const KfacCollectives,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if collectives.is_null() {
            return fail(KFAC_ERR_NULL, "collectives is NULL");
        }
        // SAFETY: non-NULL and readable by contract.
        let c = unsafe { *collectives };
        if c.allreduce.is_none()
            || c.broadcast.is_none()
            || c.allgather.is_none()
            || c.barrier.is_none()
        {
            return fail(
                KFAC_ERR_NULL,
                "every callback (allreduce, broadcast, allgather, barrier) is required",
            );
        }
        if c.world_size == 0 || c.rank >= c.world_size {
            return fail(
                KFAC_ERR_INVALID_ARGUMENT,
                format!("rank {} of world {}", c.rank, c.world_size),
            );
        }
        new_comm(Box::new(Callbacks(c)), out);
        Ok(())
    })
}

/// Rank and world size of a communicator.
///
/// # Safety
/// `comm` a live communicator handle; `rank`, `world_size` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_rank(
    comm: *const KfacComm,
    rank: *mut u32,
    world_size: *mut u32,
) -> KfacStatus {
    guard(|| {
        out_ptr(rank, "rank")?;
        out_ptr(world_size, "world_size")?;
        if comm.is_null() {
            return fail(KFAC_ERR_NULL, "comm is NULL");
        }
        if !live(comm as usize, TAG_COMM) {
            return fail(KFAC_ERR_INVALID_HANDLE, "not a live communicator handle");
        }
        // SAFETY: registered live handle.
        let c = unsafe { &*comm };
        let inner = c.inner.as_ref().ok_or_else(|| {
            Fail(
                KFAC_ERR_INVALID_HANDLE,
                "communicator already moved into a preconditioner".into(),
            )
        })?;
        // SAFETY: checked non-NULL, writable by contract.
        unsafe {
            rank.write(inner.rank() as u32);
            world_size.write(inner.size() as u32);
        }
        Ok(())
    })
}

/// Frees a communicator that was not passed to `kfac_precond_create`.
/// NULL is a no-op.
///
/// # Safety
/// `comm` NULL or a handle from `kfac_comm_*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_free(comm: *mut KfacComm) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { free_handle(comm, TAG_COMM, "communicator") }
}

/// Frees a registered handle: NULL is a no-op, an unknown address (freed or
/// foreign) is refused without being dereferenced.
unsafe fn free_handle<T>(h: *mut T, tag: u8, what: &str) -> KfacStatus {
    guard(|| {
        if h.is_null() {
            return Ok(());
        }
        if !unregister(h as usize, tag) {
            return fail(
                KFAC_ERR_INVALID_HANDLE,
                format!("not a live {what} handle (double free?)"),
            );
        }
        // SAFETY: it was registered live, created by Box::into_raw, and is
        // now unregistered, so this is the only release.
        drop(unsafe { Box::from_raw(h) });
        Ok(())
    })
}

// ---- preconditioner ----

fn take_comm(comm: *mut KfacComm) -> R<Box<dyn Communicator>> {
    if comm.is_null() {
        return Ok(Box::new(Local::new()));
    }
    if !live(comm as usize, TAG_COMM) {
        return fail(KFAC_ERR_INVALID_HANDLE, "not a live communicator handle");
    }
    // SAFETY: registered live handle, not used concurrently.
    let c = unsafe { &mut *comm };
    c.inner.take().ok_or_else(|| {
        Fail(
            KFAC_ERR_INVALID_HANDLE,
            "communicator already moved into a preconditioner".into(),
        )
    })
}

fn new_precond(p: Preconditioner, out: *mut *mut KfacPrecond) {
    let raw = Box::into_raw(Box::new(KfacPrecond {
        inner: p,
        poisoned: false,
    }));
    register_handle(raw as usize, TAG_PRECOND);
    // SAFETY: `out` checked non-NULL by the caller.
    unsafe { out.write(raw) };
}

/// Creates a preconditioner. `comm` may be NULL (single process); otherwise
/// the preconditioner takes over the communicator's connection (the `comm`
/// handle must still be freed with `kfac_comm_free`, and cannot be passed to
/// another preconditioner).
///
/// # Safety
/// `config` NULL or readable; `comm` NULL or a live handle; `out` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_precond_create(
    config: *const KfacConfig,
    comm: *mut KfacComm,
    out: *mut *mut KfacPrecond,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if config.is_null() {
            return fail(KFAC_ERR_NULL, "config is NULL");
        }
        // SAFETY: non-NULL and readable by contract.
        let cfg = to_config(unsafe { &*config })?;
        let c = take_comm(comm)?;
        let p = Preconditioner::with_communicator(cfg, c).map_err(map_err)?;
        new_precond(p, out);
        Ok(())
    })
}

/// Frees a preconditioner. NULL is a no-op; a freed handle is refused.
///
/// # Safety
/// `p` NULL or a handle from `kfac_precond_create`/`kfac_load`.
#[no_mangle]
pub unsafe extern "C" fn kfac_precond_free(p: *mut KfacPrecond) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { free_handle(p, TAG_PRECOND, "preconditioner") }
}

fn name_of<'a>(name: *const c_char) -> R<&'a str> {
    if name.is_null() {
        return fail(KFAC_ERR_NULL, "layer name is NULL");
    }
    // SAFETY: non-NULL, NUL-terminated by contract.
    unsafe { CStr::from_ptr(name) }
        .to_str()
        .map_err(|_| Fail(KFAC_ERR_INVALID_ARGUMENT, "layer name is not UTF-8".into()))
}

unsafe fn register(
    p: *mut KfacPrecond,
    name: *const c_char,
    kind: LayerKind,
    out_id: *mut u32,
) -> KfacStatus {
    guard(|| {
        out_ptr(out_id, "out_id")?;
        let name = name_of(name)?;
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let id = pc.register(name, kind).map_err(map_err)?;
                out_id.write(id.0 as u32);
                Ok(())
            })
        }
    })
}

/// Registers a linear layer `y = W x + b` (`W: out x in`).
///
/// # Safety
/// `p` a live handle; `name` a NUL-terminated string; `out_id` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_linear(
    p: *mut KfacPrecond,
    name: *const c_char,
    in_features: usize,
    out_features: usize,
    bias: u32,
    out_id: *mut u32,
) -> KfacStatus {
    let kind = LayerKind::Linear {
        in_features,
        out_features,
        bias: bias != 0,
    };
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// Registers a conv2d layer (groups = 1). `layout` is a `KfacLayout`
/// value (`KFAC_LAYOUT_NCHW` or `KFAC_LAYOUT_NHWC`); any other value is
/// refused with `KFAC_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// As `kfac_register_linear`.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_conv2d(
    p: *mut KfacPrecond,
    name: *const c_char,
    in_channels: usize,
    out_channels: usize,
    kernel_h: usize,
    kernel_w: usize,
    stride_h: usize,
    stride_w: usize,
    pad_h: usize,
    pad_w: usize,
    dilation_h: usize,
    dilation_w: usize,
    bias: u32,
    layout: u32,
    out_id: *mut u32,
) -> KfacStatus {
    let layout = match layout {
        0 => ImageLayout::Nchw,
        1 => ImageLayout::Nhwc,
        _ => {
            set_error("layout must be KFAC_LAYOUT_NCHW or KFAC_LAYOUT_NHWC");
            return KFAC_ERR_INVALID_ARGUMENT;
        }
    };
    let kind = LayerKind::Conv2d(Conv2dSpec {
        in_channels,
        out_channels,
        kernel: (kernel_h, kernel_w),
        stride: (stride_h, stride_w),
        padding: (pad_h, pad_w),
        dilation: (dilation_h, dilation_w),
        bias: bias != 0,
        layout,
    });
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// Registers an embedding (weight `num_embeddings x dim`).
///
/// # Safety
/// As `kfac_register_linear`.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_embedding(
    p: *mut KfacPrecond,
    name: *const c_char,
    num_embeddings: usize,
    dim: usize,
    out_id: *mut u32,
) -> KfacStatus {
    let kind = LayerKind::Embedding {
        num_embeddings,
        dim,
    };
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// A row-major matrix view after checking pointer, sizes and leading
/// dimension.
unsafe fn view<'a>(
    ptr: *const f32,
    rows: usize,
    cols: usize,
    ld: usize,
    what: &str,
) -> R<MatRef<'a, f32>> {
    if ptr.is_null() {
        return fail(KFAC_ERR_NULL, format!("{what} is NULL"));
    }
    if rows == 0 || cols == 0 {
        return fail(
            KFAC_ERR_SHAPE,
            format!("{what}: {rows}x{cols} has a zero dimension"),
        );
    }
    if ld < cols {
        return fail(
            KFAC_ERR_SHAPE,
            format!("{what}: leading dimension {ld} < row length {cols}"),
        );
    }
    let span = (rows - 1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .filter(|&v| v <= isize::MAX as usize / 4)
        .ok_or_else(|| Fail(KFAC_ERR_INVALID_ARGUMENT, format!("{what}: size overflows")))?;
    let _ = span;
    // SAFETY: the caller guarantees `ptr` addresses `(rows-1)*ld + cols`
    // readable floats (documented); strides fit isize (checked above).
    Ok(unsafe { MatRef::from_raw_parts(ptr, rows, cols, ld as isize, 1) })
}

fn layer_kind(pc: &Preconditioner, layer: u32) -> R<LayerKind> {
    pc.layer_kind(LayerId(layer as usize))
        .cloned()
        .map_err(map_err)
}

/// Observes a micro-batch of a linear layer: activations `n x in` (leading
/// dimension `lda`) and output gradients `n x out` (`ldg`). The arrays are
/// read during the call only.
///
/// # Safety
/// `p` a live handle; `a` at least `(n-1)*lda + in` floats, `g` at least
/// `(n-1)*ldg + out`.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_linear(
    p: *mut KfacPrecond,
    layer: u32,
    a: *const f32,
    n: usize,
    lda: usize,
    g: *const f32,
    ldg: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let LayerKind::Linear {
                    in_features,
                    out_features,
                    ..
                } = layer_kind(pc, layer)?
                else {
                    return fail(
                        KFAC_ERR_SHAPE,
                        format!("layer {layer} is not a linear layer"),
                    );
                };
                let a = view(a, n, in_features, lda, "activations")?;
                let g = view(g, n, out_features, ldg, "output gradients")?;
                pc.observe(
                    LayerId(layer as usize),
                    Observation::Linear {
                        activations: a,
                        output_grads: g,
                    },
                )
                .map_err(map_err)
            })
        }
    })
}

/// Observes a micro-batch of a conv2d layer: `input` `(n, C_in, h, w)` and
/// `output_grads` `(n, C_out, H_out, W_out)`, dense in the layer's layout.
///
/// # Safety
/// `p` a live handle; the arrays hold the documented number of floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_conv2d(
    p: *mut KfacPrecond,
    layer: u32,
    input: *const f32,
    output_grads: *const f32,
    n: usize,
    h: usize,
    w: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let LayerKind::Conv2d(spec) = layer_kind(pc, layer)? else {
                    return fail(
                        KFAC_ERR_SHAPE,
                        format!("layer {layer} is not a conv2d layer"),
                    );
                };
                if input.is_null() || output_grads.is_null() {
                    return fail(KFAC_ERR_NULL, "input or output_grads is NULL");
                }
                let geom = spec.geometry(n, h, w);
                let (oh, ow) = geom
                    .output_size()
                    .map_err(|e| Fail(KFAC_ERR_SHAPE, e.to_string()))?;
                let len = |c: usize, y: usize, x: usize| {
                    n.checked_mul(c)
                        .and_then(|v| v.checked_mul(y))
                        .and_then(|v| v.checked_mul(x))
                };
                let (li, lo) = match (len(spec.in_channels, h, w), len(spec.out_channels, oh, ow)) {
                    (Some(a), Some(b))
                        if a > 0
                            && b > 0
                            && a <= isize::MAX as usize / 4
                            && b <= isize::MAX as usize / 4 =>
                    {
                        (a, b)
                    }
                    _ => return fail(KFAC_ERR_SHAPE, "zero or overflowing tensor size"),
                };
                // SAFETY: the caller guarantees these lengths (documented).
                let (xi, xo) = (
                    std::slice::from_raw_parts(input, li),
                    std::slice::from_raw_parts(output_grads, lo),
                );
                pc.observe(
                    LayerId(layer as usize),
                    Observation::Conv2d {
                        input: xi,
                        output_grads: xo,
                        batch: n,
                        height: h,
                        width: w,
                    },
                )
                .map_err(map_err)
            })
        }
    })
}

/// Observes an embedding lookup: `n` token ids and output gradients
/// `n x dim` (`ldg`).
///
/// # Safety
/// `p` a live handle; `tokens` `n` values; `g` `(n-1)*ldg + dim` floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_embedding(
    p: *mut KfacPrecond,
    layer: u32,
    tokens: *const u64,
    n: usize,
    g: *const f32,
    ldg: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let LayerKind::Embedding { dim, .. } = layer_kind(pc, layer)? else {
                    return fail(KFAC_ERR_SHAPE, format!("layer {layer} is not an embedding"));
                };
                if tokens.is_null() {
                    return fail(KFAC_ERR_NULL, "tokens is NULL");
                }
                let gv = view(g, n, dim, ldg, "output gradients")?;
                let t = std::slice::from_raw_parts(tokens, n)
                    .iter()
                    .map(|&v| usize::try_from(v))
                    .collect::<Result<Vec<usize>, _>>()
                    .map_err(|_| {
                        Fail(
                            KFAC_ERR_INVALID_ARGUMENT,
                            "a token id does not fit in size_t".into(),
                        )
                    })?;
                pc.observe(
                    LayerId(layer as usize),
                    Observation::Embedding {
                        tokens: &t,
                        output_grads: gv,
                    },
                )
                .map_err(map_err)
            })
        }
    })
}

/// One K-FAC step over `count` gradients (one per preconditioned layer),
/// preconditioned in place. `stats` may be NULL. Weight and bias buffers
/// must not overlap each other.
///
/// # Safety
/// `p` a live handle; `grads` `count` readable entries whose buffers hold
/// the documented number of floats and stay valid during the call.
#[no_mangle]
pub unsafe extern "C" fn kfac_step(
    p: *mut KfacPrecond,
    grads: *const KfacGrad,
    count: usize,
    stats: *mut KfacStepStats,
) -> KfacStatus {
    guard(|| {
        if grads.is_null() && count > 0 {
            return fail(KFAC_ERR_NULL, "grads is NULL");
        }
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let gs: &[KfacGrad] = if count == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(grads, count)
                };
                let mut lg = grad_views(pc, gs)?;
                let s = pc.step(&mut lg).map_err(map_err)?;
                if !stats.is_null() {
                    stats.write(to_stats(&s));
                }
                Ok(())
            })
        }
    })
}

/// Averages gradients across the ranks of the preconditioner's
/// communicator (`sum / P`, in place), for stacks that do not average them
/// themselves. Same buffers and rules as `kfac_step`.
///
/// # Safety
/// As `kfac_step`.
#[no_mangle]
pub unsafe extern "C" fn kfac_allreduce_gradients(
    p: *mut KfacPrecond,
    grads: *const KfacGrad,
    count: usize,
) -> KfacStatus {
    guard(|| {
        if grads.is_null() && count > 0 {
            return fail(KFAC_ERR_NULL, "grads is NULL");
        }
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let gs: &[KfacGrad] = if count == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(grads, count)
                };
                let mut lg = grad_views(pc, gs)?;
                pc.allreduce_gradients(&mut lg).map_err(map_err)
            })
        }
    })
}

/// Checked, non-overlapping views of the caller's gradient buffers.
unsafe fn grad_views<'a>(pc: &Preconditioner, gs: &[KfacGrad]) -> R<Vec<LayerGrad<'a>>> {
    let mut spans: Vec<(usize, usize, u32)> = Vec::new();
    for g in gs {
        let kind = layer_kind(pc, g.layer)?;
        let (r, c) = kind.weight_shape();
        if g.weight.is_null() {
            return fail(KFAC_ERR_NULL, format!("layer {}: weight is NULL", g.layer));
        }
        if g.ldw < c {
            return fail(
                KFAC_ERR_SHAPE,
                format!("layer {}: ldw {} < row length {c}", g.layer, g.ldw),
            );
        }
        let wlen = (r - 1)
            .checked_mul(g.ldw)
            .and_then(|v| v.checked_add(c))
            .filter(|&v| v <= isize::MAX as usize / 4)
            .ok_or_else(|| Fail(KFAC_ERR_INVALID_ARGUMENT, "weight size overflows".into()))?;
        spans.push((g.weight as usize, g.weight as usize + wlen * 4, g.layer));
        if kind.has_bias() == g.bias.is_null() {
            return fail(
                KFAC_ERR_SHAPE,
                format!(
                    "layer {}: bias pointer must be {} for this layer",
                    g.layer,
                    if kind.has_bias() { "non-NULL" } else { "NULL" }
                ),
            );
        }
        if !g.bias.is_null() {
            spans.push((g.bias as usize, g.bias as usize + r * 4, g.layer));
        }
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return fail(
            KFAC_ERR_INVALID_ARGUMENT,
            format!(
                "gradient buffers of layers {} and {} overlap",
                w[0].2, w[1].2
            ),
        );
    }
    let mut lg = Vec::with_capacity(gs.len());
    for g in gs {
        let (r, c) = layer_kind(pc, g.layer)?.weight_shape();
        // SAFETY: non-NULL, sized as documented, non-overlapping (checked),
        // valid for the duration of the call by contract.
        let w = unsafe { MatMut::from_raw_parts_mut(g.weight, r, c, g.ldw as isize, 1) };
        let b = if g.bias.is_null() {
            None
        } else {
            // SAFETY: as above, `r` floats.
            Some(unsafe { std::slice::from_raw_parts_mut(g.bias, r) })
        };
        lg.push(LayerGrad {
            layer: LayerId(g.layer as usize),
            weight: w,
            bias: b,
        });
    }
    Ok(lg)
}

fn to_stats(s: &kfac_runtime::StepStats) -> KfacStepStats {
    KfacStepStats {
        step: s.step,
        factors_updated: s.factors_updated as u32,
        inverses_updated: s.inverses_updated as u32,
        kl_scale: s.kl_scale,
        factor_update_s: s.times.factor_update.as_secs_f64(),
        inversion_s: s.times.inversion.as_secs_f64(),
        preconditioning_s: s.times.preconditioning.as_secs_f64(),
        communication_s: s.times.communication.as_secs_f64(),
        total_s: s.times.total.as_secs_f64(),
        state_bytes: s.state_bytes as u64,
    }
}

/// Statistics and stage timings of the last step.
///
/// # Safety
/// `p` a live handle; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_last_stats(
    p: *mut KfacPrecond,
    out: *mut KfacStepStats,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| match pc.last_stats() {
                Some(s) => {
                    out.write(to_stats(s));
                    Ok(())
                }
                None => fail(KFAC_ERR_STATE, "no step has completed yet"),
            })
        }
    })
}

/// Bytes `kfac_save` needs for the current state.
///
/// # Safety
/// `p` a live handle; `out_size` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_save_size(p: *mut KfacPrecond, out_size: *mut usize) -> KfacStatus {
    guard(|| {
        out_ptr(out_size, "out_size")?;
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                out_size.write(pc.save().len());
                Ok(())
            })
        }
    })
}

/// Writes the full state (the documented checkpoint format) into `buf` of
/// `len` bytes; `written` receives the size. `KFAC_ERR_BUFFER_TOO_SMALL`
/// when `len` is short (nothing is written).
///
/// # Safety
/// `p` a live handle; `buf` `len` writable bytes; `written` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_save(
    p: *mut KfacPrecond,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> KfacStatus {
    guard(|| {
        out_ptr(buf, "buf")?;
        out_ptr(written, "written")?;
        // SAFETY: forwarded contract.
        unsafe {
            with_precond(p, |pc| {
                let bytes = pc.save();
                if bytes.len() > len {
                    return fail(
                        KFAC_ERR_BUFFER_TOO_SMALL,
                        format!("checkpoint needs {} bytes, buffer has {len}", bytes.len()),
                    );
                }
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
                written.write(bytes.len());
                Ok(())
            })
        }
    })
}

/// Restores a preconditioner from `kfac_save`'s bytes, with `comm` as for
/// `kfac_precond_create`.
///
/// # Safety
/// `buf` `len` readable bytes; `comm` NULL or live; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_load(
    buf: *const u8,
    len: usize,
    comm: *mut KfacComm,
    out: *mut *mut KfacPrecond,
) -> KfacStatus {
    guard(|| {
        out_ptr(out, "out")?;
        if buf.is_null() {
            return fail(KFAC_ERR_NULL, "buf is NULL");
        }
        // SAFETY: `len` readable bytes by contract.
        let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
        let mut p = Preconditioner::load(bytes).map_err(map_err)?;
        p.set_communicator(take_comm(comm)?);
        new_precond(p, out);
        Ok(())
    })
}
