//! Setting up a shared-memory group: the segment's name, creation,
//! attachment and validation (magic, version, world size, readiness,
//! creator liveness, job id), the removal of stale segments (the protocol
//! is in the parent module's docs, Set-up), mapping and unmapping, and
//! peer liveness from `/proc`. The collectives that run over a joined group are in the parent
//! module.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    Header, RankCtl, ShmGroup, ShmOptions, CTL_BYTES, HEADER_BYTES, LAYOUT_VERSION, MAGIC,
    MAX_JOB_ID, MAX_WORLD, PAGE,
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

/// `(pid, start time)` of this process.
fn me() -> (i32, u64) {
    let pid = std::process::id() as i32;
    (pid, proc_stat(pid).map_or(0, |s| s.1))
}

/// Pause between two looks at a segment that is not ready yet.
const RETRY: Duration = Duration::from_millis(2);
/// Age after which a segment whose creator never recorded itself (killed
/// between its exclusive create and the first header write) is stale.
const UNRECORDED_STALE_AFTER: Duration = Duration::from_secs(10);

/// The job id of this process: `KFAC_JOB_ID` (unset or empty: none).
///
/// # Errors
/// [`CommError::Setup`] for an id that [`ShmGroup::join_job`] refuses.
pub(super) fn env_job_id() -> Result<Option<String>, CommError> {
    match std::env::var("KFAC_JOB_ID") {
        Ok(v) if !v.is_empty() => {
            check_job_id(&v)?;
            Ok(Some(v))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(setup("KFAC_JOB_ID is not valid UTF-8".into()))
        }
    }
}

fn check_job_id(id: &str) -> Result<(), CommError> {
    if id.is_empty() || id.len() > MAX_JOB_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(setup(format!(
            "job id {id:?} must be 1-{MAX_JOB_ID} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

fn job_label(job: &[u8]) -> String {
    if job.is_empty() {
        "no job id".into()
    } else {
        format!("job id {:?}", String::from_utf8_lossy(job))
    }
}

/// The job id stored in a header (empty: none).
fn read_job(h: &Header) -> Vec<u8> {
    let n = (h.job_len.load(Ordering::Relaxed) as usize).min(MAX_JOB_ID);
    let mut b: Vec<u8> = h
        .job
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .collect();
    b.truncate(n);
    b
}

/// `pid << 32 | low 32 bits of the start time`: the `reaper` word.
fn reaper_tag(pid: i32, start: u64) -> u64 {
    ((pid as u32 as u64) << 32) | (start & 0xffff_ffff)
}

fn reaper_alive(tag: u64) -> bool {
    let pid = (tag >> 32) as i32;
    match proc_stat(pid) {
        Some((state, st)) => st & 0xffff_ffff == tag & 0xffff_ffff && state != 'Z' && state != 'X',
        None => false,
    }
}

/// Time since the inode behind `fd` last changed (0 when unknown).
fn age(fd: i32) -> Duration {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is writable.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Duration::ZERO;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Duration::from_secs(now.saturating_sub(st.st_ctime).max(0) as u64)
}

/// Whether `path` still names the inode open as `fd`.
fn same_inode(fd: i32, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is writable.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    meta.ino() == st.st_ino && meta.dev() == st.st_dev
}

/// What rank 0 found under a name it could not create.
enum Existing {
    /// Nothing any more (unlinked in between): create again.
    Gone,
    /// A stale segment, claimed and unlinked by us: create again.
    Removed { pid: i32 },
    /// Being created or removed by a live process: look again later.
    Busy(String),
    /// In use by a live job, or not ours: an error.
    Refused(String),
}

/// Looks at the segment under `name`, and removes it if it is stale (see
/// the module docs, Set-up).
fn existing(name: &CString, path: &str, job: Option<&str>) -> Existing {
    // SAFETY: valid name.
    let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Existing::Gone;
        }
        return Existing::Refused(format!("{path} already exists and cannot be opened: {err}"));
    }
    let fd = Fd(fd);
    let size = fd_size(fd.0).unwrap_or(0);
    if size < HEADER_BYTES {
        // A creator sizes its segment right after creating it.
        return if age(fd.0) < UNRECORDED_STALE_AFTER {
            Existing::Busy(format!("{path} is still being created ({size} bytes)"))
        } else {
            Existing::Refused(format!(
                "{path} already exists and is not a kfac segment ({size} bytes)"
            ))
        };
    }
    let m = match map(fd.0, HEADER_BYTES) {
        Ok(m) => m,
        Err(e) => return Existing::Refused(format!("{path} already exists: {e}")),
    };
    // SAFETY: at least HEADER_BYTES mapped; atomics are valid for any bits.
    let h = unsafe { &*(m.base as *const Header) };
    let magic = h.magic.load(Ordering::Acquire);
    if magic != 0 && magic != MAGIC {
        return Existing::Refused(format!(
            "{path} already exists and is a foreign segment (magic {magic:#018x})"
        ));
    }
    if magic == MAGIC {
        let v = h.version.load(Ordering::Relaxed);
        if v != LAYOUT_VERSION {
            return Existing::Refused(format!(
                "{path} already exists with layout version {v} (this build uses \
                 {LAYOUT_VERSION}); if no job uses it, remove it (rm {path})"
            ));
        }
    }
    let pid = h.creator_pid.load(Ordering::SeqCst);
    let start = h.creator_start.load(Ordering::SeqCst);
    if pid > 0 && alive(pid, start) {
        if magic == 0 {
            return Existing::Busy(format!("{path} is still being created by pid {pid}"));
        }
        return Existing::Refused(format!(
            "{path} is in use by a live job ({}, rank 0 is pid {pid}); this rank has {}: \
             use another group name",
            job_label(&read_job(h)),
            job_label(job.unwrap_or("").as_bytes())
        ));
    }
    if pid <= 0 && age(fd.0) < UNRECORDED_STALE_AFTER {
        return Existing::Busy(format!("{path} is still being created"));
    }
    // Stale: claim it, then unlink its name (only the claim's winner does).
    let (my_pid, my_start) = me();
    let cur = h.reaper.load(Ordering::SeqCst);
    if cur != 0 && reaper_alive(cur) {
        return Existing::Busy(format!(
            "{path} is a stale segment being removed by pid {}",
            cur >> 32
        ));
    }
    let mine = reaper_tag(my_pid, my_start);
    if h.reaper
        .compare_exchange(cur, mine, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Existing::Busy(format!("{path} is a stale segment being removed"));
    }
    // The name can only have moved on if a previous reaper died after its
    // unlink: then it refers to another inode and must stay.
    if same_inode(fd.0, path) {
        // SAFETY: valid name; removes the name only, mappings stay valid.
        unsafe { libc::shm_unlink(name.as_ptr()) };
    }
    Existing::Removed { pid }
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
    /// the environment (see [`env`](crate::comm::env)) and the job id
    /// `KFAC_JOB_ID` (none when unset or empty; `kfac-launch` sets it).
    ///
    /// # Errors
    /// As [`join`](Self::join), plus a missing or malformed environment.
    pub fn from_env(opts: ShmOptions) -> Result<Self, CommError> {
        let e = crate::comm::env::from_env()?;
        let job = env_job_id()?;
        Self::join_job(&e.group, e.rank, e.world_size, job.as_deref(), opts)
    }

    /// Joins (rank 0: creates) the group `group` as `rank` of `world`, and
    /// returns once every rank has attached. The job id is `KFAC_JOB_ID`
    /// (none when unset or empty), as in [`join_job`](Self::join_job).
    ///
    /// # Errors
    /// As [`join_job`](Self::join_job), plus a malformed `KFAC_JOB_ID`.
    pub fn join(
        group: &str,
        rank: usize,
        world: usize,
        opts: ShmOptions,
    ) -> Result<Self, CommError> {
        let job = env_job_id()?;
        Self::join_job(group, rank, world, job.as_deref(), opts)
    }

    /// Joins (rank 0: creates) the group `group` as `rank` of `world` for
    /// the job `job`, and returns once every rank has attached. Every rank
    /// of a job must pass the same `job` (1 to [`MAX_JOB_ID`] printable
    /// ASCII characters, or `None`); ranks of another job using the same
    /// group name are refused at join. A segment left under the name by a
    /// dead creator is removed and recreated (see the module docs).
    ///
    /// # Errors
    /// [`CommError::Setup`] for a bad name, job id, rank or world size, a
    /// segment in use by another live job (named with both job ids), a
    /// foreign or incompatible segment, a full `/dev/shm`, or peers that do
    /// not attach within the timeout; [`CommError::Os`].
    pub fn join_job(
        group: &str,
        rank: usize,
        world: usize,
        job: Option<&str>,
        opts: ShmOptions,
    ) -> Result<Self, CommError> {
        if let Some(j) = job {
            check_job_id(j)?;
        }
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
            Self::create(&name, &path, world, opts.slot_bytes, len, job, deadline)?
        } else {
            Self::attach(&name, &path, world, opts.slot_bytes, len, job, deadline)?
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

    #[allow(clippy::too_many_arguments)]
    fn create(
        name: &CString,
        path: &str,
        world: usize,
        slot: usize,
        len: usize,
        job: Option<&str>,
        deadline: Instant,
    ) -> Result<Mapping, CommError> {
        loop {
            // SAFETY: `name` is a valid NUL-terminated string.
            let fd = unsafe {
                libc::shm_open(
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                    0o600,
                )
            };
            if fd >= 0 {
                return Self::init(Fd(fd), name, path, world, slot, len, job);
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(setup(format!("cannot create {path}: {err}")));
            }
            match existing(name, path, job) {
                Existing::Gone => {}
                Existing::Removed { pid } => {
                    log::warn!("removed {path}, a stale segment of the dead process {pid}");
                }
                Existing::Refused(why) => return Err(setup(why)),
                Existing::Busy(why) => {
                    if Instant::now() >= deadline {
                        return Err(setup(why));
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    /// Sizes and initializes a segment this process just created.
    fn init(
        fd: Fd,
        name: &CString,
        path: &str,
        world: usize,
        slot: usize,
        len: usize,
        job: Option<&str>,
    ) -> Result<Mapping, CommError> {
        let cleanup = |e: CommError| {
            // SAFETY: valid name; we created this segment and remove it on failure.
            unsafe { libc::shm_unlink(name.as_ptr()) };
            e
        };
        let reserve = |bytes: usize| {
            // SAFETY: `fd` is open for writing; returns an errno value
            // rather than setting errno.
            let rc = unsafe { libc::posix_fallocate(fd.0, 0, bytes as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            Err(setup(format!(
                "cannot reserve {len} bytes for {path}: {} (is /dev/shm full?)",
                std::io::Error::from_raw_os_error(rc)
            )))
        };
        // SAFETY: `fd` is open for writing.
        if unsafe { libc::ftruncate(fd.0, len as libc::off_t) } != 0 {
            return Err(cleanup(os_err("ftruncate")));
        }
        // The header page first, so that the creator is recorded (and a
        // creator killed from now on is recognizable as dead) before the
        // possibly slow reservation of the whole segment.
        reserve(PAGE).map_err(cleanup)?;
        let m = map(fd.0, len).map_err(cleanup)?;
        // SAFETY: the mapping is at least HEADER_BYTES long, page aligned,
        // and zero-filled; Header is all atomics (valid when zeroed).
        let h = unsafe { &*(m.base as *const Header) };
        let (pid, start) = me();
        h.creator_start.store(start, Ordering::SeqCst);
        h.creator_pid.store(pid, Ordering::SeqCst);
        reserve(len).map_err(cleanup)?;
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.world.store(world as u32, Ordering::Relaxed);
        h.slot_bytes.store(slot as u64, Ordering::Relaxed);
        h.generation.store(
            now_ns() ^ ((std::process::id() as u64) << 32),
            Ordering::Relaxed,
        );
        let job = job.unwrap_or("").as_bytes();
        for (i, w) in h.job.iter().enumerate() {
            let mut b = [0u8; 8];
            let lo = (i * 8).min(job.len());
            let hi = (lo + 8).min(job.len());
            b[..hi - lo].copy_from_slice(&job[lo..hi]);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        h.job_len.store(job.len() as u32, Ordering::Relaxed);
        // Release: publishes the fields above to whoever Acquire-loads it.
        h.magic.store(MAGIC, Ordering::Release);
        // SAFETY: ctl block of rank 0 lies inside the mapping (layout()).
        let c0 = unsafe { &*(m.base.add(HEADER_BYTES) as *const RankCtl) };
        c0.start_time.store(start, Ordering::SeqCst);
        c0.pid.store(pid, Ordering::SeqCst);
        // Release: pairs with attachers' Acquire load of `ready`.
        h.ready.store(1, Ordering::Release);
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    fn attach(
        name: &CString,
        path: &str,
        world: usize,
        slot: usize,
        len: usize,
        job: Option<&str>,
        deadline: Instant,
    ) -> Result<Mapping, CommError> {
        let mine = job.unwrap_or("").as_bytes();
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
                        // Published by the Acquire load of `magic` above.
                        let pid = h.creator_pid.load(Ordering::SeqCst);
                        let start = h.creator_start.load(Ordering::SeqCst);
                        let theirs = read_job(h);
                        if !alive(pid, start) {
                            // Never join a dead creator's segment: our
                            // rank 0 replaces it.
                            last = format!("a stale segment of the dead process {pid}");
                        } else if theirs != mine {
                            return Err(setup(format!(
                                "{path} belongs to another job ({}, rank 0 is pid {pid}), this \
                                 rank has {}: two jobs use the group name; give them distinct \
                                 names or job ids",
                                job_label(&theirs),
                                job_label(mine)
                            )));
                        } else {
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
                                return Err(setup(format!(
                                    "{path} is {size} bytes, expected {len}"
                                )));
                            }
                            // Acquire: pairs with rank 0's Release store.
                            if h.ready.load(Ordering::Acquire) == 1 {
                                return Ok(m);
                            }
                            last = "not initialized yet".into();
                        }
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
            std::thread::sleep(RETRY);
        }
    }
}
