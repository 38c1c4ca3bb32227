//! Read access to a preconditioner's state, for users comparing against
//! another implementation (kfac-pytorch, a dense reference) or checking
//! what a checkpoint holds: the layers (names, kinds), each layer's
//! factors, and its current decomposition. Copies, never views: the state
//! stays private.
//!
//! ```
//! use kfac_runtime::{Config, Decomposition, LayerKind, Preconditioner};
//! let mut p = Preconditioner::new(Config { threads: 1, ..Config::default() })?;
//! let id = p.register("fc", LayerKind::Linear { in_features: 2, out_features: 2, bias: false })?;
//! assert_eq!(p.layers().next().map(|(i, n, _)| (i, n)), Some((id, "fc")));
//! assert!(p.decomposition(id)?.is_none()); // nothing before the first step
//! # Ok::<(), kfac_runtime::Error>(())
//! ```

use faer::Mat;

use crate::layer::{LayerId, LayerKind};
use crate::preconditioner::Preconditioner;
use crate::state::{Factor, InverseCache};
use crate::Result;

/// A layer's current decomposition (what `step` preconditions with), as
/// copies. Eigenvalues are those of the undamped factors (negative rounding
/// clamped to 0); inverses include the damping of the last inversion.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Decomposition {
    /// Eigen method: `A = Q_A diag(l_A) Q_A^T`, `G = Q_G diag(l_G) Q_G^T`.
    Eigen {
        /// Eigenvectors of A (columns); `None` for a diagonal A (the
        /// identity).
        qa: Option<Mat<f32>>,
        /// Eigenvalues of A.
        la: Vec<f32>,
        /// Eigenvectors of G (columns).
        qg: Mat<f32>,
        /// Eigenvalues of G.
        lg: Vec<f32>,
        /// `1 / (l_G l_A^T + damping)` when precomputed
        /// (`Config::precompute_denominators`).
        denominators: Option<Mat<f32>>,
    },
    /// Inverse method: the damped inverses (a diagonal A's inverse
    /// expanded to a full matrix).
    Inverse {
        /// `(A + shift_A I)^-1`.
        a_inv: Mat<f32>,
        /// `(G + shift_G I)^-1`.
        g_inv: Mat<f32>,
    },
}

fn full(f: &Factor) -> Mat<f32> {
    match f {
        Factor::Dense(m) => m.clone(),
        Factor::Diag(d) => Mat::from_fn(d.len(), d.len(), |i, j| if i == j { d[i] } else { 0.0 }),
    }
}

impl Preconditioner {
    /// Every registered layer in registration order: id, name, kind.
    pub fn layers(&self) -> impl Iterator<Item = (LayerId, &str, &LayerKind)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (LayerId(i), l.name.as_str(), &l.kind))
    }

    /// The name a layer was registered under.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`](crate::Error::UnknownLayer).
    pub fn layer_name(&self, id: LayerId) -> Result<&str> {
        Ok(&self.layer(id)?.name)
    }

    /// Copies of a layer's current factors `(A, G)` as full symmetric
    /// matrices (a diagonal A expanded).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`](crate::Error::UnknownLayer).
    pub fn factors(&self, id: LayerId) -> Result<(Mat<f32>, Mat<f32>)> {
        let l = self.layer(id)?;
        Ok((full(&l.a), full(&l.g)))
    }

    /// A copy of the decomposition the layer is preconditioned with, or
    /// `None` before its first inversion, for excluded layers, and on ranks
    /// outside the layer's gradient-worker group (`grad_worker_fraction <
    /// 1`), which do not keep it.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`](crate::Error::UnknownLayer).
    pub fn decomposition(&self, id: LayerId) -> Result<Option<Decomposition>> {
        let l = self.layer(id)?;
        Ok(l.inv.as_ref().map(|c| match c {
            InverseCache::Eigen {
                qa,
                la,
                qg,
                lg,
                denom,
            } => Decomposition::Eigen {
                qa: qa.clone(),
                la: la.clone(),
                qg: qg.clone(),
                lg: lg.clone(),
                denominators: denom.clone(),
            },
            InverseCache::Inverse { a_inv, g_inv } => Decomposition::Inverse {
                a_inv: full(a_inv),
                g_inv: g_inv.clone(),
            },
        }))
    }
}
