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

use crate::tridiag;
use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::evd::{self, ComputeEigenvectors, SelfAdjointEvdParams};
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, ColRef, Conj, MatMut, MatRef, Par, Spec};

/// From this order on, [`sym_eigen`] on two or more threads uses
/// [`sym_eigen_blocked`]; below it, and on one thread, faer's one-stage
/// solver, which is faster there (BENCHMARKS.md, "Eigendecomposition vs
/// LAPACK").
pub const BLOCKED_EIGEN_MIN_DIM: usize = 512;

/// Below this order faer's divide and conquer solves a tridiagonal block
/// by QR iteration (faer's default is 128), for factors of order below
/// [`DC_LEAF_MAX_DIM`]. Measured on one thread, Wishart factors: 64 is
/// 11-24% faster in f32 at orders 147-512 (QR iteration applies its
/// rotations to the eigenvectors at BLAS-1 speed, so large leaves cost more
/// than the extra merges), level at 1024 and 4-10% slower at 2048, where
/// faer's 128 is kept.
const DC_LEAF: usize = 64;

/// From this order on, faer's default leaf size (see [`DC_LEAF`]).
const DC_LEAF_MAX_DIM: usize = 1024;

/// faer's eigensolver settings for an `n x n` factor (see [`DC_LEAF`]).
fn evd_params<T: Real>(n: usize) -> Spec<SelfAdjointEvdParams, T> {
    let mut p: SelfAdjointEvdParams = faer::auto!(T);
    if n < DC_LEAF_MAX_DIM {
        p.recursion_threshold = DC_LEAF;
    }
    Spec::new(p)
}

/// Whether [`sym_eigen`] takes the [`sym_eigen_blocked`] path.
fn use_blocked(dim: usize, par: Par) -> bool {
    par.degree() >= 2 && dim >= BLOCKED_EIGEN_MIN_DIM
}

/// Scratch needed by [`sym_eigen`] for a `dim x dim` matrix.
pub fn sym_eigen_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    if use_blocked(dim, par) {
        return sym_eigen_blocked_scratch::<T>(dim, par);
    }
    faer_scratch(dim, par, evd_params::<T>(dim))
}

/// Scratch of [`faer_eigen`].
fn faer_scratch<T: Real>(n: usize, par: Par, params: Spec<SelfAdjointEvdParams, T>) -> StackReq {
    if n == 0 {
        // Nothing to decompose (and faer's scratch formula underflows at 0).
        return StackReq::EMPTY;
    }
    StackReq::all_of(&[
        temp_mat_scratch::<T>(n, n),
        temp_mat_scratch::<T>(n, 1),
        evd::self_adjoint_evd_scratch::<T>(n, ComputeEigenvectors::Yes, par, params),
    ])
}

/// Symmetric eigendecomposition `A = Q diag(l) Q^T` of a factor, reading only
/// its lower triangle; eigenvalues ascending, negative ones (rounding noise of
/// a PSD factor) clamped to zero.
///
/// Two solvers behind one call, chosen by measurement: from order
/// [`BLOCKED_EIGEN_MIN_DIM`] on, with `par` of two or more threads,
/// [`sym_eigen_blocked`] (15-30% faster than faer there); otherwise faer's
/// `self_adjoint_evd` (faster on one thread and for small factors) with
/// divide-and-conquer leaves of 64 instead of faer's 128 below order 1024
/// (11-24% faster in f32 at orders 147-512; [`sym_eigen_reference`] keeps
/// faer's settings). The
/// choice depends only on `dim` and `par.degree()`, so a given call is
/// deterministic; results of the same factor may differ in the last bits
/// between one and several threads for orders of at least
/// `BLOCKED_EIGEN_MIN_DIM` (as faer's own parallel reduction did).
///
/// # Errors
/// [`Error::DimensionMismatch`] / [`Error::LengthMismatch`] for shapes,
/// [`Error::NonFinite`] for a NaN/Inf in the lower triangle,
/// [`Error::EigenNoConvergence`], [`Error::ScratchTooSmall`]. Outputs are
/// untouched on error (the decomposition is computed in scratch).
pub fn sym_eigen<T: Real>(
    a: MatRef<'_, T>,
    eigenvalues: &mut [T],
    eigenvectors: MatMut<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let n = check::square("factor", a)?;
    if use_blocked(n, par) {
        return sym_eigen_blocked(a, eigenvalues, eigenvectors, par, stack);
    }
    faer_eigen(a, eigenvalues, eigenvectors, par, stack, evd_params::<T>(n))
}

/// Scratch needed by [`sym_eigen_reference`] for a `dim x dim` matrix.
pub fn sym_eigen_reference_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    faer_scratch::<T>(dim, par, Default::default())
}

/// [`sym_eigen`] as kfac computed it before the solver was tuned: faer's
/// `self_adjoint_evd` with faer's default settings, for every size and
/// thread count. Slower than [`sym_eigen`] (which takes 0.76-0.89x its time
/// at orders 256-512 on one thread, f32), but its bits never change with our tuning: the runtime's
/// kfac-pytorch compatibility mode uses it, so those results stay exactly
/// what they were. Same contract as [`sym_eigen`].
///
/// # Errors
/// As [`sym_eigen`].
pub fn sym_eigen_reference<T: Real>(
    a: MatRef<'_, T>,
    eigenvalues: &mut [T],
    eigenvectors: MatMut<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    faer_eigen(a, eigenvalues, eigenvectors, par, stack, Default::default())
}

/// faer's `self_adjoint_evd` behind our checks and clamping.
fn faer_eigen<T: Real>(
    a: MatRef<'_, T>,
    eigenvalues: &mut [T],
    mut eigenvectors: MatMut<'_, T>,
    par: Par,
    stack: &mut MemStack,
    params: Spec<SelfAdjointEvdParams, T>,
) -> Result<()> {
    let n = check::square("factor", a)?;
    check::len("eigenvalues", eigenvalues.len(), n)?;
    check::shape_mut("eigenvectors", &eigenvectors, n, n)?;
    check::finite_lower("factor", a)?;
    check::stack(stack, faer_scratch(n, par, params))?;
    if n == 0 {
        return Ok(());
    }
    let (mut u, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut u = u.as_mat_mut();
    let (mut s, stack) = temp_mat_zeroed::<T, _, _>(n, 1, stack);
    let mut s = s.as_mat_mut();
    evd::self_adjoint_evd(
        a,
        s.rb_mut().col_mut(0).as_diagonal_mut(),
        Some(u.rb_mut()),
        par,
        stack,
        params,
    )
    .map_err(|_| Error::EigenNoConvergence { dim: n })?;
    for (i, l) in eigenvalues.iter_mut().enumerate() {
        let v = s[(i, 0)];
        *l = if v > T::ZERO { v } else { T::ZERO };
    }
    eigenvectors.copy_from(u.rb());
    Ok(())
}

/// Scratch needed by [`sym_eigen_blocked`] for a `dim x dim` matrix.
pub fn sym_eigen_blocked_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    if dim <= 1 {
        // Nothing to decompose (and faer's scratch formulas underflow at 0).
        return StackReq::EMPTY;
    }
    let n = dim;
    let bs = recommended_block_size::<T>(n, n);
    StackReq::all_of(&[
        // The tridiagonal reduction in place, tau / diagonal / subdiagonal.
        StackReq::new_aligned::<T>(n * n, 64),
        StackReq::new_aligned::<T>(3 * n, 64),
        // The reflectors' block factors, the tridiagonal eigenvectors and
        // eigenvalues.
        temp_mat_scratch::<T>(bs, n - 1),
        temp_mat_scratch::<T>(n, n),
        temp_mat_scratch::<T>(n, 1),
        StackReq::any_of(&[
            tridiag::scratch::<T>(n),
            // Covers faer's divide and conquer (whose own scratch function
            // is private) with room to spare: one n x n matrix.
            evd::self_adjoint_evd_scratch::<T>(
                n,
                ComputeEigenvectors::Yes,
                par,
                evd_params::<T>(n),
            ),
            householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(
                n - 1,
                bs,
                n,
            ),
        ]),
    ])
}

/// [`sym_eigen`] through our own tridiagonal reduction, whatever the size
/// and thread count (what `sym_eigen` uses for large factors on two or
/// more threads).
///
/// Three stages: a blocked Householder tridiagonalization of our own
/// (LAPACK's `?sytrd` scheme, half its flops at matrix-multiply rate; on
/// two threads a per-panel thread team instead of faer's fork-join per
/// column), faer's divide and conquer on the tridiagonal matrix, and faer's
/// blocked application of the reflectors to its eigenvectors. The result
/// is bitwise the same for `Par::Seq` and `Par::rayon(k)` at any `k`.
///
/// # Errors
/// [`Error::DimensionMismatch`] / [`Error::LengthMismatch`] for shapes,
/// [`Error::NonFinite`] for a NaN/Inf in the lower triangle,
/// [`Error::EigenNoConvergence`], [`Error::ScratchTooSmall`]. Outputs are
/// untouched on error (the decomposition is computed in scratch).
pub fn sym_eigen_blocked<T: Real>(
    a: MatRef<'_, T>,
    eigenvalues: &mut [T],
    mut eigenvectors: MatMut<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let n = check::square("factor", a)?;
    check::len("eigenvalues", eigenvalues.len(), n)?;
    check::shape_mut("eigenvectors", &eigenvectors, n, n)?;
    check::finite_lower("factor", a)?;
    check::stack(stack, sym_eigen_blocked_scratch::<T>(n, par))?;
    if n == 0 {
        return Ok(());
    }
    if n == 1 {
        let v = a[(0, 0)];
        eigenvalues[0] = if v > T::ZERO { v } else { T::ZERO };
        eigenvectors[(0, 0)] = T::ONE;
        return Ok(());
    }
    // 1. Householder tridiagonalization (our blocked reduction, faer's
    //    storage conventions), on a column-major copy of the lower triangle.
    let (mut trid, stack) = stack.make_aligned_with(n * n, 64, |_| T::ZERO);
    for j in 0..n {
        for i in j..n {
            trid[i + j * n] = a[(i, j)];
        }
    }
    let (mut tde, stack) = stack.make_aligned_with(3 * n, 64, |_| T::ZERO);
    let (tau, de) = tde.split_at_mut(n);
    let (d, e) = de.split_at_mut(n);
    tridiag::tridiagonalize(&mut trid, n, n, tau, par, stack);
    for j in 0..n {
        d[j] = trid[j + j * n];
        e[j] = if j + 1 < n {
            trid[j + 1 + j * n]
        } else {
            T::ZERO
        };
    }
    // 2. The reflectors' block factors, as faer's reduction leaves them.
    let bs = recommended_block_size::<T>(n, n);
    let (mut hf, stack) = temp_mat_zeroed::<T, _, _>(bs, n - 1, stack);
    let mut hf = hf.as_mat_mut();
    let basis = MatRef::from_column_major_slice_with_stride(&trid[1..], n - 1, n - 1, n);
    let mut j = 0;
    while j < n - 1 {
        let b = bs.min(n - 1 - j);
        let mut hb = hf.rb_mut().submatrix_mut(0, j, b, b);
        for k in 0..b {
            hb[(k, k)] = tau[j + k];
        }
        householder::upgrade_householder_factor(hb, basis.submatrix(j, j, n - 1 - j, b), b, 1, par);
        j += b;
    }
    // 3. The tridiagonal matrix's eigenpairs (faer's divide and conquer).
    let (mut u, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut u = u.as_mat_mut();
    let (mut s, stack) = temp_mat_zeroed::<T, _, _>(n, 1, stack);
    let mut s = s.as_mat_mut();
    evd::tridiagonal_self_adjoint_evd(
        ColRef::from_slice(d).as_diagonal(),
        ColRef::from_slice(e).as_diagonal(),
        s.rb_mut().col_mut(0).as_diagonal_mut(),
        Some(u.rb_mut()),
        par,
        stack,
        evd_params::<T>(n),
    )
    .map_err(|_| Error::EigenNoConvergence { dim: n })?;
    // 4. Back to the factor's basis: Q = H_0 H_1 ... H_{n-2} applied to U.
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        basis,
        hf.rb(),
        Conj::No,
        u.rb_mut().subrows_mut(1, n - 1),
        par,
        stack,
    );
    for (i, l) in eigenvalues.iter_mut().enumerate() {
        let v = s[(i, 0)];
        *l = if v > T::ZERO { v } else { T::ZERO };
    }
    eigenvectors.copy_from(u.rb());
    Ok(())
}

/// Scratch needed by [`eigenbasis_drift`] for a `dim x dim` factor.
pub fn eigenbasis_drift_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    let _ = par;
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, dim),
        temp_mat_scratch::<T>(dim, dim),
    ])
}

/// How far a factor `F` has drifted from an old eigenbasis `Q`: computes
/// `B = Q^T F Q` (two products, `4 n^3` flops at GEMM rate, against an
/// eigendecomposition's several times that), writes its diagonal, clamped
/// at zero, to `eigenvalues` (the eigenvalue estimates that keep `Q`), and
/// returns `||B - diag(B)||_F` (accumulated in f64).
///
/// Keeping `Q` with those estimates replaces `F` by
/// `Q diag(B) Q^T = F - Q (B - diag(B)) Q^T` (for an orthogonal `Q`): a
/// symmetric perturbation of 2-norm at most the returned value, so every
/// eigenvalue moves by at most that much (Weyl) and a damped inverse
/// `(F + damping I)^{-1}` changes by at most `drift / damping` relative to
/// its own size. `F` is read in full (both triangles; it is symmetric).
///
/// ```
/// use faer::{Mat, Par, dyn_stack::{MemBuffer, MemStack}};
/// use kfac_kernels::eigen::*;
/// // F = diag(3, 1) in the basis Q = I: no drift, eigenvalues (3, 1).
/// let f = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { [3.0, 1.0][i] } else { 0.0 });
/// let q = Mat::<f64>::identity(2, 2);
/// let mut l = vec![0.0; 2];
/// let mut buf = MemBuffer::new(eigenbasis_drift_scratch::<f64>(2, Par::Seq));
/// let d = eigenbasis_drift(f.as_ref(), q.as_ref(), &mut l, Par::Seq, MemStack::new(&mut buf)).unwrap();
/// assert_eq!((d, l), (0.0, vec![3.0, 1.0]));
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`] / [`Error::LengthMismatch`] for shapes,
/// [`Error::NonFinite`] for a NaN/Inf in `F` or `Q`,
/// [`Error::ScratchTooSmall`]. `eigenvalues` is untouched on error.
pub fn eigenbasis_drift<T: Real>(
    f: MatRef<'_, T>,
    q: MatRef<'_, T>,
    eigenvalues: &mut [T],
    par: Par,
    stack: &mut MemStack,
) -> Result<f64> {
    let n = check::square("factor", f)?;
    check::shape("old eigenbasis", q, n, n)?;
    check::len("eigenvalues", eigenvalues.len(), n)?;
    check::finite("factor", f)?;
    check::finite("old eigenbasis", q)?;
    check::stack(stack, eigenbasis_drift_scratch::<T>(n, par))?;
    if n == 0 {
        return Ok(0.0);
    }
    let (mut fq, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut fq = fq.as_mat_mut();
    let (mut b, _) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut b = b.as_mat_mut();
    matmul(fq.rb_mut(), Accum::Replace, f, q, T::ONE, par);
    matmul(
        b.rb_mut(),
        Accum::Replace,
        q.transpose(),
        fq.rb(),
        T::ONE,
        par,
    );
    let mut off = 0.0f64;
    for j in 0..n {
        for i in 0..n {
            if i != j {
                let v = b[(i, j)].to_f64();
                off += v * v;
            }
        }
    }
    for (i, l) in eigenvalues.iter_mut().enumerate() {
        *l = b[(i, i)].max_val(T::ZERO);
    }
    Ok(off.sqrt_val())
}

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
