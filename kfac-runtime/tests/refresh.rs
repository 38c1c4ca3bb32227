//! Refresh only what drifted (`Config::refresh_tolerance`): runs against a
//! twin that decomposes every factor at every inversion, on the same data.
//! The claim under test: the preconditioned gradient stays within twice
//! the tolerance (relative, plus the f32 rounding floor) of the twin's,
//! whichever of reuse, keep and refine the engine chose.

mod common;

use common::*;
use kfac_runtime::{
    Config, LayerGrad, LayerId, LayerKind, Observation, Precision, Preconditioner, Schedule,
};

/// The f32 rounding floor of the comparison (relative).
const FLOOR: f64 = 1e-4;

/// A full-decomposition twin and a lazy one (tolerance `tol`), one linear
/// layer, inversions every step.
struct Twins {
    full: (Preconditioner, LayerId),
    lazy: (Preconditioner, LayerId),
    d_in: usize,
    d_out: usize,
    tol: f64,
}

/// What a step of the lazy twin did, and how far it was from the full one.
#[derive(Debug)]
struct Outcome {
    kept: usize,
    refined: usize,
    rel_diff: f64,
}

impl Twins {
    fn new(d_in: usize, d_out: usize, tol: f64, damping: f64) -> Twins {
        let make = |tol: f64| {
            let mut p = Preconditioner::new(Config {
                eigen_precision: Precision::F32,
                damping: Schedule::Constant(damping),
                kl_clip: None,
                threads: 1,
                inv_update_steps: 1,
                refresh_tolerance: tol,
                ..Config::default()
            })
            .unwrap();
            let id = p
                .register(
                    "fc",
                    LayerKind::Linear {
                        in_features: d_in,
                        out_features: d_out,
                        bias: true,
                    },
                )
                .unwrap();
            (p, id)
        };
        Twins {
            full: make(0.0),
            lazy: make(tol),
            d_in,
            d_out,
            tol,
        }
    }

    /// One step of both on the rows `x` (`n x d_in`) and `g` (`n x d_out`).
    fn step(&mut self, x: &[f32], g: &[f32], n: usize) -> Outcome {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let mut out = Vec::new();
        for (p, id) in [&mut self.full, &mut self.lazy] {
            p.observe(
                *id,
                Observation::Linear {
                    activations: faer::MatRef::from_row_major_slice(x, n, d_in),
                    output_grads: faer::MatRef::from_row_major_slice(g, n, d_out),
                },
            )
            .unwrap();
            let mut w: Vec<f32> = (0..d_out * d_in)
                .map(|k| ((k * 7) % 13) as f32 - 6.0)
                .collect();
            let mut b: Vec<f32> = (0..d_out).map(|k| k as f32 * 0.1).collect();
            let st = p
                .step(&mut [
                    LayerGrad::from_row_major(*id, &mut w, d_out, d_in, Some(&mut b)).unwrap(),
                ])
                .unwrap();
            w.extend_from_slice(&b);
            out.push((w, st.decompositions_kept, st.decompositions_refined));
        }
        let (wf, kept_full, refined_full) = &out[0];
        assert_eq!(
            (*kept_full, *refined_full),
            (0, 0),
            "tolerance 0 refreshes nothing"
        );
        let (wl, kept, refined) = &out[1];
        let diff = wf
            .iter()
            .zip(wl)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = wf.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let o = Outcome {
            kept: *kept,
            refined: *refined,
            rel_diff: diff / norm,
        };
        assert!(
            o.rel_diff <= 2.0 * self.tol + FLOOR,
            "beyond twice the tolerance {}: {o:?}",
            self.tol
        );
        o
    }
}

/// Over a run whose statistics change slowly, factors keep their
/// eigenbasis at most inversions; when the data changes abruptly every
/// factor is decomposed again.
#[test]
fn refresh_keeps_bases_that_did_not_drift_within_the_tolerance() {
    let (d_in, d_out, n) = (24usize, 10usize, 64usize);
    let mut tw = Twins::new(d_in, d_out, 1e-2, 0.05);
    let mut rng = Rng(77);
    let base_x: Vec<f32> = (0..n * d_in).map(|_| rng.next() as f32).collect();
    let base_g: Vec<f32> = (0..n * d_out).map(|_| rng.next() as f32 * 0.5).collect();
    let mut kept_total = 0;
    for step in 0..12 {
        // Small changes, then (step 8) data of another scale and shape.
        let jump = step >= 8;
        let x: Vec<f32> = base_x
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                if jump {
                    3.0 * v * ((k % 5) as f32 - 2.0)
                } else {
                    v + 0.002 * rng.next() as f32
                }
            })
            .collect();
        let g: Vec<f32> = base_g
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                if jump {
                    2.0 * v * ((k % 3) as f32 - 1.0)
                } else {
                    v + 0.002 * rng.next() as f32
                }
            })
            .collect();
        let o = tw.step(&x, &g, n);
        kept_total += o.kept + o.refined;
        if step == 8 {
            assert_eq!(
                (o.kept, o.refined),
                (0, 0),
                "a factor kept its basis after the jump"
            );
        }
    }
    assert!(
        kept_total >= 8,
        "only {kept_total} factors kept their basis"
    );
}

/// Rows of `base` (`n x d`) mixed by the rotation `exp(theta K)` of a
/// fixed antisymmetric `K` (its Cayley form), plus noise of size `noise`:
/// statistics whose eigenbasis turns slowly as `theta` grows.
fn rotated(
    base: &[f32],
    n: usize,
    d: usize,
    k: &M,
    theta: f64,
    noise: f64,
    rng: &mut Rng,
) -> Vec<f32> {
    let half = k.scale(theta / 2.0);
    let eye = M::from_fn(d, d, |i, j| if i == j { 1.0 } else { 0.0 });
    let c = inverse(&eye.add(&half.scale(-1.0))).mul(&eye.add(&half));
    let mut out = vec![0.0f32; n * d];
    for r in 0..n {
        for j in 0..d {
            let s: f64 = (0..d).map(|i| base[r * d + i] as f64 * c.at(i, j)).sum();
            out[r * d + j] = (s + noise * rng.next()) as f32;
        }
    }
    out
}

/// A run whose statistics turn slowly, then faster, then jump: every path
/// is taken (reuse or keep while nothing moves, refinement while the
/// basis turns a little, full decompositions when it turns a lot), and
/// the preconditioned gradient stays within twice the tolerance of the
/// twin's at every step.
#[test]
fn refresh_over_a_turning_run_refines_and_stays_within_the_tolerance() {
    let (d_in, d_out, n) = (16usize, 8usize, 96usize);
    let mut tw = Twins::new(d_in, d_out, 5e-2, 1e-2);
    let mut rng = Rng(5);
    // Columns of distinct scales: well separated eigenvalues.
    let base_x: Vec<f32> = (0..n * d_in)
        .map(|k| (rng.next() * (1.0 + (k % d_in) as f64)) as f32)
        .collect();
    let base_g: Vec<f32> = (0..n * d_out)
        .map(|k| (rng.next() * 0.2 * (1.0 + (k % d_out) as f64)) as f32)
        .collect();
    let antisym = |d: usize, rng: &mut Rng| {
        let a = rng.mat(d, d, 1.0);
        a.add(&a.t().scale(-1.0)).scale(0.5)
    };
    let (kx, kg) = (antisym(d_in, &mut rng), antisym(d_out, &mut rng));
    let (mut kept, mut refined, mut full) = (0, 0, 0);
    let mut theta = 0.0;
    for step in 0..40 {
        // Still, then turning by 1e-4 .. 3e-2 per step.
        let rate = if step < 5 {
            0.0
        } else {
            1e-4 * 1.2f64.powi(step - 5)
        };
        theta += rate;
        let x = rotated(&base_x, n, d_in, &kx, theta, 0.0, &mut rng);
        let g = rotated(&base_g, n, d_out, &kg, theta, 0.0, &mut rng);
        let o = tw.step(&x, &g, n);
        if step > 0 {
            kept += o.kept;
            refined += o.refined;
            full += 2 - o.kept - o.refined;
        }
    }
    eprintln!("kept {kept} refined {refined} full {full}");
    assert!(kept >= 4, "kept {kept}");
    assert!(refined >= 4, "refined {refined}");
    assert!(full >= 4, "full {full}");
}

/// A factor whose partner was zero at the last inversion (no gradient yet)
/// is decomposed again, not refreshed: the tolerance's scale (the partner's
/// largest eigenvalue) said nothing about how much its error will matter.
#[test]
fn a_factor_whose_partner_was_zero_is_decomposed_again() {
    let (d_in, d_out, n) = (12usize, 6usize, 32usize);
    let mut tw = Twins::new(d_in, d_out, 1e-2, 1e-3);
    let mut rng = Rng(9);
    let x0: Vec<f32> = (0..n * d_in).map(|_| rng.next() as f32).collect();
    let zeros = vec![0.0f32; n * d_out];
    tw.step(&x0, &zeros, n);
    // Other activations, and gradients at last.
    let x1: Vec<f32> = x0
        .iter()
        .enumerate()
        .map(|(k, &v)| v * (k % 3) as f32)
        .collect();
    let g1: Vec<f32> = (0..n * d_out).map(|_| rng.next() as f32).collect();
    let o = tw.step(&x1, &g1, n);
    assert_eq!((o.kept, o.refined), (0, 0), "{o:?}");
}
