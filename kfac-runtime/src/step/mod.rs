//! `Preconditioner::step` as a sequence of phases, each in its own module:
//!
//! | phase | computes (locally) | then exchanges |
//! |---|---|---|
//! | [`plan`] | due updates, damping, lr, `xi`; factor owners and gradient-worker groups | — |
//! | [`validate`] | the gradients' shapes and values; observations present | agreement: every rank's verdict and configuration digest |
//! | [`factors`] | new factors `xi F + (1 - xi) acc / weight` | statistics summed first (one collective); status round |
//! | [`invert`] | decompositions / inverses of the factors this rank owns | status round; each result to its layer's group; status round |
//! | [`precondition`] | `V` for the layers of this rank's groups | status round; `V` from each lead to the ranks outside its group |
//! | [`clip`] | KL-clipping factor `nu` | — |
//! | [`commit`] | writes the new state and `nu V` over the gradients | — |
//!
//! Every collective goes through [`Exchange`], which does nothing for a
//! world of one, so the phases have no single-process special cases, and
//! which makes every rank fail together (see `exchange`). Nothing is
//! written before `commit`: an error leaves the state and the caller's
//! gradients untouched.

mod clip;
mod commit;
mod factors;
mod invert;
mod plan;
mod precondition;
mod validate;

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::distributed;
use crate::exchange::Exchange;
use crate::layer::LayerGrad;
use crate::preconditioner::Preconditioner;
use crate::state::LayerState;
use crate::stats::{StageTimes, StepStats};
use crate::Result;
use commit::Outcome;

/// What the phases read.
pub(crate) struct Ctx<'a> {
    pub(crate) layers: &'a [LayerState],
    pub(crate) cfg: &'a Config,
    pub(crate) pool: &'a rayon::ThreadPool,
    /// Inversion scratch, one per pool thread plus one (see
    /// `Preconditioner::inv_scratch`).
    pub(crate) inv_scratch: &'a [crate::state::Scratch],
}

/// Wall time of `f` minus the communication time it spent.
fn timed<T>(ex: &mut Exchange<'_>, f: impl FnOnce(&mut Exchange<'_>) -> T) -> (T, Duration) {
    let (t0, c0) = (Instant::now(), ex.traffic.time);
    let out = f(ex);
    let comm = ex.traffic.time.saturating_sub(c0);
    (out, t0.elapsed().saturating_sub(comm))
}

impl Preconditioner {
    /// One K-FAC step: updates the factors when due, recomputes the
    /// inverses when due (always on the first step), preconditions every
    /// gradient in place (weights and biases), applies KL clipping, and
    /// returns the step's statistics.
    ///
    /// Gradients of excluded layers may be passed and are left unchanged.
    /// With several ranks, every rank calls `step` with its own
    /// observations and the same (already averaged) gradients; factor
    /// statistics are summed across ranks, each factor is decomposed by its
    /// owner and shared (see [`Config::grad_worker_fraction`]).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`](crate::Error::UnknownLayer), [`Error::MissingGradient`](crate::Error::MissingGradient),
    /// [`Error::Mismatch`](crate::Error::Mismatch) (shapes, a layer passed twice),
    /// [`Error::MissingObservation`](crate::Error::MissingObservation) when a factor update is due and a layer
    /// was not observed, [`Error::NonFinite`](crate::Error::NonFinite) (NaN/Inf gradients),
    /// [`Error::Kernel`](crate::Error::Kernel) (a decomposition that fails), [`Error::Distributed`](crate::Error::Distributed) (another rank
    /// refused its arguments, or the ranks' configurations differ),
    /// [`Error::RankFailed`](crate::Error::RankFailed) (another rank failed
    /// its part of the step: every rank returns together),
    /// [`Error::Comm`](crate::Error::Comm). The state and the gradients are
    /// unchanged on error, with one exception: when the factor update or an
    /// inversion fails in a step that updates the factors (on any rank), the
    /// statistics observed since the last step are discarded (they caused
    /// it, or would be mixed into every later attempt), the previous
    /// factors and decompositions stay in use, and the error is
    /// [`Error::StatisticsDiscarded`](crate::Error::StatisticsDiscarded)
    /// around the cause; the next step with new observations can succeed.
    /// Running out of memory ([`ErrorKind::OutOfMemory`](crate::ErrorKind::OutOfMemory),
    /// on any rank) discards nothing: the step can be retried as it was.
    pub fn step(&mut self, grads: &mut [LayerGrad<'_>]) -> Result<StepStats> {
        run(self, grads)
    }
}

/// Whether `e` is running out of memory, on this rank or on another.
fn out_of_memory(e: &crate::Error) -> bool {
    use crate::{Error, ErrorKind};
    e.kind() == ErrorKind::OutOfMemory
        || matches!(
            e,
            Error::RankFailed {
                kind: ErrorKind::OutOfMemory,
                ..
            }
        )
}

/// One step (see [`Preconditioner::step`] for the contract).
pub(crate) fn run(p: &mut Preconditioner, grads: &mut [LayerGrad<'_>]) -> Result<StepStats> {
    let t_start = Instant::now();
    let plan = plan::Plan::new(
        &p.config,
        p.factor_update_due(),
        p.inverse_update_due(),
        p.damping(),
        p.lr(),
        p.factor_updates,
    );
    let pre_step_comm = std::mem::take(&mut p.comm_time);
    let t_observe = std::mem::take(&mut p.observe_time);
    let mut ex = Exchange::new(&mut *p.comm);
    let ctx = Ctx {
        layers: &p.layers,
        cfg: &p.config,
        pool: &p.pool,
        inv_scratch: &p.inv_scratch,
    };
    let roles = plan::Roles::new(
        ctx.layers,
        ctx.cfg.grad_worker_fraction,
        ex.world(),
        ex.rank(),
    );

    // Set when the factor or inversion phase fails (on this rank or, by the
    // phase's status round, on another: every rank sees the same).
    let mut numeric_failure = false;
    let outcome: Result<(Outcome, [Duration; 3], invert::Refreshes)> = (|| {
        // The statistics to sum are packed (allocated) before the
        // agreement, so that running out of memory is settled with it.
        let world = ex.world();
        let local = validate::gradients(ctx.layers, grads, plan.factor_due)
            .and_then(|index| Ok((index, factors::outgoing(&ctx, &plan, world)?)));
        let (index, out) = ex.agree(local, || distributed::digest(ctx.cfg, ctx.layers))?;
        let (new_factors, t_factor) = timed(&mut ex, |ex| factors::run(&ctx, &plan, out, ex));
        numeric_failure = new_factors.is_err();
        let new_factors = new_factors?;
        let (new_inv, t_inv) = timed(&mut ex, |ex| {
            invert::run(&ctx, &plan, &roles, &new_factors, ex)
        });
        numeric_failure = new_inv.is_err();
        let (new_inv, kept) = new_inv?;
        let (results, t_prec) = timed(&mut ex, |ex| {
            precondition::run(&ctx, &roles, plan.damping, &new_inv, grads, &index, ex)
        });
        let results = results?;
        let (clipped, t_clip) = timed(&mut ex, |_| clip::run(&results, ctx.cfg.kl_clip, plan.lr));
        let (vg, nu) = clipped?;
        let outcome = Outcome {
            index,
            new_factors,
            new_inv,
            results,
            vg,
            nu,
        };
        Ok((outcome, [t_factor, t_inv, t_prec + t_clip], kept))
    })();
    let traffic = ex.traffic;
    let (outcome, [t_factor, t_inv, t_prec], kept) = match outcome {
        Ok(o) => o,
        Err(e)
            if numeric_failure
                && plan.factor_due
                && !matches!(e, crate::Error::Comm(_))
                && !out_of_memory(&e) =>
        {
            // Without this a bad statistic (an overflowing sum across
            // ranks, an indefinite caller-made statistic) would be mixed
            // into every later update and the preconditioner would never
            // recover. Every rank takes this branch together. Running out
            // of memory is not the statistics' fault: they are kept, and
            // the step can be retried.
            for l in &mut p.layers {
                l.acc.clear();
            }
            return Err(crate::Error::StatisticsDiscarded { cause: Box::new(e) });
        }
        Err(e) => return Err(e),
    };
    let (vg, nu) = (outcome.vg, outcome.nu);
    commit::run(&mut p.layers, outcome, plan.inv_due, grads);
    if plan.factor_due {
        p.factor_updates += 1;
    }
    p.steps += 1;
    let stats = StepStats {
        step: p.steps - 1,
        factors_updated: plan.factor_due,
        inverses_updated: plan.inv_due,
        kl_scale: nu,
        vg_sum: vg,
        vg_sum_lr2: plan.lr * plan.lr * vg,
        damping: plan.damping,
        lr: plan.lr,
        times: StageTimes {
            factor_update: t_factor + t_observe,
            inversion: t_inv,
            preconditioning: t_prec,
            communication: traffic.time + pre_step_comm,
            total: t_start.elapsed() + t_observe,
        },
        bytes_sent: traffic.bytes_sent,
        bytes_received: traffic.bytes_received,
        state_bytes: p.state_bytes(),
        decompositions_kept: kept.kept,
        decompositions_refined: kept.refined,
    };
    log::debug!(
        "kfac: step {} factors={} inverses={} nu={:.4} times {:?}",
        stats.step,
        plan.factor_due,
        plan.inv_due,
        nu,
        stats.times
    );
    p.last = Some(stats.clone());
    Ok(stats)
}
