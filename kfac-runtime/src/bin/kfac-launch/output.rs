//! Rank output: non-blocking reads of a rank's stdout or stderr pipe, every
//! complete line written to the launcher's own stdout or stderr with a
//! `[rank r] ` prefix. The event loop decides when to stop reading: a
//! process left behind by a rank may hold the pipe open forever.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};

/// A line longer than this is written out in pieces (bounded memory).
const MAX_LINE_BYTES: usize = 64 * 1024;

/// One output pipe of one rank.
pub struct Stream {
    fd: Option<OwnedFd>,
    rank: usize,
    to_stderr: bool,
    partial: Vec<u8>,
}

impl Stream {
    /// Takes the read end of a rank's pipe and makes it non-blocking.
    pub fn new(fd: OwnedFd, rank: usize, to_stderr: bool) -> Self {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Self {
            fd: Some(fd),
            rank,
            to_stderr,
            partial: Vec::new(),
        }
    }

    /// The descriptor to poll, while the pipe is open.
    pub fn fd(&self) -> Option<i32> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Reads what is available now and writes the complete lines; at end of
    /// file (or a read error) writes the last partial line and closes.
    pub fn pump(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        while let Some(fd) = self.fd() {
            // SAFETY: `buf` is writable for its length; `fd` is open.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.partial.extend_from_slice(&buf[..n as usize]);
                self.write_lines(false);
                continue;
            }
            if n < 0 {
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {}
                }
            }
            self.finish();
        }
    }

    /// Writes any last partial line and closes the pipe (a process still
    /// writing to it then gets EPIPE / SIGPIPE).
    pub fn finish(&mut self) {
        self.write_lines(true);
        self.fd = None;
    }

    fn write_lines(&mut self, all: bool) {
        let mut text = Vec::new();
        let mut start = 0;
        while start < self.partial.len() {
            let end = match self.partial[start..].iter().position(|&b| b == b'\n') {
                Some(i) => start + i,
                None if all || self.partial.len() - start >= MAX_LINE_BYTES => self.partial.len(),
                None => break,
            };
            let line = String::from_utf8_lossy(&self.partial[start..end]);
            text.extend_from_slice(format!("[rank {}] {line}\n", self.rank).as_bytes());
            start = end + 1;
        }
        self.partial.drain(..start.min(self.partial.len()));
        if text.is_empty() {
            return;
        }
        // A closed or broken launcher output is not a reason to stop the job.
        let _ = if self.to_stderr {
            io::stderr().lock().write_all(&text)
        } else {
            let mut out = io::stdout().lock();
            out.write_all(&text).and_then(|()| out.flush())
        };
    }
}
