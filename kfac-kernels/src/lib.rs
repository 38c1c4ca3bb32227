//! # kfac-kernels
//!
//! The numerical kernels of K-FAC (Kronecker-Factored Approximate Curvature),
//! `#![no_std]` + `alloc`, generic over `f32` and `f64`, on faer
//! [`MatRef`](faer::MatRef) / [`MatMut`](faer::MatMut) views of any strides
//! (row-major data from C is used in place, never copied).
//!
//! No threads, no I/O, no global state, no panics on bad input: every public
//! function validates its arguments and returns an [`Error`] that names what
//! was wrong and with which sizes, leaving its outputs untouched (one
//! documented exception: the running-average blends
//! [`factor::blend_lower_to_full`] / [`factor::blend_diag`] check their
//! *result* while writing it into caller scratch). Kernels that
//! need temporary memory take it from a caller-provided faer
//! [`MemStack`](faer::dyn_stack::MemStack) and publish its size with a
//! `*_scratch(...) -> StackReq` function, so hot paths allocate nothing.
//! Parallelism is a [`Par`](faer::Par) argument (`Par::Seq`, or
//! `Par::rayon(n)` with the `rayon` feature).
//!
//! ## Math conventions (the one place they are written down)
//!
//! For a layer with input activations `a` (`n x d_in`, one row per sample;
//! with a bias the homogeneous column of ones is appended **last**,
//! `d = d_in + 1`) and gradients of the loss with respect to the layer's
//! outputs `g` (`n x d_out`, as autograd gives them):
//!
//! * batch statistics: `A_batch = a^T a / n`, `G_batch = g^T g / n` (second
//!   moments, no mean subtracted; only the lower triangle is computed, the
//!   bias column folded in from column sums) — [`factor`];
//! * running average: `F <- xi_k F + (1 - xi_k) F_batch` with
//!   `xi_k = min(1 - 1/k, xi)` on the k-th update, so the first update is the
//!   first batch statistic — [`factor::running_average`]; over statistics
//!   accumulated with weight `w`, `F <- xi F + ((1 - xi) / w) acc` —
//!   [`factor::blend_lower_to_full`], [`factor::blend_diag`];
//! * conv2d (KFC): rows of `a` are the im2col patches of every output
//!   position, columns ordered `(c, kh, kw)`; normalizations in [`conv`];
//! * eigen method: `A = Q_A diag(l_A) Q_A^T`, `G = Q_G diag(l_G) Q_G^T`
//!   (negative eigenvalues clamped to 0),
//!   `V = Q_G [ (Q_G^T grad Q_A) / (l_G l_A^T + damping) ] Q_A^T`
//!   `= (A ⊗ G + damping I)^{-1} vec(grad)` for the weight gradient `grad`
//!   (`d_out x d`, bias as the last column) — [`eigen`]; a diagonal `A`
//!   (embedding layers, `A = diag(token counts)`) has `Q_A = I`, `l_A` its
//!   diagonal — [`eigen::precondition_eigen_diag_a`];
//! * inverse method: factored Tikhonov damping,
//!   `pi = sqrt((tr A / dim A) / (tr G / dim G))`,
//!   `V = (G + sqrt(damping)/pi I)^{-1} grad (A + pi sqrt(damping) I)^{-1}`
//!   — [`inverse`] (diagonal `A`: [`inverse::factored_damping_diag_a`],
//!   [`inverse::damped_inverse_diag`], [`inverse::precondition_inverse_diag_a`]);
//! * `vec` stacks columns, `(A ⊗ B) vec(X) = vec(B X A^T)` — [`kron`];
//! * KL clipping: `nu = min(1, sqrt(kl_clip / |lr^2 Σ_l <V_l, grad_l>|))`,
//!   `nu = 1` when the sum is 0 — [`kl`];
//! * input validation done once, with proof types that let kernels skip
//!   their own NaN/Inf scan — [`check`];
//! * packed lower triangles (column by column) and bf16/f16 wire formats —
//!   [`packed`].
//!
//! ## Features
//!
//! * `std` (default): turns on faer's and pulp's `std`, which is what compiles
//!   faer's fast matrix kernels and runtime SIMD detection. Without it the
//!   crate is pure `no_std` + `alloc` (and slower).
//! * `rayon`: `Par::rayon(n)` parallel variants (implies `std`).
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::{factor, kron};
//! // A factor from three samples of a 2-input layer with bias.
//! let a = Mat::<f64>::from_fn(3, 2, |i, j| (i as f64) - (j as f64));
//! let mut f = Mat::<f64>::zeros(3, 3);
//! let mut buf = MemBuffer::new(factor::syrk_update_scratch::<f64>(3, 2, true, Par::Seq));
//! factor::running_average(f.as_mut(), 0.0, a.as_ref(), true, Par::Seq, MemStack::new(&mut buf)).unwrap();
//! factor::mirror_lower(f.as_mut()).unwrap();
//! // Precondition a 1x3 gradient against A ⊗ G with G = [2].
//! let g = Mat::<f64>::from_fn(1, 1, |_, _| 2.0);
//! let mut grad = Mat::<f64>::from_fn(1, 3, |_, j| j as f64 + 1.0);
//! let mut buf = MemBuffer::new(kron::kron_damped_solve_scratch::<f64>(1, 3, Par::Seq));
//! kron::kron_damped_solve(grad.as_mut(), f.as_ref(), g.as_ref(), 0.1, Par::Seq,
//!                         MemStack::new(&mut buf)).unwrap();
//! assert!(grad.col_iter().all(|c| c[0].is_finite()));
//! ```

#![no_std]
#![warn(missing_docs)]

extern crate alloc;

pub mod check;
pub mod conv;
pub mod eigen;
mod error;
pub mod factor;
pub mod inverse;
pub mod kl;
pub mod kron;
pub mod packed;
mod scalar;
mod syrk;
mod tridiag;

pub use error::{Error, Result};
pub use faer;
pub use scalar::Real;
