//! Damped Cholesky inversion with factored Tikhonov damping
//! (Martens & Grosse 2015, sec. 6.3) and the inverse-method preconditioner
//! `V = G_d^{-1} grad A_d^{-1}`.
//!
//! With `pi = sqrt((tr A / dim A) / (tr G / dim G))` the damped factors are
//! `A_d = A + pi sqrt(damping) I` and `G_d = G + sqrt(damping)/pi I`, so that
//! `A_d ⊗ G_d ≈ A ⊗ G + damping I` with the damping split in proportion to
//! the factors' scales.
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::inverse::*;
//! let a = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { 4.0 } else { 0.0 });
//! let g = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { 1.0 } else { 0.0 });
//! let d = factored_damping(a.as_ref(), g.as_ref(), 0.01).unwrap();
//! assert!((d.pi - 2.0).abs() < 1e-15);
//! let mut a_inv = Mat::<f64>::zeros(2, 2);
//! let mut buf = MemBuffer::new(damped_inverse_scratch::<f64>(2, Par::Seq));
//! damped_inverse(a_inv.as_mut(), a.as_ref(), d.a, Par::Seq, MemStack::new(&mut buf)).unwrap();
//! assert!((a_inv[(0, 0)] - 1.0 / 4.2).abs() < 1e-15);
//! ```

use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::matmul;
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

/// Factored Tikhonov damping of one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FactoredDamping<T> {
    /// `pi = sqrt((tr A / dim A) / (tr G / dim G))` (1 when a trace is 0).
    pub pi: T,
    /// Added to the diagonal of `A`: `pi * sqrt(damping)`.
    pub a: T,
    /// Added to the diagonal of `G`: `sqrt(damping) / pi`.
    pub g: T,
}

fn mean_trace<T: Real>(what: &'static str, m: MatRef<'_, T>) -> Result<T> {
    let n = check::square(what, m)?;
    let mut t = T::ZERO;
    for i in 0..n {
        t += m[(i, i)];
    }
    if !t.is_finite_val() {
        return Err(Error::NonFinite {
            what,
            row: 0,
            col: 0,
        });
    }
    Ok(if n == 0 {
        T::ZERO
    } else {
        t / T::from_usize(n)
    })
}

/// `pi = sqrt((tr A / dim A) / (tr G / dim G))`. When either mean trace is not
/// positive (an all-zero factor, e.g. a dead layer) `pi = 1`.
///
/// # Errors
/// [`Error::DimensionMismatch`] for non-square factors, [`Error::NonFinite`]
/// for a non-finite trace.
pub fn tikhonov_pi<T: Real>(a: MatRef<'_, T>, g: MatRef<'_, T>) -> Result<T> {
    let ta = mean_trace("factor A", a)?;
    let tg = mean_trace("factor G", g)?;
    if ta <= T::ZERO || tg <= T::ZERO {
        return Ok(T::ONE);
    }
    let pi = (ta / tg).sqrt_val();
    Ok(if pi.is_finite_val() && pi > T::ZERO {
        pi
    } else {
        T::ONE
    })
}

/// The factored damping of a layer: [`tikhonov_pi`] and the two diagonal
/// shifts.
///
/// # Errors
/// As [`tikhonov_pi`], plus `damping` not finite and `> 0`.
pub fn factored_damping<T: Real>(
    a: MatRef<'_, T>,
    g: MatRef<'_, T>,
    damping: T,
) -> Result<FactoredDamping<T>> {
    check::positive_param("damping", damping)?;
    let pi = tikhonov_pi(a, g)?;
    let sd = damping.sqrt_val();
    Ok(FactoredDamping {
        pi,
        a: pi * sd,
        g: sd / pi,
    })
}

/// Scratch needed by [`damped_inverse`] for a `dim x dim` factor.
pub fn damped_inverse_scratch<T: Real>(dim: usize, par: Par) -> StackReq {
    StackReq::all_of(&[
        temp_mat_scratch::<T>(dim, dim),
        temp_mat_scratch::<T>(dim, dim),
        llt::factor::cholesky_in_place_scratch::<T>(dim, par, Default::default())
            .or(llt::inverse::inverse_scratch::<T>(dim, par)),
    ])
}

/// `out <- (A + shift I)^{-1}` by Cholesky, reading only the lower triangle of
/// `A` and writing the full symmetric inverse.
///
/// # Errors
/// [`Error::DimensionMismatch`], [`Error::NonFinite`] (input, or an inverse
/// that overflows), [`Error::InvalidParameter`] for a negative or non-finite
/// `shift`, [`Error::NotPositiveDefinite`] when `A + shift I` has a
/// non-positive pivot, [`Error::ScratchTooSmall`]. `out` is untouched on error.
pub fn damped_inverse<T: Real>(
    mut out: MatMut<'_, T>,
    a: MatRef<'_, T>,
    shift: T,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let n = check::square("factor", a)?;
    check::shape_mut("inverse", &out, n, n)?;
    check::nonneg_param("damping shift", shift)?;
    check::finite_lower("factor", a)?;
    check::stack(stack, damped_inverse_scratch::<T>(n, par))?;
    if n == 0 {
        return Ok(());
    }
    let (mut l, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut l = l.as_mat_mut();
    let (mut inv, stack) = temp_mat_zeroed::<T, _, _>(n, n, stack);
    let mut inv = inv.as_mat_mut();
    for j in 0..n {
        for i in j..n {
            l[(i, j)] = a[(i, j)];
        }
        l[(j, j)] += shift;
    }
    llt::factor::cholesky_in_place(
        l.rb_mut(),
        Default::default(),
        par,
        stack,
        Default::default(),
    )
    .map_err(|e| match e {
        llt::factor::LltError::NonPositivePivot { index } => Error::NotPositiveDefinite {
            what: "damped factor",
            pivot: index,
            dim: n,
        },
    })?;
    llt::inverse::inverse(inv.rb_mut(), l.rb(), par, stack);
    check::finite_lower("inverse (overflow)", inv.rb())?;
    for j in 0..n {
        for i in j..n {
            let v = inv[(i, j)];
            out[(i, j)] = v;
            out[(j, i)] = v;
        }
    }
    Ok(())
}

/// Scratch needed by [`precondition_inverse`].
pub fn precondition_inverse_scratch<T: Real>(d_out: usize, d_in: usize, par: Par) -> StackReq {
    let _ = par;
    temp_mat_scratch::<T>(d_out, d_in)
}

/// Inverse-method preconditioning in place: `grad <- G_inv grad A_inv`, with
/// the full symmetric damped inverses from [`damped_inverse`].
///
/// # Errors
/// Shape mismatches, [`Error::NonFinite`] inputs, [`Error::ScratchTooSmall`].
/// `grad` is untouched on error.
pub fn precondition_inverse<T: Real>(
    mut grad: MatMut<'_, T>,
    g_inv: MatRef<'_, T>,
    a_inv: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    check::shape("G inverse", g_inv, d_out, d_out)?;
    check::shape("A inverse", a_inv, d_in, d_in)?;
    check::finite("gradient", grad.rb())?;
    check::finite("G inverse", g_inv)?;
    check::finite("A inverse", a_inv)?;
    check::stack(stack, precondition_inverse_scratch::<T>(d_out, d_in, par))?;
    if d_out == 0 || d_in == 0 {
        return Ok(());
    }
    let (mut t, _) = temp_mat_zeroed::<T, _, _>(d_out, d_in, stack);
    let mut t = t.as_mat_mut();
    matmul(t.rb_mut(), Accum::Replace, g_inv, grad.rb(), T::ONE, par);
    matmul(grad.rb_mut(), Accum::Replace, t.rb(), a_inv, T::ONE, par);
    Ok(())
}

/// [`factored_damping`] for a layer whose `A` factor is diagonal (an
/// embedding layer), given as its diagonal `a_diag`.
///
/// The mean traces are summed and divided in `f64`
/// (`tr A / dim A = (Σ_i a_diag[i]) / max(len, 1)`, and the same over the
/// diagonal of `G`), each rounded to `T` once, and `pi` is then computed
/// from them exactly as [`factored_damping`] does for two `1 x 1` factors.
/// For `T = f32` this is bitwise the runtime's historical construction; for
/// `T = f64` the rounding steps are exact.
///
/// ```
/// use faer::Mat;
/// use kfac_kernels::inverse::factored_damping_diag_a;
/// let g = Mat::<f32>::identity(3, 3);
/// let d = factored_damping_diag_a(&[2.0, 6.0], g.as_ref(), 0.01).unwrap();
/// assert_eq!(d.pi, 2.0); // sqrt((8 / 2) / (3 / 3))
/// assert_eq!((d.a, d.g), (0.2, 0.05));
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`] if `g` is not square,
/// [`Error::InvalidParameter`] for `damping` not finite and `> 0`,
/// [`Error::NonFinite`] (`"factor A"` / `"factor G"`) if a mean trace is not
/// finite in `T`.
pub fn factored_damping_diag_a<T: Real>(
    a_diag: &[T],
    g: MatRef<'_, T>,
    damping: T,
) -> Result<FactoredDamping<T>> {
    let n = check::square("factor G", g)?;
    let ta = a_diag.iter().map(|&v| v.to_f64()).sum::<f64>() / a_diag.len().max(1) as f64;
    let tg = (0..n).map(|i| g[(i, i)].to_f64()).sum::<f64>() / n.max(1) as f64;
    let ta = [T::from_f64(ta)];
    let tg = [T::from_f64(tg)];
    factored_damping(
        MatRef::from_column_major_slice(&ta, 1, 1),
        MatRef::from_column_major_slice(&tg, 1, 1),
        damping,
    )
}

/// Damped inverse of a diagonal factor `D` (stored as its diagonal):
/// `out[i] = 1 / (d[i] + shift)`.
///
/// ```
/// let mut out = [0.0f32; 2];
/// kfac_kernels::inverse::damped_inverse_diag(&mut out, &[1.5, 3.5], 0.5).unwrap();
/// assert_eq!(out, [0.5, 0.25]);
/// ```
///
/// # Errors
/// [`Error::LengthMismatch`] unless `out.len() == d.len()`,
/// [`Error::InvalidParameter`] for a negative or non-finite `shift`,
/// [`Error::NotPositiveDefinite`] (`pivot` = the first index) when
/// `d[i] + shift` is NaN or `<= 0`, [`Error::NonFinite`] when it is `+Inf`.
/// `out` is untouched on error.
pub fn damped_inverse_diag<T: Real>(out: &mut [T], d: &[T], shift: T) -> Result<()> {
    check::len("inverse diagonal", out.len(), d.len())?;
    check::nonneg_param("damping shift", shift)?;
    for (i, &v) in d.iter().enumerate() {
        let s = v + shift;
        // NaN or <= 0 (the runtime's test).
        if s.partial_cmp(&T::ZERO) != Some(core::cmp::Ordering::Greater) {
            return Err(Error::NotPositiveDefinite {
                what: "damped diagonal factor",
                pivot: i,
                dim: d.len(),
            });
        }
        if !s.is_finite_val() {
            return Err(Error::NonFinite {
                what: "damped diagonal factor",
                row: i,
                col: 0,
            });
        }
    }
    for (o, &v) in out.iter_mut().zip(d) {
        *o = T::ONE / (v + shift);
    }
    Ok(())
}

/// Scratch needed by [`precondition_inverse_diag_a`].
pub fn precondition_inverse_diag_a_scratch<T: Real>(
    d_out: usize,
    d_in: usize,
    par: Par,
) -> StackReq {
    let _ = par;
    temp_mat_scratch::<T>(d_out, d_in)
}

/// Inverse-method preconditioning in place for a layer whose `A` factor is
/// diagonal (an embedding layer):
///
/// `grad <- G_inv grad diag(a_inv)`, i.e. `grad[i, j] = (G_inv grad)[i, j] * a_inv[j]`
///
/// with `G_inv` the full symmetric damped inverse from [`damped_inverse`]
/// and `a_inv` the damped inverse diagonal from [`damped_inverse_diag`].
/// Evaluated as one faer matmul, then the column scaling.
///
/// * `grad`: `d_out x d_in`, any strides; `g_inv`: `d_out x d_out`;
///   `a_inv`: length `d_in`.
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::inverse::*;
/// let g_inv = Mat::<f64>::from_fn(1, 1, |_, _| 0.5);
/// let mut grad = Mat::<f64>::from_fn(1, 2, |_, _| 4.0);
/// let mut buf = MemBuffer::new(precondition_inverse_diag_a_scratch::<f64>(1, 2, Par::Seq));
/// precondition_inverse_diag_a(grad.as_mut(), g_inv.as_ref(), &[1.0, 0.25], Par::Seq,
///                             MemStack::new(&mut buf)).unwrap();
/// assert_eq!((grad[(0, 0)], grad[(0, 1)]), (2.0, 0.5));
/// ```
///
/// # Errors
/// Shape and length mismatches, [`Error::NonFinite`] inputs,
/// [`Error::ScratchTooSmall`]. `grad` is untouched on error.
pub fn precondition_inverse_diag_a<T: Real>(
    mut grad: MatMut<'_, T>,
    g_inv: MatRef<'_, T>,
    a_inv: &[T],
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    check::shape("G inverse", g_inv, d_out, d_out)?;
    check::len("A inverse diagonal", a_inv.len(), d_in)?;
    check::finite("gradient", grad.rb())?;
    check::finite("G inverse", g_inv)?;
    check::finite_slice("A inverse diagonal", a_inv)?;
    check::stack(
        stack,
        precondition_inverse_diag_a_scratch::<T>(d_out, d_in, par),
    )?;
    if d_out == 0 || d_in == 0 {
        return Ok(());
    }
    let (mut t, _) = temp_mat_zeroed::<T, _, _>(d_out, d_in, stack);
    let mut t = t.as_mat_mut();
    matmul(t.rb_mut(), Accum::Replace, g_inv, grad.rb(), T::ONE, par);
    for (j, &s) in a_inv.iter().enumerate() {
        let tc = t.rb().col(j);
        let mut gc = grad.rb_mut().col_mut(j);
        for i in 0..d_out {
            gc[i] = tc[i] * s;
        }
    }
    Ok(())
}
