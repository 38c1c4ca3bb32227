//! Phase "factors": when a factor update is due, the statistics
//! accumulated since the last step are summed across ranks (one collective
//! for every layer: packed lower triangles in the configured wire
//! precision), then each layer's new factors
//! `F' = xi F + (1 - xi) acc / weight` are computed into new buffers (one
//! rayon task per layer). Nothing is committed here.

use kfac_kernels::factor;
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
                let a = combine(&l.name, "factor A", &l.a, aa, w, plan.xi)?;
                let g = combine(&l.name, "factor G", &l.g, ag, w, plan.xi)?;
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

/// `xi F + (1 - xi) acc / weight` as a new full symmetric factor (`acc`
/// holds a lower triangle; `F` is full), refused if any entry is not
/// finite.
fn combine(
    name: &str,
    which: &str,
    f: &Factor,
    acc: &Factor,
    weight: f64,
    xi: f64,
) -> Result<Factor> {
    let (xi, c) =
        factor::running_average_coefficients::<f32>(xi, weight).map_err(Error::kernel(name))?;
    let out = match (f, acc) {
        (Factor::Dense(f), Factor::Dense(acc)) => {
            let n = f.nrows();
            let mut out = crate::mem::zeros::<f32>(n, n, &format!("layer '{name}': new {which}"))?;
            factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), xi, c)
                .map(|()| Factor::Dense(out))
        }
        (Factor::Diag(f), Factor::Diag(acc)) => {
            let mut out =
                crate::mem::filled(f.len(), 0.0f32, &format!("layer '{name}': new {which}"))?;
            factor::blend_diag(&mut out, f, acc, xi, c).map(|()| Factor::Diag(out))
        }
        _ => unreachable_diag(),
    };
    out.map_err(|e| match e {
        kfac_kernels::Error::NonFinite { .. } => Error::non_finite(
            name,
            format!("the updated {which} (an observation overflowed f32?)"),
        ),
        e => Error::kernel(name)(e),
    })
}
