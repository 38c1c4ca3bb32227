//! Phase "factors": when a factor update is due, the statistics
//! accumulated since the last step are summed across ranks (one collective
//! for every layer: packed lower triangles in the configured wire
//! precision), then each layer's new factors
//! `F' = xi F + (1 - xi) acc / weight` are computed into new buffers (one
//! rayon task per layer). Nothing is committed here.

use kfac_kernels::factor;
use rayon::prelude::*;

use crate::distributed;
use crate::exchange::{Exchange, Outgoing};
use crate::mem;
use crate::observe::unreachable_diag;
use crate::state::{Factor, LayerState};
use crate::{Error, Result};

use super::plan::Plan;
use super::Ctx;

/// New `(A, G)` per layer (`None`: excluded, or no update due).
pub(crate) type NewFactors = Vec<Option<(Factor, Factor)>>;

/// This rank's statistics packed for the sum across ranks, when a factor
/// update is due in a world of more than one (`None` otherwise). Called
/// before the step's agreement round, so running out of memory here fails
/// the step on every rank.
pub(crate) fn outgoing(ctx: &Ctx<'_>, plan: &Plan, world: usize) -> Result<Option<Outgoing>> {
    if !plan.factor_due || world == 1 {
        return Ok(None);
    }
    let (values, weights) = pack(ctx.layers)?;
    Outgoing::new(values, weights, ctx.cfg.wire, world).map(Some)
}

pub(crate) fn run(
    ctx: &Ctx<'_>,
    plan: &Plan,
    out: Option<Outgoing>,
    ex: &mut Exchange<'_>,
) -> Result<NewFactors> {
    let layers = ctx.layers;
    if !plan.factor_due {
        return Ok(layers.iter().map(|_| None).collect());
    }
    let summed = ex.sum_statistics(out)?;
    // Unpacked before the parallel part; an allocation failure here is
    // settled below like any other.
    let reduced = summed
        .map(|(values, weights)| unpack(layers, &values, &weights))
        .transpose();
    let local: Result<NewFactors> = reduced.and_then(|reduced| {
        ctx.pool.install(|| {
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
        })
    });
    ex.settle(local)
}

/// Every preconditioned layer's accumulators as packed lower triangles (or
/// diagonals), and their weights.
///
/// # Errors
/// [`Error::OutOfMemory`].
fn pack(layers: &[LayerState]) -> Result<(Vec<f32>, Vec<f64>)> {
    let live = || layers.iter().filter(|l| !l.excluded);
    let total = live()
        .map(|l| distributed::packed_len(&l.acc.a) + distributed::packed_len(&l.acc.g))
        .sum();
    let mut values = mem::with_capacity(total, "packed statistics")?;
    let mut weights = mem::with_capacity(live().count(), "statistic weights")?;
    for l in live() {
        // Within the capacity reserved above: no allocation.
        distributed::pack(&l.acc.a, &mut values);
        distributed::pack(&l.acc.g, &mut values);
        weights.push(l.acc.weight);
    }
    Ok((values, weights))
}

/// The inverse of [`pack`] on the summed values.
///
/// # Errors
/// [`Error::OutOfMemory`] naming the layer.
fn unpack(
    layers: &[LayerState],
    values: &[f32],
    weights: &[f64],
) -> Result<Vec<Option<(Factor, Factor, f64)>>> {
    let mut out = mem::with_capacity(layers.len(), "summed statistics")?;
    let (mut off, mut wi) = (0, 0);
    for l in layers {
        if l.excluded {
            out.push(None);
            continue;
        }
        let na = distributed::packed_len(&l.acc.a);
        let ng = distributed::packed_len(&l.acc.g);
        let what = |f: &str| format!("layer '{}': summed statistic {f}", l.name);
        let a = distributed::unpack(&l.acc.a, &values[off..off + na], &what("A"))?;
        let g = distributed::unpack(&l.acc.g, &values[off + na..off + na + ng], &what("G"))?;
        off += na + ng;
        out.push(Some((a, g, weights[wi])));
        wi += 1;
    }
    Ok(out)
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
