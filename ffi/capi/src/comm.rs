//! Communicator handles (`KfacComm`) and their constructors: single
//! process, shared-memory group, MPI, caller callbacks.
//!
//! Every communicator is built by `kfac-runtime` (this crate makes no MPI
//! or OS calls itself); a constructor's failure is `KFAC_ERR_COMM`, a bad
//! argument `KFAC_ERR_INVALID_ARGUMENT`.

use std::ffi::{c_char, CStr};
use std::time::Duration;

use kfac_runtime::comm::shm::{ShmGroup, ShmOptions};
use kfac_runtime::comm::{CommError, Communicator, Local};

use crate::callbacks::{Callbacks, KfacCollectives};
use crate::extensible;
use crate::handle::{self, Handle, Kind};
use crate::status::{fail, guard, non_null, Fail, KfacStatus, R};

/// A communicator (single process, shared-memory group, MPI or caller
/// collectives). Opaque.
pub struct KfacComm {
    /// `None` once a preconditioner has taken the connection.
    inner: Option<Box<dyn Communicator>>,
}

impl Handle for KfacComm {
    const KIND: Kind = Kind::Comm;
}

fn comm_err(e: CommError) -> Fail {
    Fail(KfacStatus::KFAC_ERR_COMM, e.to_string())
}

fn timeout(timeout_ms: u64) -> R<Duration> {
    if timeout_ms == 0 {
        return fail(
            KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
            "timeout_ms must be > 0",
        );
    }
    Ok(Duration::from_millis(timeout_ms))
}

fn shm_options(timeout: Duration) -> ShmOptions {
    ShmOptions {
        timeout,
        ..ShmOptions::default()
    }
}

/// # Safety
/// `out` non-NULL and writable.
unsafe fn publish(c: Box<dyn Communicator>, out: *mut *mut KfacComm) -> R<()> {
    // SAFETY: forwarded contract.
    unsafe { handle::publish(KfacComm { inner: Some(c) }, out) }
}

/// Takes the connection of `comm` for a preconditioner (a private
/// single-process one when `comm` is NULL).
///
/// # Safety
/// `comm` NULL or not used by another thread during the call.
pub(crate) unsafe fn take(comm: *mut KfacComm) -> R<Box<dyn Communicator>> {
    if comm.is_null() {
        return Ok(Box::new(Local::new()));
    }
    // SAFETY: forwarded contract.
    unsafe {
        handle::with_mut(comm, |c| {
            c.inner.take().ok_or_else(|| {
                Fail(
                    KfacStatus::KFAC_ERR_INVALID_HANDLE,
                    "communicator already moved into a preconditioner".into(),
                )
            })
        })
    }
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
        non_null(out, "out")?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { publish(Box::new(Local::new()), out) }?;
        Ok(())
    })
}

/// Joins the shared-memory group of this process's environment
/// (`KFAC_RANK`, `KFAC_WORLD_SIZE`, `KFAC_GROUP` as set by `kfac-launch`, or
/// `RANK`/`WORLD_SIZE`, Open MPI's or MPICH's variables), waiting at most
/// `timeout_ms` for every wait. Blocks until every rank has joined. The job
/// id `KFAC_JOB_ID` (set by `kfac-launch`) is checked at join: a rank of
/// another job using the same group name is refused (`KFAC_ERR_COMM`).
///
/// # Safety
/// As `kfac_comm_local`.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_shm_from_env(
    timeout_ms: u64,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        let g = ShmGroup::from_env(shm_options(timeout(timeout_ms)?)).map_err(comm_err)?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { publish(Box::new(g), out) }?;
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
/// (`kfac_has_mpi() == 0`), for `hierarchical` > 1 or `timeout_ms` 0;
/// `KFAC_ERR_COMM` when MPI is not initialized, already finalized, or
/// `comm` is `MPI_COMM_NULL` or an intercommunicator.
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
        non_null(out, "out")?;
        let timeout = timeout(timeout_ms)?;
        if hierarchical > 1 {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!("hierarchical must be 0 or 1, got {hierarchical}"),
            );
        }
        #[cfg(feature = "mpi")]
        {
            use kfac_runtime::comm::hier::{HierComm, HierOptions};
            use kfac_runtime::comm::mpi::{MpiComm, MpiOptions};
            let mpi = MpiOptions {
                timeout,
                ..MpiOptions::default()
            };
            let c: Box<dyn Communicator> = if hierarchical == 1 {
                let opts = HierOptions {
                    mpi,
                    shm: shm_options(timeout),
                    ..HierOptions::default()
                };
                // SAFETY: `fortran_comm` comes from MPI_Comm_c2f of the
                // linked MPI (the caller's contract).
                Box::new(unsafe { HierComm::from_fortran(fortran_comm, opts) }.map_err(comm_err)?)
            } else {
                // SAFETY: as above.
                Box::new(unsafe { MpiComm::from_fortran(fortran_comm, mpi) }.map_err(comm_err)?)
            };
            // SAFETY: checked non-NULL; writable by contract.
            unsafe { publish(c, out) }?;
            Ok(())
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = (fortran_comm, timeout);
            fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                "this libkfac was built without MPI (build kfac-ffi with --features mpi)",
            )
        }
    })
}

/// Joins (rank 0: creates) the shared-memory group `group` as `rank` of
/// `world_size`. Blocks until every rank has joined, at most `timeout_ms`.
/// `KFAC_ERR_INVALID_ARGUMENT` for `rank >= world_size`, a zero timeout or
/// a name that is not UTF-8; `KFAC_ERR_COMM` when joining fails.
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
        non_null(out, "out")?;
        non_null(group, "group")?;
        // SAFETY: non-NULL, NUL-terminated by contract.
        let name = unsafe { CStr::from_ptr(group) }.to_str().map_err(|_| {
            Fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                "group is not UTF-8".into(),
            )
        })?;
        if rank >= world_size {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!("rank {rank} of world size {world_size}"),
            );
        }
        let opts = shm_options(timeout(timeout_ms)?);
        let g = ShmGroup::join(name, rank as usize, world_size as usize, opts).map_err(comm_err)?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { publish(Box::new(g), out) }?;
        Ok(())
    })
}

/// A communicator built from caller-provided collectives (copied; see
/// `KfacCollectives` for `struct_size`; every callback must be non-NULL,
/// `rank < world_size`). `KFAC_ERR_NULL` for a NULL argument or callback,
/// `KFAC_ERR_INVALID_ARGUMENT` for a bad `struct_size`, rank or world size.
///
/// # Safety
/// `collectives` NULL or `collectives->struct_size` readable bytes; its
/// callbacks and `user_data` stay valid while any preconditioner using the
/// communicator lives; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_from_callbacks(
    collectives: *const KfacCollectives,
    out: *mut *mut KfacComm,
) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: forwarded contract.
        let c = unsafe { extensible::read(collectives, "collectives") }?;
        let cb = Callbacks::new(c)?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { publish(Box::new(cb), out) }?;
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
        non_null(rank, "rank")?;
        non_null(world_size, "world_size")?;
        // SAFETY: forwarded contract.
        let (r, w) = unsafe {
            handle::with_ref(comm, |c| match &c.inner {
                Some(inner) => Ok((inner.rank(), inner.size())),
                None => fail(
                    KfacStatus::KFAC_ERR_INVALID_HANDLE,
                    "communicator already moved into a preconditioner",
                ),
            })
        }?;
        // SAFETY: checked non-NULL, writable by contract.
        unsafe {
            rank.write(r as u32);
            world_size.write(w as u32);
        }
        Ok(())
    })
}

/// Frees a communicator handle (whether or not a preconditioner took its
/// connection). NULL is a no-op; a freed handle is refused
/// (`KFAC_ERR_INVALID_HANDLE`), one in use by a call on another thread too
/// (`KFAC_ERR_BUSY`; it stays live).
///
/// # Safety
/// `comm` NULL or a handle from `kfac_comm_*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kfac_comm_free(comm: *mut KfacComm) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { handle::free(comm) }
}
