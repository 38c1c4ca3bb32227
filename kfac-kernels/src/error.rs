//! The one error type of the kernels: what was wrong, and with which sizes.

use core::fmt;

/// Result alias used by every fallible kernel.
pub type Result<T> = core::result::Result<T, Error>;

/// Why a kernel refused its arguments or could not finish.
///
/// Every kernel validates all of its arguments before it writes anything, so
/// an `Err` means every output is exactly as it was before the call. The one
/// exception is documented where it applies: the running-average blends
/// ([`blend_lower_to_full`](crate::factor::blend_lower_to_full),
/// [`blend_diag`](crate::factor::blend_diag)) report a non-finite *result*
/// after writing it into the caller's scratch output.
///
/// ```
/// use kfac_kernels::Error;
/// let e = Error::DimensionMismatch { what: "factor C", expected: (3, 3), found: (2, 3) };
/// assert_eq!(e.to_string(), "factor C: expected a 3x3 matrix, found 2x3");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A matrix or tensor argument has the wrong shape.
    DimensionMismatch {
        /// Which argument.
        what: &'static str,
        /// The (rows, columns) that were required.
        expected: (usize, usize),
        /// The (rows, columns) that were passed.
        found: (usize, usize),
    },
    /// A slice argument has the wrong length.
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length passed.
        found: usize,
    },
    /// An input holds a NaN or an infinity.
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// Row of the first offending entry.
        row: usize,
        /// Column of the first offending entry.
        col: usize,
    },
    /// A scalar parameter is out of its documented range.
    InvalidParameter {
        /// Which parameter.
        what: &'static str,
        /// The value passed (widened to f64).
        value: f64,
        /// The range it must be in, in words.
        expected: &'static str,
    },
    /// A geometry (convolution, tensor strides) is inconsistent.
    InvalidGeometry {
        /// What is inconsistent, in words.
        what: &'static str,
    },
    /// A Cholesky factorization met a non-positive pivot: the (damped) matrix
    /// is not positive definite.
    NotPositiveDefinite {
        /// Which argument.
        what: &'static str,
        /// Index of the first non-positive pivot.
        pivot: usize,
        /// Dimension of the matrix.
        dim: usize,
    },
    /// The symmetric eigensolver did not converge.
    EigenNoConvergence {
        /// Dimension of the matrix.
        dim: usize,
    },
    /// The caller-provided scratch stack is smaller than the matching
    /// `*_scratch` function asked for.
    ScratchTooSmall {
        /// Bytes required (alignment included).
        required_bytes: usize,
        /// Bytes available.
        available_bytes: usize,
    },
    /// A size computation overflowed `usize`.
    SizeOverflow {
        /// Which size.
        what: &'static str,
    },
    /// An index argument (e.g. a token id) is outside its range.
    IndexOutOfRange {
        /// Which argument.
        what: &'static str,
        /// The index passed.
        index: usize,
        /// The length it must be below.
        len: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DimensionMismatch {
                what,
                expected,
                found,
            } => write!(
                f,
                "{what}: expected a {}x{} matrix, found {}x{}",
                expected.0, expected.1, found.0, found.1
            ),
            Error::LengthMismatch {
                what,
                expected,
                found,
            } => write!(f, "{what}: expected length {expected}, found {found}"),
            Error::NonFinite { what, row, col } => {
                write!(f, "{what}: non-finite value (NaN or Inf) at ({row}, {col})")
            }
            Error::InvalidParameter {
                what,
                value,
                expected,
            } => write!(f, "{what} = {value} is invalid: expected {expected}"),
            Error::InvalidGeometry { what } => write!(f, "invalid geometry: {what}"),
            Error::NotPositiveDefinite { what, pivot, dim } => write!(
                f,
                "{what}: not positive definite (pivot {pivot} of {dim} is not positive)"
            ),
            Error::EigenNoConvergence { dim } => {
                write!(f, "symmetric eigendecomposition of a {dim}x{dim} matrix did not converge")
            }
            Error::ScratchTooSmall {
                required_bytes,
                available_bytes,
            } => write!(
                f,
                "scratch stack too small: {required_bytes} bytes required, {available_bytes} available"
            ),
            Error::SizeOverflow { what } => write!(f, "{what}: size overflows usize"),
            Error::IndexOutOfRange { what, index, len } => {
                write!(f, "{what}: index {index} is out of range (length {len})")
            }
        }
    }
}

impl core::error::Error for Error {}
