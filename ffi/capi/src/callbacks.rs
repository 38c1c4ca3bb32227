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
/// calls them only from inside kfac calls on the owning preconditioner, on
/// the calling thread.
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
}

const _: () = assert!(std::mem::offset_of!(KfacCollectives, struct_size) == 0);
// No padding (so none at the end, where a later field could go).
const _: () = assert!(
    size_of::<KfacCollectives>() == 2 * size_of::<usize>() + 2 * 4 + 4 * size_of::<usize>()
);

// SAFETY: repr(C), `struct_size: usize` first; integers, a raw pointer and
// `Option`s of function pointers (all-zero is `None`, any other value a
// pointer the caller vouches for).
unsafe impl Extensible for KfacCollectives {
    const NAME: &'static str = "KfacCollectives";
    const SIZES: &'static [usize] = &[size_of::<KfacCollectives>()];
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
        }
    }
}

/// Zeroes `*out` (NULL callbacks and `user_data`, rank 0 of world size 0)
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

/// The caller's collectives as a [`Communicator`].
pub(crate) struct Callbacks(KfacCollectives);

// SAFETY: the caller promises (header docs) that its callbacks and
// `user_data` may be used from the thread that calls into the library.
unsafe impl Send for Callbacks {}

fn missing(what: &str) -> CommError {
    CommError::InvalidArgument {
        reason: format!("no {what} callback"),
    }
}

impl Callbacks {
    /// Checks that every callback is set and `rank < world_size`.
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
        Ok(Callbacks(c))
    }

    fn rc(&self, what: &'static str, rc: i32) -> Result<(), CommError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(CommError::Os {
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
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        let (dtype, e) = match ty {
            ReduceType::F32 => (KfacDtype::KFAC_DTYPE_F32, 4),
            ReduceType::F64 => (KfacDtype::KFAC_DTYPE_F64, 8),
        };
        let f = self.0.allreduce.ok_or_else(|| missing("allreduce"))?;
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
        let f = self.0.broadcast.ok_or_else(|| missing("broadcast"))?;
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
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        let f = self.0.allgather.ok_or_else(|| missing("allgather"))?;
        let world = self.size();
        // sizes first, then the payloads padded to the largest
        let mine = (send.len() as u64).to_le_bytes();
        let mut sizes_raw = vec![0u8; 8 * world];
        // SAFETY: `send` 8 bytes, `recv` `world * 8` bytes.
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
    fn barrier(&mut self) -> Result<(), CommError> {
        let f = self.0.barrier.ok_or_else(|| missing("barrier"))?;
        // SAFETY: callback contract.
        let rc = unsafe { f(self.0.user_data) };
        self.rc("barrier callback", rc)
    }
}
