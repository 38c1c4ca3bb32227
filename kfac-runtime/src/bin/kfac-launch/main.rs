//! `kfac-launch -n P [--timeout S] [--grace S] -- program args...`
//!
//! Starts P processes (ranks) of `program` on this machine as one job and
//! owns them until the last one is gone:
//!
//! - Environment: `KFAC_RANK`, `KFAC_WORLD_SIZE`, `KFAC_JOB_ID` (a fresh id,
//!   unique on this machine: launcher pid, time, random bits) and
//!   `KFAC_GROUP` (the shared-memory group, named after the job id).
//! - Output: every line a rank prints is prefixed with `[rank r] `.
//! - Fail-fast: when a rank fails (non-zero exit or killed by a signal) the
//!   others get SIGTERM, then SIGKILL after the grace period; the launcher
//!   exits with the failing status (128 + signal for a signal). With
//!   `--timeout S` the job is stopped the same way after S seconds (exit
//!   status 124).
//! - Signals: SIGTERM, SIGINT and SIGHUP sent to the launcher are forwarded
//!   to every rank, SIGKILL follows after the grace period (at once on a
//!   second signal), and the launcher exits with 128 + the signal number.
//! - Process groups: every rank leads its own process group (pgid = its
//!   pid); signals go to the whole group, so what a rank started (`cmd &`)
//!   is stopped with it. When the job ends, processes still in those groups
//!   get SIGTERM, then SIGKILL after the grace period.
//! - Launcher death: ranks get `PR_SET_PDEATHSIG` = SIGKILL, so a launcher
//!   killed with SIGKILL still takes its ranks down (not their children:
//!   only a living launcher can signal the groups).
//! - Output held open by a process a rank left behind does not keep the
//!   launcher waiting: once every rank has exited, output still in the
//!   pipes is read for at most 200 ms.
//! - Clean-up: after the ranks exit, the launcher removes the group's
//!   shared-memory segment (`/dev/shm/kfac-<group>`) if a rank died before
//!   it was unlinked.
//!
//! Modules: `job` (start, event loop, clean-up), `signals` (self-pipe),
//! `procs` (exit status, process groups), `output` (rank-prefixed lines).

mod job;
mod output;
mod procs;
mod signals;

use std::ffi::OsString;
use std::time::Duration;

use clap::Parser;
use kfac_runtime::comm::shm::MAX_WORLD;

/// Longest `--timeout` or `--grace` accepted, in seconds (about 115 days).
const MAX_SECONDS: f64 = 1e7;

/// Start P ranks of a program on this machine as one kfac job.
#[derive(Parser, Debug)]
#[command(
    name = "kfac-launch",
    version,
    after_help = "Each rank gets KFAC_RANK, KFAC_WORLD_SIZE, KFAC_GROUP and KFAC_JOB_ID in its \
environment; its output lines are prefixed with [rank r]. When a rank fails, the others are \
stopped and the launcher exits with the failing status. SIGTERM, SIGINT and SIGHUP are \
forwarded to the ranks (SIGKILL after the grace period); the launcher then exits with \
128 + the signal number."
)]
struct Cli {
    /// Number of ranks (processes) to start
    #[arg(
        short = 'n',
        long = "np",
        value_name = "P",
        value_parser = clap::value_parser!(u16).range(1..=MAX_WORLD as i64)
    )]
    np: u16,

    /// Stop the whole job after this many seconds (exit status 124)
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true, value_parser = positive_seconds)]
    timeout: Option<Duration>,

    /// Seconds between SIGTERM (or a forwarded signal) and SIGKILL when
    /// ranks are stopped
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "2",
        allow_negative_numbers = true,
        value_parser = seconds
    )]
    grace: Duration,

    /// The program every rank runs, and its arguments
    #[arg(
        value_name = "PROGRAM",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// A number of seconds, 0 or more (fractions allowed).
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| "expected a number of seconds, such as 30 or 0.5".to_string())?;
    if v.is_nan() || v < 0.0 {
        return Err("must be 0 or more seconds".into());
    }
    if v > MAX_SECONDS {
        return Err(format!("must be at most {MAX_SECONDS} seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A number of seconds, more than 0.
fn positive_seconds(s: &str) -> Result<Duration, String> {
    match seconds(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Err(e) if e.starts_with("expected") => Err(e),
        _ => Err("must be more than 0 seconds".into()),
    }
}

fn main() {
    let cli = Cli::parse();
    let spec = job::JobSpec {
        world: usize::from(cli.np),
        command: cli.command,
        timeout: cli.timeout,
        grace: cli.grace,
    };
    std::process::exit(job::run(&spec));
}
