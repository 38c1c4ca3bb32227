//! Properties of `kernels::factor`: the symmetric rank-k update with the bias
//! folded in, the running average (eager and lazily scaled) and
//! `mirror_lower`, against naive f64 loops.

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::MemStack;
use kfac_kernels::factor::{
    materialize_lazy, mirror_lower, running_average, running_average_lazy, syrk_update,
    syrk_update_scratch,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

/// A sentinel for entries and padding that must not be written.
const SENTINEL: f64 = -77.625;

// ---------------------------------------------------------------------------
// syrk_update
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SyrkCase {
    n: usize,
    d: usize,
    bias: bool,
    alpha: f64,
    beta: f64,
    kind: Kind,
    x_layout: Layout,
    c_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn syrk_case() -> impl Strategy<Value = SyrkCase> {
    (
        0usize..=40,
        0usize..=40,
        any::<bool>(),
        prop_oneof![Just(0.0), Just(1.0), -2.0..2.0f64],
        prop_oneof![Just(1.0), -2.0..2.0f64],
        kind(),
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(
            |(n, d, bias, alpha, beta, kind, x_layout, c_layout, rayon, seed)| SyrkCase {
                n,
                d,
                bias,
                alpha,
                beta,
                kind,
                x_layout,
                c_layout,
                rayon,
                seed,
            },
        )
}

/// `C <- alpha C + beta [X 1]^T [X 1]` on the lower triangle.
///
/// Tolerance: each lower entry is `alpha c + beta Σ_k x_ki x_kj`, a sum of
/// `n + 1` products and two scalings, so
/// `|err| <= 2 (n + 4) eps (|alpha| |c| + |beta| Σ_k |x_ki| |x_kj|)`
/// (componentwise, whatever the summation order or blocking).
fn check_syrk<T: Flt>(case: &SyrkCase) -> Result<(), TestCaseError> {
    let SyrkCase { n, d, bias, .. } = *case;
    let par = par_of(case.rayon);
    let mut rng = Gen::new(case.seed);
    let x = activations(&mut rng, n, d, case.kind).round::<T>();
    let dim = d + bias as usize;
    let c0 = rng.matrix(dim, dim).round::<T>();
    let (alpha, beta) = (T::round(case.alpha), T::round(case.beta));

    let xs = Stored::<T>::from_m(&x, case.x_layout, T::from_f64(f64::NAN));
    let mut c = Stored::<T>::from_m(&c0, case.c_layout, T::from_f64(SENTINEL));
    if alpha == 0.0 {
        // alpha == 0 must not read C: NaN in the old lower triangle is
        // overwritten.
        for j in 0..dim {
            for i in j..dim {
                c.set(i, j, T::from_f64(f64::NAN));
            }
        }
    }
    let before = c.clone();
    let mut buf = buffer(syrk_update_scratch::<T>(n, d, bias, par));
    syrk_update(
        c.view_mut(),
        T::from_f64(alpha),
        T::from_f64(beta),
        xs.view(),
        bias,
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;

    let xa = with_bias(&x, bias);
    let g = gram(&xa);
    let g_abs = gram(&xa.abs());
    let c_part = if alpha == 0.0 {
        M::zeros(dim, dim)
    } else {
        c0.scale(alpha)
    };
    let want = c_part.add(&g.scale(beta));
    let tol = c_part
        .abs()
        .add(&g_abs.scale(beta.abs()))
        .scale(2.0 * (n + 4) as f64 * T::eps());
    check_entrywise("syrk_update lower triangle", &c.to_m(), &want, &tol, lower)?;
    check_untouched("syrk_update", &before, &c, strict_upper)
}

both_types!(
    syrk_update_matches_naive_gram_and_leaves_upper_untouched,
    syrk_case(),
    check_syrk
);

/// Shapes past the register kernels' blocking: several blocks of 256 rows
/// (and a ragged last one), several register tiles of rows (48 in f32, 24
/// in f64) and columns (8), and products large enough to be split over two
/// threads.
fn syrk_case_blocked() -> impl Strategy<Value = SyrkCase> {
    (syrk_case(), 1usize..=600, 41usize..=200).prop_map(|(mut case, n, d)| {
        case.n = n;
        case.d = d;
        case
    })
}

both_types!(
    syrk_update_matches_naive_gram_past_the_blocking,
    syrk_case_blocked(),
    check_syrk
);

/// The register kernels' row blocks (about 1000 rows of `C` in f32, 500 in
/// f64) crossed, in every layout: one fixed case per type and layout.
#[test]
fn syrk_update_matches_naive_gram_across_row_blocks() {
    for layout in [
        Layout::ColMajor,
        Layout::RowMajor,
        Layout::ColStrided(3),
        Layout::RowStrided(1),
        Layout::Reversed,
    ] {
        for rayon in [false, true] {
            let case = SyrkCase {
                n: 300,
                d: 1100,
                bias: true,
                alpha: 0.5,
                beta: -1.25,
                kind: Kind::Uniform,
                x_layout: Layout::RowMajor,
                c_layout: layout,
                rayon,
                seed: 7,
            };
            check_syrk::<f32>(&case).unwrap();
            check_syrk::<f64>(&SyrkCase {
                d: 600,
                ..case.clone()
            })
            .unwrap();
        }
    }
}

/// One thread and two give the same bits (threads split the rows of `C`,
/// never a sum).
fn check_syrk_threads_bitwise<T: Flt>(case: &SyrkCase) -> Result<(), TestCaseError> {
    let SyrkCase { n, d, .. } = *case;
    let mut rng = Gen::new(case.seed);
    let x = activations(&mut rng, n, d, case.kind).round::<T>();
    let c0 = rng.matrix(d, d).round::<T>();
    let xs = Stored::<T>::from_m(&x, case.x_layout, T::from_f64(f64::NAN));
    let mut out = Vec::new();
    for par in [faer::Par::Seq, faer::Par::rayon(2)] {
        let mut c = Stored::<T>::from_m(&c0, case.c_layout, T::from_f64(SENTINEL));
        let mut buf = buffer(syrk_update_scratch::<T>(n, d, false, par));
        syrk_update(
            c.view_mut(),
            T::from_f64(case.alpha),
            T::from_f64(case.beta),
            xs.view(),
            false,
            par,
            MemStack::new(&mut buf),
        )
        .map_err(fail)?;
        out.push(c);
    }
    for j in 0..d {
        for i in 0..d {
            let (a, b) = (out[0].get(i, j), out[1].get(i, j));
            prop_assert!(
                a.bits() == b.bits(),
                "C[{i},{j}]: {a} on one thread, {b} on two"
            );
        }
    }
    Ok(())
}

both_types!(
    syrk_update_gives_the_same_bits_on_one_and_two_threads,
    syrk_case_blocked(),
    check_syrk_threads_bitwise
);

// ---------------------------------------------------------------------------
// running_average
// ---------------------------------------------------------------------------

fn xi() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(0.0),
        1 => Just(1.0),
        3 => 0.0..=1.0f64,
        1 => 1e-3..2e-2f64,
        2 => 0.9..1.0f64,
    ]
}

#[derive(Clone, Debug)]
struct AvgCase {
    n: usize,
    d: usize,
    bias: bool,
    xi: f64,
    kind: Kind,
    x_layout: Layout,
    c_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn avg_case() -> impl Strategy<Value = AvgCase> {
    (
        1usize..=40,
        0usize..=40,
        any::<bool>(),
        xi(),
        kind(),
        layout(),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(
            |(n, d, bias, xi, kind, x_layout, c_layout, rayon, seed)| AvgCase {
                n,
                d,
                bias,
                xi,
                kind,
                x_layout,
                c_layout,
                rayon,
                seed,
            },
        )
}

/// `C <- xi C + (1 - xi) [X 1]^T [X 1] / n` on the lower triangle.
///
/// Tolerance as for `syrk_update`, with three more roundings for
/// `(1 - xi) / n`: `2 (n + 7) eps (xi |c| + (1 - xi)/n Σ_k |x_ki x_kj|)`.
fn check_running_average<T: Flt>(case: &AvgCase) -> Result<(), TestCaseError> {
    let AvgCase { n, d, bias, .. } = *case;
    let par = par_of(case.rayon);
    let mut rng = Gen::new(case.seed);
    let x = activations(&mut rng, n, d, case.kind).round::<T>();
    let dim = d + bias as usize;
    let c0 = rng.matrix(dim, dim).round::<T>();
    let xi = T::round(case.xi);

    let xs = Stored::<T>::from_m(&x, case.x_layout, T::from_f64(f64::NAN));
    let mut c = Stored::<T>::from_m(&c0, case.c_layout, T::from_f64(SENTINEL));
    let before = c.clone();
    let mut buf = buffer(syrk_update_scratch::<T>(n, d, bias, par));
    running_average(
        c.view_mut(),
        T::from_f64(xi),
        xs.view(),
        bias,
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;

    let xa = with_bias(&x, bias);
    let w = (1.0 - xi) / n as f64;
    let c_part = if xi == 0.0 {
        M::zeros(dim, dim)
    } else {
        c0.scale(xi)
    };
    let want = c_part.add(&gram(&xa).scale(w));
    let tol = c_part
        .abs()
        .add(&gram(&xa.abs()).scale(w))
        .scale(2.0 * (n + 7) as f64 * T::eps());
    check_entrywise(
        "running_average lower triangle",
        &c.to_m(),
        &want,
        &tol,
        lower,
    )?;
    check_untouched("running_average", &before, &c, strict_upper)
}

both_types!(
    running_average_matches_eager_recurrence,
    avg_case(),
    check_running_average
);

// ---------------------------------------------------------------------------
// running_average_lazy + materialize_lazy
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Step {
    n: usize,
    xi: f64,
    kind: Kind,
    x_layout: Layout,
}

#[derive(Clone, Debug)]
struct LazyCase {
    d: usize,
    bias: bool,
    scale0: f64,
    steps: Vec<Step>,
    c_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn lazy_case() -> impl Strategy<Value = LazyCase> {
    let step = (1usize..=16, xi(), kind(), layout()).prop_map(|(n, xi, kind, x_layout)| Step {
        n,
        xi,
        kind,
        x_layout,
    });
    (
        0usize..=16,
        any::<bool>(),
        prop_oneof![Just(1.0), 0.25..4.0f64],
        proptest::collection::vec(step, 1..=8),
        layout(),
        par(),
        any::<u64>(),
    )
        .prop_map(|(d, bias, scale0, steps, c_layout, rayon, seed)| LazyCase {
            d,
            bias,
            scale0,
            steps,
            c_layout,
            rayon,
            seed,
        })
}

/// A sequence of lazily-scaled updates, then `materialize_lazy`, equals the
/// eager recurrence `F <- xi F + (1 - xi) [X 1]^T [X 1] / n` started from
/// `F_0 = scale_0 C_0`.
///
/// Tolerance: every step adds at most `2 (n_k + 8) eps` relative to the
/// absolute-value recurrence `|F| <- xi |F| + (1 - xi) |X|^T |X| / n` (the
/// lazy scale is a product of the `xi` and carries `k eps` more), so after
/// `K` steps `|err| <= 2 (K + 1) (max n_k + 8 + K) eps |F|_abs`.
fn check_lazy<T: Flt>(case: &LazyCase) -> Result<(), TestCaseError> {
    let LazyCase { d, bias, .. } = *case;
    let par = par_of(case.rayon);
    let dim = d + bias as usize;
    let mut rng = Gen::new(case.seed);
    let c0 = rng.matrix(dim, dim).map(f64::abs).round::<T>();
    let s0 = T::round(case.scale0);
    let mut f = c0.scale(s0);
    let mut f_abs = f.clone();

    let mut c = Stored::<T>::from_m(&c0, case.c_layout, T::from_f64(SENTINEL));
    let before = c.clone();
    let mut scale = T::from_f64(s0);
    let mut n_max = 0;
    for (k, step) in case.steps.iter().enumerate() {
        let x = activations(&mut rng, step.n, d, step.kind).round::<T>();
        let xs = Stored::<T>::from_m(&x, step.x_layout, T::from_f64(f64::NAN));
        let xi = T::round(step.xi);
        let mut buf = buffer(syrk_update_scratch::<T>(step.n, d, bias, par));
        running_average_lazy(
            c.view_mut(),
            &mut scale,
            T::from_f64(xi),
            xs.view(),
            bias,
            par,
            MemStack::new(&mut buf),
        )
        .map_err(fail)?;
        prop_assert!(
            scale.is_finite_val() && scale > T::ZERO,
            "step {k}: lazy scale {scale:?} is not finite and positive"
        );
        let xa = with_bias(&x, bias);
        let w = (1.0 - xi) / step.n as f64;
        f = f.scale(xi).add(&gram(&xa).scale(w));
        f_abs = f_abs.scale(xi).add(&gram(&xa.abs()).scale(w));
        n_max = n_max.max(step.n);
    }
    materialize_lazy(c.view_mut(), &mut scale).map_err(fail)?;
    prop_assert_eq!(scale, T::ONE, "materialize_lazy must reset the scale to 1");

    let k = case.steps.len();
    let tol = f_abs.scale(2.0 * (k + 1) as f64 * (n_max + 8 + k) as f64 * T::eps());
    check_entrywise(
        "lazy running average (materialized) lower triangle",
        &c.to_m(),
        &f,
        &tol,
        lower,
    )?;
    check_untouched("running_average_lazy", &before, &c, strict_upper)
}

both_types!(
    running_average_lazy_sequence_equals_eager_recurrence,
    lazy_case(),
    check_lazy
);

#[derive(Clone, Debug)]
struct MaterializeCase {
    d: usize,
    scale: f64,
    layout: Layout,
    seed: u64,
}

fn materialize_case() -> impl Strategy<Value = MaterializeCase> {
    (
        0usize..=40,
        prop_oneof![Just(1.0), 1e-3..1e3f64],
        layout(),
        any::<u64>(),
    )
        .prop_map(|(d, scale, layout, seed)| MaterializeCase {
            d,
            scale,
            layout,
            seed,
        })
}

/// `materialize_lazy`: the lower triangle becomes exactly `fl(scale * c)`
/// (one correctly rounded product per entry), the upper triangle and the
/// padding are untouched and the scale becomes 1.
fn check_materialize<T: Flt>(case: &MaterializeCase) -> Result<(), TestCaseError> {
    let mut rng = Gen::new(case.seed);
    let c0 = rng.matrix(case.d, case.d).round::<T>();
    let mut c = Stored::<T>::from_m(&c0, case.layout, T::from_f64(SENTINEL));
    let before = c.clone();
    let s = T::from_f64(case.scale);
    let mut scale = s;
    materialize_lazy(c.view_mut(), &mut scale).map_err(fail)?;
    prop_assert_eq!(scale, T::ONE);
    for j in 0..case.d {
        for i in j..case.d {
            let want = s * T::from_f64(c0[(i, j)]);
            prop_assert_eq!(c.get(i, j).bits(), want.bits(), "entry ({}, {})", i, j);
        }
    }
    check_untouched("materialize_lazy", &before, &c, strict_upper)
}

both_types!(
    materialize_lazy_scales_lower_triangle_exactly,
    materialize_case(),
    check_materialize
);

// ---------------------------------------------------------------------------
// mirror_lower
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MirrorCase {
    n: usize,
    layout: Layout,
    seed: u64,
}

fn mirror_case() -> impl Strategy<Value = MirrorCase> {
    // Up to 150 to cross the 64-wide cache blocks of the transpose twice.
    (
        prop_oneof![0usize..=20, 60usize..=150],
        layout(),
        any::<u64>(),
    )
        .prop_map(|(n, layout, seed)| MirrorCase { n, layout, seed })
}

/// `mirror_lower`: the upper triangle becomes a bitwise copy of the lower
/// one, the lower triangle and the padding are untouched.
fn check_mirror<T: Flt>(case: &MirrorCase) -> Result<(), TestCaseError> {
    let mut rng = Gen::new(case.seed);
    let m0 = rng.matrix(case.n, case.n);
    let mut c = Stored::<T>::from_m(&m0, case.layout, T::from_f64(SENTINEL));
    let before = c.clone();
    mirror_lower(c.view_mut()).map_err(fail)?;
    check_untouched("mirror_lower", &before, &c, lower)?;
    for j in 0..case.n {
        for i in j + 1..case.n {
            prop_assert_eq!(
                c.get(j, i).bits(),
                before.get(i, j).bits(),
                "upper ({}, {}) is not the lower ({}, {})",
                j,
                i,
                i,
                j
            );
        }
    }
    Ok(())
}

both_types!(
    mirror_lower_copies_lower_onto_upper,
    mirror_case(),
    check_mirror
);
