//! The three optimizers compared by the demo: SGD with momentum, Adam, and
//! K-FAC (the [`kfac_runtime::Preconditioner`] followed by SGD with
//! momentum on the preconditioned gradient).

use faer::Mat;
use kfac_runtime::comm::Communicator;
use kfac_runtime::{Config, LayerGrad, LayerId, LayerKind, Observation, Preconditioner, Schedule};

use super::mlp::{ForwardCache, LinearGrad, Loss, Mlp};
use super::rng::SplitMix64;

/// Which statistics K-FAC's G factors are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FisherKind {
    /// Output gradients for targets sampled from the model's predictive
    /// distribution (one extra backward pass per factor update): the true
    /// Fisher, as in Martens & Grosse (2015). The default.
    Sampled,
    /// The output gradients of the training targets (the "empirical
    /// Fisher"); no extra backward pass.
    Empirical,
}

/// K-FAC's hyper-parameters (the preconditioner's and the outer SGD's).
#[derive(Clone, Debug, PartialEq)]
pub struct KfacSettings {
    /// Learning rate of the SGD step on the preconditioned gradient (also
    /// the learning rate KL clipping assumes).
    pub lr: f64,
    /// Momentum of that SGD step (0 for none).
    pub momentum: f64,
    /// Tikhonov damping of the Fisher blocks.
    pub damping: f64,
    /// Running-average decay of the factors.
    pub factor_decay: f64,
    /// KL-clipping threshold (`None`: no clipping).
    pub kl_clip: Option<f64>,
    /// Factors are updated every this many steps.
    pub factor_update_steps: u64,
    /// Inverses (eigendecompositions) are recomputed every this many steps.
    pub inv_update_steps: u64,
    /// Source of the G statistics.
    pub fisher: FisherKind,
    /// Threads of the preconditioner's pool (1: everything on the caller's
    /// thread, the best choice for layers this small).
    pub threads: usize,
}

impl Default for KfacSettings {
    /// The demo's tuned values for the classifier (see `src/bin/train.rs`):
    /// lr 1, no momentum, damping 1e-3, KL clip 1e-3, factors every step,
    /// inverses every 5 steps, decay 0.95, sampled Fisher, one thread.
    fn default() -> Self {
        Self {
            lr: 1.0,
            momentum: 0.0,
            damping: 1e-3,
            factor_decay: 0.95,
            kl_clip: Some(1e-3),
            factor_update_steps: 1,
            inv_update_steps: 5,
            fisher: FisherKind::Sampled,
            threads: 1,
        }
    }
}

impl KfacSettings {
    /// The preconditioner configuration these settings describe.
    pub fn runtime_config(&self) -> Config {
        Config {
            damping: Schedule::Constant(self.damping),
            factor_decay: self.factor_decay,
            kl_clip: self.kl_clip,
            lr: Schedule::Constant(self.lr),
            factor_update_steps: self.factor_update_steps,
            inv_update_steps: self.inv_update_steps,
            threads: self.threads,
            ..Config::default()
        }
    }
}

/// An optimizer and its hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `v <- momentum v + grad; w <- w - lr v`.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0 for plain SGD).
        momentum: f64,
    },
    /// Adam (Kingma & Ba) with bias correction.
    Adam {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator offset.
        eps: f64,
    },
    /// K-FAC preconditioning, then SGD with momentum.
    Kfac(KfacSettings),
}

impl Optimizer {
    /// A short name: `"SGD"`, `"Adam"` or `"K-FAC"`.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "SGD",
            Optimizer::Adam { .. } => "Adam",
            Optimizer::Kfac(_) => "K-FAC",
        }
    }

    /// The hyper-parameters in one line.
    pub fn describe(&self) -> String {
        match self {
            Optimizer::Sgd { lr, momentum } => format!("lr {lr}, momentum {momentum}"),
            Optimizer::Adam {
                lr, beta1, beta2, ..
            } => format!("lr {lr}, betas ({beta1}, {beta2})"),
            Optimizer::Kfac(k) => format!(
                "lr {}, momentum {}, damping {}, kl_clip {}, decay {}, factors/inverses every {}/{} steps, {:?} Fisher",
                k.lr,
                k.momentum,
                k.damping,
                k.kl_clip.map_or("off".to_string(), |c| c.to_string()),
                k.factor_decay,
                k.factor_update_steps,
                k.inv_update_steps,
                k.fisher
            ),
        }
    }
}

fn zeros_like(mlp: &Mlp) -> Vec<LinearGrad> {
    mlp.layers
        .iter()
        .map(|l| LinearGrad {
            weight: vec![0.0; l.weight.len()],
            bias: vec![0.0; l.bias.len()],
        })
        .collect()
}

/// `(parameter, gradient, slot)` slices of every layer, weights then bias.
fn for_each_slice(
    mlp: &mut Mlp,
    grads: &[LinearGrad],
    slots: &mut [LinearGrad],
    mut f: impl FnMut(&mut [f32], &[f32], &mut [f32]),
) {
    for ((l, g), s) in mlp.layers.iter_mut().zip(grads).zip(slots.iter_mut()) {
        f(&mut l.weight, &g.weight, &mut s.weight);
        f(&mut l.bias, &g.bias, &mut s.bias);
    }
}

fn momentum_step(mlp: &mut Mlp, grads: &[LinearGrad], vel: &mut [LinearGrad], lr: f64, mu: f64) {
    let (lr, mu) = (lr as f32, mu as f32);
    for_each_slice(mlp, grads, vel, |w, g, v| {
        for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            *v = mu * *v + g;
            *w -= lr * *v;
        }
    });
}

/// Cumulative K-FAC stage timings (seconds), from [`kfac_runtime::StepStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KfacTimes {
    /// Factor statistics and running averages (including `observe`).
    pub factor_update: f64,
    /// Eigendecompositions.
    pub inversion: f64,
    /// Preconditioning and KL clipping.
    pub preconditioning: f64,
    /// Collectives (gradient averaging and the distributed step's own;
    /// zero in one process).
    pub communication: f64,
    /// Whole `step` calls plus `observe` calls.
    pub total: f64,
    /// Steps taken.
    pub steps: u64,
    /// Steps that recomputed the inverses.
    pub inversions: u64,
    /// Steps whose update KL clipping shrank (`kl_scale < 1`).
    pub clipped_steps: u64,
}

/// An optimizer's state during training.
pub(crate) enum OptState {
    Sgd {
        lr: f64,
        momentum: f64,
        vel: Vec<LinearGrad>,
    },
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        m: Vec<LinearGrad>,
        v: Vec<LinearGrad>,
        t: i32,
    },
    Kfac {
        settings: KfacSettings,
        precond: Box<Preconditioner>,
        ids: Vec<LayerId>,
        vel: Vec<LinearGrad>,
        rng: SplitMix64,
        times: KfacTimes,
    },
}

impl OptState {
    pub(crate) fn new(
        opt: &Optimizer,
        mlp: &Mlp,
        seed: u64,
        comm: Option<Box<dyn Communicator>>,
    ) -> kfac_runtime::Result<Self> {
        let rank = comm.as_ref().map_or(0, |c| c.rank()) as u64;
        if comm.as_ref().is_some_and(|c| c.size() > 1) && !matches!(opt, Optimizer::Kfac(_)) {
            return Err(kfac_runtime::Error::InvalidConfig {
                field: "optimizer",
                reason: "the demo trains across processes with K-FAC only".into(),
            });
        }
        Ok(match opt {
            Optimizer::Sgd { lr, momentum } => OptState::Sgd {
                lr: *lr,
                momentum: *momentum,
                vel: zeros_like(mlp),
            },
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => OptState::Adam {
                lr: *lr,
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
                m: zeros_like(mlp),
                v: zeros_like(mlp),
                t: 0,
            },
            Optimizer::Kfac(k) => {
                let mut precond = match comm {
                    Some(c) => Preconditioner::with_communicator(k.runtime_config(), c)?,
                    None => Preconditioner::new(k.runtime_config())?,
                };
                let ids = mlp
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        precond.register(
                            &format!("fc{i}"),
                            LayerKind::Linear {
                                in_features: l.in_features,
                                out_features: l.out_features,
                                bias: true,
                            },
                        )
                    })
                    .collect::<kfac_runtime::Result<Vec<_>>>()?;
                OptState::Kfac {
                    settings: k.clone(),
                    precond: Box::new(precond),
                    ids,
                    vel: zeros_like(mlp),
                    // Each rank samples its own targets (rank 0: stream 3).
                    rng: SplitMix64::stream(seed, 3 + 1000 * rank),
                    times: KfacTimes::default(),
                }
            }
        })
    }

    pub(crate) fn kfac_times(&self) -> Option<KfacTimes> {
        match self {
            OptState::Kfac { times, .. } => Some(*times),
            _ => None,
        }
    }

    /// One update. `out_grads` are the per-sample output gradients of the
    /// training targets (see [`Mlp::backward`]), `grads` the mean-loss
    /// gradients (overwritten by K-FAC with the preconditioned ones).
    pub(crate) fn update(
        &mut self,
        mlp: &mut Mlp,
        loss: Loss,
        cache: &ForwardCache,
        out_grads: &[Mat<f32>],
        grads: &mut [LinearGrad],
    ) -> kfac_runtime::Result<()> {
        match self {
            OptState::Sgd { lr, momentum, vel } => momentum_step(mlp, grads, vel, *lr, *momentum),
            OptState::Adam {
                lr,
                beta1,
                beta2,
                eps,
                m,
                v,
                t,
            } => {
                *t += 1;
                let (b1, b2) = (*beta1 as f32, *beta2 as f32);
                let c1 = 1.0 - b1.powi(*t);
                let c2 = 1.0 - b2.powi(*t);
                let (lr, eps) = (*lr as f32, *eps as f32);
                for ((l, g), (m, v)) in mlp
                    .layers
                    .iter_mut()
                    .zip(grads.iter())
                    .zip(m.iter_mut().zip(v.iter_mut()))
                {
                    for (w, g, m, v) in [
                        (&mut l.weight, &g.weight, &mut m.weight, &mut v.weight),
                        (&mut l.bias, &g.bias, &mut m.bias, &mut v.bias),
                    ] {
                        for i in 0..w.len() {
                            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                            w[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                        }
                    }
                }
            }
            OptState::Kfac {
                settings,
                precond,
                ids,
                vel,
                rng,
                times,
            } => {
                if precond.factor_update_due() {
                    // G statistics: per-sample output gradients (the mean
                    // loss's output gradients times n), so that the
                    // runtime's G = g^T g / n is the Fisher's factor.
                    let sampled;
                    let g: &[Mat<f32>] = match settings.fisher {
                        FisherKind::Empirical => out_grads,
                        FisherKind::Sampled => {
                            let top = loss.sampled_grad(cache.output.as_ref(), rng);
                            sampled = mlp.backward(cache, top);
                            &sampled
                        }
                    };
                    for ((id, a), g) in ids.iter().zip(&cache.inputs).zip(g) {
                        precond.observe(
                            *id,
                            Observation::Linear {
                                activations: a.as_ref(),
                                output_grads: g.as_ref(),
                            },
                        )?;
                    }
                }
                let mut lg = grads
                    .iter_mut()
                    .zip(ids.iter())
                    .zip(&mlp.layers)
                    .map(|((g, id), l)| {
                        LayerGrad::from_row_major(
                            *id,
                            &mut g.weight,
                            l.out_features,
                            l.in_features,
                            Some(&mut g.bias),
                        )
                    })
                    .collect::<kfac_runtime::Result<Vec<_>>>()?;
                // Across processes: every rank holds the mean-loss gradient
                // of its shard, pre-scaled by the caller so that the
                // average over ranks is the gradient of the whole batch.
                let t_ar = std::time::Instant::now();
                precond.allreduce_gradients(&mut lg)?;
                let t_ar = t_ar.elapsed();
                let stats = precond.step(&mut lg)?;
                drop(lg);
                let s = stats.times;
                // The runtime counts observe time in factor_update already.
                times.factor_update += s.factor_update.as_secs_f64();
                times.inversion += s.inversion.as_secs_f64();
                times.preconditioning += s.preconditioning.as_secs_f64();
                times.communication += (s.communication + t_ar).as_secs_f64();
                // `total` covers the step and the observe calls before it.
                times.total += (s.total + t_ar).as_secs_f64();
                times.steps += 1;
                times.inversions += stats.inverses_updated as u64;
                times.clipped_steps += (stats.kl_scale < 1.0) as u64;
                momentum_step(mlp, grads, vel, settings.lr, settings.momentum);
            }
        }
        Ok(())
    }
}
