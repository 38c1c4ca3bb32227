//! The amortized cost of refreshing decompositions
//! (`Config::refresh_tolerance`) against decomposing every factor at every
//! inversion, on ResNet-50's 3x3-convolution factor sizes (A: 576, 1152,
//! 2304, 4608; G: 64 .. 512) fed a stream of fresh random
//! samples, at kfac-pytorch's cadence ratio: ten factor updates per
//! inversion (decay 0.95). Two preconditioners run on the same data: one
//! decomposes everything, one refreshes with the tolerance given; the
//! program prints each inversion's time for both, what the refreshing one
//! did, and how far its preconditioned gradients are from the other's
//! (relative; the documented bound is twice the tolerance).
//!
//! ```text
//! cargo run --release -p kfac-runtime --example refresh_amortized [tolerance] [threads] [inversions] [drift]
//! ```
//!
//! Defaults: tolerance 0.1, 1 thread, 6 inversions, drift 0 (a stationary
//! distribution; with `drift` its scales and mixing move by that fraction
//! per factor update). The first inversion
//! decomposes everything in both (no old basis yet) and is not counted.
//! A layer here is a linear layer of the convolution's factor shapes
//! (`9 C_in -> C_out`) fed `min(32 side^2, 2048)` rows per update: the
//! factor sizes and cadence of the real network, not its statistics.

use std::time::Duration;

use kfac_runtime::{Config, LayerGrad, LayerId, LayerKind, Observation, Preconditioner, Result};

/// `(A dim, G dim, rows per update)`.
const LAYERS: [(usize, usize, usize); 4] = [
    (576, 64, 2048),
    (1152, 128, 2048),
    (2304, 256, 2048),
    (4608, 512, 1568),
];

/// Inversions every this many steps, factors every step: kfac-pytorch's
/// ratio (inverses every 100 steps, factors every 10).
const CADENCE: u64 = 10;

/// splitmix64 in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `rows x d` samples of the distribution at time `t` (in factor
/// updates): independent entries of power-law scales `(1 + j)^-0.75` (a
/// spectrum spread over decades, like real factors) mixed by a Householder
/// reflection (so the eigenbasis is not the standard one); with `drift`,
/// each scale and the reflection's vector move by about `drift t`
/// (relative), so the factors' eigenbasis turns as training goes on.
fn samples(rng: &mut Rng, rows: usize, d: usize, scale: f32, drift: f32, t: f32) -> Vec<f32> {
    let v: Vec<f32> = (0..d)
        .map(|j| {
            let (a, b) = ((j * 7919 % 101) as f32, (j * 104_729 % 97) as f32);
            a / 101.0 - 0.5 + drift * t * (b / 97.0 - 0.5)
        })
        .collect();
    let vv: f32 = v.iter().map(|x| x * x).sum();
    let scales: Vec<f32> = (0..d)
        .map(|j| scale * (1.0 + j as f32).powf(-0.75) * (1.0 + drift * t * (j as f32).sin()))
        .collect();
    let mut out = vec![0.0f32; rows * d];
    for r in 0..rows {
        let row = &mut out[r * d..(r + 1) * d];
        for (x, s) in row.iter_mut().zip(&scales) {
            *x = s * rng.next();
        }
        let dot: f32 = row.iter().zip(&v).map(|(a, b)| a * b).sum();
        for (x, vj) in row.iter_mut().zip(&v) {
            *x -= 2.0 * dot / vv * vj;
        }
    }
    out
}

fn make(tol: f64, threads: usize) -> Result<(Preconditioner, Vec<LayerId>)> {
    let mut p = Preconditioner::new(Config {
        threads,
        factor_update_steps: 1,
        inv_update_steps: CADENCE,
        refresh_tolerance: tol,
        kl_clip: None,
        ..Config::default()
    })?;
    let ids = LAYERS
        .iter()
        .enumerate()
        .map(|(k, &(a, g, _))| {
            p.register(
                &format!("conv3x3_{k}"),
                LayerKind::Linear {
                    in_features: a,
                    out_features: g,
                    bias: false,
                },
            )
        })
        .collect::<Result<_>>()?;
    Ok((p, ids))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |k: usize, d: f64| args.get(k).and_then(|s| s.parse().ok()).unwrap_or(d);
    let tol = arg(0, 0.1);
    let threads = arg(1, 1.0) as usize;
    let inversions = arg(2, 6.0) as u64;
    let drift = arg(3, 0.0) as f32;
    println!(
        "refresh_tolerance {tol}, {threads} thread(s), {inversions} inversions, \
         {CADENCE} factor updates per inversion, drift {drift} per update"
    );
    let (mut full, ids) = make(0.0, threads)?;
    let (mut lazy, _) = make(tol, threads)?;
    let mut rng = Rng(1);
    let grads: Vec<Vec<f32>> = LAYERS
        .iter()
        .map(|&(a, g, _)| (0..a * g).map(|_| rng.next()).collect())
        .collect();
    let (mut t_full, mut t_lazy) = (Duration::ZERO, Duration::ZERO);
    let (mut kept, mut refined, mut factors) = (0, 0, 0);
    let mut worst = 0.0f64;
    println!(
        "inversion | full s | refresh s | ratio | kept | refined | decomposed | max rel. diff"
    );
    for step in 0..inversions * CADENCE {
        let data: Vec<(Vec<f32>, Vec<f32>)> = LAYERS
            .iter()
            .map(|&(a, g, rows)| {
                let t = step as f32;
                (
                    samples(&mut rng, rows, a, 1.0, drift, t),
                    samples(&mut rng, rows, g, 0.01, drift, t),
                )
            })
            .collect();
        let mut out = Vec::new();
        for p in [&mut full, &mut lazy] {
            for (k, &(a, g, rows)) in LAYERS.iter().enumerate() {
                p.observe(
                    ids[k],
                    Observation::Linear {
                        activations: faer::MatRef::from_row_major_slice(&data[k].0, rows, a),
                        output_grads: faer::MatRef::from_row_major_slice(&data[k].1, rows, g),
                    },
                )?;
            }
            let mut w = grads.clone();
            let mut lg: Vec<LayerGrad<'_>> = w
                .iter_mut()
                .zip(LAYERS.iter().zip(&ids))
                .map(|(w, (&(a, g, _), &id))| LayerGrad::from_row_major(id, w, g, a, None))
                .collect::<Result<_>>()?;
            let st = p.step(&mut lg)?;
            drop(lg);
            out.push((st, w));
        }
        let (sf, wf) = &out[0];
        let (sl, wl) = &out[1];
        if !sf.inverses_updated {
            continue;
        }
        let rel = wf
            .iter()
            .zip(wl)
            .map(|(x, y)| {
                let d: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum();
                let n: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
                (d / n).sqrt()
            })
            .fold(0.0f64, f64::max);
        let n = step / CADENCE;
        let (tf, tl) = (sf.times.inversion, sl.times.inversion);
        let decomposed = 2 * LAYERS.len() - sl.decompositions_kept - sl.decompositions_refined;
        println!(
            "{n:9} | {:6.3} | {:9.3} | {:5.2} | {:4} | {:7} | {decomposed:10} | {rel:.2e}",
            tf.as_secs_f64(),
            tl.as_secs_f64(),
            tl.as_secs_f64() / tf.as_secs_f64(),
            sl.decompositions_kept,
            sl.decompositions_refined,
        );
        if n > 0 {
            t_full += tf;
            t_lazy += tl;
            kept += sl.decompositions_kept;
            refined += sl.decompositions_refined;
            factors += 2 * LAYERS.len();
            worst = worst.max(rel);
        }
    }
    println!(
        "amortized (inversions 1..): refresh / full = {:.3} ({:.3} s / {:.3} s); \
         {kept} of {factors} factors kept, {refined} refined; \
         largest relative difference {worst:.2e} (bound {:.2e})",
        t_lazy.as_secs_f64() / t_full.as_secs_f64(),
        t_lazy.as_secs_f64(),
        t_full.as_secs_f64(),
        2.0 * tol,
    );
    Ok(())
}
