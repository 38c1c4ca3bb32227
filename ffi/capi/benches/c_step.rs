//! The same K-FAC step through the C ABI (`kfac_step`, the exported
//! function a C caller reaches, called in-process) and through
//! `Preconditioner::step` in Rust, in the same run. Target: the C path
//! within 2% of the Rust one.
//!
//! Both preconditioners get the same layers and observations and one
//! initial step (which computes the decompositions); the measured steps
//! then precondition only (factor and inverse updates not due), which is
//! the cheapest step and so the one where per-call overhead (argument
//! checks, handle registry, `catch_unwind`, view construction) would show.
//! Each iteration first restores the gradients from a copy, identically on
//! both paths. One thread. `mlp-256` is three 256-wide linear layers;
//! `tiny-16` three 16-wide ones, where the step itself is a few
//! microseconds and any fixed C-path cost is most visible.
#![allow(missing_docs)]

use std::ffi::CString;
use std::hint::black_box;
use std::ptr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use faer::MatRef;
use kfac_capi::*;
use kfac_runtime::{Config, LayerGrad, LayerId, LayerKind, Observation, Preconditioner};

const BATCH: usize = 64;

#[path = "../../../benches/common/mod.rs"]
mod common;
use common::data;

struct Setup {
    widths: Vec<(usize, usize)>,
    acts: Vec<Vec<f32>>,
    outs: Vec<Vec<f32>>,
    grads: Vec<(Vec<f32>, Vec<f32>)>,
}

fn setup(width: usize) -> Setup {
    let widths = vec![(width, width), (width, width), (width, 10)];
    let acts = widths
        .iter()
        .enumerate()
        .map(|(i, &(inf, _))| data(BATCH * inf, i as u64))
        .collect();
    let outs = widths
        .iter()
        .enumerate()
        .map(|(i, &(_, outf))| data(BATCH * outf, 10 + i as u64))
        .collect();
    let grads = widths
        .iter()
        .enumerate()
        .map(|(i, &(inf, outf))| (data(outf * inf, 20 + i as u64), data(outf, 30 + i as u64)))
        .collect();
    Setup {
        widths,
        acts,
        outs,
        grads,
    }
}

fn config() -> Config {
    Config {
        threads: 1,
        factor_update_steps: 1 << 40,
        inv_update_steps: 1 << 40,
        ..Config::default()
    }
}

fn rust_precond(s: &Setup) -> Preconditioner {
    let mut p = Preconditioner::new(config()).unwrap();
    for (i, &(inf, outf)) in s.widths.iter().enumerate() {
        let id = p
            .register(
                &format!("fc{i}"),
                LayerKind::Linear {
                    in_features: inf,
                    out_features: outf,
                    bias: true,
                },
            )
            .unwrap();
        p.observe(
            id,
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&s.acts[i], BATCH, inf),
                output_grads: MatRef::from_row_major_slice(&s.outs[i], BATCH, outf),
            },
        )
        .unwrap();
    }
    p
}

fn rust_step(p: &mut Preconditioner, s: &Setup, work: &mut [(Vec<f32>, Vec<f32>)]) {
    for (w, g) in work.iter_mut().zip(&s.grads) {
        w.0.copy_from_slice(&g.0);
        w.1.copy_from_slice(&g.1);
    }
    let mut lg: Vec<LayerGrad<'_>> = work
        .iter_mut()
        .zip(&s.widths)
        .enumerate()
        .map(|(i, (w, &(inf, outf)))| {
            LayerGrad::from_row_major(LayerId(i), &mut w.0, outf, inf, Some(&mut w.1)).unwrap()
        })
        .collect();
    black_box(p.step(&mut lg).unwrap());
}

/// # Safety
/// None beyond the C API's own contract, which this keeps.
unsafe fn c_precond(s: &Setup) -> *mut KfacPrecond {
    // SAFETY: valid pointers and sizes throughout.
    unsafe {
        let mut cfg = std::mem::zeroed::<KfacConfig>();
        assert_eq!(
            kfac_config_default(&mut cfg, std::mem::size_of::<KfacConfig>()),
            KfacStatus::KFAC_OK
        );
        cfg.threads = 1;
        cfg.factor_update_steps = 1 << 40;
        cfg.inv_update_steps = 1 << 40;
        let mut p = ptr::null_mut();
        assert_eq!(
            kfac_precond_create(&cfg, ptr::null_mut(), &mut p),
            KfacStatus::KFAC_OK
        );
        for (i, &(inf, outf)) in s.widths.iter().enumerate() {
            let name = CString::new(format!("fc{i}")).unwrap();
            let mut id = 0;
            assert_eq!(
                kfac_register_linear(p, name.as_ptr(), inf, outf, 1, &mut id),
                KfacStatus::KFAC_OK
            );
            assert_eq!(
                kfac_observe_linear(
                    p,
                    id,
                    s.acts[i].as_ptr(),
                    BATCH,
                    inf,
                    s.outs[i].as_ptr(),
                    outf
                ),
                KfacStatus::KFAC_OK
            );
        }
        p
    }
}

/// # Safety
/// `p` a live handle for `s`'s layers.
unsafe fn c_step(p: *mut KfacPrecond, s: &Setup, work: &mut [(Vec<f32>, Vec<f32>)]) {
    for (w, g) in work.iter_mut().zip(&s.grads) {
        w.0.copy_from_slice(&g.0);
        w.1.copy_from_slice(&g.1);
    }
    let grads: Vec<KfacGrad> = work
        .iter_mut()
        .zip(&s.widths)
        .enumerate()
        .map(|(i, (w, &(inf, _)))| KfacGrad {
            layer: i as u32,
            weight: w.0.as_mut_ptr(),
            ldw: inf,
            bias: w.1.as_mut_ptr(),
        })
        .collect();
    let mut stats = KfacStepStats {
        struct_size: std::mem::size_of::<KfacStepStats>(),
        ..Default::default()
    };
    // SAFETY: live handle; buffers sized for each layer and disjoint.
    let st = unsafe { kfac_step(p, grads.as_ptr(), grads.len(), &mut stats) };
    assert_eq!(st, KfacStatus::KFAC_OK);
    black_box(stats);
}

fn bench(c: &mut Criterion) {
    for (label, width) in [("mlp-256", 256), ("tiny-16", 16)] {
        let s = setup(width);
        let mut work_r = s.grads.clone();
        let mut work_c = s.grads.clone();
        let mut rp = rust_precond(&s);
        // SAFETY: the C API's contract is kept (see `c_precond`).
        let cp = unsafe { c_precond(&s) };
        // The first step of each computes the decompositions.
        rust_step(&mut rp, &s, &mut work_r);
        // SAFETY: live handle for `s`.
        unsafe { c_step(cp, &s, &mut work_c) };
        assert_eq!(work_r, work_c, "C and Rust steps disagree");

        let mut g = c.benchmark_group(format!("c_abi_step/{label}"));
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(4));
        g.sample_size(60);
        g.bench_function("rust", |b| b.iter(|| rust_step(&mut rp, &s, &mut work_r)));
        g.bench_function("c_abi", |b| {
            // SAFETY: live handle for `s` (freed only below).
            b.iter(|| unsafe { c_step(cp, &s, &mut work_c) })
        });
        g.finish();
        // SAFETY: live handle, freed once.
        assert_eq!(unsafe { kfac_precond_free(cp) }, KfacStatus::KFAC_OK);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
