//! Phase "precondition": the members of each layer's gradient-worker group
//! compute `V` (the preconditioned gradient, bias folded in as the last
//! column) and `<V, grad>` into per-layer buffers, one rayon task per
//! layer. After a status round, when the gradient-worker fraction is below
//! one, each layer's lead sends `V` to the ranks outside the group (which
//! compute their own `<V, grad>`); group members keep what they computed
//! (the same bits: same inputs, same kernels). Each rank gets every layer's
//! `V` exactly once.

use faer::prelude::Reborrow;
use faer::{Mat, MatRef, Par};
use kfac_kernels::{eigen, inverse, kl};
use rayon::prelude::*;

use crate::exchange::Exchange;
use crate::layer::{LayerGrad, LayerKind};
use crate::state::{Factor, InverseCache, LayerState};
use crate::{Error, Result};

use super::plan::Roles;
use super::Ctx;

fn kerr(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
    Error::kernel(layer)
}

/// A layer's preconditioned gradient `V` (`d_out x d`) and `<V, grad>`.
pub(crate) type Preconditioned = (Mat<f32>, f64);

pub(crate) fn run(
    ctx: &Ctx<'_>,
    roles: &Roles,
    damping: f64,
    new_inv: &[Option<InverseCache>],
    grads: &[LayerGrad<'_>],
    index: &[Option<usize>],
    ex: &mut Exchange<'_>,
) -> Result<Vec<Option<Preconditioned>>> {
    let layers = ctx.layers;
    let view = |li: usize| index[li].map(|gi| (grads[gi].weight.rb(), grads[gi].bias.as_deref()));
    let local: Result<Vec<Option<Preconditioned>>> = ctx.pool.install(|| {
        layers
            .par_iter()
            .enumerate()
            .zip(new_inv.par_iter())
            .map(|((li, l), ni)| {
                if l.excluded || !roles.member(li) {
                    return Ok(None);
                }
                let Some((w, b)) = view(li) else {
                    return Ok(None);
                };
                let cache = match (ni, &l.inv) {
                    (Some(c), _) | (None, Some(c)) => c,
                    (None, None) => {
                        return Err(Error::MissingObservation {
                            layer: l.name.clone(),
                        });
                    }
                };
                precondition(l, cache, w, b, damping).map(Some)
            })
            .collect()
    });
    // One buffer for every share below (the largest V), allocated before
    // the status round so that every rank can take part.
    let sharing = !roles.everyone_preconditions() && ex.world() > 1;
    let local = local.and_then(|r| {
        let len = if sharing {
            layers
                .iter()
                .filter(|l| !l.excluded)
                .map(|l| l.kind.dims().0 * l.kind.dims().1)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        Ok((
            r,
            crate::mem::filled(len, 0.0f32, "gradients shared with other ranks")?,
        ))
    });
    let (mut results, mut buf) = ex.settle(local)?;
    if !sharing {
        return Ok(results);
    }
    // A receiver that cannot use what it received records the error and
    // keeps taking part; the status round below fails the step everywhere.
    let mut received_ok: Result<()> = Ok(());
    for (li, l) in layers.iter().enumerate() {
        if l.excluded {
            continue;
        }
        let (d_out, d) = l.kind.dims();
        let mine = &results[li];
        let mut received = None;
        ex.share(
            &mut buf[..d_out * d],
            roles.lead(li),
            !roles.member(li),
            |out| match mine {
                Some((v, _)) => {
                    for (j, c) in v.col_iter().enumerate() {
                        c.iter()
                            .zip(&mut out[j * d_out..(j + 1) * d_out])
                            .for_each(|(x, o)| *o = *x);
                    }
                }
                // Cannot happen (the lead computed it); NaN is refused by
                // the receivers' finiteness checks.
                None => out.fill(f32::NAN),
            },
            |flat| {
                let r = receive(l, flat, view(li));
                match r {
                    Ok(r) => received = Some(r),
                    Err(e) => {
                        if received_ok.is_ok() {
                            received_ok = Err(e);
                        }
                    }
                }
            },
        )?;
        if received.is_some() {
            results[li] = received;
        }
    }
    drop(buf);
    ex.settle(received_ok.map(|()| results))
}

/// A layer's `V` received from its lead (column-major in `flat`), and
/// `<V, grad>` computed here from this rank's gradient.
fn receive(
    l: &LayerState,
    flat: &[f32],
    grad: Option<(MatRef<'_, f32>, Option<&[f32]>)>,
) -> Result<Preconditioned> {
    let (d_out, d) = l.kind.dims();
    let v = crate::mem::from_fn(d_out, d, "received gradient", |i, j| flat[i + j * d_out])
        .map_err(crate::mem::in_layer(&l.name))?;
    if !v.col_iter().all(|c| c.iter().all(|x| x.is_finite())) {
        return Err(Error::non_finite(
            &l.name,
            "the preconditioned gradient received from its lead".into(),
        ));
    }
    let (w, b) = grad.ok_or_else(|| Error::MissingGradient {
        layer: l.name.clone(),
    })?;
    let raw = gather(&l.kind, w, b).map_err(crate::mem::in_layer(&l.name))?;
    let dot = kl::frobenius_dot(v.as_ref(), raw.as_ref()).map_err(kerr(&l.name))? as f64;
    Ok((v, dot))
}

/// The internal `d_out x d` gradient (bias as the last column) of a layer.
fn gather(kind: &LayerKind, w: MatRef<'_, f32>, b: Option<&[f32]>) -> Result<Mat<f32>> {
    let (d_out, d) = kind.dims();
    Ok(match kind {
        LayerKind::Embedding { .. } => {
            crate::mem::from_fn(d_out, d, "gradient copy", |i, j| w[(j, i)])?
        }
        _ => {
            let (_, wc) = kind.weight_shape();
            let mut m = crate::mem::zeros::<f32>(d_out, d, "gradient copy")?;
            m.as_mut().submatrix_mut(0, 0, d_out, wc).copy_from(w);
            if let Some(b) = b {
                for (i, &v) in b.iter().enumerate() {
                    m[(i, wc)] = v;
                }
            }
            m
        }
    })
}

/// Preconditions one layer's gradient; returns `V` and `<V, grad>`.
fn precondition(
    l: &LayerState,
    cache: &InverseCache,
    w: MatRef<'_, f32>,
    b: Option<&[f32]>,
    damping: f64,
) -> Result<(Mat<f32>, f64)> {
    let name = &l.name;
    let raw = gather(&l.kind, w, b).map_err(crate::mem::in_layer(name))?;
    let (d_out, d) = (raw.nrows(), raw.ncols());
    let mut v = crate::mem::from_fn(d_out, d, "gradient copy", |i, j| raw[(i, j)])
        .map_err(crate::mem::in_layer(name))?;
    let par = Par::Seq;
    l.scratch
        .with(crate::state::precondition_scratch(d_out, d), |stack| {
            match cache {
                InverseCache::Eigen {
                    qa: Some(qa),
                    la,
                    qg,
                    lg,
                    denom: Some(den),
                } => {
                    let _ = (la, lg);
                    eigen::precondition_eigen_precomputed(
                        v.as_mut(),
                        qg.as_ref(),
                        qa.as_ref(),
                        den.as_ref(),
                        par,
                        stack,
                    )
                }
                InverseCache::Eigen {
                    qa: Some(qa),
                    la,
                    qg,
                    lg,
                    denom: None,
                } => eigen::precondition_eigen(
                    v.as_mut(),
                    qg.as_ref(),
                    lg,
                    qa.as_ref(),
                    la,
                    damping as f32,
                    par,
                    stack,
                ),
                // Diagonal A (embeddings): Q_A = I.
                InverseCache::Eigen {
                    qa: None,
                    qg,
                    denom: Some(den),
                    ..
                } => eigen::precondition_eigen_diag_a_precomputed(
                    v.as_mut(),
                    qg.as_ref(),
                    den.as_ref(),
                    par,
                    stack,
                ),
                InverseCache::Eigen {
                    qa: None,
                    la,
                    qg,
                    lg,
                    denom: None,
                } => eigen::precondition_eigen_diag_a(
                    v.as_mut(),
                    qg.as_ref(),
                    lg,
                    la,
                    damping as f32,
                    par,
                    stack,
                ),
                InverseCache::Inverse {
                    a_inv: Factor::Dense(ai),
                    g_inv,
                } => inverse::precondition_inverse(
                    v.as_mut(),
                    g_inv.as_ref(),
                    ai.as_ref(),
                    par,
                    stack,
                ),
                InverseCache::Inverse {
                    a_inv: Factor::Diag(ai),
                    g_inv,
                } => {
                    inverse::precondition_inverse_diag_a(v.as_mut(), g_inv.as_ref(), ai, par, stack)
                }
            }
            .map_err(kerr(name))
        })?;
    let dot = kl::frobenius_dot(v.as_ref(), raw.as_ref()).map_err(kerr(name))? as f64;
    if !dot.is_finite() || !v.col_iter().all(|c| c.iter().all(|x| x.is_finite())) {
        return Err(Error::non_finite(
            name,
            "the preconditioned gradient (damping too small for these factors?)".into(),
        ));
    }
    Ok((v, dot))
}
