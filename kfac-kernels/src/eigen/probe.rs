//! The cheap tests of an old decomposition, `O(n^2)` against the `n^3`
//! of the exact ones in [`super::refresh`]: a randomized estimate of how
//! far the factor moved from it, and a sample of columns of
//! `Q^T F Q`. Re-exported from [`super`](crate::eigen).

use super::refresh::{add_pair, BoundTerms, ROTATIONS};
use crate::{check, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatRef, Par};

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

/// Scratch needed by [`eigenbasis_drift_sample`] for a `dim x dim`
/// factor and `columns` columns.
pub fn eigenbasis_drift_sample_scratch<T: Real>(dim: usize, columns: usize) -> StackReq {
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, columns),
        temp_mat_scratch::<T>(dim, columns),
        temp_mat_scratch::<T>(dim, columns),
    ])
}

/// What [`eigenbasis_drift_sample`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftSample {
    /// The off-diagonal mass of the sampled columns of `B = Q^T F Q`: a
    /// lower bound of the drift `‖offdiag(B)‖_F`.
    pub drift: f64,
    /// The part of it on entries `b_ik` (column `k` sampled) with
    /// `|b_ik| > |b_kk - l_i| / 4`, `l` the given estimates of `diag(B)`:
    /// couplings one refinement step of [`refresh_eigenbasis`](super::refresh_eigenbasis) would leave
    /// in place (its largest rotation is 1/4), to the extent the estimates
    /// are right, so a lower estimate of that step's error.
    pub coupled: f64,
    /// The error bound of [`refresh_eigenbasis`](super::refresh_eigenbasis)'s refinement (its
    /// smallest over the rotation thresholds) evaluated on the sampled
    /// entries alone (each pair of `B` once), with `R = 0` and the
    /// estimates for the unsampled diagonal: a lower estimate of the bound
    /// the refinement would reach.
    pub refine_bound: f64,
}

/// A lower bound of the drift `‖offdiag(Q^T F Q)‖_F` (see
/// [`eigenbasis_drift`](super::eigenbasis_drift)) and of what a refinement cannot remove, from a
/// few columns of `B = Q^T F Q` (`4 k n^2` flops for `k` columns, at
/// matrix-product rate). `eigenvalues` are estimates of `diag(B)` (the old
/// eigenvalues). Picking the columns of the largest old eigenvalues
/// catches most of the drift of a factor whose spectrum decays
/// (perturbations of a covariance scale with its eigenvalues), so a factor
/// that neither keeping nor refining can serve is recognized before the
/// `3 n^3` of the exact test.
///
/// ```
/// use faer::{Mat, Par, dyn_stack::{MemBuffer, MemStack}};
/// use kfac_kernels::eigen::*;
/// // B = F in the basis Q = I; column 0's off-diagonal is (0.5, 0.25);
/// // 0.5 > (4 - 3.5) / 4 is coupled, 0.25 < (4 - 1) / 4 is not.
/// let f = Mat::<f64>::from_fn(3, 3, |i, j| [[4.0, 0.5, 0.25], [0.5, 3.5, 0.1], [0.25, 0.1, 1.0]][i][j]);
/// let q = Mat::<f64>::identity(3, 3);
/// let mut buf = MemBuffer::new(eigenbasis_drift_sample_scratch::<f64>(3, 1));
/// let s = eigenbasis_drift_sample(f.as_ref(), q.as_ref(), &[4.0, 3.5, 1.0], &[0], Par::Seq,
///                                 MemStack::new(&mut buf)).unwrap();
/// assert!((s.drift - (0.5f64 * 0.5 + 0.25 * 0.25).sqrt()).abs() < 1e-15);
/// assert_eq!(s.coupled, 0.5);
/// assert!(s.refine_bound >= s.coupled);
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`](crate::Error::DimensionMismatch) /
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) for shapes,
/// [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) for a column
/// `>= n`, [`Error::InvalidParameter`](crate::Error::InvalidParameter) for
/// a column given twice (its mass would count twice),
/// [`Error::NonFinite`](crate::Error::NonFinite) for a NaN/Inf in `F`,
/// `Q` or the estimates,
/// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall).
pub fn eigenbasis_drift_sample<T: Real>(
    f: MatRef<'_, T>,
    q: MatRef<'_, T>,
    eigenvalues: &[T],
    columns: &[usize],
    par: Par,
    stack: &mut MemStack,
) -> Result<DriftSample> {
    let n = check::square("factor", f)?;
    check::shape("old eigenbasis", q, n, n)?;
    check::len("eigenvalue estimates", eigenvalues.len(), n)?;
    for (k, &c) in columns.iter().enumerate() {
        if c >= n {
            return Err(crate::Error::IndexOutOfRange {
                what: "columns",
                index: c,
                len: n,
            });
        }
        if columns[..k].contains(&c) {
            return Err(crate::Error::InvalidParameter {
                what: "columns (a repeated index)",
                value: c as f64,
                expected: "distinct indices",
            });
        }
    }
    check::finite("factor", f)?;
    check::finite("old eigenbasis", q)?;
    check::finite_slice("eigenvalue estimates", eigenvalues)?;
    let s = columns.len();
    check::stack(stack, eigenbasis_drift_sample_scratch::<T>(n, s))?;
    if n == 0 || s == 0 {
        return Ok(DriftSample {
            drift: 0.0,
            coupled: 0.0,
            refine_bound: 0.0,
        });
    }
    let (mut qs, stack) = temp_mat_zeroed::<T, _, _>(n, s, stack);
    let mut qs = qs.as_mat_mut();
    let (mut fq, stack) = temp_mat_zeroed::<T, _, _>(n, s, stack);
    let mut fq = fq.as_mat_mut();
    let (mut c, _) = temp_mat_zeroed::<T, _, _>(n, s, stack);
    let mut c = c.as_mat_mut();
    for (k, &col) in columns.iter().enumerate() {
        qs.rb_mut().col_mut(k).copy_from(q.col(col));
    }
    matmul(fq.rb_mut(), Accum::Replace, f, qs.rb(), T::ONE, par);
    matmul(
        c.rb_mut(),
        Accum::Replace,
        q.transpose(),
        fq.rb(),
        T::ONE,
        par,
    );
    let (mut off, mut coupled) = (0.0f64, 0.0f64);
    let mut terms: [BoundTerms; ROTATIONS.len()] = Default::default();
    let mut common = BoundTerms::default();
    for (k, &col) in columns.iter().enumerate() {
        let dk = c[(col, k)].to_f64();
        common.d2 += dk * dk;
        for i in 0..n {
            if i == col {
                continue;
            }
            let v = c[(i, k)].to_f64();
            off += v * v;
            let di = match columns.iter().position(|&x| x == i) {
                // A pair of two sampled columns: counted once.
                Some(ki) if ki < k => continue,
                Some(ki) => c[(i, ki)].to_f64(),
                None => eigenvalues[i].to_f64(),
            };
            if v.abs() * 4.0 > (dk - di).abs() {
                coupled += v * v;
            }
            // The refinement's terms for the pair (R = 0).
            common.o2 += 2.0 * v * v;
            let (eik, eki) = (v / (dk - di), v / (di - dk));
            let size = eik.abs().max(eki.abs());
            add_pair(&mut terms, (di, dk, v, 0.0, eik, eki, size));
        }
    }
    let refine_bound = terms
        .iter()
        .map(|t| t.with(&common).bound().0)
        .fold(f64::INFINITY, f64::min);
    Ok(DriftSample {
        drift: off.sqrt_val(),
        coupled: coupled.sqrt_val(),
        refine_bound,
    })
}
