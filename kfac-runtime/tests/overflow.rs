//! Finite overflow (#11 item 4): an observation whose statistics could
//! overflow the f32 factors is refused at `observe` with nothing changed,
//! and a step whose factor update or inversion fails discards its
//! statistics and keeps the previous decomposition, so the preconditioner
//! recovers once good data arrives.
//!
//! Every check compares against an independent fact: a twin preconditioner
//! that never saw the bad call (bitwise), or a bound computed here.

use faer::{Mat, MatRef};
use kfac_runtime::{
    Config, Conv2dSpec, Error, ErrorKind, ImageLayout, LayerGrad, LayerId, LayerKind, Method,
    Observation, Preconditioner,
};

const IN: usize = 6;
const OUT: usize = 4;
const N: usize = 8;

fn config() -> Config {
    Config {
        inv_update_steps: 3,
        threads: 1,
        ..Config::default()
    }
}

fn linear(p: &mut Preconditioner) -> LayerId {
    p.register(
        "fc",
        LayerKind::Linear {
            in_features: IN,
            out_features: OUT,
            bias: true,
        },
    )
    .unwrap()
}

/// Deterministic batch number `s`.
fn batch(s: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..N * IN)
        .map(|k| ((k * 7 + s * 13) % 11) as f32 * 0.2 - 1.0)
        .collect();
    let g = (0..N * OUT)
        .map(|k| ((k * 5 + s * 3) % 9) as f32 * 0.1 - 0.4)
        .collect();
    (x, g)
}

fn observe(p: &mut Preconditioner, id: LayerId, x: &[f32], g: &[f32]) -> Result<(), Error> {
    p.observe(
        id,
        Observation::Linear {
            activations: MatRef::from_row_major_slice(x, N, IN),
            output_grads: MatRef::from_row_major_slice(g, N, OUT),
        },
    )
}

/// One step with a fixed gradient; the preconditioned weight and bias.
fn step(p: &mut Preconditioner, id: LayerId) -> Result<Vec<f32>, Error> {
    let mut w: Vec<f32> = (0..OUT * IN).map(|k| (k as f32 * 0.37).sin()).collect();
    let mut b: Vec<f32> = (0..OUT).map(|k| k as f32 * 0.1 - 0.1).collect();
    p.step(&mut [LayerGrad::from_row_major(
        id,
        &mut w,
        OUT,
        IN,
        Some(&mut b),
    )?])?;
    w.extend(b);
    Ok(w)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The case: one activation of 1e30 (its square overflows f32).
/// It is refused at observe with kind NonFinite, and every later step is
/// bitwise what a twin that never saw it computes, across several inverse
/// updates (before the fix the step failed at the next inverse update and
/// never recovered).
#[test]
fn a_huge_finite_activation_is_refused_at_observe_and_nothing_changes() {
    let mut p = Preconditioner::new(config()).unwrap();
    let mut twin = Preconditioner::new(config()).unwrap();
    let (id, tid) = (linear(&mut p), linear(&mut twin));
    for s in 0..10 {
        let (x, g) = batch(s);
        if s % 4 == 1 {
            let mut bad = x.clone();
            bad[3] = 1e30;
            let e = observe(&mut p, id, &bad, &g).unwrap_err();
            assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::NonFinite);
            assert!(e.to_string().contains("nothing was accumulated"), "{e}");
            // Large output gradients too (through G).
            let mut badg = g.clone();
            badg[0] = -3e19;
            let e = observe(&mut p, id, &x, &badg).unwrap_err();
            assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
        }
        observe(&mut p, id, &x, &g).unwrap();
        observe(&mut twin, tid, &x, &g).unwrap();
        let (got, want) = (step(&mut p, id).unwrap(), step(&mut twin, tid).unwrap());
        assert_eq!(bits(&got), bits(&want), "step {s}");
        assert!(got.iter().all(|v| v.is_finite()));
    }
    assert_eq!(p.factors(id).unwrap(), twin.factors(tid).unwrap());
}

/// Large values that cannot overflow are accepted: 1e15 squares to 1e30,
/// far below f32::MAX / 4 even summed over the batch.
#[test]
fn large_values_that_fit_are_accepted() {
    let mut p = Preconditioner::new(config()).unwrap();
    let id = linear(&mut p);
    let (mut x, g) = batch(0);
    x[5] = 1e15;
    observe(&mut p, id, &x, &g).unwrap();
    step(&mut p, id).unwrap();
    let (a, _) = p.factors(id).unwrap();
    assert!(a[(5, 5)].is_finite() && a[(5, 5)] > 1e28, "{}", a[(5, 5)]);
}

/// Observations that fit one by one but whose sum would overflow the
/// accumulator: the one that would cross the limit is refused, the
/// accumulator holds only the accepted ones (checked against the count of
/// accepted observations times the known diagonal entry).
#[test]
fn the_accumulated_sum_is_guarded_too() {
    let cfg = Config {
        factor_decay: 0.5,
        ..config()
    };
    let mut p = Preconditioner::new(cfg).unwrap();
    let id = linear(&mut p);
    // Column 0 holds v in every row: its A diagonal entry grows by N v^2
    // per observation (summed, then averaged over the rows at the step).
    let v = 2.0e18f32;
    let (mut x, g) = batch(1);
    for r in 0..N {
        x[r * IN] = v;
    }
    let per_obs = N as f64 * (v as f64) * (v as f64);
    let limit = f32::MAX as f64 / 4.0;
    let fit = (limit / per_obs).floor() as usize;
    assert!((1..40).contains(&fit), "test setup: {fit}");
    let mut accepted = 0;
    for _ in 0..fit + 3 {
        match observe(&mut p, id, &x, &g) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
                assert_eq!(e.kind(), ErrorKind::NonFinite);
            }
        }
    }
    assert_eq!(accepted, fit, "exactly the observations below the limit");
    step(&mut p, id).unwrap();
    let (a, _) = p.factors(id).unwrap();
    // The first update is the plain mean (native running average,
    // xi_1 = 0): column 0's mean square, v^2.
    let want = (v as f64) * (v as f64);
    let got = a[(0, 0)] as f64;
    assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
}

/// A convolution's input whose squares overflow is refused too, with the
/// state unchanged (a later good observation and step succeed).
#[test]
fn a_huge_conv_input_is_refused() {
    let spec = Conv2dSpec {
        in_channels: 2,
        out_channels: 3,
        kernel: (3, 3),
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        bias: true,
        layout: ImageLayout::Nchw,
    };
    let mut p = Preconditioner::new(config()).unwrap();
    let id = p.register("conv", LayerKind::Conv2d(spec)).unwrap();
    let (n, h, w) = (2, 4, 4);
    let mut input: Vec<f32> = (0..n * 2 * h * w).map(|k| (k % 5) as f32 * 0.1).collect();
    let grads: Vec<f32> = (0..n * 3 * h * w).map(|k| (k % 7) as f32 * 0.01).collect();
    fn obs<'a>(
        input: &'a [f32],
        grads: &'a [f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Observation<'a> {
        Observation::Conv2d {
            input,
            output_grads: grads,
            batch: n,
            height: h,
            width: w,
        }
    }
    input[7] = 3e20;
    let e = p.observe(id, obs(&input, &grads, n, h, w)).unwrap_err();
    assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
    input[7] = 0.5;
    p.observe(id, obs(&input, &grads, n, h, w)).unwrap();
    let mut wg = vec![0.1f32; 3 * 2 * 9];
    let mut bg = vec![0.1f32; 3];
    p.step(&mut [LayerGrad::from_row_major(id, &mut wg, 3, 18, Some(&mut bg)).unwrap()])
        .unwrap();
    assert!(wg.iter().chain(&bg).all(|v| v.is_finite()));
}

fn kron(p: &mut Preconditioner) -> LayerId {
    p.register("kron", LayerKind::Kronecker { a_dim: 3, g_dim: 2 })
        .unwrap()
}

fn kron_step(p: &mut Preconditioner, id: LayerId, a_diag: [f32; 3]) -> Result<Vec<f32>, Error> {
    let a = Mat::<f32>::from_fn(3, 3, |i, j| if i == j { a_diag[i] } else { 0.0 });
    let g = Mat::<f32>::identity(2, 2);
    p.observe(
        id,
        Observation::Kronecker {
            a: a.as_ref(),
            g: g.as_ref(),
            samples: 4,
        },
    )?;
    let mut w = vec![0.25f32, -0.5, 1.0, 0.75, 0.1, -0.2];
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None)?])?;
    Ok(w)
}

/// An inversion that fails (an indefinite statistic that damping cannot
/// rescue) keeps the previous decomposition and factors, says so, and
/// discards the bad statistic: the next good step is bitwise the step of a
/// twin that never saw it (before the fix the bad statistic stayed in the
/// accumulator and was mixed into the next update).
#[test]
fn a_failed_inversion_keeps_the_previous_decomposition_and_recovers() {
    // (The eigen method clamps negative eigenvalues, so only the Cholesky
    // inversion fails on an indefinite factor.)
    {
        let method = Method::Inverse;
        let cfg = Config {
            method,
            inv_update_steps: 1,
            ..config()
        };
        let mut p = Preconditioner::new(cfg.clone()).unwrap();
        let mut twin = Preconditioner::new(cfg).unwrap();
        let (id, tid) = (kron(&mut p), kron(&mut twin));
        let good = [1.0f32, 0.5, 2.0];
        assert_eq!(
            kron_step(&mut p, id, good).unwrap(),
            kron_step(&mut twin, tid, good).unwrap()
        );
        let before = (p.factors(id).unwrap(), p.decomposition(id).unwrap());
        let e = kron_step(&mut p, id, [2.0, -40.0, 2.0]).unwrap_err();
        let Error::StatisticsDiscarded { cause } = &e else {
            panic!("{method:?}: {e:?}");
        };
        assert_eq!(e.kind(), ErrorKind::Numerical, "{e}");
        assert_eq!(cause.kind(), ErrorKind::Numerical);
        assert!(e
            .to_string()
            .contains("previous factors and decompositions stay in use"));
        assert_eq!(p.steps(), 1);
        let after = (p.factors(id).unwrap(), p.decomposition(id).unwrap());
        assert_eq!(before, after, "{method:?}: state changed by a failed step");
        for s in 0..3 {
            let a = [1.0 + s as f32, 0.5, 2.0];
            let got = kron_step(&mut p, id, a).unwrap();
            let want = kron_step(&mut twin, tid, a).unwrap();
            assert_eq!(bits(&got), bits(&want), "{method:?} step {s}");
        }
    }
}

/// `observe_all` validates in parallel but reports the first bad
/// observation in the caller's order, and records nothing when any fails
/// (overflow included): the next step equals a twin's that never saw the
/// call.
#[test]
fn observe_all_reports_the_first_bad_observation_and_records_nothing() {
    let two = |p: &mut Preconditioner| {
        let a = linear(p);
        let b = p
            .register(
                "fc2",
                LayerKind::Linear {
                    in_features: IN,
                    out_features: OUT,
                    bias: true,
                },
            )
            .unwrap();
        (a, b)
    };
    let mut p = Preconditioner::new(Config {
        threads: 2,
        ..config()
    })
    .unwrap();
    let mut twin = Preconditioner::new(Config {
        threads: 2,
        ..config()
    })
    .unwrap();
    let (a, b) = two(&mut p);
    let (ta, tb) = two(&mut twin);
    let (x, g) = batch(3);
    let (mut nan, mut big) = (x.clone(), x.clone());
    nan[1] = f32::NAN;
    big[2] = 1e25;
    let lin = |x: &'static [f32], g: &'static [f32]| Observation::Linear {
        activations: MatRef::from_row_major_slice(x, N, IN),
        output_grads: MatRef::from_row_major_slice(g, N, OUT),
    };
    let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
    let (x, g, nan, big) = (leak(x), leak(g), leak(nan), leak(big));
    // NaN first, overflow second: the NaN is reported, in any thread order.
    for _ in 0..20 {
        let e = p
            .observe_all(&[(a, lin(nan, g)), (b, lin(big, g))])
            .unwrap_err();
        assert!(matches!(e, Error::Kernel { .. }), "{e:?}");
        let e = p
            .observe_all(&[(b, lin(big, g)), (a, lin(nan, g))])
            .unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
        // One good and one bad: the good one is not recorded either.
        let e = p
            .observe_all(&[(a, lin(x, g)), (b, lin(big, g))])
            .unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e:?}");
    }
    for (pp, ids) in [(&mut p, (a, b)), (&mut twin, (ta, tb))] {
        pp.observe_all(&[(ids.0, lin(x, g)), (ids.1, lin(x, g))])
            .unwrap();
    }
    let w = |p: &mut Preconditioner, ids: (LayerId, LayerId)| {
        let mut w1: Vec<f32> = (0..OUT * IN).map(|k| k as f32 * 0.01).collect();
        let mut w2 = w1.clone();
        let (mut b1, mut b2) = (vec![0.5f32; OUT], vec![-0.5f32; OUT]);
        p.step(&mut [
            LayerGrad::from_row_major(ids.0, &mut w1, OUT, IN, Some(&mut b1)).unwrap(),
            LayerGrad::from_row_major(ids.1, &mut w2, OUT, IN, Some(&mut b2)).unwrap(),
        ])
        .unwrap();
        (bits(&w1), bits(&w2), bits(&b1), bits(&b2))
    };
    assert_eq!(w(&mut p, (a, b)), w(&mut twin, (ta, tb)));
}
