//! Processes and process groups of a job: exit status without reaping,
//! signals to a rank's process group, the live members of those groups.
//!
//! Every rank leads its own process group (`setpgid(0, 0)` before exec), so
//! a signal to `-pgid` reaches the rank and whatever it started (`cmd &`,
//! a shell's children), unless those left the group (`setsid`). A rank is
//! not reaped until the job is over: its zombie keeps its pid, and so its
//! process group id, from being reused while the launcher may still signal
//! the group.

use std::io;

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Whether the rank exited with status 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    /// The launcher's exit status for it: the code, or 128 + the signal.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "killed by {}", crate::signals::name(s)),
        }
    }
}

/// The exit of child `pid` if it has ended, leaving it unreaped
/// (`waitid(WNOWAIT)`), so its pid cannot be reused before [`reap`].
pub fn peek_exit(pid: i32) -> io::Result<Option<Exit>> {
    loop {
        // SAFETY: a zeroed siginfo_t is valid; waitid fills it (si_pid stays
        // 0 when the child has not changed state, with WNOHANG).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; `pid` is our child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled `info` for a child event (or left it zeroed).
        let (who, status) = unsafe { (info.si_pid(), info.si_status()) };
        if who == 0 {
            return Ok(None);
        }
        return Ok(Some(if info.si_code == libc::CLD_EXITED {
            Exit::Code(status)
        } else {
            Exit::Signal(status)
        }));
    }
}

/// Reaps child `pid` (blocking; call it once [`peek_exit`] saw it end).
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is writable.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// Sends `sig` to the process group `pgid` and, if it is still running, to
/// the rank `pid` itself (in case it left its group). Errors (an empty
/// group) are ignored.
pub fn signal_rank(pid: i32, running: bool, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; `-pid` is the process group
    // the rank leads, pinned by the unreaped rank.
    unsafe {
        libc::kill(-pid, sig);
        if running {
            libc::kill(pid, sig);
        }
    }
}

/// Live (not zombie) processes whose process group is one of `pgids`,
/// as (pid, pgid), from `/proc/<pid>/stat`.
pub fn live_members(pgids: &[i32]) -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parens.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_ascii_whitespace();
        let state = fields.next().unwrap_or("X");
        let pgrp = fields.nth(1).and_then(|s| s.parse::<i32>().ok());
        if let Some(pgrp) = pgrp {
            if pgids.contains(&pgrp) && !matches!(state, "Z" | "X" | "x") {
                out.push((pid, pgrp));
            }
        }
    }
    out
}
