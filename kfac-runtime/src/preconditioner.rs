//! The K-FAC preconditioner: the layer registry, configuration and
//! counters, `observe` (see `observe`) and `step` (see `step`, one module
//! per phase). This file holds the public type and its small accessors;
//! the math lives in kfac-kernels, the collectives in `exchange`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faer::prelude::ReborrowMut;
use rayon::prelude::*;

use crate::comm::{Communicator, Local};
use crate::config::{Config, Schedule};
use crate::layer::{LayerGrad, LayerId, LayerKind, Observation};
use crate::mem::MemBudget;
use crate::observe::{
    accumulate, observe_layer, scratch_need, validate_observation, Checked, ObserveMode,
};
use crate::state::{inversion_bytes, planned_bytes, LayerState, Scratch};
use crate::stats::StepStats;
use crate::{Error, Result};

/// The K-FAC preconditioner of one process (see the crate docs for an
/// example).
pub struct Preconditioner {
    pub(crate) config: Config,
    pub(crate) layers: Vec<LayerState>,
    pub(crate) names: HashMap<String, usize>,
    /// Completed steps.
    pub(crate) steps: u64,
    /// Completed factor updates (`k` of `xi_k`).
    pub(crate) factor_updates: u64,
    /// Current damping and learning rate (for `Schedule::PerStep`).
    pub(crate) damping_now: f64,
    pub(crate) lr_now: f64,
    /// The caller's loss scale (AMP): observed output gradients are
    /// divided by it. 1 unless set.
    pub(crate) grad_scale: f64,
    pub(crate) pool: rayon::ThreadPool,
    /// Scratch of the inversion kernels: one per pool thread plus one,
    /// grown to the largest factor a thread has inverted, reused by every
    /// later inversion (bounded by `(threads + 1)` x the scratch of the
    /// largest factor).
    pub(crate) inv_scratch: Vec<Scratch>,
    /// The memory budget ([`Config::memory_budget`]) and what is charged.
    pub(crate) budget: Arc<MemBudget>,
    /// Bytes charged for the inversion scratch (every pool thread plus
    /// one, at the largest factor).
    pub(crate) inv_charged: usize,
    /// Time in `observe` since the last step (reported with the step).
    pub(crate) observe_time: Duration,
    /// Time in collectives outside `step` (gradient averaging) since the
    /// last step.
    pub(crate) comm_time: Duration,
    pub(crate) last: Option<StepStats>,
    pub(crate) comm: Box<dyn Communicator>,
}

impl std::fmt::Debug for Preconditioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preconditioner")
            .field("config", &self.config)
            .field("layers", &self.layers.len())
            .field("steps", &self.steps)
            .finish()
    }
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kfac-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            reason: e.to_string(),
        })
}

/// Empty inversion scratch for each thread of `pool`, plus one.
fn inv_scratch(pool: &rayon::ThreadPool) -> Result<Vec<Scratch>> {
    // Charged in advance, at registration (`charge_layer`).
    (0..=pool.current_num_threads())
        .map(|_| Scratch::new(faer::dyn_stack::StackReq::EMPTY, None))
        .collect()
}

impl Preconditioner {
    /// A preconditioner with no layers yet.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad configuration,
    /// [`Error::ThreadPool`] if the pool cannot be built.
    pub fn new(config: Config) -> Result<Self> {
        let (damping, lr) = (config.damping.at(0), config.lr.at(0));
        let budget = Arc::new(MemBudget::new(config.memory_budget));
        Self::from_parts(config, budget, Vec::new(), 0, 0, damping, lr, 1.0)
    }

    /// Charges the budget for a layer of `kind`, given the layers already
    /// charged (`existing`): its planned state, and the growth of the
    /// inversion scratch reserve when it has the largest factor so far.
    /// Returns `(layer bytes, new inversion reserve)`.
    ///
    /// # Errors
    /// [`Error::MemoryBudget`] (nothing charged).
    pub(crate) fn charge_layer<'a>(
        config: &Config,
        budget: &MemBudget,
        name: &str,
        kind: &LayerKind,
        existing: impl Iterator<Item = &'a LayerKind>,
        inv_charged: usize,
        threads: usize,
    ) -> Result<(usize, usize)> {
        let dense = |k: &LayerKind| {
            let (d_out, d) = k.dims();
            if k.diagonal_a() {
                d_out
            } else {
                d_out.max(d)
            }
        };
        let largest = existing.map(dense).chain([dense(kind)]).max().unwrap_or(0);
        let reserve = inversion_bytes(largest, config).saturating_mul(threads + 1);
        let grow = reserve.saturating_sub(inv_charged);
        let mine = planned_bytes(kind, config);
        let what =
            format!("layer '{name}' (factors, accumulators, decompositions and inversion scratch)");
        budget.charge(mine.saturating_add(grow), &what)?;
        Ok((mine, inv_charged.max(reserve)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        config: Config,
        budget: Arc<MemBudget>,
        layers: Vec<LayerState>,
        steps: u64,
        factor_updates: u64,
        damping_now: f64,
        lr_now: f64,
        grad_scale: f64,
    ) -> Result<Self> {
        config.validate()?;
        let pool = build_pool(config.threads)?;
        let names = layers
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.clone(), i))
            .collect();
        let mut inv_charged = 0;
        for (i, l) in layers.iter().enumerate() {
            let (_, reserve) = Self::charge_layer(
                &config,
                &budget,
                &l.name,
                &l.kind,
                layers[..i].iter().map(|l| &l.kind),
                inv_charged,
                pool.current_num_threads(),
            )?;
            inv_charged = reserve;
        }
        Ok(Self {
            config,
            layers,
            names,
            steps,
            factor_updates,
            damping_now,
            lr_now,
            grad_scale,
            inv_scratch: inv_scratch(&pool)?,
            budget,
            inv_charged,
            pool,
            observe_time: Duration::ZERO,
            comm_time: Duration::ZERO,
            last: None,
            comm: Box::new(Local::new()),
        })
    }

    /// A preconditioner that cooperates with the other ranks of `comm`
    /// (see [`step`](Self::step)). Every rank must register the same layers
    /// in the same order with the same configuration (checked at each step).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_communicator(config: Config, comm: Box<dyn Communicator>) -> Result<Self> {
        let mut p = Self::new(config)?;
        p.comm = comm;
        Ok(p)
    }

    /// Replaces the communicator (e.g. after [`load`](Self::load)).
    pub fn set_communicator(&mut self, comm: Box<dyn Communicator>) {
        self.comm = comm;
    }

    /// Takes the communicator out (leaving a single-process one), e.g. to
    /// reuse a group for another preconditioner.
    pub fn take_communicator(&mut self) -> Box<dyn Communicator> {
        std::mem::replace(&mut self.comm, Box::new(Local::new()))
    }

    /// This process's rank and the world size.
    pub fn rank_and_size(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.size())
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of completed steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Number of registered layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The id of the layer registered under `name`.
    pub fn layer_id(&self, name: &str) -> Option<LayerId> {
        self.names.get(name).map(|&i| LayerId(i))
    }

    /// The kind of a layer.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`].
    pub fn layer_kind(&self, id: LayerId) -> Result<&LayerKind> {
        Ok(&self.layer(id)?.kind)
    }

    pub(crate) fn layer(&self, id: LayerId) -> Result<&LayerState> {
        self.layers.get(id.0).ok_or(Error::UnknownLayer {
            id: id.0,
            registered: self.layers.len(),
        })
    }

    /// Registers a layer under a unique name. Layers named in
    /// `config.exclude` are registered but not preconditioned.
    ///
    /// # Errors
    /// [`Error::DuplicateLayer`], [`Error::InvalidLayer`],
    /// [`Error::LayersFrozen`] after the first step.
    pub fn register(&mut self, name: &str, kind: LayerKind) -> Result<LayerId> {
        if self.steps > 0 {
            return Err(Error::LayersFrozen);
        }
        if self.names.contains_key(name) {
            return Err(Error::DuplicateLayer {
                name: name.to_string(),
            });
        }
        kind.validate(name)?;
        let excluded = self.config.exclude.iter().any(|e| e == name);
        let id = self.layers.len();
        let (mine, reserve) = Self::charge_layer(
            &self.config,
            &self.budget,
            name,
            &kind,
            self.layers.iter().map(|l| &l.kind),
            self.inv_charged,
            self.pool.current_num_threads(),
        )?;
        let charged = mine + (reserve - self.inv_charged);
        let layer = match LayerState::new(
            name.to_string(),
            kind,
            excluded,
            self.config.compat,
            &self.budget,
        ) {
            Ok(l) => l,
            Err(e) => {
                self.budget.release(charged);
                return Err(e);
            }
        };
        self.inv_charged = reserve;
        self.layers.push(layer);
        self.names.insert(name.to_string(), id);
        log::debug!("kfac: registered layer {id} '{name}'");
        Ok(LayerId(id))
    }

    /// Whether the next `step` updates the factors (observations made
    /// before a step that does not are discarded; callers may skip
    /// `observe` then).
    pub fn factor_update_due(&self) -> bool {
        self.steps.is_multiple_of(self.config.factor_update_steps)
    }

    /// Whether the next `step` recomputes the inverses.
    pub fn inverse_update_due(&self) -> bool {
        self.steps.is_multiple_of(self.config.inv_update_steps)
    }

    /// Sets the damping of the next steps (for `Schedule::PerStep`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless the schedule is `PerStep` and the
    /// value finite and `> 0`.
    pub fn set_damping(&mut self, damping: f64) -> Result<()> {
        self.damping_now = per_step_value(&self.config.damping, "damping", damping, true)?;
        Ok(())
    }

    /// Sets the learning rate of the next steps (for `Schedule::PerStep`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless the schedule is `PerStep` and the
    /// value finite and `>= 0`.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.lr_now = per_step_value(&self.config.lr, "lr", lr, false)?;
        Ok(())
    }

    /// Sets the loss scale of mixed-precision training (kfac-pytorch's
    /// `grad_scaler`): output gradients observed from now on are divided by
    /// `scale` before their statistics are taken, so the G factors see the
    /// unscaled gradients (`G` statistics are multiplied by `1 / scale^2`,
    /// exactly when `scale` is a power of two, as AMP scales are). The
    /// weight gradients passed to `step` must already be unscaled. Saved in
    /// checkpoints; 1 by default.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless `scale` is finite and `> 0` and
    /// `1 / scale^2` is a finite non-zero f32.
    pub fn set_grad_scale(&mut self, scale: f64) -> Result<()> {
        let g = 1.0 / (scale * scale);
        if !(scale.is_finite() && scale > 0.0 && (g as f32).is_normal()) {
            return Err(Error::InvalidConfig {
                field: "grad_scale",
                reason: format!("{scale} is not a finite scale > 0 with 1/scale^2 a normal f32"),
            });
        }
        self.grad_scale = scale;
        Ok(())
    }

    /// The loss scale set by [`set_grad_scale`](Self::set_grad_scale).
    pub fn grad_scale(&self) -> f64 {
        self.grad_scale
    }

    fn observe_mode(&self) -> ObserveMode {
        ObserveMode {
            compat: self.config.compat,
            ignore_conv_dilation: self.config.ignore_conv_dilation,
            grad_scale: self.grad_scale,
        }
    }

    fn current(&self, s: &Schedule, now: f64) -> f64 {
        match s {
            Schedule::PerStep(_) => now,
            other => other.at(self.steps),
        }
    }

    /// Damping used by the next step.
    pub fn damping(&self) -> f64 {
        self.current(&self.config.damping, self.damping_now)
    }

    /// Learning rate used by the next step's KL clipping.
    pub fn lr(&self) -> f64 {
        self.current(&self.config.lr, self.lr_now)
    }

    /// Adds one micro-batch of statistics for a layer. May be called several
    /// times per step: the statistics are combined exactly as if one large
    /// batch had been seen (kfac-pytorch mode: their mean).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::Mismatch`] for an observation of
    /// another kind or wrong sizes, [`Error::NonFinite`] for NaN/Inf,
    /// [`Error::Overflow`] for an observation so large that the f32 factor
    /// statistics could overflow (an entry bound, computed in f64 from the
    /// inputs' sums of squares, above `f32::MAX / 4`; its kind is
    /// [`ErrorKind::NonFinite`](crate::ErrorKind::NonFinite)). The state is
    /// unchanged on error.
    pub fn observe(&mut self, layer: LayerId, obs: Observation<'_>) -> Result<()> {
        let t0 = Instant::now();
        let mode = self.observe_mode();
        let n = self.layers.len();
        let l = self.layers.get_mut(layer.0).ok_or(Error::UnknownLayer {
            id: layer.0,
            registered: n,
        })?;
        observe_layer(l, obs, mode)?;
        self.observe_time += t0.elapsed();
        Ok(())
    }

    /// [`observe`](Self::observe) for several layers at once, in parallel on
    /// the pool. All observations are validated first (in parallel too);
    /// on error nothing is recorded. Unknown ids and a layer listed twice
    /// are reported first, then the first observation in `obs`'s order
    /// that fails validation.
    ///
    /// # Errors
    /// As [`observe`](Self::observe); also a layer listed twice.
    pub fn observe_all(&mut self, obs: &[(LayerId, Observation<'_>)]) -> Result<()> {
        let t0 = Instant::now();
        let mode = self.observe_mode();
        // Which observation each layer gets (ids and duplicates, serially:
        // cheap), then the NaN/Inf scans in parallel, then the statistics.
        let nl = self.layers.len();
        let mut slot: Vec<Option<usize>> = vec![None; nl];
        for (k, (id, _)) in obs.iter().enumerate() {
            let s = slot.get_mut(id.0).ok_or(Error::UnknownLayer {
                id: id.0,
                registered: nl,
            })?;
            if s.is_some() {
                return Err(Error::mismatch(
                    &self.layers[id.0].name,
                    "observed twice in one observe_all".into(),
                ));
            }
            *s = Some(k);
        }
        let layers = &self.layers;
        let checked: Vec<Result<Checked<'_>>> = self.pool.install(|| {
            obs.par_iter()
                .map(|(id, o)| validate_observation(&layers[id.0], o, mode))
                .collect()
        });
        // The first error in the caller's order, whatever finished first.
        let checked: Vec<Checked<'_>> = checked.into_iter().collect::<Result<_>>()?;
        // Every layer's kernel scratch grown first (the only allocation of
        // accumulating, and it may fail): an error leaves every
        // accumulator as it was.
        for (l, k) in self.layers.iter().zip(&slot) {
            if let Some(k) = k {
                l.scratch.reserve(scratch_need(l, &checked[*k])?)?;
            }
        }
        self.pool.install(|| {
            self.layers
                .par_iter_mut()
                .zip(slot.par_iter())
                .try_for_each(|(l, k)| match k {
                    Some(k) => accumulate(l, checked[*k], mode),
                    None => Ok(()),
                })
        })?;
        self.observe_time += t0.elapsed();
        Ok(())
    }

    /// Statistics of the last completed step.
    pub fn last_stats(&self) -> Option<&StepStats> {
        self.last.as_ref()
    }

    /// Bytes of state held (factors, accumulators, inverse caches).
    pub fn state_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// Bytes charged to the memory budget: every layer's planned state,
    /// the inversion scratch reserve and kernel scratch (see
    /// [`Config::memory_budget`]). Counted with or without a budget.
    ///
    /// ```
    /// use kfac_runtime::{Config, LayerKind, Preconditioner};
    /// let cfg = Config { memory_budget: Some(1 << 20), ..Config::default() };
    /// let mut p = Preconditioner::new(cfg).unwrap();
    /// p.register("fc", LayerKind::Linear { in_features: 32, out_features: 16, bias: true }).unwrap();
    /// assert!(p.memory_charged() > 0 && p.memory_charged() <= 1 << 20);
    /// // A layer whose state cannot fit is refused, with the bytes it needs.
    /// let e = p.register("big", LayerKind::Linear { in_features: 4096, out_features: 16, bias: false });
    /// assert!(e.unwrap_err().to_string().contains("memory budget exceeded"));
    /// ```
    pub fn memory_charged(&self) -> usize {
        self.budget.used()
    }

    /// The memory budget ([`Config::memory_budget`]); `None`: no limit.
    pub fn memory_budget(&self) -> Option<usize> {
        self.budget.limit()
    }

    /// Averages gradients across ranks (`sum / P`) in place, for training
    /// stacks that do not average them themselves: one allreduce over every
    /// layer's weight and bias gradients.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`] / [`Error::Mismatch`] for bad gradients,
    /// [`Error::Comm`] when the collective fails; gradients are unchanged
    /// on error.
    pub fn allreduce_gradients(&mut self, grads: &mut [LayerGrad<'_>]) -> Result<()> {
        for g in grads.iter() {
            let l = self.layer(g.layer)?;
            let (r, c) = l.kind.weight_shape();
            if g.weight.nrows() != r || g.weight.ncols() != c {
                return Err(Error::mismatch(
                    &l.name,
                    format!("weight gradient is not {r}x{c}"),
                ));
            }
        }
        let world = self.comm.size();
        if world == 1 {
            return Ok(());
        }
        let mut buf = Vec::new();
        for g in grads.iter() {
            for j in 0..g.weight.ncols() {
                for i in 0..g.weight.nrows() {
                    buf.push(g.weight[(i, j)]);
                }
            }
            if let Some(b) = g.bias.as_deref() {
                buf.extend_from_slice(b);
            }
        }
        let t0 = Instant::now();
        self.comm.allreduce_f32(&mut buf)?;
        self.comm_time += t0.elapsed();
        let inv = 1.0 / world as f32;
        let mut k = 0;
        for g in grads.iter_mut() {
            let mut w = g.weight.rb_mut();
            for j in 0..w.ncols() {
                for i in 0..w.nrows() {
                    w[(i, j)] = buf[k] * inv;
                    k += 1;
                }
            }
            if let Some(b) = g.bias.as_deref_mut() {
                for x in b.iter_mut() {
                    *x = buf[k] * inv;
                    k += 1;
                }
            }
        }
        Ok(())
    }
}

/// A caller-supplied value for a `Schedule::PerStep` field, validated like
/// the schedule itself.
fn per_step_value(schedule: &Schedule, field: &'static str, v: f64, positive: bool) -> Result<f64> {
    if !matches!(schedule, Schedule::PerStep(_)) {
        return Err(Error::InvalidConfig {
            field,
            reason: format!("setting {field} per step needs Schedule::PerStep"),
        });
    }
    Schedule::PerStep(v).validate(field, positive)?;
    Ok(v)
}
