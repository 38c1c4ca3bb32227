//! Per-step statistics and stage timings.

use std::time::Duration;

/// Wall time of each stage of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// Factor statistics (the `observe` calls since the previous step) and
    /// the running-average update.
    pub factor_update: Duration,
    /// Eigendecompositions or Cholesky inversions.
    pub inversion: Duration,
    /// Preconditioning and KL clipping.
    pub preconditioning: Duration,
    /// Collectives (zero in a single process).
    pub communication: Duration,
    /// The whole `step` call plus the `observe` calls since the previous
    /// step (so it bounds every stage above).
    pub total: Duration,
}

/// What a step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Index of the step (0 for the first).
    pub step: u64,
    /// Whether the factors were updated.
    pub factors_updated: bool,
    /// Whether the inverses were recomputed.
    pub inverses_updated: bool,
    /// KL-clipping factor `nu` applied to every preconditioned gradient.
    pub kl_scale: f64,
    /// `Σ_l <V_l, grad_l>` before clipping.
    pub vg_sum: f64,
    /// `lr² Σ_l <V_l, grad_l>`: kfac-pytorch's `vg_sum` (its KL-clipping
    /// sum includes the learning rate squared), for comparing runs.
    pub vg_sum_lr2: f64,
    /// Damping used.
    pub damping: f64,
    /// Learning rate used for KL clipping.
    pub lr: f64,
    /// Stage wall times.
    pub times: StageTimes,
    /// Payload bytes this rank sent in the step's collectives (its
    /// statistics, the decompositions and preconditioned gradients it
    /// broadcast as owner or lead; status rounds not counted). Zero in a
    /// single process. See `distributed` in ARCHITECTURE.md for the
    /// per-step formulas.
    pub bytes_sent: u64,
    /// Payload bytes this rank received and kept in the step's collectives.
    pub bytes_received: u64,
    /// Bytes of state held after the step.
    pub state_bytes: usize,
    /// Factors of this rank whose old eigenbasis was kept (as it was, or
    /// with new eigenvalue estimates) at this step's inversion instead of
    /// decomposing them again
    /// ([`Config::refresh_tolerance`](crate::Config::refresh_tolerance)).
    pub decompositions_kept: usize,
    /// Factors of this rank whose old eigenbasis was refined by one step
    /// at this step's inversion instead of decomposing them again
    /// ([`Config::refresh_tolerance`](crate::Config::refresh_tolerance)).
    pub decompositions_refined: usize,
}
