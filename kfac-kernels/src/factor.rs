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
/// Two parts, never needed at once: on CPUs with AVX-512 (and the `std`
/// feature), the product's packing buffers, one per thread of `par`, each
/// `min(n, 256) x d` values rounded up to a register width (the product
/// runs on fewer threads if given less); with a bias, a vector of `n` ones
/// (the column sums as one matrix-vector product, which streams `X` once in
/// its own layout).
pub fn syrk_update_scratch<T: Real>(n: usize, d: usize, bias: bool, par: Par) -> StackReq {
    let ones = if bias {
        temp_mat_scratch::<T>(n, 1)
    } else {
        StackReq::EMPTY
    };
    StackReq::any_of(&[ones, crate::syrk::scratch::<T>(n, d, par)])
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
/// The product runs on our own AVX-512 register kernels where the CPU has
/// them (1.0-1.1x OpenBLAS `ssyrk`'s rate, BENCHMARKS.md) and on faer's
/// triangular product otherwise (or for a `c` without a unit stride).
/// With the register kernels the result is bitwise the same for every
/// `par`.
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

/// [`syrk_update`] on samples already proven finite by
/// [`check::finite_matrix`]: the same result, bit for bit, without the second
/// NaN/Inf scan of `x`.
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::{check, factor};
/// let x = Mat::<f32>::from_fn(4, 2, |i, j| (i + j) as f32);
/// let x = check::finite_matrix("activations", x.as_ref()).unwrap();
/// let mut c = Mat::<f32>::zeros(2, 2);
/// let mut buf = MemBuffer::new(factor::syrk_update_scratch::<f32>(4, 2, false, Par::Seq));
/// factor::syrk_update_prechecked(c.as_mut(), 0.0, 1.0, x, false, Par::Seq,
///                                MemStack::new(&mut buf)).unwrap();
/// assert_eq!(c[(1, 0)], 0.0 * 1.0 + 1.0 * 2.0 + 2.0 * 3.0 + 3.0 * 4.0);
/// ```
///
/// # Errors
/// As [`syrk_update`], except [`Error::NonFinite`].
pub fn syrk_update_prechecked<T: Real>(
    c: MatMut<'_, T>,
    alpha: T,
    beta: T,
    x: check::FiniteMat<'_, T>,
    bias: bool,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let x = x.get();
    let (n, d) = (x.nrows(), x.ncols());
    let dim = factor_dim(d, bias);
    check::shape_mut("factor C", &c, dim, dim)?;
    check::finite_param("alpha", alpha)?;
    check::finite_param("beta", beta)?;
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
            syrk_lower(main, accum, beta, x, par, stack);
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

/// `C <- beta X^T X` (`Replace`) or `C + beta X^T X` (`Add`) on the lower
/// triangle of `c`, nothing else written: our register kernels where the
/// CPU has them (`crate::syrk`), faer's triangular product otherwise.
pub(crate) fn syrk_lower<T: Real>(
    mut c: MatMut<'_, T>,
    accum: Accum,
    beta: T,
    x: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) {
    let mut accum = accum;
    if crate::syrk::applicable(c.rb()) {
        if accum == Accum::Replace {
            zero_lower(c.rb_mut());
            accum = Accum::Add;
        }
        if crate::syrk::syrk_lower(c.rb_mut(), beta, x, par, stack) {
            return;
        }
    }
    triangular::matmul(
        c,
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

/// The two coefficients of a running average over accumulated statistics,
/// `(xi, c)` with `c = (1 - xi) / weight`, both computed in `f64` and then
/// rounded to `T` once (the runtime's convention: `weight` is the number of
/// samples, or micro-batches, summed into the accumulator).
///
/// ```
/// let (xi, c) = kfac_kernels::factor::running_average_coefficients::<f32>(0.95, 32.0).unwrap();
/// assert_eq!((xi, c), (0.95f64 as f32, ((1.0 - 0.95f64) / 32.0) as f32));
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] if `xi` is not finite, `weight` is not finite
/// and `> 0`, or `c` is not finite in `T`.
pub fn running_average_coefficients<T: Real>(xi: f64, weight: f64) -> Result<(T, T)> {
    check::finite_param("decay xi", xi)?;
    check::positive_param("accumulated weight", weight)?;
    let c = T::from_f64((1.0 - xi) / weight);
    let x = T::from_f64(xi);
    check::finite_param("decay xi", x)?;
    check::finite_param("running-average coefficient (1 - xi) / weight", c)?;
    Ok((x, c))
}

/// Blends one column's contiguous lower part, returning whether every result
/// is finite.
#[inline]
fn blend_slice<T: Real>(out: &mut [T], xi: T, f: &[T], c: T, acc: &[T]) -> bool {
    T::simd_lin_comb(out, xi, f, c, acc);
    check::all_finite(out)
}

/// First non-finite entry of the lower triangle, column by column.
fn first_non_finite_lower<T: Real>(m: MatRef<'_, T>) -> (usize, usize) {
    let n = m.nrows();
    for j in 0..n {
        for i in j..n {
            if !m[(i, j)].is_finite_val() {
                return (i, j);
            }
        }
    }
    (0, 0)
}

/// Running-average blend of a dense factor with an accumulated statistic,
/// written as a full symmetric matrix:
///
/// `out[i, j] = out[j, i] = xi * f[i, j] + c * acc[i, j]` for `i >= j`,
///
/// evaluated exactly in that order (two separately rounded products, then
/// one sum; never a fused multiply-add), so the result is bitwise equal to
/// the scalar expression. With `(xi, c)` from
/// [`running_average_coefficients`] this is `xi F + (1 - xi) acc / weight`.
///
/// * `out`: `n x n`, any strides; every entry is written.
/// * `f`: `n x n`, the current factor; only its lower triangle is read.
/// * `acc`: `n x n`, the accumulated statistic; only its lower triangle is
///   read.
///
/// Column by column over contiguous storage, vectorized with pulp, then the
/// cache-blocked mirror of [`mirror_lower`]. The result is checked as it is
/// written: a factor that a contribution made non-finite is refused.
///
/// ```
/// use faer::Mat;
/// use kfac_kernels::factor::blend_lower_to_full;
/// let f = Mat::<f32>::identity(2, 2);
/// let acc = Mat::<f32>::from_fn(2, 2, |i, j| if i >= j { 4.0 } else { f32::NAN });
/// let mut out = Mat::<f32>::zeros(2, 2);
/// blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), 0.5, 0.25).unwrap();
/// assert_eq!(out[(0, 0)], 1.5);
/// assert_eq!(out[(0, 1)], 1.0); // mirrored from (1, 0); the upper `acc` is never read
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`] if `f` is not square or `acc`/`out` are not
/// its shape, [`Error::InvalidParameter`] for non-finite `xi` or `c` — `out`
/// is untouched in these cases. [`Error::NonFinite`] (what =
/// `"blended factor"`, the first bad entry column by column) if a result is
/// NaN or infinite (a non-finite input always gives one): this is detected
/// while writing, so **`out` then holds unspecified values** (it is meant to
/// be the caller's scratch); `f` and `acc` are never modified.
pub fn blend_lower_to_full<T: Real>(
    mut out: MatMut<'_, T>,
    f: MatRef<'_, T>,
    acc: MatRef<'_, T>,
    xi: T,
    c: T,
) -> Result<()> {
    let n = check::square("factor F", f)?;
    check::shape("accumulated statistic", acc, n, n)?;
    check::shape_mut("blended factor", &out, n, n)?;
    check::finite_param("decay xi", xi)?;
    check::finite_param("running-average coefficient c", c)?;
    let mut ok = true;
    for j in 0..n {
        let fc = f.get(j.., j);
        let ac = acc.get(j.., j);
        let mut oc = out.rb_mut().get_mut(j.., j);
        match (
            fc.try_as_col_major(),
            ac.try_as_col_major(),
            oc.rb_mut().try_as_col_major_mut(),
        ) {
            (Some(fs), Some(a_s), Some(os)) => {
                ok &= blend_slice(os.as_slice_mut(), xi, fs.as_slice(), c, a_s.as_slice());
            }
            _ => {
                for i in 0..n - j {
                    let v = xi * fc[i] + c * ac[i];
                    ok &= v.is_finite_val();
                    oc[i] = v;
                }
            }
        }
    }
    if !ok {
        let (row, col) = first_non_finite_lower(out.rb());
        return Err(Error::NonFinite {
            what: "blended factor",
            row,
            col,
        });
    }
    mirror_lower(out)
}

/// [`blend_lower_to_full`] for a diagonal factor (stored as its diagonal):
/// `out[i] = xi * f[i] + c * acc[i]`, separately rounded products then one
/// sum, vectorized with pulp.
///
/// ```
/// let mut out = [0.0f64; 2];
/// kfac_kernels::factor::blend_diag(&mut out, &[1.0, 2.0], &[4.0, 8.0], 0.5, 0.25).unwrap();
/// assert_eq!(out, [1.5, 3.0]);
/// ```
///
/// # Errors
/// [`Error::LengthMismatch`] unless `out`, `f` and `acc` have one length,
/// [`Error::InvalidParameter`] for non-finite `xi` or `c` (`out` untouched);
/// [`Error::NonFinite`] (what = `"blended diagonal factor"`, `row` = index)
/// if a result is not finite, detected while writing: **`out` then holds
/// unspecified values**; `f` and `acc` are never modified.
pub fn blend_diag<T: Real>(out: &mut [T], f: &[T], acc: &[T], xi: T, c: T) -> Result<()> {
    check::len("accumulated diagonal", acc.len(), f.len())?;
    check::len("blended diagonal", out.len(), f.len())?;
    check::finite_param("decay xi", xi)?;
    check::finite_param("running-average coefficient c", c)?;
    T::simd_lin_comb(out, xi, f, c, acc);
    if check::all_finite(out) {
        return Ok(());
    }
    let row = out.iter().position(|v| !v.is_finite_val()).unwrap_or(0);
    Err(Error::NonFinite {
        what: "blended diagonal factor",
        row,
        col: 0,
    })
}

/// Token-count update of a diagonal factor (an embedding layer's `A`, whose
/// one-hot inputs make `A = diag(token counts)`):
///
/// `d[t] += beta` for every `t` in `tokens`, in order, after `d` is set to
/// zero when `replace` (the first contribution of a batch).
///
/// ```
/// let mut d = [9.0f32; 3];
/// kfac_kernels::factor::diag_token_counts_update(&mut d, true, 0.5, &[2, 0, 2]).unwrap();
/// assert_eq!(d, [0.5, 0.0, 1.0]);
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a non-finite `beta`,
/// [`Error::IndexOutOfRange`] for the first token id `>= d.len()`. `d` is
/// untouched on error.
pub fn diag_token_counts_update<T: Real>(
    d: &mut [T],
    replace: bool,
    beta: T,
    tokens: &[usize],
) -> Result<()> {
    check::finite_param("beta", beta)?;
    let len = d.len();
    if let Some(&t) = tokens.iter().find(|&&t| t >= len) {
        return Err(Error::IndexOutOfRange {
            what: "token id",
            index: t,
            len,
        });
    }
    if replace {
        d.fill(T::ZERO);
    }
    for &t in tokens {
        d[t] += beta;
    }
    Ok(())
}

/// Scaled accumulation of a given statistic into one triangle (used for
/// layers whose statistics the caller computes itself):
///
/// `dst[i, j] = beta * src[i, j]` when `replace`, else
/// `dst[i, j] = dst[i, j] + beta * src[i, j]`, for `i >= j`
///
/// (the product rounded, then the sum: never a fused multiply-add). The
/// strict upper triangles of `dst` and `src` are neither read nor written.
///
/// ```
/// use faer::Mat;
/// use kfac_kernels::factor::accumulate_lower;
/// let src = Mat::<f64>::from_fn(2, 2, |i, j| (1 + i + j) as f64);
/// let mut dst = Mat::<f64>::zeros(2, 2);
/// accumulate_lower(dst.as_mut(), src.as_ref(), 2.0, true).unwrap();
/// accumulate_lower(dst.as_mut(), src.as_ref(), 1.0, false).unwrap();
/// assert_eq!((dst[(1, 0)], dst[(0, 1)]), (6.0, 0.0));
/// ```
///
/// # Errors
/// [`Error::DimensionMismatch`] unless `dst` is square and `src` its shape,
/// [`Error::InvalidParameter`] for a non-finite `beta`,
/// [`Error::NonFinite`] for a NaN/Inf in the lower triangle of `src`. `dst`
/// is untouched on error.
pub fn accumulate_lower<T: Real>(
    mut dst: MatMut<'_, T>,
    src: MatRef<'_, T>,
    beta: T,
    replace: bool,
) -> Result<()> {
    let n = check::square("accumulator", dst.rb())?;
    check::shape("statistic", src, n, n)?;
    check::finite_param("beta", beta)?;
    check::finite_lower("statistic", src)?;
    for j in 0..n {
        let sc = src.get(j.., j);
        let mut dc = dst.rb_mut().get_mut(j.., j);
        match (sc.try_as_col_major(), dc.rb_mut().try_as_col_major_mut()) {
            (Some(s), Some(d)) => {
                let (s, d) = (s.as_slice(), d.as_slice_mut());
                if replace {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = beta * s;
                    }
                } else {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d += beta * s;
                    }
                }
            }
            _ => {
                for i in 0..n - j {
                    let v = beta * sc[i];
                    dc[i] = if replace { v } else { dc[i] + v };
                }
            }
        }
    }
    Ok(())
}
