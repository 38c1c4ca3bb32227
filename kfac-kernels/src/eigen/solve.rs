//! The symmetric eigensolvers behind [`sym_eigen`](super::sym_eigen): the
//! dispatch between faer's one-stage solver and our blocked path
//! ([`sym_eigen_blocked`](super::sym_eigen_blocked)), and the reference
//! solver kfac-pytorch mode keeps. Re-exported from [`super`].

use crate::tridiag;
use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::evd::{self, ComputeEigenvectors, SelfAdjointEvdParams};
use faer::linalg::householder;
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{ColRef, Conj, MatMut, MatRef, Par, Spec};

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
/// thread count. Slower than [`sym_eigen`] (which takes 0.76-0.89x its
/// time at orders 256-512 on one thread, f32), but its bits never change
/// with our tuning: the runtime's kfac-pytorch compatibility mode uses it,
/// so those results stay exactly what they were. Same contract as
/// [`sym_eigen`].
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
