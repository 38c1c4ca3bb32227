//! A full preconditioner `step` (factor statistics, running average,
//! eigendecompositions, preconditioning, KL clipping) for ResNet-50 layer
//! shapes, against the sum of the same kernels called directly, in the same
//! run. Target: the step takes at most 1.1x the kernels' sum.
//!
//! Layers `(d_out, d_in + 1)`: (64, 577), (256, 2305), (1000, 2049), batch 32,
//! f32 eigendecompositions, one thread (the runtime's pool and the kernels
//! both sequential, so the ratio measures the runtime's own overhead).
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::{Mat, MatRef, Par};
use kfac::kernels::{eigen, factor, kl};
use kfac::runtime::{
    Config, LayerGrad, LayerKind, Observation, Precision, Preconditioner, Schedule,
};
use std::hint::black_box;
use std::time::Duration;

const SHAPES: [(usize, usize); 3] = [(64, 577), (256, 2305), (1000, 2049)];
const BATCH: usize = 32;

mod common;
use common::data;

struct Layer {
    d_out: usize,
    d_in: usize,
    a: Vec<f32>,
    g: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
}

fn layers() -> Vec<Layer> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(d_out, d))| {
            let d_in = d - 1;
            Layer {
                d_out,
                d_in,
                a: data(BATCH * d_in, 10 + i as u64),
                g: data(BATCH * d_out, 20 + i as u64),
                w: data(d_out * d_in, 30 + i as u64),
                b: data(d_out, 40 + i as u64),
            }
        })
        .collect()
}

fn bench_step(c: &mut Criterion) {
    let ls = layers();
    let mut group = c.benchmark_group("step_resnet50_shapes");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));

    let cfg = Config {
        threads: 1,
        inv_update_steps: 1,
        eigen_precision: Precision::F32,
        damping: Schedule::Constant(1e-3),
        ..Config::default()
    };
    let mut p = Preconditioner::new(cfg).unwrap();
    let ids: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| {
            p.register(
                &format!("l{i}"),
                LayerKind::Linear {
                    in_features: l.d_in,
                    out_features: l.d_out,
                    bias: true,
                },
            )
            .unwrap()
        })
        .collect();
    let mut ws: Vec<Vec<f32>> = ls.iter().map(|l| l.w.clone()).collect();
    let mut bs: Vec<Vec<f32>> = ls.iter().map(|l| l.b.clone()).collect();
    group.bench_function("preconditioner_step", |bch| {
        bch.iter(|| {
            for (l, id) in ls.iter().zip(&ids) {
                p.observe(
                    *id,
                    Observation::Linear {
                        activations: MatRef::from_row_major_slice(&l.a, BATCH, l.d_in),
                        output_grads: MatRef::from_row_major_slice(&l.g, BATCH, l.d_out),
                    },
                )
                .unwrap();
            }
            for ((w, b), l) in ws.iter_mut().zip(bs.iter_mut()).zip(&ls) {
                w.copy_from_slice(&l.w);
                b.copy_from_slice(&l.b);
            }
            let mut grads: Vec<LayerGrad<'_>> = ws
                .iter_mut()
                .zip(bs.iter_mut())
                .zip(&ls)
                .zip(&ids)
                .map(|(((w, b), l), id)| {
                    LayerGrad::from_row_major(*id, w, l.d_out, l.d_in, Some(b)).unwrap()
                })
                .collect();
            black_box(p.step(&mut grads).unwrap());
        })
    });

    // The same kernels, called directly: SYRK for A and G, eigh of both,
    // eigenbasis preconditioning, the KL inner product.
    struct K {
        fa: Mat<f32>,
        fg: Mat<f32>,
        qa: Mat<f32>,
        qg: Mat<f32>,
        la: Vec<f32>,
        lg: Vec<f32>,
        v: Mat<f32>,
        buf: MemBuffer,
    }
    let mut ks: Vec<K> = ls
        .iter()
        .map(|l| {
            let d = l.d_in + 1;
            let req = factor::syrk_update_scratch::<f32>(BATCH, l.d_in, true, Par::Seq)
                .or(eigen::sym_eigen_scratch::<f32>(d.max(l.d_out), Par::Seq))
                .or(eigen::precondition_eigen_scratch::<f32>(
                    l.d_out,
                    d,
                    Par::Seq,
                ));
            K {
                fa: Mat::zeros(d, d),
                fg: Mat::zeros(l.d_out, l.d_out),
                qa: Mat::zeros(d, d),
                qg: Mat::zeros(l.d_out, l.d_out),
                la: vec![0.0; d],
                lg: vec![0.0; l.d_out],
                v: Mat::zeros(l.d_out, d),
                buf: MemBuffer::new(req),
            }
        })
        .collect();
    group.bench_function("kernels_sum", |bch| {
        bch.iter(|| {
            for (l, k) in ls.iter().zip(ks.iter_mut()) {
                let st = MemStack::new(&mut k.buf);
                let a = MatRef::from_row_major_slice(&l.a, BATCH, l.d_in);
                let g = MatRef::from_row_major_slice(&l.g, BATCH, l.d_out);
                factor::syrk_update(
                    k.fa.as_mut(),
                    0.0,
                    1.0 / BATCH as f32,
                    a,
                    true,
                    Par::Seq,
                    st,
                )
                .unwrap();
                factor::syrk_update(
                    k.fg.as_mut(),
                    0.0,
                    1.0 / BATCH as f32,
                    g,
                    false,
                    Par::Seq,
                    st,
                )
                .unwrap();
                eigen::sym_eigen(k.fa.as_ref(), &mut k.la, k.qa.as_mut(), Par::Seq, st).unwrap();
                eigen::sym_eigen(k.fg.as_ref(), &mut k.lg, k.qg.as_mut(), Par::Seq, st).unwrap();
                let w = MatRef::from_row_major_slice(&l.w, l.d_out, l.d_in);
                k.v.as_mut()
                    .submatrix_mut(0, 0, l.d_out, l.d_in)
                    .copy_from(w);
                for (i, &bv) in l.b.iter().enumerate() {
                    k.v[(i, l.d_in)] = bv;
                }
                eigen::precondition_eigen(
                    k.v.as_mut(),
                    k.qg.as_ref(),
                    &k.lg,
                    k.qa.as_ref(),
                    &k.la,
                    1e-3,
                    Par::Seq,
                    st,
                )
                .unwrap();
                black_box(kl::frobenius_dot(k.v.as_ref(), k.v.as_ref()).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
