//! Setting up a shared-memory group: the segment's name, creation,
//! attachment and validation (magic, version, world size, readiness,
//! creator liveness), mapping and unmapping, and peer liveness from
//! `/proc`. The collectives that run over a joined group are in the parent
//! module.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    Header, RankCtl, ShmGroup, ShmOptions, CTL_BYTES, HEADER_BYTES, LAYOUT_VERSION, MAGIC,
    MAX_WORLD, PAGE,
};
use crate::comm::{CommError, Communicator};

fn os_err(call: &'static str) -> CommError {
    CommError::Os {
        call,
        reason: std::io::Error::last_os_error().to_string(),
    }
}

fn setup(reason: String) -> CommError {
    CommError::Setup { reason }
}

/// Segment size for a world and slot size.
pub(super) fn layout(world: usize, slot_bytes: usize) -> Option<(usize, usize)> {
    let ctl_end = HEADER_BYTES.checked_add(world.checked_mul(CTL_BYTES)?)?;
    let slots_at = ctl_end.div_ceil(PAGE) * PAGE;
    let len = slots_at.checked_add(world.checked_mul(slot_bytes)?)?;
    Some((slots_at, len))
}

/// `(state, start time)` of a process from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    // fields 4..=21 skipped; starttime is field 22 (the 20th after state)
    let start = it.nth(18)?.parse().ok()?;
    Some((state, start))
}

pub(super) fn alive(pid: i32, start: u64) -> bool {
    match proc_stat(pid) {
        Some((state, st)) => st == start && state != 'Z' && state != 'X',
        None => false,
    }
}

pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn segment_name(group: &str) -> Result<CString, CommError> {
    if group.is_empty()
        || group.len() > 200
        || !group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(setup(format!(
            "group name {group:?} must be 1-200 characters of [A-Za-z0-9._-]"
        )));
    }
    CString::new(format!("/kfac-{group}")).map_err(|_| setup("group name contains NUL".into()))
}

/// Whether `/dev/shm` holds a segment for `group` (for tests and tools).
pub fn segment_exists(group: &str) -> bool {
    std::path::Path::new(&format!("/dev/shm/kfac-{group}")).exists()
}

/// Removes the segment of `group` from `/dev/shm` if it is there; returns
/// whether one was. For launchers, which own the group name: ranks unlink
/// the segment once every rank has attached, so only a job whose rank died
/// before that leaves one behind. Ranks that still have it mapped keep
/// using it (only the name goes). Errors: an invalid group name, or
/// `shm_unlink` failing other than with ENOENT.
pub fn remove_segment(group: &str) -> Result<bool, CommError> {
    let name = segment_name(group)?;
    // SAFETY: `name` is a valid NUL-terminated string.
    if unsafe { libc::shm_unlink(name.as_ptr()) } == 0 {
        return Ok(true);
    }
    if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
        return Ok(false);
    }
    Err(os_err("shm_unlink"))
}

struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` come from a successful mmap of exactly `len`
        // bytes that nothing else unmaps.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn map(fd: i32, len: usize) -> Result<Mapping, CommError> {
    // SAFETY: a fresh shared mapping of `len` bytes of an open shm fd; the
    // kernel picks the address; failure is reported as MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    Ok(Mapping {
        base: p.cast(),
        len,
    })
}

fn fd_size(fd: i32) -> Result<usize, CommError> {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is writable.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(os_err("fstat"));
    }
    Ok(st.st_size as usize)
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

impl ShmGroup {
    /// Joins the group named by `KFAC_GROUP` with the rank and world size of
    /// the environment (see [`env`](crate::comm::env)).
    ///
    /// # Errors
    /// As [`join`](Self::join), plus a missing or malformed environment.
    pub fn from_env(opts: ShmOptions) -> Result<Self, CommError> {
        let e = crate::comm::env::from_env()?;
        Self::join(&e.group, e.rank, e.world_size, opts)
    }

    /// Joins (rank 0: creates) the group `group` as `rank` of `world`, and
    /// returns once every rank has attached.
    ///
    /// # Errors
    /// [`CommError::Setup`] for a bad name, rank or world size, a segment
    /// that already exists (a stale one from a crashed run, or another
    /// job's), a foreign or incompatible segment, a full `/dev/shm`, or
    /// peers that do not attach within the timeout; [`CommError::Os`].
    pub fn join(
        group: &str,
        rank: usize,
        world: usize,
        opts: ShmOptions,
    ) -> Result<Self, CommError> {
        if world == 0 || world > MAX_WORLD || rank >= world {
            return Err(setup(format!(
                "rank {rank} of world {world} (max world {MAX_WORLD})"
            )));
        }
        if opts.slot_bytes < 64 || !opts.slot_bytes.is_multiple_of(64) || opts.slot_bytes > 1 << 30
        {
            return Err(setup(format!(
                "slot_bytes {} must be a multiple of 64 in [64, 1 GiB]",
                opts.slot_bytes
            )));
        }
        let name = segment_name(group)?;
        let (slots_at, len) =
            layout(world, opts.slot_bytes).ok_or_else(|| setup("segment size overflows".into()))?;
        let deadline = Instant::now() + opts.timeout;
        let path = format!("/dev/shm{}", name.to_string_lossy());
        let mapping = if rank == 0 {
            Self::create(&name, &path, world, opts.slot_bytes, len)?
        } else {
            Self::attach(&name, &path, world, opts.slot_bytes, len, deadline)?
        };
        let (state_start, pid) = (
            proc_stat(std::process::id() as i32),
            std::process::id() as i32,
        );
        let start = state_start.map(|s| s.1).unwrap_or(0);
        let mut g = ShmGroup {
            base: mapping.base,
            len: mapping.len,
            rank,
            world,
            slot_bytes: opts.slot_bytes,
            name,
            unlinked: rank != 0,
            round: 0,
            timeout: opts.timeout,
            peers: vec![(0, 0); world],
            broken: None,
        };
        std::mem::forget(mapping); // now owned by `g` (unmapped in Drop)
        let _ = slots_at;
        let me = g.ctl(rank);
        me.start_time.store(start, Ordering::SeqCst);
        me.pid.store(pid, Ordering::SeqCst);
        me.heartbeat.store(now_ns(), Ordering::Relaxed);
        g.header().attached.fetch_add(1, Ordering::AcqRel);
        g.ring();
        if rank == 0 {
            // Unlink as soon as everyone has mapped the segment.
            g.wait_until("attach", deadline, |g| {
                let n = g.header().attached.load(Ordering::Acquire) as usize;
                if n >= world {
                    Ok(Vec::new())
                } else {
                    Ok((0..world)
                        .filter(|&r| g.ctl(r).pid.load(Ordering::SeqCst) == 0)
                        .collect())
                }
            })?;
            g.unlink();
        }
        g.barrier()?;
        for r in 0..world {
            let c = g.ctl(r);
            g.peers[r] = (
                c.pid.load(Ordering::SeqCst),
                c.start_time.load(Ordering::SeqCst),
            );
        }
        Ok(g)
    }

    fn create(
        name: &CString,
        path: &str,
        world: usize,
        slot: usize,
        len: usize,
    ) -> Result<Mapping, CommError> {
        // SAFETY: `name` is a valid NUL-terminated string.
        let fd = unsafe {
            libc::shm_open(
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o600,
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EEXIST) {
                return Err(setup(Self::describe_existing(name, path)));
            }
            return Err(setup(format!("cannot create {path}: {err}")));
        }
        let fd = Fd(fd);
        let cleanup = |e: CommError| {
            // SAFETY: valid name; we created this segment and remove it on failure.
            unsafe { libc::shm_unlink(name.as_ptr()) };
            e
        };
        // SAFETY: `fd` is open for writing.
        if unsafe { libc::ftruncate(fd.0, len as libc::off_t) } != 0 {
            return Err(cleanup(os_err("ftruncate")));
        }
        // SAFETY: as above; returns an errno value rather than setting errno.
        let rc = unsafe { libc::posix_fallocate(fd.0, 0, len as libc::off_t) };
        if rc != 0 {
            return Err(cleanup(setup(format!(
                "cannot reserve {len} bytes for {path}: {} (is /dev/shm full?)",
                std::io::Error::from_raw_os_error(rc)
            ))));
        }
        let m = map(fd.0, len).map_err(cleanup)?;
        // SAFETY: the mapping is at least HEADER_BYTES long, page aligned,
        // and zero-filled; Header is all atomics (valid when zeroed).
        let h = unsafe { &*(m.base as *const Header) };
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.world.store(world as u32, Ordering::Relaxed);
        h.slot_bytes.store(slot as u64, Ordering::Relaxed);
        h.generation.store(
            now_ns() ^ ((std::process::id() as u64) << 32),
            Ordering::Relaxed,
        );
        h.magic.store(MAGIC, Ordering::Release);
        // SAFETY: ctl block of rank 0 lies inside the mapping (layout()).
        let c0 = unsafe { &*(m.base.add(HEADER_BYTES) as *const RankCtl) };
        c0.start_time.store(
            proc_stat(std::process::id() as i32)
                .map(|s| s.1)
                .unwrap_or(0),
            Ordering::SeqCst,
        );
        c0.pid.store(std::process::id() as i32, Ordering::SeqCst);
        // Release: pairs with attachers' Acquire load of `ready`.
        h.ready.store(1, Ordering::Release);
        Ok(m)
    }

    /// Explains an existing segment rank 0 could not create.
    fn describe_existing(name: &CString, path: &str) -> String {
        // SAFETY: valid name; read-only open.
        let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDONLY, 0) };
        if fd < 0 {
            return format!("{path} already exists");
        }
        let fd = Fd(fd);
        let size = fd_size(fd.0).unwrap_or(0);
        if size < HEADER_BYTES + CTL_BYTES {
            return format!("{path} already exists and is not a kfac segment ({size} bytes)");
        }
        // SAFETY: read-only mapping of the first page-sized prefix.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HEADER_BYTES + CTL_BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.0,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return format!("{path} already exists");
        }
        // SAFETY: mapped above with at least this many bytes; atomics are
        // valid for any bit pattern.
        let (magic, pid, start) = unsafe {
            let h = &*(p as *const Header);
            let c = &*((p as *const u8).add(HEADER_BYTES) as *const RankCtl);
            (
                h.magic.load(Ordering::Acquire),
                c.pid.load(Ordering::SeqCst),
                c.start_time.load(Ordering::SeqCst),
            )
        };
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, HEADER_BYTES + CTL_BYTES) };
        if magic != MAGIC {
            format!("{path} already exists and is a foreign segment (magic {magic:#018x})")
        } else if pid > 0 && alive(pid, start) {
            format!("{path} is in use by a live job (rank 0 is pid {pid}); use another group name")
        } else {
            format!(
                "{path} is a stale segment left by a crashed run (its rank 0, pid {pid}, is gone); \
                 remove it (rm {path}) or use another group name"
            )
        }
    }

    fn attach(
        name: &CString,
        path: &str,
        world: usize,
        slot: usize,
        len: usize,
        deadline: Instant,
    ) -> Result<Mapping, CommError> {
        let mut last = String::from("not found");
        loop {
            // SAFETY: valid name.
            let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR, 0) };
            if fd >= 0 {
                let fd = Fd(fd);
                let size = fd_size(fd.0)?;
                if size >= HEADER_BYTES {
                    let m = map(fd.0, size)?;
                    // SAFETY: at least HEADER_BYTES mapped; atomics only.
                    let h = unsafe { &*(m.base as *const Header) };
                    let magic = h.magic.load(Ordering::Acquire);
                    if magic != 0 && magic != MAGIC {
                        return Err(setup(format!(
                            "{path} is a foreign segment (magic {magic:#018x})"
                        )));
                    }
                    if magic == MAGIC {
                        let v = h.version.load(Ordering::Relaxed);
                        if v != LAYOUT_VERSION {
                            return Err(setup(format!(
                                "{path} has layout version {v}, this build uses {LAYOUT_VERSION}"
                            )));
                        }
                        let w = h.world.load(Ordering::Relaxed) as usize;
                        if w != world {
                            return Err(setup(format!(
                                "{path} is for a world of {w}, this rank expects {world}"
                            )));
                        }
                        let s = h.slot_bytes.load(Ordering::Relaxed) as usize;
                        if s != slot {
                            return Err(setup(format!(
                                "{path} has {s}-byte slots, this rank expects {slot}"
                            )));
                        }
                        if size != len {
                            return Err(setup(format!("{path} is {size} bytes, expected {len}")));
                        }
                        // Acquire: pairs with rank 0's Release store.
                        if h.ready.load(Ordering::Acquire) == 1 {
                            return Ok(m);
                        }
                        last = "not initialized yet".into();
                    } else {
                        last = "header not written yet".into();
                    }
                } else {
                    last = format!("only {size} bytes");
                }
            }
            if Instant::now() >= deadline {
                return Err(setup(format!(
                    "{path}: rank 0 did not create the group in time ({last})"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
