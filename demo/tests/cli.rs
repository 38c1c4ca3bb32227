//! The `train` binary's command line (#11 item 11): a generated `--help`
//! with defaults (exit 0), misuse exits 2 with a plain message (no Rust
//! debug quoting), and `scripts/install.sh --help` prints usage, not code.

use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .output()
        .expect("run train")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_option_with_its_default_and_exits_0() {
    for flag in ["--help", "-h"] {
        let o = train(&[flag]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{flag}: {err}");
        for want in ["--task", "--epochs", "--seed", "--workers", "--comm"] {
            assert!(out.contains(want), "{flag} lacks {want}:\n{out}");
        }
        assert!(out.contains("[default: classify]"), "{out}");
        assert!(out.contains("[default: 1]"), "{out}");
        assert!(out.contains("20 for classify"), "{out}");
    }
}

#[test]
fn misuse_exits_2_with_a_plain_message() {
    let cases: [(&[&str], &str); 6] = [
        (&["--epochs", "abc"], "invalid value 'abc' for '--epochs"),
        (&["--epochs", "0"], "--epochs"),
        (&["--workers", "65"], "--workers"),
        (
            &["--task", "regress"],
            "possible values: classify, autoencoder",
        ),
        (&["--frobnicate"], "unexpected argument '--frobnicate'"),
        (&["--seed"], "a value is required for '--seed"),
    ];
    for (args, want) in cases {
        let o = train(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("Error: \""), "{args:?}: debug-quoted: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
}

#[test]
fn install_script_help_is_usage_not_code() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/install.sh");
    let o = Command::new("bash")
        .args([script, "--help"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.starts_with("Usage: scripts/install.sh --prefix DIR"),
        "{out}"
    );
    for word in ["set -euo", "while [", "case \"$1\""] {
        assert!(!out.contains(word), "prints its own code: {out}");
    }
    for (args, want) in [
        (&["--prefix"][..], "--prefix needs a value"),
        (&["--bogus"][..], "unknown argument '--bogus'"),
        (&[][..], "--prefix DIR is required"),
    ] {
        let o = Command::new("bash")
            .arg(script)
            .args(args)
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
