//! Properties of `kernels::kl`: the Frobenius inner product against an
//! accurate naive sum and the KL-clipping factor against the hand formula.

#[macro_use]
mod common;

use common::*;
use kfac_kernels::kl::{frobenius_dot, kl_clip_scale};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

#[derive(Clone, Debug)]
struct DotCase {
    r: usize,
    c: usize,
    a_layout: Layout,
    b_layout: Layout,
    kind: Kind,
    seed: u64,
}

fn dot_case() -> impl Strategy<Value = DotCase> {
    (
        0usize..=40,
        0usize..=40,
        layout(),
        layout(),
        kind(),
        any::<u64>(),
    )
        .prop_map(|(r, c, a_layout, b_layout, kind, seed)| DotCase {
            r,
            c,
            a_layout,
            b_layout,
            kind,
            seed,
        })
}

/// `frobenius_dot(A, B) = Σ_ij A_ij B_ij` for any pair of layouts (both
/// contiguous the same way, or not).
///
/// Tolerance: column sums of `r` products in `T` (or row sums of `c`, after
/// the transpose), an f64 total over the other dimension, one final
/// rounding to `T`: `|err| <= 2 (r + c + 2) eps Σ |A_ij B_ij| + eps |Σ|`.
fn check_frobenius_dot<T: Flt>(case: &DotCase) -> Result<(), TestCaseError> {
    let mut rg = Gen::new(case.seed);
    let a = activations(&mut rg, case.r, case.c, case.kind).round::<T>();
    let b = rg.matrix(case.r, case.c).round::<T>();
    let a_s = Stored::<T>::from_m(&a, case.a_layout, T::from_f64(f64::NAN));
    let b_s = Stored::<T>::from_m(&b, case.b_layout, T::from_f64(f64::NAN));
    let got = frobenius_dot(a_s.view(), b_s.view())
        .map_err(fail)?
        .to_f64();
    let want = dot2(a.d.iter().copied().zip(b.d.iter().copied()));
    let abs: f64 = a.d.iter().zip(&b.d).map(|(x, y)| (x * y).abs()).sum();
    let tol = 2.0 * (case.r + case.c + 2) as f64 * T::eps() * abs + T::eps() * want.abs();
    check_le("frobenius_dot", (got - want).abs(), tol)
}

both_types!(
    frobenius_dot_matches_naive_sum,
    dot_case(),
    check_frobenius_dot
);

#[derive(Clone, Debug)]
struct ClipCase {
    sum: f64,
    lr: f64,
    kl_clip: f64,
}

fn signed_log(lo: f64, hi: f64) -> impl Strategy<Value = f64> {
    (any::<bool>(), lo..hi).prop_map(|(neg, e)| {
        let v = 10f64.powf(e);
        if neg {
            -v
        } else {
            v
        }
    })
}

fn clip_case() -> impl Strategy<Value = ClipCase> {
    (
        prop_oneof![1 => Just(0.0), 1 => Just(-0.0), 8 => signed_log(-6.0, 6.0)],
        prop_oneof![1 => Just(0.0), 8 => (-4.0..1.0f64).prop_map(|e| 10f64.powf(e))],
        (-6.0..0.0f64).prop_map(|e| 10f64.powf(e)),
    )
        .prop_map(|(sum, lr, kl_clip)| ClipCase { sum, lr, kl_clip })
}

/// `kl_clip_scale = min(1, sqrt(kl_clip / |lr^2 sum|))`, exactly 1 when
/// `lr^2 sum == 0`. Tolerance: two products, a quotient and a square root,
/// `4 u = 2 eps` relative (min with 1 is 1-Lipschitz); we allow `4 eps`.
fn check_kl_clip<T: Flt>(case: &ClipCase) -> Result<(), TestCaseError> {
    let (sum, lr, kl) = (
        T::round(case.sum),
        T::round(case.lr),
        T::round(case.kl_clip),
    );
    let got = kl_clip_scale(T::from_f64(sum), T::from_f64(lr), T::from_f64(kl))
        .map_err(fail)?
        .to_f64();
    let vg = (lr * lr * sum).abs();
    if vg == 0.0 {
        prop_assert_eq!(got, 1.0, "nu must be exactly 1 when lr^2 sum == 0");
        return Ok(());
    }
    let want = (kl / vg).sqrt().min(1.0);
    check_le("kl_clip_scale", (got - want).abs(), 4.0 * T::eps() * want)
}

both_types!(
    kl_clip_scale_matches_hand_formula,
    clip_case(),
    check_kl_clip
);
