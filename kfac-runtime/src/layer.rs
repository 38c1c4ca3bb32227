//! Layer descriptions, the observations a training loop hands over, and the
//! gradients `step` preconditions.
//!
//! Weight gradients come in the layout training stacks use: `out x in`,
//! row-major (any strides are accepted), the bias as a separate vector; the
//! bias is folded in as the last column internally.

use crate::{Error, Result};
use faer::{MatMut, MatRef};
use kfac_kernels::conv::{Conv2dGeometry, ImageLayout};

/// Handle of a registered layer (its registration index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub usize);

/// A conv2d layer's hyper-parameters (`groups = 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Zero padding `(h, w)`.
    pub padding: (usize, usize),
    /// Dilation `(h, w)`.
    pub dilation: (usize, usize),
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Layout of activations and output gradients.
    pub layout: ImageLayout,
}

impl Conv2dSpec {
    /// The kernel geometry for a batch of `n` images of `h x w`.
    pub fn geometry(&self, n: usize, h: usize, w: usize) -> Conv2dGeometry {
        Conv2dGeometry::new(n, self.in_channels, h, w, self.kernel.0, self.kernel.1)
            .stride(self.stride.0, self.stride.1)
            .padding(self.padding.0, self.padding.1)
            .dilation(self.dilation.0, self.dilation.1)
    }
}

/// What kind of layer, with its sizes.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// `y = W x + b`, `W: out x in`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// 2-D convolution; weight `C_out x (C_in kh kw)` row-major (PyTorch's
    /// `C_out x C_in x kh x kw` flattened).
    Conv2d(Conv2dSpec),
    /// Embedding lookup, weight `num_embeddings x dim` (PyTorch layout). The A
    /// factor is diagonal (token frequencies), G dense `dim x dim`.
    Embedding {
        /// Vocabulary size.
        num_embeddings: usize,
        /// Embedding dimension.
        dim: usize,
    },
    /// A generic Kronecker block: the caller supplies A- and G-statistics.
    /// Weight gradient `g_dim x a_dim` row-major, no separate bias.
    Kronecker {
        /// Dimension of A.
        a_dim: usize,
        /// Dimension of G.
        g_dim: usize,
    },
}

impl LayerKind {
    /// `(d_out, d)`: rows and columns of the internal gradient matrix (bias
    /// folded in as the last column) and dims of G and A.
    pub fn dims(&self) -> (usize, usize) {
        match *self {
            LayerKind::Linear {
                in_features,
                out_features,
                bias,
            } => (out_features, in_features + bias as usize),
            LayerKind::Conv2d(c) => (
                c.out_channels,
                c.in_channels * c.kernel.0 * c.kernel.1 + c.bias as usize,
            ),
            LayerKind::Embedding {
                num_embeddings,
                dim,
            } => (dim, num_embeddings),
            LayerKind::Kronecker { a_dim, g_dim } => (g_dim, a_dim),
        }
    }

    /// Whether the layer has a separate bias gradient.
    pub fn has_bias(&self) -> bool {
        match *self {
            LayerKind::Linear { bias, .. } => bias,
            LayerKind::Conv2d(c) => c.bias,
            _ => false,
        }
    }

    /// Shape `(rows, cols)` of the weight gradient the caller passes.
    pub fn weight_shape(&self) -> (usize, usize) {
        match *self {
            LayerKind::Linear {
                in_features,
                out_features,
                ..
            } => (out_features, in_features),
            LayerKind::Conv2d(c) => (c.out_channels, c.in_channels * c.kernel.0 * c.kernel.1),
            LayerKind::Embedding {
                num_embeddings,
                dim,
            } => (num_embeddings, dim),
            LayerKind::Kronecker { a_dim, g_dim } => (g_dim, a_dim),
        }
    }

    /// Whether A is diagonal (embeddings).
    pub fn diagonal_a(&self) -> bool {
        matches!(self, LayerKind::Embedding { .. })
    }

    pub(crate) fn validate(&self, name: &str) -> Result<()> {
        let bad = |reason: &str| Error::InvalidLayer {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        // `dims`/`weight_shape` multiply and add unchecked: check first.
        let fits = match *self {
            LayerKind::Linear { in_features, .. } => in_features.checked_add(1).is_some(),
            LayerKind::Conv2d(c) => c
                .in_channels
                .checked_mul(c.kernel.0)
                .and_then(|v| v.checked_mul(c.kernel.1))
                .and_then(|v| v.checked_add(1))
                .is_some(),
            LayerKind::Embedding { .. } | LayerKind::Kronecker { .. } => true,
        };
        if !fits {
            return Err(bad("dimensions overflow"));
        }
        let (d_out, d) = self.dims();
        let (wr, wc) = self.weight_shape();
        if d_out == 0 || d == 0 || wr == 0 || wc == 0 {
            return Err(bad("every dimension must be >= 1"));
        }
        if let LayerKind::Conv2d(c) = self {
            if c.kernel.0 == 0 || c.kernel.1 == 0 || c.stride.0 == 0 || c.stride.1 == 0 {
                return Err(bad("kernel and stride must be >= 1"));
            }
            if c.dilation.0 == 0 || c.dilation.1 == 0 {
                return Err(bad("dilation must be >= 1"));
            }
        }
        // Bytes of the two factors, their decompositions and the gradient
        // work space, in f32 (an f64 eigen workspace is transient).
        let a_elems = if self.diagonal_a() {
            Some(d)
        } else {
            d.checked_mul(d)
        };
        let bytes = d_out
            .checked_mul(d)
            .and_then(|w| Some((a_elems?, d_out.checked_mul(d_out)?, w)))
            .and_then(|(a, g, w)| a.checked_add(g)?.checked_mul(2)?.checked_add(w))
            .and_then(|elems| elems.checked_mul(4))
            .filter(|&b| b <= isize::MAX as usize);
        let Some(bytes) = bytes else {
            return Err(bad("dimensions overflow"));
        };
        // The state is allocated right after this check (factors,
        // accumulators and scratch at registration; new factors and
        // decompositions beside the old ones during a step). Probe first
        // (address space only, nothing is touched) so an impossible size is
        // an error naming the bytes, not an allocation abort.
        let mut probe: Vec<u8> = Vec::new();
        if probe.try_reserve_exact(bytes).is_err() {
            return Err(crate::mem::oom(
                &format!("layer '{name}': state (factors, decompositions, gradient work space)"),
                bytes,
            ));
        }
        Ok(())
    }
}

/// One micro-batch of statistics for a layer.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// Linear layer: activations `n x in_features` and output gradients
    /// `n x out_features` (any strides; row-major from C is used in place).
    Linear {
        /// Layer inputs, one row per sample.
        activations: MatRef<'a, f32>,
        /// Gradients of the loss w.r.t. the layer outputs.
        output_grads: MatRef<'a, f32>,
    },
    /// Conv2d layer: input `(n, C_in, H, W)` and output gradients
    /// `(n, C_out, H_out, W_out)`, dense in the layer's layout.
    Conv2d {
        /// Input tensor.
        input: &'a [f32],
        /// Output-gradient tensor.
        output_grads: &'a [f32],
        /// Batch size `n`.
        batch: usize,
        /// Input height `H`.
        height: usize,
        /// Input width `W`.
        width: usize,
    },
    /// Embedding: the token ids of `n` lookups and the output gradients
    /// `n x dim`.
    Embedding {
        /// Token ids, each `< num_embeddings`.
        tokens: &'a [usize],
        /// Gradients of the loss w.r.t. the looked-up vectors.
        output_grads: MatRef<'a, f32>,
    },
    /// Generic Kronecker block: statistics already averaged over `samples`
    /// samples (lower triangles are read).
    Kronecker {
        /// A statistic, `a_dim x a_dim`.
        a: MatRef<'a, f32>,
        /// G statistic, `g_dim x g_dim`.
        g: MatRef<'a, f32>,
        /// Number of samples the statistics average over (micro-batch
        /// weighting).
        samples: usize,
    },
}

/// A layer's gradient, preconditioned in place by `step`.
#[derive(Debug)]
pub struct LayerGrad<'a> {
    /// The layer.
    pub layer: LayerId,
    /// Weight gradient in [`LayerKind::weight_shape`].
    pub weight: MatMut<'a, f32>,
    /// Bias gradient (`out` values) for layers with a bias.
    pub bias: Option<&'a mut [f32]>,
}

impl<'a> LayerGrad<'a> {
    /// A gradient from a row-major weight slice and an optional bias.
    ///
    /// # Errors
    /// [`Error::Mismatch`] (naming `"?"`) if `weight.len() != rows * cols`.
    pub fn from_row_major(
        layer: LayerId,
        weight: &'a mut [f32],
        rows: usize,
        cols: usize,
        bias: Option<&'a mut [f32]>,
    ) -> Result<Self> {
        if rows.checked_mul(cols) != Some(weight.len()) {
            return Err(Error::mismatch(
                "?",
                format!(
                    "weight slice of {} values is not {rows}x{cols}",
                    weight.len()
                ),
            ));
        }
        Ok(Self {
            layer,
            weight: MatMut::from_row_major_slice_mut(weight, rows, cols),
            bias,
        })
    }
}
