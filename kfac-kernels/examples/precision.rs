//! What f32 eigendecompositions lose against f64 in the K-FAC eigenbasis
//! preconditioner, on factor spectra of the kind K-FAC meets.
//!
//! For each case, factors `A` (`d_in`) and `G` (`d_out`) are Wishart
//! matrices `X^T X / m` (f32, as the engine stores them) with the column
//! scales and sample counts below; a gradient is preconditioned with
//! `(A ⊗ G + damping I)^{-1}` three ways:
//!
//! * `f32`: eigendecompositions in f32, preconditioning in f32;
//! * `f64`: eigendecompositions in f64 rounded to f32, preconditioning in
//!   f32 (the engine's `Precision::F64`);
//! * reference: everything in f64 from the same f32 factors.
//!
//! and the relative Frobenius error of each against the reference is
//! printed, per relative damping `damping / (||A|| ||G||)`, with the
//! decomposition times. Run:
//!
//! ```text
//! cargo run --release -p kfac-kernels --example precision
//! ```
//!
//! (BENCHMARKS.md, "Eigendecomposition precision", has a run and the
//! conclusion drawn from it.)

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::{Mat, Par};
use kfac_kernels::eigen::{
    precondition_eigen, precondition_eigen_scratch, sym_eigen, sym_eigen_scratch,
};
use std::time::Instant;

/// A small deterministic generator (splitmix64) and Box-Muller normals.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// `X^T X / m` for `X` `m x n` Gaussian with column `j` scaled by
/// `scale(j)`, rounded to f32.
fn wishart(rng: &mut Rng, n: usize, m: usize, scale: impl Fn(usize) -> f64) -> Mat<f32> {
    let x = Mat::<f64>::from_fn(m, n, |_, j| rng.normal() * scale(j));
    let a = x.transpose() * &x;
    Mat::from_fn(n, n, |i, j| (a[(i, j)] / m as f64) as f32)
}

fn eig<T: kfac_kernels::Real>(a: &Mat<T>) -> (Mat<T>, Vec<T>) {
    let n = a.nrows();
    let mut q = Mat::<T>::zeros(n, n);
    let mut l = vec![T::ZERO; n];
    let mut buf = MemBuffer::new(sym_eigen_scratch::<T>(n, Par::Seq));
    sym_eigen(
        a.as_ref(),
        &mut l,
        q.as_mut(),
        Par::Seq,
        MemStack::new(&mut buf),
    )
    .unwrap();
    (q, l)
}

fn precondition<T: kfac_kernels::Real>(
    grad: &Mat<T>,
    (qg, lg): &(Mat<T>, Vec<T>),
    (qa, la): &(Mat<T>, Vec<T>),
    damping: T,
) -> Mat<T> {
    let mut v = grad.clone();
    let mut buf = MemBuffer::new(precondition_eigen_scratch::<T>(
        v.nrows(),
        v.ncols(),
        Par::Seq,
    ));
    precondition_eigen(
        v.as_mut(),
        qg.as_ref(),
        lg,
        qa.as_ref(),
        la,
        damping,
        Par::Seq,
        MemStack::new(&mut buf),
    )
    .unwrap();
    v
}

/// Eigenvalues recomputed as Rayleigh quotients `q_i^T A q_i` in f64 from
/// the f32 eigenvectors (clamped at zero).
fn rayleigh(a: &Mat<f32>, (q, _): &(Mat<f32>, Vec<f32>)) -> (Mat<f32>, Vec<f32>) {
    let (a64, q64) = (widen(a), widen(q));
    let aq = &a64 * &q64;
    let l = (0..q.ncols())
        .map(|j| {
            let s: f64 = (0..q.nrows()).map(|i| q64[(i, j)] * aq[(i, j)]).sum();
            s.max(0.0) as f32
        })
        .collect();
    (q.clone(), l)
}

fn widen(m: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

fn round(m: &Mat<f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

fn rel_err(v: &Mat<f32>, r: &Mat<f64>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for j in 0..r.ncols() {
        for i in 0..r.nrows() {
            num += (v[(i, j)] as f64 - r[(i, j)]).powi(2);
            den += r[(i, j)].powi(2);
        }
    }
    (num / den).sqrt()
}

fn main() {
    let mut rng = Rng(0x5eed);
    type Scale = fn(usize) -> f64;
    let cases: [(&str, usize, usize, f64, Scale); 4] = [
        ("wishart, 4n samples", 1024, 256, 4.0, |_| 1.0),
        ("rank-deficient, n/4 samples", 1024, 256, 0.25, |_| 1.0),
        ("power-law scales j^-1", 1024, 256, 2.0, |j| {
            1.0 / (j + 1) as f64
        }),
        ("power-law, large", 2304, 512, 2.0, |j| {
            1.0 / ((j + 1) as f64).sqrt()
        }),
    ];
    println!(
        "| factors (d_in, d_out) | spectrum | rel. damping | f32 | f32 + f64 Rayleigh | f64 |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, d_in, d_out, samples, scale) in cases {
        let a = wishart(&mut rng, d_in, (samples * d_in as f64) as usize, scale);
        let g = wishart(&mut rng, d_out, (samples * d_out as f64) as usize, scale);
        let grad = Mat::<f32>::from_fn(d_out, d_in, |_, _| rng.normal() as f32);
        let t = Instant::now();
        let (ea32, eg32) = (eig(&a), eig(&g));
        let t32 = t.elapsed();
        let t = Instant::now();
        let (ea64, eg64) = (eig(&widen(&a)), eig(&widen(&g)));
        let t64 = t.elapsed();
        let t = Instant::now();
        let (ea32r, eg32r) = (rayleigh(&a, &ea32), rayleigh(&g, &eg32));
        let trq = t.elapsed();
        let r32 = |(q, l): &(Mat<f64>, Vec<f64>)| {
            (round(q), l.iter().map(|&v| v as f32).collect::<Vec<_>>())
        };
        let (ea64r, eg64r) = (r32(&ea64), r32(&eg64));
        let norm = ea64.1.last().unwrap() * eg64.1.last().unwrap();
        for rel in [1e-1, 1e-2, 1e-3, 1e-4, 1e-5] {
            let damping = rel * norm;
            let reference = precondition(&widen(&grad), &eg64, &ea64, damping);
            let v32 = precondition(&grad, &eg32, &ea32, damping as f32);
            let v64 = precondition(&grad, &eg64r, &ea64r, damping as f32);
            let v32r = precondition(&grad, &eg32r, &ea32r, damping as f32);
            let (e32, e64) = (rel_err(&v32, &reference), rel_err(&v64, &reference));
            let e32r = rel_err(&v32r, &reference);
            println!(
                "| {d_in}, {d_out} | {name} | {rel:.0e} | {e32:.2e} | {e32r:.2e} | {e64:.2e} |",
            );
        }
        println!(
            "|  | seconds: f32 {:.3}, Rayleigh {:.3}, f64 {:.3} |  |  |  |  |",
            t32.as_secs_f64(),
            trq.as_secs_f64(),
            t64.as_secs_f64()
        );
    }
}
