//! Phase "factors": when a factor update is due, the statistics
//! accumulated since the last step are summed across ranks (one collective
//! for every layer: packed lower triangles in the configured wire
//! precision), then each layer's new factors
//! `F' = xi F + (1 - xi) acc / weight` are computed into new buffers (one
//! rayon task per layer). Nothing is committed here.

use faer::Mat;
use rayon::prelude::*;

use crate::distributed;
use crate::exchange::Exchange;
use crate::observe::unreachable_diag;
use crate::state::{Factor, LayerState};
use crate::{Error, Result};

use super::plan::Plan;
use super::Ctx;

/// New `(A, G)` per layer (`None`: excluded, or no update due).
pub(crate) type NewFactors = Vec<Option<(Factor, Factor)>>;

pub(crate) fn run(ctx: &Ctx<'_>, plan: &Plan, ex: &mut Exchange<'_>) -> Result<NewFactors> {
    let layers = ctx.layers;
    if !plan.factor_due {
        return Ok(layers.iter().map(|_| None).collect());
    }
    let summed = ex.sum_statistics(ctx.cfg.wire, || pack(layers))?;
    let reduced = summed.map(|(values, weights)| unpack(layers, &values, &weights));
    let local: Result<NewFactors> = ctx.pool.install(|| {
        layers
            .par_iter()
            .enumerate()
            .map(|(li, l)| {
                if l.excluded {
                    return Ok(None);
                }
                let (aa, ag, w) = match &reduced {
                    Some(r) => match &r[li] {
                        Some((a, g, w)) => (a, g, *w),
                        None => return Ok(None),
                    },
                    None => (&l.acc.a, &l.acc.g, l.acc.weight),
                };
                let a = combine(&l.a, aa, w, plan.xi);
                let g = combine(&l.g, ag, w, plan.xi);
                for (f, which) in [(&a, "factor A"), (&g, "factor G")] {
                    if !finite(f) {
                        return Err(Error::non_finite(
                            &l.name,
                            format!("the updated {which} (an observation overflowed f32?)"),
                        ));
                    }
                }
                Ok(Some((a, g)))
            })
            .collect()
    });
    ex.settle(local)
}

/// Every preconditioned layer's accumulators as packed lower triangles (or
/// diagonals), and their weights.
fn pack(layers: &[LayerState]) -> (Vec<f32>, Vec<f64>) {
    let mut values = Vec::new();
    let mut weights = Vec::new();
    for l in layers.iter().filter(|l| !l.excluded) {
        distributed::pack(&l.acc.a, &mut values);
        distributed::pack(&l.acc.g, &mut values);
        weights.push(l.acc.weight);
    }
    (values, weights)
}

/// The inverse of [`pack`] on the summed values.
fn unpack(
    layers: &[LayerState],
    values: &[f32],
    weights: &[f64],
) -> Vec<Option<(Factor, Factor, f64)>> {
    let mut out = Vec::with_capacity(layers.len());
    let (mut off, mut wi) = (0, 0);
    for l in layers {
        if l.excluded {
            out.push(None);
            continue;
        }
        let na = distributed::packed_len(&l.acc.a);
        let ng = distributed::packed_len(&l.acc.g);
        let a = distributed::unpack(&l.acc.a, &values[off..off + na]);
        let g = distributed::unpack(&l.acc.g, &values[off + na..off + na + ng]);
        off += na + ng;
        out.push(Some((a, g, weights[wi])));
        wi += 1;
    }
    out
}

fn finite(f: &Factor) -> bool {
    match f {
        Factor::Dense(m) => m.col_iter().all(|c| c.iter().all(|v| v.is_finite())),
        Factor::Diag(d) => d.iter().all(|v| v.is_finite()),
    }
}

/// `xi F + (1 - xi) acc / weight` as a new full symmetric factor (`acc`
/// holds a lower triangle; `F` is full).
fn combine(f: &Factor, acc: &Factor, weight: f64, xi: f64) -> Factor {
    let c = ((1.0 - xi) / weight) as f32;
    let xi = xi as f32;
    match (f, acc) {
        (Factor::Dense(f), Factor::Dense(acc)) => {
            let n = f.nrows();
            let mut out = Mat::<f32>::zeros(n, n);
            for j in 0..n {
                for i in j..n {
                    let v = xi * f[(i, j)] + c * acc[(i, j)];
                    out[(i, j)] = v;
                    out[(j, i)] = v;
                }
            }
            Factor::Dense(out)
        }
        (Factor::Diag(f), Factor::Diag(acc)) => {
            Factor::Diag(f.iter().zip(acc).map(|(&f, &a)| xi * f + c * a).collect())
        }
        _ => unreachable_diag(),
    }
}
