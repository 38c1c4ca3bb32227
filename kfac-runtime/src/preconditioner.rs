//! The K-FAC preconditioner: layer registry, `observe`, and `step`.
//!
//! A step runs in phases, and nothing is committed until every phase has
//! succeeded, so an error leaves the state exactly as it was:
//!
//! 1. validate the gradients (every preconditioned layer exactly once, right
//!    shapes, finite) and, when a factor update is due, that every layer was
//!    observed;
//! 2. new factors `F' = xi F + (1 - xi) acc / weight` (into new buffers);
//! 3. when an inversion is due, new inverse caches from `F'`;
//! 4. preconditioned gradients `V` into per-layer buffers, and the
//!    KL-clipping factor `nu` from `Σ <V, grad>`;
//! 5. commit: swap in `F'` and the caches, clear the accumulators, write
//!    `nu V` over the caller's gradients.
//!
//! Phases 2-4 run one task per layer on the preconditioner's rayon pool.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use kfac_kernels::conv::{self, ConvNormalization, ImageRef};
use kfac_kernels::{eigen, factor, inverse, kl, packed};
use rayon::prelude::*;

use crate::comm::{Communicator, Local};
use crate::config::{Compat, Config, Method, Precision, Schedule, WirePrecision};
use crate::distributed;
use crate::layer::{LayerGrad, LayerId, LayerKind, Observation};
use crate::state::{Accumulator, Factor, InverseCache};
use crate::stats::{StageTimes, StepStats};
use crate::{Error, Result};

/// A read-only view of a caller's gradient: weight and optional bias.
type GradView<'a> = (MatRef<'a, f32>, Option<&'a [f32]>);

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
}

impl LayerState {
    pub(crate) fn new(name: String, kind: LayerKind, excluded: bool, compat: Compat) -> Self {
        let (d_out, d) = kind.dims();
        let diag = kind.diagonal_a();
        let (a, g) = match compat {
            Compat::Native => (Factor::zeros(d, diag), Factor::zeros(d_out, false)),
            Compat::KfacPytorch => (Factor::identity(d, diag), Factor::identity(d_out, false)),
        };
        Self {
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
        }
    }

    fn bytes(&self) -> usize {
        self.a.bytes()
            + self.g.bytes()
            + self.acc.bytes()
            + self.inv.as_ref().map_or(0, |i| i.bytes())
    }
}

/// The K-FAC preconditioner of one process (see the crate docs for an
/// example).
pub struct Preconditioner {
    pub(crate) config: Config,
    pub(crate) layers: Vec<LayerState>,
    names: HashMap<String, usize>,
    /// Completed steps.
    pub(crate) steps: u64,
    /// Completed factor updates (`k` of `xi_k`).
    pub(crate) factor_updates: u64,
    /// Current damping and learning rate (for `Schedule::PerStep`).
    pub(crate) damping_now: f64,
    pub(crate) lr_now: f64,
    pool: rayon::ThreadPool,
    observe_time: Duration,
    comm_time: Duration,
    last: Option<StepStats>,
    comm: Box<dyn Communicator>,
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

fn kerr(layer: &str) -> impl FnOnce(kfac_kernels::Error) -> Error + '_ {
    Error::kernel(layer)
}

impl Preconditioner {
    /// A preconditioner with no layers yet.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad configuration,
    /// [`Error::ThreadPool`] if the pool cannot be built.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        let pool = build_pool(config.threads)?;
        Ok(Self {
            damping_now: config.damping.at(0),
            lr_now: config.lr.at(0),
            config,
            layers: Vec::new(),
            names: HashMap::new(),
            steps: 0,
            factor_updates: 0,
            pool,
            observe_time: Duration::ZERO,
            comm_time: Duration::ZERO,
            last: None,
            comm: Box::new(Local::new()),
        })
    }

    pub(crate) fn from_parts(
        config: Config,
        layers: Vec<LayerState>,
        steps: u64,
        factor_updates: u64,
        damping_now: f64,
        lr_now: f64,
    ) -> Result<Self> {
        config.validate()?;
        let pool = build_pool(config.threads)?;
        let names = layers
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.clone(), i))
            .collect();
        Ok(Self {
            config,
            layers,
            names,
            steps,
            factor_updates,
            damping_now,
            lr_now,
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

    fn layer(&self, id: LayerId) -> Result<&LayerState> {
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
        self.layers.push(LayerState::new(
            name.to_string(),
            kind,
            excluded,
            self.config.compat,
        ));
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
    /// another kind or wrong sizes, [`Error::NonFinite`] for NaN/Inf. The state
    /// is unchanged on error.
    pub fn observe(&mut self, layer: LayerId, obs: Observation<'_>) -> Result<()> {
        let t0 = Instant::now();
        let compat = self.config.compat;
        let n = self.layers.len();
        let l = self.layers.get_mut(layer.0).ok_or(Error::UnknownLayer {
            id: layer.0,
            registered: n,
        })?;
        observe_layer(l, obs, compat)?;
        self.observe_time += t0.elapsed();
        Ok(())
    }

    /// [`observe`](Self::observe) for several layers at once, in parallel on
    /// the pool. All observations are validated first; on error nothing is
    /// recorded.
    ///
    /// # Errors
    /// As [`observe`](Self::observe); also a layer listed twice.
    pub fn observe_all(&mut self, obs: &[(LayerId, Observation<'_>)]) -> Result<()> {
        let t0 = Instant::now();
        let compat = self.config.compat;
        let mut slot: Vec<Option<Observation<'_>>> = vec![None; self.layers.len()];
        for (id, o) in obs {
            let n = self.layers.len();
            let s = slot.get_mut(id.0).ok_or(Error::UnknownLayer {
                id: id.0,
                registered: n,
            })?;
            if s.is_some() {
                return Err(Error::mismatch(
                    &self.layers[id.0].name,
                    "observed twice in one observe_all".into(),
                ));
            }
            validate_observation(&self.layers[id.0], o)?;
            *s = Some(*o);
        }
        self.pool.install(|| {
            self.layers
                .par_iter_mut()
                .zip(slot.par_iter())
                .try_for_each(|(l, o)| match o {
                    Some(o) => observe_layer(l, *o, compat),
                    None => Ok(()),
                })
        })?;
        self.observe_time += t0.elapsed();
        Ok(())
    }

    /// Copies of a layer's current factors `(A, G)` as full symmetric
    /// matrices (a diagonal A expanded), for inspection and tests.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`].
    pub fn factors(&self, id: LayerId) -> Result<(Mat<f32>, Mat<f32>)> {
        let l = self.layer(id)?;
        let full = |f: &Factor| match f {
            Factor::Dense(m) => m.clone(),
            Factor::Diag(d) => {
                Mat::from_fn(d.len(), d.len(), |i, j| if i == j { d[i] } else { 0.0 })
            }
        };
        Ok((full(&l.a), full(&l.g)))
    }

    /// Statistics of the last completed step.
    pub fn last_stats(&self) -> Option<&StepStats> {
        self.last.as_ref()
    }

    /// Bytes of state held (factors, accumulators, inverse caches).
    pub fn state_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// Checks the gradients passed to `step`; returns, per layer, the index
    /// of its gradient.
    fn validate_step(
        &self,
        grads: &[LayerGrad<'_>],
        factor_due: bool,
    ) -> Result<Vec<Option<usize>>> {
        let nl = self.layers.len();
        let mut index: Vec<Option<usize>> = vec![None; nl];
        for (gi, g) in grads.iter().enumerate() {
            let l = self.layers.get(g.layer.0).ok_or(Error::UnknownLayer {
                id: g.layer.0,
                registered: nl,
            })?;
            if index[g.layer.0].is_some() {
                return Err(Error::mismatch(&l.name, "gradient passed twice".into()));
            }
            index[g.layer.0] = Some(gi);
            if l.excluded {
                continue;
            }
            validate_grad(l, g)?;
        }
        for (l, ix) in self.layers.iter().zip(&index) {
            if !l.excluded && ix.is_none() {
                return Err(Error::MissingGradient {
                    layer: l.name.clone(),
                });
            }
        }
        if factor_due {
            if let Some(l) = self.layers.iter().find(|l| !l.excluded && l.acc.count == 0) {
                return Err(Error::MissingObservation {
                    layer: l.name.clone(),
                });
            }
        }
        Ok(index)
    }

    /// Every rank's validation status and configuration digest, exchanged
    /// in one allgather: a failure or a mismatch anywhere is an error on
    /// every rank.
    fn agree(&mut self, local: &Result<Vec<Option<usize>>>) -> Result<()> {
        let mut msg = Vec::with_capacity(9);
        msg.push(local.is_err() as u8);
        msg.extend_from_slice(&distributed::digest(&self.config, &self.layers).to_le_bytes());
        let (all, sizes) = self.comm.allgather_bytes(&msg)?;
        let world = self.comm.size();
        if sizes.len() != world || sizes.iter().any(|&s| s != 9) {
            return Err(Error::Distributed {
                reason: format!("malformed agreement message sizes {sizes:?}"),
            });
        }
        let mine = &all[self.comm.rank() * 9 + 1..self.comm.rank() * 9 + 9];
        for r in 0..world {
            let m = &all[r * 9..r * 9 + 9];
            if m[1..] != *mine {
                return Err(Error::Distributed {
                    reason: format!(
                        "rank {r}'s configuration or layer list differs from rank {}'s (digest {:016x} vs {:016x})",
                        self.comm.rank(),
                        u64::from_le_bytes(m[1..9].try_into().unwrap_or([0; 8])),
                        u64::from_le_bytes(mine.try_into().unwrap_or([0; 8]))
                    ),
                });
            }
        }
        if let Some(r) = (0..world).find(|&r| all[r * 9] != 0) {
            if local.is_ok() {
                return Err(Error::Distributed {
                    reason: format!("rank {r} refused its arguments to step; no rank stepped"),
                });
            }
        }
        Ok(())
    }

    /// Sums every layer's accumulated statistics (and weights) across ranks:
    /// one collective for all layers, packed lower triangles, in the
    /// configured wire precision.
    fn reduce_accumulators(&mut self) -> Result<Vec<Option<(Factor, Factor, f64)>>> {
        let mut packed = Vec::new();
        let mut weights = Vec::new();
        for l in self.layers.iter().filter(|l| !l.excluded) {
            distributed::pack(&l.acc.a, &mut packed);
            distributed::pack(&l.acc.g, &mut packed);
            weights.push(l.acc.weight);
        }
        match self.config.wire {
            WirePrecision::F32 => self.comm.allreduce_f32(&mut packed)?,
            wire => {
                let mut half = vec![0u16; packed.len()];
                match wire {
                    WirePrecision::Bf16 => {
                        for (h, &v) in half.iter_mut().zip(&packed) {
                            *h = packed::bf16::from_f32(v).to_bits();
                        }
                    }
                    _ => {
                        for (h, &v) in half.iter_mut().zip(&packed) {
                            *h = packed::f16::from_f32(v).to_bits();
                        }
                    }
                }
                let (all, sizes) = self.comm.allgather_bytes(crate::comm::as_bytes(&half))?;
                if sizes.iter().any(|&s| s != half.len() * 2) {
                    return Err(Error::Distributed {
                        reason: format!("ranks sent statistics of different sizes {sizes:?}"),
                    });
                }
                let n = half.len();
                for (r, chunk) in all.chunks_exact(n * 2).enumerate() {
                    for (k, b) in chunk.chunks_exact(2).enumerate() {
                        let bits = u16::from_le_bytes([b[0], b[1]]);
                        let v = match wire {
                            WirePrecision::Bf16 => packed::bf16::from_bits(bits).to_f32(),
                            _ => packed::f16::from_bits(bits).to_f32(),
                        };
                        // rank order: rank 0's value, then each next rank added
                        packed[k] = if r == 0 { v } else { packed[k] + v };
                    }
                }
            }
        }
        self.comm.allreduce_f64(&mut weights)?;
        let mut out = Vec::with_capacity(self.layers.len());
        let (mut off, mut wi) = (0, 0);
        for l in &self.layers {
            if l.excluded {
                out.push(None);
                continue;
            }
            let na = distributed::packed_len(&l.acc.a);
            let ng = distributed::packed_len(&l.acc.g);
            let a = distributed::unpack(&l.acc.a, &packed[off..off + na]);
            let g = distributed::unpack(&l.acc.g, &packed[off + na..off + na + ng]);
            off += na + ng;
            out.push(Some((a, g, weights[wi])));
            wi += 1;
        }
        Ok(out)
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
    /// [`Error::UnknownLayer`], [`Error::MissingGradient`],
    /// [`Error::Mismatch`] (shapes, a layer passed twice),
    /// [`Error::MissingObservation`] when a factor update is due and a layer
    /// was not observed, [`Error::NonFinite`] (NaN/Inf gradients),
    /// [`Error::Kernel`] (a decomposition that fails), [`Error::Distributed`] (another rank
    /// refused its arguments, or the ranks' configurations differ),
    /// [`Error::Comm`]. The state and the gradients are unchanged on error.
    pub fn step(&mut self, grads: &mut [LayerGrad<'_>]) -> Result<StepStats> {
        let t_start = Instant::now();
        let nl = self.layers.len();
        let world = self.comm.size();
        let me = self.comm.rank();
        let mut t_comm = std::mem::take(&mut self.comm_time);
        let factor_due = self.factor_update_due();

        // Phase 1: validation, and agreement across ranks.
        let local = self.validate_step(grads, factor_due);
        if world > 1 {
            let t0 = Instant::now();
            let agreed = self.agree(&local);
            t_comm += t0.elapsed();
            agreed?;
        }
        let index = local?;
        let inv_due = self.inverse_update_due();
        let damping = self.damping();
        let lr = self.lr();
        let cfg = self.config.clone();
        let xi = match cfg.compat {
            Compat::Native => {
                let k = (self.factor_updates + 1) as f64;
                (1.0 - 1.0 / k).min(cfg.factor_decay)
            }
            Compat::KfacPytorch => cfg.factor_decay,
        };

        // Phase 2: new factors (statistics summed across ranks first).
        let t0 = Instant::now();
        let reduced = if factor_due && world > 1 {
            let tc = Instant::now();
            let r = self.reduce_accumulators()?;
            t_comm += tc.elapsed();
            Some(r)
        } else {
            None
        };
        let new_factors: Vec<Option<(Factor, Factor)>> = if factor_due {
            self.pool.install(|| {
                self.layers
                    .par_iter()
                    .enumerate()
                    .map(|(li, l)| {
                        if l.excluded {
                            return None;
                        }
                        let (aa, ag, w) = match &reduced {
                            Some(r) => {
                                let (a, g, w) = r[li].as_ref()?;
                                (a, g, *w)
                            }
                            None => (&l.acc.a, &l.acc.g, l.acc.weight),
                        };
                        Some((combine(&l.a, aa, w, xi), combine(&l.g, ag, w, xi)))
                    })
                    .collect()
            })
        } else {
            (0..nl).map(|_| None).collect()
        };
        drop(reduced);
        let t_observe = std::mem::take(&mut self.observe_time);
        let t_factor = t0.elapsed() + t_observe;

        // Which layers this rank preconditions, and who leads each layer.
        let gsize = distributed::group_size(cfg.grad_worker_fraction, world);
        let factor_of = |li: usize, which: usize| -> &Factor {
            match &new_factors[li] {
                Some((a, g)) => {
                    if which == 0 {
                        a
                    } else {
                        g
                    }
                }
                None => {
                    if which == 0 {
                        &self.layers[li].a
                    } else {
                        &self.layers[li].g
                    }
                }
            }
        };
        let costs: Vec<u64> = (0..2 * nl)
            .map(|t| {
                if self.layers[t / 2].excluded {
                    0
                } else {
                    distributed::cost(factor_of(t / 2, t % 2))
                }
            })
            .collect();
        let owners = distributed::lpt_owners(&costs, world);
        let lead = |li: usize| owners[2 * li + 1];
        let member = |li: usize| distributed::group_of(lead(li), gsize, world).contains(&me);

        // Phase 3: inversions (each factor by its owner, then shared).
        let t0 = Instant::now();
        let mut t_inv_comm = Duration::ZERO;
        let new_inv: Vec<Option<InverseCache>> = if inv_due {
            let threads = self.pool.current_num_threads();
            let eig = cfg.method == Method::Eigen;
            let shifts: Vec<(f32, f32)> = (0..nl)
                .map(|li| {
                    if self.layers[li].excluded || eig {
                        Ok((0.0, 0.0))
                    } else {
                        inverse_shifts(
                            &self.layers[li].name,
                            factor_of(li, 0),
                            factor_of(li, 1),
                            &cfg,
                            damping,
                        )
                    }
                })
                .collect::<Result<_>>()?;
            let tasks: Vec<usize> = (0..2 * nl)
                .filter(|&t| !self.layers[t / 2].excluded && owners[t] == me)
                .collect();
            let mine: Vec<(usize, FactorInv)> = self.pool.install(|| {
                tasks
                    .par_iter()
                    .map(|&t| {
                        let li = t / 2;
                        let shift = if t % 2 == 0 {
                            shifts[li].0
                        } else {
                            shifts[li].1
                        };
                        let th = if tasks.len() == 1 { threads } else { 1 };
                        invert_one(&self.layers[li].name, factor_of(li, t % 2), &cfg, shift, th)
                            .map(|r| (t, r))
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            let mut results: Vec<Option<FactorInv>> = (0..2 * nl).map(|_| None).collect();
            for (t, r) in mine {
                results[t] = Some(r);
            }
            if world > 1 {
                let tc = Instant::now();
                for t in 0..2 * nl {
                    let li = t / 2;
                    if self.layers[li].excluded {
                        continue;
                    }
                    let f = factor_of(li, t % 2);
                    let len = distributed::inv_len(f, eig);
                    if owners[t] == me {
                        let mut v = results[t]
                            .as_ref()
                            .map(distributed::inv_to_vec)
                            .unwrap_or_default();
                        self.comm.broadcast_f32(&mut v, me)?;
                    } else if member(li) {
                        let mut v = vec![0.0f32; len];
                        self.comm.broadcast_f32(&mut v, owners[t])?;
                        results[t] = Some(distributed::inv_from_vec(f, eig, &v));
                    } else {
                        self.comm.broadcast_discard(len * 4, owners[t])?;
                    }
                }
                t_inv_comm = tc.elapsed();
                t_comm += t_inv_comm;
            }
            let mut out = Vec::with_capacity(nl);
            let mut it = results.into_iter();
            for li in 0..nl {
                let (a, g) = (it.next().flatten(), it.next().flatten());
                out.push(match (a, g) {
                    (Some(a), Some(g)) if member(li) => {
                        Some(assemble(&self.layers[li].name, a, g, &cfg, damping)?)
                    }
                    _ => None,
                });
            }
            out
        } else {
            (0..nl).map(|_| None).collect()
        };
        let t_inv = t0.elapsed().saturating_sub(t_inv_comm);

        // Phase 4: preconditioning into buffers (members of each layer's
        // group), then each layer's result from its lead when f < 1.
        let t0 = Instant::now();
        let views: Vec<Option<GradView<'_>>> = index
            .iter()
            .map(|ix| ix.map(|gi| (grads[gi].weight.rb(), grads[gi].bias.as_deref())))
            .collect();
        let mut results: Vec<Option<(Mat<f32>, f64)>> = self.pool.install(|| {
            self.layers
                .par_iter()
                .enumerate()
                .zip(new_inv.par_iter())
                .zip(views.par_iter())
                .map(|(((li, l), ni), v)| {
                    if l.excluded || !member(li) {
                        return Ok(None);
                    }
                    let Some((w, b)) = v else { return Ok(None) };
                    let cache = match (ni, &l.inv) {
                        (Some(c), _) | (None, Some(c)) => c,
                        (None, None) => {
                            return Err(Error::MissingObservation {
                                layer: l.name.clone(),
                            });
                        }
                    };
                    precondition(l, cache, *w, *b, damping).map(Some)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut t_prec_comm = Duration::ZERO;
        if world > 1 && gsize < world {
            let tc = Instant::now();
            for li in 0..nl {
                let l = &self.layers[li];
                if l.excluded {
                    continue;
                }
                let (d_out, d) = l.kind.dims();
                let root = lead(li);
                if root == me {
                    let (v, _) = results[li].as_ref().ok_or_else(|| Error::Distributed {
                        reason: format!("layer '{}': lead rank has no result", l.name),
                    })?;
                    let mut flat: Vec<f32> = (0..d)
                        .flat_map(|j| (0..d_out).map(move |i| (i, j)))
                        .map(|(i, j)| v[(i, j)])
                        .collect();
                    self.comm.broadcast_f32(&mut flat, me)?;
                } else {
                    let mut flat = vec![0.0f32; d_out * d];
                    self.comm.broadcast_f32(&mut flat, root)?;
                    let v = Mat::from_fn(d_out, d, |i, j| flat[i + j * d_out]);
                    let (w, b) = views[li].ok_or_else(|| Error::MissingGradient {
                        layer: l.name.clone(),
                    })?;
                    let raw = gather(&l.kind, w, b);
                    let dot =
                        kl::frobenius_dot(v.as_ref(), raw.as_ref()).map_err(kerr(&l.name))? as f64;
                    results[li] = Some((v, dot));
                }
            }
            t_prec_comm = tc.elapsed();
            t_comm += t_prec_comm;
        }
        drop(views);
        let vg: f64 = results.iter().flatten().map(|(_, d)| *d).sum();
        let nu = match cfg.kl_clip {
            Some(clip) => kl::kl_clip_scale(vg, lr, clip).map_err(Error::from)?,
            None => 1.0,
        };
        let t_prec = t0.elapsed().saturating_sub(t_prec_comm);

        // Phase 5: commit.
        for ((l, nf), ni) in self.layers.iter_mut().zip(new_factors).zip(new_inv) {
            if let Some((a, g)) = nf {
                l.a = a;
                l.g = g;
            }
            if inv_due && !l.excluded {
                // Non-members drop stale caches (f < 1 saves their memory).
                l.inv = ni;
            }
            l.acc.count = 0;
            l.acc.weight = 0.0;
        }
        let nuf = nu as f32;
        for (l, (ix, r)) in self.layers.iter().zip(index.iter().zip(results)) {
            let (Some(gi), Some((v, _))) = (ix, r) else {
                continue;
            };
            write_back(&l.kind, &mut grads[*gi], v.as_ref(), nuf);
        }
        if factor_due {
            self.factor_updates += 1;
        }
        self.steps += 1;
        let stats = StepStats {
            step: self.steps - 1,
            factors_updated: factor_due,
            inverses_updated: inv_due,
            kl_scale: nu,
            vg_sum: vg,
            damping,
            lr,
            times: StageTimes {
                factor_update: t_factor,
                inversion: t_inv,
                preconditioning: t_prec,
                communication: t_comm,
                total: t_start.elapsed() + t_observe,
            },
            state_bytes: self.state_bytes(),
        };
        log::debug!(
            "kfac: step {} factors={} inverses={} nu={:.4} times {:?}",
            stats.step,
            factor_due,
            inv_due,
            nu,
            stats.times
        );
        self.last = Some(stats.clone());
        Ok(stats)
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

fn finite_mat(layer: &str, what: &str, m: MatRef<'_, f32>) -> Result<()> {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            if !m[(i, j)].is_finite() {
                return Err(Error::non_finite(layer, format!("{what} at ({i}, {j})")));
            }
        }
    }
    Ok(())
}

fn validate_grad(l: &LayerState, g: &LayerGrad<'_>) -> Result<()> {
    let (r, c) = l.kind.weight_shape();
    if g.weight.nrows() != r || g.weight.ncols() != c {
        return Err(Error::mismatch(
            &l.name,
            format!(
                "weight gradient is {}x{}, expected {r}x{c}",
                g.weight.nrows(),
                g.weight.ncols()
            ),
        ));
    }
    finite_mat(&l.name, "weight gradient", g.weight.rb())?;
    match (&g.bias, l.kind.has_bias()) {
        (Some(b), true) => {
            if b.len() != r {
                return Err(Error::mismatch(
                    &l.name,
                    format!("bias gradient has {} values, expected {r}", b.len()),
                ));
            }
            if let Some(i) = b.iter().position(|v| !v.is_finite()) {
                return Err(Error::non_finite(&l.name, format!("bias gradient at {i}")));
            }
        }
        (None, true) => {
            return Err(Error::mismatch(
                &l.name,
                "the layer has a bias but no bias gradient was passed".into(),
            ))
        }
        (Some(_), false) => {
            return Err(Error::mismatch(
                &l.name,
                "a bias gradient was passed for a layer without bias".into(),
            ))
        }
        (None, false) => {}
    }
    Ok(())
}

fn validate_observation(l: &LayerState, obs: &Observation<'_>) -> Result<()> {
    let name = &l.name;
    let (d_out, _) = l.kind.dims();
    match (&l.kind, obs) {
        (
            LayerKind::Linear {
                in_features,
                out_features,
                ..
            },
            Observation::Linear {
                activations,
                output_grads,
            },
        ) => {
            let n = activations.nrows();
            if n == 0 {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            if activations.ncols() != *in_features
                || output_grads.ncols() != *out_features
                || output_grads.nrows() != n
            {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "activations {}x{} / output grads {}x{} do not fit n x {in_features} / n x {out_features}",
                        activations.nrows(),
                        activations.ncols(),
                        output_grads.nrows(),
                        output_grads.ncols()
                    ),
                ));
            }
            finite_mat(name, "activations", *activations)?;
            finite_mat(name, "output grads", *output_grads)?;
        }
        (
            LayerKind::Conv2d(spec),
            Observation::Conv2d {
                input,
                output_grads,
                batch,
                height,
                width,
            },
        ) => {
            let geom = spec.geometry(*batch, *height, *width);
            let (oh, ow) = geom.output_size().map_err(kerr(name))?;
            if *batch == 0 {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            ImageRef::new(
                input,
                spec.layout,
                *batch,
                spec.in_channels,
                *height,
                *width,
            )
            .map_err(kerr(name))?;
            ImageRef::new(output_grads, spec.layout, *batch, spec.out_channels, oh, ow)
                .map_err(kerr(name))?;
            if let Some(i) = input.iter().position(|v| !v.is_finite()) {
                return Err(Error::non_finite(name, format!("input at flat index {i}")));
            }
            if let Some(i) = output_grads.iter().position(|v| !v.is_finite()) {
                return Err(Error::non_finite(
                    name,
                    format!("output grads at flat index {i}"),
                ));
            }
        }
        (
            LayerKind::Embedding {
                num_embeddings,
                dim,
            },
            Observation::Embedding {
                tokens,
                output_grads,
            },
        ) => {
            if tokens.is_empty() {
                return Err(Error::mismatch(name, "empty batch".into()));
            }
            if output_grads.nrows() != tokens.len() || output_grads.ncols() != *dim {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "output grads {}x{} do not fit {} tokens x {dim}",
                        output_grads.nrows(),
                        output_grads.ncols(),
                        tokens.len()
                    ),
                ));
            }
            if let Some(t) = tokens.iter().find(|&&t| t >= *num_embeddings) {
                return Err(Error::mismatch(
                    name,
                    format!("token id {t} >= num_embeddings {num_embeddings}"),
                ));
            }
            finite_mat(name, "output grads", *output_grads)?;
        }
        (LayerKind::Kronecker { a_dim, g_dim }, Observation::Kronecker { a, g, samples }) => {
            if *samples == 0 {
                return Err(Error::mismatch(name, "samples must be >= 1".into()));
            }
            if a.nrows() != *a_dim
                || a.ncols() != *a_dim
                || g.nrows() != *g_dim
                || g.ncols() != *g_dim
            {
                return Err(Error::mismatch(
                    name,
                    format!(
                        "statistics {}x{} / {}x{} do not fit {a_dim}x{a_dim} / {g_dim}x{g_dim}",
                        a.nrows(),
                        a.ncols(),
                        g.nrows(),
                        g.ncols()
                    ),
                ));
            }
            finite_mat(name, "A statistic", *a)?;
            finite_mat(name, "G statistic", *g)?;
        }
        (kind, _) => {
            return Err(Error::mismatch(
                name,
                format!("observation kind does not match the layer ({kind:?}), d_out {d_out}"),
            ))
        }
    }
    Ok(())
}

fn dense(f: &mut Factor) -> MatMut<'_, f32> {
    match f {
        Factor::Dense(m) => m.as_mut(),
        Factor::Diag(_) => unreachable_diag(),
    }
}

#[cold]
fn unreachable_diag() -> ! {
    // Layer kinds fix which factors are diagonal at registration.
    panic!("internal error: diagonal factor used as dense")
}

fn observe_layer(l: &mut LayerState, obs: Observation<'_>, compat: Compat) -> Result<()> {
    validate_observation(l, &obs)?;
    let name = l.name.clone();
    let first = l.acc.count == 0;
    let alpha = if first { 0.0 } else { 1.0 };
    let (beta, add_weight): (f32, f64);
    match obs {
        Observation::Linear {
            activations,
            output_grads,
        } => {
            let n = activations.nrows();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            let bias = l.kind.has_bias();
            let req = factor::syrk_update_scratch::<f32>(n, activations.ncols(), bias, Par::Seq);
            let mut buf = MemBuffer::new(req);
            factor::syrk_update(
                dense(&mut l.acc.a),
                alpha,
                beta,
                activations,
                bias,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
            factor::syrk_update(
                dense(&mut l.acc.g),
                alpha,
                beta,
                output_grads,
                false,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
        }
        Observation::Conv2d {
            input,
            output_grads,
            batch,
            height,
            width,
        } => {
            let LayerKind::Conv2d(spec) = l.kind else {
                return Err(Error::mismatch(&name, "not a conv2d layer".into()));
            };
            let geom = spec.geometry(batch, height, width);
            let (oh, ow) = geom.output_size().map_err(kerr(&name))?;
            let (norm, b, w) = match compat {
                Compat::Native => (ConvNormalization::Kfc, batch as f32, batch as f64),
                Compat::KfacPytorch => (ConvNormalization::KfacPytorch, 1.0, 1.0),
            };
            (beta, add_weight) = (b, w);
            let img = ImageRef::new(input, spec.layout, batch, spec.in_channels, height, width)
                .map_err(kerr(&name))?;
            let gout = ImageRef::new(output_grads, spec.layout, batch, spec.out_channels, oh, ow)
                .map_err(kerr(&name))?;
            let mut buf = MemBuffer::new(
                conv::conv2d_a_update_scratch::<f32>(&geom, spec.bias).map_err(kerr(&name))?,
            );
            conv::conv2d_a_update(
                dense(&mut l.acc.a),
                alpha,
                beta,
                img,
                &geom,
                spec.bias,
                norm,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
            conv::conv2d_g_update(dense(&mut l.acc.g), alpha, beta, gout, norm, Par::Seq)
                .map_err(kerr(&name))?;
        }
        Observation::Embedding {
            tokens,
            output_grads,
        } => {
            let n = tokens.len();
            (beta, add_weight) = match compat {
                Compat::Native => (1.0, n as f64),
                Compat::KfacPytorch => (1.0 / n as f32, 1.0),
            };
            if let Factor::Diag(d) = &mut l.acc.a {
                if first {
                    d.iter_mut().for_each(|v| *v = 0.0);
                }
                for &t in tokens {
                    d[t] += beta;
                }
            }
            let mut buf = MemBuffer::new(StackReq::EMPTY);
            factor::syrk_update(
                dense(&mut l.acc.g),
                alpha,
                beta,
                output_grads,
                false,
                Par::Seq,
                MemStack::new(&mut buf),
            )
            .map_err(kerr(&name))?;
        }
        Observation::Kronecker { a, g, samples } => {
            (beta, add_weight) = match compat {
                Compat::Native => (samples as f32, samples as f64),
                Compat::KfacPytorch => (1.0, 1.0),
            };
            for (dst, src) in [(dense(&mut l.acc.a), a), (dense(&mut l.acc.g), g)] {
                let mut dst = dst;
                for j in 0..src.ncols() {
                    for i in j..src.nrows() {
                        let v = beta * src[(i, j)];
                        dst[(i, j)] = if first { v } else { dst[(i, j)] + v };
                    }
                }
            }
        }
    }
    l.acc.weight += add_weight;
    l.acc.count += 1;
    Ok(())
}

/// `xi F + (1 - xi) acc / weight` as a new full symmetric factor (`acc`
/// holds a lower triangle; `F` is full).
fn combine(f: &Factor, acc: &Factor, weight: f64, xi: f64) -> Factor {
    let c = ((1.0 - xi) / weight) as f32;
    let xi = xi as f32;
    match (f, acc) {
        (Factor::Dense(f), Factor::Dense(acc)) => {
            let n = f.nrows();
            let mut out = Mat::<f32>::zeros(n, n);
            for j in 0..n {
                for i in j..n {
                    let v = xi * f[(i, j)] + c * acc[(i, j)];
                    out[(i, j)] = v;
                    out[(j, i)] = v;
                }
            }
            Factor::Dense(out)
        }
        (Factor::Diag(f), Factor::Diag(acc)) => {
            Factor::Diag(f.iter().zip(acc).map(|(&f, &a)| xi * f + c * a).collect())
        }
        _ => unreachable_diag(),
    }
}

/// Eigendecomposition of a dense factor in the configured precision.
fn eig(name: &str, m: &Mat<f32>, precision: Precision, par: Par) -> Result<(Mat<f32>, Vec<f32>)> {
    let n = m.nrows();
    match precision {
        Precision::F32 => {
            let mut q = Mat::<f32>::zeros(n, n);
            let mut l = vec![0.0f32; n];
            let mut buf = MemBuffer::new(eigen::sym_eigen_scratch::<f32>(n, par));
            eigen::sym_eigen(m.as_ref(), &mut l, q.as_mut(), par, MemStack::new(&mut buf))
                .map_err(kerr(name))?;
            Ok((q, l))
        }
        Precision::F64 => {
            let w = Mat::<f64>::from_fn(n, n, |i, j| m[(i, j)] as f64);
            let mut q = Mat::<f64>::zeros(n, n);
            let mut l = vec![0.0f64; n];
            let mut buf = MemBuffer::new(eigen::sym_eigen_scratch::<f64>(n, par));
            eigen::sym_eigen(w.as_ref(), &mut l, q.as_mut(), par, MemStack::new(&mut buf))
                .map_err(kerr(name))?;
            Ok((
                Mat::from_fn(n, n, |i, j| q[(i, j)] as f32),
                l.into_iter().map(|v| v as f32).collect(),
            ))
        }
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
pub(crate) fn inverse_shifts(
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
            let fd = match a {
                Factor::Dense(am) => {
                    inverse::factored_damping(am.as_ref(), gm.as_ref(), d32).map_err(kerr(name))?
                }
                Factor::Diag(dv) => {
                    // tr A / dim A for a diagonal A, as a 1x1 matrix.
                    let mean = dv.iter().map(|&v| v as f64).sum::<f64>() / dv.len().max(1) as f64;
                    let one = Mat::<f32>::from_fn(1, 1, |_, _| mean as f32);
                    let tg = (0..gm.nrows()).map(|i| gm[(i, i)] as f64).sum::<f64>()
                        / gm.nrows().max(1) as f64;
                    let gone = Mat::<f32>::from_fn(1, 1, |_, _| tg as f32);
                    inverse::factored_damping(one.as_ref(), gone.as_ref(), d32)
                        .map_err(kerr(name))?
                }
            };
            Ok((fd.a, fd.g))
        }
    }
}

/// The inverse-step result of one factor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum FactorInv {
    /// Eigenvectors (`None` for a diagonal factor: the identity) and
    /// eigenvalues.
    Eigen { q: Option<Mat<f32>>, l: Vec<f32> },
    /// The damped inverse.
    Inv(Factor),
}

/// Decomposes or inverts one factor (`shift` is used by the inverse method).
pub(crate) fn invert_one(
    name: &str,
    f: &Factor,
    cfg: &Config,
    shift: f32,
    threads: usize,
) -> Result<FactorInv> {
    // faer's eigh/Cholesky slow down with a second thread below ~512.
    let par = |d: usize| par_for(if d > 512 { threads } else { 1 });
    match (cfg.method, f) {
        (Method::Eigen, Factor::Dense(m)) => {
            let (q, l) = eig(name, m, cfg.eigen_precision, par(m.nrows()))?;
            Ok(FactorInv::Eigen { q: Some(q), l })
        }
        (Method::Eigen, Factor::Diag(d)) => Ok(FactorInv::Eigen {
            q: None,
            l: d.iter().map(|&v| v.max(0.0)).collect(),
        }),
        (Method::Inverse, Factor::Dense(m)) => {
            let d = m.nrows();
            let mut inv = Mat::<f32>::zeros(d, d);
            let mut buf = MemBuffer::new(inverse::damped_inverse_scratch::<f32>(d, par(d)));
            inverse::damped_inverse(
                inv.as_mut(),
                m.as_ref(),
                shift,
                par(d),
                MemStack::new(&mut buf),
            )
            .map_err(kerr(name))?;
            Ok(FactorInv::Inv(Factor::Dense(inv)))
        }
        (Method::Inverse, Factor::Diag(dv)) => {
            let mut out = Vec::with_capacity(dv.len());
            for (i, &v) in dv.iter().enumerate() {
                let s = v + shift;
                if s.is_nan() || s <= 0.0 {
                    return Err(Error::Kernel {
                        layer: Some(name.to_string()),
                        source: kfac_kernels::Error::NotPositiveDefinite {
                            what: "damped diagonal factor",
                            pivot: i,
                            dim: dv.len(),
                        },
                    });
                }
                out.push(1.0 / s);
            }
            Ok(FactorInv::Inv(Factor::Diag(out)))
        }
    }
}

/// Builds a layer's inverse cache from its two factor results (and the
/// precomputed denominators when configured).
pub(crate) fn assemble(
    name: &str,
    a: FactorInv,
    g: FactorInv,
    cfg: &Config,
    damping: f64,
) -> Result<InverseCache> {
    match (a, g) {
        (FactorInv::Eigen { q: qa, l: la }, FactorInv::Eigen { q: Some(qg), l: lg }) => {
            let denom = if cfg.precompute_denominators {
                let mut d = Mat::<f32>::zeros(lg.len(), la.len());
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

/// The internal `d_out x d` gradient (bias as the last column) of a layer.
fn gather(kind: &LayerKind, w: MatRef<'_, f32>, b: Option<&[f32]>) -> Mat<f32> {
    let (d_out, d) = kind.dims();
    match kind {
        LayerKind::Embedding { .. } => Mat::from_fn(d_out, d, |i, j| w[(j, i)]),
        _ => {
            let (_, wc) = kind.weight_shape();
            let mut m = Mat::<f32>::zeros(d_out, d);
            m.as_mut().submatrix_mut(0, 0, d_out, wc).copy_from(w);
            if let Some(b) = b {
                for (i, &v) in b.iter().enumerate() {
                    m[(i, wc)] = v;
                }
            }
            m
        }
    }
}

/// Preconditions one layer's gradient; returns `V` and `<V, grad>`.
fn precondition(
    l: &LayerState,
    cache: &InverseCache,
    w: MatRef<'_, f32>,
    b: Option<&[f32]>,
    damping: f64,
) -> Result<(Mat<f32>, f64)> {
    let name = &l.name;
    let raw = gather(&l.kind, w, b);
    let mut v = raw.clone();
    let (d_out, d) = (v.nrows(), v.ncols());
    let par = Par::Seq;
    match cache {
        InverseCache::Eigen {
            qa,
            la,
            qg,
            lg,
            denom,
        } => match qa {
            Some(qa) => {
                let mut buf =
                    MemBuffer::new(eigen::precondition_eigen_scratch::<f32>(d_out, d, par));
                let stack = MemStack::new(&mut buf);
                match denom {
                    Some(den) => eigen::precondition_eigen_precomputed(
                        v.as_mut(),
                        qg.as_ref(),
                        qa.as_ref(),
                        den.as_ref(),
                        par,
                        stack,
                    ),
                    None => eigen::precondition_eigen(
                        v.as_mut(),
                        qg.as_ref(),
                        lg,
                        qa.as_ref(),
                        la,
                        damping as f32,
                        par,
                        stack,
                    ),
                }
                .map_err(kerr(name))?;
            }
            None => {
                // Diagonal A: Q_A = I.
                let mut t = Mat::<f32>::zeros(d_out, d);
                matmul(
                    t.as_mut(),
                    Accum::Replace,
                    qg.transpose(),
                    raw.as_ref(),
                    1.0,
                    par,
                );
                for j in 0..d {
                    for i in 0..d_out {
                        let s = match denom {
                            Some(den) => den[(i, j)],
                            None => 1.0 / (lg[i] * la[j] + damping as f32),
                        };
                        t[(i, j)] *= s;
                    }
                }
                matmul(
                    v.as_mut(),
                    Accum::Replace,
                    qg.as_ref(),
                    t.as_ref(),
                    1.0,
                    par,
                );
            }
        },
        InverseCache::Inverse { a_inv, g_inv } => match a_inv {
            Factor::Dense(ai) => {
                let mut buf =
                    MemBuffer::new(inverse::precondition_inverse_scratch::<f32>(d_out, d, par));
                inverse::precondition_inverse(
                    v.as_mut(),
                    g_inv.as_ref(),
                    ai.as_ref(),
                    par,
                    MemStack::new(&mut buf),
                )
                .map_err(kerr(name))?;
            }
            Factor::Diag(ai) => {
                matmul(
                    v.as_mut(),
                    Accum::Replace,
                    g_inv.as_ref(),
                    raw.as_ref(),
                    1.0,
                    par,
                );
                for j in 0..d {
                    for i in 0..d_out {
                        v[(i, j)] *= ai[j];
                    }
                }
            }
        },
    }
    let dot = kl::frobenius_dot(v.as_ref(), raw.as_ref()).map_err(kerr(name))? as f64;
    if !dot.is_finite() || !v.col_iter().all(|c| c.iter().all(|x| x.is_finite())) {
        return Err(Error::non_finite(
            name,
            "the preconditioned gradient (damping too small for these factors?)".into(),
        ));
    }
    Ok((v, dot))
}

fn write_back(kind: &LayerKind, g: &mut LayerGrad<'_>, v: MatRef<'_, f32>, nu: f32) {
    match kind {
        LayerKind::Embedding { .. } => {
            let mut w = g.weight.rb_mut();
            for i in 0..w.nrows() {
                for j in 0..w.ncols() {
                    w[(i, j)] = nu * v[(j, i)];
                }
            }
        }
        _ => {
            let (_, wc) = kind.weight_shape();
            let mut w = g.weight.rb_mut();
            for j in 0..wc {
                for i in 0..w.nrows() {
                    w[(i, j)] = nu * v[(i, j)];
                }
            }
            if let Some(b) = g.bias.as_deref_mut() {
                for (i, x) in b.iter_mut().enumerate() {
                    *x = nu * v[(i, wc)];
                }
            }
        }
    }
}
