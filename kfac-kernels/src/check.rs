//! Input validation: the public finiteness checks a caller runs once per
//! input, the proof types they return, and the argument checks the kernels
//! share (crate-private).
//!
//! Every public kernel validates its arguments before it writes anything, so
//! an error leaves all outputs untouched. A caller that has to validate an
//! input itself anyway (the runtime checks every observation before it
//! touches any state) can do it here, once: [`finite_matrix`] and
//! [`finite_image`] return a [`FiniteMat`] / [`FiniteImage`], a borrow of the
//! checked data that can only be made by these functions. The `*_prechecked`
//! kernels ([`syrk_update_prechecked`](crate::factor::syrk_update_prechecked),
//! [`conv2d_a_update_prechecked`](crate::conv::conv2d_a_update_prechecked),
//! [`conv2d_g_update_prechecked`](crate::conv::conv2d_g_update_prechecked))
//! take the proof instead of the raw view and skip their own NaN/Inf scan.
//! The proof holds a shared borrow, so the data cannot change while it
//! exists: the unchecked path is unreachable with unvalidated data.
//!
//! Errors report the first offending entry as [`Error::NonFinite`] with its
//! position.
//!
//! ```
//! use faer::Mat;
//! use kfac_kernels::{check, Error};
//! let mut x = Mat::<f32>::from_fn(3, 2, |i, j| (i + j) as f32);
//! let ok = check::finite_matrix("activations", x.as_ref()).unwrap();
//! assert_eq!(ok.get().nrows(), 3);
//! x[(2, 1)] = f32::NAN;
//! assert_eq!(
//!     check::finite_matrix("activations", x.as_ref()).unwrap_err(),
//!     Error::NonFinite { what: "activations", row: 2, col: 1 }
//! );
//! assert!(check::finite_slice("bias", &[1.0f64, f64::INFINITY]).is_err());
//! ```

use crate::conv::ImageRef;
use crate::{Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::{MatMut, MatRef};

/// A matrix view every entry of which is finite: a proof made only by
/// [`finite_matrix`]. It borrows the data (shared), so the data cannot change
/// while the proof exists. `Copy`; [`get`](Self::get) returns the view.
#[derive(Clone, Copy, Debug)]
pub struct FiniteMat<'a, T> {
    m: MatRef<'a, T>,
    sum_sq: f64,
}

impl<'a, T> FiniteMat<'a, T> {
    /// The checked view.
    #[inline]
    pub fn get(self) -> MatRef<'a, T> {
        self.m
    }

    /// `sum_ij m_ij^2` (the squared Frobenius norm), accumulated in `f64`
    /// during the check. It bounds every entry of `m^T m` and `m m^T`
    /// (Cauchy-Schwarz), so a caller can tell before a SYRK whether the
    /// product can overflow. Infinite only for `f64` data above ~1e154.
    #[inline]
    pub fn sum_of_squares(self) -> f64 {
        self.sum_sq
    }
}

/// A 4-D tensor view every addressed entry of which is finite: a proof made
/// only by [`finite_image`]. It borrows the data (shared), so the data cannot
/// change while the proof exists. [`get`](Self::get) returns the view.
#[derive(Clone, Copy, Debug)]
pub struct FiniteImage<'a, T> {
    img: ImageRef<'a, T>,
    sum_sq: f64,
}

impl<'a, T> FiniteImage<'a, T> {
    /// The checked view.
    #[inline]
    pub fn get(self) -> ImageRef<'a, T> {
        self.img
    }

    /// The sum of the squares of every addressed entry, accumulated in
    /// `f64` during the check. For a fixed kernel tap, distinct output
    /// positions read distinct input pixels, so this bounds every entry of
    /// the unnormalized patch statistic `P^T P` of a convolution over the
    /// tensor (and of `G`'s sum over positions).
    #[inline]
    pub fn sum_of_squares(self) -> f64 {
        self.sum_sq
    }
}

/// Checks that every entry of `m` (any strides) is finite and returns the
/// proof of it.
///
/// A branch-free pass over unit-stride columns (or rows) runs first; the
/// locating scan runs only when it finds a bad entry. The same pass
/// accumulates [`FiniteMat::sum_of_squares`].
///
/// # Errors
/// [`Error::NonFinite`] with `what` and the (row, column) of the first NaN or
/// infinity (column by column when columns are contiguous, else row by row).
pub fn finite_matrix<'a, T: Real>(
    what: &'static str,
    m: MatRef<'a, T>,
) -> Result<FiniteMat<'a, T>> {
    let sum_sq = finite_sum_sq(what, m)?;
    Ok(FiniteMat { m, sum_sq })
}

/// Checks that every entry of a 4-D tensor view is finite and returns the
/// proof of it. Dense NCHW/NHWC tensors are scanned linearly.
///
/// # Errors
/// [`Error::NonFinite`]: for a dense tensor `row` is the flat index of the
/// first bad value (`col` is 0); otherwise `(row, col)` is its
/// `(sample, channel)`.
pub fn finite_image<T: Real>(img: ImageRef<'_, T>) -> Result<FiniteImage<'_, T>> {
    let sum_sq = crate::conv::check_image_finite(&img)?;
    Ok(FiniteImage { img, sum_sq })
}

pub(crate) fn shape<T>(
    what: &'static str,
    m: MatRef<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if m.nrows() != rows || m.ncols() != cols {
        return Err(Error::DimensionMismatch {
            what,
            expected: (rows, cols),
            found: (m.nrows(), m.ncols()),
        });
    }
    Ok(())
}

pub(crate) fn shape_mut<T>(
    what: &'static str,
    m: &MatMut<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if m.nrows() != rows || m.ncols() != cols {
        return Err(Error::DimensionMismatch {
            what,
            expected: (rows, cols),
            found: (m.nrows(), m.ncols()),
        });
    }
    Ok(())
}

pub(crate) fn square<T>(what: &'static str, m: MatRef<'_, T>) -> Result<usize> {
    if m.nrows() != m.ncols() {
        return Err(Error::DimensionMismatch {
            what,
            expected: (m.nrows(), m.nrows()),
            found: (m.nrows(), m.ncols()),
        });
    }
    Ok(m.nrows())
}

pub(crate) fn len(what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(Error::LengthMismatch {
            what,
            expected,
            found,
        });
    }
    Ok(())
}

/// Every entry finite. A branch-free chunked pass over contiguous columns
/// (or rows) first, which the compiler vectorizes; the locating scan runs
/// only when that pass finds a bad entry.
pub(crate) fn finite<T: Real>(what: &'static str, m: MatRef<'_, T>) -> Result<()> {
    let v = if m.row_stride() == 1 {
        m
    } else {
        m.transpose()
    };
    if v.row_stride() == 1
        && v.col_iter().all(|c| match c.try_as_col_major() {
            Some(c) => all_finite(c.as_slice()),
            None => false,
        })
    {
        return Ok(());
    }
    locate_non_finite(what, m)
}

/// [`finite`] that also returns `sum m_ij^2` in `f64`.
fn finite_sum_sq<T: Real>(what: &'static str, m: MatRef<'_, T>) -> Result<f64> {
    let v = if m.row_stride() == 1 {
        m
    } else {
        m.transpose()
    };
    if v.row_stride() == 1 {
        let mut total = 0.0f64;
        let mut ok = true;
        for c in v.col_iter() {
            match c.try_as_col_major() {
                Some(c) => {
                    let (fin, s) = finite_and_sum_sq(c.as_slice());
                    ok &= fin;
                    total += s;
                }
                None => ok = false,
            }
            if !ok {
                break;
            }
        }
        if ok {
            return Ok(total);
        }
    } else if all_finite_strided(m) {
        let mut total = 0.0f64;
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                let x = m[(i, j)].to_f64();
                total += x * x;
            }
        }
        return Ok(total);
    }
    locate_non_finite(what, m).map(|()| 0.0)
}

fn all_finite_strided<T: Real>(m: MatRef<'_, T>) -> bool {
    (0..m.ncols()).all(|j| (0..m.nrows()).all(|i| m[(i, j)].is_finite_val()))
}

/// `(every entry finite, sum of squares in f64)` in one pass with eight
/// independent accumulators (so it vectorizes); the sum is meaningless
/// when the flag is `false`.
pub(crate) fn finite_and_sum_sq<T: Real>(s: &[T]) -> (bool, f64) {
    let mut ok = true;
    let mut acc = [0.0f64; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            ok &= c[k].is_finite_val();
            let x = c[k].to_f64();
            acc[k] += x * x;
        }
    }
    for (k, v) in chunks.remainder().iter().enumerate() {
        ok &= v.is_finite_val();
        let x = v.to_f64();
        acc[k] += x * x;
    }
    (ok, acc.iter().sum())
}

/// `true` iff every entry is finite (`&`-reductions over chunks, no early
/// exit inside a chunk, so the loop vectorizes).
pub(crate) fn all_finite<T: Real>(s: &[T]) -> bool {
    s.chunks(512)
        .all(|c| c.iter().fold(true, |ok, &v| ok & v.is_finite_val()))
}

fn locate_non_finite<T: Real>(what: &'static str, m: MatRef<'_, T>) -> Result<()> {
    // Walk along the unit-stride direction when there is one.
    if m.row_stride().unsigned_abs() <= m.col_stride().unsigned_abs() {
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                if !m[(i, j)].is_finite_val() {
                    return Err(Error::NonFinite {
                        what,
                        row: i,
                        col: j,
                    });
                }
            }
        }
    } else {
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                if !m[(i, j)].is_finite_val() {
                    return Err(Error::NonFinite {
                        what,
                        row: i,
                        col: j,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Every entry of the lower triangle (diagonal included) finite.
pub(crate) fn finite_lower<T: Real>(what: &'static str, m: MatRef<'_, T>) -> Result<()> {
    let n = m.nrows().min(m.ncols());
    for j in 0..n {
        for i in j..m.nrows() {
            if !m[(i, j)].is_finite_val() {
                return Err(Error::NonFinite {
                    what,
                    row: i,
                    col: j,
                });
            }
        }
    }
    Ok(())
}

/// Checks that every value of `s` is finite.
///
/// # Errors
/// [`Error::NonFinite`] with `what`, `row` the index of the first NaN or
/// infinity and `col` 0.
pub fn finite_slice<T: Real>(what: &'static str, s: &[T]) -> Result<()> {
    if all_finite(s) {
        return Ok(());
    }
    match s.iter().position(|x| !x.is_finite_val()) {
        Some(i) => Err(Error::NonFinite {
            what,
            row: i,
            col: 0,
        }),
        None => Ok(()),
    }
}

pub(crate) fn finite_param<T: Real>(what: &'static str, x: T) -> Result<()> {
    if !x.is_finite_val() {
        return Err(Error::InvalidParameter {
            what,
            value: x.to_f64(),
            expected: "a finite value",
        });
    }
    Ok(())
}

pub(crate) fn positive_param<T: Real>(what: &'static str, x: T) -> Result<()> {
    if !(x.is_finite_val() && x > T::ZERO) {
        return Err(Error::InvalidParameter {
            what,
            value: x.to_f64(),
            expected: "a finite value > 0",
        });
    }
    Ok(())
}

pub(crate) fn nonneg_param<T: Real>(what: &'static str, x: T) -> Result<()> {
    if !(x.is_finite_val() && x >= T::ZERO) {
        return Err(Error::InvalidParameter {
            what,
            value: x.to_f64(),
            expected: "a finite value >= 0",
        });
    }
    Ok(())
}

pub(crate) fn stack(stack: &MemStack, req: StackReq) -> Result<()> {
    if !stack.can_hold(req) {
        return Err(Error::ScratchTooSmall {
            required_bytes: req.unaligned_bytes_required(),
            available_bytes: stack.len_bytes(),
        });
    }
    Ok(())
}
