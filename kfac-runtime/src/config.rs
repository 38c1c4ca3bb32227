//! Preconditioner configuration: validated values with documented defaults.

use crate::{Error, Result};

/// How the Fisher blocks are inverted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// Eigendecompositions of A and G; `(A ⊗ G + damping I)^{-1}` exactly.
    #[default]
    Eigen,
    /// Damped Cholesky inverses with factored Tikhonov damping.
    Inverse,
}

/// Floating-point precision of the eigendecompositions (factors are kept
/// in f32 either way).
///
/// What f32 costs in accuracy was measured on Wishart, rank-deficient and
/// power-law factor spectra (`cargo run --release -p kfac-kernels
/// --example precision`; BENCHMARKS.md, "Eigendecomposition precision"):
/// relative to an all-f64 reference, the preconditioned gradient of the
/// f64 path is off by about 8e-7 whatever the damping (the rounding of the
/// results to f32), the f32 path by at most `0.11 eps r^-1` (`eps` =
/// f32's machine epsilon, `r = damping / (λmax(A) λmax(G))` the relative
/// damping): the small eigenvalues carry an absolute error of about
/// `eps λmax`, which the damping either hides or not. f32 decomposes 1.5-3x
/// faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Decompose in f32.
    F32,
    /// Widen to f64, decompose, round the results to f32.
    F64,
    /// Per layer at each inversion: f32 when the predicted error of the
    /// f32 path, `eps λmax(A) λmax(G) / damping` (about 9x the worst case
    /// measured at orders 1024-2304; a property test found 2x on a tiny,
    /// strongly scaled factor), is at most [`Precision::AUTO_TOLERANCE`],
    /// f64 otherwise. `λmax` is estimated from below by
    /// [`largest_eigenvalue_estimate`](kfac_kernels::eigen::largest_eigenvalue_estimate)
    /// (8 power iterations, `O(n^2)`). So the preconditioned gradient stays
    /// within about `1e-3` (relative; at worst a few times that on tiny,
    /// badly scaled factors) of the f64 one; in practice f32 is
    /// chosen unless the damping is below ~1.2e-4 of `λmax(A) λmax(G)`.
    /// The default.
    #[default]
    Auto,
}

impl Precision {
    /// The bound on the predicted relative error of the f32 path under
    /// which [`Precision::Auto`] decomposes in f32: `1e-3`, a quarter of
    /// the rounding of a bf16 wire (`2^-8`).
    pub const AUTO_TOLERANCE: f64 = 1e-3;

    /// Power iterations of the `λmax` estimate of [`Precision::Auto`].
    pub const AUTO_POWER_ITERATIONS: usize = 8;

    /// The precision [`Precision::Auto`] picks for a layer whose factors
    /// have largest eigenvalues `lambda_a`, `lambda_g` at `damping`; other
    /// variants are returned unchanged.
    ///
    /// ```
    /// use kfac_runtime::Precision;
    /// assert_eq!(Precision::Auto.resolve(1.0, 1.0, 1e-2), Precision::F32);
    /// assert_eq!(Precision::Auto.resolve(1.0, 1.0, 1e-6), Precision::F64);
    /// assert_eq!(Precision::F64.resolve(1.0, 1.0, 1.0), Precision::F64);
    /// ```
    pub fn resolve(self, lambda_a: f64, lambda_g: f64, damping: f64) -> Precision {
        match self {
            Precision::Auto => {
                let predicted = f32::EPSILON as f64 * lambda_a * lambda_g / damping;
                if predicted <= Self::AUTO_TOLERANCE {
                    Precision::F32
                } else {
                    Precision::F64
                }
            }
            p => p,
        }
    }
}

/// Numerical conventions: ours (the crate docs of `kfac-kernels`) or
/// kfac-pytorch 0.4's, reproduced exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compat {
    /// Martens & Grosse / KFC conventions (see `kfac_kernels`).
    #[default]
    Native,
    /// kfac-pytorch 0.4: factors start at the identity and use a fixed decay,
    /// conv statistics divided by `n S^3`, micro-batch statistics averaged,
    /// f32 eigendecompositions with precomputed denominators, and full
    /// damping on each factor for the inverse method.
    KfacPytorch,
}

/// Precision of factor statistics on the wire when they are reduced across
/// ranks (sums are always accumulated in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WirePrecision {
    /// 4 bytes per value (an allreduce).
    #[default]
    F32,
    /// bfloat16, round to nearest even (2 bytes; an allgather, summed in
    /// rank order in f32 on every rank).
    Bf16,
    /// IEEE half, round to nearest even (2 bytes; as for bf16).
    F16,
}

/// A per-step value (damping or learning rate).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The same value every step.
    Constant(f64),
    /// `values[i]` from step `boundaries[i-1]` (inclusive) on; `values[0]`
    /// before `boundaries[0]`. `values.len() == boundaries.len() + 1`,
    /// boundaries strictly increasing. Steps count from 0.
    Piecewise {
        /// Steps at which the value changes.
        boundaries: Vec<u64>,
        /// The values.
        values: Vec<f64>,
    },
    /// The caller supplies the value before each step
    /// (`Preconditioner::set_damping` / `set_lr`); starts at the given value.
    PerStep(f64),
}

impl Schedule {
    /// The value at `step` (for `PerStep`, the initial value). A piecewise
    /// schedule with no values (which [`Config::validate`] refuses) has no
    /// value: NaN, never a panic.
    ///
    /// ```
    /// use kfac_runtime::Schedule;
    /// let s = Schedule::Piecewise { boundaries: vec![10, 20], values: vec![1.0, 0.5, 0.1] };
    /// assert_eq!(s.at(0), 1.0);
    /// assert_eq!(s.at(10), 0.5);
    /// assert_eq!(s.at(25), 0.1);
    /// let empty = Schedule::Piecewise { boundaries: vec![], values: vec![] };
    /// assert!(empty.at(3).is_nan());
    /// ```
    pub fn at(&self, step: u64) -> f64 {
        match self {
            Schedule::Constant(v) | Schedule::PerStep(v) => *v,
            Schedule::Piecewise { boundaries, values } => {
                let i = boundaries.partition_point(|&b| b <= step);
                values
                    .get(i.min(values.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(f64::NAN)
            }
        }
    }

    pub(crate) fn validate(&self, field: &'static str, positive: bool) -> Result<()> {
        let ok = |v: f64| v.is_finite() && if positive { v > 0.0 } else { v >= 0.0 };
        let bad = |reason: String| Error::InvalidConfig { field, reason };
        match self {
            Schedule::Constant(v) | Schedule::PerStep(v) => {
                if !ok(*v) {
                    return Err(bad(format!(
                        "{v} is not a finite value {}",
                        if positive { "> 0" } else { ">= 0" }
                    )));
                }
            }
            Schedule::Piecewise { boundaries, values } => {
                if values.len() != boundaries.len() + 1 {
                    return Err(bad(format!(
                        "piecewise schedule needs boundaries.len() + 1 values, got {} boundaries and {} values",
                        boundaries.len(),
                        values.len()
                    )));
                }
                if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(bad(
                        "piecewise boundaries must be strictly increasing".into()
                    ));
                }
                if let Some(v) = values.iter().find(|v| !ok(**v)) {
                    return Err(bad(format!("piecewise value {v} is out of range")));
                }
            }
        }
        Ok(())
    }
}

/// All settings of a [`Preconditioner`](crate::Preconditioner).
///
/// ```
/// use kfac_runtime::{Config, Method};
/// let cfg = Config { method: Method::Inverse, ..Config::default() };
/// cfg.validate().unwrap();
/// assert_eq!(cfg.factor_decay, 0.95);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Tikhonov damping added to the Fisher block. Default: constant 1e-3.
    pub damping: Schedule,
    /// Running-average decay `xi` of the factors, in `[0, 1)` (`[0, 1]` in
    /// kfac-pytorch mode, as it accepts 1). Default 0.95.
    pub factor_decay: f64,
    /// KL clipping threshold; `None` disables clipping. Default `Some(1e-3)`.
    pub kl_clip: Option<f64>,
    /// Learning rate, used only by KL clipping. Default: constant 0.1.
    pub lr: Schedule,
    /// Factors are updated every this many steps (>= 1). Default 1.
    pub factor_update_steps: u64,
    /// Inverses are recomputed every this many steps (>= 1), and always on
    /// the first step. Default 10.
    pub inv_update_steps: u64,
    /// Eigen or inverse method. Default eigen.
    pub method: Method,
    /// Refresh only what drifted (eigen method, native conventions): at an
    /// inverse update, a factor `F` whose previous decomposition
    /// `(Q, l)` this rank holds is refreshed instead of decomposed again
    /// when the refreshed decomposition's error `‖F - Q' diag(l') Q'^T‖`
    /// is at most `tolerance * damping / λmax(partner)`, by the first of:
    ///
    /// 1. **reuse** `(Q, l)` as they are, if twice a randomized estimate
    ///    of `‖F - Q diag(l) Q^T‖_F` is within it
    ///    ([`eigenbasis_change_estimate`](kfac_kernels::eigen::eigenbasis_change_estimate),
    ///    32 probes, `O(n^2)`; certain up to a probability below `1e-5`);
    /// 2. **keep** `Q` with the eigenvalues `diag(Q^T F Q)` if the drift
    ///    `‖offdiag(Q^T F Q)‖_F` is within it (`3 n^3` flops);
    /// 3. **refine** `Q` by one step if that step's error bound is within
    ///    it and the refined basis loses at most `tolerance` of its
    ///    orthogonality (`3 n^3` more;
    ///    [`refresh_eigenbasis`](kfac_kernels::eigen::refresh_eigenbasis));
    ///
    /// and decomposed in full otherwise (after spending the tests: about
    /// 0.4x of a decomposition at order 4096, less below). An error `E`
    /// of a factor changes its damped Kronecker inverse by at most
    /// `‖E‖ λmax(partner) / damping` relative, so the preconditioned
    /// gradient stays within about twice the tolerance of the full
    /// decomposition's. `λmax(partner)` is the larger of the partner
    /// factor's largest eigenvalue at its last decomposition and a
    /// power-iteration estimate of its current one; a factor whose partner
    /// was zero at its last decomposition is decomposed. `0` (the default) decomposes
    /// every factor every time; must be finite and `>= 0`. Ignored in
    /// kfac-pytorch mode. With a gradient-worker fraction below one, an
    /// owner that does not hold the old basis decomposes in full, so
    /// results then depend on the fraction. Counted in
    /// [`StepStats::decompositions_kept`](crate::StepStats::decompositions_kept)
    /// (reuse, keep) and
    /// [`StepStats::decompositions_refined`](crate::StepStats::decompositions_refined).
    pub refresh_tolerance: f64,
    /// Precision of the eigendecompositions. Default [`Precision::Auto`]
    /// (f32 where its error bound allows).
    pub eigen_precision: Precision,
    /// Precompute `1/(l_G l_A^T + damping)` at the inverse step (eigen
    /// method). Default false (computed on the fly).
    pub precompute_denominators: bool,
    /// Names of layers that are registered but not preconditioned (their
    /// gradients pass through unchanged). Default empty.
    pub exclude: Vec<String>,
    /// Numerical conventions. Default native.
    pub compat: Compat,
    /// Worker threads for independent layers (0: rayon's default, the
    /// number of cores). Default 0.
    pub threads: usize,
    /// Gradient-worker fraction `f` in `(0, 1]` (KAISA): with P ranks, each
    /// layer is preconditioned by a group of `max(1, round(f P))` ranks and
    /// the result is broadcast from the layer's owner; `f = 1` (default)
    /// shares every decomposition and preconditions every layer on every
    /// rank. Ignored in a single process.
    pub grad_worker_fraction: f64,
    /// Precision of factor statistics on the wire. Default f32.
    pub wire: WirePrecision,
    /// Compute conv2d A statistics as if every dilation were 1, as
    /// kfac-pytorch 0.4 does (its patch extraction ignores dilation).
    /// **Warning:** for a dilated conv this is not the layer's Fisher
    /// block: the patches are not the inputs the weights multiply. Only
    /// for reproducing kfac-pytorch's numbers; honoured dilation (the
    /// default, false) is correct in both compat modes.
    pub ignore_conv_dilation: bool,
    /// Bytes this preconditioner may hold (`None`, the default: no limit).
    /// Charged: each layer's factors, accumulators and decompositions at
    /// their full size when it is registered (or loaded), the inversion
    /// scratch of every pool thread for the largest factor, and kernel
    /// scratch as it grows (an observation of a larger batch). A
    /// registration or observation that would exceed it fails with
    /// [`Error::MemoryBudget`] and changes nothing. Not stored in
    /// checkpoints, and ranks may differ.
    pub memory_budget: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            damping: Schedule::Constant(1e-3),
            factor_decay: 0.95,
            kl_clip: Some(1e-3),
            lr: Schedule::Constant(0.1),
            factor_update_steps: 1,
            inv_update_steps: 10,
            method: Method::Eigen,
            refresh_tolerance: 0.0,
            eigen_precision: Precision::Auto,
            precompute_denominators: false,
            exclude: Vec::new(),
            compat: Compat::Native,
            threads: 0,
            grad_worker_fraction: 1.0,
            wire: WirePrecision::F32,
            ignore_conv_dilation: false,
            memory_budget: None,
        }
    }
}

impl Config {
    /// kfac-pytorch 0.4.2's `KFACPreconditioner` defaults and conventions:
    /// `compat = KfacPytorch`, factor and inverse updates every step
    /// (`factor_update_steps = inv_update_steps = 1`), damping 1e-3, factor
    /// decay 0.95, KL clip 1e-3, lr 0.1, eigen method with f32
    /// decompositions and precomputed denominators
    /// (`compute_eigenvalue_outer_product`), gradient-worker fraction 1
    /// (`COMM_OPT`). Dilation is honoured unless `ignore_conv_dilation` is
    /// set (see there).
    ///
    /// ```
    /// let c = kfac_runtime::Config::kfac_pytorch();
    /// assert!(c.precompute_denominators);
    /// assert_eq!((c.factor_update_steps, c.inv_update_steps), (1, 1));
    /// ```
    pub fn kfac_pytorch() -> Self {
        Self {
            compat: Compat::KfacPytorch,
            eigen_precision: Precision::F32,
            precompute_denominators: true,
            factor_update_steps: 1,
            inv_update_steps: 1,
            damping: Schedule::Constant(1e-3),
            factor_decay: 0.95,
            kl_clip: Some(1e-3),
            lr: Schedule::Constant(0.1),
            method: Method::Eigen,
            grad_worker_fraction: 1.0,
            ..Self::default()
        }
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        self.damping.validate("damping", true)?;
        self.lr.validate("lr", false)?;
        // kfac-pytorch accepts a decay of 1 (factors frozen at the identity).
        let decay_ok = match self.compat {
            Compat::Native => (0.0..1.0).contains(&self.factor_decay),
            Compat::KfacPytorch => (0.0..=1.0).contains(&self.factor_decay),
        };
        if !(self.factor_decay.is_finite() && decay_ok) {
            return Err(Error::InvalidConfig {
                field: "factor_decay",
                reason: format!(
                    "{} is not in [0, 1) ([0, 1] in kfac-pytorch mode)",
                    self.factor_decay
                ),
            });
        }
        if let Some(k) = self.kl_clip {
            if !(k.is_finite() && k > 0.0) {
                return Err(Error::InvalidConfig {
                    field: "kl_clip",
                    reason: format!("{k} is not a finite value > 0"),
                });
            }
        }
        if self.factor_update_steps == 0 {
            return Err(Error::InvalidConfig {
                field: "factor_update_steps",
                reason: "must be >= 1".into(),
            });
        }
        if self.inv_update_steps == 0 {
            return Err(Error::InvalidConfig {
                field: "inv_update_steps",
                reason: "must be >= 1".into(),
            });
        }
        if !(self.grad_worker_fraction.is_finite()
            && self.grad_worker_fraction > 0.0
            && self.grad_worker_fraction <= 1.0)
        {
            return Err(Error::InvalidConfig {
                field: "grad_worker_fraction",
                reason: format!("{} is not in (0, 1]", self.grad_worker_fraction),
            });
        }
        if self.threads > 4096 {
            return Err(Error::InvalidConfig {
                field: "threads",
                reason: format!("{} threads is unreasonable (max 4096)", self.threads),
            });
        }
        if !(self.refresh_tolerance.is_finite() && self.refresh_tolerance >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "refresh_tolerance",
                reason: format!("{} is not finite and >= 0", self.refresh_tolerance),
            });
        }
        if self.memory_budget == Some(0) {
            return Err(Error::InvalidConfig {
                field: "memory_budget",
                reason: "a budget of 0 bytes admits nothing (None for no limit)".into(),
            });
        }
        Ok(())
    }
}
