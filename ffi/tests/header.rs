//! The checked-in `include/kfac.h` is exactly what cbindgen generates from
//! `ffi/capi/src/` (lib.rs and the modules it declares, which cbindgen
//! follows) with `ffi/cbindgen.toml`. Set `KFAC_BLESS=1` to rewrite it. And
//! `include/kfac.hpp` wraps every function `kfac.h` declares.

use std::collections::BTreeSet;

fn dir() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

#[test]
fn checked_in_header_is_current() {
    let dir = dir();
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let bindings = cbindgen::Builder::new()
        .with_src(format!("{dir}/capi/src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = format!("{dir}/../include/kfac.h");
    if std::env::var_os("KFAC_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "include/kfac.h is stale: run `KFAC_BLESS=1 cargo test -p kfac-ffi --test header`"
    );
}

/// Identifiers `kfac_<word chars>` immediately followed by `(` (a call or
/// a declaration).
fn called_kfac_functions(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(k) = text[i..].find("kfac_") {
        let start = i + k;
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        let standalone = start == 0 || !word(b[start - 1]);
        let rest = text[end..].trim_start();
        if standalone && rest.starts_with('(') {
            out.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Function declarations of kfac.h, found independently of the C++ side:
/// every `kfac_*(` at the start of a declarator, i.e. preceded by a return
/// type on the same line (`KfacStatus kfac_step(`, `const char *kfac_...(`).
fn declared_functions(h: &str) -> BTreeSet<String> {
    h.lines()
        .filter(|l| !l.trim_start().starts_with("//") && !l.trim_start().starts_with('*'))
        .flat_map(|l| {
            let l = l.to_string();
            called_kfac_functions(&l)
                .into_iter()
                .filter(move |f| l.find(f.as_str()).is_some_and(|at| at > 0))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn kfac_hpp_wraps_every_function_of_kfac_h() {
    let read = |f: &str| std::fs::read_to_string(format!("{}/../include/{f}", dir())).unwrap();
    let (h, hpp) = (read("kfac.h"), read("kfac.hpp"));
    let declared = declared_functions(&h);
    // The check must not pass vacuously.
    for f in [
        "kfac_step",
        "kfac_status_string",
        "kfac_config_default",
        "kfac_steps",
    ] {
        assert!(
            declared.contains(f),
            "{f} not found in kfac.h: {declared:?}"
        );
    }
    let used = called_kfac_functions(&hpp);
    let missing: Vec<_> = declared.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "functions of kfac.h that include/kfac.hpp does not wrap: {missing:?}"
    );
}
