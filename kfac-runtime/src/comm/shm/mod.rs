//! A shared-memory group: the ranks of a job on one machine, communicating
//! through one POSIX shared-memory segment.
//!
//! # Segment
//!
//! `/dev/shm/kfac-<group>`, mode 0600, created by rank 0 with
//! `O_CREAT | O_EXCL` and sized with `posix_fallocate` (a full `/dev/shm`
//! fails at creation, not later with SIGBUS); the other ranks attach with a
//! bounded retry. Layout:
//!
//! ```text
//! [ header: magic, layout version, world size, slot size, generation,
//!           ready flag, attach count, doorbell (futex word), sleepers,
//!           abort flag and blamed rank, creator pid and start time,
//!           reaper, job id                                  ] 256 bytes
//! [ per rank, 128-byte aligned: pid, start time, heartbeat,
//!   published sequence, consumed sequence, op descriptor   ] world x 128
//! [ padding to 4096                                         ]
//! [ per rank data slot of `slot_bytes`                      ] world x slot
//! ```
//!
//! A header that does not match (another program's segment, another layout
//! version, another world size) is refused with a clear error. The segment
//! is unlinked by rank 0 once every rank has attached (or when the join
//! fails), so no crash after start-up can leave it behind.
//!
//! # Set-up
//!
//! Only rank 0 creates (`O_CREAT | O_EXCL`); it records its pid, start time
//! (field 22 of `/proc/<pid>/stat`) and job id in the header before
//! publishing `magic` (Release). The job id is `KFAC_JOB_ID` (`kfac-launch`
//! sets a fresh one; by hand: the same on every rank of a job) or the one
//! given to [`ShmGroup::join_job`].
//!
//! When the name exists and its creator is dead (pid gone, a zombie, or
//! another start time), the segment is *stale*: rank 0 claims it by a
//! compare-exchange of the header's `reaper` word (0 or a dead reaper ->
//! itself), only the winner `shm_unlink`s the name, and everybody retries
//! the exclusive create. So two rank 0s cannot both remove one stale
//! segment, and none removes a new one: a name is unlinked only by its
//! live creator or by the claim's winner on that very segment (its creator
//! is dead, so nobody else unlinks it in between; a claimant taking over
//! from a dead reaper first checks by inode that the name still refers to
//! it). The loser's create then fails against the winner's live segment
//! ("in use"). A segment without a recorded creator (rank 0 killed between
//! its create and its first header write) is stale once 10 s old.
//!
//! Attaching ranks wait (until their timeout) while the creator is dead, so
//! they never join a stale segment; on a live one a different job id (or
//! one side without any) fails at join, naming both. Ranks started by hand
//! without `KFAC_JOB_ID` all carry "no job id": two such jobs started at
//! once with the same group name and world size can form one mixed group;
//! give concurrent jobs distinct group names or job ids.
//!
//! A rank 0 killed while waiting for its peers (SIGKILL, or SIGTERM/SIGINT
//! with their default action: no handler is installed) leaves the name
//! behind: `kfac-launch` removes it after the ranks exit, and otherwise
//! the next job of that name replaces it as above.
//!
//! # Protocol
//!
//! Every collective is a sequence of rounds with a global round number `s`
//! (all ranks call the same collectives in the same order):
//! 1. wait until every rank has *consumed* round `s - 1` (my slot is free);
//! 2. write my part into my slot; publish `seq[me] = s`;
//! 3. wait until every rank has *published* `s`;
//! 4. read the slots (reductions add them in rank order, so results are
//!    bitwise reproducible for a fixed world size);
//! 5. `ack[me] = s`.
//!
//! Payloads larger than a slot are streamed in slot-sized chunks, so the
//! segment does not grow with the model.
//!
//! # Waiting
//!
//! Waits spin briefly (crossbeam `Backoff`), then sleep on the shared
//! doorbell futex (`FUTEX_WAIT`, not the private variant: the word is shared
//! between processes) in slices of at most 10 ms. After each slice the
//! waiter checks the abort flag, checks that every lagging peer is alive
//! (pid plus its start time from `/proc/<pid>/stat`, zombies count as dead:
//! `kill(pid, 0)` would report an unreaped peer as alive), and gives up at
//! the timeout. A rank that gives up sets the abort flag naming the peer it
//! blames, so every other rank fails fast with an error naming it too.

use std::ffi::CString;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::Backoff;
use kfac_kernels::Real;

use super::{check_elem, check_root, elem_size, CommError, Communicator, ReduceType};

/// Magic number at the start of every segment (`"KFACSHM1"`).
pub const MAGIC: u64 = u64::from_le_bytes(*b"KFACSHM1");
/// Layout version of the segment.
pub const LAYOUT_VERSION: u32 = 2;
/// Largest world size a group supports.
pub const MAX_WORLD: usize = 1024;
const HEADER_BYTES: usize = 256;
/// Longest job id (bytes) a segment stores.
pub const MAX_JOB_ID: usize = 64;
const CTL_BYTES: usize = 128;
const PAGE: usize = 4096;
/// Longest single futex sleep between liveness checks.
const SLEEP_SLICE: Duration = Duration::from_millis(10);

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    world: AtomicU32,
    slot_bytes: AtomicU64,
    generation: AtomicU64,
    /// 1 once rank 0 has initialized the header (Release; paired with the
    /// Acquire load of attaching ranks).
    ready: AtomicU32,
    /// Ranks attached so far (AcqRel increments; rank 0 unlinks at `world`).
    attached: AtomicU32,
    /// Futex word bumped on every publication (SeqCst, see `ring`).
    doorbell: AtomicU32,
    /// Ranks sleeping on the doorbell (SeqCst, see `ring`).
    sleepers: AtomicU32,
    /// 0, or 1 + the rank that aborted the group (SeqCst).
    aborted: AtomicU32,
    /// 0, or 1 + the rank blamed by the abort.
    blamed: AtomicU32,
    /// Pid of the process that created the segment (rank 0), written
    /// before `magic` (whose Release store publishes it).
    creator_pid: AtomicI32,
    /// Length of `job` in bytes (0: no job id).
    job_len: AtomicU32,
    /// Start time of the creator (field 22 of `/proc/<pid>/stat`).
    creator_start: AtomicU64,
    /// 0, or the process removing this (stale) segment: pid << 32 | low
    /// 32 bits of its start time (SeqCst compare-exchange, see
    /// `segment::claim`).
    reaper: AtomicU64,
    /// The creator's job id, `job_len` bytes (little-endian words).
    job: [AtomicU64; MAX_JOB_ID / 8],
}

#[repr(C)]
struct RankCtl {
    pid: AtomicI32,
    start_time: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds of the rank's last wait slice (for
    /// diagnostics).
    heartbeat: AtomicU64,
    /// Last round whose data this rank published (SeqCst store after the
    /// slot write; paired with the SeqCst loads of readers).
    seq: AtomicU64,
    /// Last round this rank finished reading (SeqCst; paired with writers'
    /// loads before they overwrite their slot).
    ack: AtomicU64,
    /// Descriptor of the current collective (kind, length, root), written
    /// before `seq` in a collective's first round and compared by all.
    desc_kind: AtomicU32,
    desc_root: AtomicU32,
    desc_len: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<RankCtl>() <= CTL_BYTES);

/// Options of a shared-memory group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmOptions {
    /// Bound on every wait (attach, each round of a collective).
    pub timeout: Duration,
    /// Bytes of each rank's data slot (payloads stream through it).
    pub slot_bytes: usize,
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            slot_bytes: 4 << 20,
        }
    }
}

/// The processes of one job on one machine, joined through shared memory.
///
/// ```no_run
/// use kfac_runtime::comm::{shm::{ShmGroup, ShmOptions}, Communicator};
/// // in each of the P processes started by `kfac-launch -n P`:
/// let mut g = ShmGroup::from_env(ShmOptions::default())?;
/// let mut v = vec![g.rank() as f32; 8];
/// g.allreduce_f32(&mut v)?;
/// # Ok::<(), kfac_runtime::comm::CommError>(())
/// ```
pub struct ShmGroup {
    base: *mut u8,
    len: usize,
    rank: usize,
    world: usize,
    slot_bytes: usize,
    name: CString,
    unlinked: bool,
    round: u64,
    timeout: Duration,
    peers: Vec<(i32, u64)>,
    broken: Option<CommError>,
}

// SAFETY: the mapping is owned by this value and only touched through it;
// the shared parts are atomics or slots guarded by the round protocol.
unsafe impl Send for ShmGroup {}

mod segment;

use segment::{alive, layout, now_ns};
pub use segment::{remove_segment, segment_exists};

impl ShmGroup {
    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header (checked at attach).
        unsafe { &*(self.base as *const Header) }
    }

    fn ctl(&self, r: usize) -> &RankCtl {
        debug_assert!(r < self.world);
        // SAFETY: `r < world`; the ctl blocks lie inside the mapping.
        unsafe { &*(self.base.add(HEADER_BYTES + r * CTL_BYTES) as *const RankCtl) }
    }

    fn slot_ptr(&self, r: usize) -> *mut u8 {
        let (slots_at, _) = layout(self.world, self.slot_bytes).unwrap_or((0, 0));
        // SAFETY: within the mapping by `layout` (checked at join).
        unsafe { self.base.add(slots_at + r * self.slot_bytes) }
    }

    fn unlink(&mut self) {
        if !self.unlinked {
            // SAFETY: valid name; unlinking only removes the name.
            unsafe { libc::shm_unlink(self.name.as_ptr()) };
            self.unlinked = true;
        }
    }

    /// Publishes progress: bump the doorbell, and wake sleepers if any.
    /// SeqCst on the doorbell and `sleepers` (here and in `sleep`) rules out
    /// a lost wake-up: either we see the sleeper, or it sees our state.
    fn ring(&self) {
        let h = self.header();
        h.doorbell.fetch_add(1, Ordering::SeqCst);
        if h.sleepers.load(Ordering::SeqCst) > 0 {
            // SAFETY: FUTEX_WAKE on a valid, aligned u32 in shared memory.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    h.doorbell.as_ptr(),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0,
                )
            };
        }
    }

    fn abort(&self, blamed: Option<usize>) {
        let h = self.header();
        h.blamed
            .store(blamed.map_or(0, |b| b as u32 + 1), Ordering::SeqCst);
        let _ =
            h.aborted
                .compare_exchange(0, self.rank as u32 + 1, Ordering::SeqCst, Ordering::SeqCst);
        self.ring();
    }

    /// Waits until `pending` returns no lagging ranks. `pending` lists the
    /// ranks not yet there (an error aborts the wait).
    fn wait_until(
        &self,
        op: &'static str,
        deadline: Instant,
        mut pending: impl FnMut(&Self) -> Result<Vec<usize>, CommError>,
    ) -> Result<(), CommError> {
        let backoff = Backoff::new();
        let h = self.header();
        loop {
            let lag = pending(self)?;
            if lag.is_empty() {
                return Ok(());
            }
            let ab = h.aborted.load(Ordering::SeqCst);
            if ab != 0 {
                let b = h.blamed.load(Ordering::SeqCst);
                return Err(CommError::Aborted {
                    by_rank: ab as usize - 1,
                    blamed: (b != 0).then(|| b as usize - 1),
                });
            }
            if !backoff.is_completed() {
                backoff.snooze();
                continue;
            }
            // Sleep on the doorbell.
            h.sleepers.fetch_add(1, Ordering::SeqCst);
            let v = h.doorbell.load(Ordering::SeqCst);
            let lag2 = pending(self)?;
            if lag2.is_empty() {
                h.sleepers.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(SLEEP_SLICE);
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: FUTEX_WAIT on a valid aligned u32 in shared memory with
            // a relative timeout; returns on wake, timeout, value change or
            // signal, all of which re-check the condition.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    h.doorbell.as_ptr(),
                    libc::FUTEX_WAIT,
                    v,
                    &ts as *const libc::timespec,
                    std::ptr::null::<u32>(),
                    0,
                )
            };
            h.sleepers.fetch_sub(1, Ordering::SeqCst);
            self.ctl(self.rank)
                .heartbeat
                .store(now_ns(), Ordering::Relaxed);
            // Liveness of the ranks still lagging (fresh list: a peer may
            // have finished its part during the sleep and exited since).
            let lag3 = pending(self)?;
            if lag3.is_empty() {
                return Ok(());
            }
            for &r in &lag3 {
                let c = self.ctl(r);
                let pid = c.pid.load(Ordering::SeqCst);
                if pid > 0 && !alive(pid, c.start_time.load(Ordering::SeqCst)) {
                    // A dead process cannot advance: if it is still lagging
                    // now, it died before doing its part.
                    if pending(self)?.contains(&r) {
                        self.abort(Some(r));
                        return Err(CommError::PeerDied { rank: r, pid });
                    }
                }
            }
            if Instant::now() >= deadline {
                self.abort(lag3.first().copied());
                return Err(CommError::Timeout {
                    op,
                    waiting_for: lag3,
                    timeout: self.timeout,
                });
            }
        }
    }

    /// One round of the protocol (see the module docs). `write` fills my
    /// slot; `read` sees every rank's slot. `desc` is checked to be equal on
    /// all ranks when given.
    fn round(
        &mut self,
        op: &'static str,
        desc: Option<(u32, u32, u64)>,
        write: impl FnOnce(&mut [u8]),
        read: impl FnOnce(&Self) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let s = self.round + 1;
        let world = self.world;
        let deadline = Instant::now() + self.timeout;
        // 1. every rank has consumed round s - 1: my slot is free
        self.wait_until(op, deadline, |g| {
            Ok((0..world)
                .filter(|&r| g.ctl(r).ack.load(Ordering::SeqCst) < s - 1)
                .collect())
        })?;
        // 2. write and publish
        // SAFETY: my slot is `slot_bytes` long inside the mapping, and no
        // rank reads it until I publish round `s` below.
        let mine =
            unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(self.rank), self.slot_bytes) };
        write(mine);
        let me = self.ctl(self.rank);
        if let Some((k, root, len)) = desc {
            me.desc_kind.store(k, Ordering::Relaxed);
            me.desc_root.store(root, Ordering::Relaxed);
            me.desc_len.store(len, Ordering::Relaxed);
        }
        me.seq.store(s, Ordering::SeqCst);
        self.ring();
        // 3. everyone has published
        self.wait_until(op, deadline, |g| {
            Ok((0..world)
                .filter(|&r| g.ctl(r).seq.load(Ordering::SeqCst) < s)
                .collect())
        })?;
        let mut result = Ok(());
        if let Some(d) = desc {
            for r in 0..world {
                let c = self.ctl(r);
                let theirs = (
                    c.desc_kind.load(Ordering::Relaxed),
                    c.desc_root.load(Ordering::Relaxed),
                    c.desc_len.load(Ordering::Relaxed),
                );
                if theirs != d {
                    result = Err(CommError::InvalidArgument {
                        reason: format!(
                            "{op}: rank {r} called (kind {}, root {}, {} bytes), rank {} called (kind {}, root {}, {} bytes)",
                            theirs.0, theirs.1, theirs.2, self.rank, d.0, d.1, d.2
                        ),
                    });
                    break;
                }
            }
        }
        // 4. read
        if result.is_ok() {
            result = read(self);
        }
        // 5. consumed
        self.ctl(self.rank).ack.store(s, Ordering::SeqCst);
        self.ring();
        self.round = s;
        result
    }

    fn slot(&self, r: usize, n: usize) -> &[u8] {
        // SAFETY: `n <= slot_bytes`; the slot was published for this round
        // and is not rewritten until every rank acks it.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(r), n.min(self.slot_bytes)) }
    }

    /// The data rounds of an allgather whose sizes are known: rank `r`'s
    /// `sizes[r]` bytes land at `out[offs[r]..]`, a slot-sized chunk per
    /// round.
    fn gather_rounds(
        &mut self,
        send: &[u8],
        sizes: &[usize],
        offs: &[usize],
        out: &mut [u8],
    ) -> Result<(), CommError> {
        let chunk = self.slot_bytes;
        let rounds = sizes.iter().map(|s| s.div_ceil(chunk)).max().unwrap_or(0);
        for k in 0..rounds {
            let lo = (k * chunk).min(send.len());
            let hi = (lo + chunk).min(send.len());
            self.round(
                "allgather",
                None,
                |slot| slot[..hi - lo].copy_from_slice(&send[lo..hi]),
                |g| {
                    for (r, (&size, &off)) in sizes.iter().zip(offs).enumerate() {
                        let rlo = (k * chunk).min(size);
                        let rhi = (rlo + chunk).min(size);
                        out[off + rlo..off + rhi].copy_from_slice(g.slot(r, rhi - rlo));
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
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

    fn chunk_for(&self, ty: ReduceType) -> usize {
        let e = elem_size(ty);
        self.slot_bytes / e * e
    }

    fn reduce_impl(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: Option<usize>,
    ) -> Result<(), CommError> {
        check_elem(data.len(), ty)?;
        if let Some(r) = root {
            check_root(r, self.world)?;
        }
        let chunk = self.chunk_for(ty);
        let rounds = data.len().div_ceil(chunk).max(1);
        let kind = if root.is_some() { 2 } else { 1 };
        let desc = (kind, root.unwrap_or(0) as u32, data.len() as u64);
        for k in 0..rounds {
            let lo = k * chunk;
            let hi = (lo + chunk).min(data.len());
            let part = &mut data[lo..hi];
            let me = self.rank;
            let n = part.len();
            let take = root.is_none_or(|r| r == me);
            // The write closure reads the chunk and the read closure (which
            // runs strictly after it, inside the same round) overwrites it:
            // share it as a raw pointer.
            let p = part.as_mut_ptr();
            let op = if root.is_some() {
                "reduce"
            } else {
                "allreduce"
            };
            self.round(
                op,
                (k == 0).then_some(desc),
                // SAFETY: `p` addresses the caller's `n`-byte chunk, not
                // accessed elsewhere during this round.
                |slot| slot[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(p, n) }),
                |g| {
                    if take {
                        sum_slots(g, p, n, ty);
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

/// `out = Σ_r slot_r` in rank order (out aliases the caller's chunk).
fn sum_slots(g: &ShmGroup, out: *mut u8, n: usize, ty: ReduceType) {
    match ty {
        ReduceType::F32 => sum_typed::<f32>(g, out, n / 4),
        ReduceType::F64 => sum_typed::<f64>(g, out, n / 8),
    }
}

fn sum_typed<T: Real>(g: &ShmGroup, out: *mut u8, n: usize) {
    let esz = std::mem::size_of::<T>();
    // `out` is the caller's chunk of `n` elements (n * esz bytes); callers of
    // the byte API may pass unaligned memory, handled by the second branch.
    let out_aligned = (out as usize).is_multiple_of(std::mem::align_of::<T>());
    let slots: Vec<&[T]> = (0..g.world)
        .map(|r| {
            // SAFETY: slots are page aligned (so aligned for T) and hold at
            // least n*esz published bytes this round.
            unsafe { std::slice::from_raw_parts(g.slot(r, n * esz).as_ptr().cast::<T>(), n) }
        })
        .collect();
    if out_aligned {
        // SAFETY: aligned, `n` elements, exclusively ours for this round.
        let o = unsafe { std::slice::from_raw_parts_mut(out.cast::<T>(), n) };
        o.copy_from_slice(slots[0]);
        for s in &slots[1..] {
            // x*1 + y is exact: the same as x + y.
            T::simd_axpy(T::ONE, s, o);
        }
    } else {
        for i in 0..n {
            let mut acc = slots[0][i];
            for s in &slots[1..] {
                acc += s[i];
            }
            // SAFETY: in bounds (i < n); unaligned write of a plain value.
            unsafe { out.add(i * esz).cast::<T>().write_unaligned(acc) };
        }
    }
}

impl Communicator for ShmGroup {
    fn abort_group(&mut self) {
        self.abort(None);
    }

    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.world
    }

    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        self.guard(|g| g.reduce_impl(data, ty, None))
    }

    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        self.guard(|g| g.reduce_impl(data, ty, Some(root)))
    }

    fn broadcast_discard(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        // Same rounds as `broadcast_bytes` on a non-root rank, without the
        // copy out of the root's slot.
        self.guard(|g| {
            check_root(root, g.world)?;
            if g.rank == root {
                return Err(CommError::InvalidArgument {
                    reason: "the root of a broadcast cannot discard its own data".into(),
                });
            }
            let rounds = len.div_ceil(g.slot_bytes).max(1);
            for k in 0..rounds {
                let desc = (k == 0).then_some((3, root as u32, len as u64));
                g.round("broadcast", desc, |_| {}, |_| Ok(()))?;
            }
            Ok(())
        })
    }

    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CommError> {
        self.guard(|g| {
            check_root(root, g.world)?;
            let chunk = g.slot_bytes;
            let rounds = data.len().div_ceil(chunk).max(1);
            let desc = (3, root as u32, data.len() as u64);
            let me = g.rank;
            for k in 0..rounds {
                let lo = k * chunk;
                let hi = (lo + chunk).min(data.len());
                let part = &mut data[lo..hi];
                let n = part.len();
                let dst = part.as_mut_ptr();
                g.round(
                    "broadcast",
                    (k == 0).then_some(desc),
                    |slot| {
                        if me == root {
                            // SAFETY: `dst` is the caller's n-byte chunk,
                            // only read here (the root never writes it).
                            slot[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(dst, n) })
                        }
                    },
                    |g| {
                        if me != root {
                            // SAFETY: `dst` is the caller's chunk of n bytes.
                            unsafe {
                                std::ptr::copy_nonoverlapping(g.slot(root, n).as_ptr(), dst, n)
                            };
                        }
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })
    }

    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        self.guard(|g| {
            let world = g.world;
            let mut sizes = vec![0usize; world];
            let my = send.len() as u64;
            g.round(
                "allgather",
                Some((4, 0, 0)),
                |slot| slot[..8].copy_from_slice(&my.to_le_bytes()),
                |g| {
                    for (r, s) in sizes.iter_mut().enumerate() {
                        let b = g.slot(r, 8);
                        *s = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                            as usize;
                    }
                    Ok(())
                },
            )?;
            // Sizes come from the peers: an impossible total is an error,
            // not an allocation abort.
            let total = sizes
                .iter()
                .try_fold(0usize, |a, &s| a.checked_add(s))
                .unwrap_or(usize::MAX);
            let mut out = Vec::new();
            out.try_reserve_exact(total)
                .map_err(|_| CommError::InvalidArgument {
                    reason: format!("allgather: cannot allocate {total} bytes for {sizes:?}"),
                })?;
            out.resize(total, 0);
            let offs: Vec<usize> = sizes
                .iter()
                .scan(0, |acc, &s| {
                    let o = *acc;
                    *acc += s;
                    Some(o)
                })
                .collect();
            g.gather_rounds(send, &sizes, &offs, &mut out)?;
            Ok((out, sizes))
        })
    }

    fn allgather_into(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        self.guard(|g| {
            let world = g.world;
            let n = send.len();
            let my = n as u64;
            // Every rank learns every length in the first round, so all
            // refuse a mismatch together.
            let mut equal = true;
            g.round(
                "allgather",
                Some((4, 0, 0)),
                |slot| slot[..8].copy_from_slice(&my.to_le_bytes()),
                |g| {
                    for r in 0..world {
                        let b = g.slot(r, 8);
                        let s = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                        equal &= s == my;
                    }
                    Ok(())
                },
            )?;
            if !equal || Some(recv.len()) != n.checked_mul(world) {
                return Err(CommError::InvalidArgument {
                    reason: format!(
                        "allgather_into: contributions of different lengths, or {} bytes for {world} x {n}",
                        recv.len()
                    ),
                });
            }
            let sizes = vec![n; world];
            let offs: Vec<usize> = (0..world).map(|r| r * n).collect();
            g.gather_rounds(send, &sizes, &offs, recv)
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.guard(|g| g.round("barrier", Some((5, 0, 0)), |_| {}, |_| Ok(())))
    }
}

impl Drop for ShmGroup {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: `base`/`len` are our mapping, unmapped only here.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl std::fmt::Debug for ShmGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmGroup")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}
