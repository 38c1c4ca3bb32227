//! The header compiles as strict C99 and C++17, and the C client in
//! `examples/c/` runs against both the static and the shared library, in one
//! process and as two ranks of a shared-memory group.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/<profile>`, where cargo puts libkfac.a and libkfac.so. A plain
/// `cargo test` does not build a cdylib/staticlib for integration tests,
/// so the first caller builds them with `cargo build -p kfac-ffi` (same
/// profile and target directory; cargo has released its lock by the time
/// tests run).
fn lib_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target = dir.parent().unwrap().to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "kfac-ffi", "--lib", "--manifest-path"])
            .arg(root().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building libkfac failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            dir.join("libkfac.a").exists() && dir.join("libkfac.so").exists(),
            "libkfac.a / libkfac.so not found in {}",
            dir.display()
        );
        dir
    })
    .clone()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn header_compiles_as_strict_c99_and_cpp17() {
    let dir = tempdir("hdr");
    let c = dir.join("t.c");
    std::fs::write(&c, "#include \"kfac.h\"\nint main(void) { return kfac_abi_version() == KFAC_ABI_VERSION ? 0 : 1; }\n").unwrap();
    let inc = root().join("include");
    run(Command::new("cc")
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(&inc)
        .arg(&c));
    let cpp = dir.join("t.cpp");
    std::fs::write(&cpp, "#include \"kfac.h\"\nint main() { return kfac_abi_version() == KFAC_ABI_VERSION ? 0 : 1; }\n").unwrap();
    run(Command::new("c++")
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(&inc)
        .arg(&cpp));
}

/// A fresh directory per call (tests run in parallel and build the same
/// clients).
fn tempdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("kfac-ffi-{tag}-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles one example source (C99 or C++17, strict warnings) against the
/// static library.
fn compile_static(source: &str, name: &str, cxx: bool) -> PathBuf {
    let exe = tempdir(name).join(name);
    let (cc, std) = if cxx {
        ("c++", "-std=c++17")
    } else {
        ("cc", "-std=c99")
    };
    let mut cmd = Command::new(cc);
    cmd.args([std, "-Wall", "-Wextra", "-Werror", "-O1", "-pthread", "-I"])
        .arg(root().join("include"))
        .arg(root().join(source))
        .arg("-o")
        .arg(&exe)
        .arg(lib_dir().join("libkfac.a"))
        .args(["-lpthread", "-ldl", "-lm"]);
    if !cxx {
        cmd.arg("-pedantic");
    }
    run(&mut cmd);
    exe
}

/// Runs `exe` as the two ranks of a fresh shared-memory group (processes
/// started directly, with the variables `kfac-launch` would set); returns
/// each rank's stdout after checking it succeeded.
fn two_ranks(exe: &Path, tag: &str) -> Vec<String> {
    let group = format!("ffi-{tag}-{}", std::process::id());
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(exe)
                .env("RUST_BACKTRACE", "0")
                .env("KFAC_RANK", r.to_string())
                .env("KFAC_WORLD_SIZE", "2")
                .env("KFAC_GROUP", &group)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(
                o.status.success() && s.contains("/2") && s.contains("ok"),
                "{s}"
            );
            s
        })
        .collect()
}

fn build_client(static_link: bool) -> PathBuf {
    let dir = tempdir(if static_link { "static" } else { "shared" });
    let exe = dir.join("linear_regression");
    let lib = lib_dir();
    let mut cmd = Command::new("cc");
    cmd.args([
        "-std=c99",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-O1",
        "-I",
    ])
    .arg(root().join("include"))
    .arg(root().join("examples/c/linear_regression.c"))
    .arg("-o")
    .arg(&exe);
    if static_link {
        cmd.arg(lib.join("libkfac.a"))
            .args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.arg(format!("-L{}", lib.display()))
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .args(["-lkfac", "-lm"]);
    }
    run(&mut cmd);
    exe
}

#[test]
fn c_client_runs_against_static_and_shared_library() {
    for static_link in [true, false] {
        let exe = build_client(static_link);
        let out = run(Command::new(&exe).env("RUST_BACKTRACE", "0"));
        assert!(out.contains("rank 0/1") && out.contains(", ok"), "{out}");
    }
}

#[test]
fn c_client_as_two_ranks_matches_one_process() {
    let exe = build_client(true);
    let single = run(Command::new(&exe).env("RUST_BACKTRACE", "0"));
    let fit = |s: &str| -> f64 {
        s.split("|W-W*|+|b-b*| = ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    for s in two_ranks(&exe, "linreg") {
        // Both fit W*, b* (exactly representable data, a well-posed
        // least-squares problem): the same answer within f32 rounding.
        assert!((fit(&s) - fit(&single)).abs() < 1e-4, "{s} vs {single}");
    }
}

#[test]
fn cpp_raii_client_runs_alone_and_as_two_ranks() {
    let exe = compile_static(
        "examples/cpp/linear_regression.cpp",
        "linear_regression_cpp",
        true,
    );
    let out = run(&mut Command::new(&exe));
    assert!(out.contains("rank 0/1") && out.contains(", ok"), "{out}");
    two_ranks(&exe, "cpp");
}

#[test]
fn caller_provided_collectives_match_a_single_rank_and_report_failures() {
    let exe = compile_static("examples/c/callbacks.c", "callbacks", false);
    let out = run(&mut Command::new(&exe));
    assert!(
        out.contains("callbacks ok") && out.contains("status 7"),
        "{out}"
    );
}

#[test]
fn c_client_is_clean_under_valgrind_memcheck() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        panic!("valgrind is required (installed by .ci/run)");
    }
    let exe = build_client(true);
    let out = Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&exe)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "valgrind reported errors:\n{err}");
    assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
}

#[test]
fn installed_package_builds_the_c_client_with_pkg_config() {
    let prefix = tempdir("prefix");
    run(Command::new("bash")
        .arg(root().join("scripts/install.sh"))
        .args(["--no-build", "--prefix"])
        .arg(&prefix)
        .arg("--lib-dir")
        .arg(lib_dir()));
    for f in [
        "lib/libkfac.so",
        "lib/libkfac.a",
        "include/kfac.h",
        "include/kfac.hpp",
        "lib/cmake/kfac/kfacConfig.cmake",
    ] {
        assert!(prefix.join(f).exists(), "{f} not installed");
    }
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "kfac"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")));
    let exe = prefix.join("client");
    run(Command::new("sh").arg("-c").arg(format!(
        "cc -std=c99 -O1 {} {} -o {} -lm",
        root().join("examples/c/linear_regression.c").display(),
        flags.trim(),
        exe.display()
    )));
    let out = run(Command::new(&exe).env("RUST_BACKTRACE", "0"));
    assert!(out.contains(", ok"), "{out}");
}

#[test]
fn c_mlp_trains_alone_and_as_two_ranks_with_the_same_result() {
    let exe = compile_static("examples/c/mlp.c", "mlp", false);
    let checksum = |s: &str| -> f64 {
        s.split("checksum ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let single = run(&mut Command::new(&exe));
    assert!(single.contains(" ok"), "{single}");
    for s in two_ranks(&exe, "mlp") {
        // Sums over shards instead of the whole batch: f32 rounding only,
        // amplified over 40 steps; 1e-3 absolute on a sum of 48 weights.
        assert!(
            (checksum(&s) - checksum(&single)).abs() < 1e-3,
            "{s} vs {single}"
        );
    }
}
