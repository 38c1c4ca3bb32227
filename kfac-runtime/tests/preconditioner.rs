//! Correctness of the preconditioner against independent dense references
//! (explicit Kronecker products solved by Gaussian elimination in f64).
//!
//! Tolerances: the engine works in f32, so a backward-stable solve of a
//! system with condition number `kappa` and `dim` unknowns has relative
//! error about `kappa * dim * eps32`; the eigen route adds the eigenvector
//! error (`~ dim * eps` relative) amplified by the same `kappa`. We allow
//! `C * kappa * dim * eps32` with C = 8, where `kappa` is bounded from above
//! with Gershgorin bounds of the factors.

mod common;

use common::*;
use faer::MatRef;
use kfac_runtime::{
    Config, Conv2dSpec, Error, ErrorKind, ImageLayout, LayerGrad, LayerId, LayerKind, Method,
    Observation, Preconditioner, Schedule,
};

const EPS32: f64 = f32::EPSILON as f64;

fn cfg(method: Method) -> Config {
    Config {
        damping: Schedule::Constant(0.05),
        kl_clip: None,
        method,
        threads: 1,
        ..Config::default()
    }
}

/// A real two-layer MLP (tanh hidden layer, squared loss) on one batch.
struct Mlp {
    a1: M,
    g1: M,
    h: M,
    g2: M,
    dw1: M,
    db1: Vec<f64>,
    dw2: M,
    db2: Vec<f64>,
}

fn mlp(rng: &mut Rng, n: usize) -> Mlp {
    let (d0, d1, d2) = (5, 4, 3);
    let a1 = rng.mat(n, d0, 1.0);
    let w1 = rng.mat(d1, d0, 0.7);
    let b1 = rng.mat(1, d1, 0.3);
    let w2 = rng.mat(d2, d1, 0.7);
    let b2 = rng.mat(1, d2, 0.3);
    let y = rng.mat(n, d2, 1.0);
    let z1 = a1.mul(&w1.t());
    let h = M::from_fn(n, d1, |i, j| {
        ((z1.at(i, j) + b1.at(0, j)) as f32 as f64).tanh() as f32 as f64
    });
    let out = h.mul(&w2.t());
    // per-sample output gradients of 0.5 ||out - y||^2
    let g2 = M::from_fn(n, d2, |i, j| {
        (out.at(i, j) + b2.at(0, j) - y.at(i, j)) as f32 as f64
    });
    let back = g2.mul(&w2);
    let g1 = M::from_fn(n, d1, |i, j| {
        (back.at(i, j) * (1.0 - h.at(i, j) * h.at(i, j))) as f32 as f64
    });
    let inv_n = 1.0 / n as f64;
    let round = |m: M| M {
        r: m.r,
        c: m.c,
        v: m.v.iter().map(|x| *x as f32 as f64).collect(),
    };
    let dw1 = round(g1.t().mul(&a1).scale(inv_n));
    let dw2 = round(g2.t().mul(&h).scale(inv_n));
    let db1 = (0..d1)
        .map(|j| ((0..n).map(|i| g1.at(i, j)).sum::<f64>() * inv_n) as f32 as f64)
        .collect();
    let db2 = (0..d2)
        .map(|j| ((0..n).map(|i| g2.at(i, j)).sum::<f64>() * inv_n) as f32 as f64)
        .collect();
    Mlp {
        a1,
        g1,
        h,
        g2,
        dw1,
        db1,
        dw2,
        db2,
    }
}

fn grad_with_bias(w: &M, b: &[f64]) -> M {
    M::from_fn(w.r, w.c + 1, |i, j| if j < w.c { w.at(i, j) } else { b[i] })
}

fn rows(m: &M, r0: usize, r1: usize) -> M {
    M::from_fn(r1 - r0, m.c, |i, j| m.at(r0 + i, j))
}

fn register_mlp(p: &mut Preconditioner) -> (LayerId, LayerId) {
    let l1 = p
        .register(
            "fc1",
            LayerKind::Linear {
                in_features: 5,
                out_features: 4,
                bias: true,
            },
        )
        .unwrap();
    let l2 = p
        .register(
            "fc2",
            LayerKind::Linear {
                in_features: 4,
                out_features: 3,
                bias: true,
            },
        )
        .unwrap();
    (l1, l2)
}

fn observe_linear(p: &mut Preconditioner, id: LayerId, a: &M, g: &M) -> Result<(), Error> {
    let (a32, g32) = (to_f32(a), to_f32(g));
    p.observe(
        id,
        Observation::Linear {
            activations: MatRef::from_row_major_slice(&a32, a.r, a.c),
            output_grads: MatRef::from_row_major_slice(&g32, g.r, g.c),
        },
    )
}

/// Runs one step on the MLP's gradients and returns `[W b]` per layer.
fn step_mlp(
    p: &mut Preconditioner,
    ids: (LayerId, LayerId),
    m: &Mlp,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let (mut w1, mut b1) = (
        to_f32(&m.dw1),
        m.db1.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    let (mut w2, mut b2) = (
        to_f32(&m.dw2),
        m.db2.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    p.step(&mut [
        LayerGrad::from_row_major(ids.0, &mut w1, 4, 5, Some(&mut b1))?,
        LayerGrad::from_row_major(ids.1, &mut w2, 3, 4, Some(&mut b2))?,
    ])?;
    let join = |w: &[f32], b: &[f32], r: usize, c: usize| {
        let mut out = Vec::with_capacity(r * (c + 1));
        for i in 0..r {
            out.extend_from_slice(&w[i * c..(i + 1) * c]);
            out.push(b[i]);
        }
        out
    };
    Ok((join(&w1, &b1, 4, 5), join(&w2, &b2, 3, 4)))
}

fn kappa_eigen(a: &M, g: &M, damping: f64) -> f64 {
    (spectral_bound(a) * spectral_bound(g) + damping) / damping
}

fn check_close(got: &[f32], want: &M, kappa: f64, what: &str) {
    let dim = (want.r * want.c) as f64;
    let tol = 8.0 * kappa * dim * EPS32;
    let err = rel_err(got, want);
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} > tolerance {tol:.3e} (kappa {kappa:.1})"
    );
}

#[test]
fn mlp_eigen_step_matches_dense_kron_solve() {
    let mut rng = Rng(1);
    let m = mlp(&mut rng, 16);
    let mut p = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    let ids = register_mlp(&mut p);
    observe_linear(&mut p, ids.0, &m.a1, &m.g1).unwrap();
    observe_linear(&mut p, ids.1, &m.h, &m.g2).unwrap();
    let (v1, v2) = step_mlp(&mut p, ids, &m).unwrap();
    for (v, a, g, grad, name) in [
        (&v1, &m.a1, &m.g1, grad_with_bias(&m.dw1, &m.db1), "fc1"),
        (&v2, &m.h, &m.g2, grad_with_bias(&m.dw2, &m.db2), "fc2"),
    ] {
        let af = second_moment(&with_ones(a, true));
        let gf = second_moment(g);
        let want = dense_kron_solve(&af, &gf, 0.05, &grad);
        check_close(v, &want, kappa_eigen(&af, &gf, 0.05), name);
    }
}

#[test]
fn mlp_inverse_step_matches_dense_factored_tikhonov_formula() {
    let mut rng = Rng(2);
    let m = mlp(&mut rng, 16);
    let mut p = Preconditioner::new(cfg(Method::Inverse)).unwrap();
    let ids = register_mlp(&mut p);
    observe_linear(&mut p, ids.0, &m.a1, &m.g1).unwrap();
    observe_linear(&mut p, ids.1, &m.h, &m.g2).unwrap();
    let (v1, v2) = step_mlp(&mut p, ids, &m).unwrap();
    let damping: f64 = 0.05;
    for (v, a, g, grad, name) in [
        (&v1, &m.a1, &m.g1, grad_with_bias(&m.dw1, &m.db1), "fc1"),
        (&v2, &m.h, &m.g2, grad_with_bias(&m.dw2, &m.db2), "fc2"),
    ] {
        let af = second_moment(&with_ones(a, true));
        let gf = second_moment(g);
        let pi = ((af.trace() / af.r as f64) / (gf.trace() / gf.r as f64)).sqrt();
        let ad = af.add_diag(pi * damping.sqrt());
        let gd = gf.add_diag(damping.sqrt() / pi);
        let want = inverse(&gd).mul(&grad).mul(&inverse(&ad));
        let kappa = (spectral_bound(&ad) / (pi * damping.sqrt()))
            * (spectral_bound(&gd) / (damping.sqrt() / pi));
        check_close(v, &want, kappa, name);
    }
}

#[test]
fn micro_batches_combine_as_one_large_batch() {
    let mut rng = Rng(3);
    let m = mlp(&mut rng, 16);
    let mut p = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    let ids = register_mlp(&mut p);
    for (r0, r1) in [(0, 5), (5, 10), (10, 16)] {
        observe_linear(&mut p, ids.0, &rows(&m.a1, r0, r1), &rows(&m.g1, r0, r1)).unwrap();
        observe_linear(&mut p, ids.1, &rows(&m.h, r0, r1), &rows(&m.g2, r0, r1)).unwrap();
    }
    let (v1, v2) = step_mlp(&mut p, ids, &m).unwrap();
    for (v, a, g, grad, name) in [
        (&v1, &m.a1, &m.g1, grad_with_bias(&m.dw1, &m.db1), "fc1"),
        (&v2, &m.h, &m.g2, grad_with_bias(&m.dw2, &m.db2), "fc2"),
    ] {
        let af = second_moment(&with_ones(a, true));
        let gf = second_moment(g);
        let want = dense_kron_solve(&af, &gf, 0.05, &grad);
        check_close(v, &want, kappa_eigen(&af, &gf, 0.05), name);
    }
}

#[test]
fn running_average_uses_xi_k_schedule() {
    // Native: F_1 = B_1, F_2 = xi_2 F_1 + (1 - xi_2) B_2 with xi_2 = min(1 - 1/2, xi).
    let mut rng = Rng(4);
    let cfgn = Config {
        factor_decay: 0.95,
        ..cfg(Method::Eigen)
    };
    let mut p = Preconditioner::new(cfgn).unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    let mut want = M::zeros(3, 3);
    for k in 1..=3u32 {
        let a = rng.mat(6, 3, 1.0);
        let g = rng.mat(6, 2, 1.0);
        observe_linear(&mut p, id, &a, &g).unwrap();
        let mut w = vec![0.1f32; 6];
        p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
            .unwrap();
        let xi = (1.0 - 1.0 / k as f64).min(0.95);
        want = want.scale(xi).add(&second_moment(&a).scale(1.0 - xi));
        let (fa, _) = p.factors(id).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                assert!(
                    (fa[(i, j)] as f64 - want.at(i, j)).abs()
                        <= 8.0 * EPS32 * (1.0 + want.at(i, j).abs()) * 6.0
                );
            }
        }
    }
}

/// im2col of an NCHW batch with plain loops: rows (i, oh, ow), columns (c, u, v).
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f64],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    bias: bool,
) -> (M, usize, usize) {
    let oh = h + 2 * pad - k + 1;
    let ow = w + 2 * pad - k + 1;
    let cols = c * k * k + bias as usize;
    let mut m = M::zeros(n * oh * ow, cols);
    for i in 0..n {
        for y in 0..oh {
            for xo in 0..ow {
                let r = (i * oh + y) * ow + xo;
                for ch in 0..c {
                    for u in 0..k {
                        for v in 0..k {
                            let iy = y as isize + u as isize - pad as isize;
                            let ix = xo as isize + v as isize - pad as isize;
                            let val =
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    x[((i * c + ch) * h + iy as usize) * w + ix as usize]
                                } else {
                                    0.0
                                };
                            m.set(r, (ch * k + u) * k + v, val);
                        }
                    }
                }
                if bias {
                    m.set(r, cols - 1, 1.0);
                }
            }
        }
    }
    (m, oh, ow)
}

fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    out[((i * h + y) * w + xx) * c + ch] = x[((i * c + ch) * h + y) * w + xx];
                }
            }
        }
    }
    out
}

#[test]
fn conv_step_matches_explicit_im2col_dense_solve() {
    let (n, c, h, w, k, pad, cout) = (2, 2, 3, 3, 2, 1, 3);
    for layout in [ImageLayout::Nchw, ImageLayout::Nhwc] {
        let mut rng = Rng(5);
        let x = rng.mat(1, n * c * h * w, 1.0).v;
        let (patches, oh, ow) = im2col(&x, n, c, h, w, k, pad, true);
        let s = oh * ow;
        let gout = rng.mat(1, n * cout * s, 1.0).v; // NCHW
        let grad = rng.mat(cout, c * k * k + 1, 0.5);
        // references: A averaged over n*S patches, G summed over positions / n
        let af = patches.t().mul(&patches).scale(1.0 / (n * s) as f64);
        let gm = M::from_fn(n * s, cout, |r, co| gout[((r / s) * cout + co) * s + r % s]);
        let gf = gm.t().mul(&gm).scale(1.0 / n as f64);
        let want = dense_kron_solve(&af, &gf, 0.05, &grad);

        let mut p = Preconditioner::new(cfg(Method::Eigen)).unwrap();
        let spec = Conv2dSpec {
            in_channels: c,
            out_channels: cout,
            kernel: (k, k),
            stride: (1, 1),
            padding: (pad, pad),
            dilation: (1, 1),
            bias: true,
            layout,
        };
        let id = p.register("conv", LayerKind::Conv2d(spec)).unwrap();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let g32: Vec<f32> = gout.iter().map(|&v| v as f32).collect();
        let (xi, gi) = match layout {
            ImageLayout::Nchw => (x32, g32),
            ImageLayout::Nhwc => (
                nchw_to_nhwc(&x32, n, c, h, w),
                nchw_to_nhwc(&g32, n, cout, oh, ow),
            ),
        };
        p.observe(
            id,
            Observation::Conv2d {
                input: &xi,
                output_grads: &gi,
                batch: n,
                height: h,
                width: w,
            },
        )
        .unwrap();
        let mut wt: Vec<f32> = (0..cout)
            .flat_map(|i| (0..c * k * k).map(move |j| (i, j)))
            .map(|(i, j)| grad.at(i, j) as f32)
            .collect();
        let mut b: Vec<f32> = (0..cout).map(|i| grad.at(i, c * k * k) as f32).collect();
        p.step(&mut [
            LayerGrad::from_row_major(id, &mut wt, cout, c * k * k, Some(&mut b)).unwrap(),
        ])
        .unwrap();
        let got: Vec<f32> = (0..cout)
            .flat_map(|i| {
                let mut r = wt[i * c * k * k..(i + 1) * c * k * k].to_vec();
                r.push(b[i]);
                r
            })
            .collect();
        check_close(
            &got,
            &want,
            kappa_eigen(&af, &gf, 0.05),
            &format!("conv {layout:?}"),
        );
    }
}

#[test]
fn kl_clipping_matches_hand_computation() {
    let mut rng = Rng(6);
    let a = rng.mat(10, 3, 1.0);
    let g = rng.mat(10, 2, 1.0);
    let grad = rng.mat(2, 3, 1.0);
    let (lr, clip, damping) = (0.5, 1e-4, 0.05);
    let mut p = Preconditioner::new(Config {
        kl_clip: Some(clip),
        lr: Schedule::Constant(lr),
        ..cfg(Method::Eigen)
    })
    .unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    observe_linear(&mut p, id, &a, &g).unwrap();
    let mut w = to_f32(&grad);
    let stats = p
        .step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    let af = second_moment(&a);
    let gf = second_moment(&g);
    let v = dense_kron_solve(&af, &gf, damping, &grad);
    let vg: f64 = v.v.iter().zip(&grad.v).map(|(x, y)| x * y).sum::<f64>() * lr * lr;
    let nu = (clip / vg.abs()).sqrt().min(1.0);
    assert!(nu < 0.5, "test must exercise clipping (nu = {nu})");
    let kappa = kappa_eigen(&af, &gf, damping);
    assert!(
        (stats.kl_scale - nu).abs() <= 8.0 * kappa * 6.0 * EPS32 * nu,
        "nu {} vs {nu}",
        stats.kl_scale
    );
    check_close(&w, &v.scale(nu), kappa, "clipped V");
}

#[test]
fn embedding_uses_diagonal_token_frequency_factor() {
    let (vocab, dim, n) = (5, 3, 12);
    let mut rng = Rng(7);
    let tokens: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % vocab).collect();
    let g = rng.mat(n, dim, 1.0);
    let grad_pt = rng.mat(vocab, dim, 1.0); // PyTorch layout: vocab x dim
    let mut p = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    let id = p
        .register(
            "emb",
            LayerKind::Embedding {
                num_embeddings: vocab,
                dim,
            },
        )
        .unwrap();
    let g32 = to_f32(&g);
    p.observe(
        id,
        Observation::Embedding {
            tokens: &tokens,
            output_grads: MatRef::from_row_major_slice(&g32, n, dim),
        },
    )
    .unwrap();
    let mut w = to_f32(&grad_pt);
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, vocab, dim, None).unwrap()])
        .unwrap();
    let mut counts = vec![0.0; vocab];
    for &t in &tokens {
        counts[t] += 1.0 / n as f64;
    }
    let af = M::from_fn(vocab, vocab, |i, j| if i == j { counts[i] } else { 0.0 });
    let gf = second_moment(&g);
    let want = dense_kron_solve(&af, &gf, 0.05, &grad_pt.t()).t();
    check_close(&w, &want, kappa_eigen(&af, &gf, 0.05), "embedding");
}

#[test]
fn excluded_layers_pass_through_and_need_no_observation() {
    let mut rng = Rng(8);
    let m = mlp(&mut rng, 8);
    let mut p = Preconditioner::new(Config {
        exclude: vec!["fc2".into()],
        ..cfg(Method::Eigen)
    })
    .unwrap();
    let ids = register_mlp(&mut p);
    observe_linear(&mut p, ids.0, &m.a1, &m.g1).unwrap();
    let (_, v2) = step_mlp(&mut p, ids, &m).unwrap();
    let want = grad_with_bias(&m.dw2, &m.db2);
    assert_eq!(v2, to_f32(&want));
}

#[test]
fn errors_leave_state_unchanged() {
    let mut rng = Rng(9);
    let m = mlp(&mut rng, 8);
    let mut clean = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    let mut dirty = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    let ids = register_mlp(&mut clean);
    register_mlp(&mut dirty);

    // step before any observation
    assert!(matches!(
        step_mlp(&mut dirty, ids, &m),
        Err(Error::MissingObservation { .. })
    ));
    // an unknown layer
    assert!(matches!(
        observe_linear(&mut dirty, LayerId(9), &m.a1, &m.g1),
        Err(Error::UnknownLayer { .. })
    ));
    // activations of the wrong width
    assert!(matches!(
        observe_linear(&mut dirty, ids.0, &m.h, &m.g1),
        Err(Error::Mismatch { .. })
    ));
    // NaN activations
    let mut bad = m.a1.clone();
    bad.set(2, 1, f64::NAN);
    assert!(observe_linear(&mut dirty, ids.0, &bad, &m.g1).is_err());

    for p in [&mut clean, &mut dirty] {
        observe_linear(p, ids.0, &m.a1, &m.g1).unwrap();
        observe_linear(p, ids.1, &m.h, &m.g2).unwrap();
    }
    // wrong gradient shape, missing gradient, NaN gradient: all refused
    let mut w = vec![0.0f32; 20];
    let mut b = vec![0.0f32; 4];
    assert!(matches!(
        dirty.step(&mut [LayerGrad::from_row_major(ids.0, &mut w, 5, 4, None).unwrap()]),
        Err(Error::Mismatch { .. })
    ));
    assert!(matches!(
        dirty.step(&mut [LayerGrad::from_row_major(ids.0, &mut w, 4, 5, Some(&mut b)).unwrap()]),
        Err(Error::MissingGradient { .. })
    ));
    let mut nan = m.clone_dw1_nan();
    assert!(dirty
        .step(&mut [
            LayerGrad::from_row_major(ids.0, &mut nan, 4, 5, Some(&mut b)).unwrap(),
            LayerGrad::from_row_major(ids.1, &mut [0.0; 12], 3, 4, Some(&mut [0.0; 3])).unwrap(),
        ])
        .is_err());
    assert_eq!(dirty.steps(), 0);

    let r1 = step_mlp(&mut clean, ids, &m).unwrap();
    let r2 = step_mlp(&mut dirty, ids, &m).unwrap();
    assert_eq!(
        r1, r2,
        "a preconditioner that saw errors must behave exactly like one that did not"
    );
    assert_eq!(clean.save(), dirty.save());
}

impl Mlp {
    fn clone_dw1_nan(&self) -> Vec<f32> {
        let mut v = to_f32(&self.dw1);
        v[3] = f32::NAN;
        v
    }
}

#[test]
fn one_and_two_threads_give_bitwise_identical_steps() {
    let mut out = Vec::new();
    for threads in [1, 2] {
        let mut rng = Rng(10);
        let mut p = Preconditioner::new(Config {
            threads,
            ..cfg(Method::Eigen)
        })
        .unwrap();
        let ids = register_mlp(&mut p);
        let mut res = Vec::new();
        for _ in 0..3 {
            let m = mlp(&mut rng, 8);
            p.observe_all(&[(
                ids.0,
                Observation::Linear {
                    activations: MatRef::from_row_major_slice(&to_f32(&m.a1), 8, 5),
                    output_grads: MatRef::from_row_major_slice(&to_f32(&m.g1), 8, 4),
                },
            )])
            .unwrap();
            observe_linear(&mut p, ids.1, &m.h, &m.g2).unwrap();
            res.push(step_mlp(&mut p, ids, &m).unwrap());
        }
        out.push(res);
    }
    assert_eq!(out[0], out[1]);
}

#[test]
fn piecewise_damping_schedule_and_update_frequencies() {
    let mut rng = Rng(11);
    let mut p = Preconditioner::new(Config {
        damping: Schedule::Piecewise {
            boundaries: vec![2, 4],
            values: vec![0.1, 0.01, 0.001],
        },
        factor_update_steps: 2,
        inv_update_steps: 3,
        ..cfg(Method::Eigen)
    })
    .unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: true,
            },
        )
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..6 {
        if p.factor_update_due() {
            observe_linear(&mut p, id, &rng.mat(4, 3, 1.0), &rng.mat(4, 2, 1.0)).unwrap();
        }
        let mut w = vec![0.1f32; 6];
        let mut b = vec![0.1f32; 2];
        let s = p
            .step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, Some(&mut b)).unwrap()])
            .unwrap();
        seen.push((s.damping, s.factors_updated, s.inverses_updated));
    }
    let want = [
        (0.1, true, true),
        (0.1, false, false),
        (0.01, true, false),
        (0.01, false, true),
        (0.001, true, false),
        (0.001, false, false),
    ];
    assert_eq!(seen, want);
}

#[test]
fn invalid_config_and_layers_are_refused() {
    for bad in [
        Config {
            factor_decay: 1.0,
            ..Config::default()
        },
        Config {
            damping: Schedule::Constant(0.0),
            ..Config::default()
        },
        Config {
            kl_clip: Some(-1.0),
            ..Config::default()
        },
        Config {
            inv_update_steps: 0,
            ..Config::default()
        },
        Config {
            lr: Schedule::Piecewise {
                boundaries: vec![3, 1],
                values: vec![1.0, 1.0, 1.0],
            },
            ..Config::default()
        },
    ] {
        assert!(matches!(
            Preconditioner::new(bad),
            Err(Error::InvalidConfig { .. })
        ));
    }
    let mut p = Preconditioner::new(Config::default()).unwrap();
    assert!(p
        .register(
            "x",
            LayerKind::Linear {
                in_features: 0,
                out_features: 2,
                bias: true
            }
        )
        .is_err());
    p.register(
        "x",
        LayerKind::Linear {
            in_features: 1,
            out_features: 2,
            bias: true,
        },
    )
    .unwrap();
    assert!(matches!(
        p.register(
            "x",
            LayerKind::Linear {
                in_features: 1,
                out_features: 2,
                bias: true
            }
        ),
        Err(Error::DuplicateLayer { .. })
    ));
}

// ---- kfac-pytorch compatibility: each difference against a hand value ----

fn pt_cfg(method: Method) -> Config {
    Config {
        damping: Schedule::Constant(0.05),
        kl_clip: None,
        method,
        threads: 1,
        factor_decay: 0.9,
        ..Config::kfac_pytorch()
    }
}

#[test]
fn compat_factors_start_at_identity_with_fixed_decay() {
    let mut rng = Rng(12);
    let a = rng.mat(6, 3, 1.0);
    let g = rng.mat(6, 2, 1.0);
    let mut p = Preconditioner::new(pt_cfg(Method::Eigen)).unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    observe_linear(&mut p, id, &a, &g).unwrap();
    let mut w = vec![0.1f32; 6];
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    let want = M::from_fn(3, 3, |i, j| (i == j) as u8 as f64)
        .scale(0.9)
        .add(&second_moment(&a).scale(0.1));
    let (fa, _) = p.factors(id).unwrap();
    for i in 0..3 {
        for j in 0..3 {
            assert!(
                (fa[(i, j)] as f64 - want.at(i, j)).abs() < 1e-6,
                "({i},{j})"
            );
        }
    }
}

#[test]
fn compat_micro_batch_statistic_is_the_mean_of_micro_batch_statistics() {
    let mut rng = Rng(13);
    let (a1, a2) = (rng.mat(2, 3, 1.0), rng.mat(6, 3, 1.0));
    let (g1, g2) = (rng.mat(2, 2, 1.0), rng.mat(6, 2, 1.0));
    let mut p = Preconditioner::new(Config {
        factor_decay: 0.0,
        ..pt_cfg(Method::Eigen)
    })
    .unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    observe_linear(&mut p, id, &a1, &g1).unwrap();
    observe_linear(&mut p, id, &a2, &g2).unwrap();
    let mut w = vec![0.1f32; 6];
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    // kfac-pytorch: (A_1 + A_2) / 2, not the statistic of the 8 rows
    let want = second_moment(&a1).add(&second_moment(&a2)).scale(0.5);
    let (fa, _) = p.factors(id).unwrap();
    for i in 0..3 {
        for j in 0..3 {
            assert!((fa[(i, j)] as f64 - want.at(i, j)).abs() < 1e-6);
        }
    }
}

#[test]
fn compat_conv_statistics_are_divided_by_n_s_cubed() {
    let (n, c, h, w, k, cout) = (2, 1, 3, 3, 2, 2);
    let mut rng = Rng(14);
    let x = rng.mat(1, n * c * h * w, 1.0).v;
    let (patches, oh, ow) = im2col(&x, n, c, h, w, k, 0, true);
    let s = (oh * ow) as f64;
    let gout = rng.mat(1, n * cout * oh * ow, 1.0).v;
    let mut p = Preconditioner::new(Config {
        factor_decay: 0.0,
        ..pt_cfg(Method::Eigen)
    })
    .unwrap();
    let spec = Conv2dSpec {
        in_channels: c,
        out_channels: cout,
        kernel: (k, k),
        stride: (1, 1),
        padding: (0, 0),
        dilation: (1, 1),
        bias: true,
        layout: ImageLayout::Nchw,
    };
    let id = p.register("conv", LayerKind::Conv2d(spec)).unwrap();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let g32: Vec<f32> = gout.iter().map(|&v| v as f32).collect();
    p.observe(
        id,
        Observation::Conv2d {
            input: &x32,
            output_grads: &g32,
            batch: n,
            height: h,
            width: w,
        },
    )
    .unwrap();
    let mut wt = vec![0.1f32; cout * c * k * k];
    let mut b = vec![0.1f32; cout];
    p.step(&mut [LayerGrad::from_row_major(id, &mut wt, cout, c * k * k, Some(&mut b)).unwrap()])
        .unwrap();
    let want_a = patches
        .t()
        .mul(&patches)
        .scale(1.0 / (n as f64 * s * s * s));
    let ss = oh * ow;
    let gm = M::from_fn(n * ss, cout, |r, co| {
        gout[((r / ss) * cout + co) * ss + r % ss]
    });
    let want_g = gm.t().mul(&gm).scale(1.0 / (n as f64 * s * s * s));
    let (fa, fg) = p.factors(id).unwrap();
    for (f, want) in [(&fa, &want_a), (&fg, &want_g)] {
        for i in 0..want.r {
            for j in 0..want.c {
                assert!(
                    (f[(i, j)] as f64 - want.at(i, j)).abs() < 1e-6 * (1.0 + want.at(i, j).abs())
                );
            }
        }
    }
}

#[test]
fn compat_eigen_uses_precomputed_f32_denominators_against_dense_solve() {
    let mut rng = Rng(15);
    let a = rng.mat(10, 3, 1.0);
    let g = rng.mat(10, 2, 1.0);
    let grad = rng.mat(2, 3, 1.0);
    let cfgp = pt_cfg(Method::Eigen);
    assert!(cfgp.precompute_denominators && cfgp.eigen_precision == kfac_runtime::Precision::F32);
    let mut p = Preconditioner::new(cfgp).unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    observe_linear(&mut p, id, &a, &g).unwrap();
    let mut w = to_f32(&grad);
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    let eye = |d: usize| M::from_fn(d, d, |i, j| (i == j) as u8 as f64);
    let af = eye(3).scale(0.9).add(&second_moment(&a).scale(0.1));
    let gf = eye(2).scale(0.9).add(&second_moment(&g).scale(0.1));
    let want = dense_kron_solve(&af, &gf, 0.05, &grad);
    check_close(&w, &want, kappa_eigen(&af, &gf, 0.05), "compat eigen");
}

#[test]
fn compat_inverse_method_puts_full_damping_on_each_factor() {
    let mut rng = Rng(16);
    let a = rng.mat(10, 3, 1.0);
    let g = rng.mat(10, 2, 1.0);
    let grad = rng.mat(2, 3, 1.0);
    let mut p = Preconditioner::new(pt_cfg(Method::Inverse)).unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    observe_linear(&mut p, id, &a, &g).unwrap();
    let mut w = to_f32(&grad);
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    let eye = |d: usize| M::from_fn(d, d, |i, j| (i == j) as u8 as f64);
    let af = eye(3)
        .scale(0.9)
        .add(&second_moment(&a).scale(0.1))
        .add_diag(0.05);
    let gf = eye(2)
        .scale(0.9)
        .add(&second_moment(&g).scale(0.1))
        .add_diag(0.05);
    let want = inverse(&gf).mul(&grad).mul(&inverse(&af));
    let kappa = spectral_bound(&af) / 0.05 * spectral_bound(&gf) / 0.05;
    check_close(&w, &want, kappa, "compat inverse");
}

#[test]
fn per_step_damping_and_lr_are_taken_from_the_caller() {
    let mut rng = Rng(17);
    let mut p = Preconditioner::new(Config {
        damping: Schedule::PerStep(0.1),
        lr: Schedule::PerStep(0.5),
        ..cfg(Method::Eigen)
    })
    .unwrap();
    let id = p
        .register(
            "l",
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false,
            },
        )
        .unwrap();
    assert!(matches!(
        p.set_damping(-1.0),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        p.set_lr(f64::NAN),
        Err(Error::InvalidConfig { .. })
    ));
    p.set_damping(0.25).unwrap();
    p.set_lr(0.0).unwrap();
    observe_linear(&mut p, id, &rng.mat(4, 3, 1.0), &rng.mat(4, 2, 1.0)).unwrap();
    let mut w = vec![0.1f32; 6];
    let s = p
        .step(&mut [LayerGrad::from_row_major(id, &mut w, 2, 3, None).unwrap()])
        .unwrap();
    assert_eq!((s.damping, s.lr), (0.25, 0.0));
    // a constant schedule cannot be overridden per step
    let mut q = Preconditioner::new(cfg(Method::Eigen)).unwrap();
    assert!(matches!(
        q.set_damping(0.5),
        Err(Error::InvalidConfig { .. })
    ));
}

/// Sizes whose arithmetic overflows, or whose state could never be
/// allocated, are refused at registration (never a panic, a wrapped size or
/// an allocation abort at the first observation); a huge embedding, whose
/// A factor is diagonal, is not.
#[test]
fn impossible_layer_sizes_are_refused_at_registration() {
    let mut p = Preconditioner::new(Config::default()).unwrap();
    let conv = |cin: usize, k: usize| {
        LayerKind::Conv2d(Conv2dSpec {
            in_channels: cin,
            out_channels: 4,
            kernel: (k, k),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            bias: true,
            layout: ImageLayout::Nchw,
        })
    };
    let refused = [
        LayerKind::Linear {
            in_features: usize::MAX,
            out_features: 2,
            bias: true,
        },
        conv(usize::MAX / 2, 3),
        conv(1 << 31, 1 << 17),
        // 2^44 f32 per factor: about 320 TiB of state in all, beyond the
        // 128 TiB user address space of x86-64 and AArch64 (so refused even
        // with overcommit_memory=1).
        LayerKind::Linear {
            in_features: 1 << 22,
            out_features: 1 << 22,
            bias: false,
        },
    ];
    let n = refused.len();
    for (i, kind) in refused.into_iter().enumerate() {
        let err = p.register(&format!("bad{i}"), kind.clone()).unwrap_err();
        if i + 1 < n {
            assert!(matches!(err, Error::InvalidLayer { .. }), "{kind:?}: {err}");
        } else {
            // Representable, but no allocation can hold it: out of memory,
            // with the bytes.
            assert!(matches!(err, Error::OutOfMemory { .. }), "{kind:?}: {err}");
            assert_eq!(err.kind(), ErrorKind::OutOfMemory);
            assert!(err.to_string().contains("351843720888320 bytes"), "{err}");
        }
    }
    let id = p
        .register(
            "embedding",
            LayerKind::Embedding {
                num_embeddings: 1 << 24,
                dim: 8,
            },
        )
        .unwrap();
    assert_eq!(id, LayerId(0));
}

/// `Precision::Auto` (the default) picks f32 where the predicted f32 error
/// `eps λmax(A) λmax(G) / damping` is at most 1e-3 and f64 elsewhere, per
/// layer: with a damping 100x above that threshold its result has the bits
/// of `Precision::F32`, 100x below those of `Precision::F64`, and the two
/// differ (so the test can tell them apart).
#[test]
fn automatic_precision_gives_the_bits_of_the_precision_it_picks() {
    use kfac_runtime::{Observation, Precision, Schedule};
    let (da, dg) = (24usize, 6usize);
    // Dense SPD statistics with largest eigenvalues near 25 and 2.
    let spd = |d: usize, s: f32| {
        faer::Mat::<f32>::from_fn(d, d, |i, j| {
            let x = ((i * 7 + j * 7 + 3 * i * j) % 11) as f32 / 11.0;
            if i == j {
                s + x
            } else {
                s * 0.9 + 0.01 * x
            }
        })
    };
    let (a, g) = (spd(da, 1.0), spd(dg, 0.3));
    let run = |precision: Precision, damping: f64| -> Vec<u32> {
        let mut p = Preconditioner::new(Config {
            eigen_precision: precision,
            damping: Schedule::Constant(damping),
            kl_clip: None,
            threads: 1,
            ..Config::default()
        })
        .unwrap();
        let id = p
            .register(
                "k",
                LayerKind::Kronecker {
                    a_dim: da,
                    g_dim: dg,
                },
            )
            .unwrap();
        p.observe(
            id,
            Observation::Kronecker {
                a: a.as_ref(),
                g: g.as_ref(),
                samples: 8,
            },
        )
        .unwrap();
        let mut w: Vec<f32> = (0..dg * da).map(|k| ((k * 5) % 9) as f32 - 4.0).collect();
        p.step(&mut [LayerGrad::from_row_major(id, &mut w, dg, da, None).unwrap()])
            .unwrap();
        w.iter().map(|x| x.to_bits()).collect()
    };
    // λmax(A) <= trace-free bound: rows sum to at most 1 + 0.9 * 23 + 1 < 24;
    // λmax(G) < 0.3 * 6 + 1 < 3: threshold damping <= eps * 24 * 3 / 1e-3
    // = 8.6e-3. λmax(A) >= 0.9 * 24 * 0.9 ~ 19, λmax(G) >= 1.5: threshold
    // >= 3.4e-3.
    let (high, low) = (1.0, 3e-5);
    assert_eq!(run(Precision::Auto, high), run(Precision::F32, high));
    assert_eq!(run(Precision::Auto, low), run(Precision::F64, low));
    assert_ne!(run(Precision::F32, low), run(Precision::F64, low));
    assert_eq!(Config::default().eigen_precision, Precision::Auto);
}
