//! Properties of `kernels::eigen`: the clamped symmetric eigendecomposition
//! and the eigenbasis preconditioners, against a Jacobi eigenvalue
//! reference and the dense solve of `(A ⊗ G + damping I) vec(V) = vec(grad)`.

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::MemStack;
use faer::{MatMut, MatRef, Par};
use kfac_kernels::eigen::{
    eigen_inverse_denominators, eigenbasis_drift, eigenbasis_drift_scratch, precondition_eigen,
    precondition_eigen_precomputed, precondition_eigen_scratch, sym_eigen, sym_eigen_blocked,
    sym_eigen_blocked_scratch, sym_eigen_reference, sym_eigen_reference_scratch, sym_eigen_scratch,
    BLOCKED_EIGEN_MIN_DIM,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

const SENTINEL: f64 = -77.625;

/// Runs `sym_eigen` on the lower triangle of `a` (the upper one NaN),
/// eigenvectors into storage of `q_layout`. Returns `(l, Q)`.
fn eigen_of<T: Flt>(
    a: &M,
    a_layout: Layout,
    q_layout: Layout,
    rayon: bool,
) -> Result<(Vec<T>, Stored<T>), TestCaseError> {
    eigen_with::<T>(a, a_layout, q_layout, rayon, false)
}

/// The signature of `sym_eigen` and `sym_eigen_blocked`.
type Solver<T> =
    fn(MatRef<'_, T>, &mut [T], MatMut<'_, T>, Par, &mut MemStack) -> kfac_kernels::Result<()>;

/// As [`eigen_of`], through `sym_eigen_blocked` when `blocked`.
fn eigen_with<T: Flt>(
    a: &M,
    a_layout: Layout,
    q_layout: Layout,
    rayon: bool,
    blocked: bool,
) -> Result<(Vec<T>, Stored<T>), TestCaseError> {
    let d = a.r;
    let par = par_of(rayon);
    let a_s = lower_only::<T>(a, a_layout);
    let mut l = vec![T::from_f64(f64::NAN); d];
    let mut q = Stored::<T>::filled(d, d, q_layout, T::from_f64(SENTINEL));
    let before = q.clone();
    let (solve, scratch) = if blocked {
        (
            sym_eigen_blocked::<T> as Solver<T>,
            sym_eigen_blocked_scratch::<T>(d, par),
        )
    } else {
        (sym_eigen::<T> as Solver<T>, sym_eigen_scratch::<T>(d, par))
    };
    let mut buf = buffer(scratch);
    solve(
        a_s.view(),
        &mut l,
        q.view_mut(),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched("sym_eigen eigenvectors (padding)", &before, &q, |_, _| {
        false
    })?;
    Ok((l, q))
}

// ---------------------------------------------------------------------------
// sym_eigen
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum EigInput {
    /// PSD: `X^T X / n` or a spread spectrum.
    Psd(FactorSrc),
    /// Symmetric indefinite, entries uniform in [-1, 1].
    Indefinite,
}

#[derive(Clone, Debug)]
struct EigCase {
    d: usize,
    input: EigInput,
    a_layout: Layout,
    q_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn eig_case() -> impl Strategy<Value = EigCase> {
    (
        0usize..=24,
        prop_oneof![
            4 => factor_src().prop_map(EigInput::Psd),
            1 => Just(EigInput::Indefinite),
        ],
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(|(d, input, a_layout, q_layout, rayon, seed)| EigCase {
            d,
            input,
            a_layout,
            q_layout,
            rayon,
            seed,
        })
}

/// `sym_eigen`. With `b = 8 (d + 2) eps` for the backward error
/// `||A - Q L Q^T|| <= b ||A||` and the loss of orthogonality of a
/// Householder tridiagonalization + tridiagonal eigensolver (the classical
/// `p(d) eps` with `p` linear; the `+ 2` is the tridiagonal solver's own
/// O(1) rotations, which dominate for small `d`; faer reaches up to about
/// `2.5 (d + 2) eps` (f32, d = 3) in our sweeps, and LAPACK's own acceptance
/// threshold for these ratios, normalized by `d eps`, is 60:
/// `TESTING/sep.in`):
///
/// * eigenvalues finite, `>= 0` and ascending;
/// * `||Q^T Q - I||_F <= b`;
/// * `|l_i - max(μ_i, 0)| <= b ||A||_F` against the Jacobi eigenvalues μ of
///   the same (T-rounded) matrix (Weyl: a backward error `E` moves each
///   eigenvalue by at most `||E||_2`; clamping is 1-Lipschitz);
/// * for every `l_i > 0`: `||A q_i - l_i q_i||_2 <= b ||A||_F`;
/// * on PSD inputs (the exact matrix before rounding to `T` is PSD), with
///   `z` the number of zero eigenvalues returned:
///   `||A - Q diag(l) Q^T||_F <= (b (1 + sqrt z) + 2 eps sqrt z) ||A||_F`.
///   Each clamped eigenvalue was `>= -(b + eps) ||A||_F` (backward error
///   plus the rounding of the PSD matrix to `T`, `|E| <= eps/2 |A|`
///   entrywise, plus the `eps64` construction error), so clamping adds at
///   most that much per clamped eigenvalue.
fn check_sym_eigen<T: Flt>(case: &EigCase) -> Result<(), TestCaseError> {
    let d = case.d;
    let eps = T::eps();
    let mut rg = Gen::new(case.seed);
    let a = match case.input {
        EigInput::Psd(src) => make_factor::<T>(&mut rg, d, src),
        EigInput::Indefinite => rg.matrix(d, d).sym_from_lower().round::<T>(),
    };
    let (l, q) = eigen_of::<T>(&a, case.a_layout, case.q_layout, case.rayon)?;
    let l: Vec<f64> = l.iter().map(|v| v.to_f64()).collect();
    let q = q.to_m();
    for (i, &v) in l.iter().enumerate() {
        prop_assert!(
            v.is_finite() && v >= 0.0,
            "eigenvalue {} = {} is not finite and >= 0",
            i,
            v
        );
        if i > 0 {
            prop_assert!(l[i - 1] <= v, "eigenvalues not ascending at {}: {:?}", i, l);
        }
    }
    let b = 8.0 * (d + 2) as f64 * eps;
    let norm_a = a.frob();
    check_le(
        "||Q^T Q - I||_F",
        matmul(&q.t(), &q).sub(&M::identity(d)).frob(),
        b,
    )?;
    let mu = jacobi_eigenvalues(&a);
    for i in 0..d {
        check_le(
            &format!("eigenvalue {i} vs Jacobi reference {:e}", mu[i]),
            (l[i] - mu[i].max(0.0)).abs(),
            b * norm_a,
        )?;
    }
    let aq = matmul(&a, &q);
    for (i, &li) in l.iter().enumerate() {
        if li > 0.0 {
            let r: f64 = (0..d)
                .map(|k| (aq[(k, i)] - li * q[(k, i)]).powi(2))
                .sum::<f64>()
                .sqrt();
            check_le(&format!("||A q_{i} - l_{i} q_{i}||"), r, b * norm_a)?;
        }
    }
    if let EigInput::Psd(_) = case.input {
        let ql = M::from_fn(d, d, |i, j| q[(i, j)] * l[j]);
        let recon = matmul(&ql, &q.t());
        let z = l.iter().filter(|&&v| v == 0.0).count() as f64;
        let tol = (b * (1.0 + z.sqrt()) + 2.0 * eps * z.sqrt()) * norm_a;
        check_le("||A - Q L Q^T||_F", a.sub(&recon).frob(), tol)?;
    }
    Ok(())
}

both_types!(
    sym_eigen_reconstructs_orthogonal_clamped_ascending,
    eig_case(),
    check_sym_eigen
);

/// A 0 x 0 factor (a layer with no inputs and no bias): the scratch query
/// and the decomposition succeed and do nothing.
#[test]
fn sym_eigen_of_empty_matrix_is_ok() {
    let a = faer::Mat::<f64>::zeros(0, 0);
    let mut q = faer::Mat::<f64>::zeros(0, 0);
    let mut l: Vec<f64> = vec![];
    let mut buf = buffer(sym_eigen_scratch::<f64>(0, faer::Par::Seq));
    sym_eigen(
        a.as_ref(),
        &mut l,
        q.as_mut(),
        faer::Par::Seq,
        MemStack::new(&mut buf),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// precondition_eigen / precondition_eigen_precomputed
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct PrecCase {
    d_in: usize,
    d_out: usize,
    a_src: FactorSrc,
    g_src: FactorSrc,
    u_frac: f64,
    grad_layout: Layout,
    qa_layout: Layout,
    qg_layout: Layout,
    denom_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn prec_case() -> impl Strategy<Value = PrecCase> {
    (
        (
            0usize..=12,
            0usize..=12,
            factor_src(),
            factor_src(),
            0.0..=1.0f64,
        ),
        (layout(), layout(), layout(), layout()),
        (par(), any::<u64>()),
    )
        .prop_map(
            |(
                (d_in, d_out, a_src, g_src, u_frac),
                (grad_layout, qa_layout, qg_layout, denom_layout),
                (rayon, seed),
            )| PrecCase {
                d_in,
                d_out,
                a_src,
                g_src,
                u_frac,
                grad_layout,
                qa_layout,
                qg_layout,
                denom_layout,
                rayon,
                seed,
            },
        )
}

struct Prepared<T> {
    a: M,
    g: M,
    grad: M,
    damping: f64,
    la: Vec<T>,
    qa: Stored<T>,
    lg: Vec<T>,
    qg: Stored<T>,
    grad_s: Stored<T>,
}

fn prepare<T: Flt>(case: &PrecCase) -> Result<Prepared<T>, TestCaseError> {
    let mut rg = Gen::new(case.seed);
    let a = make_factor::<T>(&mut rg, case.d_in, case.a_src);
    let g = make_factor::<T>(&mut rg, case.d_out, case.g_src);
    let grad = rg.matrix(case.d_out, case.d_in).round::<T>();
    let damping = relative_damping::<T>(&a, &g, case.u_frac);
    let (la, qa) = eigen_of::<T>(&a, Layout::ColMajor, case.qa_layout, case.rayon)?;
    let (lg, qg) = eigen_of::<T>(&g, Layout::RowMajor, case.qg_layout, case.rayon)?;
    let grad_s = Stored::<T>::from_m(&grad, case.grad_layout, T::from_f64(SENTINEL));
    Ok(Prepared {
        a,
        g,
        grad,
        damping,
        la,
        qa,
        lg,
        qg,
        grad_s,
    })
}

/// `precondition_eigen(grad)` solves `(A ⊗ G + damping I) vec(V) =
/// vec(grad)`; bounds in `common::check_kron_solution`.
fn check_precondition_eigen<T: Flt>(case: &PrecCase) -> Result<(), TestCaseError> {
    let mut p = prepare::<T>(case)?;
    let par = par_of(case.rayon);
    let before = p.grad_s.clone();
    let mut buf = buffer(precondition_eigen_scratch::<T>(case.d_out, case.d_in, par));
    precondition_eigen(
        p.grad_s.view_mut(),
        p.qg.view(),
        &p.lg,
        p.qa.view(),
        &p.la,
        T::from_f64(p.damping),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched(
        "precondition_eigen (padding)",
        &before,
        &p.grad_s,
        |_, _| false,
    )?;
    check_kron_solution::<T>(
        "precondition_eigen",
        &p.grad_s.to_m(),
        &p.a,
        &p.g,
        &p.grad,
        p.damping,
    )
}

both_types!(
    precondition_eigen_matches_dense_kron_solve,
    prec_case(),
    check_precondition_eigen
);

/// `eigen_inverse_denominators` is `1 / (l_G[i] l_A[j] + damping)` within
/// three roundings (`2 eps` relative), and `precondition_eigen_precomputed`
/// with it solves the damped Kronecker system (bounds in
/// `common::check_kron_solution`).
fn check_precondition_precomputed<T: Flt>(case: &PrecCase) -> Result<(), TestCaseError> {
    let mut p = prepare::<T>(case)?;
    let par = par_of(case.rayon);
    let mut den = Stored::<T>::filled(
        case.d_out,
        case.d_in,
        case.denom_layout,
        T::from_f64(SENTINEL),
    );
    let den_before = den.clone();
    eigen_inverse_denominators(den.view_mut(), &p.lg, &p.la, T::from_f64(p.damping))
        .map_err(fail)?;
    check_untouched(
        "eigen_inverse_denominators (padding)",
        &den_before,
        &den,
        |_, _| false,
    )?;
    let want = M::from_fn(case.d_out, case.d_in, |i, j| {
        1.0 / (p.lg[i].to_f64() * p.la[j].to_f64() + p.damping)
    });
    let tol = want.scale(2.0 * T::eps());
    check_entrywise(
        "eigen_inverse_denominators",
        &den.to_m(),
        &want,
        &tol,
        |_, _| true,
    )?;

    let before = p.grad_s.clone();
    let mut buf = buffer(precondition_eigen_scratch::<T>(case.d_out, case.d_in, par));
    precondition_eigen_precomputed(
        p.grad_s.view_mut(),
        p.qg.view(),
        p.qa.view(),
        den.view(),
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    check_untouched(
        "precondition_eigen_precomputed (padding)",
        &before,
        &p.grad_s,
        |_, _| false,
    )?;
    check_kron_solution::<T>(
        "precondition_eigen_precomputed",
        &p.grad_s.to_m(),
        &p.a,
        &p.g,
        &p.grad,
        p.damping,
    )
}

both_types!(
    precondition_eigen_precomputed_matches_dense_kron_solve,
    prec_case(),
    check_precondition_precomputed
);

// ---------------------------------------------------------------------------
// The error of the f32 path, which `Precision::Auto` (kfac-runtime)
// predicts as `eps λmax(A) λmax(G) / damping`.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct F32Case {
    d_in: usize,
    d_out: usize,
    a_src: FactorSrc,
    g_src: FactorSrc,
    /// log10 of `damping / (λmax(A) λmax(G))`.
    log_r: f64,
    seed: u64,
}

fn f32_case() -> impl Strategy<Value = F32Case> {
    (
        1usize..=24,
        1usize..=12,
        factor_src(),
        factor_src(),
        -6.0..=0.0f64,
        any::<u64>(),
    )
        .prop_map(|(d_in, d_out, a_src, g_src, log_r, seed)| F32Case {
            d_in,
            d_out,
            a_src,
            g_src,
            log_r,
            seed,
        })
}

proptest! {
    #![proptest_config(config())]

    /// The eigenbasis preconditioner computed entirely in f32 (f32
    /// decompositions, f32 preconditioning) is within
    /// `eps (4 λmax(A) λmax(G) / damping + 8 (d + 2))` (relative, Frobenius)
    /// of the dense f64 solve on the same f32 factors: the damping-dependent
    /// part is 4x the predictor `Precision::Auto` uses (the small
    /// eigenvalues' absolute error `~ eps λmax` over the damping; measured
    /// up to 0.11 of it at d = 1024-2304 by the `precision` example, but
    /// this test found 2.04x at d = 3 with columns scaled down to 1e-3, so
    /// the constant is 4, not 1), the rest is the damping-independent
    /// rounding of the decompositions and the four products (`b` of
    /// `sym_eigen`'s bound).
    #[test]
    fn f32_path_error_is_within_the_automatic_precision_predictor(case in f32_case()) {
        let mut rg = Gen::new(case.seed);
        let a = make_factor::<f32>(&mut rg, case.d_in, case.a_src);
        let g = make_factor::<f32>(&mut rg, case.d_out, case.g_src);
        let grad = rg.matrix(case.d_out, case.d_in).round::<f32>();
        let top = |m: &M| jacobi_eigenvalues(m).last().copied().unwrap_or(0.0).max(0.0);
        let scale = top(&a) * top(&g);
        prop_assume!(scale > 0.0);
        let damping = <f32 as Flt>::round(10f64.powf(case.log_r) * scale);
        prop_assume!(damping > 0.0);
        let (la, qa) = eigen_of::<f32>(&a, Layout::ColMajor, Layout::ColMajor, false)?;
        let (lg, qg) = eigen_of::<f32>(&g, Layout::ColMajor, Layout::ColMajor, false)?;
        let mut v = Stored::<f32>::from_m(&grad, Layout::ColMajor, 0.0);
        let mut buf = buffer(precondition_eigen_scratch::<f32>(case.d_out, case.d_in, faer::Par::Seq));
        precondition_eigen(
            v.view_mut(),
            qg.view(),
            &lg,
            qa.view(),
            &la,
            damping as f32,
            faer::Par::Seq,
            MemStack::new(&mut buf),
        )
        .map_err(fail)?;
        let (want, _) = dense_kron_solve(&a, &g, &grad, damping);
        let norm = want.frob();
        prop_assume!(norm > 0.0);
        let err = v.to_m().sub(&want).frob() / norm;
        let d = case.d_in.max(case.d_out) as f64;
        let eps = <f32 as Flt>::eps();
        let tol = eps * (4.0 * scale / damping + 8.0 * (d + 2.0));
        check_le("relative error of the f32 path", err, tol)?;
    }
}

// ---------------------------------------------------------------------------
// eigenbasis_drift
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DriftCase {
    d: usize,
    src: FactorSrc,
    /// log10 of the perturbation's size relative to `||F||_F` (below -9:
    /// none, `Q` is `F`'s eigenbasis).
    log_delta: f64,
    f_layout: Layout,
    q_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn drift_case() -> impl Strategy<Value = DriftCase> {
    (
        0usize..=24,
        factor_src(),
        -10.0..=0.0f64,
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(
            |(d, src, log_delta, f_layout, q_layout, rayon, seed)| DriftCase {
                d,
                src,
                log_delta,
                f_layout,
                q_layout,
                rayon,
                seed,
            },
        )
}

/// `eigenbasis_drift` against `B = Q^T F Q` computed in f64: with `F` a
/// factor in an orthogonal basis `Q` plus a symmetric perturbation, the
/// returned `||B - diag(B)||_F` and the clamped diagonal are within
/// `4 (d + 2) eps ||F||_F` (two rounded products of length `d`) of the
/// reference; with no perturbation the drift is at most that bound.
fn check_drift<T: Flt>(case: &DriftCase) -> Result<(), TestCaseError> {
    let d = case.d;
    let eps = T::eps();
    let mut rg = Gen::new(case.seed);
    let base = make_factor::<T>(&mut rg, d, case.src);
    let q = rg.orthogonal(d).round::<T>();
    let l = jacobi_eigenvalues(&base);
    let mut f = matmul(&M::from_fn(d, d, |i, j| q[(i, j)] * l[j]), &q.t());
    if case.log_delta > -9.0 {
        let s = rg.matrix(d, d).sym_from_lower();
        let scale = 10f64.powf(case.log_delta) * f.frob() / s.frob().max(1e-300);
        f = f.add(&s.scale(scale));
    }
    let f = f.sym_from_lower().round::<T>();
    let b = matmul(&q.t(), &matmul(&f, &q));
    let off_ref = M::from_fn(d, d, |i, j| if i == j { 0.0 } else { b[(i, j)] }).frob();
    let fs = Stored::<T>::from_m(&f, case.f_layout, T::from_f64(SENTINEL));
    let qs = Stored::<T>::from_m(&q, case.q_layout, T::from_f64(SENTINEL));
    let par = par_of(case.rayon);
    let mut out = vec![T::from_f64(f64::NAN); d];
    let mut buf = buffer(eigenbasis_drift_scratch::<T>(d, par));
    let off = eigenbasis_drift(fs.view(), qs.view(), &mut out, par, MemStack::new(&mut buf))
        .map_err(fail)?;
    let tol = 4.0 * (d + 2) as f64 * eps * f.frob();
    check_le("drift vs reference", (off - off_ref).abs(), tol)?;
    if case.log_delta <= -9.0 {
        check_le("drift of an exact eigenbasis", off, tol)?;
    }
    for i in 0..d {
        check_le(
            &format!("eigenvalue estimate {i}"),
            (out[i].to_f64() - b[(i, i)].max(0.0)).abs(),
            tol,
        )?;
        prop_assert!(out[i].to_f64() >= 0.0);
    }
    Ok(())
}

both_types!(
    eigenbasis_drift_matches_the_f64_rotation,
    drift_case(),
    check_drift
);

// ---------------------------------------------------------------------------
// sym_eigen at panel sizes: the blocked tridiagonalization (d > 128)
// ---------------------------------------------------------------------------

/// Spectra of the blocked-path sweep.
#[derive(Clone, Copy, Debug)]
enum Spectrum {
    /// `X^T X / n` with `n = 2 d` uniform rows (Marchenko-Pastur).
    Wishart,
    /// `X^T X / n` with `n = d / 3`: two thirds of the eigenvalues zero.
    RankDeficient,
    /// `l_k = (k + 1)^-2`.
    PowerLaw,
    /// Eight clusters of equal eigenvalues, each split by 1e-7 relative.
    Clustered,
}

/// `(A, exact eigenvalues ascending or None)` rounded to `T`.
fn spectrum_matrix<T: Flt>(rg: &mut Gen, d: usize, s: Spectrum) -> (M, Option<Vec<f64>>) {
    let planted = |rg: &mut Gen, l: Vec<f64>| {
        let q = rg.orthogonal(d);
        let ql = M::from_fn(d, d, |i, k| q[(i, k)] * l[k]);
        let a = matmul(&ql, &q.t());
        let a = M::from_fn(d, d, |i, j| if i >= j { a[(i, j)] } else { a[(j, i)] });
        let mut l = l;
        l.sort_by(f64::total_cmp);
        (a.round::<T>(), Some(l))
    };
    match s {
        Spectrum::Wishart => (psd_factor::<T>(rg, 2 * d, d, Kind::Uniform), None),
        Spectrum::RankDeficient => (psd_factor::<T>(rg, d / 3, d, Kind::Uniform), None),
        Spectrum::PowerLaw => planted(rg, (0..d).map(|k| 1.0 / ((k + 1) as f64).powi(2)).collect()),
        Spectrum::Clustered => planted(
            rg,
            (0..d)
                .map(|k| (1 + k % 8) as f64 * (1.0 + 1e-7 * (k / 8) as f64))
                .collect(),
        ),
    }
}

/// At sizes that take the panel path (one panel and an unblocked tail,
/// several panels, and panels whose products run on a two-thread team),
/// for each spectrum and both types: the bounds of
/// `check_sym_eigen` (`b = 8 (d + 2) eps`: orthogonality, every positive
/// pair's residual, reconstruction), the eigenvalues against the planted
/// ones (Weyl: `b ||A||_F` plus the rounding of `A` to `T`) or, without a
/// planted spectrum, against faer's f64 eigenvalues; and the result
/// bitwise the same on one thread and on two. At order 520 (Wishart only,
/// for time), `sym_eigen` on two threads must be exactly
/// `sym_eigen_blocked` on one (the dispatch and the invariance at a size
/// where every stage runs in parallel).
fn check_blocked<T: Flt>() {
    for (i, &d) in [130usize, 203, 300, 520].iter().enumerate() {
        for (j, &s) in [
            Spectrum::Wishart,
            Spectrum::RankDeficient,
            Spectrum::PowerLaw,
            Spectrum::Clustered,
        ]
        .iter()
        .enumerate()
        {
            if d >= BLOCKED_EIGEN_MIN_DIM && j > 0 {
                continue;
            }
            let mut rg = Gen::new(1000 + 10 * i as u64 + j as u64);
            let (a, planted) = spectrum_matrix::<T>(&mut rg, d, s);
            let what = format!("{} d={d} {s:?}", T::NAME);
            let (l, q) =
                eigen_with::<T>(&a, Layout::ColMajor, Layout::ColMajor, false, true).unwrap();
            // Through the dispatch at the large size, directly below it.
            let dispatch = d >= BLOCKED_EIGEN_MIN_DIM;
            let (l2, q2) =
                eigen_with::<T>(&a, Layout::ColMajor, Layout::ColMajor, true, !dispatch).unwrap();
            let first_diff = |x: &[f64], y: &[f64]| {
                x.iter()
                    .zip(y)
                    .position(|(x, y)| x.to_bits() != y.to_bits())
            };
            let as_f64 = |x: &[T]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
            let diff = first_diff(&as_f64(&l), &as_f64(&l2));
            assert!(
                diff.is_none(),
                "{what}: eigenvalue {diff:?} differs on two threads"
            );
            let (qm, qm2) = (q.to_m(), q2.to_m());
            let diff = first_diff(&qm.d, &qm2.d);
            assert!(
                diff.is_none(),
                "{what}: eigenvector entry {diff:?} differs on two threads"
            );
            check_accuracy::<T>(&what, &a, planted.as_deref(), &l, &qm);
            // The one-thread path below the blocked sizes (faer's solver
            // with our divide-and-conquer leaves).
            if !dispatch {
                let (l3, q3) =
                    eigen_with::<T>(&a, Layout::ColMajor, Layout::ColMajor, false, false).unwrap();
                let what = format!("{what} (sym_eigen, one thread)");
                check_accuracy::<T>(&what, &a, planted.as_deref(), &l3, &q3.to_m());
            }
        }
    }
}

/// The bounds of [`check_blocked`] for one decomposition `(l, Q)` of `a`.
fn check_accuracy<T: Flt>(what: &str, a: &M, planted: Option<&[f64]>, l: &[T], qm: &M) {
    let d = a.r;
    let eps = T::eps();
    let b = 8.0 * (d + 2) as f64 * eps;
    let norm_a = a.frob();
    let l: Vec<f64> = l.iter().map(|v| v.to_f64()).collect();
    let orth = matmul(&qm.t(), qm).sub(&M::identity(d)).frob();
    assert!(orth <= b, "{what}: ||Q^T Q - I|| = {orth:e} > {b:e}");
    let aq = matmul(a, qm);
    for (k, &lk) in l.iter().enumerate() {
        if k > 0 {
            assert!(l[k - 1] <= lk, "{what}: not ascending at {k}");
        }
        if lk > 0.0 {
            let r = (0..d)
                .map(|r| (aq[(r, k)] - lk * qm[(r, k)]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                r <= b * norm_a,
                "{what}: residual {k} = {r:e} > {:e}",
                b * norm_a
            );
        }
    }
    // Without a planted spectrum: faer's eigenvalues (its own
    // unblocked reduction and QR iteration) of the same matrix in f64.
    let reference = planted.map(<[f64]>::to_vec).unwrap_or_else(|| {
        faer::Mat::<f64>::from_fn(d, d, |r, c| a[(r, c)])
            .self_adjoint_eigenvalues(faer::Side::Lower)
            .unwrap()
    });
    let tol = (b + eps) * norm_a;
    for (k, (&lk, &mu)) in l.iter().zip(&reference).enumerate() {
        assert!(
            (lk - mu.max(0.0)).abs() <= tol,
            "{what}: eigenvalue {k}: {lk:e} vs {mu:e}, tol {tol:e}"
        );
    }
}

#[test]
fn sym_eigen_blocked_path_is_accurate_and_thread_count_invariant_f32() {
    check_blocked::<f32>();
}

#[test]
fn sym_eigen_blocked_path_is_accurate_and_thread_count_invariant_f64() {
    check_blocked::<f64>();
}

/// `sym_eigen_reference` (what kfac-pytorch mode uses) is faer's default
/// solver, bit for bit, at a size where our tuned divide and conquer would
/// differ from it (d = 150: faer's default solves it by QR iteration).
#[test]
fn sym_eigen_reference_is_faers_default_solver_bitwise() {
    let d = 150;
    let mut rg = Gen::new(77);
    let (a, _) = spectrum_matrix::<f32>(&mut rg, d, Spectrum::Wishart);
    let a32 = faer::Mat::<f32>::from_fn(d, d, |i, j| a[(i.max(j), i.min(j))] as f32);
    let mut l = vec![0f32; d];
    let mut q = faer::Mat::<f32>::zeros(d, d);
    let mut buf = buffer(sym_eigen_reference_scratch::<f32>(d, Par::Seq));
    sym_eigen_reference(
        a32.as_ref(),
        &mut l,
        q.as_mut(),
        Par::Seq,
        MemStack::new(&mut buf),
    )
    .unwrap();
    let mut s = faer::Mat::<f32>::zeros(d, 1);
    let mut u = faer::Mat::<f32>::zeros(d, d);
    let mut fb = buffer(faer::linalg::evd::self_adjoint_evd_scratch::<f32>(
        d,
        faer::linalg::evd::ComputeEigenvectors::Yes,
        Par::Seq,
        Default::default(),
    ));
    faer::linalg::evd::self_adjoint_evd(
        a32.as_ref(),
        s.as_mut().col_mut(0).as_diagonal_mut(),
        Some(u.as_mut()),
        Par::Seq,
        MemStack::new(&mut fb),
        Default::default(),
    )
    .unwrap();
    for i in 0..d {
        assert_eq!(
            l[i].to_bits(),
            s[(i, 0)].max(0.0).to_bits(),
            "eigenvalue {i}"
        );
        for j in 0..d {
            assert_eq!(q[(i, j)].to_bits(), u[(i, j)].to_bits(), "Q[{i}, {j}]");
        }
    }
}

/// The two-thread team of the blocked reduction never waits for a helper
/// that cannot run: in a pool of one thread (the helper only runs after
/// the master has finished, if at all) `Par::rayon(2)` completes and gives
/// the bits of `Par::Seq`; the same in a pool of two threads whose other
/// thread is kept busy for the whole decomposition.
#[test]
fn blocked_team_completes_without_a_second_thread() {
    let d = 300;
    let mut rg = Gen::new(5);
    let (a, _) = spectrum_matrix::<f32>(&mut rg, d, Spectrum::Wishart);
    let a32 = faer::Mat::<f32>::from_fn(d, d, |i, j| a[(i.max(j), i.min(j))] as f32);
    let solve = |par: Par| {
        let mut l = vec![0f32; d];
        let mut q = faer::Mat::<f32>::zeros(d, d);
        let mut buf = buffer(sym_eigen_blocked_scratch::<f32>(d, par));
        sym_eigen_blocked(
            a32.as_ref(),
            &mut l,
            q.as_mut(),
            par,
            MemStack::new(&mut buf),
        )
        .unwrap();
        (l, q)
    };
    let seq = solve(Par::Seq);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(one.install(|| solve(Par::rayon(2))), seq);
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let busy = std::sync::atomic::AtomicBool::new(true);
    let got = two.install(|| {
        rayon::join(
            || {
                let r = solve(Par::rayon(2));
                busy.store(false, std::sync::atomic::Ordering::Release);
                r
            },
            || {
                while busy.load(std::sync::atomic::Ordering::Acquire) {
                    std::hint::spin_loop();
                }
            },
        )
        .0
    });
    assert_eq!(got, seq);
}

/// Factors near both ends of f32's range (largest entry from 1e-34 to
/// 1e37): the blocked path is as robust as faer's solver — both succeed
/// with finite eigenvalues, orthogonal vectors and the largest eigenvalue
/// within the usual bound.
#[test]
fn blocked_path_handles_factors_near_overflow_and_underflow() {
    let d = 200;
    let mut rg = Gen::new(9);
    let (a, _) = spectrum_matrix::<f32>(&mut rg, d, Spectrum::Wishart);
    let peak = (0..d)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .fold(0.0f64, |m, (i, j)| m.max(a[(i, j)].abs()));
    for scale in [1e30, 1e36, 1e37, 1e-30, 1e-34] {
        let s = scale / peak;
        let a32 = faer::Mat::<f32>::from_fn(d, d, |i, j| (a[(i.max(j), i.min(j))] * s) as f32);
        for blocked in [false, true] {
            let mut l = vec![0f32; d];
            let mut q = faer::Mat::<f32>::zeros(d, d);
            let r = if blocked {
                let mut buf = buffer(sym_eigen_blocked_scratch::<f32>(d, Par::Seq));
                sym_eigen_blocked(
                    a32.as_ref(),
                    &mut l,
                    q.as_mut(),
                    Par::Seq,
                    MemStack::new(&mut buf),
                )
            } else {
                let mut buf = buffer(sym_eigen_scratch::<f32>(d, Par::Seq));
                sym_eigen(
                    a32.as_ref(),
                    &mut l,
                    q.as_mut(),
                    Par::Seq,
                    MemStack::new(&mut buf),
                )
            };
            let what = format!("scale {scale:e}, blocked {blocked}");
            match r {
                Ok(()) => {
                    assert!(l.iter().all(|v| v.is_finite()), "{what}: eigenvalues");
                    let qm = M::from_fn(d, d, |i, j| q[(i, j)] as f64);
                    let orth = matmul(&qm.t(), &qm).sub(&M::identity(d)).frob();
                    let b = 8.0 * (d + 2) as f64 * f32::EPSILON as f64;
                    assert!(orth <= b, "{what}: ||Q^T Q - I|| = {orth:e}");
                    let top = l[d - 1] as f64 / s;
                    let want = faer::Mat::<f64>::from_fn(d, d, |i, j| a[(i, j)])
                        .self_adjoint_eigenvalues(faer::Side::Lower)
                        .unwrap()[d - 1];
                    assert!(
                        (top - want).abs() <= 2.0 * b * want,
                        "{what}: largest eigenvalue {top:e} vs {want:e}"
                    );
                }
                Err(e) => panic!("{what}: refused: {e}"),
            }
        }
    }
}
