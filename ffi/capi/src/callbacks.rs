//! `KfacCollectives` (C function pointers + `user_data`) and the adapter
//! that makes them a `kfac_runtime::comm::Communicator`, so a C/C++ stack
//! routes K-FAC's collectives through its own NCCL/Gloo/MPI.
//!
//! The runtime's collectives map onto the four callbacks: reduce is an
//! allreduce whose non-roots restore their input; a variable-size
//! allgather is two fixed-size ones (sizes, then payloads padded to the
//! largest).

use std::ffi::c_void;
use std::mem::size_of;
use std::sync::mpsc;
use std::time::Duration;

use kfac_runtime::comm::{CommError, Communicator, ReduceType};

use crate::extensible::{self, Extensible};
use crate::status::{fail, guard, KfacStatus, R};

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
/// calls them only from inside kfac calls on the owning preconditioner:
/// on the calling thread when `timeout_ms` is 0, on one thread the library
/// starts for the communicator otherwise (see `timeout_ms`).
///
/// Initialize with `kfac_collectives_init(&c, sizeof c)` (zeroes every
/// field and sets `struct_size`), then set the fields. `struct_size`
/// follows the rules of `KfacConfig`: fields are only ever appended, a
/// larger struct (newer header) is accepted if the bytes the library does
/// not know are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KfacCollectives {
    /// `sizeof(KfacCollectives)` of the caller's header (set by
    /// `kfac_collectives_init`).
    pub struct_size: usize,
    /// Passed to every callback.
    pub user_data: *mut c_void,
    /// This rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// In-place sum of `count` elements of `dtype` across ranks.
    pub allreduce: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            buf: *mut c_void,
            count: usize,
            dtype: KfacDtype,
        ) -> i32,
    >,
    /// Copies `bytes` bytes of `root`'s `buf` into every rank's `buf`.
    pub broadcast: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            buf: *mut c_void,
            bytes: usize,
            root: u32,
        ) -> i32,
    >,
    /// Gathers `bytes` bytes from every rank into `recv` (`world_size *
    /// bytes`, rank order). Every rank passes the same `bytes`.
    pub allgather: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            send: *const c_void,
            recv: *mut c_void,
            bytes: usize,
        ) -> i32,
    >,
    /// Returns once every rank has called it.
    pub barrier: Option<unsafe extern "C" fn(user_data: *mut c_void) -> i32>,
    /// 0 (the default, and what an older caller's struct without this
    /// field means): callbacks run on the thread of the kfac call and are
    /// not bounded, a callback that never returns hangs that call.
    /// Otherwise each callback invocation is bounded by `timeout_ms`
    /// milliseconds: the library runs every callback of this communicator
    /// on one thread of its own (started by `kfac_comm_from_callbacks`, so
    /// thread-bound state such as a CUDA context, or MPI below
    /// `MPI_THREAD_MULTIPLE` when other threads call MPI, must be usable
    /// from it), passing buffers the communicator owns (copied in and out,
    /// aligned for `double`). A callback that has not returned in time
    /// fails the kfac call with `KFAC_ERR_COMM` and leaves the communicator
    /// failed: every later collective fails at once. The late callback may
    /// still write into the buffers it was given, which stay allocated
    /// until it returns; `user_data` must stay valid until then, even after
    /// `kfac_comm_free`/`kfac_precond_free` (which do not wait for it).
    pub timeout_ms: u64,
}

/// The layout of `KfacCollectives` before `timeout_ms` (frozen; its size
/// is a released `struct_size`).
#[repr(C)]
#[allow(dead_code)]
struct KfacCollectivesV2 {
    struct_size: usize,
    user_data: *mut c_void,
    rank: u32,
    world_size: u32,
    callbacks: [usize; 4],
}

const _: () = assert!(std::mem::offset_of!(KfacCollectives, struct_size) == 0);
// No padding (so none at the end, where a later field could go).
const _: () = assert!(
    size_of::<KfacCollectivesV2>() == 2 * size_of::<usize>() + 2 * 4 + 4 * size_of::<usize>()
);
const _: () = assert!(size_of::<KfacCollectives>() == size_of::<KfacCollectivesV2>() + 8);

// SAFETY: repr(C), `struct_size: usize` first; integers, a raw pointer and
// `Option`s of function pointers (all-zero is `None`, any other value a
// pointer the caller vouches for).
unsafe impl Extensible for KfacCollectives {
    const NAME: &'static str = "KfacCollectives";
    const SIZES: &'static [usize] = &[size_of::<KfacCollectivesV2>(), size_of::<KfacCollectives>()];
    fn defaults() -> Self {
        KfacCollectives {
            struct_size: size_of::<KfacCollectives>(),
            user_data: std::ptr::null_mut(),
            rank: 0,
            world_size: 0,
            allreduce: None,
            broadcast: None,
            allgather: None,
            barrier: None,
            timeout_ms: 0,
        }
    }
}

/// Zeroes `*out` (NULL callbacks and `user_data`, rank 0 of world size 0,
/// no timeout)
/// and sets `out->struct_size = struct_size`. Pass `sizeof *out`.
/// `KFAC_ERR_NULL` for a NULL `out`, `KFAC_ERR_INVALID_ARGUMENT` for a
/// `struct_size` the library does not accept (nothing is written then).
///
/// # Safety
/// `out` must be NULL or point to `struct_size` writable bytes. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn kfac_collectives_init(
    out: *mut KfacCollectives,
    struct_size: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe { extensible::write(out, struct_size, KfacCollectives::defaults()) }
    })
}

/// One callback invocation, without its buffers.
#[derive(Clone, Copy)]
enum Op {
    Allreduce { count: usize, dtype: KfacDtype },
    Broadcast { root: u32 },
    Allgather { bytes: usize },
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Allreduce { .. } => "allreduce callback",
            Op::Broadcast { .. } => "broadcast callback",
            Op::Allgather { .. } => "allgather callback",
            Op::Barrier => "barrier callback",
        }
    }
}

/// Calls the caller's callback for `op`; a missing one (impossible after
/// [`Callbacks::new`]) is -1.
///
/// # Safety
/// `buf` is valid for writes of the bytes `op` writes (allreduce: `count`
/// elements of `dtype`, aligned for them; broadcast: its `len`; allgather:
/// `world_size * bytes`) and `send` for reads of `bytes` (allgather), for
/// the whole call.
unsafe fn invoke(c: &KfacCollectives, op: Op, buf: *mut u8, len: usize, send: *const u8) -> i32 {
    let u = c.user_data;
    match op {
        Op::Allreduce { count, dtype } => c.allreduce.map_or(-1, |f| {
            // SAFETY: the callback contract (header) and this function's:
            // `buf` holds `count` aligned elements of `dtype`.
            unsafe { f(u, buf.cast(), count, dtype) }
        }),
        Op::Broadcast { root } => c.broadcast.map_or(-1, |f| {
            // SAFETY: as above; `buf` holds `len` bytes.
            unsafe { f(u, buf.cast(), len, root) }
        }),
        Op::Allgather { bytes } => c.allgather.map_or(-1, |f| {
            // SAFETY: as above; `send` `bytes`, `buf` `world_size * bytes`.
            unsafe { f(u, send.cast(), buf.cast(), bytes) }
        }),
        Op::Barrier => c.barrier.map_or(-1, |f| {
            // SAFETY: the callback contract (header).
            unsafe { f(u) }
        }),
    }
}

/// Bytes owned by a bounded communicator's thread, aligned for `f64`.
struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    fn from(bytes: &[u8]) -> Buf {
        let mut b = Buf {
            words: vec![0; bytes.len().div_ceil(8)],
            len: bytes.len(),
        };
        b.bytes_mut().copy_from_slice(bytes);
        b
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds `8 * words.len() >= len` initialized bytes;
        // u8 has no alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

/// A callback invocation handed to the communicator's thread, with the
/// buffers it owns.
struct Job {
    op: Op,
    buf: Buf,
    send: Buf,
}

/// The collectives, movable to the communicator's thread.
struct SendCollectives(KfacCollectives);

// SAFETY: with `timeout_ms > 0` the header tells the caller that its
// callbacks and `user_data` are used from a thread the library starts.
unsafe impl Send for SendCollectives {}

/// The thread that runs a bounded communicator's callbacks.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    replies: mpsc::Receiver<(i32, Buf)>,
    thread: Option<std::thread::JoinHandle<()>>,
    timeout: Duration,
    /// Set when a callback timed out: it may still be running, so the
    /// communicator takes no more work.
    failed: bool,
}

impl Worker {
    fn start(c: KfacCollectives) -> R<Worker> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (reply_tx, replies) = mpsc::channel();
        let coll = SendCollectives(c);
        let thread = std::thread::Builder::new()
            .name("kfac-callbacks".into())
            .spawn(move || {
                let coll = coll;
                for mut job in job_rx {
                    let len = job.buf.len;
                    // SAFETY: `buf` and `send` are this job's own buffers,
                    // sized by `Callbacks::run` for `op`; they live until
                    // the reply is sent (or dropped) below.
                    let rc = unsafe {
                        invoke(
                            &coll.0,
                            job.op,
                            job.buf.bytes_mut().as_mut_ptr(),
                            len,
                            job.send.bytes().as_ptr(),
                        )
                    };
                    if reply_tx.send((rc, job.buf)).is_err() {
                        break; // the communicator is gone
                    }
                }
            })
            .map_err(|e| {
                crate::status::Fail(
                    KfacStatus::KFAC_ERR_RESOURCE,
                    format!("cannot start the callback thread: {e}"),
                )
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            replies,
            thread: Some(thread),
            timeout: Duration::from_millis(c.timeout_ms),
            failed: false,
        })
    }

    /// Runs `op` on the worker with copies of `buf` and `send`, copying the
    /// result back into `buf` if it completes in time.
    fn run(&mut self, op: Op, buf: &mut [u8], send: &[u8]) -> Result<i32, CommError> {
        if self.failed {
            return Err(CommError::Os {
                call: op.name(),
                reason: "not called: the communicator failed (an earlier callback timed out)"
                    .into(),
            });
        }
        let job = Job {
            op,
            buf: Buf::from(buf),
            send: Buf::from(send),
        };
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            self.failed = true;
            return Err(CommError::Os {
                call: op.name(),
                reason: "not called: the callback thread is gone".into(),
            });
        }
        match self.replies.recv_timeout(self.timeout) {
            Ok((rc, out)) => {
                buf.copy_from_slice(out.bytes());
                Ok(rc)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.failed = true;
                Err(CommError::Os {
                    call: op.name(),
                    reason: format!(
                        "did not return within timeout_ms = {}; the communicator is failed",
                        self.timeout.as_millis()
                    ),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The thread ended: the callback panicked (unwound out of
                // C), so it is not used again.
                self.failed = true;
                Err(CommError::Os {
                    call: op.name(),
                    reason: "the callback thread ended without an answer".into(),
                })
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its current job.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if !self.failed {
                // Idle (every job was answered): it ends at once.
                let _ = t.join();
            }
            // Otherwise a callback is late: the thread is left to end when
            // it returns (it owns the buffers; the header says `user_data`
            // stays valid until then).
        }
    }
}

/// The caller's collectives as a [`Communicator`].
pub(crate) struct Callbacks {
    c: KfacCollectives,
    /// The callback thread, when `timeout_ms > 0`.
    worker: Option<Worker>,
}

// SAFETY: the caller promises (header docs) that its callbacks and
// `user_data` may be used from the thread that calls into the library;
// the other fields are Send.
unsafe impl Send for Callbacks {}

impl Callbacks {
    /// Checks that every callback is set and `rank < world_size`; starts
    /// the callback thread when `timeout_ms > 0`.
    pub(crate) fn new(c: KfacCollectives) -> R<Callbacks> {
        if c.allreduce.is_none()
            || c.broadcast.is_none()
            || c.allgather.is_none()
            || c.barrier.is_none()
        {
            return fail(
                KfacStatus::KFAC_ERR_NULL,
                "every callback (allreduce, broadcast, allgather, barrier) is required",
            );
        }
        if c.rank >= c.world_size {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!("rank {} of world size {}", c.rank, c.world_size),
            );
        }
        let worker = if c.timeout_ms > 0 {
            Some(Worker::start(c)?)
        } else {
            None
        };
        Ok(Callbacks { c, worker })
    }

    /// Runs the callback of `op` on `buf` (its output, `len` bytes) and
    /// `send` (allgather's input), directly or on the worker.
    fn call(&mut self, op: Op, buf: &mut [u8], send: &[u8]) -> Result<(), CommError> {
        let rc = match &mut self.worker {
            Some(w) => w.run(op, buf, send)?,
            // SAFETY: `buf` and `send` are valid for the call and sized by
            // the caller of `call` for `op`; `buf` is aligned for `op`'s
            // element type (the runtime's reduction buffers are typed
            // slices viewed as bytes).
            None => unsafe { invoke(&self.c, op, buf.as_mut_ptr(), buf.len(), send.as_ptr()) },
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(CommError::Os {
                call: op.name(),
                reason: format!("callback returned {rc}"),
            })
        }
    }
}

impl Communicator for Callbacks {
    fn rank(&self) -> usize {
        self.c.rank as usize
    }
    fn size(&self) -> usize {
        self.c.world_size as usize
    }
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        let (dtype, e) = match ty {
            ReduceType::F32 => (KfacDtype::KFAC_DTYPE_F32, 4),
            ReduceType::F64 => (KfacDtype::KFAC_DTYPE_F64, 8),
        };
        let op = Op::Allreduce {
            count: data.len() / e,
            dtype,
        };
        self.call(op, data, &[])
    }
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        // A sum on every rank; non-roots restore their input.
        let keep = (self.rank() != root).then(|| data.to_vec());
        self.allreduce_bytes(data, ty)?;
        if let Some(k) = keep {
            data.copy_from_slice(&k);
        }
        Ok(())
    }
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CommError> {
        let op = Op::Broadcast { root: root as u32 };
        self.call(op, data, &[])
    }
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        let world = self.size();
        // sizes first, then the payloads padded to the largest
        let mine = (send.len() as u64).to_le_bytes();
        let mut sizes_raw = vec![0u8; 8 * world];
        self.call(Op::Allgather { bytes: 8 }, &mut sizes_raw, &mine)?;
        let sizes: Vec<usize> = sizes_raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize)
            .collect();
        let max = sizes.iter().copied().max().unwrap_or(0);
        let total = max
            .checked_mul(world)
            .ok_or_else(|| CommError::InvalidArgument {
                reason: format!("allgather sizes overflow: {max} bytes x {world} ranks"),
            })?;
        // Sizes come from the peers: an impossible one is an error, not an
        // allocation abort.
        let zeros = |n: usize| -> Result<Vec<u8>, CommError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)
                .map_err(|_| CommError::InvalidArgument {
                    reason: format!(
                        "allgather: cannot allocate {n} bytes ({max} bytes x {world} ranks)"
                    ),
                })?;
            v.resize(n, 0);
            Ok(v)
        };
        if send.len() > max {
            return Err(CommError::InvalidArgument {
                reason: format!(
                    "allgather: the callback reported sizes {sizes:?}, all below this rank's {} bytes",
                    send.len()
                ),
            });
        }
        let mut padded = zeros(max)?;
        padded[..send.len()].copy_from_slice(send);
        let mut all = zeros(total)?;
        if max > 0 {
            self.call(Op::Allgather { bytes: max }, &mut all, &padded)?;
        }
        let mut out = Vec::with_capacity(sizes.iter().sum());
        for (r, &s) in sizes.iter().enumerate() {
            out.extend_from_slice(&all[r * max..r * max + s]);
        }
        Ok((out, sizes))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.call(Op::Barrier, &mut [], &[])
    }
}
