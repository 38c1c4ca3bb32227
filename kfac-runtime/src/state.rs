//! Per-layer state: factors, micro-batch accumulators and the inverse cache.

use faer::Mat;

/// A Kronecker factor: dense symmetric (stored full), or diagonal
/// (embedding A factors).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Factor {
    Dense(Mat<f32>),
    Diag(Vec<f32>),
}

impl Factor {
    pub(crate) fn zeros(dim: usize, diag: bool) -> Self {
        if diag {
            Factor::Diag(vec![0.0; dim])
        } else {
            Factor::Dense(Mat::zeros(dim, dim))
        }
    }

    pub(crate) fn identity(dim: usize, diag: bool) -> Self {
        if diag {
            Factor::Diag(vec![1.0; dim])
        } else {
            Factor::Dense(Mat::identity(dim, dim))
        }
    }

    pub(crate) fn dim(&self) -> usize {
        match self {
            Factor::Dense(m) => m.nrows(),
            Factor::Diag(v) => v.len(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Factor::Dense(m) => m.nrows() * m.ncols() * 4,
            Factor::Diag(v) => v.len() * 4,
        }
    }
}

/// Cached result of the last inversion of a layer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum InverseCache {
    /// Eigendecompositions. `qa` is `None` for a diagonal A (identity
    /// eigenvectors, eigenvalues = the diagonal). `denom` holds
    /// `1/(l_G l_A^T + damping)` when precomputed.
    Eigen {
        qa: Option<Mat<f32>>,
        la: Vec<f32>,
        qg: Mat<f32>,
        lg: Vec<f32>,
        denom: Option<Mat<f32>>,
    },
    /// Damped inverses; `a_inv` diagonal for a diagonal A.
    Inverse { a_inv: Factor, g_inv: Mat<f32> },
}

impl InverseCache {
    pub(crate) fn bytes(&self) -> usize {
        match self {
            InverseCache::Eigen {
                qa,
                la,
                qg,
                lg,
                denom,
            } => {
                qa.as_ref().map_or(0, |m| m.nrows() * m.ncols() * 4)
                    + la.len() * 4
                    + qg.nrows() * qg.ncols() * 4
                    + lg.len() * 4
                    + denom.as_ref().map_or(0, |m| m.nrows() * m.ncols() * 4)
            }
            InverseCache::Inverse { a_inv, g_inv } => {
                a_inv.bytes() + g_inv.nrows() * g_inv.ncols() * 4
            }
        }
    }
}

/// Statistics observed since the last step, summed so that the combination
/// equals one large batch (native) or the mean of the micro-batches
/// (kfac-pytorch): the batch statistic is `acc / weight`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Accumulator {
    pub(crate) a: Factor,
    pub(crate) g: Factor,
    pub(crate) weight: f64,
    pub(crate) count: u64,
}

impl Accumulator {
    pub(crate) fn bytes(&self) -> usize {
        self.a.bytes() + self.g.bytes()
    }
}
