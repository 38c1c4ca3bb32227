//! Kronecker products, applied without forming them.
//!
//! **vec convention**: `vec(X)` stacks the columns of `X` (column-major), so
//! for `X` of shape `q x n`, `vec(X)[i + j q] = X[i, j]`, and
//! `(A ⊗ B) vec(X) = vec(B X A^T)` for `A: m x n`, `B: p x q`.
//! A layer's Fisher block is `A ⊗ G` acting on `vec(grad)` with `grad` of
//! shape `d_out x d_in`, so `(A ⊗ G) vec(V) = vec(G V A)`.
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::kron::*;
//! let a = Mat::<f64>::from_fn(2, 2, |i, j| (1 + i + 2 * j) as f64);
//! let b = Mat::<f64>::from_fn(3, 3, |i, j| (i * j) as f64 + 1.0);
//! let x = Mat::<f64>::from_fn(3, 2, |i, j| (i + j) as f64);
//! let mut k = Mat::<f64>::zeros(6, 6);
//! kron(k.as_mut(), a.as_ref(), b.as_ref()).unwrap();
//! let mut y = Mat::<f64>::zeros(3, 2);
//! let mut buf = MemBuffer::new(kron_apply_scratch::<f64>(3, 2, Par::Seq));
//! kron_apply(y.as_mut(), a.as_ref(), b.as_ref(), x.as_ref(), Par::Seq, MemStack::new(&mut buf)).unwrap();
//! // explicit product times vec(x) (columns stacked)
//! for r in 0..6 {
//!     let want: f64 = (0..6).map(|c| k[(r, c)] * x[(c % 3, c / 3)]).sum();
//!     assert!((y[(r % 3, r / 3)] - want).abs() < 1e-12);
//! }
//! ```

use crate::eigen::{precondition_eigen, precondition_eigen_scratch, sym_eigen, sym_eigen_scratch};
use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

/// Explicit Kronecker product `out = A ⊗ B`:
/// `out[i p + k, j q + l] = A[i, j] B[k, l]` (for small dims and tests).
///
/// # Errors
/// [`Error::DimensionMismatch`] if `out` is not `(m p) x (n q)`,
/// [`Error::SizeOverflow`].
pub fn kron<T: Real>(mut out: MatMut<'_, T>, a: MatRef<'_, T>, b: MatRef<'_, T>) -> Result<()> {
    let (m, n) = (a.nrows(), a.ncols());
    let (p, q) = (b.nrows(), b.ncols());
    let rows = m
        .checked_mul(p)
        .ok_or(Error::SizeOverflow { what: "kron rows" })?;
    let cols = n
        .checked_mul(q)
        .ok_or(Error::SizeOverflow { what: "kron cols" })?;
    check::shape_mut("kron output", &out, rows, cols)?;
    for j in 0..n {
        for l in 0..q {
            for i in 0..m {
                let aij = a[(i, j)];
                for k in 0..p {
                    out[(i * p + k, j * q + l)] = aij * b[(k, l)];
                }
            }
        }
    }
    Ok(())
}

/// Scratch needed by [`kron_apply`]: one `p x n` temporary (`p` = rows of
/// `B`, `n` = columns of `X` = columns of `A`).
pub fn kron_apply_scratch<T: Real>(b_rows: usize, a_cols: usize, par: Par) -> StackReq {
    let _ = par;
    temp_mat_scratch::<T>(b_rows, a_cols)
}

/// `out = B X A^T`, i.e. `vec(out) = (A ⊗ B) vec(X)`, without forming the
/// product: two matmuls, `p q n + p n m` multiply-adds.
///
/// # Errors
/// [`Error::DimensionMismatch`] unless `X` is `q x n` and `out` is `p x m`,
/// [`Error::ScratchTooSmall`]. `out` is untouched on error.
pub fn kron_apply<T: Real>(
    out: MatMut<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    x: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (m, n) = (a.nrows(), a.ncols());
    let (p, q) = (b.nrows(), b.ncols());
    check::shape("X", x, q, n)?;
    check::shape_mut("kron_apply output", &out, p, m)?;
    check::stack(stack, kron_apply_scratch::<T>(p, n, par))?;
    let (mut t, _) = temp_mat_zeroed::<T, _, _>(p, n, stack);
    let mut t = t.as_mat_mut();
    matmul(t.rb_mut(), Accum::Replace, b, x, T::ONE, par);
    matmul(out, Accum::Replace, t.rb(), a.transpose(), T::ONE, par);
    Ok(())
}

/// Scratch needed by [`kron_damped_solve`].
pub fn kron_damped_solve_scratch<T: Real>(d_out: usize, d_in: usize, par: Par) -> StackReq {
    StackReq::all_of(&[
        temp_mat_scratch::<T>(d_in, d_in),
        temp_mat_scratch::<T>(d_out, d_out),
        temp_mat_scratch::<T>(d_in + d_out, 1),
        sym_eigen_scratch::<T>(d_in.max(d_out), par)
            .or(precondition_eigen_scratch::<T>(d_out, d_in, par)),
    ])
}

/// The Kronecker-factored damped solve, in place:
/// `x <- V` with `(A ⊗ G + damping I) vec(V) = vec(x)`, for symmetric PSD
/// `A` (`d_in x d_in`) and `G` (`d_out x d_out`), reading their lower
/// triangles. Eigendecomposes both (in scratch) and applies
/// [`precondition_eigen`].
///
/// # Errors
/// As [`sym_eigen`] and [`precondition_eigen`]; `x` is untouched on error.
pub fn kron_damped_solve<T: Real>(
    x: MatMut<'_, T>,
    a: MatRef<'_, T>,
    g: MatRef<'_, T>,
    damping: T,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (d_out, d_in) = (x.nrows(), x.ncols());
    check::shape("A", a, d_in, d_in)?;
    check::shape("G", g, d_out, d_out)?;
    check::positive_param("damping", damping)?;
    check::finite("right-hand side", x.rb())?;
    check::stack(stack, kron_damped_solve_scratch::<T>(d_out, d_in, par))?;
    let (mut qa, stack) = temp_mat_zeroed::<T, _, _>(d_in, d_in, stack);
    let mut qa = qa.as_mat_mut();
    let (mut qg, stack) = temp_mat_zeroed::<T, _, _>(d_out, d_out, stack);
    let mut qg = qg.as_mat_mut();
    let (mut l, stack) = stack.make_aligned_with(d_in + d_out, 64, |_| T::ZERO);
    let (la, lg) = l.split_at_mut(d_in);
    sym_eigen(a, la, qa.rb_mut(), par, stack)?;
    sym_eigen(g, lg, qg.rb_mut(), par, stack)?;
    precondition_eigen(x, qg.rb(), lg, qa.rb(), la, damping, par, stack)
}
