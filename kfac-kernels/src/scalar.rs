//! The scalar types the kernels are generic over (`f32` and `f64`).
//!
//! [`Real`] is sealed: it bundles the faer field traits, the arithmetic the
//! kernels use, and a few SIMD slice primitives dispatched through pulp.

use core::fmt::{Debug, Display};
use core::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A real floating-point scalar supported by every kernel: `f32` or `f64`.
///
/// ```
/// use kfac_kernels::Real;
/// fn twice<T: Real>(x: T) -> T { x + x }
/// assert_eq!(twice(1.5f32), 3.0);
/// assert_eq!(<f64 as Real>::from_f64(0.25), 0.25);
/// ```
pub trait Real:
    faer::traits::RealField
    + faer::traits::ComplexField<Real = Self>
    + Copy
    + PartialOrd
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + 'static
    + sealed::Sealed
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Machine epsilon (distance from 1 to the next representable value).
    const EPSILON: Self;
    /// The type's name, used in error messages and benches.
    const NAME: &'static str;
    /// Converts from `f64`, rounding to nearest.
    fn from_f64(x: f64) -> Self;
    /// Converts from `usize` (exact below 2^24 for `f32`, 2^53 for `f64`).
    fn from_usize(x: usize) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// `true` unless NaN or infinite.
    fn is_finite_val(self) -> bool;
    /// Square root (libm, so available without std).
    fn sqrt_val(self) -> Self;
    /// Absolute value.
    fn abs_val(self) -> Self;
    /// `y[i] += alpha * x[i]` for `i < min(len)`, vectorized with pulp.
    fn simd_axpy(alpha: Self, x: &[Self], y: &mut [Self]);
    /// `sum_i x[i] * y[i]` for `i < min(len)`, vectorized with pulp.
    fn simd_dot(x: &[Self], y: &[Self]) -> Self;
    /// Columns `c0..c_end` of `y = S v` for the `len x len` symmetric matrix
    /// whose lower triangle starts at `a[0]` (column-major, leading
    /// dimension `ld`): `out[r - ystart]` receives the sum over those
    /// columns for each row `r >= ystart` they touch (`out` is overwritten).
    /// Four columns at a time (their 4 x 4 diagonal block in scalar code,
    /// the rows below in one fused pass that updates `out` and returns the
    /// columns' dot products with `v`), the rest one by one, all in one
    /// SIMD dispatch.
    ///
    /// # Panics
    /// If a column or `out` is shorter than the ranges imply.
    #[allow(clippy::too_many_arguments)]
    fn simd_symv_cols(
        a: &[Self],
        ld: usize,
        len: usize,
        v: &[Self],
        c0: usize,
        c_end: usize,
        ystart: usize,
        out: &mut [Self],
    );
    /// `y[i] *= x[i]` for `i < min(len)`, vectorized with pulp.
    fn simd_mul_assign(y: &mut [Self], x: &[Self]);
    /// The larger of two values, NaN-ignoring, exactly as `f32::max` /
    /// `f64::max` (so kernels reproduce the bits of code written with them).
    fn max_val(self, other: Self) -> Self;
    /// `out[i] = alpha * x[i] + beta * y[i]` for `i < min(len)`, vectorized
    /// with pulp, with a separately rounded multiply and add (never a fused
    /// multiply-add), so every lane is bitwise equal to the scalar expression
    /// `alpha * x + beta * y`.
    fn simd_lin_comb(out: &mut [Self], alpha: Self, x: &[Self], beta: Self, y: &[Self]);
}

macro_rules! impl_real {
    ($t:ty, $kern:ident, $name:literal, $sqrt:path, $as_simd:ident, $as_mut_simd:ident, $splat:ident, $mul_add:ident, $mul:ident, $add:ident, $reduce:ident) => {
        /// The inner loops of `simd_symv_cols` (several columns at once, and
        /// one), inlined into its single SIMD dispatch.
        mod $kern {
        #[inline(always)]
        pub(super) fn axpy_dot4_in<S: pulp::Simd>(simd: S, alpha: [$t; 4], x: [&[$t]; 4], y: &mut [$t], z: &[$t]) -> [$t; 4] {
            let n = x.iter().fold(y.len().min(z.len()), |n, x| n.min(x.len()));
            let (x0, t0) = S::$as_simd(&x[0][..n]);
            let (x1, t1) = S::$as_simd(&x[1][..n]);
            let (x2, t2) = S::$as_simd(&x[2][..n]);
            let (x3, t3) = S::$as_simd(&x[3][..n]);
            let (yh, yt) = S::$as_mut_simd(&mut y[..n]);
            let (zh, zt) = S::$as_simd(&z[..n]);
            let a = alpha.map(|a| simd.$splat(a));
            let mut acc = [simd.$splat(0.0); 4];
            for (i, (y, z)) in yh.iter_mut().zip(zh).enumerate() {
                let (v0, v1, v2, v3) = (x0[i], x1[i], x2[i], x3[i]);
                let mut t = simd.$mul_add(a[0], v0, *y);
                t = simd.$mul_add(a[1], v1, t);
                t = simd.$mul_add(a[2], v2, t);
                *y = simd.$mul_add(a[3], v3, t);
                acc[0] = simd.$mul_add(v0, *z, acc[0]);
                acc[1] = simd.$mul_add(v1, *z, acc[1]);
                acc[2] = simd.$mul_add(v2, *z, acc[2]);
                acc[3] = simd.$mul_add(v3, *z, acc[3]);
            }
            let mut out = acc.map(|a| simd.$reduce(a));
            for (i, (y, z)) in yt.iter_mut().zip(zt).enumerate() {
                let v = [t0[i], t1[i], t2[i], t3[i]];
                for k in 0..4 {
                    *y += alpha[k] * v[k];
                    out[k] += v[k] * *z;
                }
            }
            out
        }
        #[inline(always)]
        pub(super) fn axpy_dot_in<S: pulp::Simd>(simd: S, alpha: $t, x: &[$t], y: &mut [$t], z: &[$t]) -> $t {
            let n = x.len().min(y.len()).min(z.len());
            let (xh, xt) = S::$as_simd(&x[..n]);
            let (yh, yt) = S::$as_mut_simd(&mut y[..n]);
            let (zh, zt) = S::$as_simd(&z[..n]);
            let a = simd.$splat(alpha);
            let mut acc = [simd.$splat(0.0); 2];
            let mut k = 0;
            for ((y, x), z) in yh.iter_mut().zip(xh).zip(zh) {
                *y = simd.$mul_add(a, *x, *y);
                acc[k & 1] = simd.$mul_add(*x, *z, acc[k & 1]);
                k += 1;
            }
            let mut total = simd.$reduce(simd.$add(acc[0], acc[1]));
            for ((y, x), z) in yt.iter_mut().zip(xt).zip(zt) {
                *y += alpha * *x;
                total += *x * *z;
            }
            total
        }
        }

        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPSILON: Self = <$t>::EPSILON;
            const NAME: &'static str = $name;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn from_usize(x: usize) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn is_finite_val(self) -> bool {
                self.is_finite()
            }
            #[inline]
            fn sqrt_val(self) -> Self {
                $sqrt(self)
            }
            #[inline]
            fn abs_val(self) -> Self {
                if self < 0.0 {
                    -self
                } else {
                    self
                }
            }
            fn simd_axpy(alpha: Self, x: &[Self], y: &mut [Self]) {
                struct Op<'a> {
                    alpha: $t,
                    x: &'a [$t],
                    y: &'a mut [$t],
                }
                impl pulp::WithSimd for Op<'_> {
                    type Output = ();
                    #[inline(always)]
                    fn with_simd<S: pulp::Simd>(self, simd: S) {
                        let n = self.x.len().min(self.y.len());
                        let (xh, xt) = S::$as_simd(&self.x[..n]);
                        let (yh, yt) = S::$as_mut_simd(&mut self.y[..n]);
                        let a = simd.$splat(self.alpha);
                        for (y, x) in yh.iter_mut().zip(xh) {
                            *y = simd.$mul_add(a, *x, *y);
                        }
                        for (y, x) in yt.iter_mut().zip(xt) {
                            *y += self.alpha * *x;
                        }
                    }
                }
                pulp::Arch::new().dispatch(Op { alpha, x, y });
            }
            fn simd_dot(x: &[Self], y: &[Self]) -> Self {
                struct Op<'a> {
                    x: &'a [$t],
                    y: &'a [$t],
                }
                impl pulp::WithSimd for Op<'_> {
                    type Output = $t;
                    #[inline(always)]
                    fn with_simd<S: pulp::Simd>(self, simd: S) -> $t {
                        let n = self.x.len().min(self.y.len());
                        let (xh, xt) = S::$as_simd(&self.x[..n]);
                        let (yh, yt) = S::$as_simd(&self.y[..n]);
                        // Four independent accumulators hide the FMA latency.
                        let mut acc = [simd.$splat(0.0); 4];
                        let mut xc = xh.chunks_exact(4);
                        let mut yc = yh.chunks_exact(4);
                        for (xs, ys) in (&mut xc).zip(&mut yc) {
                            for k in 0..4 {
                                acc[k] = simd.$mul_add(xs[k], ys[k], acc[k]);
                            }
                        }
                        for (x, y) in xc.remainder().iter().zip(yc.remainder()) {
                            acc[0] = simd.$mul_add(*x, *y, acc[0]);
                        }
                        let s01 = simd.$add(acc[0], acc[1]);
                        let s23 = simd.$add(acc[2], acc[3]);
                        let mut total = simd.$reduce(simd.$add(s01, s23));
                        for (x, y) in xt.iter().zip(yt) {
                            total += *x * *y;
                        }
                        total
                    }
                }
                pulp::Arch::new().dispatch(Op { x, y })
            }
            #[allow(clippy::too_many_arguments)]
            fn simd_symv_cols(
                a: &[Self],
                ld: usize,
                len: usize,
                v: &[Self],
                c0: usize,
                c_end: usize,
                ystart: usize,
                out: &mut [Self],
            ) {
                struct Op<'a> {
                    a: &'a [$t],
                    ld: usize,
                    len: usize,
                    v: &'a [$t],
                    c0: usize,
                    c_end: usize,
                    ystart: usize,
                    out: &'a mut [$t],
                }
                impl pulp::WithSimd for Op<'_> {
                    type Output = ();
                    #[inline(always)]
                    fn with_simd<S: pulp::Simd>(self, simd: S) {
                        let Op { a, ld, len, v, c0, c_end, ystart, out } = self;
                        let col = |c: usize| &a[c * ld..c * ld + len];
                        out.fill(0.0);
                        let mut c = c0;
                        while c + 4 <= c_end {
                            let x = [col(c), col(c + 1), col(c + 2), col(c + 3)];
                            for k in 0..4 {
                                let vk = v[c + k];
                                let mut dot = x[k][c + k] * vk;
                                for r in c + k + 1..c + 4 {
                                    out[r - ystart] += vk * x[k][r];
                                    dot += x[k][r] * v[r];
                                }
                                out[c + k - ystart] += dot;
                            }
                            let below = c + 4;
                            let alpha = [v[c], v[c + 1], v[c + 2], v[c + 3]];
                            let dots = $kern::axpy_dot4_in(
                                simd,
                                alpha,
                                x.map(|x| &x[below..]),
                                &mut out[below - ystart..],
                                &v[below..],
                            );
                            for k in 0..4 {
                                out[c + k - ystart] += dots[k];
                            }
                            c += 4;
                        }
                        for c in c..c_end {
                            let x = col(c);
                            let vc = v[c];
                            let dot = $kern::axpy_dot_in(simd, vc, &x[c + 1..], &mut out[c + 1 - ystart..], &v[c + 1..]);
                            out[c - ystart] += x[c] * vc + dot;
                        }
                    }
                }
                pulp::Arch::new().dispatch(Op { a, ld, len, v, c0, c_end, ystart, out })
            }
            fn simd_mul_assign(y: &mut [Self], x: &[Self]) {
                struct Op<'a> {
                    x: &'a [$t],
                    y: &'a mut [$t],
                }
                impl pulp::WithSimd for Op<'_> {
                    type Output = ();
                    #[inline(always)]
                    fn with_simd<S: pulp::Simd>(self, simd: S) {
                        let n = self.x.len().min(self.y.len());
                        let (xh, xt) = S::$as_simd(&self.x[..n]);
                        let (yh, yt) = S::$as_mut_simd(&mut self.y[..n]);
                        for (y, x) in yh.iter_mut().zip(xh) {
                            *y = simd.$mul(*x, *y);
                        }
                        for (y, x) in yt.iter_mut().zip(xt) {
                            *y *= *x;
                        }
                    }
                }
                pulp::Arch::new().dispatch(Op { x, y });
            }
            #[inline]
            fn max_val(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn simd_lin_comb(out: &mut [Self], alpha: Self, x: &[Self], beta: Self, y: &[Self]) {
                struct Op<'a> {
                    alpha: $t,
                    beta: $t,
                    x: &'a [$t],
                    y: &'a [$t],
                    out: &'a mut [$t],
                }
                impl pulp::WithSimd for Op<'_> {
                    type Output = ();
                    #[inline(always)]
                    fn with_simd<S: pulp::Simd>(self, simd: S) {
                        let n = self.x.len().min(self.y.len()).min(self.out.len());
                        let (xh, xt) = S::$as_simd(&self.x[..n]);
                        let (yh, yt) = S::$as_simd(&self.y[..n]);
                        let (oh, ot) = S::$as_mut_simd(&mut self.out[..n]);
                        let a = simd.$splat(self.alpha);
                        let b = simd.$splat(self.beta);
                        // Separate multiply and add: bitwise equal to the
                        // scalar tail below (no contraction to FMA).
                        for ((o, x), y) in oh.iter_mut().zip(xh).zip(yh) {
                            *o = simd.$add(simd.$mul(a, *x), simd.$mul(b, *y));
                        }
                        for ((o, x), y) in ot.iter_mut().zip(xt).zip(yt) {
                            *o = self.alpha * *x + self.beta * *y;
                        }
                    }
                }
                pulp::Arch::new().dispatch(Op {
                    alpha,
                    beta,
                    x,
                    y,
                    out,
                });
            }
        }
    };
}

impl_real!(
    f32,
    kern_f32,
    "f32",
    libm::sqrtf,
    as_simd_f32s,
    as_mut_simd_f32s,
    splat_f32s,
    mul_add_f32s,
    mul_f32s,
    add_f32s,
    reduce_sum_f32s
);
impl_real!(
    f64,
    kern_f64,
    "f64",
    libm::sqrt,
    as_simd_f64s,
    as_mut_simd_f64s,
    splat_f64s,
    mul_add_f64s,
    mul_f64s,
    add_f64s,
    reduce_sum_f64s
);
