//! The eigensolver benches' LAPACK baseline (`benches/common/lapack.rs`,
//! loaded with `dlopen`) works: on a machine with a system LAPACK,
//! `?syevd` through that loader agrees with `kernels::eigen::sym_eigen` on
//! the same factors (eigenvalues within `64 d eps ||A||`, eigenvectors with
//! residuals in that bound), f32 and f64, so the bench's figures compare
//! like with like. Without a LAPACK the test says so and passes, unless
//! `KFAC_REQUIRE_LAPACK=1` (set by `.ci/run`, which installs OpenBLAS).

#[allow(dead_code)]
#[path = "../benches/common/lapack.rs"]
mod lapack;

use kfac::kernels::eigen;
use kfac::kernels::faer::dyn_stack::{MemBuffer, MemStack};
use kfac::kernels::faer::{Mat, Par};
use kfac::kernels::Real;
use lapack::{Lapack, LapackReal, Syevd};

fn check<T: Real + LapackReal>(lib: &Lapack) {
    for d in [1usize, 7, 64, 130] {
        // A PSD factor X^T X / n with a spread spectrum (n = d + 3 rows).
        let n = d + 3;
        let x: Vec<f64> = (0..n * d)
            .map(|k| ((k * 7919 + 13) % 1009) as f64 / 1009.0 - 0.5)
            .collect();
        let a = Mat::<T>::from_fn(d, d, |i, j| {
            let s: f64 = (0..n).map(|r| x[r * d + i] * x[r * d + j]).sum();
            T::from_f64(s / n as f64 * (1.0 + i.min(j) as f64 / d as f64))
        });
        let a = Mat::<T>::from_fn(d, d, |i, j| a[(i.max(j), i.min(j))]);
        let mut l = vec![T::ZERO; d];
        let mut q = Mat::<T>::zeros(d, d);
        let mut buf = MemBuffer::new(eigen::sym_eigen_scratch::<T>(d, Par::Seq));
        eigen::sym_eigen(
            a.as_ref(),
            &mut l,
            q.as_mut(),
            Par::Seq,
            MemStack::new(&mut buf),
        )
        .unwrap();
        let cols: Vec<T> = (0..d * d).map(|k| a[(k % d, k / d)]).collect();
        let mut w = Syevd::<T>::new(lib, d);
        w.run(lib, &cols);
        let norm = (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| a[(i, j)].to_f64().powi(2))
            .sum::<f64>()
            .sqrt();
        let what = format!("{} d={d}", T::NAME);
        let ours: Vec<f64> = l.iter().map(|x| x.to_f64()).collect();
        w.assert_eigenvalues_match(&ours, norm, &what);
        let tol = 64.0 * d as f64 * T::EPSILON.to_f64() * norm;
        for k in 0..d {
            // LAPACK's eigenvector k: ||A v - l v|| within the bound.
            let r = (0..d)
                .map(|i| {
                    let av: f64 = (0..d)
                        .map(|j| a[(i, j)].to_f64() * w.a[k * d + j].to_f64())
                        .sum();
                    (av - w.w[k].to_f64() * w.a[k * d + i].to_f64()).powi(2)
                })
                .sum::<f64>()
                .sqrt();
            assert!(r <= tol, "{what}: LAPACK residual {k} = {r:e}");
        }
    }
}

#[test]
fn lapack_baseline_agrees_with_sym_eigen() {
    let Some(lib) = Lapack::load() else {
        assert!(
            std::env::var_os("KFAC_REQUIRE_LAPACK").is_none_or(|v| v != "1"),
            "KFAC_REQUIRE_LAPACK=1 but no system LAPACK was found"
        );
        eprintln!("no system LAPACK: the bench baseline is not checked");
        return;
    };
    eprintln!("LAPACK baseline: {}", lib.name);
    check::<f32>(&lib);
    check::<f64>(&lib);
}
