//! Views of caller memory: row-major strided matrices from C pointers,
//! dense conv2d tensors, and the gradient buffers of a step (checked not
//! to overlap, since they are written).
//!
//! Every size is checked (non-zero, `ld >= cols`, no overflow, at most
//! `isize::MAX` bytes) before a view is made; nothing here reads or writes
//! the memory itself.

use faer::{MatMut, MatRef};
use kfac_runtime::{Conv2dSpec, LayerGrad, LayerId, LayerKind, Preconditioner};

use crate::precond::KfacGrad;
use crate::status::{fail, Fail, KfacStatus, R};

/// Most `f32`s a view may span (its byte size fits `isize`).
const MAX_ELEMS: usize = isize::MAX as usize / 4;

/// Elements from the first to one past the last of a `rows x cols`
/// row-major matrix with leading dimension `ld`.
fn span(rows: usize, cols: usize, ld: usize, what: &str) -> R<usize> {
    rows.saturating_sub(1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .filter(|&v| v <= MAX_ELEMS)
        .ok_or_else(|| {
            Fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!("{what}: size overflows"),
            )
        })
}

/// A row-major `rows x cols` view with leading dimension `ld` after
/// checking the pointer, the sizes and the leading dimension.
///
/// # Safety
/// `ptr` is NULL or addresses `(rows-1)*ld + cols` readable floats that
/// stay valid and unmodified for `'a`.
pub(crate) unsafe fn matrix<'a>(
    ptr: *const f32,
    rows: usize,
    cols: usize,
    ld: usize,
    what: &str,
) -> R<MatRef<'a, f32>> {
    if ptr.is_null() {
        return fail(KfacStatus::KFAC_ERR_NULL, format!("{what} is NULL"));
    }
    if rows == 0 || cols == 0 {
        return fail(
            KfacStatus::KFAC_ERR_SHAPE,
            format!("{what}: {rows}x{cols} has a zero dimension"),
        );
    }
    if ld < cols {
        return fail(
            KfacStatus::KFAC_ERR_SHAPE,
            format!("{what}: leading dimension {ld} < row length {cols}"),
        );
    }
    span(rows, cols, ld, what)?;
    // SAFETY: the caller's contract; strides fit isize (checked above).
    Ok(unsafe { MatRef::from_raw_parts(ptr, rows, cols, ld as isize, 1) })
}

/// The lengths of a conv2d layer's dense input `(n, C_in, h, w)` and
/// output gradients `(n, C_out, H_out, W_out)`.
pub(crate) fn conv_lengths(spec: &Conv2dSpec, n: usize, h: usize, w: usize) -> R<(usize, usize)> {
    let (oh, ow) = spec
        .geometry(n, h, w)
        .output_size()
        .map_err(|e| Fail(KfacStatus::KFAC_ERR_SHAPE, e.to_string()))?;
    let len = |c: usize, y: usize, x: usize| {
        n.checked_mul(c)
            .and_then(|v| v.checked_mul(y))
            .and_then(|v| v.checked_mul(x))
            .filter(|&v| v > 0 && v <= MAX_ELEMS)
    };
    match (len(spec.in_channels, h, w), len(spec.out_channels, oh, ow)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => fail(
            KfacStatus::KFAC_ERR_SHAPE,
            "zero or overflowing tensor size",
        ),
    }
}

/// The kind of layer `layer` (`KFAC_ERR_INVALID_ARGUMENT` when unknown).
pub(crate) fn layer_kind(pc: &Preconditioner, layer: u32) -> R<LayerKind> {
    Ok(pc.layer_kind(LayerId(layer as usize))?.clone())
}

/// Checked, non-overlapping views of the caller's gradient buffers.
///
/// # Safety
/// Each entry's buffers are NULL or hold the documented number of floats,
/// valid and not otherwise accessed for `'a`.
pub(crate) unsafe fn grads<'a>(pc: &Preconditioner, gs: &[KfacGrad]) -> R<Vec<LayerGrad<'a>>> {
    // (start, end) byte addresses of every buffer, with its layer.
    let mut spans: Vec<(usize, usize, u32)> = Vec::new();
    let mut shapes = Vec::with_capacity(gs.len());
    for g in gs {
        let kind = layer_kind(pc, g.layer)?;
        let (r, c) = kind.weight_shape();
        if g.weight.is_null() {
            return fail(
                KfacStatus::KFAC_ERR_NULL,
                format!("layer {}: weight is NULL", g.layer),
            );
        }
        if g.ldw < c {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("layer {}: ldw {} < row length {c}", g.layer, g.ldw),
            );
        }
        let wlen = span(r, c, g.ldw, "weight")?;
        spans.push((g.weight as usize, g.weight as usize + wlen * 4, g.layer));
        if kind.has_bias() == g.bias.is_null() {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!(
                    "layer {}: bias pointer must be {} for this layer",
                    g.layer,
                    if kind.has_bias() { "non-NULL" } else { "NULL" }
                ),
            );
        }
        if !g.bias.is_null() {
            spans.push((g.bias as usize, g.bias as usize + r * 4, g.layer));
        }
        shapes.push((r, c));
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return fail(
            KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
            format!(
                "gradient buffers of layers {} and {} overlap",
                w[0].2, w[1].2
            ),
        );
    }
    let mut lg = Vec::with_capacity(gs.len());
    for (g, &(r, c)) in gs.iter().zip(&shapes) {
        // SAFETY: non-NULL, sized as documented, non-overlapping (checked),
        // valid for `'a` by contract.
        let w = unsafe { MatMut::from_raw_parts_mut(g.weight, r, c, g.ldw as isize, 1) };
        let b = if g.bias.is_null() {
            None
        } else {
            // SAFETY: as above, `r` floats.
            Some(unsafe { std::slice::from_raw_parts_mut(g.bias, r) })
        };
        lg.push(LayerGrad {
            layer: LayerId(g.layer as usize),
            weight: w,
            bias: b,
        });
    }
    Ok(lg)
}
