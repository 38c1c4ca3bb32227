//! Phase "clip": KL clipping (see the kernels' crate docs):
//! `vg = Σ_l <V_l, grad_l>`, `nu = min(1, sqrt(kl_clip / (lr^2 |vg|)))`
//! (`1` when `vg == 0` or clipping is off). Every rank holds every layer's
//! `V` after the precondition phase, so every rank computes the same `nu`
//! without communication.

use kfac_kernels::kl;

use crate::{Error, Result};

use super::precondition::Preconditioned;

/// `(vg, nu)`.
pub(crate) fn run(
    results: &[Option<Preconditioned>],
    kl_clip: Option<f64>,
    lr: f64,
) -> Result<(f64, f64)> {
    let vg: f64 = results.iter().flatten().map(|(_, d)| *d).sum();
    let nu = match kl_clip {
        Some(clip) => kl::kl_clip_scale(vg, lr, clip).map_err(Error::from)?,
        None => 1.0,
    };
    Ok((vg, nu))
}
