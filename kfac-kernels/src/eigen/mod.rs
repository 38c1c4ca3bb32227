//! Damped eigen-inversion: symmetric eigendecomposition of a factor and the
//! eigenbasis preconditioner
//! `V = Q_G [ (Q_G^T grad Q_A) / (l_G l_A^T + damping) ] Q_A^T`,
//! which is `(A ⊗ G + damping I)^{-1} vec(grad)` (damping added once).
//!
//! Two forms: the denominators computed on the fly ([`precondition_eigen`]),
//! or a precomputed `1/(l_G l_A^T + damping)` matrix
//! ([`eigen_inverse_denominators`] + [`precondition_eigen_precomputed`]).
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::eigen::*;
//! let a = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { 2.0 } else { 0.0 });
//! let g = Mat::<f64>::from_fn(1, 1, |_, _| 3.0);
//! let (mut qa, mut la) = (Mat::<f64>::zeros(2, 2), vec![0.0; 2]);
//! let (mut qg, mut lg) = (Mat::<f64>::zeros(1, 1), vec![0.0; 1]);
//! let mut buf = MemBuffer::new(sym_eigen_scratch::<f64>(2, Par::Seq)
//!     .or(precondition_eigen_scratch::<f64>(1, 2, Par::Seq)));
//! sym_eigen(a.as_ref(), &mut la, qa.as_mut(), Par::Seq, MemStack::new(&mut buf)).unwrap();
//! sym_eigen(g.as_ref(), &mut lg, qg.as_mut(), Par::Seq, MemStack::new(&mut buf)).unwrap();
//! let mut grad = Mat::<f64>::from_fn(1, 2, |_, j| (j + 1) as f64);
//! precondition_eigen(grad.as_mut(), qg.as_ref(), &lg, qa.as_ref(), &la, 1.0,
//!                    Par::Seq, MemStack::new(&mut buf)).unwrap();
//! // (A ⊗ G + I) is diag(7, 7): V = grad / 7
//! assert!((grad[(0, 1)] - 2.0 / 7.0).abs() < 1e-14);
//! ```

mod probe;
mod refresh;
mod solve;

pub use probe::{
    eigenbasis_change_estimate, eigenbasis_change_estimate_scratch, eigenbasis_drift_sample,
    eigenbasis_drift_sample_scratch, DriftSample,
};
pub use refresh::{
    eigenbasis_drift, eigenbasis_drift_scratch, refresh_eigenbasis, refresh_eigenbasis_scratch,
    Refresh, RefreshKind,
};
pub use solve::{
    sym_eigen, sym_eigen_blocked, sym_eigen_blocked_scratch, sym_eigen_reference,
    sym_eigen_reference_scratch, sym_eigen_scratch, BLOCKED_EIGEN_MIN_DIM,
};

use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

/// Scratch needed by [`largest_eigenvalue_estimate`] for a `dim x dim`
/// matrix.
pub fn largest_eigenvalue_estimate_scratch(dim: usize) -> StackReq {
    temp_mat_scratch::<f64>(dim, 2)
}

/// A lower estimate of the largest eigenvalue of a symmetric PSD factor
/// (its lower triangle is read): the larger of its largest diagonal entry
/// and the Rayleigh quotient after `iters` power iterations (in f64, in a
/// fixed order: the same bits for any thread count), from a fixed start
/// vector. `O(iters n^2)`, against the `O(n^3)` of a decomposition; used to
/// predict the rounding error of an f32 decomposition before making it.
/// For a PSD matrix the result is at most the largest eigenvalue, and
/// close to it unless the start vector is nearly orthogonal to the top
/// eigenvectors.
///
/// ```
/// use faer::{Mat, dyn_stack::{MemBuffer, MemStack}};
/// use kfac_kernels::eigen::*;
/// let a = Mat::<f32>::from_fn(3, 3, |i, j| if i == j { [1.0, 4.0, 2.0][i] } else { 0.5 });
/// let mut buf = MemBuffer::new(largest_eigenvalue_estimate_scratch(3));
/// let l = largest_eigenvalue_estimate(a.as_ref(), 20, MemStack::new(&mut buf)).unwrap();
/// assert!(l > 4.0 && l <= 4.5); // the largest eigenvalue is ~4.43
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`] unless square, [`Error::NonFinite`] for a
/// NaN/Inf in the lower triangle, [`Error::ScratchTooSmall`].
pub fn largest_eigenvalue_estimate<T: Real>(
    a: MatRef<'_, T>,
    iters: usize,
    stack: &mut MemStack,
) -> Result<f64> {
    let n = check::square("factor", a)?;
    check::finite_lower("factor", a)?;
    check::stack(stack, largest_eigenvalue_estimate_scratch(n))?;
    if n == 0 {
        return Ok(0.0);
    }
    let diag = (0..n).map(|i| a[(i, i)].to_f64()).fold(0.0f64, f64::max);
    let (mut w, _) = temp_mat_zeroed::<f64, _, _>(n, 2, stack);
    let mut w = w.as_mat_mut();
    let (v, y) = w.rb_mut().two_cols_mut(0, 1);
    // Columns of a fresh temporary matrix are contiguous.
    let (Some(v), Some(y)) = (v.try_as_col_major_mut(), y.try_as_col_major_mut()) else {
        return Ok(diag);
    };
    let (mut v, mut y) = (v.as_slice_mut(), y.as_slice_mut());
    // A start vector with every component nonzero and no sign pattern a
    // factor of centered data would be orthogonal to.
    for (i, x) in v.iter_mut().enumerate() {
        *x = 1.0 + ((i * 7919) % 13) as f64 / 13.0;
    }
    let mut rq = 0.0f64;
    for _ in 0..iters {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt_val();
        if norm == 0.0 || !norm.is_finite() {
            break;
        }
        for x in v.iter_mut() {
            *x /= norm;
        }
        // y = A v from the lower triangle.
        for x in y.iter_mut() {
            *x = 0.0;
        }
        for j in 0..n {
            let vj = v[j];
            let mut acc = a[(j, j)].to_f64() * vj;
            for i in j + 1..n {
                let aij = a[(i, j)].to_f64();
                acc += aij * v[i];
                y[i] += aij * vj;
            }
            y[j] += acc;
        }
        rq = v.iter().zip(y.iter()).map(|(p, q)| p * q).sum::<f64>();
        core::mem::swap(&mut v, &mut y);
    }
    Ok(rq.max(diag))
}

/// Scratch needed by the eigen preconditioners for a `d_out x d_in` gradient.
pub fn precondition_eigen_scratch<T: Real>(d_out: usize, d_in: usize, par: Par) -> StackReq {
    let _ = par;
    StackReq::all_of(&[
        temp_mat_scratch::<T>(d_out, d_in),
        temp_mat_scratch::<T>(d_out, d_in),
    ])
}

#[allow(clippy::too_many_arguments)]
fn check_eigen_args<T: Real>(
    grad: &MatMut<'_, T>,
    qg: MatRef<'_, T>,
    lg: Option<&[T]>,
    qa: MatRef<'_, T>,
    la: Option<&[T]>,
    par: Par,
    stack: &MemStack,
) -> Result<()> {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    check::shape("Q_G", qg, d_out, d_out)?;
    check::shape("Q_A", qa, d_in, d_in)?;
    if let Some(lg) = lg {
        check::len("l_G", lg.len(), d_out)?;
        check::finite_slice("l_G", lg)?;
        if let Some(i) = lg.iter().position(|&v| v < T::ZERO) {
            return Err(Error::InvalidParameter {
                what: "l_G eigenvalue",
                value: lg[i].to_f64(),
                expected: "a value >= 0",
            });
        }
    }
    if let Some(la) = la {
        check::len("l_A", la.len(), d_in)?;
        check::finite_slice("l_A", la)?;
        if let Some(i) = la.iter().position(|&v| v < T::ZERO) {
            return Err(Error::InvalidParameter {
                what: "l_A eigenvalue",
                value: la[i].to_f64(),
                expected: "a value >= 0",
            });
        }
    }
    check::finite("gradient", grad.rb())?;
    check::finite("Q_G", qg)?;
    check::finite("Q_A", qa)?;
    check::stack(stack, precondition_eigen_scratch::<T>(d_out, d_in, par))
}

/// The four-matmul sandwich around an elementwise `scale` of the eigenbasis
/// gradient: `grad <- Q_G scale(Q_G^T grad Q_A) Q_A^T`.
fn sandwich<T: Real>(
    mut grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    qa: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
    scale: impl Fn(usize, &mut [T]),
) {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    if d_out == 0 || d_in == 0 {
        return;
    }
    let (mut t1, stack) = temp_mat_zeroed::<T, _, _>(d_out, d_in, stack);
    let mut t1 = t1.as_mat_mut();
    let (mut t2, _) = temp_mat_zeroed::<T, _, _>(d_out, d_in, stack);
    let mut t2 = t2.as_mat_mut();
    matmul(
        t1.rb_mut(),
        Accum::Replace,
        qg.transpose(),
        grad.rb(),
        T::ONE,
        par,
    );
    matmul(t2.rb_mut(), Accum::Replace, t1.rb(), qa, T::ONE, par);
    for j in 0..d_in {
        let mut col = t2.rb_mut().col_mut(j);
        if let Some(c) = col.rb_mut().try_as_col_major_mut() {
            scale(j, c.as_slice_mut());
        }
    }
    matmul(t1.rb_mut(), Accum::Replace, qg, t2.rb(), T::ONE, par);
    matmul(
        grad.rb_mut(),
        Accum::Replace,
        t1.rb(),
        qa.transpose(),
        T::ONE,
        par,
    );
}

/// Eigen preconditioning in place, denominators on the fly:
/// `grad <- Q_G [ (Q_G^T grad Q_A) / (l_G l_A^T + damping) ] Q_A^T`.
///
/// * `grad`: `d_out x d_in` (bias folded in as the last column), any strides.
/// * `qg`, `lg`: eigenvectors (`d_out x d_out`) and eigenvalues of `G`.
/// * `qa`, `la`: eigenvectors (`d_in x d_in`) and eigenvalues of `A`.
///
/// Flops: `2 d_out d_in (d_out + d_in)` multiply-adds (four matmuls).
///
/// # Errors
/// Shape and length mismatches, [`Error::NonFinite`] inputs, negative
/// eigenvalues, `damping` not finite and `> 0`, [`Error::ScratchTooSmall`].
/// `grad` is untouched on error.
#[allow(clippy::too_many_arguments)]
pub fn precondition_eigen<T: Real>(
    grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    lg: &[T],
    qa: MatRef<'_, T>,
    la: &[T],
    damping: T,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check::positive_param("damping", damping)?;
    check_eigen_args(&grad, qg, Some(lg), qa, Some(la), par, stack)?;
    sandwich(grad, qg, qa, par, stack, |j, col| {
        let a = la[j];
        for (v, &g) in col.iter_mut().zip(lg) {
            *v /= g * a + damping;
        }
    });
    Ok(())
}

/// The precomputed denominators `out[i, j] = 1 / (l_G[i] l_A[j] + damping)`.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `out` is not `len(l_G) x len(l_A)`,
/// non-finite or negative eigenvalues, `damping` not finite and `> 0`.
pub fn eigen_inverse_denominators<T: Real>(
    mut out: MatMut<'_, T>,
    lg: &[T],
    la: &[T],
    damping: T,
) -> Result<()> {
    check::shape_mut("denominators", &out, lg.len(), la.len())?;
    check::positive_param("damping", damping)?;
    check::finite_slice("l_G", lg)?;
    check::finite_slice("l_A", la)?;
    for (what, l) in [("l_G eigenvalue", lg), ("l_A eigenvalue", la)] {
        if let Some(i) = l.iter().position(|&v| v < T::ZERO) {
            return Err(Error::InvalidParameter {
                what,
                value: l[i].to_f64(),
                expected: "a value >= 0",
            });
        }
    }
    for (j, &a) in la.iter().enumerate() {
        for (i, &g) in lg.iter().enumerate() {
            out[(i, j)] = T::ONE / (g * a + damping);
        }
    }
    Ok(())
}

/// Eigen preconditioning in place with precomputed denominators `inv_denom`
/// (from [`eigen_inverse_denominators`]):
/// `grad <- Q_G [ (Q_G^T grad Q_A) ∘ inv_denom ] Q_A^T`.
///
/// # Errors
/// As [`precondition_eigen`]; `inv_denom` must be `d_out x d_in` and finite.
pub fn precondition_eigen_precomputed<T: Real>(
    grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    qa: MatRef<'_, T>,
    inv_denom: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check::shape("denominators", inv_denom, grad.nrows(), grad.ncols())?;
    check::finite("denominators", inv_denom)?;
    check_eigen_args(&grad, qg, None, qa, None, par, stack)?;
    sandwich(grad, qg, qa, par, stack, |j, col| {
        let d = inv_denom.col(j);
        match d.try_as_col_major() {
            Some(d) => T::simd_mul_assign(col, d.as_slice()),
            None => {
                for (i, v) in col.iter_mut().enumerate() {
                    *v *= d[i];
                }
            }
        }
    });
    Ok(())
}

/// The eigen method's "decomposition" of a diagonal factor `D` (an embedding
/// layer's `A`): `Q = I` and `l[i] = max(d[i], 0)`, exactly as `f32::max` /
/// `f64::max` compute it (negative rounding noise clamped to 0, like
/// [`sym_eigen`]). Eigenvalues stay in index order (not sorted), so that
/// `Q = I` holds.
///
/// ```
/// let mut l = [0.0f32; 3];
/// kfac_kernels::eigen::clamp_eigenvalues_diag(&mut l, &[2.0, -1e-9, 0.5]).unwrap();
/// assert_eq!(l, [2.0, 0.0, 0.5]);
/// ```
///
/// # Errors
/// [`Error::LengthMismatch`] unless `out.len() == d.len()`,
/// [`Error::NonFinite`] for a NaN/Inf in `d`. `out` is untouched on error.
pub fn clamp_eigenvalues_diag<T: Real>(out: &mut [T], d: &[T]) -> Result<()> {
    check::len("eigenvalues", out.len(), d.len())?;
    check::finite_slice("diagonal factor", d)?;
    for (o, &v) in out.iter_mut().zip(d) {
        *o = v.max_val(T::ZERO);
    }
    Ok(())
}

/// Scratch needed by [`precondition_eigen_diag_a`] and
/// [`precondition_eigen_diag_a_precomputed`] for a `d_out x d_in` gradient.
pub fn precondition_eigen_diag_a_scratch<T: Real>(d_out: usize, d_in: usize, par: Par) -> StackReq {
    let _ = par;
    temp_mat_scratch::<T>(d_out, d_in)
}

fn check_diag_a_args<T: Real>(
    grad: &MatMut<'_, T>,
    qg: MatRef<'_, T>,
    par: Par,
    stack: &MemStack,
) -> Result<()> {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    check::shape("Q_G", qg, d_out, d_out)?;
    check::finite("gradient", grad.rb())?;
    check::finite("Q_G", qg)?;
    check::stack(
        stack,
        precondition_eigen_diag_a_scratch::<T>(d_out, d_in, par),
    )
}

fn check_eigenvalues<T: Real>(what: &'static str, l: &[T], len: usize) -> Result<()> {
    check::len(what, l.len(), len)?;
    check::finite_slice(what, l)?;
    if let Some(i) = l.iter().position(|&v| v < T::ZERO) {
        return Err(Error::InvalidParameter {
            what,
            value: l[i].to_f64(),
            expected: "a value >= 0",
        });
    }
    Ok(())
}

/// `grad <- Q_G scale(Q_G^T grad)`: two matmuls around an elementwise scale
/// of the (column-major) temporary, column by column.
fn diag_a_sandwich<T: Real>(
    mut grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
    scale: impl Fn(usize, &mut [T]),
) {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    if d_out == 0 || d_in == 0 {
        return;
    }
    let (mut t, _) = temp_mat_zeroed::<T, _, _>(d_out, d_in, stack);
    let mut t = t.as_mat_mut();
    matmul(
        t.rb_mut(),
        Accum::Replace,
        qg.transpose(),
        grad.rb(),
        T::ONE,
        par,
    );
    for j in 0..d_in {
        let mut col = t.rb_mut().col_mut(j);
        if let Some(c) = col.rb_mut().try_as_col_major_mut() {
            scale(j, c.as_slice_mut());
        }
    }
    matmul(grad.rb_mut(), Accum::Replace, qg, t.rb(), T::ONE, par);
}

/// Eigen preconditioning in place for a layer whose `A` factor is diagonal
/// (an embedding layer: `A = diag(l_A)`, `Q_A = I`), denominators on the fly:
///
/// `grad <- Q_G [ (Q_G^T grad) ∘ R ]`, `R[i, j] = 1 / (l_G[i] l_A[j] + damping)`
///
/// which is `(A ⊗ G + damping I)^{-1} vec(grad)`. Evaluated as
/// `T = Q_G^T grad` (one faer matmul), `T[i, j] *= 1 / (l_G[i] * l_A[j] + damping)`
/// (the reciprocal rounded, then the product), `grad = Q_G T`: two matmuls
/// instead of the dense method's four.
///
/// * `grad`: `d_out x d_in` (bias, if any, as the last column), any strides.
/// * `qg`, `lg`: eigenvectors (`d_out x d_out`) and eigenvalues of `G`.
/// * `la`: the diagonal of `A` (length `d_in`, clamped with
///   [`clamp_eigenvalues_diag`]).
///
/// Flops: `2 d_out^2 d_in` multiply-adds. Scratch:
/// [`precondition_eigen_diag_a_scratch`].
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::eigen::*;
/// let qg = Mat::<f64>::identity(1, 1);
/// let mut grad = Mat::<f64>::from_fn(1, 2, |_, j| (j + 1) as f64);
/// let mut buf = MemBuffer::new(precondition_eigen_diag_a_scratch::<f64>(1, 2, Par::Seq));
/// precondition_eigen_diag_a(grad.as_mut(), qg.as_ref(), &[3.0], &[1.0, 2.0], 1.0,
///                           Par::Seq, MemStack::new(&mut buf)).unwrap();
/// assert_eq!((grad[(0, 0)], grad[(0, 1)]), (1.0 / 4.0, 2.0 / 7.0));
/// ```
///
/// # Errors
/// Shape and length mismatches, [`Error::NonFinite`] inputs, negative
/// eigenvalues, `damping` not finite and `> 0`, [`Error::ScratchTooSmall`].
/// `grad` is untouched on error.
#[allow(clippy::too_many_arguments)]
pub fn precondition_eigen_diag_a<T: Real>(
    grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    lg: &[T],
    la: &[T],
    damping: T,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check::positive_param("damping", damping)?;
    check_eigenvalues("l_G eigenvalue", lg, grad.nrows())?;
    check_eigenvalues("l_A eigenvalue", la, grad.ncols())?;
    check_diag_a_args(&grad, qg, par, stack)?;
    diag_a_sandwich(grad, qg, par, stack, |j, col| {
        let a = la[j];
        for (v, &g) in col.iter_mut().zip(lg) {
            *v *= T::ONE / (g * a + damping);
        }
    });
    Ok(())
}

/// [`precondition_eigen_diag_a`] with precomputed denominators `inv_denom`
/// (`d_out x d_in`, from [`eigen_inverse_denominators`] with `l_A` the
/// diagonal of `A`): `grad <- Q_G [ (Q_G^T grad) ∘ inv_denom ]`.
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::eigen::*;
/// let qg = Mat::<f32>::identity(1, 1);
/// let mut den = Mat::<f32>::zeros(1, 2);
/// eigen_inverse_denominators(den.as_mut(), &[3.0], &[1.0, 2.0], 1.0).unwrap();
/// let mut grad = Mat::<f32>::from_fn(1, 2, |_, j| (j + 1) as f32);
/// let mut buf = MemBuffer::new(precondition_eigen_diag_a_scratch::<f32>(1, 2, Par::Seq));
/// precondition_eigen_diag_a_precomputed(grad.as_mut(), qg.as_ref(), den.as_ref(),
///                                       Par::Seq, MemStack::new(&mut buf)).unwrap();
/// assert_eq!(grad[(0, 0)], 0.25);
/// ```
///
/// # Errors
/// As [`precondition_eigen_diag_a`]; `inv_denom` must be `d_out x d_in` and
/// finite.
pub fn precondition_eigen_diag_a_precomputed<T: Real>(
    grad: MatMut<'_, T>,
    qg: MatRef<'_, T>,
    inv_denom: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check::shape("denominators", inv_denom, grad.nrows(), grad.ncols())?;
    check::finite("denominators", inv_denom)?;
    check_diag_a_args(&grad, qg, par, stack)?;
    diag_a_sandwich(grad, qg, par, stack, |j, col| {
        let d = inv_denom.col(j);
        match d.try_as_col_major() {
            Some(d) => T::simd_mul_assign(col, d.as_slice()),
            None => {
                for (i, v) in col.iter_mut().enumerate() {
                    *v *= d[i];
                }
            }
        }
    });
    Ok(())
}
