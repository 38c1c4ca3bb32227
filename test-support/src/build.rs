//! Artifacts a test runs but `cargo test` does not build for it (libkfac's
//! cdylib and staticlib, `kfac-launch` outside kfac-runtime, examples and
//! binaries with extra features), built by a nested `cargo build` of the
//! workspace.
//!
//! The nested build uses the running test's profile and, unless told
//! otherwise, its target directory, so it reuses the compiled
//! dependencies (a fresh directory would rebuild faer). This is safe
//! because the outer cargo has released the directory's lock while tests
//! run; nested builds of parallel tests wait for each other on that lock.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The workspace root (this crate lives in `<root>/test-support`).
pub fn workspace_root() -> &'static Path {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here)
}

/// `<target>/<profile>` of the running test executable, which cargo puts
/// at `<target>/<profile>/deps/<test>-<hash>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps", exe.display()))
        .to_path_buf()
}

/// The cargo that runs the tests (`$CARGO`), else the one that built this
/// crate.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from(env!("CARGO")), PathBuf::from)
}

/// Runs `cargo build <args>` on the workspace in the running test's
/// profile, in `target_dir` (`None`: the running test's target
/// directory). Returns `<target_dir>/<profile>`, where the artifacts are.
/// Panics with cargo's output when the build fails.
pub fn cargo_build(target_dir: Option<&Path>, args: &[&str]) -> PathBuf {
    let own = profile_dir();
    let profile = own.file_name().unwrap_or(OsStr::new("debug")).to_owned();
    let target = match target_dir {
        Some(t) => t.to_path_buf(),
        None => own.parent().expect("<target>/<profile>").to_path_buf(),
    };
    let mut cmd = Command::new(cargo());
    cmd.arg("build")
        .args(args)
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target);
    // `dev` and `test` build into `debug`, `bench` into `release`; a
    // custom profile into a directory of its own name.
    match profile.to_str() {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        _ => {
            cmd.arg("--profile").arg(&profile);
        }
    }
    let out = cmd.output().expect("running cargo");
    assert!(
        out.status.success(),
        "cargo build {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join(profile)
}

/// Serializes the libkfac builds of this process with the copies taken of
/// their results (a build with other features replaces the libraries in
/// `<target>/<profile>`).
static LIBKFAC_BUILD: Mutex<()> = Mutex::new(());

const PLAIN: [&str; 5] = ["-p", "kfac-ffi", "-p", "kfac-runtime", "--lib"];

/// Copies `libkfac.a` and `libkfac.so` from `dir` into `dir/<name>`
/// (each through a temporary name and a rename, so a process that has the
/// old copy mapped keeps it) and returns that directory.
fn snapshot(dir: &Path, name: &str) -> PathBuf {
    check_libkfac(dir);
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["libkfac.a", "libkfac.so"] {
        let tmp = to.join(format!(".{f}.{}", std::process::id()));
        std::fs::copy(dir.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, to.join(f)).unwrap();
    }
    to
}

/// A directory holding `libkfac.a` and `libkfac.so` (kfac-ffi), built once
/// per test process (a copy in `<target>/<profile>/kfac-plain`, which no
/// later build with other features replaces).
pub fn libkfac() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let _g = LIBKFAC_BUILD.lock().unwrap_or_else(|p| p.into_inner());
        // kfac-runtime is selected too so that its features (the default
        // `cli`, which kfac-capi does not ask for) are those of the
        // workspace test build, whose compiled crates are then reused.
        let dir = cargo_build(None, &PLAIN);
        snapshot(&dir, "kfac-plain")
    })
    .clone()
}

/// As [`libkfac`] with the `mpi` feature (`kfac_comm_mpi` over MPI): built
/// in the same target directory (reusing every compiled dependency; a
/// directory of its own rebuilt faer, about five minutes), copied to
/// `<target>/<profile>/kfac-mpi`, after which the plain build is run again
/// so that `<target>/<profile>` holds the plain libraries as before.
pub fn libkfac_mpi() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let _g = LIBKFAC_BUILD.lock().unwrap_or_else(|p| p.into_inner());
        let dir = cargo_build(
            None,
            &[
                "-p",
                "kfac-ffi",
                "-p",
                "kfac-runtime",
                "--lib",
                "--features",
                "kfac-ffi/mpi",
            ],
        );
        let out = snapshot(&dir, "kfac-mpi");
        cargo_build(None, &PLAIN);
        out
    })
    .clone()
}

fn check_libkfac(dir: &Path) {
    assert!(
        dir.join("libkfac.a").exists() && dir.join("libkfac.so").exists(),
        "libkfac.a / libkfac.so not found in {}",
        dir.display()
    );
}

/// The `kfac-launch` binary (kfac-runtime), built once per test process.
/// (kfac-runtime's own tests have it as `CARGO_BIN_EXE_kfac-launch`.)
pub fn kfac_launch() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        built(
            &["-p", "kfac-runtime", "--bin", "kfac-launch"],
            "kfac-launch",
        )
    })
    .clone()
}

/// Builds with `args` and returns `<target>/<profile>/<relative>`, checked
/// to exist: e.g. `built(&["-p", "kfac-runtime", "--features", "mpi",
/// "--example", "mpi_check"], "examples/mpi_check")`.
pub fn built(args: &[&str], relative: &str) -> PathBuf {
    let exe = cargo_build(None, args).join(relative);
    assert!(exe.is_file(), "{} not found after the build", exe.display());
    exe
}
