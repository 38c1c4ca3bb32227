//! Refreshing an old eigenbasis `Q` of a factor `F` instead of decomposing
//! `F` again (the runtime's `Config::refresh_tolerance`), from the cheapest
//! test to the dearest repair. Re-exported from [`super`].
//!
//! | | work | what it gives |
//! |---|---|---|
//! | [`eigenbasis_change_estimate`] | `6 k n^2` (`k` probes) | an estimate of `‖F - Q diag(l) Q^T‖_F`: is the old decomposition still good as it is? |
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

/// Scratch needed by [`eigenbasis_change_estimate`] for a `dim x dim`
/// factor and `probes` probe vectors.
pub fn eigenbasis_change_estimate_scratch<T: Real>(dim: usize, probes: usize) -> StackReq {
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, probes),
        temp_mat_scratch::<T>(dim, probes),
        temp_mat_scratch::<T>(dim, probes),
    ])
}

/// A randomized estimate of `‖F - Q diag(l) Q^T‖_F`: how far the factor `F`
/// is from the decomposition `(Q, l)` kept from an earlier inversion.
///
/// With `k = probes` random sign vectors `w` (a fixed sequence drawn from
/// `seed`: the same inputs give the same bits), `M = F - Q diag(l) Q^T`
/// and `E[‖M w‖^2] = ‖M‖_F^2`; the result is `sqrt(mean ‖M w‖^2)`, in
/// `6 k n^2` flops at matrix-product rate instead of the `n^3` of any exact
/// test. Its relative standard deviation as an estimate of `‖M‖_F^2` is
/// at most `sqrt(2/k)`, worst when `M` has rank one; for a rank-one `M`
/// and `k = 32` the estimate falls below half of `‖M‖_F` with probability
/// below `1e-5`, and `‖M‖_F >= ‖M‖_2`, the norm that bounds how far the
/// eigenvalues of the damped factor moved (Weyl). So `2 * estimate <= x`
/// certifies `‖M‖_2 <= x` with that probability.
///
/// `F` is read in full (both triangles; it is symmetric).
///
/// ```
/// use faer::{Mat, Par, dyn_stack::{MemBuffer, MemStack}};
/// use kfac_kernels::eigen::*;
/// // F = diag(3, 1) against the decomposition Q = I, l = (3, 0.5): M = diag(0, 0.5).
/// let f = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { [3.0, 1.0][i] } else { 0.0 });
/// let q = Mat::<f64>::identity(2, 2);
/// let mut buf = MemBuffer::new(eigenbasis_change_estimate_scratch::<f64>(2, 8));
/// let e = eigenbasis_change_estimate(f.as_ref(), q.as_ref(), &[3.0, 0.5], 8, 1,
///                                    Par::Seq, MemStack::new(&mut buf)).unwrap();
/// // Sign probes measure a diagonal M exactly.
/// assert!((e - 0.5).abs() < 1e-15);
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`](crate::Error::DimensionMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) for shapes,
/// [`Error::InvalidParameter`](crate::Error::InvalidParameter) for
/// `probes == 0`, [`Error::NonFinite`](crate::Error::NonFinite) for a
/// NaN/Inf in `F`, `Q` or `l`,
/// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall).
#[allow(clippy::too_many_arguments)]
pub fn eigenbasis_change_estimate<T: Real>(
    f: MatRef<'_, T>,
    q: MatRef<'_, T>,
    eigenvalues: &[T],
    probes: usize,
    seed: u64,
    par: Par,
    stack: &mut MemStack,
) -> Result<f64> {
    let n = check::square("factor", f)?;
    check::shape("old eigenbasis", q, n, n)?;
    check::len("old eigenvalues", eigenvalues.len(), n)?;
    if probes == 0 {
        return Err(crate::Error::InvalidParameter {
            what: "probes",
            value: 0.0,
            expected: ">= 1",
        });
    }
    check::finite("factor", f)?;
    check::finite("old eigenbasis", q)?;
    check::finite_slice("old eigenvalues", eigenvalues)?;
    check::stack(stack, eigenbasis_change_estimate_scratch::<T>(n, probes))?;
    if n == 0 {
        return Ok(0.0);
    }
    let (mut w, stack) = temp_mat_zeroed::<T, _, _>(n, probes, stack);
    let mut w = w.as_mat_mut();
    let (mut y, stack) = temp_mat_zeroed::<T, _, _>(n, probes, stack);
    let mut y = y.as_mat_mut();
    let (mut z, _) = temp_mat_zeroed::<T, _, _>(n, probes, stack);
    let mut z = z.as_mat_mut();
    // Random signs from splitmix64, 64 entries per draw, column by column.
    let mut state = seed;
    let mut bits = 0u64;
    let mut left = 0u32;
    for j in 0..probes {
        for i in 0..n {
            if left == 0 {
                bits = splitmix64(&mut state);
                left = 64;
            }
            w[(i, j)] = if bits & 1 == 1 { T::ONE } else { -T::ONE };
            bits >>= 1;
            left -= 1;
        }
    }
    // y = F w - Q (l .* (Q^T w)).
    matmul(y.rb_mut(), Accum::Replace, f, w.rb(), T::ONE, par);
    matmul(
        z.rb_mut(),
        Accum::Replace,
        q.transpose(),
        w.rb(),
        T::ONE,
        par,
    );
    for j in 0..probes {
        for (i, &l) in eigenvalues.iter().enumerate() {
            z[(i, j)] *= l;
        }
    }
    matmul(y.rb_mut(), Accum::Add, q, z.rb(), -T::ONE, par);
    let mut ss = 0.0f64;
    for j in 0..probes {
        for i in 0..n {
            let v = y[(i, j)].to_f64();
            ss += v * v;
        }
    }
    Ok((ss / probes as f64).sqrt_val())
}

/// One draw of the splitmix64 generator (Steele, Lea and Flood 2014).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    /// [`Stale`](RefreshKind::Stale) after an attempt, infinity when no
    /// refinement was attempted. First order in the rounding error of the
    /// working precision (see [`refresh_eigenbasis`]).
    pub bound: f64,
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

/// Largest `|E_ij|` of a pair the refinement rotates (see
/// [`refresh_eigenbasis`]); pairs needing a larger rotation are left to a
/// full decomposition's accounting (their coupling counts in the bound).
const MAX_ROTATION: f64 = 0.25;

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
///    `Q <- Q (I + E)` with `R = I - Q^T Q` and, for `d = diag(B)`,
///    `E_ii = r_ii / 2`, and for `i != j`
///    `E_ij = (b_ij + d_j r_ij) / (d_j - d_i)` where that pair's rotation
///    is at most 1/4 in size (both ways), else `r_ij / 2`. This cancels
///    the off-diagonal of `B` to first order for the rotated pairs and
///    restores orthogonality to first order (`E + E^T = R`). Eigenvalue
///    estimates `d_i (1 + r_ii)`. A bound of the new error, from `B`, `R`
///    and `E` alone:
///    `‖U‖_F + 2 ‖E‖_F ‖O‖_F + ‖E‖_F^2 ‖B‖_F + 2 ‖R'‖ ‖B‖_F`, where `O` is
///    the off-diagonal of `B`, `U` what stays of it on the pairs not
///    rotated (`b_ij + (d_i + d_j) r_ij / 2`), and
///    `‖R'‖ <= 2 ‖E‖_F ‖R‖_F + ‖E‖_F^2 (1 + ‖R‖_F)` bounds the new basis's
///    loss of orthogonality (plus the size of the estimates' negative
///    parts, clamped). The refinement is applied only if that bound is at
///    most `limit`.
/// 3. **Stale** otherwise: nothing is written.
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
/// let r = refresh_eigenbasis(f.as_ref(), q.as_mut(), &mut l, 1e-4, Par::Seq,
///                            MemStack::new(&mut buf)).unwrap();
/// assert_eq!(r.kind, RefreshKind::Refined);
/// assert!(r.drift > 1e-3 && r.bound <= 1e-4);
/// // The refined first eigenvector leans toward e2 by e / (3 - 1).
/// assert!((q[(1, 0)] - e / 2.0).abs() < 1e-9);
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`](crate::Error::DimensionMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) for shapes,
/// [`Error::NonFinite`](crate::Error::NonFinite) for a NaN/Inf in `F` or
/// `Q`, [`Error::InvalidParameter`](crate::Error::InvalidParameter) for a
/// negative or NaN `limit`,
/// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall). `Q` and
/// `eigenvalues` are untouched on error.
pub fn refresh_eigenbasis<T: Real>(
    f: MatRef<'_, T>,
    mut q: MatMut<'_, T>,
    eigenvalues: &mut [T],
    limit: f64,
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
    check::finite("factor", f)?;
    check::finite("old eigenbasis", q.rb())?;
    check::stack(stack, refresh_eigenbasis_scratch::<T>(n, par))?;
    if n == 0 {
        return Ok(Refresh {
            kind: RefreshKind::Kept,
            drift: 0.0,
            bound: 0.0,
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
    if drift + clamped <= limit {
        for (i, l) in eigenvalues.iter_mut().enumerate() {
            *l = b[(i, i)].max_val(T::ZERO);
        }
        return Ok(Refresh {
            kind: RefreshKind::Kept,
            drift,
            bound: drift + clamped,
        });
    }

    // d = diag(B) (column 0), and Q^T Q: its diagonal in column 1, its
    // strict upper triangle in B's (B's own is the lower).
    for i in 0..n {
        dr[(i, 0)] = b[(i, i)].to_f64();
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
    // E into P (no longer needed), and the terms of the bound.
    let (mut u2, mut e2, mut r2, mut b2, mut o2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..n {
        let (di, rii) = (dr[(i, 0)], 1.0 - dr[(i, 1)]);
        let eii = rii / 2.0;
        p[(i, i)] = T::from_f64(eii);
        e2 += eii * eii;
        r2 += rii * rii;
        b2 += di * di;
    }
    for j in 0..n {
        let dj = dr[(j, 0)];
        for i in j + 1..n {
            let di = dr[(i, 0)];
            let bij = b[(i, j)].to_f64();
            let rij = -b[(j, i)].to_f64();
            let gap = dj - di;
            let (eij, eji) = ((bij + dj * rij) / gap, (bij + di * rij) / -gap);
            let rotate = gap != 0.0 && eij.abs() <= MAX_ROTATION && eji.abs() <= MAX_ROTATION;
            let (eij, eji) = if rotate {
                (eij, eji)
            } else {
                let u = bij + (di + dj) * rij / 2.0;
                u2 += 2.0 * u * u;
                (rij / 2.0, rij / 2.0)
            };
            p[(i, j)] = T::from_f64(eij);
            p[(j, i)] = T::from_f64(eji);
            e2 += eij * eij + eji * eji;
            r2 += 2.0 * rij * rij;
            b2 += 2.0 * bij * bij;
            o2 += 2.0 * bij * bij;
        }
    }
    let (u, e, r, bn, o) = (
        u2.sqrt_val(),
        e2.sqrt_val(),
        r2.sqrt_val(),
        b2.sqrt_val(),
        o2.sqrt_val(),
    );
    let r_new = 2.0 * e * r + e * e * (1.0 + r);
    let clamped = (0..n)
        .map(|i| {
            let v = (dr[(i, 0)] * (2.0 - dr[(i, 1)])).min(0.0);
            v * v
        })
        .sum::<f64>()
        .sqrt_val();
    let bound = u + 2.0 * e * o + e * e * bn + 2.0 * r_new * bn + clamped;
    // NaN (overflowing terms) is not within any limit.
    if bound.is_nan() || bound > limit {
        return Ok(Refresh {
            kind: RefreshKind::Stale,
            drift,
            bound,
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
    })
}
