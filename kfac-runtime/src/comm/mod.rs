//! Collectives between the ranks of a data-parallel job.
//!
//! [`Communicator`] carries every collective K-FAC needs: allreduce (sum)
//! of f32/f64 slices, reduce to one rank, broadcast, allgather with per-rank
//! sizes, and barrier. Every collective of the communicators in this module
//! is bounded by a timeout and returns a [`CommError`] rather than blocking
//! forever; a communicator implemented outside (e.g. the C ABI's, built
//! from a caller's callbacks) is bounded only if its implementation is.
//!
//! Implementations: [`Local`] (one process, world size 1),
//! [`ShmGroup`](shm::ShmGroup) (processes on one machine over POSIX shared
//! memory) and, with the `mpi` feature, `mpi::MpiComm` (any MPI
//! communicator) and `hier::HierComm` (shared memory inside each machine,
//! MPI between machines).
//!
//! ```
//! use kfac_runtime::comm::{Communicator, Local};
//! let mut c = Local::new();
//! let mut v = [1.0f32, 2.0];
//! c.allreduce_f32(&mut v).unwrap();
//! assert_eq!(v, [1.0, 2.0]);
//! ```

pub mod env;
#[cfg(feature = "mpi")]
pub mod hier;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod shm;

use core::fmt;
use std::time::Duration;

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CommError {
    /// A peer process died (or was replaced) while the group was in use.
    PeerDied {
        /// The peer's rank.
        rank: usize,
        /// Its process id.
        pid: i32,
    },
    /// Peers did not arrive within the timeout.
    Timeout {
        /// The collective.
        op: &'static str,
        /// Ranks that had not arrived.
        waiting_for: Vec<usize>,
        /// The timeout.
        timeout: Duration,
    },
    /// Another rank failed and aborted the group.
    Aborted {
        /// The rank that reported the failure.
        by_rank: usize,
        /// The rank it blamed (the dead/stuck one), if any.
        blamed: Option<usize>,
    },
    /// Arguments differ between ranks or are invalid (sizes, root).
    InvalidArgument {
        /// What is wrong, in words.
        reason: String,
    },
    /// Creating or attaching the shared-memory segment failed.
    Setup {
        /// What is wrong, in words (includes the segment name).
        reason: String,
    },
    /// An MPI call failed (the `mpi` feature), or MPI is not usable (not
    /// initialized, already finalized: `call` is `"setup"`, `code` 0).
    Mpi {
        /// The MPI function.
        call: &'static str,
        /// Its error code.
        code: i32,
        /// `MPI_Error_string` of the code.
        reason: String,
    },
    /// An operating-system call failed.
    Os {
        /// The call.
        call: &'static str,
        /// `errno` description.
        reason: String,
    },
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommError::PeerDied { rank, pid } => write!(f, "rank {rank} (pid {pid}) died"),
            CommError::Timeout {
                op,
                waiting_for,
                timeout,
            } => write!(
                f,
                "{op}: timed out after {:.3} s waiting for rank(s) {waiting_for:?}",
                timeout.as_secs_f64()
            ),
            CommError::Aborted { by_rank, blamed } => match blamed {
                Some(b) => write!(f, "group aborted by rank {by_rank}: rank {b} failed"),
                None => write!(f, "group aborted by rank {by_rank}"),
            },
            CommError::InvalidArgument { reason } => write!(f, "invalid collective: {reason}"),
            CommError::Setup { reason } => write!(f, "shared-memory group setup: {reason}"),
            CommError::Mpi { call, code, reason } => {
                write!(f, "{call} failed (MPI error {code}): {reason}")
            }
            CommError::Os { call, reason } => write!(f, "{call}: {reason}"),
        }
    }
}

impl std::error::Error for CommError {}

/// Element type of a reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceType {
    /// `f32` elements.
    F32,
    /// `f64` elements.
    F64,
}

/// The collectives K-FAC needs. All ranks must call the same collectives in
/// the same order with matching arguments (as with MPI). Reductions add the
/// contributions in rank order, so for a fixed world size results are
/// bitwise reproducible.
pub trait Communicator: Send {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;

    /// Sum of `data` across ranks, in place on every rank. `data` holds
    /// elements of type `ty` as native-endian bytes.
    ///
    /// # Errors
    /// [`CommError`] on timeout, a dead peer, or mismatched lengths.
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError>;

    /// Sum of `data` across ranks into `data` on `root` (other ranks' `data`
    /// is left as it was).
    ///
    /// # Errors
    /// As [`allreduce_bytes`](Self::allreduce_bytes), or a bad root.
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError>;

    /// Copies `data` of `root` into `data` of every rank.
    ///
    /// # Errors
    /// [`CommError`].
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CommError>;

    /// Gathers every rank's `send` (sizes may differ) on every rank: returns
    /// the concatenation in rank order and the per-rank sizes.
    ///
    /// # Errors
    /// [`CommError`].
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// [`CommError`].
    fn barrier(&mut self) -> Result<(), CommError>;

    /// Gathers every rank's `send`, all of one length, into `recv`
    /// (`size() x send.len()` bytes, in rank order). The shared-memory
    /// group allocates nothing here (the caller's buffer is the only one,
    /// so running out of memory cannot happen inside the collective); the
    /// default goes through [`allgather_bytes`](Self::allgather_bytes) and
    /// copies.
    ///
    /// # Errors
    /// [`CommError::InvalidArgument`] if the ranks' lengths differ or
    /// `recv` does not hold them all; other [`CommError`]s as
    /// `allgather_bytes`.
    fn allgather_into(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        let (all, sizes) = self.allgather_bytes(send)?;
        if all.len() != recv.len() || sizes.iter().any(|&s| s != send.len()) {
            return Err(CommError::InvalidArgument {
                reason: format!(
                    "allgather_into: contributions of {sizes:?} bytes for a buffer of {}",
                    recv.len()
                ),
            });
        }
        recv.copy_from_slice(&all);
        Ok(())
    }

    /// Tells the other ranks that this one has given up on the group (best
    /// effort, never blocks), so that they fail fast instead of waiting for
    /// it; used by a composite communicator whose collective failed halfway.
    /// The default does nothing (the others then run into their timeout).
    fn abort_group(&mut self) {}

    /// Takes part in a [`broadcast_bytes`](Self::broadcast_bytes) of `len`
    /// bytes from `root` without keeping the data (for ranks that do not
    /// need it). The default receives into a temporary buffer.
    ///
    /// # Errors
    /// [`CommError`].
    fn broadcast_discard(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        let mut tmp = Vec::new();
        tmp.try_reserve_exact(len)
            .map_err(|_| CommError::InvalidArgument {
                reason: format!("broadcast: cannot allocate {len} bytes to receive into"),
            })?;
        tmp.resize(len, 0u8);
        self.broadcast_bytes(&mut tmp, root)
    }

    /// [`allreduce_bytes`](Self::allreduce_bytes) on `f32`.
    ///
    /// # Errors
    /// [`CommError`].
    fn allreduce_f32(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        self.allreduce_bytes(as_bytes_mut(data), ReduceType::F32)
    }

    /// [`allreduce_bytes`](Self::allreduce_bytes) on `f64`.
    ///
    /// # Errors
    /// [`CommError`].
    fn allreduce_f64(&mut self, data: &mut [f64]) -> Result<(), CommError> {
        self.allreduce_bytes(as_bytes_mut(data), ReduceType::F64)
    }

    /// [`reduce_bytes`](Self::reduce_bytes) on `f32`.
    ///
    /// # Errors
    /// [`CommError`].
    fn reduce_f32(&mut self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        self.reduce_bytes(as_bytes_mut(data), ReduceType::F32, root)
    }

    /// [`broadcast_bytes`](Self::broadcast_bytes) on `f32`.
    ///
    /// # Errors
    /// [`CommError`].
    fn broadcast_f32(&mut self, data: &mut [f32], root: usize) -> Result<(), CommError> {
        self.broadcast_bytes(as_bytes_mut(data), root)
    }
}

/// Plain-old-data element types viewable as bytes (f32, f64, u8, u16, u64,
/// bf16, f16: no padding, every bit pattern valid).
pub trait Pod: Copy + Send + Sync + 'static + sealed::Sealed {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u64 {}
    // bf16 and f16 are `#[repr(transparent)]` wrappers of a u16.
    impl Sealed for kfac_kernels::packed::bf16 {}
    impl Sealed for kfac_kernels::packed::f16 {}
}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for u8 {}
impl Pod for u16 {}
impl Pod for u64 {}
impl Pod for kfac_kernels::packed::bf16 {}
impl Pod for kfac_kernels::packed::f16 {}

/// Views a slice of plain numbers as bytes.
pub fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: `T` is one of f32/f64/u8/u16/u64/bf16/f16 (sealed `Pod`): no padding,
    // every bit pattern valid, alignment of u8 is 1; the length in bytes is
    // exactly `size_of_val(s)` and the borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Views a slice of plain numbers as bytes.
pub fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: as in `as_bytes_mut`, read-only.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The single-process communicator (world size 1): every collective is the
/// identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Local {
    /// A world of one.
    pub fn new() -> Self {
        Local
    }
}

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        check_elem(data.len(), ty)
    }
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        check_root(root, 1)?;
        check_elem(data.len(), ty)
    }
    fn broadcast_bytes(&mut self, _data: &mut [u8], root: usize) -> Result<(), CommError> {
        check_root(root, 1)
    }
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        Ok((send.to_vec(), vec![send.len()]))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}

pub(crate) fn check_root(root: usize, size: usize) -> Result<(), CommError> {
    if root >= size {
        return Err(CommError::InvalidArgument {
            reason: format!("root {root} is not a rank of a world of {size}"),
        });
    }
    Ok(())
}

pub(crate) fn check_elem(len: usize, ty: ReduceType) -> Result<(), CommError> {
    let e = elem_size(ty);
    if !len.is_multiple_of(e) {
        return Err(CommError::InvalidArgument {
            reason: format!("{len} bytes is not a whole number of {e}-byte elements"),
        });
    }
    Ok(())
}

pub(crate) fn elem_size(ty: ReduceType) -> usize {
    match ty {
        ReduceType::F32 => 4,
        ReduceType::F64 => 8,
    }
}
