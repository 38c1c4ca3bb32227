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

use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

use kfac_kernels::Real;
use mpi::ffi;
use mpi::raw::AsRaw;

use super::{check_elem, check_root, elem_size, CommError, Communicator, ReduceType};

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

fn count(n: usize) -> Result<c_int, CommError> {
    c_int::try_from(n).map_err(|_| CommError::InvalidArgument {
        reason: format!("{n} bytes exceed an MPI count"),
    })
}

/// Exclusive prefix sums.
fn displs(v: &[usize]) -> Vec<usize> {
    v.iter()
        .scan(0usize, |acc, &n| {
            let o = *acc;
            *acc += n;
            Some(o)
        })
        .collect()
}

fn u8_type() -> ffi::MPI_Datatype {
    // SAFETY: a constant datatype handle exported by the bindings'
    // C shim, valid while MPI is initialized.
    unsafe { ffi::RSMPI_UINT8_T }
}

fn bytes_of(v: &[u64]) -> &[u8] {
    super::as_bytes(v)
}

fn bytes_of_mut(v: &mut [u64]) -> &mut [u8] {
    super::as_bytes_mut(v)
}

/// `n` elements of `T` at the start of a u64 buffer.
fn typed_mut<T: Real>(v: &mut [u64], n: usize) -> &mut [T] {
    let bytes = n * std::mem::size_of::<T>();
    assert!(bytes <= v.len() * 8, "staging buffer too small");
    // SAFETY: the buffer holds at least `bytes` bytes (checked above), is
    // 8-byte aligned (u64), which suffices for f32/f64 (the only `Real`
    // types), every bit pattern is a valid float, and the borrow is carried
    // over from `v`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<T>(), n) }
}

/// Descriptor kinds of the collectives (compared across ranks).
const OP_ALLREDUCE: u64 = 1;
const OP_REDUCE: u64 = 2;
const OP_BCAST: u64 = 3;
const OP_ALLGATHER: u64 = 4;
const OP_BARRIER: u64 = 5;
/// Set in a descriptor's kind by a rank whose own argument check failed.
const DESC_REFUSED: u64 = 1 << 63;

fn op_name(kind: u64) -> &'static str {
    match (kind & !DESC_REFUSED) >> 2 {
        OP_ALLREDUCE => "allreduce",
        OP_REDUCE => "reduce",
        OP_BCAST => "broadcast",
        OP_ALLGATHER => "allgather",
        OP_BARRIER => "barrier",
        _ => "unknown collective",
    }
}

fn ty_code(ty: ReduceType) -> u64 {
    match ty {
        ReduceType::F32 => 1,
        ReduceType::F64 => 2,
    }
}

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

    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let r = f(self);
        if let Err(e) = &r {
            if !matches!(e, CommError::InvalidArgument { .. }) {
                self.broken = Some(e.clone());
            }
        }
        r
    }

    /// Makes both staging buffers hold at least `bytes` bytes.
    fn stage(&mut self, bytes: usize) {
        let words = bytes.div_ceil(8).max(1);
        if self.send.len() < words {
            self.send.resize(words, 0);
        }
        if self.recv.len() < words {
            self.recv.resize(words, 0);
        }
    }

    /// Polls `req` until it completes or the timeout passes.
    fn wait(&mut self, mut req: ffi::MPI_Request, op: &'static str) -> Result<(), CommError> {
        let start = Instant::now();
        let mut polls: u64 = 0;
        loop {
            let mut done: c_int = 0;
            // SAFETY: `req` is an active request of ours; the status is
            // ignored through MPI's own sentinel.
            let rc = unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            if let Err(e) = check(rc, "MPI_Test") {
                self.leak_staging();
                return Err(e);
            }
            if done != 0 {
                return Ok(());
            }
            polls += 1;
            if polls > 64 {
                // Progress only happens inside MPI calls, so keep polling,
                // but let an oversubscribed peer run.
                std::thread::yield_now();
            }
            if polls.is_multiple_of(256) && start.elapsed() > self.opts.timeout {
                self.leak_staging();
                return Err(CommError::Timeout {
                    op,
                    // MPI does not say which ranks have not arrived.
                    waiting_for: Vec::new(),
                    timeout: self.opts.timeout,
                });
            }
        }
    }

    /// After a failed or timed-out operation MPI may still access the
    /// staging buffers: never free them.
    fn leak_staging(&mut self) {
        std::mem::forget(std::mem::take(&mut self.send));
        std::mem::forget(std::mem::take(&mut self.recv));
        std::mem::forget(std::mem::take(&mut self.meta));
    }

    /// Stores count/displacement arrays (in bytes) in `meta`, in order;
    /// returns the offset of each array in `meta`.
    fn set_meta(&mut self, arrays: &[&[usize]]) -> Result<Vec<usize>, CommError> {
        self.meta.clear();
        let mut at = Vec::with_capacity(arrays.len());
        for a in arrays {
            at.push(self.meta.len());
            for &n in *a {
                self.meta.push(count(n)?);
            }
        }
        Ok(at)
    }

    /// Starts a non-blocking collective (the closure returns the MPI code
    /// and fills the request) and waits for it.
    fn run(
        &mut self,
        call: &'static str,
        op: &'static str,
        start: impl FnOnce(&mut ffi::MPI_Request) -> c_int,
    ) -> Result<(), CommError> {
        // SAFETY: the null request constant is a plain value.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        check(start(&mut req), call)?;
        self.wait(req, op)
    }

    /// Exchanges `[kind, root, len]` with every rank (an allgather, so it
    /// also synchronizes) and returns every rank's triple.
    fn exchange_desc(&mut self, desc: [u64; 3]) -> Result<Vec<[u64; 3]>, CommError> {
        let p = self.size;
        self.stage(24 * p);
        self.send[..3].copy_from_slice(&desc);
        let comm = self.comm;
        let (sp, rp) = (
            self.send.as_ptr().cast::<c_void>(),
            self.recv.as_mut_ptr().cast::<c_void>(),
        );
        self.run("MPI_Iallgather", op_name(desc[0]), |req| {
            // SAFETY: `sp` holds 24 bytes, `rp` 24 * p bytes (staged
            // above); both are communicator-owned staging buffers.
            unsafe { ffi::MPI_Iallgather(sp, 24, u8_type(), rp, 24, u8_type(), comm, req) }
        })?;
        Ok(self.recv[..3 * p]
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect())
    }

    /// Exchanges the descriptor and checks that every rank called the same
    /// collective with the same root and (unless `any_len`) length.
    /// `local` is this rank's own argument check: it is exchanged too (a
    /// flag in the descriptor), so a rank whose arguments are invalid never
    /// skips the exchange, and every rank fails together instead of the
    /// ranks falling out of step.
    fn agree(
        &mut self,
        local: Result<(), CommError>,
        kind: u64,
        root: usize,
        len: usize,
        any_len: bool,
    ) -> Result<Vec<[u64; 3]>, CommError> {
        let flag = if local.is_err() { DESC_REFUSED } else { 0 };
        let mine = [kind | flag, root as u64, len as u64];
        let all = self.exchange_desc(mine)?;
        local?;
        if let Some(r) = all.iter().position(|d| d[0] & DESC_REFUSED != 0) {
            return Err(CommError::InvalidArgument {
                reason: format!(
                    "rank {r} refused its arguments to {} (see its error)",
                    op_name(kind)
                ),
            });
        }
        for (r, d) in all.iter().enumerate() {
            let same = d[0] == kind && d[1] == mine[1] && (any_len || d[2] == mine[2]);
            if !same {
                let ty = |k: u64| match k & 3 {
                    1 => " (f32)",
                    2 => " (f64)",
                    _ => "",
                };
                return Err(CommError::InvalidArgument {
                    reason: format!(
                        "ranks disagree: rank {} called {}{} of {} bytes from root {}, rank {r} called {}{} of {} bytes from root {}",
                        self.rank,
                        op_name(kind),
                        ty(kind),
                        len,
                        root,
                        op_name(d[0]),
                        ty(d[0]),
                        d[2],
                        d[1]
                    ),
                });
            }
        }
        Ok(all)
    }

    /// Sum in rank order (see the module docs); `root = None` for
    /// allreduce.
    fn reduce_impl(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: Option<usize>,
    ) -> Result<(), CommError> {
        let local = check_elem(data.len(), ty).and_then(|()| match root {
            Some(r) => check_root(r, self.size),
            None => Ok(()),
        });
        let base = if root.is_some() {
            OP_REDUCE
        } else {
            OP_ALLREDUCE
        };
        self.agree(
            local,
            (base << 2) | ty_code(ty),
            root.unwrap_or(0),
            data.len(),
            false,
        )?;
        if self.size == 1 {
            return Ok(());
        }
        let esz = elem_size(ty);
        let seg = (self.opts.segment_bytes / esz).max(1) * esz;
        for part in data.chunks_mut(seg) {
            match ty {
                ReduceType::F32 => self.reduce_segment::<f32>(part, root)?,
                ReduceType::F64 => self.reduce_segment::<f64>(part, root)?,
            }
        }
        Ok(())
    }

    fn reduce_segment<T: Real>(
        &mut self,
        part: &mut [u8],
        root: Option<usize>,
    ) -> Result<(), CommError> {
        let (p, me, comm) = (self.size, self.rank, self.comm);
        let esz = std::mem::size_of::<T>();
        let m = part.len() / esz;
        let blocks: Vec<usize> = (0..p).map(|r| m / p + usize::from(r < m % p)).collect();
        let offs = displs(&blocks);
        let mine = blocks[me];
        self.stage((m + p) * esz);
        // 1. reduce-scatter: block r of every rank goes to rank r.
        bytes_of_mut(&mut self.send)[..part.len()].copy_from_slice(part);
        let bytes = |v: &[usize]| v.iter().map(|b| b * esz).collect::<Vec<_>>();
        let (bb, ob) = (bytes(&blocks), bytes(&offs));
        let rcount = vec![mine * esz; p];
        let rdisp: Vec<usize> = (0..p).map(|r| r * mine * esz).collect();
        let at = self.set_meta(&[&bb, &ob, &rcount, &rdisp])?;
        let mp = self.meta.as_ptr();
        let (sp, rp) = (
            self.send.as_ptr().cast::<c_void>(),
            self.recv.as_mut_ptr().cast::<c_void>(),
        );
        let op = if root.is_some() {
            "reduce"
        } else {
            "allreduce"
        };
        self.run("MPI_Ialltoallv", op, |req| {
            // SAFETY: the four arrays of p counts/displacements sit in
            // `meta` at `at`; they describe ranges inside the staging
            // buffers (send holds m elements, recv p * mine <= m + p
            // elements, staged above). All of them are owned by `self` and
            // stay untouched (or leaked) until the operation completes.
            unsafe {
                ffi::MPI_Ialltoallv(
                    sp,
                    mp.add(at[0]),
                    mp.add(at[1]),
                    u8_type(),
                    rp,
                    mp.add(at[2]),
                    mp.add(at[3]),
                    u8_type(),
                    comm,
                    req,
                )
            }
        })?;
        // 2. sum my block's p copies in rank order.
        {
            let all = typed_mut::<T>(&mut self.recv, p * mine);
            let (acc, rest) = all.split_at_mut(mine);
            for x in rest.chunks_exact(mine.max(1)).take(p - 1) {
                // x*1 + y is exact: the same as acc + x.
                T::simd_axpy(T::ONE, x, acc);
            }
        }
        // 3. gather the summed blocks (into the send staging, now free).
        let at = self.set_meta(&[&bb, &ob])?;
        let (gcount, gdisp) = (self.meta.as_ptr(), self.meta.as_ptr());
        let (gcount, gdisp) = (gcount.wrapping_add(at[0]), gdisp.wrapping_add(at[1]));
        let mine_bytes = count(mine * esz)?;
        let (sp, rp) = (
            self.recv.as_ptr().cast::<c_void>(),
            self.send.as_mut_ptr().cast::<c_void>(),
        );
        match root {
            None => self.run("MPI_Iallgatherv", op, |req| {
                // SAFETY: `sp` holds my summed block (mine * esz bytes);
                // `rp` holds m * esz bytes, the union of the blocks
                // described by gcount/gdisp (p entries each, in `meta`,
                // owned by `self` like the staging buffers).
                unsafe {
                    ffi::MPI_Iallgatherv(
                        sp,
                        mine_bytes,
                        u8_type(),
                        rp,
                        gcount,
                        gdisp,
                        u8_type(),
                        comm,
                        req,
                    )
                }
            })?,
            Some(r) => self.run("MPI_Igatherv", op, |req| {
                // SAFETY: as for the allgather; the receive arguments are
                // significant only at the root.
                unsafe {
                    ffi::MPI_Igatherv(
                        sp,
                        mine_bytes,
                        u8_type(),
                        rp,
                        gcount,
                        gdisp,
                        u8_type(),
                        r as c_int,
                        comm,
                        req,
                    )
                }
            })?,
        }
        if root.is_none_or(|r| r == me) {
            part.copy_from_slice(&bytes_of(&self.send)[..part.len()]);
        }
        Ok(())
    }

    /// Broadcast through the staging buffer; `data = None` discards.
    fn bcast_impl(
        &mut self,
        mut data: Option<&mut [u8]>,
        len: usize,
        root: usize,
    ) -> Result<(), CommError> {
        let local = check_root(root, self.size).and_then(|()| {
            if data.is_none() && self.rank == root {
                Err(CommError::InvalidArgument {
                    reason: "the root of a broadcast cannot discard its own data".into(),
                })
            } else {
                Ok(())
            }
        });
        self.agree(local, OP_BCAST << 2, root, len, false)?;
        if self.size == 1 {
            return Ok(());
        }
        let seg = self.opts.segment_bytes;
        self.stage(seg.min(len));
        let comm = self.comm;
        let me = self.rank;
        let mut lo = 0;
        while lo < len {
            let hi = (lo + seg).min(len);
            let n = hi - lo;
            if me == root {
                if let Some(d) = data.as_deref() {
                    bytes_of_mut(&mut self.send)[..n].copy_from_slice(&d[lo..hi]);
                }
            }
            let c = count(n)?;
            let sp = self.send.as_mut_ptr().cast::<c_void>();
            self.run("MPI_Ibcast", "broadcast", |req| {
                // SAFETY: `sp` is the staging buffer of at least n bytes.
                unsafe { ffi::MPI_Ibcast(sp, c, u8_type(), root as c_int, comm, req) }
            })?;
            if me != root {
                if let Some(d) = data.as_deref_mut() {
                    d[lo..hi].copy_from_slice(&bytes_of(&self.send)[..n]);
                }
            }
            lo = hi;
        }
        Ok(())
    }

    fn allgather_impl(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        let all = self.agree(Ok(()), OP_ALLGATHER << 2, 0, send.len(), true)?;
        let sizes: Vec<usize> = all
            .iter()
            .map(|d| usize::try_from(d[2]))
            .collect::<Result<_, _>>()
            .map_err(|_| CommError::InvalidArgument {
                reason: "allgather size does not fit in memory".into(),
            })?;
        let total = sizes
            .iter()
            .try_fold(0usize, |a, &s| a.checked_add(s))
            .ok_or_else(|| CommError::InvalidArgument {
                reason: "allgather total size overflows".into(),
            })?;
        if self.size == 1 {
            return Ok((send.to_vec(), sizes));
        }
        let p = self.size;
        let offs = displs(&sizes);
        let mut out = vec![0u8; total];
        // Every rank contributes at most `chunk` bytes per round, so a
        // round's receive fits one segment.
        let chunk = (self.opts.segment_bytes / p).max(1);
        let rounds = sizes.iter().map(|s| s.div_ceil(chunk)).max().unwrap_or(0);
        self.stage(chunk * p);
        let comm = self.comm;
        for k in 0..rounds {
            let part = |s: usize| (s.min(k * chunk), s.min((k + 1) * chunk));
            let got: Vec<usize> = sizes
                .iter()
                .map(|&s| {
                    let (lo, hi) = part(s);
                    hi - lo
                })
                .collect();
            let at = displs(&got);
            let (lo, hi) = part(send.len());
            bytes_of_mut(&mut self.send)[..hi - lo].copy_from_slice(&send[lo..hi]);
            let c = count(hi - lo)?;
            let m = self.set_meta(&[&got, &at])?;
            let (gc, gd) = (self.meta.as_ptr(), self.meta.as_ptr());
            let (gc, gd) = (gc.wrapping_add(m[0]), gd.wrapping_add(m[1]));
            let (sp, rp) = (
                self.send.as_ptr().cast::<c_void>(),
                self.recv.as_mut_ptr().cast::<c_void>(),
            );
            self.run("MPI_Iallgatherv", "allgather", |req| {
                // SAFETY: `sp` holds hi - lo bytes, `rp` at least
                // chunk * p >= sum(got) bytes (staged above); gc/gd are p
                // entries each in `meta` (owned by `self`).
                unsafe { ffi::MPI_Iallgatherv(sp, c, u8_type(), rp, gc, gd, u8_type(), comm, req) }
            })?;
            let recv = bytes_of(&self.recv);
            for r in 0..p {
                let (rlo, _) = part(sizes[r]);
                out[offs[r] + rlo..offs[r] + rlo + got[r]]
                    .copy_from_slice(&recv[at[r]..at[r] + got[r]]);
            }
        }
        Ok((out, sizes))
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
