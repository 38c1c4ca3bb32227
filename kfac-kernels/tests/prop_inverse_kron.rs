//! Properties of `kernels::inverse` (damped Cholesky inverse, factored
//! Tikhonov damping, inverse-method preconditioning) and `kernels::kron`
//! (explicit product, implicit application, damped solve), against naive
//! loops and a hand-written Gaussian elimination in f64.

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::MemStack;
use kfac_kernels::inverse::{
    damped_inverse, damped_inverse_scratch, factored_damping, precondition_inverse,
    precondition_inverse_scratch, tikhonov_pi,
};
use kfac_kernels::kron::{
    kron as kernel_kron, kron_apply, kron_apply_scratch, kron_damped_solve,
    kron_damped_solve_scratch,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

const SENTINEL: f64 = -77.625;

/// The mean eigenvalue `tr(m) / dim`, or 1 for a zero (or empty) factor.
fn mean_eig(m: &M) -> f64 {
    let t = m.trace() / m.r.max(1) as f64;
    if t > 0.0 {
        t
    } else {
        1.0
    }
}

// ---------------------------------------------------------------------------
// damped_inverse
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct InvCase {
    d: usize,
    src: FactorSrc,
    u_frac: f64,
    zero_shift: bool,
    a_layout: Layout,
    out_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn inv_case() -> impl Strategy<Value = InvCase> {
    (
        0usize..=24,
        factor_src(),
        0.0..=1.0f64,
        prop_oneof![3 => Just(false), 1 => Just(true)],
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(
            |(d, src, u_frac, zero_shift, a_layout, out_layout, rayon, seed)| InvCase {
                d,
                src,
                u_frac,
                zero_shift,
                a_layout,
                out_layout,
                rayon,
                seed,
            },
        )
}

/// `damped_inverse(A, shift)` is `(A + shift I)^{-1}`, full and exactly
/// symmetric. With `M = A + shift I` (A as rounded to `T`) and
/// `kappa = (μ_max + shift) / (μ_min + shift)` (Jacobi eigenvalues μ of A):
///
/// * residual `||M X - I||_2 <= 16 d eps kappa` (inverse from a Cholesky
///   factorization, Higham ch. 14: `c d u kappa` with an
///   implementation-dependent `c`, which includes the rounding of the
///   shifted diagonal; the largest seen is `c = 8.01`, in the regression
///   case below, so `c = 16` leaves a factor of two);
/// * forward error `||X - M^{-1}||_2 <= 8 d kappa (eps + eps64) ||M^{-1}||_2`
///   against `M^{-1}` from the f64 Gaussian elimination (whose own error is
///   `c d eps64 kappa`).
///
/// The shift is `10^(-u max_decades(T)) * tr(A)/d`, or exactly 0 for a
/// spread spectrum that is positive definite in `T` (at most
/// `max_decades(T)` decades), so that `kappa d eps << 1` and the
/// factorization must succeed.
fn check_damped_inverse<T: Flt>(case: &InvCase) -> Result<(), TestCaseError> {
    let d = case.d;
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let a = make_factor::<T>(&mut rg, d, case.src);
    let pd_without_shift = matches!(case.src, FactorSrc::Spread(dec) if dec <= max_decades::<T>());
    let shift = if case.zero_shift && pd_without_shift {
        0.0
    } else {
        T::round(10f64.powf(-case.u_frac * max_decades::<T>()) * mean_eig(&a))
    };
    let a_s = lower_only::<T>(&a, case.a_layout);
    let mut out = Stored::<T>::filled(d, d, case.out_layout, T::from_f64(SENTINEL));
    let before = out.clone();
    let mut buf = buffer(damped_inverse_scratch::<T>(d, par));
    damped_inverse(
        out.view_mut(),
        a_s.view(),
        T::from_f64(shift),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("damped_inverse (padding)", &before, &out, |_, _| false)?;
    for j in 0..d {
        for i in j + 1..d {
            prop_assert_eq!(
                out.get(i, j).bits(),
                out.get(j, i).bits(),
                "inverse not symmetric at ({}, {})",
                i,
                j
            );
        }
    }
    if d == 0 {
        return Ok(());
    }
    let x = out.to_m();
    let m = a.sym_from_lower().add_diag(shift);
    let mu = jacobi_eigenvalues(&a);
    let df = d as f64;
    let kappa = (mu[d - 1] + shift) / (mu[0] + shift);
    prop_assert!(
        kappa > 0.0 && kappa.is_finite(),
        "test setup: kappa = {}",
        kappa
    );
    check_le(
        &format!("||(A + shift I) X - I||_2 (kappa = {kappa:.3e})"),
        spectral_norm(&matmul(&m, &x).sub(&M::identity(d))),
        16.0 * df * T::eps() * kappa,
    )?;
    let want = gauss_solve(&m, &M::identity(d));
    check_le(
        &format!("||X - M^-1||_2 (kappa = {kappa:.3e})"),
        spectral_norm(&x.sub(&want)),
        8.0 * df * kappa * (T::eps() + EPS64) * spectral_norm(&want),
    )
}

both_types!(
    damped_inverse_matches_naive_solve,
    inv_case(),
    check_damped_inverse
);

/// A case proptest once found where the residual reached `8.01 d eps
/// kappa` (kappa 1.9e8), above the former constant 8: a rank-deficient
/// near-duplicate Gram factor with a tiny shift.
#[test]
fn damped_inverse_regression_rank_deficient_tiny_shift() {
    let case = InvCase {
        d: 10,
        src: FactorSrc::Gram {
            n: 5,
            kind: Kind::NearDuplicate { exact: false },
        },
        u_frac: 0.9898831795109171,
        zero_shift: false,
        a_layout: Layout::ColMajor,
        out_layout: Layout::ColMajor,
        rayon: false,
        seed: 7189072294181883321,
    };
    check_damped_inverse::<f64>(&case).unwrap();
}

// ---------------------------------------------------------------------------
// tikhonov_pi / factored_damping
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum TraceSrc {
    Psd(FactorSrc),
    Zero,
    /// Negative diagonal (negative trace): pi falls back to 1.
    Negative,
}

fn trace_src() -> impl Strategy<Value = TraceSrc> {
    prop_oneof![
        4 => factor_src().prop_map(TraceSrc::Psd),
        1 => Just(TraceSrc::Zero),
        1 => Just(TraceSrc::Negative),
    ]
}

fn trace_factor<T: Flt>(rg: &mut Gen, d: usize, src: TraceSrc) -> M {
    match src {
        TraceSrc::Psd(s) => make_factor::<T>(rg, d, s),
        TraceSrc::Zero => M::zeros(d, d),
        TraceSrc::Negative => make_factor::<T>(rg, d, FactorSrc::Spread(2.0))
            .scale(-1.0)
            .add_diag(-1.0)
            .round::<T>(),
    }
}

#[derive(Clone, Debug)]
struct DampCase {
    d_a: usize,
    d_g: usize,
    a_src: TraceSrc,
    g_src: TraceSrc,
    damping: f64,
    a_layout: Layout,
    g_layout: Layout,
    seed: u64,
}

fn damp_case() -> impl Strategy<Value = DampCase> {
    (
        0usize..=12,
        0usize..=12,
        trace_src(),
        trace_src(),
        -8.0..1.0f64,
        layout(),
        layout(),
        any::<u64>(),
    )
        .prop_map(
            |(d_a, d_g, a_src, g_src, log_d, a_layout, g_layout, seed)| DampCase {
                d_a,
                d_g,
                a_src,
                g_src,
                damping: 10f64.powf(log_d),
                a_layout,
                g_layout,
                seed,
            },
        )
}

/// `tikhonov_pi` and `factored_damping` against the hand formula
/// `pi = sqrt((tr A / dim A) / (tr G / dim G))` (1 when a mean trace is not
/// positive), `a = pi sqrt(damping)`, `g = sqrt(damping) / pi`.
///
/// Tolerance: the diagonals of the PSD factors are nonnegative, so each
/// trace is within `(d - 1) u` relative; the means, the ratio and the square
/// root add `3 u`; so `pi` is within `(d_A + d_G + 4) u` relative, with
/// `u = eps / 2`. We allow `2 (d_A + d_G + 4) eps` (4x), and two more `eps`
/// for `a` and `g`. A fallback `pi` is exactly 1.
fn check_factored_damping<T: Flt>(case: &DampCase) -> Result<(), TestCaseError> {
    let mut rg = Gen::new(case.seed);
    let a = trace_factor::<T>(&mut rg, case.d_a, case.a_src);
    let g = trace_factor::<T>(&mut rg, case.d_g, case.g_src);
    let damping = T::round(case.damping);
    let a_s = Stored::<T>::from_m(&a, case.a_layout, T::from_f64(f64::NAN));
    let g_s = Stored::<T>::from_m(&g, case.g_layout, T::from_f64(f64::NAN));

    let mean = |m: &M| {
        if m.r == 0 {
            0.0
        } else {
            m.trace() / m.r as f64
        }
    };
    let (ta, tg) = (mean(&a), mean(&g));
    let fallback = ta <= 0.0 || tg <= 0.0;
    let pi_ref = if fallback { 1.0 } else { (ta / tg).sqrt() };
    let sd = damping.sqrt();

    let pi = tikhonov_pi(a_s.view(), g_s.view()).map_err(fail)?.to_f64();
    let fd = factored_damping(a_s.view(), g_s.view(), T::from_f64(damping)).map_err(fail)?;
    let k = (case.d_a + case.d_g + 4) as f64;
    for (what, got) in [("tikhonov_pi", pi), ("factored_damping.pi", fd.pi.to_f64())] {
        if fallback {
            prop_assert_eq!(got, 1.0, "{} must fall back to exactly 1", what);
        } else {
            check_le(what, (got - pi_ref).abs(), 2.0 * k * T::eps() * pi_ref)?;
        }
    }
    let (a_ref, g_ref) = (pi_ref * sd, sd / pi_ref);
    check_le(
        "factored_damping.a = pi sqrt(damping)",
        (fd.a.to_f64() - a_ref).abs(),
        2.0 * (k + 2.0) * T::eps() * a_ref,
    )?;
    check_le(
        "factored_damping.g = sqrt(damping) / pi",
        (fd.g.to_f64() - g_ref).abs(),
        2.0 * (k + 2.0) * T::eps() * g_ref,
    )
}

both_types!(
    factored_damping_and_tikhonov_pi_match_hand_formula,
    damp_case(),
    check_factored_damping
);

// ---------------------------------------------------------------------------
// precondition_inverse
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct PrecInvCase {
    d_in: usize,
    d_out: usize,
    a_src: FactorSrc,
    g_src: FactorSrc,
    u_frac: f64,
    ainv_layout: Layout,
    ginv_layout: Layout,
    grad_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn prec_inv_case() -> impl Strategy<Value = PrecInvCase> {
    (
        (
            1usize..=12,
            1usize..=12,
            factor_src(),
            factor_src(),
            0.0..=1.0f64,
        ),
        (layout(), layout(), layout()),
        (par(), any::<u64>()),
    )
        .prop_map(
            |(
                (d_in, d_out, a_src, g_src, u_frac),
                (ainv_layout, ginv_layout, grad_layout),
                (rayon, seed),
            )| PrecInvCase {
                d_in,
                d_out,
                a_src,
                g_src,
                u_frac,
                ainv_layout,
                ginv_layout,
                grad_layout,
                rayon,
                seed,
            },
        )
}

/// The inverse method end to end (`factored_damping`, two
/// `damped_inverse`, `precondition_inverse`) against
/// `V = (G + sqrt(d)/pi I)^{-1} grad (A + pi sqrt(d) I)^{-1}` with `pi` from
/// the hand formula and both solves by the f64 Gaussian elimination.
///
/// Tolerance: each computed inverse is `M^{-1} + F` with
/// `||F||_2 <= c d kappa eps ||M^{-1}||_2` (see
/// `damped_inverse_matches_naive_solve`; the shifts' own `O(d eps)` relative
/// error is a backward perturbation of the same size), and the two matmuls
/// add `(d_in + d_out) eps ||G^{-1}|| ||grad|| ||A^{-1}||`, so
/// `||V - V*||_F <= 8 (eps + eps64) (d_out kappa_G + d_in kappa_A + d_in +
/// d_out) ||G_d^{-1}||_2 ||grad||_F ||A_d^{-1}||_2` (the eps64 term is the
/// reference's own error).
fn check_precondition_inverse<T: Flt>(case: &PrecInvCase) -> Result<(), TestCaseError> {
    let (d_in, d_out) = (case.d_in, case.d_out);
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let a = make_factor::<T>(&mut rg, d_in, case.a_src);
    let g = make_factor::<T>(&mut rg, d_out, case.g_src);
    let grad = rg.matrix(d_out, d_in).round::<T>();
    let damping = relative_damping::<T>(&a, &g, case.u_frac);

    let a_s = lower_only::<T>(&a, Layout::ColMajor);
    let g_s = lower_only::<T>(&g, Layout::RowMajor);
    let fd = factored_damping(a_s.view(), g_s.view(), T::from_f64(damping)).map_err(fail)?;
    let mut a_inv = Stored::<T>::filled(d_in, d_in, case.ainv_layout, T::from_f64(SENTINEL));
    let mut g_inv = Stored::<T>::filled(d_out, d_out, case.ginv_layout, T::from_f64(SENTINEL));
    let mut buf = buffer(damped_inverse_scratch::<T>(d_in.max(d_out), par));
    damped_inverse(
        a_inv.view_mut(),
        a_s.view(),
        fd.a,
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    damped_inverse(
        g_inv.view_mut(),
        g_s.view(),
        fd.g,
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    let mut v = Stored::<T>::from_m(&grad, case.grad_layout, T::from_f64(SENTINEL));
    let before = v.clone();
    let mut buf = buffer(precondition_inverse_scratch::<T>(d_out, d_in, par));
    precondition_inverse(
        v.view_mut(),
        g_inv.view(),
        a_inv.view(),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("precondition_inverse (padding)", &before, &v, |_, _| false)?;

    // Reference: the hand formula and two f64 Gaussian eliminations.
    let ta = a.trace() / d_in as f64;
    let tg = g.trace() / d_out as f64;
    let pi = if ta <= 0.0 || tg <= 0.0 {
        1.0
    } else {
        (ta / tg).sqrt()
    };
    let sd = damping.sqrt();
    let (sa, sg) = (pi * sd, sd / pi);
    let a_d = a.sym_from_lower().add_diag(sa);
    let g_d = g.sym_from_lower().add_diag(sg);
    let y = gauss_solve(&g_d, &grad); // G_d^{-1} grad
    let want = gauss_solve(&a_d, &y.t()).t(); // (A_d^{-1} Y^T)^T = Y A_d^{-1}

    let mu = jacobi_eigenvalues(&a);
    let nu = jacobi_eigenvalues(&g);
    let kappa_a = (mu[d_in - 1] + sa) / (mu[0] + sa);
    let kappa_g = (nu[d_out - 1] + sg) / (nu[0] + sg);
    let (ia, ig) = (1.0 / (mu[0] + sa), 1.0 / (nu[0] + sg));
    let k = d_out as f64 * kappa_g + d_in as f64 * kappa_a + (d_in + d_out) as f64;
    let tol = 8.0 * (T::eps() + EPS64) * k * ig * grad.frob() * ia;
    check_le(
        &format!(
            "precondition_inverse vs dense formula (kappa_A = {kappa_a:.3e}, kappa_G = {kappa_g:.3e})"
        ),
        v.to_m().sub(&want).frob(),
        tol,
    )
}

both_types!(
    precondition_inverse_matches_dense_damped_formula,
    prec_inv_case(),
    check_precondition_inverse
);

#[derive(Clone, Debug)]
struct SandwichCase {
    d_in: usize,
    d_out: usize,
    ainv_layout: Layout,
    ginv_layout: Layout,
    grad_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn sandwich_case() -> impl Strategy<Value = SandwichCase> {
    (
        0usize..=24,
        0usize..=24,
        layout(),
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(
            |(d_in, d_out, ainv_layout, ginv_layout, grad_layout, rayon, seed)| SandwichCase {
                d_in,
                d_out,
                ainv_layout,
                ginv_layout,
                grad_layout,
                rayon,
                seed,
            },
        )
}

/// `precondition_inverse` is `G_inv grad A_inv` for any symmetric inverses:
/// two matmuls of inner dimensions `d_out` and `d_in`, so entrywise
/// `|err| <= 2 (d_in + d_out + 2) eps (|G_inv| |grad| |A_inv|)`.
fn check_precondition_inverse_product<T: Flt>(case: &SandwichCase) -> Result<(), TestCaseError> {
    let (d_in, d_out) = (case.d_in, case.d_out);
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let a_inv = rg.matrix(d_in, d_in).sym_from_lower().round::<T>();
    let g_inv = rg.matrix(d_out, d_out).sym_from_lower().round::<T>();
    let grad = rg.matrix(d_out, d_in).round::<T>();
    let a_s = Stored::<T>::from_m(&a_inv, case.ainv_layout, T::from_f64(f64::NAN));
    let g_s = Stored::<T>::from_m(&g_inv, case.ginv_layout, T::from_f64(f64::NAN));
    let mut v = Stored::<T>::from_m(&grad, case.grad_layout, T::from_f64(SENTINEL));
    let before = v.clone();
    let mut buf = buffer(precondition_inverse_scratch::<T>(d_out, d_in, par));
    precondition_inverse(
        v.view_mut(),
        g_s.view(),
        a_s.view(),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("precondition_inverse (padding)", &before, &v, |_, _| false)?;
    let want = matmul(&matmul(&g_inv, &grad), &a_inv);
    let tol = matmul(&matmul(&g_inv.abs(), &grad.abs()), &a_inv.abs())
        .scale(2.0 * (d_in + d_out + 2) as f64 * T::eps());
    check_entrywise(
        "precondition_inverse = G_inv grad A_inv",
        &v.to_m(),
        &want,
        &tol,
        |_, _| true,
    )
}

both_types!(
    precondition_inverse_is_naive_sandwich_product,
    sandwich_case(),
    check_precondition_inverse_product
);

// ---------------------------------------------------------------------------
// kron, kron_apply
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct KronCase {
    m: usize,
    n: usize,
    p: usize,
    q: usize,
    a_layout: Layout,
    b_layout: Layout,
    x_layout: Layout,
    out_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn kron_case() -> impl Strategy<Value = KronCase> {
    (
        (0usize..=6, 0usize..=6, 0usize..=6, 0usize..=6),
        (layout(), layout(), layout(), layout()),
        (par(), any::<u64>()),
    )
        .prop_map(
            |((m, n, p, q), (a_layout, b_layout, x_layout, out_layout), (rayon, seed))| KronCase {
                m,
                n,
                p,
                q,
                a_layout,
                b_layout,
                x_layout,
                out_layout,
                rayon,
                seed,
            },
        )
}

/// `kron(A, B)[i p + k, j q + l] = A[i, j] B[k, l]`, each entry a single
/// correctly rounded product, so bitwise equal to `fl(a * b)` in `T`.
fn check_kron<T: Flt>(case: &KronCase) -> Result<(), TestCaseError> {
    let KronCase { m, n, p, q, .. } = *case;
    let mut rg = Gen::new(case.seed);
    let a = rg.matrix(m, n).round::<T>();
    let b = rg.matrix(p, q).round::<T>();
    let a_s = Stored::<T>::from_m(&a, case.a_layout, T::from_f64(f64::NAN));
    let b_s = Stored::<T>::from_m(&b, case.b_layout, T::from_f64(f64::NAN));
    let mut out = Stored::<T>::filled(m * p, n * q, case.out_layout, T::from_f64(SENTINEL));
    let before = out.clone();
    kernel_kron(out.view_mut(), a_s.view(), b_s.view()).map_err(fail)?;
    check_untouched("kron (padding)", &before, &out, |_, _| false)?;
    let want = kron(&a, &b);
    for j in 0..n * q {
        for i in 0..m * p {
            let w = T::from_f64(want[(i, j)]);
            prop_assert_eq!(out.get(i, j).bits(), w.bits(), "entry ({}, {})", i, j);
        }
    }
    Ok(())
}

both_types!(kron_matches_explicit_loops, kron_case(), check_kron);

/// `kron_apply(A, B, X) = B X A^T = unvec((A ⊗ B) vec(X))` with the
/// Kronecker product built explicitly. Two matmuls of inner dimensions `q`
/// and `n`: entrywise `|err| <= 2 (q + n + 2) eps ((|A| ⊗ |B|) vec|X|)`.
fn check_kron_apply<T: Flt>(case: &KronCase) -> Result<(), TestCaseError> {
    let KronCase { m, n, p, q, .. } = *case;
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let a = rg.matrix(m, n).round::<T>();
    let b = rg.matrix(p, q).round::<T>();
    let x = rg.matrix(q, n).round::<T>();
    let a_s = Stored::<T>::from_m(&a, case.a_layout, T::from_f64(f64::NAN));
    let b_s = Stored::<T>::from_m(&b, case.b_layout, T::from_f64(f64::NAN));
    let x_s = Stored::<T>::from_m(&x, case.x_layout, T::from_f64(f64::NAN));
    let mut out = Stored::<T>::filled(p, m, case.out_layout, T::from_f64(SENTINEL));
    let before = out.clone();
    let mut buf = buffer(kron_apply_scratch::<T>(p, n, par));
    kron_apply(
        out.view_mut(),
        a_s.view(),
        b_s.view(),
        x_s.view(),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("kron_apply (padding)", &before, &out, |_, _| false)?;
    let want = unvec(&matmul(&kron(&a, &b), &vec_of(&x)), p, m);
    let abs = unvec(&matmul(&kron(&a.abs(), &b.abs()), &vec_of(&x.abs())), p, m);
    let tol = abs.scale(2.0 * (q + n + 2) as f64 * T::eps());
    check_entrywise(
        "kron_apply = (A ⊗ B) vec(X)",
        &out.to_m(),
        &want,
        &tol,
        |_, _| true,
    )
}

both_types!(
    kron_apply_matches_explicit_kron_times_vec,
    kron_case(),
    check_kron_apply
);

// ---------------------------------------------------------------------------
// kron_damped_solve
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SolveCase {
    d_in: usize,
    d_out: usize,
    a_src: FactorSrc,
    g_src: FactorSrc,
    u_frac: f64,
    a_layout: Layout,
    g_layout: Layout,
    x_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn solve_case() -> impl Strategy<Value = SolveCase> {
    (
        (0usize..=12, 0usize..=12),
        (factor_src(), factor_src(), 0.0..=1.0f64),
        (layout(), layout(), layout()),
        (par(), any::<u64>()),
    )
        .prop_map(
            |(
                (d_in, d_out),
                (a_src, g_src, u_frac),
                (a_layout, g_layout, x_layout),
                (rayon, seed),
            )| {
                SolveCase {
                    d_in,
                    d_out,
                    a_src,
                    g_src,
                    u_frac,
                    a_layout,
                    g_layout,
                    x_layout,
                    rayon,
                    seed,
                }
            },
        )
}

/// `kron_damped_solve` solves `(A ⊗ G + damping I) vec(V) = vec(x)` reading
/// only the lower triangles of `A` and `G` (their upper triangles are NaN);
/// bounds in `common::check_kron_solution`.
fn check_kron_damped_solve<T: Flt>(case: &SolveCase) -> Result<(), TestCaseError> {
    let (d_in, d_out) = (case.d_in, case.d_out);
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let a = make_factor::<T>(&mut rg, d_in, case.a_src);
    let g = make_factor::<T>(&mut rg, d_out, case.g_src);
    let grad = rg.matrix(d_out, d_in).round::<T>();
    let damping = relative_damping::<T>(&a, &g, case.u_frac);
    let a_s = lower_only::<T>(&a, case.a_layout);
    let g_s = lower_only::<T>(&g, case.g_layout);
    let mut x = Stored::<T>::from_m(&grad, case.x_layout, T::from_f64(SENTINEL));
    let before = x.clone();
    let mut buf = buffer(kron_damped_solve_scratch::<T>(d_out, d_in, par));
    kron_damped_solve(
        x.view_mut(),
        a_s.view(),
        g_s.view(),
        T::from_f64(damping),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("kron_damped_solve (padding)", &before, &x, |_, _| false)?;
    check_kron_solution::<T>("kron_damped_solve", &x.to_m(), &a, &g, &grad, damping)
}

both_types!(
    kron_damped_solve_matches_dense_kron_solve,
    solve_case(),
    check_kron_damped_solve
);

/// Empty systems (`d_out x d_in` with a zero dimension): the scratch query
/// and the solve succeed and leave the (empty) right-hand side alone.
#[test]
fn kron_damped_solve_of_empty_system_is_ok() {
    for (d_out, d_in) in [(0, 0), (0, 3), (3, 0)] {
        let a = faer::Mat::<f64>::identity(d_in, d_in);
        let g = faer::Mat::<f64>::identity(d_out, d_out);
        let mut x = faer::Mat::<f64>::zeros(d_out, d_in);
        let mut buf = buffer(kron_damped_solve_scratch::<f64>(
            d_out,
            d_in,
            faer::Par::Seq,
        ));
        let r = kron_damped_solve(
            x.as_mut(),
            a.as_ref(),
            g.as_ref(),
            1.0,
            faer::Par::Seq,
            MemStack::new(&mut buf),
        );
        assert_eq!(r, Ok(()), "{d_out} x {d_in}");
    }
}
