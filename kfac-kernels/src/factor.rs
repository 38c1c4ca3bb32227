//! Kronecker factor updates: the blocked symmetric rank-k update with the bias
//! folded in, the running average, the lazily-scaled running average, and
//! mirroring one triangle to a full matrix.
//!
//! Only the **lower** triangle (diagonal included) of a factor is computed and
//! read; [`mirror_lower`] fills the upper one when a full matrix is needed.
//!
//! With `bias = true` the factor has dimension `d + 1` and stands for
//! `[X 1]^T [X 1]`: the homogeneous column of ones is appended **last** and is
//! never materialized. Its row is `1^T X` (column sums, one matrix-vector
//! product) and its corner is `n`.
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::factor::{syrk_update, syrk_update_scratch, mirror_lower};
//!
//! let x = Mat::<f64>::from_fn(4, 2, |i, j| (i + 2 * j) as f64);
//! let mut c = Mat::<f64>::zeros(3, 3);
//! let mut buf = MemBuffer::new(syrk_update_scratch::<f64>(4, 2, true, Par::Seq));
//! // C <- 0*C + 0.25 * [X 1]^T [X 1]
//! syrk_update(c.as_mut(), 0.0, 0.25, x.as_ref(), true, Par::Seq,
//!             MemStack::new(&mut buf)).unwrap();
//! mirror_lower(c.as_mut()).unwrap();
//! // corner: n / n = 1; bias row: column means of X
//! assert_eq!(c[(2, 2)], 1.0);
//! assert_eq!(c[(2, 0)], 1.5);
//! assert_eq!(c[(0, 2)], 1.5);
//! ```

use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::{temp_mat_scratch, temp_mat_zeroed};
use faer::mat::AsMatMut;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

/// Dimension of the factor of a layer with `d` inputs: `d + 1` with a bias.
///
/// ```
/// assert_eq!(kfac_kernels::factor::factor_dim(10, true), 11);
/// ```
#[inline]
pub const fn factor_dim(d: usize, bias: bool) -> usize {
    d + bias as usize
}

/// Scratch needed by [`syrk_update`] for `n` rows of `d` columns.
///
/// Only the bias row needs scratch (a vector of `n` ones for the column sums
/// as one matrix-vector product, which streams `X` once in its own layout).
pub fn syrk_update_scratch<T: Real>(n: usize, d: usize, bias: bool, par: Par) -> StackReq {
    let _ = (d, par);
    if bias {
        temp_mat_scratch::<T>(n, 1)
    } else {
        StackReq::EMPTY
    }
}

/// Multiplies the lower triangle (diagonal included) of `c` by `alpha`.
pub(crate) fn scale_lower<T: Real>(mut c: MatMut<'_, T>, alpha: T) {
    let n = c.nrows();
    for j in 0..n {
        let mut col = c.rb_mut().get_mut(j.., j);
        if let Some(s) = col.rb_mut().try_as_col_major_mut() {
            for v in s.as_slice_mut() {
                *v *= alpha;
            }
        } else {
            for i in 0..col.nrows() {
                col[i] *= alpha;
            }
        }
    }
}

/// Symmetric rank-k update of one triangle:
/// `C <- alpha * C + beta * [X 1]^T [X 1]` (or `alpha*C + beta*X^T X` without
/// bias), lower triangle only.
///
/// * `c`: `(d + bias) x (d + bias)`, any strides; only the lower triangle is
///   read (when `alpha != 0`) and written.
/// * `x`: `n x d`, one row per sample, any strides (row-major data from C is
///   used in place).
/// * `alpha == 0` does not read `c` (NaN in the old contents is overwritten);
///   `alpha == 1` accumulates without a scaling pass.
///
/// Flops: `n * d * (d + 1)` multiply-adds for the triangle, plus `n * d` for the
/// bias row.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `c` is not `(d + bias)` square,
/// [`Error::InvalidParameter`] for non-finite `alpha`/`beta`,
/// [`Error::NonFinite`] if `x` holds a NaN/Inf, [`Error::ScratchTooSmall`]
/// if `stack` is smaller than [`syrk_update_scratch`]. `c` is untouched on
/// error.
pub fn syrk_update<T: Real>(
    c: MatMut<'_, T>,
    alpha: T,
    beta: T,
    x: MatRef<'_, T>,
    bias: bool,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (n, d) = (x.nrows(), x.ncols());
    let dim = factor_dim(d, bias);
    check::shape_mut("factor C", &c, dim, dim)?;
    check::finite_param("alpha", alpha)?;
    check::finite_param("beta", beta)?;
    check::finite("activations X", x)?;
    check::stack(stack, syrk_update_scratch::<T>(n, d, bias, par))?;
    syrk_update_unchecked(c, alpha, beta, x, bias, par, stack);
    Ok(())
}

/// [`syrk_update`] after validation.
pub(crate) fn syrk_update_unchecked<T: Real>(
    mut c: MatMut<'_, T>,
    alpha: T,
    beta: T,
    x: MatRef<'_, T>,
    bias: bool,
    par: Par,
    stack: &mut MemStack,
) {
    let (n, d) = (x.nrows(), x.ncols());
    let accum = if alpha == T::ZERO {
        Accum::Replace
    } else {
        if alpha != T::ONE {
            scale_lower(c.rb_mut(), alpha);
        }
        Accum::Add
    };
    if d > 0 {
        let main = c.rb_mut().submatrix_mut(0, 0, d, d);
        if n == 0 {
            if accum == Accum::Replace {
                zero_lower(main);
            }
        } else {
            triangular::matmul(
                main,
                BlockStructure::TriangularLower,
                accum,
                x.transpose(),
                BlockStructure::Rectangular,
                x,
                BlockStructure::Rectangular,
                beta,
                par,
            );
        }
    }
    if bias {
        let corner = T::from_usize(n) * beta;
        if accum == Accum::Replace {
            c[(d, d)] = corner;
        } else {
            c[(d, d)] += corner;
        }
        if d > 0 {
            let mut row = c.rb_mut().submatrix_mut(d, 0, 1, d);
            if n == 0 {
                if accum == Accum::Replace {
                    row.fill(T::ZERO);
                }
            } else {
                let (mut ones, _) = temp_mat_zeroed::<T, _, _>(n, 1, stack);
                let mut ones = ones.as_mat_mut();
                ones.fill(T::ONE);
                faer::linalg::matmul::matmul(row, accum, ones.rb().transpose(), x, beta, par);
            }
        }
    }
}

fn zero_lower<T: Real>(mut c: MatMut<'_, T>) {
    for j in 0..c.ncols() {
        for i in j..c.nrows() {
            c[(i, j)] = T::ZERO;
        }
    }
}

/// Running average of a factor (Martens & Grosse 2015, sec. 5):
/// `C <- xi * C + (1 - xi) * [X 1]^T [X 1] / n`, lower triangle only.
///
/// `xi = 0` replaces `C` by the batch statistic (the first update);
/// the caller computes `xi_k = min(1 - 1/k, xi)` (see the crate docs).
///
/// # Errors
/// As [`syrk_update`], plus [`Error::InvalidParameter`] when `xi` is not in
/// `[0, 1]` or `n == 0` (a mean over no samples).
pub fn running_average<T: Real>(
    c: MatMut<'_, T>,
    xi: T,
    x: MatRef<'_, T>,
    bias: bool,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check_decay(xi)?;
    let n = x.nrows();
    if n == 0 {
        return Err(Error::InvalidParameter {
            what: "batch size n",
            value: 0.0,
            expected: "at least one sample",
        });
    }
    syrk_update(c, xi, (T::ONE - xi) / T::from_usize(n), x, bias, par, stack)
}

fn check_decay<T: Real>(xi: T) -> Result<()> {
    if !(xi.is_finite_val() && xi >= T::ZERO && xi <= T::ONE) {
        return Err(Error::InvalidParameter {
            what: "decay xi",
            value: xi.to_f64(),
            expected: "a value in [0, 1]",
        });
    }
    Ok(())
}

/// A factor stored as `scale * C` so that the running average's
/// `xi * F` costs one scalar multiply instead of a pass over memory.
///
/// faer's accumulating matmul has no output scale, so
/// `F <- xi F + (1 - xi) B` would otherwise be a scaling pass plus an
/// accumulating SYRK (14-39% extra time for large factors). Stored lazily,
/// `s' = xi s` and `C <- C + ((1 - xi) / s') B`: a single accumulating SYRK.
/// When `s` falls below [`LAZY_RESCALE_THRESHOLD`] the scale is folded back
/// into `C` (one pass, every few hundred updates) to keep `C` in range.
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::factor::{running_average_lazy, materialize_lazy, syrk_update_scratch};
/// let x = Mat::<f64>::from_fn(3, 2, |i, j| (i * j) as f64 + 1.0);
/// let mut c = Mat::<f64>::zeros(2, 2);
/// let mut s = 1.0;
/// let mut buf = MemBuffer::new(syrk_update_scratch::<f64>(3, 2, false, Par::Seq));
/// running_average_lazy(c.as_mut(), &mut s, 0.0, x.as_ref(), false, Par::Seq, MemStack::new(&mut buf)).unwrap();
/// running_average_lazy(c.as_mut(), &mut s, 0.5, x.as_ref(), false, Par::Seq, MemStack::new(&mut buf)).unwrap();
/// materialize_lazy(c.as_mut(), &mut s).unwrap();
/// assert_eq!(s, 1.0);
/// assert!((c[(1, 1)] - (4.0 + 9.0 + 1.0) / 3.0).abs() < 1e-12);
/// ```
pub const LAZY_RESCALE_THRESHOLD: f64 = 1e-6;

/// Lazily-scaled running average: the factor is `F = scale * C`; performs
/// `F <- xi F + (1 - xi) [X 1]^T [X 1] / n` by updating `scale` and adding
/// into `C` (lower triangle) with one SYRK. See [`LAZY_RESCALE_THRESHOLD`].
///
/// `xi = 0` replaces: `C` becomes the batch statistic and `scale = 1`.
///
/// # Errors
/// As [`running_average`], plus [`Error::InvalidParameter`] if `scale` is
/// not finite and positive. `c` and `scale` are untouched on error.
pub fn running_average_lazy<T: Real>(
    mut c: MatMut<'_, T>,
    scale: &mut T,
    xi: T,
    x: MatRef<'_, T>,
    bias: bool,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    check_decay(xi)?;
    check::positive_param("lazy scale", *scale)?;
    let (n, d) = (x.nrows(), x.ncols());
    if n == 0 {
        return Err(Error::InvalidParameter {
            what: "batch size n",
            value: 0.0,
            expected: "at least one sample",
        });
    }
    let dim = factor_dim(d, bias);
    check::shape_mut("factor C", &c, dim, dim)?;
    check::finite("activations X", x)?;
    check::stack(stack, syrk_update_scratch::<T>(n, d, bias, par))?;
    let nf = T::from_usize(n);
    if xi == T::ZERO {
        syrk_update_unchecked(c, T::ZERO, T::ONE / nf, x, bias, par, stack);
        *scale = T::ONE;
        return Ok(());
    }
    let mut s = xi * *scale;
    let mut alpha = T::ONE;
    if s.to_f64() < LAZY_RESCALE_THRESHOLD {
        // Fold the scale into C in the same pass as the update.
        alpha = s;
        s = T::ONE;
    }
    let beta = (T::ONE - xi) / (nf * s);
    if !beta.is_finite_val() {
        return Err(Error::InvalidParameter {
            what: "lazy scale",
            value: scale.to_f64(),
            expected: "a scale for which (1 - xi) / (n * xi * scale) is finite",
        });
    }
    syrk_update_unchecked(c.rb_mut(), alpha, beta, x, bias, par, stack);
    *scale = s;
    Ok(())
}

/// Folds a lazy scale into the stored triangle: `C <- scale * C`, `scale <- 1`.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `c` is not square, [`Error::InvalidParameter`]
/// if `scale` is not finite and positive.
pub fn materialize_lazy<T: Real>(c: MatMut<'_, T>, scale: &mut T) -> Result<()> {
    check::square("factor C", c.rb())?;
    check::positive_param("lazy scale", *scale)?;
    if *scale != T::ONE {
        scale_lower(c, *scale);
        *scale = T::ONE;
    }
    Ok(())
}

/// Block edge for [`mirror_lower`]'s cache-blocked transpose.
const MIRROR_BLOCK: usize = 64;

/// Copies the strict lower triangle onto the upper one, making `c` a full
/// symmetric matrix (`c[j, i] = c[i, j]` for `i > j`). Cache-blocked.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `c` is not square.
pub fn mirror_lower<T: Real>(mut c: MatMut<'_, T>) -> Result<()> {
    let n = check::square("matrix", c.rb())?;
    let mut jb = 0;
    while jb < n {
        let je = (jb + MIRROR_BLOCK).min(n);
        let mut ib = jb;
        while ib < n {
            let ie = (ib + MIRROR_BLOCK).min(n);
            for j in jb..je {
                for i in ib.max(j + 1)..ie {
                    let v = c[(i, j)];
                    c[(j, i)] = v;
                }
            }
            ib = ie;
        }
        jb = je;
    }
    Ok(())
}
