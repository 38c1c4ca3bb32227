//! A program run as N ranks, under `kfac-launch` (shared memory on this
//! machine) or `mpirun` (Open MPI), with a deadline: a job still running
//! at the deadline is killed, launcher and ranks together, and the test
//! fails with what the job printed so far. No job can hang a test.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What starts the ranks.
#[derive(Clone, Debug)]
enum Launcher {
    /// `kfac-launch -n N --timeout S -- program args` (its own timeout is
    /// the deadline; ours is a few seconds later, as a backstop).
    KfacLaunch(PathBuf),
    /// `mpirun --allow-run-as-root --oversubscribe -x VAR.. -np N program
    /// args`.
    Mpirun(PathBuf),
}

/// Grace after the deadline before the job is killed: kfac-launch enforces
/// the deadline itself and should report it first.
const LAUNCHER_GRACE: Duration = Duration::from_secs(10);

/// Grace between SIGTERM (mpirun stops its ranks) and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A job description: launcher, rank count, environment, deadline.
#[derive(Clone, Debug)]
pub struct Ranks {
    launcher: Launcher,
    np: usize,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
}

/// How a job ended.
#[derive(Clone, Debug)]
pub struct Job {
    /// Whether the launcher exited successfully (every rank did).
    pub ok: bool,
    /// The launcher's exit status, for messages.
    pub status: String,
    /// Everything the ranks and the launcher wrote to stdout.
    pub stdout: String,
    /// Everything they wrote to stderr.
    pub stderr: String,
    /// Wall time of the job in seconds.
    pub secs: f64,
}

impl Ranks {
    /// `np` ranks under `kfac-launch` (built by [`crate::kfac_launch`]);
    /// each rank's output lines are prefixed with `[rank r] `.
    pub fn kfac_launch(np: usize) -> Self {
        Self::kfac_launch_at(crate::kfac_launch(), np)
    }

    /// `np` ranks under the `kfac-launch` at `launcher`.
    pub fn kfac_launch_at(launcher: impl Into<PathBuf>, np: usize) -> Self {
        Self::new(Launcher::KfacLaunch(launcher.into()), np)
    }

    /// `np` ranks under Open MPI's `mpirun` at `mpirun` (see
    /// [`crate::find_tool`]), allowed to run as root and to place more
    /// ranks than cores.
    pub fn mpirun(mpirun: impl Into<PathBuf>, np: usize) -> Self {
        Self::new(Launcher::Mpirun(mpirun.into()), np)
    }

    fn new(launcher: Launcher, np: usize) -> Self {
        Self {
            launcher,
            np,
            env: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Sets `key=value` for every rank (under mpirun also forwarded with
    /// `-x key`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The deadline of the whole job (default 120 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `program args` as the ranks and waits for the job. Panics if
    /// the job outlives its deadline (after killing it), not if it fails:
    /// see [`Job::expect_ok`].
    pub fn run(&self, program: &Path, args: &[&str]) -> Job {
        let np = self.np.to_string();
        let (mut cmd, deadline) = match &self.launcher {
            Launcher::KfacLaunch(launcher) => {
                let mut cmd = Command::new(launcher);
                cmd.args(["-n", &np, "--timeout"])
                    .arg(self.timeout.as_secs().max(1).to_string())
                    .arg("--");
                (cmd, self.timeout + LAUNCHER_GRACE)
            }
            Launcher::Mpirun(mpirun) => {
                let mut cmd = Command::new(mpirun);
                cmd.args(["--allow-run-as-root", "--oversubscribe"]);
                for (k, _) in &self.env {
                    cmd.arg("-x").arg(k);
                }
                cmd.arg("-np")
                    .arg(&np)
                    // One help message per failing rank, not an aggregate.
                    .env("OMPI_MCA_orte_base_help_aggregate", "0");
                (cmd, self.timeout)
            }
        };
        cmd.arg(program)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own, so that a deadline kills the launcher
            // and every rank.
            .process_group(0);
        let what = format!("{cmd:?}");
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut bytes);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let pgid = child.id() as libc::pid_t;
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for the job") {
                break st;
            }
            if start.elapsed() > deadline {
                // SAFETY: plain signal calls on the process group created
                // above; TERM first so that mpirun can stop its ranks.
                unsafe { libc::killpg(pgid, libc::SIGTERM) };
                std::thread::sleep(TERM_GRACE);
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                let _ = child.wait();
                panic!(
                    "{what} hung: killed after {} s\nstdout:\n{}\nstderr:\n{}",
                    deadline.as_secs(),
                    out.join().unwrap_or_default(),
                    err.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Job {
            ok: status.success(),
            status: status.to_string(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            secs: start.elapsed().as_secs_f64(),
        }
    }
}

impl Job {
    /// Panics with both outputs unless the job succeeded; `what` names it
    /// in the message.
    pub fn expect_ok(&self, what: &str) -> &Self {
        assert!(
            self.ok,
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        );
        self
    }

    /// The stdout lines of rank `rank` under `kfac-launch`, with its
    /// `[rank r] ` prefix removed, each ending in a newline.
    pub fn rank_output(&self, rank: usize) -> String {
        let prefix = format!("[rank {rank}] ");
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}
