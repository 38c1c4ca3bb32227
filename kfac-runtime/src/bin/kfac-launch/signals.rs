//! The signals the launcher reacts to, delivered through a self-pipe.
//!
//! The handlers only `write(2)` the signal number into a non-blocking pipe
//! (async-signal-safe, errno saved and restored); the event loop in `job`
//! polls the read end and does all the work. `SIGCHLD` is caught too, only
//! to wake the loop when a rank exits. Nothing else may live here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Signals forwarded to the ranks (then SIGKILL after the grace period);
/// the launcher exits with 128 + the signal number.
pub const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Write end of the self-pipe, for the handler. Relaxed is enough: it is
/// stored once, before any handler is installed (`sigaction` orders it).
static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: only async-signal-safe calls: errno location, write(2) of one
    // byte from the stack; errno is restored so the interrupted code never
    // sees ours. A full pipe (EAGAIN) loses nothing: the loop is awake.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        let byte = sig as u8;
        libc::write(fd, (&byte as *const u8).cast(), 1);
        *errno = saved;
    }
}

/// The read end of the self-pipe; the handlers stay installed for the
/// launcher's lifetime.
pub struct SelfPipe {
    read: OwnedFd,
}

impl SelfPipe {
    /// Creates the pipe (close-on-exec, non-blocking) and installs the
    /// handlers for [`FORWARDED`] and `SIGCHLD`. Call once, before any rank
    /// is started.
    pub fn install() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody
        // else; the write end is kept open for the process lifetime.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        WRITE_FD.store(fds[1], Ordering::Relaxed);
        for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
            // SAFETY: a zeroed sigaction is a valid starting value; the
            // handler is an `extern "C" fn(c_int)` that is async-signal-safe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(Self { read })
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Empties the pipe; returns the forwarded signals received, in order
    /// (wake-ups by `SIGCHLD` are dropped).
    pub fn take(&self) -> Vec<libc::c_int> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: `buf` is a writable buffer of the given length.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return out;
            }
            out.extend(
                buf[..n as usize]
                    .iter()
                    .map(|&b| libc::c_int::from(b))
                    .filter(|s| FORWARDED.contains(s)),
            );
        }
    }
}

/// In a freshly forked rank, before exec: puts the launcher's handlers back
/// to their defaults, so that a signal arriving before exec cannot write
/// into the launcher's pipe. Async-signal-safe (only `sigaction`).
pub fn reset_in_child() {
    for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: SIG_DFL for a catchable signal, from a zeroed sigaction
        // on the stack; sigaction is async-signal-safe, as a `pre_exec`
        // hook requires.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// A short name for messages: "SIGTERM", or "signal 42".
pub fn name(sig: libc::c_int) -> String {
    let known = [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGPIPE, "SIGPIPE"),
    ];
    known
        .iter()
        .find(|(s, _)| *s == sig)
        .map_or_else(|| format!("signal {sig}"), |(_, n)| (*n).to_string())
}
