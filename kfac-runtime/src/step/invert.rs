//! Phase "invert": when an inversion is due, each factor is decomposed
//! (eigen method) or inverted (inverse method) by its owner only, all
//! owners in parallel, and within an owner largest factor first on the
//! pool's threads (LPT); after a status round the results go to the members
//! of each layer's gradient-worker group, which assemble the layer's
//! inverse cache (with the precomputed denominators when configured).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::state::Scratch;
use faer::{Mat, Par};
use kfac_kernels::{eigen, inverse};
use rayon::prelude::*;

use crate::config::{Compat, Config, Method, Precision};
use crate::distributed;
use crate::exchange::Exchange;
use crate::mem;
use crate::observe::unreachable_diag;
use crate::state::{Factor, FactorInv, InverseCache};
use crate::{Error, Result};

use super::factors::NewFactors;
use super::plan::{Plan, Roles};
use super::Ctx;

fn kerr(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
    Error::kernel(layer)
}

/// How many of this rank's factors refreshed their old eigenbasis at an
/// inversion instead of decomposing again.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Refreshes {
    /// Kept (with or without new eigenvalue estimates).
    pub kept: usize,
    /// Refined.
    pub refined: usize,
}

/// New inverse caches per layer (`None`: excluded, not a member of the
/// layer's group, or no inversion due), and how many of this rank's
/// factors refreshed their old eigenbasis.
pub(crate) fn run(
    ctx: &Ctx<'_>,
    plan: &Plan,
    roles: &Roles,
    new_factors: &NewFactors,
    ex: &mut Exchange<'_>,
) -> Result<(Vec<Option<InverseCache>>, Refreshes)> {
    let layers = ctx.layers;
    let nl = layers.len();
    if !plan.inv_due {
        return Ok(((0..nl).map(|_| None).collect(), Refreshes::default()));
    }
    let cfg = ctx.cfg;
    let factor_of = |t: usize| -> &Factor {
        let li = t / 2;
        match (&new_factors[li], t % 2) {
            (Some((a, _)), 0) => a,
            (Some((_, g)), _) => g,
            (None, 0) => &layers[li].a,
            (None, _) => &layers[li].g,
        }
    };
    let eig = cfg.method == Method::Eigen;
    let ex_world = ex.world();
    // Factors whose old eigenbasis was kept (with or without new
    // eigenvalue estimates) or refined (`Config::refresh_tolerance`).
    let kept = AtomicUsize::new(0);
    let refined = AtomicUsize::new(0);

    // Local: the factors this rank owns.
    let local = (|| {
        let shifts: Vec<(f32, f32)> = (0..nl)
            .map(|li| {
                if layers[li].excluded || eig {
                    Ok((0.0, 0.0))
                } else {
                    inverse_shifts(
                        &layers[li].name,
                        factor_of(2 * li),
                        factor_of(2 * li + 1),
                        cfg,
                        plan.damping,
                    )
                }
            })
            .collect::<Result<_>>()?;
        let precision = precisions(ctx, plan, roles, &factor_of)?;
        let mut tasks: Vec<usize> = (0..2 * nl)
            .filter(|&t| !layers[t / 2].excluded && roles.owns(t))
            .collect();
        // Largest first (LPT list scheduling, within 4/3 of the optimal
        // makespan): in registration order the largest factors (a
        // network's last layers) came last and finished alone. Stable, so
        // equal sizes keep their order.
        tasks.sort_by_key(|&t| std::cmp::Reverse(factor_dim(factor_of(t))));
        let threads = ctx.pool.current_num_threads();
        let workers = threads.min(tasks.len());
        // Work left from each position of the queue on (the measured cost
        // model `distributed::dense_cost`, ~ n^3 for large n): a
        // task larger than a thread's share of what is left runs with every
        // thread (`wide`). A lone factor always does; of three equal large
        // factors on two threads, the third does, once the first two ran
        // side by side (LPT alone would leave one thread idle for all of
        // it). A second worker that is still busy joins the parallel
        // solver's work when it comes back to the queue.
        let costs: Vec<f64> = tasks
            .iter()
            .map(|&t| distributed::dense_cost(factor_dim(factor_of(t))) as f64)
            .collect();
        let wide = wide_tasks(&costs, threads);
        let wide = |k: usize| wide[k];
        let next = AtomicUsize::new(0);
        let done: Vec<Vec<(usize, Result<FactorInv>)>> = ctx.pool.install(|| {
            (0..workers)
                .into_par_iter()
                .map(|w| {
                    // Worker `w` takes the next task in LPT order until none
                    // is left, with scratch `w`: keyed by worker, not by
                    // thread, so a thread that runs two workers (one
                    // stolen while the other waits inside a parallel
                    // solver) never shares a buffer.
                    let scratch = &ctx.inv_scratch[w.min(ctx.inv_scratch.len() - 1)];
                    let mut out = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&t) = tasks.get(k) else {
                            break;
                        };
                        let li = t / 2;
                        let shift = if t % 2 == 0 {
                            shifts[li].0
                        } else {
                            shifts[li].1
                        };
                        let th = if wide(k) { threads } else { 1 };
                        let name = &layers[li].name;
                        let r = match refresh_basis(
                            &layers[li],
                            t,
                            factor_of(t),
                            factor_of(t ^ 1),
                            cfg,
                            plan.damping,
                            th,
                            scratch,
                        ) {
                            Ok(Some((r, how))) => {
                                let counter = match how {
                                    Refreshed::Refined => &refined,
                                    Refreshed::Reused | Refreshed::Kept => &kept,
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                Ok(r)
                            }
                            Ok(None) => invert_one(
                                name,
                                factor_of(t),
                                cfg,
                                precision[li],
                                shift,
                                th,
                                scratch,
                            ),
                            Err(e) => Err(e),
                        }
                        .map_err(mem::in_layer(name));
                        out.push((t, r));
                    }
                    out
                })
                .collect()
        });
        // The error of the first failing factor in layer order, whichever
        // worker met it first.
        let mut mine: Vec<(usize, Result<FactorInv>)> = done.into_iter().flatten().collect();
        mine.sort_by_key(|(t, _)| *t);
        let mine: Vec<(usize, FactorInv)> = mine
            .into_iter()
            .map(|(t, r)| r.map(|r| (t, r)))
            .collect::<Result<_>>()?;
        let mut results: Vec<Option<FactorInv>> = (0..2 * nl).map(|_| None).collect();
        for (t, r) in mine {
            results[t] = Some(r);
        }
        // One buffer for every share below (the largest factor result),
        // allocated before the status round: every rank can take part.
        let buf_len = if ex_world > 1 {
            (0..2 * nl)
                .filter(|&t| !layers[t / 2].excluded)
                .map(|t| distributed::inv_len(factor_of(t), eig))
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        let buf = mem::filled(buf_len, 0.0f32, "decompositions shared with other ranks")?;
        Ok((results, buf))
    })();
    let (mut results, mut buf) = ex.settle(local)?;

    // Exchange: each factor from its owner to the members of its group.
    // A receiver that cannot store what it received records the error and
    // keeps taking part; the status round below fails the step everywhere.
    let mut received_ok: Result<()> = Ok(());
    for (t, slot) in results.iter_mut().enumerate() {
        let li = t / 2;
        if layers[li].excluded || ex_world == 1 {
            continue;
        }
        let f = factor_of(t);
        let len = distributed::inv_len(f, eig);
        let mut received = None;
        ex.share(
            &mut buf[..len],
            roles.owner(t),
            roles.member(li),
            |out| match slot.as_ref() {
                Some(r) => distributed::inv_write(r, out),
                // Cannot happen (the owner computed it); NaN is refused by
                // the receivers' finiteness checks.
                None => out.fill(f32::NAN),
            },
            |v| {
                let what = format!("layer '{}': received decomposition", layers[li].name);
                match distributed::inv_read(f, eig, v, &what) {
                    Ok(r) => received = Some(r),
                    Err(e) => {
                        if received_ok.is_ok() {
                            received_ok = Err(e);
                        }
                    }
                }
            },
        )?;
        if received.is_some() {
            *slot = received;
        }
    }
    drop(buf);

    // Local: the caches of the layers this rank preconditions.
    let mut it = results.into_iter();
    let local: Result<Vec<Option<InverseCache>>> = received_ok.and_then(|()| {
        (0..nl)
            .map(|li| {
                let (a, g) = (it.next().flatten(), it.next().flatten());
                match (a, g) {
                    (Some(a), Some(g)) if roles.member(li) => {
                        assemble(&layers[li].name, a, g, cfg, plan.damping).map(Some)
                    }
                    _ => Ok(None),
                }
            })
            .collect()
    });
    ex.settle(local).map(|v| {
        (
            v,
            Refreshes {
                kept: kept.into_inner(),
                refined: refined.into_inner(),
            },
        )
    })
}

/// Eigendecomposition of a dense factor in the configured precision; in
/// kfac-pytorch mode with `eigen::sym_eigen_reference` (faer's default
/// solver), so those results never change with our solver's tuning.
fn eig(
    name: &str,
    m: &Mat<f32>,
    precision: Precision,
    compat: Compat,
    par: Par,
    scratch: &Scratch,
) -> Result<(Mat<f32>, Vec<f32>)> {
    let n = m.nrows();
    let reference = compat == Compat::KfacPytorch;
    match precision {
        Precision::F32 => {
            let what = format!("layer '{name}': eigenvectors");
            let mut q = mem::zeros::<f32>(n, n, &what)?;
            let mut l = mem::filled(n, 0.0f32, &what)?;
            let (solve, need) = solver::<f32>(reference, n, par);
            scratch.with(need, |stack| {
                solve(m.as_ref(), &mut l, q.as_mut(), par, stack).map_err(kerr(name))
            })?;
            Ok((q, l))
        }
        Precision::F64 | Precision::Auto => {
            let what = format!("layer '{name}': f64 eigendecomposition");
            let w = mem::from_fn::<f64>(n, n, &what, |i, j| m[(i, j)] as f64)?;
            let mut q = mem::zeros::<f64>(n, n, &what)?;
            let mut l = mem::filled(n, 0.0f64, &what)?;
            let (solve, need) = solver::<f64>(reference, n, par);
            scratch.with(need, |stack| {
                solve(w.as_ref(), &mut l, q.as_mut(), par, stack).map_err(kerr(name))
            })?;
            drop(w);
            let what = format!("layer '{name}': eigenvectors");
            let q32 = mem::from_fn::<f32>(n, n, &what, |i, j| q[(i, j)] as f32)?;
            let mut l32 = mem::with_capacity(n, &what)?;
            l32.extend(l.into_iter().map(|v| v as f32));
            Ok((q32, l32))
        }
    }
}

/// The signature of the kernels' eigensolvers.
type EigFn<T> = fn(
    faer::MatRef<'_, T>,
    &mut [T],
    faer::MatMut<'_, T>,
    Par,
    &mut faer::dyn_stack::MemStack,
) -> kfac_kernels::Result<()>;

/// The eigensolver of [`eig`] and its scratch for an `n x n` factor.
fn solver<T: kfac_kernels::Real>(
    reference: bool,
    n: usize,
    par: Par,
) -> (EigFn<T>, faer::dyn_stack::StackReq) {
    if reference {
        (
            eigen::sym_eigen_reference,
            eigen::sym_eigen_reference_scratch::<T>(n, par),
        )
    } else {
        (eigen::sym_eigen, eigen::sym_eigen_scratch::<T>(n, par))
    }
}

/// Which tasks of a queue in LPT order (costs given) run with all
/// `threads`: those costing more than a thread's share of the work left
/// from them on.
fn wide_tasks(costs: &[f64], threads: usize) -> Vec<bool> {
    let mut left = costs.to_vec();
    for k in (0..left.len().saturating_sub(1)).rev() {
        left[k] += left[k + 1];
    }
    costs
        .iter()
        .zip(&left)
        .map(|(&c, &l)| threads > 1 && c * threads as f64 > l)
        .collect()
}

/// The eigendecomposition precision of each layer at this inversion:
/// [`Precision::resolve`] of the configured one, from estimates of the
/// largest eigenvalues of both factors (computed, in parallel, only for
/// the layers with a factor this rank owns; the estimate is deterministic,
/// so every owner decides alike).
fn precisions<'f>(
    ctx: &Ctx<'_>,
    plan: &Plan,
    roles: &Roles,
    factor_of: &(dyn Fn(usize) -> &'f Factor + Sync),
) -> Result<Vec<Precision>> {
    let layers = ctx.layers;
    let p = ctx.cfg.eigen_precision;
    if p != Precision::Auto || ctx.cfg.method != Method::Eigen {
        return Ok(vec![p; layers.len()]);
    }
    let lambda = |f: &Factor| -> Result<f64> {
        match f {
            Factor::Diag(d) => Ok(d.iter().fold(0.0f64, |m, &v| m.max(v as f64))),
            Factor::Dense(m) => {
                let req = eigen::largest_eigenvalue_estimate_scratch(m.nrows());
                let mut buf = faer::dyn_stack::MemBuffer::try_new(req)
                    .map_err(|_| mem::oom("eigenvalue estimate", req.size_bytes()))?;
                Ok(eigen::largest_eigenvalue_estimate(
                    m.as_ref(),
                    Precision::AUTO_POWER_ITERATIONS,
                    faer::dyn_stack::MemStack::new(&mut buf),
                )?)
            }
        }
    };
    ctx.pool.install(|| {
        (0..layers.len())
            .into_par_iter()
            .map(|li| {
                let l = &layers[li];
                if l.excluded || !(roles.owns(2 * li) || roles.owns(2 * li + 1)) {
                    return Ok(Precision::F64);
                }
                let la = lambda(factor_of(2 * li)).map_err(mem::in_layer(&l.name))?;
                let lg = lambda(factor_of(2 * li + 1)).map_err(mem::in_layer(&l.name))?;
                Ok(p.resolve(la, lg, plan.damping))
            })
            .collect()
    })
}

/// The order of a factor (its cost grows as its cube; a diagonal factor
/// costs next to nothing).
fn factor_dim(f: &Factor) -> usize {
    match f {
        Factor::Dense(m) => m.nrows(),
        Factor::Diag(_) => 0,
    }
}

fn par_for(threads: usize) -> Par {
    if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    }
}

/// The diagonal shifts `(A, G)` of the inverse method: factored Tikhonov
/// (native) or the full damping on each factor (kfac-pytorch).
fn inverse_shifts(
    name: &str,
    a: &Factor,
    g: &Factor,
    cfg: &Config,
    damping: f64,
) -> Result<(f32, f32)> {
    let d32 = damping as f32;
    let Factor::Dense(gm) = g else {
        unreachable_diag()
    };
    match cfg.compat {
        Compat::KfacPytorch => Ok((d32, d32)),
        Compat::Native => {
            let fd =
                match a {
                    Factor::Dense(am) => inverse::factored_damping(am.as_ref(), gm.as_ref(), d32)
                        .map_err(kerr(name))?,
                    Factor::Diag(dv) => inverse::factored_damping_diag_a(dv, gm.as_ref(), d32)
                        .map_err(kerr(name))?,
                };
            Ok((fd.a, fd.g))
        }
    }
}

/// How a factor's eigendecomposition was refreshed without decomposing it
/// again (`Config::refresh_tolerance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refreshed {
    /// The old basis and eigenvalues, as they were.
    Reused,
    /// The old basis with new eigenvalue estimates.
    Kept,
    /// The old basis refined by one step, with new eigenvalue estimates.
    Refined,
}

/// Probe vectors of the reuse test (see
/// [`eigen::eigenbasis_change_estimate`]: with 32, twice the estimate is
/// below the true change with probability below `1e-5`).
const REUSE_PROBES: usize = 32;

/// Columns of the drift sample ([`eigen::eigenbasis_drift_sample`]):
/// those of the largest old eigenvalues.
const DRIFT_COLUMNS: usize = 32;

/// The old eigendecomposition of factor task `t` (of layer `l`) refreshed
/// for the new factor `f` when `Config::refresh_tolerance` allows (see
/// there), from the cheapest test on: reused as it is, kept with new
/// eigenvalue estimates, or refined by one step; `None` when none is within
/// the tolerance, or when there is no old basis on this rank.
#[allow(clippy::too_many_arguments)]
fn refresh_basis(
    l: &crate::state::LayerState,
    t: usize,
    f: &Factor,
    partner_now: &Factor,
    cfg: &Config,
    damping: f64,
    threads: usize,
    scratch: &Scratch,
) -> Result<Option<(FactorInv, Refreshed)>> {
    if cfg.refresh_tolerance == 0.0 || cfg.compat != Compat::Native || cfg.method != Method::Eigen {
        return Ok(None);
    }
    let Factor::Dense(m) = f else {
        return Ok(None);
    };
    let Some(InverseCache::Eigen { qa, la, qg, lg, .. }) = &l.inv else {
        return Ok(None);
    };
    let (q, old_l, partner) = if t.is_multiple_of(2) {
        (qa.as_ref(), la, lg)
    } else {
        (Some(qg), lg, la)
    };
    let Some(q) = q else {
        return Ok(None);
    };
    let n = m.nrows();
    if q.nrows() != n || old_l.len() != n {
        return Ok(None);
    }
    // The partner's largest eigenvalue: at its last decomposition, or now
    // (a power-iteration estimate of its new factor) if larger. A partner
    // that was zero says nothing about how much this factor's error will
    // matter once it is not: decompose.
    let partner_then = partner.iter().fold(0.0f64, |a, &v| a.max(v as f64));
    if partner_then <= 0.0 || partner_then.is_nan() {
        return Ok(None);
    }
    let partner_now = match partner_now {
        Factor::Diag(d) => d.iter().fold(0.0f64, |a, &v| a.max(v as f64)),
        Factor::Dense(pm) => {
            let req = eigen::largest_eigenvalue_estimate_scratch(pm.nrows());
            scratch.with(req, |stack| {
                eigen::largest_eigenvalue_estimate(
                    pm.as_ref(),
                    Precision::AUTO_POWER_ITERATIONS,
                    stack,
                )
                .map_err(kerr(&l.name))
            })?
        }
    };
    let partner = partner_then.max(partner_now);
    // The absolute error `‖F - Q diag(l) Q^T‖` allowed. NaN (cannot
    // happen for finite inputs) refreshes nothing.
    let limit = cfg.refresh_tolerance * damping / partner;
    if limit.is_nan() || limit <= 0.0 {
        return Ok(None);
    }
    let name = &l.name;
    let what = format!("layer '{name}': refreshed eigenbasis");
    let par = par_for(if n > 512 { threads } else { 1 });
    // Reuse: a randomized estimate, O(n^2); the probe sequence depends on
    // the factor's index only, so repeated runs decide alike.
    let req = eigen::eigenbasis_change_estimate_scratch::<f32>(n, REUSE_PROBES);
    let change = scratch.with(req, |stack| {
        eigen::eigenbasis_change_estimate(
            m.as_ref(),
            q.as_ref(),
            old_l,
            REUSE_PROBES,
            t as u64,
            par,
            stack,
        )
        .map_err(kerr(name))
    })?;
    if 2.0 * change <= limit {
        let q = mem::from_fn(n, n, &what, |i, j| q[(i, j)])?;
        let mut l = mem::with_capacity(n, &what)?;
        l.extend_from_slice(old_l);
        return Ok(Some((
            FactorInv::Eigen { q: Some(q), l },
            Refreshed::Reused,
        )));
    }
    // Can neither keeping nor refining serve? The columns of Q^T F Q of
    // the largest old eigenvalues (where a covariance's drift
    // concentrates), O(n^2): the drift they hold, and the refinement's
    // bound on their entries alone, each a lower estimate. (A wrong call
    // costs time, never accuracy.)
    let mut top: Vec<usize> = mem::with_capacity(n, &what)?;
    top.extend(0..n);
    top.sort_by(|&i, &j| old_l[j].total_cmp(&old_l[i]));
    top.truncate(DRIFT_COLUMNS);
    let req = eigen::eigenbasis_drift_sample_scratch::<f32>(n, top.len());
    let sample = scratch.with(req, |stack| {
        eigen::eigenbasis_drift_sample(m.as_ref(), q.as_ref(), old_l, &top, par, stack)
            .map_err(kerr(name))
    })?;
    if sample.drift > limit && sample.refine_bound > limit {
        log::debug!("kfac: {name} factor {t}: limit {limit:.3e}, {sample:?}: decomposing");
        return Ok(None);
    }
    // Keep or refine: exact, 3 n^3 flops, 3 more to refine.
    let mut q = mem::from_fn(n, n, &what, |i, j| q[(i, j)])?;
    let mut est = mem::filled(n, 0.0f32, &what)?;
    let r = scratch.with(eigen::refresh_eigenbasis_scratch::<f32>(n, par), |stack| {
        // A basis used as if orthogonal changes a damped inverse by about
        // its loss of orthogonality (relative): at most the tolerance.
        let orth = cfg.refresh_tolerance;
        eigen::refresh_eigenbasis(m.as_ref(), q.as_mut(), &mut est, limit, orth, par, stack)
            .map_err(kerr(name))
    })?;
    log::debug!("kfac: {name} factor {t}: limit {limit:.3e}, {r:?}");
    let how = match r.kind {
        eigen::RefreshKind::Kept => Refreshed::Kept,
        eigen::RefreshKind::Refined => Refreshed::Refined,
        _ => return Ok(None),
    };
    Ok(Some((FactorInv::Eigen { q: Some(q), l: est }, how)))
}

/// Decomposes or inverts one factor (`shift` is used by the inverse method).
fn invert_one(
    name: &str,
    f: &Factor,
    cfg: &Config,
    precision: Precision,
    shift: f32,
    threads: usize,
    scratch: &Scratch,
) -> Result<FactorInv> {
    // faer's eigh/Cholesky slow down with a second thread below ~512.
    let par = |d: usize| par_for(if d > 512 { threads } else { 1 });
    match (cfg.method, f) {
        (Method::Eigen, Factor::Dense(m)) => {
            let (q, l) = eig(name, m, precision, cfg.compat, par(m.nrows()), scratch)?;
            Ok(FactorInv::Eigen { q: Some(q), l })
        }
        (Method::Eigen, Factor::Diag(d)) => {
            let mut l = mem::filled(d.len(), 0.0f32, &format!("layer '{name}': eigenvalues"))?;
            eigen::clamp_eigenvalues_diag(&mut l, d).map_err(kerr(name))?;
            Ok(FactorInv::Eigen { q: None, l })
        }
        (Method::Inverse, Factor::Dense(m)) => {
            let d = m.nrows();
            let mut inv = mem::zeros::<f32>(d, d, &format!("layer '{name}': inverse"))?;
            scratch.with(inverse::damped_inverse_scratch::<f32>(d, par(d)), |stack| {
                inverse::damped_inverse(inv.as_mut(), m.as_ref(), shift, par(d), stack)
                    .map_err(kerr(name))
            })?;
            Ok(FactorInv::Inv(Factor::Dense(inv)))
        }
        (Method::Inverse, Factor::Diag(dv)) => {
            let mut out = mem::filled(dv.len(), 0.0f32, &format!("layer '{name}': inverse"))?;
            inverse::damped_inverse_diag(&mut out, dv, shift).map_err(kerr(name))?;
            Ok(FactorInv::Inv(Factor::Diag(out)))
        }
    }
}

/// Builds a layer's inverse cache from its two factor results (and the
/// precomputed denominators when configured).
fn assemble(
    name: &str,
    a: FactorInv,
    g: FactorInv,
    cfg: &Config,
    damping: f64,
) -> Result<InverseCache> {
    match (a, g) {
        (FactorInv::Eigen { q: qa, l: la }, FactorInv::Eigen { q: Some(qg), l: lg }) => {
            let denom = if cfg.precompute_denominators {
                let mut d = mem::zeros::<f32>(
                    lg.len(),
                    la.len(),
                    &format!("layer '{name}': eigenvalue denominators"),
                )?;
                eigen::eigen_inverse_denominators(d.as_mut(), &lg, &la, damping as f32)
                    .map_err(kerr(name))?;
                Some(d)
            } else {
                None
            };
            Ok(InverseCache::Eigen {
                qa,
                la,
                qg,
                lg,
                denom,
            })
        }
        (FactorInv::Inv(a_inv), FactorInv::Inv(Factor::Dense(g_inv))) => {
            Ok(InverseCache::Inverse { a_inv, g_inv })
        }
        _ => Err(Error::mismatch(name, "inconsistent factor results".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::wide_tasks;

    #[test]
    fn large_tasks_at_the_tail_of_the_queue_get_every_thread() {
        // A lone factor; nothing to parallelize on one thread.
        assert_eq!(wide_tasks(&[8.0], 2), [true]);
        assert_eq!(wide_tasks(&[8.0], 1), [false]);
        // Three equal large factors and small ones on two threads: the
        // first two side by side, the third with both threads (and the
        // last nonzero one, alone at the tail).
        assert_eq!(
            wide_tasks(&[100.0, 100.0, 100.0, 10.0, 10.0, 0.0], 2),
            [false, false, true, false, true, false]
        );
        // Many similar factors: no task is wide until the last.
        assert_eq!(
            wide_tasks(&[5.0, 5.0, 5.0, 5.0], 2),
            [false, false, false, true]
        );
        assert_eq!(wide_tasks(&[0.0, 0.0], 2), [false, false]);
    }
}
