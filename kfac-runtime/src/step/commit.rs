//! Phase "commit": the only phase that writes. Swaps in the new factors
//! and inverse caches, clears the accumulators, and writes `nu V` over the
//! caller's gradients. Reached only when every phase succeeded on every
//! rank, so an error anywhere leaves the state and the gradients as they
//! were.

use faer::prelude::ReborrowMut;
use faer::MatRef;

use crate::layer::{LayerGrad, LayerKind};
use crate::state::{InverseCache, LayerState};

use super::factors::NewFactors;
use super::precondition::Preconditioned;

/// Everything the phases computed, for `commit`.
pub(crate) struct Outcome {
    /// Per layer, the index of its gradient in the caller's slice.
    pub(crate) index: Vec<Option<usize>>,
    pub(crate) new_factors: NewFactors,
    pub(crate) new_inv: Vec<Option<InverseCache>>,
    pub(crate) results: Vec<Option<Preconditioned>>,
    /// `Σ <V, grad>` and the KL-clipping factor.
    pub(crate) vg: f64,
    pub(crate) nu: f64,
}

pub(crate) fn run(
    layers: &mut [LayerState],
    outcome: Outcome,
    inv_due: bool,
    grads: &mut [LayerGrad<'_>],
) {
    let Outcome {
        index,
        new_factors,
        new_inv,
        results,
        nu,
        ..
    } = outcome;
    for ((l, nf), ni) in layers.iter_mut().zip(new_factors).zip(new_inv) {
        if let Some((a, g)) = nf {
            l.a = a;
            l.g = g;
        }
        if inv_due && !l.excluded {
            // Non-members drop stale caches (f < 1 saves their memory).
            l.inv = ni;
        }
        l.acc.clear();
    }
    let nuf = nu as f32;
    for (l, (ix, r)) in layers.iter().zip(index.iter().zip(results)) {
        let (Some(gi), Some((v, _))) = (ix, r) else {
            continue;
        };
        write_back(&l.kind, &mut grads[*gi], v.as_ref(), nuf);
    }
}

fn write_back(kind: &LayerKind, g: &mut LayerGrad<'_>, v: MatRef<'_, f32>, nu: f32) {
    match kind {
        LayerKind::Embedding { .. } => {
            let mut w = g.weight.rb_mut();
            for i in 0..w.nrows() {
                for j in 0..w.ncols() {
                    w[(i, j)] = nu * v[(j, i)];
                }
            }
        }
        _ => {
            let (_, wc) = kind.weight_shape();
            let mut w = g.weight.rb_mut();
            for j in 0..wc {
                for i in 0..w.nrows() {
                    w[(i, j)] = nu * v[(i, j)];
                }
            }
            if let Some(b) = g.bias.as_deref_mut() {
                for (i, x) in b.iter_mut().enumerate() {
                    *x = nu * v[(i, wc)];
                }
            }
        }
    }
}
