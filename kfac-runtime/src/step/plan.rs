//! Phase "plan": what this step does (factor update, inversion), with
//! which damping, learning rate and running-average weight, and who does
//! what across ranks (factor owners, gradient-worker groups).

use crate::config::{Compat, Config};
use crate::distributed;
use crate::state::LayerState;

/// The step's schedule values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) factor_due: bool,
    pub(crate) inv_due: bool,
    pub(crate) damping: f64,
    pub(crate) lr: f64,
    /// Weight of the old factor in the running average (`xi_k`).
    pub(crate) xi: f64,
}

impl Plan {
    pub(crate) fn new(
        cfg: &Config,
        factor_due: bool,
        inv_due: bool,
        damping: f64,
        lr: f64,
        factor_updates: u64,
    ) -> Self {
        let xi = match cfg.compat {
            Compat::Native => {
                let k = (factor_updates + 1) as f64;
                (1.0 - 1.0 / k).min(cfg.factor_decay)
            }
            Compat::KfacPytorch => cfg.factor_decay,
        };
        Self {
            factor_due,
            inv_due,
            damping,
            lr,
            xi,
        }
    }
}

/// Who does what (Osawa et al. 2019, KAISA): factor task `2 l` is layer
/// `l`'s A factor, `2 l + 1` its G factor; each has one owner (greedy LPT
/// on the inversion cost, deterministic). Layer `l`'s *lead* is the owner
/// of its G factor; its gradient-worker group is the block of `gsize`
/// consecutive ranks that contains the lead. Group members receive the
/// layer's decompositions and precondition it; the other ranks receive the
/// preconditioned gradient from the lead.
#[derive(Clone, Debug)]
pub(crate) struct Roles {
    owners: Vec<usize>,
    gsize: usize,
    world: usize,
    me: usize,
}

impl Roles {
    pub(crate) fn new(layers: &[LayerState], fraction: f64, world: usize, me: usize) -> Self {
        let costs: Vec<u64> = layers
            .iter()
            .flat_map(|l| {
                let (a, g) = if l.excluded {
                    (0, 0)
                } else {
                    (distributed::cost(&l.a), distributed::cost(&l.g))
                };
                [a, g]
            })
            .collect();
        Self {
            owners: distributed::lpt_owners(&costs, world),
            gsize: distributed::group_size(fraction, world),
            world,
            me,
        }
    }

    /// Owner of factor task `t`.
    pub(crate) fn owner(&self, t: usize) -> usize {
        self.owners[t]
    }

    /// Whether this rank decomposes factor task `t`.
    pub(crate) fn owns(&self, t: usize) -> bool {
        self.owners[t] == self.me
    }

    /// The rank that preconditions layer `li` for the ranks outside its
    /// group.
    pub(crate) fn lead(&self, li: usize) -> usize {
        self.owners[2 * li + 1]
    }

    /// Whether this rank is in layer `li`'s gradient-worker group (keeps its
    /// decompositions and preconditions it).
    pub(crate) fn member(&self, li: usize) -> bool {
        distributed::group_of(self.lead(li), self.gsize, self.world).contains(&self.me)
    }

    /// Whether every rank preconditions every layer (`f = 1`): no
    /// preconditioned gradient needs to be sent.
    pub(crate) fn everyone_preconditions(&self) -> bool {
        self.gsize >= self.world
    }
}
