//! Packed symmetric storage and low-precision conversion for the wire.
//!
//! **Layout**: the lower triangle, column by column (LAPACK `'L'` packed):
//! entry `(i, j)` with `i >= j` of an `n x n` matrix sits at
//! `j n - j (j - 1) / 2 + (i - j)` ([`packed_index`]); `n (n + 1) / 2` values in
//! all ([`packed_len`]).
//!
//! Conversions to `bf16` / `f16` round to nearest, ties to even (the `half`
//! crate); values beyond the target's range become infinities, NaN stays NaN.
//!
//! ```
//! use faer::Mat;
//! use kfac_kernels::packed::*;
//! let m = Mat::<f32>::from_fn(3, 3, |i, j| (10 * i + j) as f32);
//! let mut p = vec![0.0f32; packed_len(3).unwrap()];
//! pack_lower(m.as_ref(), &mut p).unwrap();
//! assert_eq!(p, [0.0, 10.0, 20.0, 11.0, 21.0, 22.0]);
//! let mut w = vec![bf16::ZERO; p.len()];
//! f32_to_bf16(&p, &mut w).unwrap();
//! let mut back = vec![0.0f32; p.len()];
//! bf16_to_f32(&w, &mut back).unwrap();
//! assert_eq!(back, p); // small integers are exact in bf16
//! ```

use crate::{check, Error, Real, Result};
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{MatMut, MatRef};
pub use half::{bf16, f16};

/// `n (n + 1) / 2`, or `None` on overflow.
pub const fn packed_len(n: usize) -> Option<usize> {
    let Some(n1) = n.checked_add(1) else {
        return None;
    };
    // One of n, n + 1 is even: halve that one first so only a true overflow
    // of the result fails.
    if n & 1 == 0 {
        (n / 2).checked_mul(n1)
    } else {
        n.checked_mul(n1 / 2)
    }
}

/// Position of entry `(i, j)`, `i >= j`, of an `n x n` lower triangle.
#[inline]
pub const fn packed_index(n: usize, i: usize, j: usize) -> usize {
    j * n - (j * j.saturating_sub(1)) / 2 + (i - j)
}

fn want_len(n: usize) -> Result<usize> {
    packed_len(n).ok_or(Error::SizeOverflow {
        what: "packed length",
    })
}

/// Packs the lower triangle of the square `src` into `dst`.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `src` is not square,
/// [`Error::LengthMismatch`] if `dst.len() != n (n + 1) / 2`.
pub fn pack_lower<T: Real>(src: MatRef<'_, T>, dst: &mut [T]) -> Result<()> {
    let n = check::square("matrix to pack", src)?;
    check::len("packed buffer", dst.len(), want_len(n)?)?;
    let mut off = 0;
    for j in 0..n {
        let col = src.get(j.., j);
        let out = &mut dst[off..off + (n - j)];
        match col.try_as_col_major() {
            Some(c) => out.copy_from_slice(c.as_slice()),
            None => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = col[i];
                }
            }
        }
        off += n - j;
    }
    Ok(())
}

/// Unpacks into the lower triangle of `dst`, and the upper one too when
/// `mirror` (a full symmetric matrix).
///
/// # Errors
/// As [`pack_lower`]; `dst` is untouched on error.
pub fn unpack_lower<T: Real>(src: &[T], mut dst: MatMut<'_, T>, mirror: bool) -> Result<()> {
    let n = check::square("unpacked matrix", dst.rb())?;
    check::len("packed buffer", src.len(), want_len(n)?)?;
    let mut off = 0;
    for j in 0..n {
        let s = &src[off..off + (n - j)];
        for (k, &v) in s.iter().enumerate() {
            dst[(j + k, j)] = v;
        }
        if mirror {
            for (k, &v) in s.iter().enumerate().skip(1) {
                dst[(j, j + k)] = v;
            }
        }
        off += n - j;
    }
    Ok(())
}

/// `dst += scale * src` on packed buffers of equal length (a reduction step),
/// vectorized.
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::InvalidParameter`] for a non-finite
/// `scale`.
pub fn accumulate_packed<T: Real>(dst: &mut [T], src: &[T], scale: T) -> Result<()> {
    check::len("packed accumulator", dst.len(), src.len())?;
    check::finite_param("scale", scale)?;
    T::simd_axpy(scale, src, dst);
    Ok(())
}

/// Adds `scale * unpack(src)` into the lower triangle of `dst`.
///
/// # Errors
/// As [`unpack_lower`], plus a non-finite `scale`.
pub fn add_packed_to_lower<T: Real>(src: &[T], mut dst: MatMut<'_, T>, scale: T) -> Result<()> {
    let n = check::square("accumulated matrix", dst.rb())?;
    check::len("packed buffer", src.len(), want_len(n)?)?;
    check::finite_param("scale", scale)?;
    let mut off = 0;
    for j in 0..n {
        let s = &src[off..off + (n - j)];
        let mut col = dst.rb_mut().get_mut(j.., j);
        match col.rb_mut().try_as_col_major_mut() {
            Some(c) => T::simd_axpy(scale, s, c.as_slice_mut()),
            None => {
                for (k, &v) in s.iter().enumerate() {
                    col[k] += scale * v;
                }
            }
        }
        off += n - j;
    }
    Ok(())
}

macro_rules! conv {
    ($(#[$m:meta])* $name:ident, $from:ty, $to:ty, $f:expr) => {
        $(#[$m])*
        ///
        /// # Errors
        /// [`Error::LengthMismatch`] if the slices differ in length.
        pub fn $name(src: &[$from], dst: &mut [$to]) -> Result<()> {
            check::len("converted buffer", dst.len(), src.len())?;
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = $f(s);
            }
            Ok(())
        }
    };
}

conv!(
    /// `f32 -> bf16`, round to nearest even.
    f32_to_bf16, f32, bf16, bf16::from_f32
);
conv!(
    /// `bf16 -> f32` (exact).
    bf16_to_f32, bf16, f32, bf16::to_f32
);
conv!(
    /// `f32 -> f16`, round to nearest even.
    f32_to_f16, f32, f16, f16::from_f32
);
conv!(
    /// `f16 -> f32` (exact).
    f16_to_f32, f16, f32, f16::to_f32
);
