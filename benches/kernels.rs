//! Criterion benches of the `kfac-kernels` hot paths, each against a plain
//! faer baseline measured in the same run, and the eigensolver also against
//! the system LAPACK's `ssyevd`/`dsyevd` (OpenBLAS, loaded at run time; see
//! `common/lapack.rs`).
//!
//! Run: `CARGO_TARGET_DIR=/work/target-bench cargo bench --bench kernels`
//! (filter with e.g. `-- factor/`). Results and the targets are in
//! `BENCHMARKS.md`.
//!
//! # Flop convention
//!
//! Every throughput is `Throughput::Elements(flops)`, so criterion's
//! "elem/s" is flop/s. A multiply-add counts as **2 flops** everywhere, and
//! a kernel is credited only with the flops it *needs* (a SYRK is credited
//! with the lower triangle, not with the full product a GEMM would compute):
//!
//! | kernel | flops credited |
//! |---|---|
//! | SYRK `C += X^T X` lower triangle, `X: n x d` (ours, and conv's tiles) | `n d (d + 1)` |
//! | full GEMM `C += X^T X` (baseline) | `2 n d^2` |
//! | symmetric eigendecomposition with vectors, `d x d` | `9 d^3` (nominal; read the time) |
//! | eigen preconditioning, `grad: d_out x d` (four matmuls) | `4 d_out d (d_out + d)` |
//! | inverse preconditioning (two matmuls) | `2 d_out d (d_out + d)` |
//!
//! So for the factor update "SYRK at 85% of the GEMM rate" means
//! `t_syrk <= 0.5 (d + 1) / d / 0.85 * t_gemm ~= 0.59 t_gemm`.
//!
//! Benchmark ids are `group = "<kernel family>/<type>/<shape>"`,
//! `function = "<ours or baseline name>"`, `parameter = "1t" | "2t"`
//! (`Par::Seq` or `Par::rayon(2)`). All matrices and scratch buffers are
//! allocated and pre-faulted outside the timed closures and reused.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use kfac::kernels::conv::{
    conv2d_a_update, conv2d_a_update_scratch, Conv2dGeometry, ConvNormalization, ImageLayout,
    ImageRef,
};
use kfac::kernels::faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use kfac::kernels::faer::linalg::evd;
use kfac::kernels::faer::linalg::matmul::matmul;
use kfac::kernels::faer::linalg::matmul::triangular::{self, BlockStructure};
use kfac::kernels::faer::{Accum, Mat, MatRef, Par};
use kfac::kernels::{eigen, factor, inverse, Real};

#[path = "common/lapack.rs"]
mod lapack;

/// `(label, Par)` for one thread, and for two threads.
fn pars(two_threads: bool) -> Vec<(&'static str, Par)> {
    let mut v = vec![("1t", Par::Seq)];
    if two_threads {
        v.push(("2t", Par::rayon(2)));
    }
    v
}

/// A scratch buffer with every page touched (fresh pages copy at half speed).
fn prefaulted(req: StackReq) -> MemBuffer {
    let mut buf = MemBuffer::new(req);
    for b in buf.iter_mut() {
        b.write(0);
    }
    buf
}

/// Deterministic pseudo-random values in `[-1, 1)` (xorshift).
fn rand_vec<T: Real>(len: usize, seed: u64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64((s >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
        })
        .collect()
}

fn rand_mat<T: Real>(rows: usize, cols: usize, seed: u64) -> Mat<T> {
    let v = rand_vec::<T>(rows * cols, seed);
    Mat::from_fn(rows, cols, |i, j| v[i + j * rows])
}

/// A dense orthogonal matrix `I - 2 v v^T / (v^T v)` (a Householder
/// reflector): applying it any number of times keeps values in range.
fn householder<T: Real>(d: usize, seed: u64) -> Mat<T> {
    let v: Vec<f64> = rand_vec::<f64>(d, seed).iter().map(|x| x + 1.5).collect();
    let vv: f64 = v.iter().map(|x| x * x).sum();
    Mat::from_fn(d, d, |i, j| {
        let id = if i == j { 1.0 } else { 0.0 };
        T::from_f64(id - 2.0 * v[i] * v[j] / vv)
    })
}

fn group<'a>(c: &'a mut Criterion, name: String) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g
}

// ---------------------------------------------------------------------------
// 1. Factor update: SYRK (accumulate, alpha = 1) and the lazy running average
//    against the system BLAS's ?syrk (OpenBLAS, threads set to the row's
//    count) and faer's full GEMM computing all of X^T X. f32 shapes span
//    n = 32..8192 rows and d = 64..4608 (issue #13); f64 a few of them.
// ---------------------------------------------------------------------------

fn bench_factor_t<T: Real + lapack::LapackReal>(
    c: &mut Criterion,
    shapes: &[(usize, usize)],
    lib: Option<&lapack::Lapack>,
) {
    for &(n, d) in shapes {
        // X is n x d row-major, as handed over from C.
        let xs = rand_vec::<T>(n * d, (n * 31 + d) as u64);
        let x = MatRef::from_row_major_slice(&xs, n, d);
        let mut c_ours = Mat::<T>::zeros(d, d);
        let mut c_lazy = Mat::<T>::zeros(d, d);
        let mut c_full = Mat::<T>::zeros(d, d);
        let mut c_blas = vec![T::ZERO; d * d];
        let mut buf = prefaulted(factor::syrk_update_scratch::<T>(n, d, false, Par::rayon(2)));
        let beta = T::ONE / T::from_usize(n);
        let syrk_flops = (n * d * (d + 1)) as u64;
        let gemm_flops = (2 * n * d * d) as u64;

        let mut g = group(c, format!("factor/{}/n{n}_d{d}", T::NAME));
        for (label, par) in pars(n * d * d >= 1 << 24) {
            g.throughput(Throughput::Elements(syrk_flops));
            g.bench_function(format!("syrk_update/{label}"), |b| {
                b.iter(|| {
                    factor::syrk_update(
                        c_ours.as_mut(),
                        T::ONE,
                        beta,
                        black_box(x),
                        false,
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            if let Some(lib) = lib {
                lib.set_threads(par.degree());
                if T::syrk(lib, d, n, beta, &xs, &mut c_blas) {
                    g.bench_function(format!("blas_syrk/{label}"), |b| {
                        b.iter(|| T::syrk(lib, d, n, beta, black_box(&xs), &mut c_blas))
                    });
                }
            }
            let mut scale = T::ONE;
            let xi = T::from_f64(0.95);
            g.bench_function(format!("running_average_lazy/{label}"), |b| {
                b.iter(|| {
                    factor::running_average_lazy(
                        c_lazy.as_mut(),
                        &mut scale,
                        xi,
                        black_box(x),
                        false,
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.throughput(Throughput::Elements(gemm_flops));
            g.bench_function(format!("faer_gemm_full/{label}"), |b| {
                b.iter(|| {
                    matmul(
                        c_full.as_mut(),
                        Accum::Add,
                        black_box(x).transpose(),
                        x,
                        beta,
                        par,
                    )
                })
            });
        }
        g.finish();
    }
}

fn bench_factor(c: &mut Criterion) {
    let lib = lapack::Lapack::load();
    if let Some(lib) = &lib {
        eprintln!("BLAS baseline: {}", lib.name);
    }
    let f32_shapes = [
        (32, 1024),
        (256, 64),
        (256, 256),
        (256, 1024),
        (256, 4608),
        (2048, 1024),
        (2048, 2304),
        (2048, 4608),
        (8192, 64),
        (8192, 512),
    ];
    bench_factor_t::<f32>(c, &f32_shapes, lib.as_ref());
    bench_factor_t::<f64>(c, &[(256, 256), (256, 1024), (2048, 1024)], lib.as_ref());
}

// ---------------------------------------------------------------------------
// 2. Eigendecomposition: eigen::sym_eigen (which picks a solver by size and
//    threads) and eigen::sym_eigen_blocked (our tridiagonal reduction at
//    every size) against calling faer's self_adjoint_evd directly
//    and against the system LAPACK's ?syevd (loaded at run time; OpenBLAS
//    threads set to match). Sizes 256..2048, and 4608 (ResNet-50's largest
//    factor) with KFAC_BENCH_LARGE=1.
// ---------------------------------------------------------------------------

fn bench_eigen_t<T: Real + lapack::LapackReal>(c: &mut Criterion, lib: Option<&lapack::Lapack>) {
    let mut sizes = vec![256usize, 512, 1024, 2048];
    if std::env::var_os("KFAC_BENCH_LARGE").is_some() {
        sizes.push(4608);
    }
    for d in sizes {
        // A well-conditioned SPD factor: X^T X / n + I.
        let n = d + 64;
        let x = rand_mat::<T>(n, d, d as u64);
        let mut a = Mat::<T>::identity(d, d);
        matmul(
            a.as_mut(),
            Accum::Add,
            x.transpose(),
            x.as_ref(),
            T::ONE / T::from_usize(n),
            Par::rayon(2),
        );
        let mut q = Mat::<T>::zeros(d, d);
        let mut l = vec![T::ZERO; d];
        let mut q_faer = Mat::<T>::zeros(d, d);
        let mut s_faer = Mat::<T>::zeros(d, 1);
        // Either solver may run (1 or 2 threads): room for both.
        let mut buf = prefaulted(StackReq::any_of(&[
            eigen::sym_eigen_scratch::<T>(d, Par::Seq),
            eigen::sym_eigen_scratch::<T>(d, Par::rayon(2)),
        ]));
        let mut buf_blocked = prefaulted(eigen::sym_eigen_blocked_scratch::<T>(d, Par::rayon(2)));
        let mut buf_faer = prefaulted(evd::self_adjoint_evd_scratch::<T>(
            d,
            evd::ComputeEigenvectors::Yes,
            Par::rayon(2),
            Default::default(),
        ));
        let flops = 9 * (d as u64).pow(3);
        // LAPACK's input (column-major, as `a`) and, once, its answer
        // checked against ours: the eigenvalues agree to a few ulps of
        // ||A|| per dimension, or the baseline is not computing the same.
        let a_cols: Vec<T> = (0..d * d).map(|k| a[(k % d, k / d)]).collect();
        let mut lap = lib.map(|lib| (lib, lapack::Syevd::<T>::new(lib, d)));
        if let Some((lib, w)) = lap.as_mut() {
            w.run(lib, &a_cols);
            eigen::sym_eigen(
                a.as_ref(),
                &mut l,
                q.as_mut(),
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .unwrap();
            let ours: Vec<f64> = l.iter().map(|x| x.to_f64()).collect();
            let norm = ours.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            w.assert_eigenvalues_match(&ours, norm, &format!("{} d={d}", T::NAME));
        }

        let mut g = group(c, format!("eigen/{}/d{d}", T::NAME));
        g.throughput(Throughput::Elements(flops));
        for (label, par) in pars(true) {
            g.bench_function(format!("sym_eigen/{label}"), |b| {
                b.iter(|| {
                    eigen::sym_eigen(
                        black_box(a.as_ref()),
                        &mut l,
                        q.as_mut(),
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("sym_eigen_blocked/{label}"), |b| {
                b.iter(|| {
                    eigen::sym_eigen_blocked(
                        black_box(a.as_ref()),
                        &mut l,
                        q.as_mut(),
                        par,
                        MemStack::new(&mut buf_blocked),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("faer_self_adjoint_evd/{label}"), |b| {
                b.iter(|| {
                    evd::self_adjoint_evd(
                        black_box(a.as_ref()),
                        s_faer.as_mut().col_mut(0).as_diagonal_mut(),
                        Some(q_faer.as_mut()),
                        par,
                        MemStack::new(&mut buf_faer),
                        Default::default(),
                    )
                    .unwrap()
                })
            });
            bench_lapack_syevd(&mut g, lap.as_mut(), label, &a_cols);
        }
        g.finish();
    }
}

/// LAPACK's `?syevd` of `a_cols` (column-major) in group `g`, with
/// OpenBLAS's threads matching `label` ("1t" / "2t"; skipped on two
/// threads when they cannot be set).
fn bench_lapack_syevd<T: Real + lapack::LapackReal>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    lap: Option<&mut (&lapack::Lapack, lapack::Syevd<T>)>,
    label: &str,
    a_cols: &[T],
) {
    if let Some((lib, w)) = lap {
        let threads = if label == "1t" { 1 } else { 2 };
        if lib.set_threads(threads) || threads == 1 {
            g.bench_function(format!("lapack_syevd/{label}"), |b| {
                b.iter(|| w.run(lib, black_box(a_cols)))
            });
        }
        lib.set_threads(1);
    }
}

fn bench_eigen(c: &mut Criterion) {
    let lib = lapack::Lapack::load();
    if let Some(lib) = &lib {
        eprintln!("LAPACK baseline: {}", lib.name);
    }
    bench_eigen_t::<f32>(c, lib.as_ref());
    bench_eigen_t::<f64>(c, lib.as_ref());
}

// ---------------------------------------------------------------------------
// 2b. Refreshing an old eigenbasis (`Config::refresh_tolerance`) against
//     decomposing again: the reuse test (randomized, 32 probes), the
//     keep test (exact drift, 3 d^3 flops), keep test plus one refinement
//     step (6 d^3), and sym_eigen / LAPACK's ?syevd of the same factor.
//     The old factor has eigenvalues 1..d in a dense orthogonal basis, the
//     new one a small symmetric perturbation of it, so the refinement is
//     taken. Sizes 256..2048, and 4608 with KFAC_BENCH_LARGE=1.
// ---------------------------------------------------------------------------

fn bench_refresh_t<T: Real + lapack::LapackReal>(c: &mut Criterion, lib: Option<&lapack::Lapack>) {
    let mut sizes = vec![256usize, 1024, 2048];
    if std::env::var_os("KFAC_BENCH_LARGE").is_some() {
        sizes.push(4608);
    }
    for d in sizes {
        // The old factor: eigenvalues 1..d in a dense orthogonal basis; the
        // new one: that plus a symmetric perturbation of entries ~1e-4.
        let h = householder::<T>(d, 3);
        let mut hl = h.clone();
        for j in 0..d {
            for i in 0..d {
                hl[(i, j)] *= T::from_usize(1 + j);
            }
        }
        let mut old = Mat::<T>::zeros(d, d);
        matmul(
            old.as_mut(),
            Accum::Replace,
            hl.as_ref(),
            h.transpose(),
            T::ONE,
            Par::rayon(2),
        );
        let par_all = Par::rayon(2);
        let mut buf = prefaulted(StackReq::any_of(&[
            eigen::sym_eigen_scratch::<T>(d, Par::Seq),
            eigen::sym_eigen_scratch::<T>(d, par_all),
            eigen::refresh_eigenbasis_scratch::<T>(d, par_all),
            eigen::eigenbasis_change_estimate_scratch::<T>(d, 32),
        ]));
        let mut q0 = Mat::<T>::zeros(d, d);
        let mut l0 = vec![T::ZERO; d];
        eigen::sym_eigen(
            old.as_ref(),
            &mut l0,
            q0.as_mut(),
            Par::Seq,
            MemStack::new(&mut buf),
        )
        .unwrap();
        let (mut q, mut l) = (q0.clone(), l0.clone());
        // The new factor: the old one turned in a plane, `s (u v^T + v u^T)`
        // for unit `u`, `v`, of a size a few times the old basis's rounding
        // floor (its drift against the old factor itself), the largest
        // whose refinement is within a limit just below its drift (checked
        // here): the keep test fails, the refinement is taken.
        let unit = |seed: u64| {
            let v = rand_vec::<f64>(d, seed);
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
        };
        let (u, v) = (unit(11), unit(12));
        let make = |s: f64| {
            Mat::<T>::from_fn(d, d, |i, j| {
                let o = (old[(i, j)] + old[(j, i)]) * T::from_f64(0.5);
                o + T::from_f64(s * (u[i] * v[j] + v[i] * u[j]))
            })
        };
        let mut refresh = |a: &Mat<T>, q: &mut Mat<T>, limit: f64| {
            q.copy_from(&q0);
            eigen::refresh_eigenbasis(
                a.as_ref(),
                q.as_mut(),
                &mut l,
                limit,
                1.0,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .unwrap()
        };
        let floor = refresh(&make(0.0), &mut q, 0.0).drift;
        // (At larger orders the f32 rounding of the old basis, coupling
        // every pair, keeps the bound above the drift: no refinement is
        // benched there, only the tests.)
        let refined = [100.0, 30.0, 10.0, 3.0].into_iter().find_map(|mult| {
            let a = make(mult * floor);
            let limit = 0.999 * refresh(&a, &mut q, 0.0).drift;
            let r = refresh(&a, &mut q, limit);
            (r.kind == eigen::RefreshKind::Refined).then_some((a, Some(limit)))
        });
        if refined.is_none() {
            eprintln!("refresh d={d}: no perturbation is refined; refinement not benched");
        }
        let (a, limit) = refined.unwrap_or_else(|| (make(30.0 * floor), None));
        let a_cols: Vec<T> = (0..d * d).map(|k| a[(k % d, k / d)]).collect();
        let mut lap = lib.map(|lib| (lib, lapack::Syevd::<T>::new(lib, d)));

        let mut g = group(c, format!("refresh/{}/d{d}", T::NAME));
        g.throughput(Throughput::Elements(9 * (d as u64).pow(3)));
        for (label, par) in pars(true) {
            g.bench_function(format!("reuse_test/{label}"), |b| {
                b.iter(|| {
                    eigen::eigenbasis_change_estimate(
                        black_box(a.as_ref()),
                        q0.as_ref(),
                        &l0,
                        32,
                        1,
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("keep_test/{label}"), |b| {
                b.iter(|| {
                    q.copy_from(&q0);
                    eigen::refresh_eigenbasis(
                        black_box(a.as_ref()),
                        q.as_mut(),
                        &mut l,
                        f64::INFINITY,
                        1.0,
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            if let Some(limit) = limit {
                g.bench_function(format!("keep_test_and_refine/{label}"), |b| {
                    b.iter(|| {
                        q.copy_from(&q0);
                        eigen::refresh_eigenbasis(
                            black_box(a.as_ref()),
                            q.as_mut(),
                            &mut l,
                            limit,
                            1.0,
                            par,
                            MemStack::new(&mut buf),
                        )
                        .unwrap()
                    })
                });
            }
            g.bench_function(format!("sym_eigen/{label}"), |b| {
                b.iter(|| {
                    eigen::sym_eigen(
                        black_box(a.as_ref()),
                        &mut l,
                        q.as_mut(),
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            bench_lapack_syevd(&mut g, lap.as_mut(), label, &a_cols);
        }
        g.finish();
    }
}

fn bench_refresh(c: &mut Criterion) {
    let lib = lapack::Lapack::load();
    bench_refresh_t::<f32>(c, lib.as_ref());
}

// ---------------------------------------------------------------------------
// 3. Preconditioning against plain faer matmuls of the same shapes.
// ---------------------------------------------------------------------------

fn bench_precondition_t<T: Real>(c: &mut Criterion) {
    for &(d_out, d) in &[(64usize, 577usize), (256, 2305), (512, 4609), (1000, 2049)] {
        // Orthogonal Q's and eigenvalues with l_G l_A + damping == 1, so the
        // in-place preconditioners keep `grad` in range across iterations.
        let qg = householder::<T>(d_out, 1);
        let qa = householder::<T>(d, 2);
        let lg = vec![T::from_f64(0.5); d_out];
        let la = vec![T::ONE; d];
        let damping = T::from_f64(0.5);
        let mut inv_denom = Mat::<T>::zeros(d_out, d);
        eigen::eigen_inverse_denominators(inv_denom.as_mut(), &lg, &la, damping).unwrap();
        let grad0 = rand_mat::<T>(d_out, d, 3);
        let mut grad = grad0.clone();
        let mut t1 = Mat::<T>::zeros(d_out, d);
        let mut t2 = Mat::<T>::zeros(d_out, d);
        let mut out = Mat::<T>::zeros(d_out, d);
        let mut buf = prefaulted(
            eigen::precondition_eigen_scratch::<T>(d_out, d, Par::rayon(2)).or(
                inverse::precondition_inverse_scratch::<T>(d_out, d, Par::rayon(2)),
            ),
        );
        let four = (4 * d_out * d * (d_out + d)) as u64;
        let two = (2 * d_out * d * (d_out + d)) as u64;

        let mut g = group(c, format!("precondition/{}/{d_out}x{d}", T::NAME));
        for (label, par) in pars(d_out >= 256) {
            g.throughput(Throughput::Elements(four));
            g.bench_function(format!("precondition_eigen/{label}"), |b| {
                b.iter(|| {
                    eigen::precondition_eigen(
                        grad.as_mut(),
                        qg.as_ref(),
                        &lg,
                        qa.as_ref(),
                        &la,
                        damping,
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("precondition_eigen_precomputed/{label}"), |b| {
                b.iter(|| {
                    eigen::precondition_eigen_precomputed(
                        grad.as_mut(),
                        qg.as_ref(),
                        qa.as_ref(),
                        inv_denom.as_ref(),
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("faer_4_matmuls/{label}"), |b| {
                b.iter(|| {
                    let gr = black_box(grad0.as_ref());
                    matmul(t1.as_mut(), Accum::Replace, qg.transpose(), gr, T::ONE, par);
                    matmul(
                        t2.as_mut(),
                        Accum::Replace,
                        t1.as_ref(),
                        qa.as_ref(),
                        T::ONE,
                        par,
                    );
                    matmul(
                        t1.as_mut(),
                        Accum::Replace,
                        qg.as_ref(),
                        t2.as_ref(),
                        T::ONE,
                        par,
                    );
                    matmul(
                        out.as_mut(),
                        Accum::Replace,
                        t1.as_ref(),
                        qa.transpose(),
                        T::ONE,
                        par,
                    );
                })
            });
            g.throughput(Throughput::Elements(two));
            // The damped inverses are symmetric in real use; a reflector is
            // symmetric and orthogonal, so it stands in for one.
            g.bench_function(format!("precondition_inverse/{label}"), |b| {
                b.iter(|| {
                    inverse::precondition_inverse(
                        grad.as_mut(),
                        qg.as_ref(),
                        qa.as_ref(),
                        par,
                        MemStack::new(&mut buf),
                    )
                    .unwrap()
                })
            });
            g.bench_function(format!("faer_2_matmuls/{label}"), |b| {
                b.iter(|| {
                    let gr = black_box(grad0.as_ref());
                    matmul(t1.as_mut(), Accum::Replace, qg.as_ref(), gr, T::ONE, par);
                    matmul(
                        out.as_mut(),
                        Accum::Replace,
                        t1.as_ref(),
                        qa.as_ref(),
                        T::ONE,
                        par,
                    );
                })
            });
        }
        g.finish();
    }
}

fn bench_precondition(c: &mut Criterion) {
    bench_precondition_t::<f32>(c);
    bench_precondition_t::<f64>(c);
}

// ---------------------------------------------------------------------------
// 4. Conv2d patch statistics (ResNet-50 conv2_x 3x3 layer) against
//    materialize-then-SYRK: a full im2col into one big matrix with plain
//    loops, then faer's triangular-lower matmul on it.
// ---------------------------------------------------------------------------

/// Full im2col of every patch into `m` (`n*S x C*kh*kw`, column-major,
/// columns `(c, u, v)`), plain loops over the output in storage order.
fn im2col_plain<T: Real>(m: &mut [T], img: &[T], layout: ImageLayout, g: &Conv2dGeometry) {
    let (oh, ow) = g.output_size().unwrap();
    let (n, ch, h, w) = (g.batch, g.in_channels, g.in_h, g.in_w);
    let rows = n * oh * ow;
    let (sn, sc, sh, sw) = match layout {
        ImageLayout::Nchw => (ch * h * w, h * w, w, 1),
        ImageLayout::Nhwc => (h * w * ch, 1, w * ch, ch),
    };
    let mut col = 0;
    for c in 0..ch {
        for u in 0..g.kernel_h {
            for v in 0..g.kernel_w {
                let dst = &mut m[col * rows..(col + 1) * rows];
                let mut r = 0;
                for i in 0..n {
                    for y in 0..oh {
                        let iy = (y * g.stride_h + u * g.dilation_h) as isize - g.pad_h as isize;
                        for x in 0..ow {
                            let ix =
                                (x * g.stride_w + v * g.dilation_w) as isize - g.pad_w as isize;
                            dst[r] = if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w
                            {
                                img[i * sn + c * sc + iy as usize * sh + ix as usize * sw]
                            } else {
                                T::ZERO
                            };
                            r += 1;
                        }
                    }
                }
                col += 1;
            }
        }
    }
}

/// One conv2d layer of the A-statistics bench: `(name, geometry, channels,
/// height, width)`, batch 32.
type ConvLayer = (&'static str, Conv2dGeometry, usize, usize, usize);

/// ResNet-50's layer kinds (issue #13): conv1, a 1x1 convolution and the
/// 3x3 convolutions of the four stages.
fn resnet50_layers() -> Vec<ConvLayer> {
    let g3 = |c: usize, hw: usize| Conv2dGeometry::new(32, c, hw, hw, 3, 3).padding(1, 1);
    vec![
        (
            "resnet50_conv1_c3_224_k7s2",
            Conv2dGeometry::new(32, 3, 224, 224, 7, 7)
                .stride(2, 2)
                .padding(3, 3),
            3,
            224,
            224,
        ),
        (
            "resnet50_c256_56x56_n32_k1",
            Conv2dGeometry::new(32, 256, 56, 56, 1, 1),
            256,
            56,
            56,
        ),
        ("resnet50_c64_56x56_n32_k3", g3(64, 56), 64, 56, 56),
        ("resnet50_c128_28x28_n32_k3", g3(128, 28), 128, 28, 28),
        ("resnet50_c256_14x14_n32_k3", g3(256, 14), 256, 14, 14),
        ("resnet50_c512_7x7_n32_k3", g3(512, 7), 512, 7, 7),
    ]
}

fn bench_conv_t<T: Real + lapack::LapackReal>(
    c: &mut Criterion,
    layers: &[ConvLayer],
    lib: Option<&lapack::Lapack>,
) {
    for &(name, geom, ch, h, w) in layers {
        let (oh, ow) = geom.output_size().unwrap();
        let k = geom.patch_len().unwrap();
        let positions = geom.batch * oh * ow;
        let xs = rand_vec::<T>(geom.batch * ch * h * w, 7);
        let flops = (positions * k * (k + 1)) as u64;
        let mut a = Mat::<T>::zeros(k, k);
        let mut a_base = Mat::<T>::zeros(k, k);
        let mut a_blas = vec![T::ZERO; k * k];
        let mut buf = prefaulted(conv2d_a_update_scratch::<T>(&geom, false).unwrap());
        // The baselines' materialized patch matrix (n*S x K, ~231 MB in f32
        // for the 64-channel layer), column-major, and row-major for BLAS.
        let mut big = vec![T::ZERO; positions * k];
        let mut big_rm = vec![T::ZERO; positions * k];
        let scale = T::ONE / T::from_usize(positions);

        let mut g = group(c, format!("conv2d_a/{}/{name}", T::NAME));
        g.throughput(Throughput::Elements(flops));
        for (layout, lname) in [(ImageLayout::Nchw, "nchw"), (ImageLayout::Nhwc, "nhwc")] {
            let img = ImageRef::new(&xs, layout, geom.batch, ch, h, w).unwrap();
            for (label, par) in pars(true) {
                g.bench_function(format!("conv2d_a_update_{lname}/{label}"), |b| {
                    b.iter(|| {
                        conv2d_a_update(
                            a.as_mut(),
                            T::ONE,
                            T::ONE,
                            black_box(img),
                            &geom,
                            false,
                            ConvNormalization::Kfc,
                            par,
                            MemStack::new(&mut buf),
                        )
                        .unwrap()
                    })
                });
                if lname == "nchw" {
                    // The anchor: BLAS ?syrk on the already materialized
                    // im2col (materialization not timed).
                    if let Some(lib) = lib {
                        im2col_plain(&mut big, &xs, layout, &geom);
                        for col in 0..k {
                            for p in 0..positions {
                                big_rm[p * k + col] = big[col * positions + p];
                            }
                        }
                        lib.set_threads(par.degree());
                        if T::syrk(lib, k, positions, scale, &big_rm, &mut a_blas) {
                            g.bench_function(format!("blas_syrk_on_im2col/{label}"), |b| {
                                b.iter(|| {
                                    T::syrk(
                                        lib,
                                        k,
                                        positions,
                                        scale,
                                        black_box(&big_rm),
                                        &mut a_blas,
                                    )
                                })
                            });
                        }
                    }
                }
                if name == "resnet50_c64_56x56_n32_k3" {
                    g.bench_function(format!("im2col_then_syrk_{lname}/{label}"), |b| {
                        b.iter(|| {
                            im2col_plain(&mut big, black_box(&xs), layout, &geom);
                            let m = MatRef::from_column_major_slice(&big, positions, k);
                            triangular::matmul(
                                a_base.as_mut(),
                                BlockStructure::TriangularLower,
                                Accum::Add,
                                m.transpose(),
                                BlockStructure::Rectangular,
                                m,
                                BlockStructure::Rectangular,
                                scale,
                                par,
                            );
                        })
                    });
                }
            }
        }
        g.finish();
    }
}

fn bench_conv(c: &mut Criterion) {
    let lib = lapack::Lapack::load();
    let layers = resnet50_layers();
    bench_conv_t::<f32>(c, &layers, lib.as_ref());
    bench_conv_t::<f64>(c, &layers[2..3], lib.as_ref());
}

criterion_group!(
    benches,
    bench_factor,
    bench_eigen,
    bench_refresh,
    bench_precondition,
    bench_conv
);
criterion_main!(benches);
