//! One job: start the ranks, then a single-threaded event loop (`poll(2)`
//! on the signal self-pipe and the ranks' output pipes) that forwards
//! signals, applies fail-fast, the timeout and the grace period, and ends
//! the job; then the clean-up every job gets, whatever happened: processes
//! left in the ranks' process groups are stopped, the ranks are reaped and
//! the group's shared-memory segment is removed.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::output::Stream;
use crate::procs::{self, Exit};
use crate::signals::{self, SelfPipe};

/// Longest sleep of the event loop between checks.
const TICK: Duration = Duration::from_millis(50);
/// Once every rank has exited, how long to keep reading output still in
/// the pipes (a process the ranks left behind may hold them open forever).
const DRAIN: Duration = Duration::from_millis(200);
/// How often leftover processes are looked for while they get their grace.
const LEFTOVER_POLL: Duration = Duration::from_millis(10);

/// What to run.
pub struct JobSpec {
    /// Number of ranks.
    pub world: usize,
    /// Program and its arguments.
    pub command: Vec<OsString>,
    /// Stop the job after this long (exit status 124).
    pub timeout: Option<Duration>,
    /// Between SIGTERM (or a forwarded signal) and SIGKILL.
    pub grace: Duration,
}

struct Rank {
    rank: usize,
    pid: i32,
    exit: Option<Exit>,
}

/// A fresh id for the job, unique on this machine and across time:
/// launcher pid, wall-clock nanoseconds and 32 random bits, in
/// `[0-9a-f-]` (so it is also a valid shared-memory group name).
fn job_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut rnd = [0u8; 4];
    // SAFETY: `rnd` is writable for its length. A failure leaves zeros; the
    // pid and the time alone are already unique.
    unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    format!(
        "{}-{nanos:x}-{:08x}",
        std::process::id(),
        u32::from_ne_bytes(rnd)
    )
}

/// Starts one rank: its own process group, parent-death signal SIGKILL,
/// stdin from /dev/null, stdout and stderr through pipes.
fn spawn(spec: &JobSpec, rank: usize, id: &str) -> std::io::Result<(i32, OwnedFd, OwnedFd)> {
    // SAFETY: getpid has no preconditions.
    let launcher = unsafe { libc::getpid() };
    let mut cmd = Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .env("KFAC_RANK", rank.to_string())
        .env("KFAC_WORLD_SIZE", spec.world.to_string())
        .env("KFAC_GROUP", id)
        .env("KFAC_JOB_ID", id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the hook runs between fork and exec and only makes
    // async-signal-safe calls (sigaction, prctl, getppid) and allocates
    // nothing (`from_raw_os_error`, `last_os_error`).
    unsafe {
        cmd.pre_exec(move || {
            signals::reset_in_child();
            // The death signal is tied to the thread that forked: ranks are
            // only ever started from the main thread, which lives as long
            // as the launcher.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before prctl: then nobody would
            // send the death signal any more.
            if libc::getppid() != launcher {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().map(OwnedFd::from);
    let err = child.stderr.take().map(OwnedFd::from);
    // `spawn` returns after the exec succeeded; the child is reaped by
    // `procs::reap`, never through `child` (dropping it does not wait).
    match (out, err) {
        (Some(o), Some(e)) => Ok((child.id() as i32, o, e)),
        _ => unreachable!("both pipes were requested"),
    }
}

/// Sends `sig` to every rank's process group.
fn signal_all(ranks: &[Rank], sig: libc::c_int) {
    for r in ranks {
        procs::signal_rank(r.pid, r.exit.is_none(), sig);
    }
}

/// Waits for one of `fds` (or the self-pipe) to be readable, at most
/// `timeout`; returns the indexes in `fds` that are.
fn wait_readable(pipe: &SelfPipe, fds: &[i32], timeout: Duration) -> Vec<usize> {
    let mut pfds: Vec<libc::pollfd> = std::iter::once(pipe.fd())
        .chain(fds.iter().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of its length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Vec::new(); // timeout, or EINTR by a signal: the caller looks
    }
    pfds[1..]
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect()
}

/// Runs the job; returns the launcher's exit status.
pub fn run(spec: &JobSpec) -> i32 {
    let pipe = match SelfPipe::install() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kfac-launch: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let id = job_id();
    let mut ranks: Vec<Rank> = Vec::with_capacity(spec.world);
    let mut streams: Vec<Stream> = Vec::with_capacity(2 * spec.world);
    // The first cause decides the exit status: a failed rank, a signal, the
    // timeout, a rank that could not be started.
    let mut status: Option<i32> = None;
    // When every group got SIGTERM (or the forwarded signal).
    let mut stop_sent: Option<Instant> = None;
    let mut killed = false;

    for rank in 0..spec.world {
        match spawn(spec, rank, &id) {
            Ok((pid, out, err)) => {
                ranks.push(Rank {
                    rank,
                    pid,
                    exit: None,
                });
                streams.push(Stream::new(out, rank, false));
                streams.push(Stream::new(err, rank, true));
            }
            Err(e) => {
                eprintln!(
                    "kfac-launch: cannot start {}: {e}",
                    spec.command[0].to_string_lossy()
                );
                status = Some(127);
                signal_all(&ranks, libc::SIGTERM);
                stop_sent = Some(Instant::now());
                break;
            }
        }
    }

    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut drain_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let next = [
            Some(now + TICK),
            deadline.filter(|_| stop_sent.is_none()),
            stop_sent.filter(|_| !killed).map(|t| t + spec.grace),
            drain_until,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
        let open: Vec<(usize, i32)> = streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.fd().map(|fd| (i, fd)))
            .collect();
        let fds: Vec<i32> = open.iter().map(|&(_, fd)| fd).collect();
        for k in wait_readable(&pipe, &fds, next.saturating_duration_since(now)) {
            streams[open[k].0].pump();
        }

        for sig in pipe.take() {
            if stop_sent.is_none() {
                eprintln!(
                    "kfac-launch: got {}; forwarding it to every rank",
                    signals::name(sig)
                );
                status.get_or_insert(128 + sig);
                signal_all(&ranks, sig);
                stop_sent = Some(Instant::now());
            } else if !killed {
                eprintln!(
                    "kfac-launch: got {} while stopping; killing every rank",
                    signals::name(sig)
                );
                status.get_or_insert(128 + sig);
                signal_all(&ranks, libc::SIGKILL);
                killed = true;
            }
        }

        for k in 0..ranks.len() {
            if ranks[k].exit.is_some() {
                continue;
            }
            let exit = match procs::peek_exit(ranks[k].pid) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("kfac-launch: waiting for rank {}: {e}", ranks[k].rank);
                    Exit::Code(1)
                }
            };
            ranks[k].exit = Some(exit);
            if !exit.success() && status.is_none() {
                eprintln!(
                    "kfac-launch: rank {} failed ({exit}); stopping the others",
                    ranks[k].rank
                );
                status = Some(exit.status());
                signal_all(&ranks, libc::SIGTERM);
                stop_sent = Some(Instant::now());
            }
        }

        let now = Instant::now();
        if stop_sent.is_none() && deadline.is_some_and(|d| now >= d) {
            eprintln!("kfac-launch: timeout; stopping all ranks");
            status = Some(124);
            signal_all(&ranks, libc::SIGTERM);
            stop_sent = Some(now);
        }
        if !killed && stop_sent.is_some_and(|t| now >= t + spec.grace) {
            signal_all(&ranks, libc::SIGKILL);
            killed = true;
        }
        if ranks.iter().all(|r| r.exit.is_some()) {
            let until = *drain_until.get_or_insert(now + DRAIN);
            if streams.iter().all(|s| s.fd().is_none()) || now >= until {
                break;
            }
        }
    }

    // Stop reading: whatever still holds a pipe is not a rank.
    for s in &mut streams {
        if s.fd().is_some() {
            s.pump();
            s.finish();
        }
    }
    stop_leftovers(&ranks, spec.grace, stop_sent, killed);
    for r in &ranks {
        procs::reap(r.pid);
    }
    // The launcher owns the group name: a rank that died before every
    // rank had attached leaves the segment behind.
    match kfac_runtime::comm::shm::remove_segment(&id) {
        Ok(true) => eprintln!("kfac-launch: removed the shared-memory segment of group {id}"),
        Ok(false) => {}
        Err(e) => eprintln!("kfac-launch: removing the segment of group {id}: {e}"),
    }
    status.unwrap_or(0)
}

/// Processes still alive in the ranks' process groups once every rank has
/// exited (a `cmd &`, a daemon that did not `setsid`) get SIGTERM (unless
/// the job was already being stopped), the rest of the grace period, then
/// SIGKILL: a job leaves nothing running behind.
fn stop_leftovers(ranks: &[Rank], grace: Duration, stop_sent: Option<Instant>, killed: bool) {
    let pgids: Vec<i32> = ranks.iter().map(|r| r.pid).collect();
    let mut left = procs::live_members(&pgids);
    if left.is_empty() {
        return;
    }
    let until = match stop_sent {
        Some(t) if !killed => t + grace,
        Some(_) => Instant::now(),
        None => {
            eprintln!(
                "kfac-launch: stopping {} process(es) the ranks left behind",
                left.len()
            );
            for &(_, pgid) in &left {
                procs::signal_rank(pgid, false, libc::SIGTERM);
            }
            Instant::now() + grace
        }
    };
    while !left.is_empty() && Instant::now() < until {
        std::thread::sleep(LEFTOVER_POLL);
        left = procs::live_members(&pgids);
    }
    for &(_, pgid) in &left {
        procs::signal_rank(pgid, false, libc::SIGKILL);
    }
}
