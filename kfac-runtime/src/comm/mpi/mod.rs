//! [`MpiComm`]: the collectives over MPI (the `mpi` feature, rsmpi).
//!
//! # Who owns MPI
//!
//! The caller. `MpiComm` never initializes or finalizes MPI: it duplicates
//! the communicator it is given (`MPI_Comm_dup`, so its traffic can never
//! match the caller's own messages) and frees the duplicate when dropped
//! (unless MPI has been finalized by then, in which case the handle is
//! simply forgotten). A program that does not use MPI otherwise can call
//! [`init`], which initializes MPI if nobody has yet and returns the
//! [`Universe`](mpi::environment::Universe) that must be kept alive until
//! the end (dropping it calls `MPI_Finalize`).
//!
//! # Determinism
//!
//! [`Communicator`] promises that reductions add contributions in rank
//! order, so a fixed world size gives bitwise identical results.
//! `MPI_Allreduce` with `MPI_SUM` promises no order, so it is not used.
//! Instead a reduction is a reduce-scatter followed by an allgather, both
//! written here:
//!
//! 1. the buffer is cut into P blocks, block r belonging to rank r;
//!    `MPI_Ialltoallv` sends every rank's copy of block r to rank r;
//! 2. rank r sums the P copies of its block in rank order,
//!    `((x_0 + x_1) + x_2) + ...`, exactly as the shared-memory group does
//!    (so the two give the same bits for the same P);
//! 3. `MPI_Iallgatherv` (allreduce) or `MPI_Igatherv` (reduce to a root)
//!    brings the summed blocks together.
//!
//! Each rank sends and receives `2 (P-1)/P` times the buffer, the same as a
//! bandwidth-optimal ring allreduce.
//!
//! # Timeouts and staging
//!
//! Every operation is a non-blocking MPI collective polled with `MPI_Test`
//! until it completes or [`MpiOptions::timeout`] passes. MPI cannot cancel a
//! collective, so on a timeout the operation stays pending inside MPI: to
//! make returning safe, MPI only ever reads and writes staging buffers
//! owned by the communicator (the caller's data is copied in and out), and
//! after a timeout those buffers are leaked, never freed, and the
//! communicator is marked broken (every later call returns the same error).
//! Messages are cut into segments of [`MpiOptions::segment_bytes`], which
//! bounds the staging memory (about two segments) and keeps every MPI count
//! far below `i32::MAX`.
//!
//! Before each collective the ranks exchange a small descriptor (operation,
//! element type, length, root): different lengths or roots on different
//! ranks are reported on every rank as [`CommError::InvalidArgument`] (the
//! communicator stays usable) instead of corrupting data.
//!
//! # What MPI can and cannot report
//!
//! The duplicated communicator has `MPI_ERRORS_RETURN` set, so a failing
//! MPI call becomes [`CommError::Mpi`] rather than aborting the process.
//! A peer that dies is a different matter: Open MPI's `mpirun` (and Slurm's
//! `srun`) notice a process that exits without `MPI_Finalize` and terminate
//! the whole job, so the surviving ranks are killed (the job ends with a
//! non-zero status) rather than returning an error. A peer that is alive but
//! stuck (or calls a different collective) is caught by the timeout. Rust
//! programs should not let a panic unwind past their `Universe` while other
//! ranks are inside a collective: dropping it calls `MPI_Finalize`, which
//! waits for the other ranks; call [`abort_world`] or [`MpiComm::abort`]
//! (`MPI_Abort`) instead, as the `mpi_check` example's panic hook does.
//!
//! ```no_run
//! use kfac_runtime::comm::{mpi::{MpiComm, MpiOptions}, Communicator};
//! let _universe = kfac_runtime::comm::mpi::init()?; // keep alive until the end
//! let mut c = MpiComm::world(MpiOptions::default())?;
//! let mut v = vec![c.rank() as f32; 8];
//! c.allreduce_f32(&mut v)?;
//! # Ok::<(), kfac_runtime::comm::CommError>(())
//! ```

use std::os::raw::c_int;
use std::time::Duration;

use mpi::ffi;
use mpi::raw::AsRaw;

use super::{CommError, Communicator, ReduceType};

/// Default bound on every collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default segment size (payload bytes per MPI call): 256 KiB, the best
/// of 256 KiB .. 16 MiB for 2 ranks on one machine in `mpi_bench` (the
/// staging buffers stay in cache).
pub const DEFAULT_SEGMENT_BYTES: usize = 256 << 10;
/// Largest accepted [`MpiOptions::segment_bytes`] (1 GiB: with the
/// per-rank remainder of a reduce-scatter, every count stays below
/// `i32::MAX`).
pub const MAX_SEGMENT_BYTES: usize = 1 << 30;

/// Options of an MPI communicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpiOptions {
    /// Bound on every collective (each segment of it).
    pub timeout: Duration,
    /// Payload bytes per MPI call; larger messages are cut into segments.
    /// A multiple of 8 in `[64, MAX_SEGMENT_BYTES]`.
    pub segment_bytes: usize,
}

impl Default for MpiOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// Initializes MPI (thread level `MPI_THREAD_SERIALIZED`, so the
/// communicator may be moved to another thread) if it is not initialized
/// yet. Returns the [`Universe`](mpi::environment::Universe) when this call
/// initialized MPI (keep it alive: dropping it finalizes MPI), `None` when
/// MPI was already initialized by someone else (who then owns finalizing).
///
/// # Errors
/// [`CommError::Mpi`] when MPI has already been finalized (it cannot be
/// initialized twice).
pub fn init() -> Result<Option<mpi::environment::Universe>, CommError> {
    if mpi::is_finalized() {
        return Err(mpi_setup("MPI has already been finalized"));
    }
    if mpi::is_initialized() {
        return Ok(None);
    }
    Ok(mpi::initialize_with_threading(mpi::Threading::Serialized).map(|(u, _)| u))
}

/// Terminates every process of the MPI job (`MPI_Abort` on
/// `MPI_COMM_WORLD`) with `code`, for a rank that cannot go on (an error
/// or a panic hook): unlike returning, which finalizes MPI while the other
/// ranks may wait in a collective, it cannot leave them waiting. Without a
/// live MPI it just exits the process.
pub fn abort_world(code: i32) -> ! {
    if mpi::is_initialized() && !mpi::is_finalized() {
        // SAFETY: MPI is initialized and not finalized (checked above);
        // the world handle is valid then. MPI_Abort does not return when
        // it succeeds.
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    }
    std::process::exit(if code == 0 { 1 } else { code })
}

/// The ranks of an MPI communicator (a duplicate of the caller's).
///
/// Ranks are the communicator's own. See the [module docs](self) for
/// ownership of MPI, determinism, timeouts and failure reporting.
pub struct MpiComm {
    comm: ffi::MPI_Comm,
    rank: usize,
    size: usize,
    opts: MpiOptions,
    /// Staging for MPI send buffers (u64 backing: aligned for f32/f64).
    send: Vec<u64>,
    /// Staging for MPI receive buffers.
    recv: Vec<u64>,
    /// Counts and displacements of the pending operation (MPI may read
    /// them until it completes, so they are staged like the data).
    meta: Vec<c_int>,
    broken: Option<CommError>,
}

// SAFETY: the communicator handle is owned by this value and used only
// through `&mut self`, so calls are serialized; `init` asks for
// MPI_THREAD_SERIALIZED, which allows calls from any one thread at a time
// (a caller that initialized MPI itself must do the same to move it).
unsafe impl Send for MpiComm {}

fn mpi_setup(reason: &str) -> CommError {
    CommError::Mpi {
        call: "setup",
        code: 0,
        reason: reason.to_string(),
    }
}

/// Maps an MPI return code to a `CommError` (`MPI_SUCCESS` is 0).
fn check(rc: c_int, call: &'static str) -> Result<(), CommError> {
    if rc == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds MPI_MAX_ERROR_STRING + 1 bytes, as required;
    // `len` is writable. MPI_Error_string may be called on any code.
    let ok = unsafe { ffi::MPI_Error_string(rc, buf.as_mut_ptr().cast(), &mut len) };
    let reason = if ok == ffi::MPI_SUCCESS as c_int {
        let n = (len.max(0) as usize).min(buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    } else {
        "unknown MPI error".to_string()
    };
    Err(CommError::Mpi {
        call,
        code: rc,
        reason,
    })
}

mod collectives;

use collectives::OP_BARRIER;

impl MpiComm {
    /// A duplicate of `MPI_COMM_WORLD`. Collective: every rank of the world
    /// must call it.
    ///
    /// # Errors
    /// [`CommError::Mpi`] when MPI is not initialized (see [`init`]) or
    /// already finalized, or duplicating fails; [`CommError::InvalidArgument`]
    /// for bad options.
    pub fn world(opts: MpiOptions) -> Result<Self, CommError> {
        ensure_live()?;
        // SAFETY: MPI is initialized and not finalized (checked above), so
        // the world handle is live; it is an intra-communicator.
        unsafe { Self::from_raw(ffi::RSMPI_COMM_WORLD, opts) }
    }

    /// A duplicate of `comm` (any rsmpi intra-communicator: the world, a
    /// split, ...). Collective over `comm`. `comm` stays the caller's.
    ///
    /// # Errors
    /// As [`world`](Self::world).
    pub fn from_communicator<C>(comm: &C, opts: MpiOptions) -> Result<Self, CommError>
    where
        C: mpi::topology::Communicator + AsRaw<Raw = ffi::MPI_Comm>,
    {
        ensure_live()?;
        // SAFETY: an rsmpi communicator is a live handle while MPI is
        // initialized (checked above); rsmpi intercommunicators are refused
        // by `from_raw`'s MPI_Comm_test_inter check.
        unsafe { Self::from_raw(comm.as_raw(), opts) }
    }

    /// A duplicate of the raw handle `comm` (for a C caller passing its
    /// `MPI_Comm`). Collective over `comm`. `comm` stays the caller's: it
    /// is neither freed nor used after this call.
    ///
    /// # Safety
    /// MPI must be initialized and not finalized, and `comm` must be a
    /// valid communicator handle of the MPI library this crate is linked
    /// against (`MPI_COMM_NULL` and intercommunicators are refused with an
    /// error; any other invalid value is undefined behaviour, as in C).
    /// Every rank of `comm` must make the same call.
    ///
    /// # Errors
    /// As [`world`](Self::world); [`CommError::InvalidArgument`] for
    /// `MPI_COMM_NULL` or an intercommunicator.
    pub unsafe fn from_raw(comm: ffi::MPI_Comm, opts: MpiOptions) -> Result<Self, CommError> {
        check_opts(&opts)?;
        ensure_live()?;
        // SAFETY: reading a constant handle of the bindings' C shim.
        if comm == unsafe { ffi::RSMPI_COMM_NULL } {
            return Err(CommError::InvalidArgument {
                reason: "MPI_COMM_NULL is not a communicator".into(),
            });
        }
        let mut inter: c_int = 0;
        // SAFETY: `comm` is a valid handle (caller's contract); `inter` is
        // writable.
        let rc = unsafe { ffi::MPI_Comm_test_inter(comm, &mut inter) };
        check(rc, "MPI_Comm_test_inter")?;
        if inter != 0 {
            return Err(CommError::InvalidArgument {
                reason: "an intercommunicator cannot carry K-FAC collectives".into(),
            });
        }
        // SAFETY: an all-zero handle is a valid placeholder to be written.
        let mut dup: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
        // SAFETY: `comm` is a valid intra-communicator, `dup` is writable;
        // collective over `comm` (caller's contract).
        check(unsafe { ffi::MPI_Comm_dup(comm, &mut dup) }, "MPI_Comm_dup")?;
        // SAFETY: `dup` is the fresh communicator just created.
        unsafe { Self::from_owned(dup, opts) }
    }

    /// A duplicate of the communicator whose Fortran handle is `fcomm`
    /// (`MPI_Comm_c2f(comm)` on the C side, an `MPI_Fint`): converts it with
    /// `MPI_Comm_f2c` and proceeds as [`from_raw`](Self::from_raw). For C
    /// callers that cannot name `MPI_Comm` (its type differs between MPI
    /// implementations), e.g. `kfac_comm_mpi`. Collective over the
    /// communicator; it stays the caller's.
    ///
    /// # Safety
    /// `fcomm` is a value returned by `MPI_Comm_c2f` of the MPI library
    /// this crate is linked against, for a communicator that is still
    /// live (`MPI_COMM_NULL`'s handle and intercommunicators are refused
    /// with an error; another value is undefined behaviour in some MPI
    /// implementations, as in C). Every rank of the communicator makes the
    /// same call.
    ///
    /// # Errors
    /// As [`from_raw`](Self::from_raw); MPI not initialized (or already
    /// finalized) is checked before the handle is converted.
    pub unsafe fn from_fortran(fcomm: i32, opts: MpiOptions) -> Result<Self, CommError> {
        check_opts(&opts)?;
        ensure_live()?;
        // SAFETY: MPI is initialized and not finalized (checked above);
        // `fcomm` is a Fortran handle of this MPI (caller's contract).
        let comm = unsafe { ffi::MPI_Comm_f2c(fcomm) };
        // SAFETY: `comm` is the caller's communicator (or MPI_COMM_NULL,
        // refused inside); forwarded contract.
        unsafe { Self::from_raw(comm, opts) }
    }

    /// Wraps a communicator this crate created (takes ownership: freed on
    /// drop) and sets `MPI_ERRORS_RETURN` on it.
    ///
    /// # Safety
    /// `comm` is a live intra-communicator owned by nobody else.
    pub(crate) unsafe fn from_owned(
        mut comm: ffi::MPI_Comm,
        opts: MpiOptions,
    ) -> Result<Self, CommError> {
        check_opts(&opts)?;
        let setup = |comm: ffi::MPI_Comm| -> Result<(usize, usize), CommError> {
            // SAFETY: `comm` is live and ours; the errhandler constant is
            // valid while MPI is initialized.
            let rc = unsafe { ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN) };
            check(rc, "MPI_Comm_set_errhandler")?;
            let (mut r, mut s): (c_int, c_int) = (0, 0);
            // SAFETY: live communicator, writable outputs.
            check(unsafe { ffi::MPI_Comm_rank(comm, &mut r) }, "MPI_Comm_rank")?;
            // SAFETY: as above.
            check(unsafe { ffi::MPI_Comm_size(comm, &mut s) }, "MPI_Comm_size")?;
            Ok((r as usize, s as usize))
        };
        match setup(comm) {
            Ok((rank, size)) => Ok(Self {
                comm,
                rank,
                size,
                opts,
                send: Vec::new(),
                recv: Vec::new(),
                meta: Vec::new(),
                broken: None,
            }),
            Err(e) => {
                // SAFETY: `comm` is ours and not used afterwards.
                unsafe { ffi::MPI_Comm_free(&mut comm) };
                Err(e)
            }
        }
    }

    /// The duplicated raw handle (owned by this value: do not free it).
    pub fn as_raw(&self) -> ffi::MPI_Comm {
        self.comm
    }

    /// The options this communicator was made with.
    pub fn options(&self) -> MpiOptions {
        self.opts
    }

    /// Terminates every process of this communicator's job
    /// (`MPI_Abort`), for a rank that cannot go on: unlike returning, it
    /// cannot leave the others waiting.
    pub fn abort(&self, code: i32) -> ! {
        if !mpi::is_finalized() {
            // SAFETY: a live communicator (MPI not finalized); MPI_Abort
            // does not return when it succeeds.
            unsafe { ffi::MPI_Abort(self.comm, code) };
        }
        std::process::exit(if code == 0 { 1 } else { code })
    }
}

fn check_opts(opts: &MpiOptions) -> Result<(), CommError> {
    let s = opts.segment_bytes;
    if !(64..=MAX_SEGMENT_BYTES).contains(&s) || !s.is_multiple_of(8) {
        return Err(CommError::InvalidArgument {
            reason: format!(
                "segment_bytes {s} must be a multiple of 8 in [64, {MAX_SEGMENT_BYTES}]"
            ),
        });
    }
    Ok(())
}

fn ensure_live() -> Result<(), CommError> {
    if mpi::is_finalized() {
        return Err(mpi_setup("MPI has already been finalized"));
    }
    if !mpi::is_initialized() {
        return Err(mpi_setup(
            "MPI is not initialized (call kfac_runtime::comm::mpi::init or MPI_Init first)",
        ));
    }
    Ok(())
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        self.guard(|c| c.reduce_impl(data, ty, None))
    }
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        self.guard(|c| c.reduce_impl(data, ty, Some(root)))
    }
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CommError> {
        let len = data.len();
        self.guard(|c| c.bcast_impl(Some(data), len, root))
    }
    fn broadcast_discard(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        self.guard(|c| c.bcast_impl(None, len, root))
    }
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        self.guard(|c| c.allgather_impl(send))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        // The descriptor exchange is an allgather: nobody leaves it before
        // everybody has entered.
        self.guard(|c| c.agree(Ok(()), OP_BARRIER << 2, 0, 0, false).map(|_| ()))
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if mpi::is_finalized() {
            return; // the handle died with MPI
        }
        // SAFETY: `comm` is our own duplicate, not used after this; freeing
        // with operations pending (after a timeout) only marks it for
        // deallocation once they complete.
        unsafe { ffi::MPI_Comm_free(&mut self.comm) };
    }
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("opts", &self.opts)
            .field("broken", &self.broken)
            .finish()
    }
}
