//! # kfac
//!
//! A Rust engine for distributed K-FAC (Kronecker-Factored Approximate
//! Curvature) second-order optimization. This facade crate re-exports the
//! workspace's crates; it also owns the criterion benches (`benches/`) and
//! the C and C++ examples (`examples/`).
//!
//! * [`kernels`]: the `no_std` numerical kernels (factor updates, conv2d patch
//!   statistics, damped eigen- and Cholesky inversion, Kronecker
//!   preconditioning, packed storage, KL clipping). The math conventions are
//!   written once, in its crate docs.
//!
//! The training demo (SGD, Adam and K-FAC on the embedded UCI digits data)
//! is the workspace crate `kfac-demo`: `cargo run --release -p kfac-demo`.
//!
//! ```
//! use kfac::kernels::factor::factor_dim;
//! assert_eq!(factor_dim(784, true), 785);
//! ```

pub use kfac_kernels as kernels;
pub use kfac_runtime as runtime;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
