//! # kfac
//!
//! A Rust engine for distributed K-FAC (Kronecker-Factored Approximate
//! Curvature) second-order optimization. This facade crate re-exports the
//! workspace's crates; it also owns the cross-crate property tests
//! (`tests/`), the criterion benches (`benches/`) and the examples.
//!
//! * [`kernels`]: the `no_std` numerical kernels (factor updates, conv2d patch
//!   statistics, damped eigen- and Cholesky inversion, Kronecker
//!   preconditioning, packed storage, KL clipping). The math conventions are
//!   written once, in its crate docs.
//! * [`demo`]: a self-contained training demo on the embedded UCI digits
//!   data (SGD, Adam and K-FAC on a small MLP and a deep autoencoder), run by
//!   `cargo run --release --example train`.
//!
//! ```
//! use kfac::kernels::factor::factor_dim;
//! assert_eq!(factor_dim(784, true), 785);
//! ```

pub mod demo;

pub use kfac_kernels as kernels;
pub use kfac_runtime as runtime;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
