//! KL clipping (Ba, Grosse & Martens 2017): the step is scaled by
//! `nu = min(1, sqrt(kl_clip / |vg|))` with `vg = lr^2 Σ_l <V_l, grad_l>`
//! over all layers (weights and biases, raw gradients `grad_l`,
//! preconditioned `V_l`), and `nu = 1` when `vg == 0`.
//!
//! ```
//! use faer::Mat;
//! use kfac_kernels::kl::*;
//! let v = Mat::<f64>::from_fn(2, 2, |_, _| 1.0);
//! let g = Mat::<f64>::from_fn(2, 2, |_, _| 2.0);
//! let dot = frobenius_dot(v.as_ref(), g.as_ref()).unwrap(); // 8
//! // vg = 0.1^2 * 8 = 0.08; nu = sqrt(0.001 / 0.08)
//! let nu = kl_clip_scale(dot, 0.1, 0.001).unwrap();
//! assert!((nu - (0.001f64 / 0.08).sqrt()).abs() < 1e-15);
//! ```

use crate::{check, Error, Real, Result};
use faer::MatRef;

/// Frobenius inner product `<A, B> = Σ_ij A_ij B_ij`, vectorized along
/// contiguous columns or rows, columns summed in `f64`.
///
/// # Errors
/// [`Error::DimensionMismatch`] if the shapes differ.
pub fn frobenius_dot<T: Real>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Result<T> {
    check::shape("second operand", b, a.nrows(), a.ncols())?;
    // Make columns the contiguous direction when possible.
    let (a, b) = if a.row_stride() == 1 || a.col_stride() != 1 {
        (a, b)
    } else {
        (a.transpose(), b.transpose())
    };
    let mut total = 0.0f64;
    for j in 0..a.ncols() {
        let (ca, cb) = (a.col(j), b.col(j));
        let s = match (ca.try_as_col_major(), cb.try_as_col_major()) {
            (Some(x), Some(y)) => T::simd_dot(x.as_slice(), y.as_slice()),
            _ => {
                let mut s = T::ZERO;
                for i in 0..a.nrows() {
                    s += ca[i] * cb[i];
                }
                s
            }
        };
        total += s.to_f64();
    }
    Ok(T::from_f64(total))
}

/// The KL-clipping factor `nu` from `sum_vg = Σ_l <V_l, grad_l>`, the
/// learning rate and the clip threshold.
///
/// # Errors
/// [`Error::InvalidParameter`] if `kl_clip` is not finite and `> 0`, or
/// `lr` / `sum_vg` are not finite.
pub fn kl_clip_scale<T: Real>(sum_vg: T, lr: T, kl_clip: T) -> Result<T> {
    check::positive_param("kl_clip", kl_clip)?;
    check::finite_param("lr", lr)?;
    if !sum_vg.is_finite_val() {
        return Err(Error::InvalidParameter {
            what: "sum of <V, grad>",
            value: sum_vg.to_f64(),
            expected: "a finite value",
        });
    }
    let vg = (lr * lr * sum_vg).abs_val();
    if vg == T::ZERO {
        return Ok(T::ONE);
    }
    let nu = (kl_clip / vg).sqrt_val();
    Ok(if nu < T::ONE { nu } else { T::ONE })
}
