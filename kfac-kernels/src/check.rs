//! Argument validation shared by the kernels (crate-private).
//!
//! Every public kernel calls these before it writes anything, so that an
//! error leaves all outputs untouched.

use crate::{Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::{MatMut, MatRef};

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

pub(crate) fn finite_slice<T: Real>(what: &'static str, s: &[T]) -> Result<()> {
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
