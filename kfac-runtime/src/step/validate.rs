//! Phase "validate": the gradients passed to `step` (every preconditioned
//! layer exactly once, right shapes, finite) and, when a factor update is
//! due, that every preconditioned layer was observed. Runs before anything
//! is computed or exchanged; its verdict is the first exchange.

use faer::prelude::Reborrow;

use crate::layer::LayerGrad;
use crate::state::LayerState;
use crate::{Error, Result};
use kfac_kernels::check;

/// Checks the gradients; returns, per layer, the index of its gradient.
pub(crate) fn gradients(
    layers: &[LayerState],
    grads: &[LayerGrad<'_>],
    factor_due: bool,
) -> Result<Vec<Option<usize>>> {
    let nl = layers.len();
    let mut index: Vec<Option<usize>> = vec![None; nl];
    for (gi, g) in grads.iter().enumerate() {
        let l = layers.get(g.layer.0).ok_or(Error::UnknownLayer {
            id: g.layer.0,
            registered: nl,
        })?;
        if index[g.layer.0].is_some() {
            return Err(Error::mismatch(&l.name, "gradient passed twice".into()));
        }
        index[g.layer.0] = Some(gi);
        if l.excluded {
            continue;
        }
        validate_grad(l, g)?;
    }
    for (l, ix) in layers.iter().zip(&index) {
        if !l.excluded && ix.is_none() {
            return Err(Error::MissingGradient {
                layer: l.name.clone(),
            });
        }
    }
    if factor_due {
        if let Some(l) = layers.iter().find(|l| !l.excluded && l.acc.count == 0) {
            return Err(Error::MissingObservation {
                layer: l.name.clone(),
            });
        }
    }
    Ok(index)
}

fn validate_grad(l: &LayerState, g: &LayerGrad<'_>) -> Result<()> {
    let (r, c) = l.kind.weight_shape();
    if g.weight.nrows() != r || g.weight.ncols() != c {
        return Err(Error::mismatch(
            &l.name,
            format!(
                "weight gradient is {}x{}, expected {r}x{c}",
                g.weight.nrows(),
                g.weight.ncols()
            ),
        ));
    }
    check::finite_matrix("weight gradient", g.weight.rb()).map_err(Error::kernel(&l.name))?;
    match (&g.bias, l.kind.has_bias()) {
        (Some(b), true) => {
            if b.len() != r {
                return Err(Error::mismatch(
                    &l.name,
                    format!("bias gradient has {} values, expected {r}", b.len()),
                ));
            }
            check::finite_slice("bias gradient", b).map_err(Error::kernel(&l.name))?;
        }
        (None, true) => {
            return Err(Error::mismatch(
                &l.name,
                "the layer has a bias but no bias gradient was passed".into(),
            ))
        }
        (Some(_), false) => {
            return Err(Error::mismatch(
                &l.name,
                "a bias gradient was passed for a layer without bias".into(),
            ))
        }
        (None, false) => {}
    }
    Ok(())
}
