//! The collectives of [`MpiComm`]: every call is first agreed on (a
//! descriptor exchange: operation, type, length, root, and whether the
//! caller refused its own arguments), then run as non-blocking MPI calls
//! polled against the timeout on communicator-owned staging. Reductions are
//! a reduce-scatter (`MPI_Ialltoallv`), sums in rank order, and an
//! allgather, never `MPI_SUM`, so results are bitwise reproducible.

use std::os::raw::{c_int, c_void};
use std::time::Instant;

use kfac_kernels::Real;
use mpi::ffi;

use super::{check, MpiComm};
use crate::comm::{check_elem, check_root, elem_size, CommError, ReduceType};

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
    crate::comm::as_bytes(v)
}

fn bytes_of_mut(v: &mut [u64]) -> &mut [u8] {
    crate::comm::as_bytes_mut(v)
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
pub(super) const OP_BARRIER: u64 = 5;
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
    pub(super) fn guard<T>(
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
    pub(super) fn stage(&mut self, bytes: usize) {
        let words = bytes.div_ceil(8).max(1);
        if self.send.len() < words {
            self.send.resize(words, 0);
        }
        if self.recv.len() < words {
            self.recv.resize(words, 0);
        }
    }

    /// Polls `req` until it completes or the timeout passes.
    pub(super) fn wait(
        &mut self,
        mut req: ffi::MPI_Request,
        op: &'static str,
    ) -> Result<(), CommError> {
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
    pub(super) fn leak_staging(&mut self) {
        std::mem::forget(std::mem::take(&mut self.send));
        std::mem::forget(std::mem::take(&mut self.recv));
        std::mem::forget(std::mem::take(&mut self.meta));
    }

    /// Stores count/displacement arrays (in bytes) in `meta`, in order;
    /// returns the offset of each array in `meta`.
    pub(super) fn set_meta(&mut self, arrays: &[&[usize]]) -> Result<Vec<usize>, CommError> {
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
    pub(super) fn run(
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
    pub(super) fn exchange_desc(&mut self, desc: [u64; 3]) -> Result<Vec<[u64; 3]>, CommError> {
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
    pub(super) fn agree(
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
    pub(super) fn reduce_impl(
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

    pub(super) fn reduce_segment<T: Real>(
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
    pub(super) fn bcast_impl(
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

    pub(super) fn allgather_impl(
        &mut self,
        send: &[u8],
    ) -> Result<(Vec<u8>, Vec<usize>), CommError> {
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
