//! Helpers for the workspace's integration tests that leave the test
//! process: external tools, artifacts built by a nested cargo, and programs
//! run as several ranks. Used only as a dev-dependency.
//!
//! * [`tools`]: is `valgrind` / `cmake` / `mpirun` installed? With the CI
//!   switches `KFAC_REQUIRE_TOOLS` / `KFAC_REQUIRE_MPI` (set by `.ci/run`) a
//!   missing tool fails the test; otherwise the test prints a notice and
//!   passes.
//! * [`build`]: `cargo build` of libkfac, `kfac-launch`, examples and
//!   binaries, in the running test's target directory and profile.
//! * [`ranks`]: a program as N ranks under `kfac-launch` or `mpirun`, with
//!   a deadline after which the whole job is killed.
//! * [`worker`]: a test binary re-run as worker processes, through an
//!   ignored test that the parent checks really ran.
//!
//! What must not live here: anything that links a kfac crate (this crate
//! depends on std and libc only, so that any crate of the workspace can
//! use it without a dependency cycle) and test references (those belong to
//! the tests that check against them).

pub mod build;
pub mod ranks;
pub mod tools;
pub mod worker;

pub use build::{
    built, cargo_build, kfac_launch, libkfac, libkfac_mpi, profile_dir, workspace_root,
};
pub use ranks::{Job, Ranks};
pub use tools::{find_tool, have_tool, Require};
