//! # kfac-ffi: `libkfac.so` and `libkfac.a`
//!
//! This crate only packages the C ABI: every `kfac_*` function is defined,
//! with its checks and documentation, in the `kfac-capi` crate
//! (`ffi/capi/src/`, the source of `include/kfac.h`). Its
//! `#[no_mangle] extern "C"` functions are exported by this `cdylib` and
//! included in this `staticlib` as they are; the split lets Rust property
//! tests, benches and the fuzz target call the very same functions
//! in-process (a `cdylib`/`staticlib` cannot be a Rust dependency).

pub use kfac_capi::*;
