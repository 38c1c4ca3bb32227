//! The checked-in `include/kfac.h` is exactly what cbindgen generates from
//! `ffi/capi/src/lib.rs` with `ffi/cbindgen.toml`. Set `KFAC_BLESS=1` to rewrite it.

#[test]
fn checked_in_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
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
