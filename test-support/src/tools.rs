//! External tools and the CI policy for missing ones: a test that needs a
//! tool asks [`find_tool`]; when the tool is missing the test is skipped
//! with a notice, unless the tool's [`Require`] switch is set, which turns
//! the skip into a failure (so CI cannot pass by skipping).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The switch that makes a missing tool a failure instead of a skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Require {
    /// `KFAC_REQUIRE_TOOLS`: valgrind, cmake and the other tools of the
    /// C-client tests.
    Tools,
    /// `KFAC_REQUIRE_MPI`: mpirun and mpicc, for the MPI tests.
    Mpi,
}

impl Require {
    /// The environment variable of this switch.
    pub fn var(self) -> &'static str {
        match self {
            Require::Tools => "KFAC_REQUIRE_TOOLS",
            Require::Mpi => "KFAC_REQUIRE_MPI",
        }
    }

    /// Whether the switch is on: its variable is set to anything but the
    /// empty string or `0` (`.ci/run` sets it to `1`).
    pub fn is_on(self) -> bool {
        std::env::var_os(self.var()).is_some_and(|v| !v.is_empty() && v != "0")
    }
}

/// The first executable file named `tool` on `PATH`.
fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `tool` as found on `PATH`, if `tool --version` runs and succeeds.
///
/// When it does not: panics if `require`'s switch is on; otherwise writes
/// `<test>: SKIPPED: <tool> is not installed` to the process's stderr
/// (past the test harness's capture, so the skip shows in the log) and
/// returns `None`, and the caller returns early.
pub fn find_tool(tool: &str, require: Require) -> Option<PathBuf> {
    let found = on_path(tool).filter(|p| {
        Command::new(p)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("test");
        assert!(
            !require.is_on(),
            "{test}: {tool} is required ({} is set; .ci/run installs it) but is not on PATH",
            require.var()
        );
        let _ = writeln!(
            std::io::stderr(),
            "{test}: SKIPPED: {tool} is not installed (.ci/run installs it; \
             set {}=1 to fail instead)",
            require.var()
        );
    }
    found
}

/// Whether `tool` can run; see [`find_tool`] for the policy.
pub fn have_tool(tool: &str, require: Require) -> bool {
    find_tool(tool, require).is_some()
}
