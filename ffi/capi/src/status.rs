//! Status codes, the thread-local last error, and [`guard`], the wrapper
//! every entry point runs its body in (panics are caught there and never
//! cross the boundary).
//!
//! The status of a runtime error comes from [`kfac_runtime::Error::kind`]
//! alone (one exhaustive `match`, never the message text). Nothing here
//! knows about handles, views or configurations.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kfac_runtime::{Error, ErrorKind};

/// Status of every call. `KFAC_OK` is 0; details of any other status are in
/// `kfac_last_error()`, and `kfac_status_string()` names it. After a
/// failing call every handle and caller buffer is as it was before.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum KfacStatus {
    /// Success.
    KFAC_OK = 0,
    /// A required pointer was NULL (any call; `kfac_*_free(NULL)` and the
    /// optional `comm` and `stats` arguments are not errors).
    KFAC_ERR_NULL = 1,
    /// A value is out of range: a configuration field (`kfac_precond_create`,
    /// including a non-finite `kl_clip`), a `struct_size`
    /// (`kfac_precond_create`, `kfac_comm_from_callbacks`, `kfac_config_*`,
    /// `kfac_collectives_init`), a flag other than 0/1, an empty or
    /// non-UTF-8 name, an unknown layout (`kfac_register_*`), an unknown
    /// layer id (`kfac_observe_*`, `kfac_step`, `kfac_allreduce_gradients`),
    /// overlapping gradient buffers (`kfac_step`,
    /// `kfac_allreduce_gradients`), a size that overflows, a bad rank, world
    /// size or timeout (`kfac_comm_*`), a library without MPI
    /// (`kfac_comm_mpi`).
    KFAC_ERR_INVALID_ARGUMENT = 2,
    /// Sizes or leading dimensions do not fit the layer, or an observation
    /// of the wrong layer kind (`kfac_observe_*`, `kfac_step`,
    /// `kfac_allreduce_gradients`).
    KFAC_ERR_SHAPE = 3,
    /// An input holds NaN or Inf, or a result computed from it would
    /// (`kfac_observe_*`, `kfac_step`).
    KFAC_ERR_NON_FINITE = 4,
    /// Calls out of order (`kfac_step` without the observations a factor
    /// update needs or without a gradient for a layer, `kfac_register_*`
    /// after the first step, `kfac_last_stats` before the first step).
    KFAC_ERR_STATE = 5,
    /// A numerical failure: a factor that is not positive definite after
    /// damping, an eigensolver that did not converge (`kfac_step`).
    KFAC_ERR_NUMERICAL = 6,
    /// A collective failed (dead or stuck peer, timeout, mismatch between
    /// ranks, a callback that returned non-zero, another rank's failure),
    /// or a communicator could not be built (`kfac_comm_*`, `kfac_step`,
    /// `kfac_allreduce_gradients`).
    KFAC_ERR_COMM = 7,
    /// A checkpoint was refused: truncated, corrupted, incompatible
    /// (`kfac_load`).
    KFAC_ERR_CHECKPOINT = 8,
    /// A caller buffer is too small (`kfac_save`; nothing is written).
    KFAC_ERR_BUFFER_TOO_SMALL = 9,
    /// A freed, foreign or poisoned handle, or a communicator whose
    /// connection a preconditioner already took (any call taking a handle).
    KFAC_ERR_INVALID_HANDLE = 10,
    /// An internal panic was caught (the handle in use is now poisoned).
    KFAC_ERR_PANIC = 11,
    /// The system refused a resource (a thread pool could not be built:
    /// `kfac_precond_create`, `kfac_load`).
    KFAC_ERR_RESOURCE = 12,
    /// The handle is in use by a call on another thread (any call taking a
    /// handle, `kfac_*_free` included; nothing was done, retry later). A
    /// handle serves one call at a time, read-only calls included; calls on
    /// different handles run concurrently.
    KFAC_ERR_BUSY = 13,
    /// Memory could not be allocated, or the preconditioner's memory budget
    /// (`KfacConfig.memory_budget`) would be exceeded; the message gives the
    /// bytes needed. Nothing was changed and the handle stays usable (a
    /// step keeps the statistics observed since the last step: it can be
    /// retried as it was; with several ranks, every rank fails the step).
    KFAC_ERR_NO_MEMORY = 14,
}

use KfacStatus::*;

impl KfacStatus {
    /// The status with code `code`, if there is one.
    pub fn from_code(code: i32) -> Option<KfacStatus> {
        const ALL: [KfacStatus; 15] = [
            KFAC_OK,
            KFAC_ERR_NULL,
            KFAC_ERR_INVALID_ARGUMENT,
            KFAC_ERR_SHAPE,
            KFAC_ERR_NON_FINITE,
            KFAC_ERR_STATE,
            KFAC_ERR_NUMERICAL,
            KFAC_ERR_COMM,
            KFAC_ERR_CHECKPOINT,
            KFAC_ERR_BUFFER_TOO_SMALL,
            KFAC_ERR_INVALID_HANDLE,
            KFAC_ERR_PANIC,
            KFAC_ERR_RESOURCE,
            KFAC_ERR_BUSY,
            KFAC_ERR_NO_MEMORY,
        ];
        usize::try_from(code).ok().and_then(|i| ALL.get(i)).copied()
    }

    /// The status of a runtime error of kind `kind`.
    pub fn of_kind(kind: ErrorKind) -> KfacStatus {
        match kind {
            ErrorKind::InvalidArgument | ErrorKind::UnknownLayer => KFAC_ERR_INVALID_ARGUMENT,
            ErrorKind::Shape => KFAC_ERR_SHAPE,
            ErrorKind::NonFinite => KFAC_ERR_NON_FINITE,
            ErrorKind::State => KFAC_ERR_STATE,
            ErrorKind::Numerical => KFAC_ERR_NUMERICAL,
            ErrorKind::Comm | ErrorKind::PeerFailed => KFAC_ERR_COMM,
            ErrorKind::Checkpoint => KFAC_ERR_CHECKPOINT,
            ErrorKind::Resource => KFAC_ERR_RESOURCE,
            ErrorKind::OutOfMemory => KFAC_ERR_NO_MEMORY,
            // `ErrorKind` is `#[non_exhaustive]`; a kind added to the
            // runtime needs a row above (the status test checks every kind
            // the runtime produces through the C functions).
            _ => KFAC_ERR_INVALID_ARGUMENT,
        }
    }

    fn describe(self) -> &'static CStr {
        match self {
            KFAC_OK => c"KFAC_OK: success",
            KFAC_ERR_NULL => c"KFAC_ERR_NULL: a required pointer was NULL",
            KFAC_ERR_INVALID_ARGUMENT => c"KFAC_ERR_INVALID_ARGUMENT: a value is out of range",
            KFAC_ERR_SHAPE => c"KFAC_ERR_SHAPE: sizes or leading dimensions do not fit the layer",
            KFAC_ERR_NON_FINITE => c"KFAC_ERR_NON_FINITE: an input holds NaN or Inf",
            KFAC_ERR_STATE => c"KFAC_ERR_STATE: calls out of order",
            KFAC_ERR_NUMERICAL => c"KFAC_ERR_NUMERICAL: a numerical failure",
            KFAC_ERR_COMM => c"KFAC_ERR_COMM: a collective failed",
            KFAC_ERR_CHECKPOINT => c"KFAC_ERR_CHECKPOINT: a checkpoint was refused",
            KFAC_ERR_BUFFER_TOO_SMALL => c"KFAC_ERR_BUFFER_TOO_SMALL: a caller buffer is too small",
            KFAC_ERR_INVALID_HANDLE => {
                c"KFAC_ERR_INVALID_HANDLE: a freed, foreign or poisoned handle"
            }
            KFAC_ERR_PANIC => c"KFAC_ERR_PANIC: an internal panic was caught",
            KFAC_ERR_RESOURCE => c"KFAC_ERR_RESOURCE: the system refused a resource",
            KFAC_ERR_BUSY => c"KFAC_ERR_BUSY: the handle is in use by another thread",
            KFAC_ERR_NO_MEMORY => c"KFAC_ERR_NO_MEMORY: out of memory or over the memory budget",
        }
    }
}

/// A failed call: the status and the message for `kfac_last_error`.
#[derive(Debug)]
pub struct Fail(
    /// The status.
    pub KfacStatus,
    /// What went wrong, in words.
    pub String,
);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail(KfacStatus::of_kind(e.kind()), e.to_string())
    }
}

pub(crate) type R<T> = Result<T, Fail>;

pub(crate) fn fail<T>(status: KfacStatus, msg: impl Into<String>) -> R<T> {
    Err(Fail(status, msg.into()))
}

/// `KFAC_ERR_NULL` naming `what` when `p` is NULL.
pub(crate) fn non_null<T>(p: *const T, what: &str) -> R<()> {
    if p.is_null() {
        return fail(KFAC_ERR_NULL, format!("{what} is NULL"));
    }
    Ok(())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let s = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(s).unwrap_or_default());
}

/// Runs an entry point's body: catches panics (`KFAC_ERR_PANIC`) and
/// records the message of a failure as the thread's last error.
pub(crate) fn guard(f: impl FnOnce() -> R<()>) -> KfacStatus {
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

/// The last error message of the calling thread (empty when none). The
/// string is owned by the library and valid until the next failing call on
/// this thread.
#[no_mangle]
pub extern "C" fn kfac_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A static description of `status` starting with its name (e.g.
/// "KFAC_ERR_NULL: a required pointer was NULL"); "unknown status" for a
/// value that is not a `KfacStatus`. Never NULL; owned by the library and
/// valid for the life of the process. Takes a plain integer, so any value
/// is well-defined. Thread-safe.
#[no_mangle]
pub extern "C" fn kfac_status_string(status: i32) -> *const c_char {
    KfacStatus::from_code(status)
        .map_or(c"unknown status", KfacStatus::describe)
        .as_ptr()
}

/// Provokes an internal panic inside the library (for testing that no panic
/// crosses the boundary). Always returns `KFAC_ERR_PANIC`.
#[no_mangle]
pub extern "C" fn kfac_test_panic() -> KfacStatus {
    guard(|| panic!("requested by kfac_test_panic"))
}
