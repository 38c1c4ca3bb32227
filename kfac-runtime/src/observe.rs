//! Observations: validation (once, before anything is written) and the
//! accumulation of one micro-batch's factor statistics into a layer's
//! accumulator. No communication here: statistics are summed across ranks
//! by the step's factor phase.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::{MatMut, MatRef, Par};
use kfac_kernels::conv::{self, ConvNormalization, ImageRef};
use kfac_kernels::factor;

use crate::config::Compat;
use crate::layer::{LayerKind, Observation};
use crate::state::{Factor, LayerState};
use crate::{Error, Result};

fn kerr(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
    Error::kernel(layer)
}

pub(crate) fn finite_mat(layer: &str, what: &str, m: MatRef<'_, f32>) -> Result<()> {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            if !m[(i, j)].is_finite() {
                return Err(Error::non_finite(layer, format!("{what} at ({i}, {j})")));
            }
        }
    }
    Ok(())
}

pub(crate) fn validate_observation(l: &LayerState, obs: &Observation<'_>) -> Result<()> {
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
            finite_mat(name, "activations", *activations)?;
            finite_mat(name, "output grads", *output_grads)?;
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
            ImageRef::new(
                input,
                spec.layout,
                *batch,
                spec.in_channels,
                *height,
                *width,
            )
            .map_err(kerr(name))?;
            ImageRef::new(output_grads, spec.layout, *batch, spec.out_channels, oh, ow)
                .map_err(kerr(name))?;
            if let Some(i) = input.iter().position(|v| !v.is_finite()) {
                return Err(Error::non_finite(name, format!("input at flat index {i}")));
            }
            if let Some(i) = output_grads.iter().position(|v| !v.is_finite()) {
                return Err(Error::non_finite(
                    name,
                    format!("output grads at flat index {i}"),
                ));
            }
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
            finite_mat(name, "output grads", *output_grads)?;
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
            finite_mat(name, "A statistic", *a)?;
            finite_mat(name, "G statistic", *g)?;
        }
        (kind, _) => {
            return Err(Error::mismatch(
                name,
                format!("observation kind does not match the layer ({kind:?}), d_out {d_out}"),
            ))
        }
    }
    Ok(())
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

pub(crate) fn observe_layer(
    l: &mut LayerState,
    obs: Observation<'_>,
    compat: Compat,
) -> Result<()> {
    validate_observation(l, &obs)?;
    let name = l.name.clone();
    let first = l.acc.count == 0;
    let alpha = if first { 0.0 } else { 1.0 };
    let (beta, add_weight): (f32, f64);
    match obs {
        Observation::Linear {
            activations,
            output_grads,
        } => {
            let n = activations.nrows();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            let bias = l.kind.has_bias();
            let req = factor::syrk_update_scratch::<f32>(n, activations.ncols(), bias, Par::Seq);
            let mut buf = MemBuffer::new(req);
            factor::syrk_update(
                dense(&mut l.acc.a),
                alpha,
                beta,
                activations,
                bias,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
            factor::syrk_update(
                dense(&mut l.acc.g),
                alpha,
                beta,
                output_grads,
                false,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
        }
        Observation::Conv2d {
            input,
            output_grads,
            batch,
            height,
            width,
        } => {
            let LayerKind::Conv2d(spec) = l.kind else {
                return Err(Error::mismatch(&name, "not a conv2d layer".into()));
            };
            let geom = spec.geometry(batch, height, width);
            let (oh, ow) = geom.output_size().map_err(kerr(&name))?;
            let (norm, b, w) = match compat {
                Compat::Native => (ConvNormalization::Kfc, batch as f32, batch as f64),
                Compat::KfacPytorch => (ConvNormalization::KfacPytorch, 1.0, 1.0),
            };
            (beta, add_weight) = (b, w);
            let img = ImageRef::new(input, spec.layout, batch, spec.in_channels, height, width)
                .map_err(kerr(&name))?;
            let gout = ImageRef::new(output_grads, spec.layout, batch, spec.out_channels, oh, ow)
                .map_err(kerr(&name))?;
            let mut buf = MemBuffer::new(
                conv::conv2d_a_update_scratch::<f32>(&geom, spec.bias).map_err(kerr(&name))?,
            );
            conv::conv2d_a_update(
                dense(&mut l.acc.a),
                alpha,
                beta,
                img,
                &geom,
                spec.bias,
                norm,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
            conv::conv2d_g_update(dense(&mut l.acc.g), alpha, beta, gout, norm, Par::Seq)
                .map_err(kerr(&name))?;
        }
        Observation::Embedding {
            tokens,
            output_grads,
        } => {
            let n = tokens.len();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            if let Factor::Diag(d) = &mut l.acc.a {
                if first {
                    d.iter_mut().for_each(|v| *v = 0.0);
                }
                for &t in tokens {
                    d[t] += beta;
                }
            }
            let mut buf = MemBuffer::new(StackReq::EMPTY);
            factor::syrk_update(
                dense(&mut l.acc.g),
                alpha,
                beta,
                output_grads,
                false,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
        }
        Observation::Kronecker { a, g, samples } => {
            (beta, add_weight) = match compat {
                Compat::Native => (samples as f32, samples as f64),
                Compat::KfacPytorch => (1.0, 1.0),
            };
            for (dst, src) in [(dense(&mut l.acc.a), a), (dense(&mut l.acc.g), g)] {
                let mut dst = dst;
                for j in 0..src.ncols() {
                    for i in j..src.nrows() {
                        let v = beta * src[(i, j)];
                        dst[(i, j)] = if first { v } else { dst[(i, j)] + v };
                    }
                }
            }
        }
    }
    l.acc.weight += add_weight;
    l.acc.count += 1;
    Ok(())
}
