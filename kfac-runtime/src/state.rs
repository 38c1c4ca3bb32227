//! Per-layer state: factors, micro-batch accumulators, the inverse cache,
//! and the per-factor result of an inversion. Plain data: no I/O, no
//! communication (those live in `exchange`, `step` and `checkpoint`).

use std::sync::Mutex;

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::{Mat, Par};
use kfac_kernels::{eigen, inverse};

use crate::config::Compat;
use crate::layer::LayerKind;
use crate::{Error, Result};

/// Reusable kernel scratch: one buffer, grown (never shrunk) to the largest
/// request seen, so steady-state steps allocate no scratch. Locked per use:
/// each buffer has one user at a time (its layer's task, or one pool
/// thread), so the lock is uncontended.
pub(crate) struct Scratch {
    inner: Mutex<(StackReq, MemBuffer)>,
}

impl Scratch {
    /// A buffer for `req`.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] if it cannot be allocated.
    pub(crate) fn new(req: StackReq) -> Result<Self> {
        Ok(Self {
            inner: Mutex::new((req, alloc(req)?)),
        })
    }

    /// Runs `f` on a stack of at least `req`, growing the buffer first if
    /// needed.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] if the buffer must grow and cannot; `f`'s own
    /// error.
    pub(crate) fn with<R>(
        &self,
        req: StackReq,
        f: impl FnOnce(&mut MemStack) -> Result<R>,
    ) -> Result<R> {
        // A panic inside `f` poisons the lock; the buffer holds no
        // invariant beyond its size, so it is safe to reuse.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let need = g.0.or(req);
        if need != g.0 {
            g.1 = alloc(need)?;
            g.0 = need;
        }
        f(MemStack::new(&mut g.1))
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.size_bytes()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scratch({} bytes)", self.bytes())
    }
}

/// Scratch of every preconditioning kernel for a `d_out x d` gradient
/// (sized once per layer at registration).
pub(crate) fn precondition_scratch(d_out: usize, d: usize) -> StackReq {
    let par = Par::Seq;
    StackReq::any_of(&[
        eigen::precondition_eigen_scratch::<f32>(d_out, d, par),
        eigen::precondition_eigen_diag_a_scratch::<f32>(d_out, d, par),
        inverse::precondition_inverse_scratch::<f32>(d_out, d, par),
        inverse::precondition_inverse_diag_a_scratch::<f32>(d_out, d, par),
    ])
}

fn alloc(req: StackReq) -> Result<MemBuffer> {
    MemBuffer::try_new(req).map_err(|_| Error::OutOfMemory {
        what: "kernel scratch",
        bytes: req.size_bytes(),
    })
}

/// One registered layer.
#[derive(Debug)]
pub(crate) struct LayerState {
    pub(crate) name: String,
    pub(crate) kind: LayerKind,
    pub(crate) excluded: bool,
    pub(crate) a: Factor,
    pub(crate) g: Factor,
    pub(crate) acc: Accumulator,
    pub(crate) inv: Option<InverseCache>,
    /// Scratch of this layer's observe and precondition kernels, sized at
    /// registration for preconditioning (observations grow it to their
    /// largest batch once).
    pub(crate) scratch: Scratch,
}

impl LayerState {
    /// # Errors
    /// [`Error::OutOfMemory`] if the scratch cannot be allocated.
    pub(crate) fn new(
        name: String,
        kind: LayerKind,
        excluded: bool,
        compat: Compat,
    ) -> Result<Self> {
        let (d_out, d) = kind.dims();
        let diag = kind.diagonal_a();
        let (a, g) = match compat {
            Compat::Native => (Factor::zeros(d, diag), Factor::zeros(d_out, false)),
            Compat::KfacPytorch => (Factor::identity(d, diag), Factor::identity(d_out, false)),
        };
        Ok(Self {
            name,
            kind,
            excluded,
            a,
            g,
            acc: Accumulator {
                a: Factor::zeros(d, diag),
                g: Factor::zeros(d_out, false),
                weight: 0.0,
                count: 0,
            },
            inv: None,
            scratch: Scratch::new(precondition_scratch(d_out, d))?,
        })
    }

    pub(crate) fn bytes(&self) -> usize {
        self.a.bytes()
            + self.g.bytes()
            + self.acc.bytes()
            + self.inv.as_ref().map_or(0, |i| i.bytes())
            + self.scratch.bytes()
    }
}

/// The inverse-step result of one factor (what an owner shares).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum FactorInv {
    /// Eigenvectors (`None` for a diagonal factor: the identity) and
    /// eigenvalues.
    Eigen { q: Option<Mat<f32>>, l: Vec<f32> },
    /// The damped inverse.
    Inv(Factor),
}

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
    /// Forgets what was accumulated (the buffers stay allocated; the next
    /// observation overwrites them).
    pub(crate) fn clear(&mut self) {
        self.count = 0;
        self.weight = 0.0;
    }

    pub(crate) fn bytes(&self) -> usize {
        self.a.bytes() + self.g.bytes()
    }
}
