//! Observations: validation (once, before anything is written: shapes,
//! token ids, and finiteness through the kernels' `check`, which yields
//! the proofs the `*_prechecked` kernels take, so no input is scanned
//! twice) and the accumulation of one micro-batch's factor statistics into
//! a layer's accumulator. No communication here: statistics are summed
//! across ranks by the step's factor phase.

use faer::dyn_stack::StackReq;
use faer::{MatMut, Par};
use kfac_kernels::check::{self, FiniteImage, FiniteMat};
use kfac_kernels::conv::{self, Conv2dGeometry, ConvNormalization, ImageRef};
use kfac_kernels::factor;

use crate::config::Compat;
use crate::layer::{LayerKind, Observation};
use crate::state::{Factor, LayerState};
use crate::{Error, Result};

fn kerr(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
    Error::kernel(layer)
}

/// The settings that change how an observation is accumulated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ObserveMode {
    pub(crate) compat: Compat,
    /// A statistics of dilated convs as if undilated (kfac-pytorch).
    pub(crate) ignore_conv_dilation: bool,
    /// Output gradients are divided by this (AMP loss scale): G statistics
    /// are multiplied by `1 / s^2`.
    pub(crate) grad_scale: f64,
}

/// A validated observation: shapes fit the layer, token ids are in range,
/// every value is finite (the kernels' proofs).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Checked<'a> {
    Linear {
        x: FiniteMat<'a, f32>,
        g: FiniteMat<'a, f32>,
    },
    Conv2d {
        input: FiniteImage<'a, f32>,
        grads: FiniteImage<'a, f32>,
        geom: Conv2dGeometry,
        batch: usize,
    },
    Embedding {
        tokens: &'a [usize],
        g: FiniteMat<'a, f32>,
    },
    Kronecker {
        a: FiniteMat<'a, f32>,
        g: FiniteMat<'a, f32>,
        samples: usize,
    },
}

/// Validates `obs` for layer `l`: shapes, token ids, finiteness, and that
/// accumulating it cannot overflow the layer's f32 accumulators (see
/// [`guard_overflow`]).
pub(crate) fn validate_observation<'a>(
    l: &LayerState,
    obs: &Observation<'a>,
    mode: ObserveMode,
) -> Result<Checked<'a>> {
    let checked = validate_values(l, obs, mode)?;
    guard_overflow(l, &checked, mode)?;
    Ok(checked)
}

/// The largest magnitude an accumulator entry may reach: a quarter of
/// `f32::MAX`, so the rounding of the sums, the running-average blend and
/// a few ranks' sums stay finite.
pub(crate) const ACC_LIMIT: f64 = f32::MAX as f64 / 4.0;

/// Refuses an observation whose statistics could overflow the layer's f32
/// accumulators, before anything is written.
///
/// The bounds are computed in f64 from the sums of squares the finiteness
/// check accumulated (no extra pass): by Cauchy-Schwarz every entry of
/// `X^T X` is at most `sum X^2`; for a convolution every entry of the
/// unnormalized patch statistic is at most the input's sum of squares (a
/// kernel tap reads each pixel at most once), and the normalization
/// divides by at least the batch; a bias column of ones adds at most the
/// row count; an accumulated PSD factor has no entry larger than its
/// largest diagonal entry. Both the raw product (which the SYRK forms
/// before scaling) and the accumulated result must stay below
/// [`ACC_LIMIT`].
fn guard_overflow(l: &LayerState, obs: &Checked<'_>, mode: ObserveMode) -> Result<()> {
    let native = matches!(mode.compat, Compat::Native);
    let g_scale = 1.0 / (mode.grad_scale * mode.grad_scale);
    // (raw bound, scaled contribution bound) of A's and G's statistics.
    let ((a_raw, a_add), (g_raw, g_add)) = match *obs {
        Checked::Linear { x, g } => {
            let n = x.get().nrows() as f64;
            let beta = if native { 1.0 } else { 1.0 / n };
            let bias = if l.kind.has_bias() { n } else { 0.0 };
            let a = x.sum_of_squares().max(bias);
            let gs = g.sum_of_squares();
            ((a, beta * a), (gs, beta * g_scale * gs))
        }
        Checked::Conv2d {
            input,
            grads,
            batch,
            ..
        } => {
            let n = batch as f64;
            let [_, _, oh, ow] = grads.get().dims();
            let positions = n * (oh * ow) as f64;
            // Native: beta = n, then averaged over >= n patches (A) or the
            // n samples (G); kfac-pytorch: beta = 1 over n S^3 >= n.
            let (beta, div) = if native { (n, n) } else { (1.0, n) };
            let bias = if l.kind.has_bias() { positions } else { 0.0 };
            let a = input.sum_of_squares().max(bias);
            let gs = grads.sum_of_squares();
            ((a, beta * a / div), (gs, beta * g_scale * gs / div))
        }
        Checked::Embedding { tokens, g } => {
            let n = tokens.len() as f64;
            let beta = if native { 1.0 } else { 1.0 / n };
            let gs = g.sum_of_squares();
            ((n, beta * n), (gs, beta * g_scale * gs))
        }
        Checked::Kronecker { a, g, samples } => {
            // Caller-made statistics (not necessarily PSD): every entry is
            // at most the Frobenius norm.
            let beta = if native { samples as f64 } else { 1.0 };
            let (na, ng) = (a.sum_of_squares().sqrt(), g.sum_of_squares().sqrt());
            ((na, beta * na), (ng, beta * g_scale * ng))
        }
    };
    let psd = !matches!(l.kind, LayerKind::Kronecker { .. });
    let first = l.acc.count == 0;
    for (which, acc, raw, add) in [("A", &l.acc.a, a_raw, a_add), ("G", &l.acc.g, g_raw, g_add)] {
        let held = if first { 0.0 } else { max_entry(acc, psd) };
        let bound = raw.max(held + add);
        if bound.is_nan() || bound > ACC_LIMIT {
            return Err(Error::Overflow {
                layer: l.name.clone(),
                what: format!(
                    "the {which} statistics of this observation (entries up to {bound:.3e}, \
                     above the accumulator limit {ACC_LIMIT:.3e} = f32::MAX / 4; nothing was accumulated)"
                ),
            });
        }
    }
    Ok(())
}

/// The largest magnitude in an accumulator: the largest diagonal entry of a
/// PSD one (which bounds the rest), else a scan of its lower triangle.
fn max_entry(f: &Factor, psd: bool) -> f64 {
    match f {
        Factor::Diag(d) => d.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)),
        Factor::Dense(m) => {
            let n = m.nrows();
            let mut out = 0.0f64;
            for j in 0..n {
                if psd {
                    out = out.max(m[(j, j)].abs() as f64);
                } else {
                    for i in j..n {
                        out = out.max(m[(i, j)].abs() as f64);
                    }
                }
            }
            out
        }
    }
}

/// Shapes, token ids and finiteness of `obs` for layer `l`.
fn validate_values<'a>(
    l: &LayerState,
    obs: &Observation<'a>,
    mode: ObserveMode,
) -> Result<Checked<'a>> {
    let name = &l.name;
    let (d_out, _) = l.kind.dims();
    match (&l.kind, obs) {
        (
            LayerKind::Linear {
                in_features,
                out_features,
                ..
            },
            Observation::Linear {
                activations,
                output_grads,
            },
        ) => {
            let n = activations.nrows();
            if n == 0 {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            if activations.ncols() != *in_features
                || output_grads.ncols() != *out_features
                || output_grads.nrows() != n
            {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "activations {}x{} / output grads {}x{} do not fit n x {in_features} / n x {out_features}",
                        activations.nrows(),
                        activations.ncols(),
                        output_grads.nrows(),
                        output_grads.ncols()
                    ),
                ));
            }
            Ok(Checked::Linear {
                x: check::finite_matrix("activations", *activations).map_err(kerr(name))?,
                g: check::finite_matrix("output grads", *output_grads).map_err(kerr(name))?,
            })
        }
        (
            LayerKind::Conv2d(spec),
            Observation::Conv2d {
                input,
                output_grads,
                batch,
                height,
                width,
            },
        ) => {
            let geom = spec.geometry(*batch, *height, *width);
            let (oh, ow) = geom.output_size().map_err(kerr(name))?;
            if *batch == 0 {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            let img = ImageRef::new(
                input,
                spec.layout,
                *batch,
                spec.in_channels,
                *height,
                *width,
            )
            .map_err(kerr(name))?;
            let gout = ImageRef::new(output_grads, spec.layout, *batch, spec.out_channels, oh, ow)
                .map_err(kerr(name))?;
            // kfac-pytorch's patches ignore dilation (same kernel, stride
            // and padding, dilation 1); its grid is never smaller.
            let geom = if mode.ignore_conv_dilation {
                geom.dilation(1, 1)
            } else {
                geom
            };
            Ok(Checked::Conv2d {
                input: check::finite_image(img).map_err(kerr(name))?,
                grads: check::finite_image(gout).map_err(kerr(name))?,
                geom,
                batch: *batch,
            })
        }
        (
            LayerKind::Embedding {
                num_embeddings,
                dim,
            },
            Observation::Embedding {
                tokens,
                output_grads,
            },
        ) => {
            if tokens.is_empty() {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            if output_grads.nrows() != tokens.len() || output_grads.ncols() != *dim {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "output grads {}x{} do not fit {} tokens x {dim}",
                        output_grads.nrows(),
                        output_grads.ncols(),
                        tokens.len()
                    ),
                ));
            }
            if let Some(t) = tokens.iter().find(|&&t| t >= *num_embeddings) {
                return Err(Error::mismatch(
                    name,
                    format!("token id {t} >= num_embeddings {num_embeddings}"),
                ));
            }
            Ok(Checked::Embedding {
                tokens,
                g: check::finite_matrix("output grads", *output_grads).map_err(kerr(name))?,
            })
        }
        (LayerKind::Kronecker { a_dim, g_dim }, Observation::Kronecker { a, g, samples }) => {
            if *samples == 0 {
                return Err(Error::mismatch(name, "samples must be >= 1".into()));
            }
            if a.nrows() != *a_dim
                || a.ncols() != *a_dim
                || g.nrows() != *g_dim
                || g.ncols() != *g_dim
            {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "statistics {}x{} / {}x{} do not fit {a_dim}x{a_dim} / {g_dim}x{g_dim}",
                        a.nrows(),
                        a.ncols(),
                        g.nrows(),
                        g.ncols()
                    ),
                ));
            }
            Ok(Checked::Kronecker {
                a: check::finite_matrix("A statistic", *a).map_err(kerr(name))?,
                g: check::finite_matrix("G statistic", *g).map_err(kerr(name))?,
                samples: *samples,
            })
        }
        (kind, _) => Err(Error::mismatch(
            name,
            format!("observation kind does not match the layer ({kind:?}), d_out {d_out}"),
        )),
    }
}

pub(crate) fn dense(f: &mut Factor) -> MatMut<'_, f32> {
    match f {
        Factor::Dense(m) => m.as_mut(),
        Factor::Diag(_) => unreachable_diag(),
    }
}

#[cold]
pub(crate) fn unreachable_diag() -> ! {
    // Layer kinds fix which factors are diagonal at registration.
    panic!("internal error: diagonal factor used as dense")
}

/// `C <- alpha C + beta [X 1]^T [X 1]` (lower triangle) into a dense
/// accumulator factor, with the layer's scratch.
fn syrk(
    scratch: &crate::state::Scratch,
    c: &mut Factor,
    alpha: f32,
    beta: f32,
    x: FiniteMat<'_, f32>,
    bias: bool,
    name: &str,
) -> Result<()> {
    let (n, d) = (x.get().nrows(), x.get().ncols());
    let req = factor::syrk_update_scratch::<f32>(n, d, bias, Par::Seq);
    scratch.with(req, |stack| {
        factor::syrk_update_prechecked(dense(c), alpha, beta, x, bias, Par::Seq, stack)
            .map_err(kerr(name))
    })
}

/// The kernel scratch accumulating `obs` needs (so that
/// [`observe_all`](crate::Preconditioner::observe_all) can grow every
/// layer's scratch before it writes any accumulator).
pub(crate) fn scratch_need(l: &LayerState, obs: &Checked<'_>) -> Result<StackReq> {
    Ok(match obs {
        Checked::Linear { x, g } => {
            let (n, d) = (x.get().nrows(), x.get().ncols());
            StackReq::any_of(&[
                factor::syrk_update_scratch::<f32>(n, d, l.kind.has_bias(), Par::Seq),
                factor::syrk_update_scratch::<f32>(
                    g.get().nrows(),
                    g.get().ncols(),
                    false,
                    Par::Seq,
                ),
            ])
        }
        Checked::Conv2d { geom, .. } => {
            let bias = matches!(l.kind, LayerKind::Conv2d(spec) if spec.bias);
            conv::conv2d_a_update_scratch::<f32>(geom, bias).map_err(kerr(&l.name))?
        }
        Checked::Embedding { g, .. } => {
            factor::syrk_update_scratch::<f32>(g.get().nrows(), g.get().ncols(), false, Par::Seq)
        }
        Checked::Kronecker { .. } => StackReq::EMPTY,
    })
}

/// Validates `obs` and adds it to the layer's accumulator.
pub(crate) fn observe_layer(
    l: &mut LayerState,
    obs: Observation<'_>,
    mode: ObserveMode,
) -> Result<()> {
    let checked = validate_observation(l, &obs, mode)?;
    accumulate(l, checked, mode)
}

/// Adds a validated observation to the layer's accumulator. On error the
/// accumulator is unchanged (the kernels validate before writing).
pub(crate) fn accumulate(l: &mut LayerState, obs: Checked<'_>, mode: ObserveMode) -> Result<()> {
    let compat = mode.compat;
    let name = l.name.as_str();
    let first = l.acc.count == 0;
    let alpha = if first { 0.0 } else { 1.0 };
    let (beta, add_weight): (f32, f64);
    // G statistics of unscaled output gradients: `(g / s)(g / s)^T`. With
    // s = 1 (the default) the factor is exactly 1 and nothing changes.
    let g_scale = (1.0 / (mode.grad_scale * mode.grad_scale)) as f32;
    match obs {
        Checked::Linear { x, g } => {
            let n = x.get().nrows();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            let bias = l.kind.has_bias();
            // A first: its bias scratch is the only one that may need to
            // grow (and fail); G's needs none, so no error can follow a
            // write.
            syrk(&l.scratch, &mut l.acc.a, alpha, beta, x, bias, name)?;
            syrk(
                &l.scratch,
                &mut l.acc.g,
                alpha,
                beta * g_scale,
                g,
                false,
                name,
            )?;
        }
        Checked::Conv2d {
            input,
            grads,
            geom,
            batch,
        } => {
            let LayerKind::Conv2d(spec) = l.kind else {
                return Err(Error::mismatch(name, "not a conv2d layer".into()));
            };
            let (norm, b, w) = match compat {
                Compat::Native => (ConvNormalization::Kfc, batch as f32, batch as f64),
                Compat::KfacPytorch => (ConvNormalization::KfacPytorch, 1.0, 1.0),
            };
            (beta, add_weight) = (b, w);
            let req = conv::conv2d_a_update_scratch::<f32>(&geom, spec.bias).map_err(kerr(name))?;
            let acc = &mut l.acc;
            l.scratch.with(req, |stack| {
                conv::conv2d_a_update_prechecked(
                    dense(&mut acc.a),
                    alpha,
                    beta,
                    input,
                    &geom,
                    spec.bias,
                    norm,
                    Par::Seq,
                    stack,
                )
                .map_err(kerr(name))
            })?;
            conv::conv2d_g_update_prechecked(
                dense(&mut l.acc.g),
                alpha,
                beta * g_scale,
                grads,
                norm,
                Par::Seq,
            )
            .map_err(kerr(name))?;
        }
        Checked::Embedding { tokens, g } => {
            let n = tokens.len();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            // G first (scratch, if any, is allocated before it writes);
            // the token counts cannot fail after validation.
            syrk(
                &l.scratch,
                &mut l.acc.g,
                alpha,
                beta * g_scale,
                g,
                false,
                name,
            )?;
            let Factor::Diag(d) = &mut l.acc.a else {
                unreachable_diag()
            };
            factor::diag_token_counts_update(d, first, beta, tokens).map_err(kerr(name))?;
        }
        Checked::Kronecker { a, g, samples } => {
            (beta, add_weight) = match compat {
                Compat::Native => (samples as f32, samples as f64),
                Compat::KfacPytorch => (1.0, 1.0),
            };
            factor::accumulate_lower(dense(&mut l.acc.a), a.get(), beta, first)
                .map_err(kerr(name))?;
            factor::accumulate_lower(dense(&mut l.acc.g), g.get(), beta * g_scale, first)
                .map_err(kerr(name))?;
        }
    }
    l.acc.weight += add_weight;
    l.acc.count += 1;
    Ok(())
}
