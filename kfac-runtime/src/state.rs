//! Per-layer state: factors, micro-batch accumulators, the inverse cache,
//! and the per-factor result of an inversion. Plain data: no I/O, no
//! communication (those live in `exchange`, `step` and `checkpoint`).

use std::sync::{Arc, Mutex};

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::{Mat, Par};
use kfac_kernels::{eigen, inverse};

use crate::config::Compat;
use crate::config::{Config, Method, Precision};
use crate::layer::LayerKind;
use crate::mem::{self, MemBudget};
use crate::Result;

/// Reusable kernel scratch: one buffer, grown (never shrunk) to the largest
/// request seen, so steady-state steps allocate no scratch. Locked per use:
/// each buffer has one user at a time (its layer's task, or one pool
/// thread), so the lock is uncontended.
pub(crate) struct Scratch {
    inner: Mutex<(StackReq, MemBuffer)>,
    /// The budget its bytes are charged to (`None`: charged in advance by
    /// the owner, as the inversion scratch is).
    budget: Option<(Arc<MemBudget>, String)>,
}

impl Scratch {
    /// A buffer for `req`, charged to `budget` (with `what` naming it).
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] if it cannot be allocated,
    /// [`Error::MemoryBudget`] if the budget refuses it.
    pub(crate) fn new(req: StackReq, budget: Option<(Arc<MemBudget>, String)>) -> Result<Self> {
        if let Some((b, what)) = &budget {
            b.charge(req.size_bytes(), what)?;
        }
        match alloc(req) {
            Ok(buf) => Ok(Self {
                inner: Mutex::new((req, buf)),
                budget,
            }),
            Err(e) => {
                if let Some((b, _)) = &budget {
                    b.release(req.size_bytes());
                }
                Err(e)
            }
        }
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
            let (old, new) = (g.0.size_bytes(), need.size_bytes());
            let grow = new.saturating_sub(old);
            if let Some((b, what)) = &self.budget {
                b.charge(grow, what)?;
            }
            match alloc(need) {
                Ok(buf) => {
                    g.1 = buf;
                    g.0 = need;
                }
                Err(e) => {
                    if let Some((b, _)) = &self.budget {
                        b.release(grow);
                    }
                    return Err(e);
                }
            }
        }
        f(MemStack::new(&mut g.1))
    }

    /// Grows the buffer to at least `req` now.
    ///
    /// # Errors
    /// As [`with`](Self::with).
    pub(crate) fn reserve(&self, req: StackReq) -> Result<()> {
        self.with(req, |_| Ok(()))
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
    MemBuffer::try_new(req).map_err(|_| mem::oom("kernel scratch", req.size_bytes()))
}

/// The inversion scratch one pool thread needs for a dense factor of
/// order `n` (kernel scratch, plus the f64 copies of an f64
/// eigendecomposition and the f32 result), in bytes.
pub(crate) fn inversion_bytes(n: usize, config: &Config) -> usize {
    let par = Par::Seq;
    let nn = n.saturating_mul(n);
    match config.method {
        Method::Eigen => match config.eigen_precision {
            Precision::F32 => eigen_bytes::<f32>(n, config),
            // Auto may pick f64.
            Precision::F64 | Precision::Auto => {
                eigen_bytes::<f64>(n, config).saturating_add(nn.saturating_mul(16))
            }
        },
        Method::Inverse => inverse::damped_inverse_scratch::<f32>(n, par).size_bytes(),
    }
}

/// Eigensolver scratch in `T` for an `n x n` factor: a large factor may be
/// decomposed by every thread (another solver, another scratch) and
/// kfac-pytorch mode uses the reference solver, so the largest of them.
fn eigen_bytes<T: kfac_kernels::Real>(n: usize, config: &Config) -> usize {
    [Par::Seq, Par::rayon(2), Par::rayon(config.threads)]
        .into_iter()
        .map(|p| {
            eigen::sym_eigen_scratch::<T>(n, p)
                .or(eigen::sym_eigen_reference_scratch::<T>(n, p))
                .size_bytes()
        })
        .max()
        .unwrap_or(0)
}

/// Bytes a layer's state will hold once it has been inverted: factors,
/// accumulators and the decompositions or inverses (scratch is charged
/// separately, as it is allocated).
pub(crate) fn planned_bytes(kind: &LayerKind, config: &Config) -> usize {
    let (d_out, d) = kind.dims();
    let diag = kind.diagonal_a();
    let sq = |n: usize| n.saturating_mul(n).saturating_mul(4);
    let a = if diag { d.saturating_mul(4) } else { sq(d) };
    let g = sq(d_out);
    let inv = match config.method {
        Method::Eigen => {
            let denom = if config.precompute_denominators {
                d_out.saturating_mul(d).saturating_mul(4)
            } else {
                0
            };
            a.saturating_add(g)
                .saturating_add((d + d_out).saturating_mul(4))
                .saturating_add(denom)
        }
        Method::Inverse => a.saturating_add(g),
    };
    // Factors and accumulators, the decompositions, and the new factors a
    // step builds before it replaces the old ones.
    a.saturating_add(g).saturating_mul(3).saturating_add(inv)
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
    /// [`Error::OutOfMemory`] if the factors or the scratch cannot be
    /// allocated (the message names the layer and the bytes),
    /// [`Error::MemoryBudget`] if the budget refuses the scratch.
    pub(crate) fn new(
        name: String,
        kind: LayerKind,
        excluded: bool,
        compat: Compat,
        budget: &Arc<MemBudget>,
    ) -> Result<Self> {
        let (d_out, d) = kind.dims();
        let diag = kind.diagonal_a();
        let what = |w: &str| format!("layer '{name}': {w}");
        let alloc_all = || -> Result<_> {
            let (a, g) = match compat {
                Compat::Native => (
                    Factor::try_zeros(d, diag, &what("factor A"))?,
                    Factor::try_zeros(d_out, false, &what("factor G"))?,
                ),
                Compat::KfacPytorch => (
                    Factor::try_identity(d, diag, &what("factor A"))?,
                    Factor::try_identity(d_out, false, &what("factor G"))?,
                ),
            };
            let acc = Accumulator {
                a: Factor::try_zeros(d, diag, &what("accumulator of A"))?,
                g: Factor::try_zeros(d_out, false, &what("accumulator of G"))?,
                weight: 0.0,
                count: 0,
            };
            let scratch = Scratch::new(
                precondition_scratch(d_out, d),
                Some((budget.clone(), what("kernel scratch"))),
            )?;
            Ok((a, g, acc, scratch))
        };
        let (a, g, acc, scratch) = alloc_all()?;
        Ok(Self {
            name,
            kind,
            excluded,
            a,
            g,
            acc,
            inv: None,
            scratch,
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
    /// # Errors
    /// [`Error::OutOfMemory`] naming `what`.
    pub(crate) fn try_zeros(dim: usize, diag: bool, what: &str) -> Result<Self> {
        Ok(if diag {
            Factor::Diag(mem::filled(dim, 0.0, what)?)
        } else {
            Factor::Dense(mem::zeros(dim, dim, what)?)
        })
    }

    /// # Errors
    /// [`Error::OutOfMemory`] naming `what`.
    pub(crate) fn try_identity(dim: usize, diag: bool, what: &str) -> Result<Self> {
        Ok(if diag {
            Factor::Diag(mem::filled(dim, 1.0, what)?)
        } else {
            Factor::Dense(mem::identity(dim, what)?)
        })
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
