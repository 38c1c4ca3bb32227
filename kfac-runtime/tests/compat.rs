//! kfac-pytorch compatibility (issue #10 item 7) and read access to the
//! state (item 8), each difference checked against a hand-computed value.

use faer::{Mat, MatRef};
use kfac_runtime::{
    Compat, Config, Conv2dSpec, Decomposition, ImageLayout, LayerGrad, LayerKind, Method,
    Observation, Precision, Preconditioner, Schedule,
};

#[test]
fn kfac_pytorch_preset_has_kfac_pytorch_0_4_2_defaults() {
    // KFACPreconditioner.__init__ defaults in kfac-pytorch 0.4.2.
    let c = Config::kfac_pytorch();
    assert_eq!(c.compat, Compat::KfacPytorch);
    assert_eq!(c.factor_update_steps, 1);
    assert_eq!(c.inv_update_steps, 1);
    assert_eq!(c.damping, Schedule::Constant(0.001));
    assert_eq!(c.factor_decay, 0.95);
    assert_eq!(c.kl_clip, Some(0.001));
    assert_eq!(c.lr, Schedule::Constant(0.1));
    assert_eq!(c.method, Method::Eigen);
    assert_eq!(c.eigen_precision, Precision::F32); // inv_dtype=float32
    assert!(c.precompute_denominators); // compute_eigenvalue_outer_product
    assert_eq!(c.grad_worker_fraction, 1.0); // COMM_OPT
    assert!(!c.ignore_conv_dilation);
    c.validate().unwrap();
}

fn linear(p: &mut Preconditioner, i: usize, o: usize) -> kfac_runtime::LayerId {
    p.register(
        "fc",
        LayerKind::Linear {
            in_features: i,
            out_features: o,
            bias: false,
        },
    )
    .unwrap()
}

fn step(
    p: &mut Preconditioner,
    id: kfac_runtime::LayerId,
    o: usize,
    i: usize,
) -> kfac_runtime::StepStats {
    let mut w: Vec<f32> = (0..o * i).map(|k| (k as f32 * 0.37).sin() * 0.1).collect();
    p.step(&mut [LayerGrad::from_row_major(id, &mut w, o, i, None).unwrap()])
        .unwrap()
}

#[test]
fn factor_decay_one_is_accepted_in_kfac_pytorch_mode_and_freezes_the_identity() {
    let native = Config {
        factor_decay: 1.0,
        ..Config::default()
    };
    assert!(native.validate().is_err());
    let mut p = Preconditioner::new(Config {
        factor_decay: 1.0,
        threads: 1,
        ..Config::kfac_pytorch()
    })
    .unwrap();
    let id = linear(&mut p, 3, 2);
    let a = [1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0];
    let g = [0.3f32, -0.2, 0.1, 0.7];
    p.observe(
        id,
        Observation::Linear {
            activations: MatRef::from_row_major_slice(&a, 2, 3),
            output_grads: MatRef::from_row_major_slice(&g, 2, 2),
        },
    )
    .unwrap();
    step(&mut p, id, 2, 3);
    // F <- 1 * I + 0 * batch: the identity, exactly.
    let (fa, fg) = p.factors(id).unwrap();
    assert_eq!(fa, Mat::<f32>::identity(3, 3));
    assert_eq!(fg, Mat::<f32>::identity(2, 2));
}

/// Naive conv2d statistics of one 1-channel image (no bias), kfac-pytorch
/// normalization: patches of the given dilation, `A = Σ p p^T / (n S^3)`
/// over the `S` positions of that patch grid.
fn hand_a(x: &[f64], h: usize, w: usize, k: usize, dil: usize) -> Vec<f64> {
    let (oh, ow) = (h - dil * (k - 1), w - dil * (k - 1));
    let s = (oh * ow) as f64;
    let mut a = vec![0.0; k * k * k * k];
    for y in 0..oh {
        for z in 0..ow {
            let p: Vec<f64> = (0..k * k)
                .map(|t| x[(y + dil * (t / k)) * w + z + dil * (t % k)])
                .collect();
            for i in 0..k * k {
                for j in 0..k * k {
                    a[i * k * k + j] += p[i] * p[j] / (s * s * s);
                }
            }
        }
    }
    a
}

#[test]
fn ignore_conv_dilation_uses_undilated_patches_like_kfac_pytorch() {
    let (h, w, k) = (5usize, 5usize, 2usize);
    let x: Vec<f32> = (0..h * w)
        .map(|t| ((t * 7 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for ignore in [true, false] {
        let spec = Conv2dSpec {
            in_channels: 1,
            out_channels: 1,
            kernel: (k, k),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (2, 2),
            bias: false,
            layout: ImageLayout::Nchw,
        };
        let mut p = Preconditioner::new(Config {
            threads: 1,
            ignore_conv_dilation: ignore,
            ..Config::kfac_pytorch()
        })
        .unwrap();
        let id = p.register("conv", LayerKind::Conv2d(spec)).unwrap();
        // The real output of a dilation-2 conv is 3x3 either way.
        let g: Vec<f32> = (0..9).map(|t| t as f32 * 0.1 - 0.4).collect();
        p.observe(
            id,
            Observation::Conv2d {
                input: &x,
                output_grads: &g,
                batch: 1,
                height: h,
                width: w,
            },
        )
        .unwrap();
        step(&mut p, id, 1, k * k);
        let want = hand_a(&xd, h, w, k, if ignore { 1 } else { 2 });
        let (fa, fg) = p.factors(id).unwrap();
        for i in 0..k * k {
            for j in 0..k * k {
                // kfac-pytorch: F = 0.95 I + 0.05 A_batch.
                let e = 0.95 * (i == j) as u8 as f64 + 0.05 * want[i * k * k + j];
                let got = fa[(i, j)] as f64;
                assert!(
                    (got - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "ignore={ignore} A[{i},{j}] {got} vs {e}"
                );
            }
        }
        // G: the real 3x3 output grid, S = 9, n = 1.
        let gg: f64 = g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 729.0;
        let e = 0.95 + 0.05 * gg;
        assert!(
            (fg[(0, 0)] as f64 - e).abs() <= 1e-6,
            "G {} vs {e}",
            fg[(0, 0)]
        );
    }
}

#[test]
fn grad_scale_divides_output_gradients_before_their_statistics() {
    let (n, i, o) = (4usize, 3usize, 2usize);
    let a: Vec<f32> = (0..n * i).map(|t| (t as f32 * 0.61).cos()).collect();
    let g: Vec<f32> = (0..n * o).map(|t| (t as f32 * 0.29).sin() * 0.01).collect();
    let run = |scale: f64, factor: f32| {
        let mut p = Preconditioner::new(Config {
            threads: 1,
            ..Config::default()
        })
        .unwrap();
        p.set_grad_scale(scale).unwrap();
        let id = linear(&mut p, i, o);
        let gs: Vec<f32> = g.iter().map(|v| v * factor).collect();
        p.observe(
            id,
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&a, n, i),
                output_grads: MatRef::from_row_major_slice(&gs, n, o),
            },
        )
        .unwrap();
        step(&mut p, id, o, i);
        p.factors(id).unwrap().1
    };
    let plain = run(1.0, 1.0);
    // Output gradients of a loss scaled by 1024, unscaled by the
    // preconditioner: the same G, bit for bit (powers of two).
    let scaled = run(1024.0, 1024.0);
    assert_eq!(plain, scaled);
    // Hand value: native first update G = g^T g / n.
    for r in 0..o {
        for c in 0..o {
            let e: f64 = (0..n)
                .map(|k| g[k * o + r] as f64 * g[k * o + c] as f64)
                .sum::<f64>()
                / n as f64;
            assert!((plain[(r, c)] as f64 - e).abs() <= 1e-6 * e.abs().max(1e-6));
        }
    }
    let mut p = Preconditioner::new(Config::default()).unwrap();
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
        assert!(p.set_grad_scale(bad).is_err(), "{bad}");
    }
    assert_eq!(p.grad_scale(), 1.0);
}

#[test]
fn decompositions_names_and_vg_are_readable() {
    let (n, i, o) = (6usize, 4usize, 3usize);
    let mut p = Preconditioner::new(Config {
        threads: 1,
        lr: Schedule::Constant(0.3),
        ..Config::default()
    })
    .unwrap();
    let id = linear(&mut p, i, o);
    let e = p
        .register(
            "emb",
            LayerKind::Embedding {
                num_embeddings: 5,
                dim: 2,
            },
        )
        .unwrap();
    assert_eq!(
        p.layers()
            .map(|(id, n, _)| (id.0, n.to_string()))
            .collect::<Vec<_>>(),
        vec![(0, "fc".to_string()), (1, "emb".to_string())]
    );
    assert_eq!(p.layer_name(e).unwrap(), "emb");
    let a: Vec<f32> = (0..n * i).map(|t| (t as f32 * 0.7).sin()).collect();
    let g: Vec<f32> = (0..n * o).map(|t| (t as f32 * 0.3).cos() * 0.1).collect();
    let ge: Vec<f32> = (0..n * 2).map(|t| t as f32 * 0.01).collect();
    let tokens = [0usize, 1, 1, 4, 2, 0];
    p.observe(
        id,
        Observation::Linear {
            activations: MatRef::from_row_major_slice(&a, n, i),
            output_grads: MatRef::from_row_major_slice(&g, n, o),
        },
    )
    .unwrap();
    p.observe(
        e,
        Observation::Embedding {
            tokens: &tokens,
            output_grads: MatRef::from_row_major_slice(&ge, n, 2),
        },
    )
    .unwrap();
    let mut w: Vec<f32> = vec![0.05; o * i];
    let mut we: Vec<f32> = vec![0.02; 5 * 2];
    let st = p
        .step(&mut [
            LayerGrad::from_row_major(id, &mut w, o, i, None).unwrap(),
            LayerGrad::from_row_major(e, &mut we, 5, 2, None).unwrap(),
        ])
        .unwrap();
    assert_eq!(st.vg_sum_lr2, 0.3 * 0.3 * st.vg_sum);
    // Q diag(l) Q^T reproduces each factor.
    let (fa, fg) = p.factors(id).unwrap();
    let Some(Decomposition::Eigen {
        qa: Some(qa),
        la,
        qg,
        lg,
        ..
    }) = p.decomposition(id).unwrap()
    else {
        panic!("expected an eigendecomposition");
    };
    for (q, l, f) in [(&qa, &la, &fa), (&qg, &lg, &fg)] {
        let d = f.nrows();
        for r in 0..d {
            for c in 0..d {
                let v: f64 = (0..d)
                    .map(|k| q[(r, k)] as f64 * l[k] as f64 * q[(c, k)] as f64)
                    .sum();
                assert!((v - f[(r, c)] as f64).abs() <= 1e-5, "{v} vs {}", f[(r, c)]);
            }
        }
    }
    // A diagonal A: no eigenvectors, the token frequencies as eigenvalues.
    let Some(Decomposition::Eigen { qa: None, la, .. }) = p.decomposition(e).unwrap() else {
        panic!("expected a diagonal-A eigendecomposition");
    };
    assert_eq!(la, vec![2.0 / 6.0, 2.0 / 6.0, 1.0 / 6.0, 0.0, 1.0 / 6.0]);
    // After a reload: the same names, ids and decompositions.
    let q = Preconditioner::load(&p.save()).unwrap();
    assert_eq!(q.layer_id("emb"), Some(e));
    assert_eq!(q.decomposition(id).unwrap(), p.decomposition(id).unwrap());
}

/// A version-1 checkpoint (written by the previous release: the state of
/// the `native_eigen_f64` run of `golden.rs` after 7 steps) still loads,
/// with the new fields at their defaults, and holds the stored factors.
#[test]
fn version_1_checkpoints_still_load() {
    let bytes = include_bytes!("data/v1.ckpt");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    let p = Preconditioner::load(bytes).unwrap();
    assert_eq!(p.steps(), 7);
    assert_eq!(p.grad_scale(), 1.0);
    assert!(!p.config().ignore_conv_dilation);
    let names: Vec<&str> = p.layers().map(|(_, n, _)| n).collect();
    assert_eq!(
        names,
        ["fc1", "fc2", "conv_nchw", "conv_nhwc", "emb", "kron"]
    );
    // The factors' digest, as golden.txt stored it for this run when the
    // checkpoint was written (golden.txt was regenerated when faer's
    // multiply moved from private-gemm-x86 to the gemm crate, #11).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, _, _) in p.layers() {
        let (a, g) = p.factors(id).unwrap();
        for m in [&a, &g] {
            for r in 0..m.nrows() {
                for c in 0..m.ncols() {
                    for b in m[(r, c)].to_bits().to_le_bytes() {
                        h ^= b as u64;
                        h = h.wrapping_mul(0x0100_0000_01b3);
                    }
                }
            }
        }
    }
    assert_eq!(format!("{h:016x}"), "4809aed99c134e2d");
    // Saved again, it is the current version and loads.
    let again = p.save();
    assert_eq!(
        u32::from_le_bytes(again[8..12].try_into().unwrap()),
        kfac_runtime::checkpoint::VERSION
    );
    Preconditioner::load(&again).unwrap();
}

/// kfac-pytorch mode decomposes with `eigen::sym_eigen_reference` (faer's
/// default solver, so its numbers do not move when the native solver is
/// tuned) and native mode with `eigen::sym_eigen`: the stored eigenvectors
/// of a 100-wide factor are exactly each kernel's result on the factor the
/// preconditioner holds, and the two differ.
#[test]
fn kfac_pytorch_mode_keeps_the_reference_eigensolver() {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use kfac_kernels::eigen;
    let (n, i, o) = (160, 100, 3);
    let a: Vec<f32> = (0..n * i)
        .map(|k| ((k * 7919 % 1009) as f32 / 1009.0 - 0.5) * (1.0 + (k % i) as f32 / 50.0))
        .collect();
    let g: Vec<f32> = (0..n * o)
        .map(|k| (k * 31 % 17) as f32 / 17.0 - 0.5)
        .collect();
    let mut qs = Vec::new();
    for config in [Config::kfac_pytorch(), Config::default()] {
        let reference = config.compat == Compat::KfacPytorch;
        let mut p = Preconditioner::new(Config {
            threads: 1,
            eigen_precision: Precision::F32,
            ..config
        })
        .unwrap();
        let id = linear(&mut p, i, o);
        p.observe(
            id,
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&a, n, i),
                output_grads: MatRef::from_row_major_slice(&g, n, o),
            },
        )
        .unwrap();
        let mut w = vec![0.01f32; o * i];
        p.step(&mut [LayerGrad::from_row_major(id, &mut w, o, i, None).unwrap()])
            .unwrap();
        let (fa, _) = p.factors(id).unwrap();
        let Some(Decomposition::Eigen { qa: Some(qa), .. }) = p.decomposition(id).unwrap() else {
            panic!("expected an eigendecomposition");
        };
        let mut l = vec![0f32; i];
        let mut q = Mat::<f32>::zeros(i, i);
        let par = faer::Par::Seq;
        if reference {
            let mut buf = MemBuffer::new(eigen::sym_eigen_reference_scratch::<f32>(i, par));
            eigen::sym_eigen_reference(
                fa.as_ref(),
                &mut l,
                q.as_mut(),
                par,
                MemStack::new(&mut buf),
            )
            .unwrap();
        } else {
            let mut buf = MemBuffer::new(eigen::sym_eigen_scratch::<f32>(i, par));
            eigen::sym_eigen(
                fa.as_ref(),
                &mut l,
                q.as_mut(),
                par,
                MemStack::new(&mut buf),
            )
            .unwrap();
        }
        assert_eq!(qa, q, "reference solver: {reference}");
        qs.push(qa);
    }
    assert_ne!(qs[0], qs[1], "the two solvers should differ in some bits");
}
