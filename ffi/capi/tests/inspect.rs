//! The C read-access functions (`kfac_layer_id`, `kfac_layer_name`,
//! `kfac_layer_info`, `kfac_get_factors`, `kfac_get_decomposition`), the
//! AMP loss scale (`kfac_set_grad_scale`) and the extensible
//! `KfacStepStats`, checked bitwise against the Rust API fed the same data.

use std::ffi::{c_char, CStr, CString};
use std::mem::size_of;
use std::ptr;

use faer::MatRef;
use kfac_capi::*;
use kfac_runtime::{
    Config, Decomposition, LayerGrad, LayerId, LayerKind, Method, Observation, Preconditioner,
};

use KfacStatus::*;

#[track_caller]
fn ok(s: KfacStatus) {
    // SAFETY: kfac_last_error returns a NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(kfac_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(s, KFAC_OK, "{msg}");
}

const N: usize = 5;
const IN: usize = 4;
const OUT: usize = 3;
const VOCAB: usize = 6;
const DIM: usize = 2;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 10.0)
        .collect()
}

struct Run {
    c: *mut KfacPrecond,
    r: Preconditioner,
}

/// The same two layers (linear, embedding), observations and step through
/// C and Rust; `scale` is the loss scale set on both, and the output
/// gradients are multiplied by it.
fn run(method: u32, scale: f64) -> Run {
    let mut cfg = std::mem::MaybeUninit::<KfacConfig>::zeroed();
    // SAFETY: writable, `size_of` bytes.
    ok(unsafe { kfac_config_default(cfg.as_mut_ptr(), size_of::<KfacConfig>()) });
    // SAFETY: initialized by the call above.
    let mut cfg = unsafe { cfg.assume_init() };
    cfg.threads = 1;
    cfg.method = method;
    let mut c = ptr::null_mut();
    // SAFETY: valid pointers.
    ok(unsafe { kfac_precond_create(&cfg, ptr::null_mut(), &mut c) });
    let mut r = Preconditioner::new(Config {
        threads: 1,
        method: if method == 0 {
            Method::Eigen
        } else {
            Method::Inverse
        },
        ..Config::default()
    })
    .unwrap();
    let (fc, emb) = (CString::new("fc").unwrap(), CString::new("emb").unwrap());
    let (mut i0, mut i1) = (0u32, 0u32);
    // SAFETY: live handle, valid strings and outputs.
    unsafe {
        ok(kfac_register_linear(c, fc.as_ptr(), IN, OUT, 1, &mut i0));
        ok(kfac_register_embedding(
            c,
            emb.as_ptr(),
            VOCAB,
            DIM,
            &mut i1,
        ));
        ok(kfac_set_grad_scale(c, scale));
    }
    r.register(
        "fc",
        LayerKind::Linear {
            in_features: IN,
            out_features: OUT,
            bias: true,
        },
    )
    .unwrap();
    r.register(
        "emb",
        LayerKind::Embedding {
            num_embeddings: VOCAB,
            dim: DIM,
        },
    )
    .unwrap();
    r.set_grad_scale(scale).unwrap();
    let a = data(N * IN, 1);
    let g: Vec<f32> = data(N * OUT, 2).iter().map(|v| v * scale as f32).collect();
    let ge: Vec<f32> = data(N * DIM, 3).iter().map(|v| v * scale as f32).collect();
    let tokens: Vec<u64> = (0..N as u64).map(|t| t * 5 % VOCAB as u64).collect();
    let tok: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
    // SAFETY: dense buffers of the stated sizes.
    unsafe {
        ok(kfac_observe_linear(
            c,
            0,
            a.as_ptr(),
            N,
            IN,
            g.as_ptr(),
            OUT,
        ));
        ok(kfac_observe_embedding(
            c,
            1,
            tokens.as_ptr(),
            N,
            ge.as_ptr(),
            DIM,
        ));
    }
    r.observe(
        LayerId(0),
        Observation::Linear {
            activations: MatRef::from_row_major_slice(&a, N, IN),
            output_grads: MatRef::from_row_major_slice(&g, N, OUT),
        },
    )
    .unwrap();
    r.observe(
        LayerId(1),
        Observation::Embedding {
            tokens: &tok,
            output_grads: MatRef::from_row_major_slice(&ge, N, DIM),
        },
    )
    .unwrap();
    let (mut w, mut b, mut we) = (data(OUT * IN, 4), data(OUT, 5), data(VOCAB * DIM, 6));
    let (mut w2, mut b2, mut we2) = (w.clone(), b.clone(), we.clone());
    let grads = [
        KfacGrad {
            layer: 0,
            weight: w.as_mut_ptr(),
            ldw: IN,
            bias: b.as_mut_ptr(),
        },
        KfacGrad {
            layer: 1,
            weight: we.as_mut_ptr(),
            ldw: DIM,
            bias: ptr::null_mut(),
        },
    ];
    let mut st = KfacStepStats {
        struct_size: size_of::<KfacStepStats>(),
        ..Default::default()
    };
    // SAFETY: live handle, buffers of the layers' shapes, sized stats.
    ok(unsafe { kfac_step(c, grads.as_ptr(), 2, &mut st) });
    let rs = r
        .step(&mut [
            LayerGrad::from_row_major(LayerId(0), &mut w2, OUT, IN, Some(&mut b2)).unwrap(),
            LayerGrad::from_row_major(LayerId(1), &mut we2, VOCAB, DIM, None).unwrap(),
        ])
        .unwrap();
    assert_eq!((w, b, we), (w2, b2, we2));
    assert_eq!(st.vg_sum.to_bits(), rs.vg_sum.to_bits());
    assert_eq!(st.vg_sum_lr2.to_bits(), rs.vg_sum_lr2.to_bits());
    assert_eq!(st.struct_size, size_of::<KfacStepStats>());
    Run { c, r }
}

fn row_major(m: faer::MatRef<'_, f32>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

#[test]
fn c_read_access_equals_the_rust_api() {
    for method in [0u32, 1] {
        let Run { c, r } = run(method, 1.0);
        let name = CString::new("emb").unwrap();
        let mut id = 99;
        // SAFETY: live handle, valid name and output.
        ok(unsafe { kfac_layer_id(c, name.as_ptr(), &mut id) });
        assert_eq!(id, 1);
        let nope = CString::new("nope").unwrap();
        // SAFETY: as above.
        let s = unsafe { kfac_layer_id(c, nope.as_ptr(), &mut id) };
        assert_eq!(s, KFAC_ERR_INVALID_ARGUMENT);
        // Names: a length query, a short buffer, then the name.
        let mut n = 0usize;
        let mut buf = [0 as c_char; 8];
        // SAFETY: NULL buffer with length 0; then an 8-byte buffer.
        unsafe {
            assert_eq!(
                kfac_layer_name(c, 1, ptr::null_mut(), 0, &mut n),
                KFAC_ERR_BUFFER_TOO_SMALL
            );
            assert_eq!(n, 3);
            assert_eq!(
                kfac_layer_name(c, 1, buf.as_mut_ptr(), 3, &mut n),
                KFAC_ERR_BUFFER_TOO_SMALL
            );
            assert_eq!(buf[0], 0, "a refused call writes nothing");
            ok(kfac_layer_name(c, 1, buf.as_mut_ptr(), buf.len(), &mut n));
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), "emb");
            assert_eq!(
                kfac_layer_name(c, 7, buf.as_mut_ptr(), 8, &mut n),
                KFAC_ERR_INVALID_ARGUMENT
            );
        }
        for (id, want_kind) in [
            (0u32, KfacLayerKind::KFAC_LAYER_LINEAR),
            (1, KfacLayerKind::KFAC_LAYER_EMBEDDING),
        ] {
            let (mut kind, mut da, mut dg) = (9u32, 0usize, 0usize);
            // SAFETY: live handle, writable outputs.
            ok(unsafe { kfac_layer_info(c, id, &mut kind, &mut da, &mut dg) });
            assert_eq!(kind, want_kind as u32);
            let (rg, ra) = r.layer_kind(LayerId(id as usize)).unwrap().dims();
            assert_eq!((da, dg), (ra, rg));
            // Factors, with padded leading dimensions.
            let (lda, ldg) = (da + 3, dg + 1);
            let mut fa = vec![f32::NAN; da * lda];
            let mut fg = vec![f32::NAN; dg * ldg];
            // SAFETY: buffers of `d * ld` floats.
            ok(unsafe { kfac_get_factors(c, id, fa.as_mut_ptr(), lda, fg.as_mut_ptr(), ldg) });
            let (ra_m, rg_m) = r.factors(LayerId(id as usize)).unwrap();
            let strip = |v: &[f32], d: usize, ld: usize| -> Vec<f32> {
                (0..d)
                    .flat_map(|i| v[i * ld..i * ld + d].to_vec())
                    .collect()
            };
            assert_eq!(strip(&fa, da, lda), row_major(ra_m.as_ref()));
            assert_eq!(strip(&fg, dg, ldg), row_major(rg_m.as_ref()));
            // A leading dimension too small is refused, nothing written.
            let mut small = vec![7.0f32; da * da];
            // SAFETY: as above.
            let s = unsafe {
                kfac_get_factors(c, id, small.as_mut_ptr(), da - 1, fg.as_mut_ptr(), ldg)
            };
            assert_eq!(s, KFAC_ERR_SHAPE);
            assert!(small.iter().all(|&v| v == 7.0));
            // Decomposition.
            let (mut a, mut la) = (vec![0.0f32; da * da], vec![0.0f32; da]);
            let (mut g, mut lg) = (vec![0.0f32; dg * dg], vec![0.0f32; dg]);
            let mut dk = 9u32;
            // SAFETY: buffers of the layer's sizes.
            ok(unsafe {
                kfac_get_decomposition(
                    c,
                    id,
                    &mut dk,
                    a.as_mut_ptr(),
                    da,
                    la.as_mut_ptr(),
                    g.as_mut_ptr(),
                    dg,
                    lg.as_mut_ptr(),
                )
            });
            match r.decomposition(LayerId(id as usize)).unwrap().unwrap() {
                Decomposition::Eigen {
                    qa,
                    la: rla,
                    qg,
                    lg: rlg,
                    ..
                } => {
                    assert_eq!(dk, KfacDecompositionKind::KFAC_DECOMPOSITION_EIGEN as u32);
                    let qa = qa.unwrap_or_else(|| faer::Mat::identity(da, da));
                    assert_eq!(a, row_major(qa.as_ref()));
                    assert_eq!((la, lg), (rla, rlg));
                    assert_eq!(g, row_major(qg.as_ref()));
                }
                Decomposition::Inverse { a_inv, g_inv } => {
                    assert_eq!(dk, KfacDecompositionKind::KFAC_DECOMPOSITION_INVERSE as u32);
                    assert_eq!(a, row_major(a_inv.as_ref()));
                    assert_eq!(g, row_major(g_inv.as_ref()));
                }
                _ => unreachable!(),
            }
        }
        // After a checkpoint round trip, names still find the layers.
        let mut size = 0;
        // SAFETY: live handle and outputs; a buffer of `size` bytes.
        unsafe {
            ok(kfac_save_size(c, &mut size));
            let mut bytes = vec![0u8; size];
            let mut written = 0;
            ok(kfac_save(c, bytes.as_mut_ptr(), size, &mut written));
            let mut q = ptr::null_mut();
            ok(kfac_load(bytes.as_ptr(), written, ptr::null_mut(), &mut q));
            ok(kfac_layer_id(q, name.as_ptr(), &mut id));
            assert_eq!(id, 1);
            ok(kfac_precond_free(q));
            ok(kfac_precond_free(c));
        }
    }
}

#[test]
fn grad_scale_and_stats_size_through_c() {
    // A loss scale of 256 on 256x output gradients gives the unscaled
    // factors (checked bitwise inside `run` against Rust, and here
    // against a run without scaling).
    let plain = run(0, 1.0);
    let scaled = run(0, 256.0);
    let (mut f1, mut f2) = (vec![0.0f32; OUT * OUT], vec![0.0f32; OUT * OUT]);
    let mut fa = vec![0.0f32; (IN + 1) * (IN + 1)];
    // SAFETY: buffers of the layer's sizes.
    unsafe {
        ok(kfac_get_factors(
            plain.c,
            0,
            fa.as_mut_ptr(),
            IN + 1,
            f1.as_mut_ptr(),
            OUT,
        ));
        ok(kfac_get_factors(
            scaled.c,
            0,
            fa.as_mut_ptr(),
            IN + 1,
            f2.as_mut_ptr(),
            OUT,
        ));
    }
    assert_eq!(f1, f2);
    // SAFETY: live handle.
    unsafe {
        for bad in [0.0, -2.0, f64::NAN, f64::INFINITY] {
            assert_eq!(kfac_set_grad_scale(plain.c, bad), KFAC_ERR_INVALID_ARGUMENT);
        }
        // A stats struct without its size is refused before anything runs.
        let mut st = KfacStepStats::default();
        assert_eq!(kfac_last_stats(plain.c, &mut st), KFAC_ERR_INVALID_ARGUMENT);
        let mut steps = 0u64;
        let mut w = data(OUT * IN, 4);
        let mut b = data(OUT, 5);
        let grads = [KfacGrad {
            layer: 0,
            weight: w.as_mut_ptr(),
            ldw: IN,
            bias: b.as_mut_ptr(),
        }];
        let before = w.clone();
        assert_eq!(
            kfac_step(plain.c, grads.as_ptr(), 1, &mut st),
            KFAC_ERR_INVALID_ARGUMENT
        );
        ok(kfac_steps(plain.c, &mut steps));
        assert_eq!(steps, 1, "a refused stats size must not step");
        assert_eq!(w, before);
        ok(kfac_precond_free(plain.c));
        ok(kfac_precond_free(scaled.c));
    }
}

/// `KfacConfig.refresh_tolerance` reaches the runtime: a linear layer fed
/// the same batch at every step (so its factors stop drifting) keeps its
/// eigenbases from the second inversion on, `KfacStepStats.
/// decompositions_kept` says so, and every preconditioned gradient equals
/// the Rust API's with the same tolerance bitwise (and so does
/// `decompositions_refined`); stats structs of the first and second
/// layouts are written without the fields added after them.
#[test]
fn refresh_tolerance_through_c_equals_the_rust_api() {
    let mut cfg = std::mem::MaybeUninit::<KfacConfig>::zeroed();
    // SAFETY: writable, `size_of` bytes.
    ok(unsafe { kfac_config_default(cfg.as_mut_ptr(), size_of::<KfacConfig>()) });
    // SAFETY: initialized by the call above.
    let mut cfg = unsafe { cfg.assume_init() };
    assert_eq!(
        cfg.refresh_tolerance, 0.0,
        "the default decomposes everything"
    );
    cfg.threads = 1;
    cfg.inv_update_steps = 1;
    cfg.refresh_tolerance = 0.5;
    let mut c = ptr::null_mut();
    // SAFETY: valid pointers.
    ok(unsafe { kfac_precond_create(&cfg, ptr::null_mut(), &mut c) });
    let mut r = Preconditioner::new(Config {
        threads: 1,
        inv_update_steps: 1,
        refresh_tolerance: 0.5,
        ..Config::default()
    })
    .unwrap();
    let fc = CString::new("fc").unwrap();
    let mut id = 0u32;
    // SAFETY: live handle, valid string and output.
    ok(unsafe { kfac_register_linear(c, fc.as_ptr(), IN, OUT, 1, &mut id) });
    r.register(
        "fc",
        LayerKind::Linear {
            in_features: IN,
            out_features: OUT,
            bias: true,
        },
    )
    .unwrap();
    let (a, g) = (data(N * IN, 1), data(N * OUT, 2));
    let mut kept = Vec::new();
    for step in 0..4 {
        // SAFETY: dense buffers of the stated sizes.
        ok(unsafe { kfac_observe_linear(c, 0, a.as_ptr(), N, IN, g.as_ptr(), OUT) });
        r.observe(
            LayerId(0),
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&a, N, IN),
                output_grads: MatRef::from_row_major_slice(&g, N, OUT),
            },
        )
        .unwrap();
        let (mut w, mut b) = (data(OUT * IN, 4 + step), data(OUT, 5 + step));
        let (mut w2, mut b2) = (w.clone(), b.clone());
        let grads = [KfacGrad {
            layer: 0,
            weight: w.as_mut_ptr(),
            ldw: IN,
            bias: b.as_mut_ptr(),
        }];
        // Step 2 passes the second layout's size, step 3 the first's: the
        // fields past them stay as they were.
        let v2 = size_of::<KfacStepStats>() - 8;
        let v1 = v2 - 8;
        let mut st = KfacStepStats {
            struct_size: match step {
                3 => v1,
                2 => v2,
                _ => size_of::<KfacStepStats>(),
            },
            decompositions_kept: 77,
            decompositions_refined: 78,
            ..Default::default()
        };
        // SAFETY: live handle, buffers of the layer's shape, `struct_size`
        // writable bytes.
        ok(unsafe { kfac_step(c, grads.as_ptr(), 1, &mut st) });
        let rs = r
            .step(&mut [
                LayerGrad::from_row_major(LayerId(0), &mut w2, OUT, IN, Some(&mut b2)).unwrap(),
            ])
            .unwrap();
        assert_eq!((&w, &b), (&w2, &b2), "step {step}");
        let (kept_c, refined_c) = (st.decompositions_kept, st.decompositions_refined);
        match step {
            3 => assert_eq!((st.struct_size, kept_c, refined_c), (v1, 77, 78)),
            2 => assert_eq!(
                (st.struct_size, kept_c, refined_c),
                (v2, rs.decompositions_kept as u64, 78)
            ),
            _ => assert_eq!(
                (kept_c, refined_c),
                (
                    rs.decompositions_kept as u64,
                    rs.decompositions_refined as u64
                )
            ),
        }
        kept.push(rs.decompositions_kept);
    }
    assert_eq!(
        kept,
        [0, 2, 2, 2],
        "both factors kept after the first inversion"
    );
    // SAFETY: live handle, freed once.
    unsafe { kfac_precond_free(c) };
}
