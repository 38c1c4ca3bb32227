//! Refreshing an old eigenbasis `Q` of a factor `F` instead of decomposing
//! `F` again (the runtime's `Config::refresh_tolerance`), from the cheapest
//! test to the dearest repair (the `O(n^2)` ones in [`super::probe`]).
//! Re-exported from [`super`](crate::eigen).
//!
//! | | work | what it gives |
//! |---|---|---|
//! | [`eigenbasis_change_estimate`] | `6 k n^2` (`k` probes) | an estimate of `‖F - Q diag(l) Q^T‖_F`: is the old decomposition still good as it is? |
//! | [`eigenbasis_drift_sample`] | `4 k n^2` (`k` columns) | lower bounds of the drift below and of what a refinement leaves: can neither serve? |
//! | [`eigenbasis_drift`] | `3 n^3` (one product, one half product) | `‖offdiag(Q^T F Q)‖_F` and new eigenvalue estimates `diag(Q^T F Q)` for the old basis |
//! | [`refresh_eigenbasis`] | `3 n^3`, plus `3 n^3` to refine | the drift test; if it fails, one step of Ogita–Aishima refinement of `Q` when its a-priori error bound allows |
//!
//! A full decomposition costs about `4-5` products of order `n` (measured:
//! BENCHMARKS.md, "Refreshing an eigenbasis").

use crate::{check, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

/// Scratch needed by [`eigenbasis_drift`] for a `dim x dim` factor.
pub fn eigenbasis_drift_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    let _ = par;
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, dim),
        temp_mat_scratch::<T>(dim, dim),
    ])
}

/// How far a factor `F` has drifted from an old eigenbasis `Q`: computes
/// the lower triangle of `B = Q^T F Q` (the product `F Q`, then half of
/// `Q^T (F Q)`: `3 n^3` flops at matrix-product rate, against an
/// eigendecomposition's several times that), writes its diagonal, clamped
/// at zero, to `eigenvalues` (the eigenvalue estimates that keep `Q`), and
/// returns `‖B - diag(B)‖_F` (accumulated in f64, from the lower
/// triangle: `B` is symmetric).
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
/// [`Error::DimensionMismatch`](crate::Error::DimensionMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) for shapes,
/// [`Error::NonFinite`](crate::Error::NonFinite) for a NaN/Inf in `F` or
/// `Q`, [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall).
/// `eigenvalues` is untouched on error.
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
    let (mut p, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut p = p.as_mat_mut();
    let (mut b, _) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut b = b.as_mat_mut();
    let off = project(f, q, p.rb_mut(), b.rb_mut(), par);
    for (i, l) in eigenvalues.iter_mut().enumerate() {
        *l = b[(i, i)].max_val(T::ZERO);
    }
    Ok(off)
}

/// `P = F Q`, the lower triangle of `B = Q^T P`, and `‖offdiag(B)‖_F`.
fn project<T: Real>(
    f: MatRef<'_, T>,
    q: MatRef<'_, T>,
    mut p: MatMut<'_, T>,
    mut b: MatMut<'_, T>,
    par: Par,
) -> f64 {
    let n = f.nrows();
    matmul(p.rb_mut(), Accum::Replace, f, q, T::ONE, par);
    triangular::matmul(
        b.rb_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        q.transpose(),
        BlockStructure::Rectangular,
        p.rb(),
        BlockStructure::Rectangular,
        T::ONE,
        par,
    );
    let mut off = 0.0f64;
    for j in 0..n {
        for i in j + 1..n {
            let v = b[(i, j)].to_f64();
            off += v * v;
        }
    }
    (2.0 * off).sqrt_val()
}

/// What [`refresh_eigenbasis`] did with the old basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshKind {
    /// The drift was within the limit: the basis is kept as it was, with
    /// new eigenvalue estimates.
    Kept,
    /// The basis was refined by one step; its error bound is within the
    /// limit.
    Refined,
    /// Neither is within the limit: decompose the factor again. The basis
    /// and the eigenvalues are untouched.
    Stale,
}

/// The outcome of [`refresh_eigenbasis`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refresh {
    /// What was done.
    pub kind: RefreshKind,
    /// `‖offdiag(Q^T F Q)‖_F` of the old basis (see [`eigenbasis_drift`]).
    pub drift: f64,
    /// A bound of `‖F - Q diag(l) Q^T‖_F` for the basis and eigenvalues
    /// returned: the drift when [`Kept`](RefreshKind::Kept), the
    /// refinement's bound when [`Refined`](RefreshKind::Refined) or
    /// [`Stale`](RefreshKind::Stale) after an attempt, infinity when the
    /// attempt was given up early. First order in the rounding error of the
    /// working precision (see [`refresh_eigenbasis`]).
    pub bound: f64,
    /// A bound of the loss of orthogonality `‖Q'^T Q' - I‖_F` of the
    /// refined basis `Q'` (when [`Refined`](RefreshKind::Refined), or
    /// [`Stale`](RefreshKind::Stale) after an attempt; infinity when it
    /// was given up early); 0 when [`Kept`](RefreshKind::Kept) (the basis
    /// is untouched).
    pub orthogonality: f64,
}

/// Scratch needed by [`refresh_eigenbasis`] for a `dim x dim` factor.
pub fn refresh_eigenbasis_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    let _ = par;
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, dim),
        temp_mat_scratch::<T>(dim, dim),
        temp_mat_scratch::<f64>(dim, 2),
    ])
}

/// The thresholds tried for the largest `|E_ij|` of a pair the refinement
/// rotates (see [`refresh_eigenbasis`]): a pair needing a larger rotation
/// is left coupled (its coupling counts in the bound). The refinement
/// takes the threshold of the smallest bound: rotating many pairs of close
/// eigenvalues (the bulk of a factor's spectrum) by large angles makes
/// `‖E‖` and the bound grow faster than it removes coupling.
pub(super) const ROTATIONS: [f64; 4] = [0.25, 0.05, 0.01, 0.002];

/// Refreshes an old eigenbasis `Q` (`n x n`, orthogonal up to rounding) of
/// a factor `F` that changed since: keeps it, refines it in place, or
/// reports it stale, whichever is the cheapest whose error is within
/// `limit` (an absolute bound of the Frobenius norm of
/// `F - Q diag(l) Q^T` for the returned `Q` and `l`).
///
/// 1. **Keep** (`3 n^3` flops): as [`eigenbasis_drift`]; if the drift
///    `‖offdiag(B)‖_F` of `B = Q^T F Q` (plus the size of the negative
///    part of `diag(B)`, zero for a PSD `F`) is at most `limit`,
///    `eigenvalues` receives `diag(B)` (clamped at zero) and `Q` is
///    untouched.
/// 2. **Refine** (`3 n^3` more): one step of the iterative refinement of
///    Ogita and Aishima (Japan J. Indust. Appl. Math. 35, 2018):
///    `Q' = Q (I + E)` with `R = I - Q^T Q`, `d = diag(B)`, `D = diag(d)`,
///    `E_ii = r_ii / 2`, and for `i != j`
///    `E_ij = (b_ij + d_j r_ij) / (d_j - d_i)` where that pair's rotation
///    is at most a threshold `τ` in size (both ways), else `r_ij / 2`;
///    `τ` is the one of 1/4, 1/20, 1/100, 1/500 whose bound below is
///    smallest (within the orthogonality limit). This cancels
///    the off-diagonal of `B` to first order for the rotated pairs and
///    restores orthogonality to first order (`E + E^T = R`). Eigenvalue
///    estimates `l' = d_i (1 + r_ii)`. With `O` the off-diagonal of `B`,
///    `U` what stays of it on the pairs not rotated
///    (`b_ij + (d_i + d_j) r_ij / 2`), `ρ = max |r_ii|` and all norms
///    Frobenius, the refined basis loses orthogonality by at most
///    `r' = 2 ‖E‖‖R‖ + ‖E‖^2 (1 + ‖R‖)` (from
///    `Q'^T Q' = I - (E^T R + R E - E^T E + E^T R E)`), and its error is
///    at most
///    `[‖U‖ + 2 ‖E‖‖O‖ + Σ |d_i| E_ij^2 + ‖E‖^2 ‖O‖ + 2 (1 + ρ) (‖E‖‖RD‖ + ‖R‖‖ED‖ + ‖E‖‖ED‖ + ‖E‖‖R‖‖ED‖) + r'^2 (1 + ρ) ‖D‖] / (1 - r')`
///    (the first four terms bound `Q'^T F Q' - diag(l')`, the rest what
///    `Q'` not being orthogonal adds; weighting `E` by `D` keeps large
///    rotations among small eigenvalues from counting at the scale of the
///    largest). The refinement is applied only if that bound (plus the
///    size of the estimates' negative parts, clamped) is at most `limit`
///    and `r'` at most `orthogonality_limit`. (A preconditioner that uses
///    `Q'` as if orthogonal changes a damped inverse by about `r'`
///    relative, whatever the eigenvalues.)
/// 3. **Stale** otherwise: nothing is written. When the couplings no
///    rotation of size 1/4 removes already exceed `limit`, before the
///    refinement's `n^3` of work (`bound` and `orthogonality` are then
///    infinite).
///
/// The bound neglects the rounding of the working precision (about
/// `n eps ‖F‖`, the floor of any f32 decomposition too). Eigenvalues are
/// not sorted after a refinement. `F` is read in full (both triangles).
///
/// ```
/// use faer::{Mat, Par, dyn_stack::{MemBuffer, MemStack}};
/// use kfac_kernels::eigen::*;
/// // F = [[3, e], [e, 1]] in the old basis Q = I: drift sqrt(2) e.
/// let e = 1e-3;
/// let f = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { [3.0, 1.0][i] } else { e });
/// let mut q = Mat::<f64>::identity(2, 2);
/// let mut l = vec![0.0; 2];
/// let mut buf = MemBuffer::new(refresh_eigenbasis_scratch::<f64>(2, Par::Seq));
/// let r = refresh_eigenbasis(f.as_ref(), q.as_mut(), &mut l, 1e-4, 1e-3, Par::Seq,
///                            MemStack::new(&mut buf)).unwrap();
/// assert_eq!(r.kind, RefreshKind::Refined);
/// assert!(r.drift > 1e-3 && r.bound <= 1e-4 && r.orthogonality <= 1e-6);
/// // The refined first eigenvector leans toward e2 by e / (3 - 1).
/// assert!((q[(1, 0)] - e / 2.0).abs() < 1e-9);
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`](crate::Error::DimensionMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) for shapes,
/// [`Error::NonFinite`](crate::Error::NonFinite) for a NaN/Inf in `F` or
/// `Q`, [`Error::InvalidParameter`](crate::Error::InvalidParameter) for a
/// negative or NaN `limit` or `orthogonality_limit`,
/// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall). `Q` and
/// `eigenvalues` are untouched on error.
pub fn refresh_eigenbasis<T: Real>(
    f: MatRef<'_, T>,
    mut q: MatMut<'_, T>,
    eigenvalues: &mut [T],
    limit: f64,
    orthogonality_limit: f64,
    par: Par,
    stack: &mut MemStack,
) -> Result<Refresh> {
    let n = check::square("factor", f)?;
    check::shape("old eigenbasis", q.rb(), n, n)?;
    check::len("eigenvalues", eigenvalues.len(), n)?;
    if limit.is_nan() || limit < 0.0 {
        return Err(crate::Error::InvalidParameter {
            what: "limit",
            value: limit,
            expected: ">= 0",
        });
    }
    if orthogonality_limit.is_nan() || orthogonality_limit < 0.0 {
        return Err(crate::Error::InvalidParameter {
            what: "orthogonality_limit",
            value: orthogonality_limit,
            expected: ">= 0",
        });
    }
    check::finite("factor", f)?;
    check::finite("old eigenbasis", q.rb())?;
    check::stack(stack, refresh_eigenbasis_scratch::<T>(n, par))?;
    if n == 0 {
        return Ok(Refresh {
            kind: RefreshKind::Kept,
            drift: 0.0,
            bound: 0.0,
            orthogonality: 0.0,
        });
    }
    let (mut p, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut p = p.as_mat_mut();
    let (mut b, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut b = b.as_mat_mut();
    let (mut dr, _) = temp_mat_zeroed::<f64, _, _>(n, 2, stack);
    let mut dr = dr.as_mat_mut();

    let drift = project(f, q.rb(), p.rb_mut(), b.rb_mut(), par);
    // Clamping a negative diagonal entry (an indefinite `F`: rounding
    // noise of a PSD factor) adds its size to the error.
    let clamped = (0..n)
        .map(|i| {
            let v = b[(i, i)].to_f64().min(0.0);
            v * v
        })
        .sum::<f64>()
        .sqrt_val();
    // Products that overflowed (a factor near the type's range) keep
    // nothing, whatever the limit.
    let finite = drift.is_finite() && (0..n).all(|i| b[(i, i)].is_finite_val());
    if finite && drift + clamped <= limit {
        for (i, l) in eigenvalues.iter_mut().enumerate() {
            *l = b[(i, i)].max_val(T::ZERO);
        }
        return Ok(Refresh {
            kind: RefreshKind::Kept,
            drift,
            bound: drift + clamped,
            orthogonality: 0.0,
        });
    }

    // d = diag(B). A quick reject before computing R (`n^3`): the best
    // bound with R neglected (it is rounding-sized; its terms only add).
    for i in 0..n {
        dr[(i, 0)] = b[(i, i)].to_f64();
    }
    let (_, approx, approx_orth) = choose_rotation(b.rb(), dr.rb(), false, orthogonality_limit);
    if !finite || approx > limit || approx_orth > orthogonality_limit || approx.is_nan() {
        return Ok(Refresh {
            kind: RefreshKind::Stale,
            drift,
            bound: f64::INFINITY,
            orthogonality: f64::INFINITY,
        });
    }

    // Q^T Q: its diagonal in column 1, its strict upper triangle in B's
    // (B's own is the lower).
    for i in 0..n {
        let col = q.rb().col(i);
        let mut s = 0.0f64;
        for k in 0..n {
            let v = col[k].to_f64();
            s += v * v;
        }
        dr[(i, 1)] = s;
    }
    triangular::matmul(
        b.rb_mut(),
        BlockStructure::StrictTriangularUpper,
        Accum::Replace,
        q.rb().transpose(),
        BlockStructure::Rectangular,
        q.rb(),
        BlockStructure::Rectangular,
        T::ONE,
        par,
    );
    let (best, bound, orthogonality) = choose_rotation(b.rb(), dr.rb(), true, orthogonality_limit);
    let tau = ROTATIONS[best];
    for i in 0..n {
        p[(i, i)] = T::from_f64((1.0 - dr[(i, 1)]) / 2.0);
    }
    for j in 0..n {
        for i in j + 1..n {
            let (_, _, _, rij, eij, eji, size) = pair(b.rb(), dr.rb(), true, i, j);
            let (eij, eji) = if size <= tau {
                (eij, eji)
            } else {
                (rij / 2.0, rij / 2.0)
            };
            p[(i, j)] = T::from_f64(eij);
            p[(j, i)] = T::from_f64(eji);
        }
    }
    let clamped = (0..n)
        .map(|i| {
            let v = (dr[(i, 0)] * (2.0 - dr[(i, 1)])).min(0.0);
            v * v
        })
        .sum::<f64>()
        .sqrt_val();
    let bound = bound + clamped;
    // Non-finite terms (overflow) are not within any limit, not even an
    // infinite one.
    if !bound.is_finite()
        || bound > limit
        || !orthogonality.is_finite()
        || orthogonality > orthogonality_limit
    {
        return Ok(Refresh {
            kind: RefreshKind::Stale,
            drift,
            bound,
            orthogonality,
        });
    }
    // Q <- Q + Q E, through B (no longer needed).
    matmul(b.rb_mut(), Accum::Replace, q.rb(), p.rb(), T::ONE, par);
    for j in 0..n {
        for i in 0..n {
            q[(i, j)] += b[(i, j)];
        }
    }
    for (i, l) in eigenvalues.iter_mut().enumerate() {
        // d_i (1 + r_ii), r_ii = 1 - (Q^T Q)_ii.
        *l = T::from_f64(dr[(i, 0)] * (2.0 - dr[(i, 1)])).max_val(T::ZERO);
    }
    Ok(Refresh {
        kind: RefreshKind::Refined,
        drift,
        bound,
        orthogonality,
    })
}

/// `(d_i, d_j, b_ij, r_ij, E_ij, E_ji, rotation size)` of the pair
/// `i > j` from `B`'s lower triangle, `R`'s off-diagonal (minus `B`'s
/// strict upper triangle, `Q^T Q`) and `d` (column 0 of `dr`); `R` taken as
/// zero unless `with_r`. The size is NaN when `d_i = d_j` (never rotated).
#[inline]
fn pair<T: Real>(
    b: MatRef<'_, T>,
    dr: MatRef<'_, f64>,
    with_r: bool,
    i: usize,
    j: usize,
) -> (f64, f64, f64, f64, f64, f64, f64) {
    let (di, dj) = (dr[(i, 0)], dr[(j, 0)]);
    let bij = b[(i, j)].to_f64();
    let rij = if with_r { -b[(j, i)].to_f64() } else { 0.0 };
    let gap = dj - di;
    let (eij, eji) = ((bij + dj * rij) / gap, (bij + di * rij) / -gap);
    let size = eij.abs().max(eji.abs());
    (di, dj, bij, rij, eij, eji, size)
}

/// The rotation threshold of the refinement (an index into
/// [`ROTATIONS`]) with the smallest error bound among those whose loss of
/// orthogonality is within `orthogonality_limit` (else the smallest loss),
/// and that `(bound, loss)`, in one pass over the pairs for every
/// threshold. `R = I - Q^T Q` (diagonal: `1 - ` column 1 of `dr`) is taken
/// as zero unless `with_r`, which can only lower the figures.
fn choose_rotation<T: Real>(
    b: MatRef<'_, T>,
    dr: MatRef<'_, f64>,
    with_r: bool,
    orthogonality_limit: f64,
) -> (usize, f64, f64) {
    let n = b.nrows();
    let mut terms: [BoundTerms; ROTATIONS.len()] = Default::default();
    let mut common = BoundTerms::default();
    for i in 0..n {
        let di = dr[(i, 0)];
        let rii = if with_r { 1.0 - dr[(i, 1)] } else { 0.0 };
        common.add_e(rii / 2.0, di, di);
        common.r2 += rii * rii;
        common.rd2 += rii * rii * di * di;
        common.d2 += di * di;
        common.rho = common.rho.max(rii.abs());
    }
    for j in 0..n {
        for i in j + 1..n {
            let (di, dj, bij, rij, eij, eji, size) = pair(b, dr, with_r, i, j);
            common.r2 += 2.0 * rij * rij;
            common.rd2 += rij * rij * (di * di + dj * dj);
            common.o2 += 2.0 * bij * bij;
            add_pair(&mut terms, (di, dj, bij, rij, eij, eji, size));
        }
    }
    let (mut best, mut bound, mut orthogonality) = (0, f64::INFINITY, f64::INFINITY);
    for (k, t) in terms.iter().enumerate() {
        let (bnd, orth) = t.with(&common).bound();
        let fits = orth <= orthogonality_limit;
        let best_fits = orthogonality <= orthogonality_limit;
        // Within the orthogonality limit first, then the smaller bound (or,
        // while none is within it, the smaller loss).
        let better = match (fits, best_fits) {
            (true, false) => true,
            (true, true) => bnd < bound,
            (false, false) => orth < orthogonality,
            (false, true) => false,
        };
        if better {
            (best, bound, orthogonality) = (k, bnd, orth);
        }
    }
    (best, bound, orthogonality)
}

/// Adds the pair `(d_i, d_j, b_ij, r_ij, E_ij, E_ji, rotation size)` (as
/// [`pair`] returns it) to the bound terms of every rotation threshold:
/// rotated where its size is within the threshold, else left coupled.
pub(super) fn add_pair(
    terms: &mut [BoundTerms; ROTATIONS.len()],
    (di, dj, bij, rij, eij, eji, size): (f64, f64, f64, f64, f64, f64, f64),
) {
    for (t, &tau) in terms.iter_mut().zip(&ROTATIONS) {
        if size <= tau {
            t.add_e(eij, di, dj);
            t.add_e(eji, dj, di);
        } else {
            let u = bij + (di + dj) * rij / 2.0;
            t.u2 += 2.0 * u * u;
            t.add_e(rij / 2.0, di, dj);
            t.add_e(rij / 2.0, dj, di);
        }
    }
}

/// Sums of squares behind the refinement's error bound.
#[derive(Clone, Copy, Default)]
pub(super) struct BoundTerms {
    /// `‖U‖_F^2`: the off-diagonal left on pairs not rotated.
    pub(super) u2: f64,
    /// `‖E‖_F^2`.
    pub(super) e2: f64,
    /// `‖E D‖_F^2`.
    pub(super) ed2: f64,
    /// `sum_ij |d_i| E_ij^2 >= ‖E^T D E‖_F`.
    pub(super) de: f64,
    /// `‖R‖_F^2`.
    pub(super) r2: f64,
    /// `‖R D‖_F^2`.
    pub(super) rd2: f64,
    /// `‖O‖_F^2`: the off-diagonal of `B`.
    pub(super) o2: f64,
    /// `‖D‖_F^2`.
    pub(super) d2: f64,
    /// `max |r_ii|`.
    pub(super) rho: f64,
}

impl BoundTerms {
    /// The sums of `self` and `other` (`rho`: the larger).
    pub(super) fn with(&self, other: &BoundTerms) -> BoundTerms {
        BoundTerms {
            u2: self.u2 + other.u2,
            e2: self.e2 + other.e2,
            ed2: self.ed2 + other.ed2,
            de: self.de + other.de,
            r2: self.r2 + other.r2,
            rd2: self.rd2 + other.rd2,
            o2: self.o2 + other.o2,
            d2: self.d2 + other.d2,
            rho: self.rho.max(other.rho),
        }
    }

    /// Adds `E_ij = e` in row `i` (of `d_i = di`), column `j` (`dj`).
    pub(super) fn add_e(&mut self, e: f64, di: f64, dj: f64) {
        self.e2 += e * e;
        self.ed2 += e * e * dj * dj;
        self.de += di.abs() * e * e;
    }

    /// `(error bound, bound of ‖Q'^T Q' - I‖_F)` of the refined basis.
    pub(super) fn bound(&self) -> (f64, f64) {
        let (u, e, ed, r, rd, o, d) = (
            self.u2.sqrt_val(),
            self.e2.sqrt_val(),
            self.ed2.sqrt_val(),
            self.r2.sqrt_val(),
            self.rd2.sqrt_val(),
            self.o2.sqrt_val(),
            self.d2.sqrt_val(),
        );
        // R' = E^T R + R E - E^T E + E^T R E (as E + E^T = R).
        let rn = 2.0 * e * r + e * e * (1.0 + r);
        if rn >= 1.0 {
            return (f64::INFINITY, rn);
        }
        // ‖B' - Λ'‖_F: what stays unrotated, E^T O + O E, E^T B E.
        let off = u + 2.0 * e * o + self.de + e * e * o;
        // ‖R' Λ'‖_F <= (1 + rho) ‖R' D‖_F, and ‖R' Λ' R'‖.
        let rdn = e * rd + r * ed + e * ed + e * r * ed;
        let orth = 2.0 * (1.0 + self.rho) * rdn + rn * rn * (1.0 + self.rho) * d;
        ((off + orth) / (1.0 - rn), rn)
    }
}
