//! The exchange layer of a step: every collective a step makes goes
//! through [`Exchange`], which
//!
//! * does nothing for a world of one (phases never branch on the world
//!   size: they compute locally, then exchange);
//! * makes the step **fail together**: after the first exchange (the
//!   agreement on arguments and configuration), each phase ends with a
//!   status round ([`Exchange::settle`]) before any data moves, so an
//!   error on any rank becomes an error on every rank, naming the failing
//!   rank and its cause ([`Error::RankFailed`]), instead of peers waiting
//!   for data that never comes and blaming a healthy rank;
//! * turns a failed collective into [`Error::Comm`] and aborts the group
//!   ([`Communicator::abort_group`]), so peers still inside a collective
//!   fail fast instead of waiting for their timeout (after a failed
//!   collective the ranks are out of step and the group cannot be reused);
//! * counts the time spent and the payload bytes this rank sent and
//!   received, for [`StepStats`](crate::StepStats).
//!
//! Errors settled by a status round leave the group usable: every rank
//! returns from the step with the state it had before, and a later step
//! with good data succeeds.

use std::time::{Duration, Instant};

use kfac_kernels::packed;

use crate::comm::{as_bytes, as_bytes_mut, Communicator};
use crate::config::WirePrecision;
use crate::error::ErrorKind;
use crate::{Error, Result};

/// Longest error message carried by a status round (bytes; longer ones are
/// cut at a character boundary).
const MAX_CAUSE_BYTES: usize = 512;

/// Values converted to or from a 2-byte wire type at a time (on the
/// stack).
const CHUNK: usize = 1024;

/// This rank's statistics ready to be summed: packed values and sample
/// weights, and the values in the wire precision. Built (every buffer
/// allocated) before the step's agreement round, so that running out of
/// memory here fails the step on every rank instead of leaving peers in a
/// collective.
pub(crate) struct Outgoing {
    values: Vec<f32>,
    weights: Vec<f64>,
    wire: Wire,
}

enum Wire {
    F32,
    /// The converted values and room for every rank's.
    Bf16(Vec<packed::bf16>, Vec<u8>),
    F16(Vec<packed::f16>, Vec<u8>),
}

impl Outgoing {
    /// Converts `values` to `wire` when that is a 2-byte type (with room
    /// to receive every rank's converted values, `world` in all).
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] for the converted copy or the room.
    pub(crate) fn new(
        values: Vec<f32>,
        weights: Vec<f64>,
        wire: WirePrecision,
        world: usize,
    ) -> Result<Self> {
        fn convert<H: Clone + Default>(
            values: &[f32],
            world: usize,
            to: fn(&[f32], &mut [H]) -> kfac_kernels::Result<()>,
        ) -> Result<(Vec<H>, Vec<u8>)> {
            let what = "statistics in the wire precision";
            let mut h = crate::mem::filled(values.len(), H::default(), what)?;
            to(values, &mut h)?;
            let all = std::mem::size_of_val(h.as_slice()).saturating_mul(world);
            Ok((h, crate::mem::filled(all, 0u8, what)?))
        }
        let wire = match wire {
            WirePrecision::F32 => Wire::F32,
            WirePrecision::Bf16 => {
                let (h, all) = convert(&values, world, packed::f32_to_bf16)?;
                Wire::Bf16(h, all)
            }
            WirePrecision::F16 => {
                let (h, all) = convert(&values, world, packed::f32_to_f16)?;
                Wire::F16(h, all)
            }
        };
        Ok(Self {
            values,
            weights,
            wire,
        })
    }
}

/// Counters of one step's communication.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Traffic {
    /// Wall time inside collectives.
    pub(crate) time: Duration,
    /// Payload bytes this rank contributed (its own buffer, or the data it
    /// broadcast as root).
    pub(crate) bytes_sent: u64,
    /// Payload bytes this rank received and kept.
    pub(crate) bytes_received: u64,
}

/// A step's view of the communicator (see the module docs).
pub(crate) struct Exchange<'c> {
    comm: &'c mut dyn Communicator,
    pub(crate) traffic: Traffic,
}

impl<'c> Exchange<'c> {
    pub(crate) fn new(comm: &'c mut dyn Communicator) -> Self {
        Self {
            comm,
            traffic: Traffic::default(),
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub(crate) fn world(&self) -> usize {
        self.comm.size()
    }

    /// Runs one collective: times it, and on failure aborts the group and
    /// maps the error.
    fn collective<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Communicator) -> std::result::Result<T, crate::comm::CommError>,
    ) -> Result<T> {
        let t0 = Instant::now();
        let r = f(&mut *self.comm);
        self.traffic.time += t0.elapsed();
        r.map_err(|e| {
            self.comm.abort_group();
            Error::Comm(e)
        })
    }

    /// The first exchange of a step: every rank's validation status and
    /// configuration digest. A digest that differs anywhere is an
    /// [`Error::Distributed`] on every rank; a rank that refused its
    /// arguments returns its own error and every other rank an
    /// [`Error::RankFailed`] naming it. No rank steps alone.
    pub(crate) fn agree<T>(&mut self, local: Result<T>, digest: impl FnOnce() -> u64) -> Result<T> {
        if self.world() == 1 {
            return local;
        }
        let digest = digest();
        let mut msg = digest.to_le_bytes().to_vec();
        status_message(&local, &mut msg);
        let (all, sizes) = self.collective(|c| c.allgather_bytes(&msg))?;
        let parts = split(&all, &sizes, self.world())?;
        let me = self.rank();
        for (r, p) in parts.iter().enumerate() {
            if p.len() < 8 || p[..8] != msg[..8] {
                let theirs = p
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes);
                return Err(Error::Distributed {
                    reason: format!(
                        "rank {r}'s configuration or layer list differs from rank {me}'s (digest {theirs:016x} vs {digest:016x})"
                    ),
                });
            }
        }
        let statuses: Vec<&[u8]> = parts.iter().map(|p| &p[8..]).collect();
        settle_statuses(local, &statuses, me)
    }

    /// A status round: every rank's result of the phase just computed
    /// locally. If any rank failed, every rank returns an error (the
    /// failing rank its own, the others [`Error::RankFailed`] naming the
    /// lowest failing rank); otherwise every rank gets its own value back.
    pub(crate) fn settle<T>(&mut self, local: Result<T>) -> Result<T> {
        if self.world() == 1 {
            return local;
        }
        let mut msg = Vec::new();
        status_message(&local, &mut msg);
        let (all, sizes) = self.collective(|c| c.allgather_bytes(&msg))?;
        let parts = split(&all, &sizes, self.world())?;
        let me = self.rank();
        settle_statuses(local, &parts, me)
    }

    /// Sums every rank's statistics across ranks, in rank order, from
    /// this rank's [`Outgoing`] (prepared, and allocated, before the
    /// step's agreement round). Returns the sums, or `None` for a world of
    /// one (then `out` is `None`: the local statistics are the sums).
    pub(crate) fn sum_statistics(
        &mut self,
        out: Option<Outgoing>,
    ) -> Result<Option<(Vec<f32>, Vec<f64>)>> {
        let Some(Outgoing {
            mut values,
            mut weights,
            wire,
        }) = out
        else {
            return Ok(None);
        };
        if self.world() == 1 {
            return Ok(Some((values, weights)));
        }
        match wire {
            Wire::F32 => {
                self.collective(|c| c.allreduce_f32(&mut values))?;
                self.count(values.len() * 4, values.len() * 4);
            }
            Wire::Bf16(half, mut all) => {
                self.sum_half(&mut values, &half, &mut all, packed::bf16_to_f32)?
            }
            Wire::F16(half, mut all) => {
                self.sum_half(&mut values, &half, &mut all, packed::f16_to_f32)?
            }
        }
        self.collective(|c| c.allreduce_f64(&mut weights))?;
        self.count(weights.len() * 8, weights.len() * 8);
        Ok(Some((values, weights)))
    }

    /// Sums `values` across ranks through a 2-byte wire type `H`: an
    /// allgather of every rank's converted values (`half`) into `all`,
    /// widened and added in rank order, a chunk at a time (no buffer of
    /// the payload's size is allocated here).
    fn sum_half<H: crate::comm::Pod + Default>(
        &mut self,
        values: &mut [f32],
        half: &[H],
        all: &mut [u8],
        from: fn(&[H], &mut [f32]) -> kfac_kernels::Result<()>,
    ) -> Result<()> {
        let n = values.len();
        self.collective(|c| c.allgather_into(as_bytes(half), all))?;
        let width = std::mem::size_of::<H>();
        self.count(n * width, all.len());
        if n == 0 {
            return Ok(());
        }
        let mut h = [H::default(); CHUNK];
        let mut one = [0.0f32; CHUNK];
        for (r, rank_bytes) in all.chunks_exact(n * width).enumerate() {
            for (dst, src) in values
                .chunks_mut(CHUNK)
                .zip(rank_bytes.chunks(CHUNK * width))
            {
                let k = dst.len();
                as_bytes_mut(&mut h[..k]).copy_from_slice(src);
                from(&h[..k], &mut one[..k])?;
                // rank order: rank 0's values, then each next rank added
                if r == 0 {
                    dst.copy_from_slice(&one[..k]);
                } else {
                    dst.iter_mut().zip(&one[..k]).for_each(|(v, x)| *v += x);
                }
            }
        }
        Ok(())
    }

    /// Broadcasts `buf.len()` values from `root`: the root's `produce`
    /// writes them into `buf`; ranks with `keep` receive them into `buf`
    /// and get them through `consume`; the others take part in the
    /// collective without copying the data out. `buf` is allocated by the
    /// caller before its phase's status round, so no rank can fail to take
    /// part; `consume` cannot fail the collective either: callers record
    /// its errors and settle them after their last share. For a world of
    /// one nothing is called.
    pub(crate) fn share(
        &mut self,
        buf: &mut [f32],
        root: usize,
        keep: bool,
        produce: impl FnOnce(&mut [f32]),
        consume: impl FnOnce(&[f32]),
    ) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let me = self.rank();
        let len = buf.len();
        if me == root {
            produce(buf);
            self.collective(|c| c.broadcast_f32(buf, root))?;
            self.count(len * 4, 0);
        } else if keep {
            self.collective(|c| c.broadcast_f32(buf, root))?;
            self.count(0, len * 4);
            consume(buf);
        } else {
            self.collective(|c| c.broadcast_discard(len * 4, root))?;
        }
        Ok(())
    }

    fn count(&mut self, sent: usize, received: usize) {
        self.traffic.bytes_sent += sent as u64;
        self.traffic.bytes_received += received as u64;
    }
}

/// Appends a status: `0` for success; `1`, the error kind's code, then the
/// message (UTF-8, at most [`MAX_CAUSE_BYTES`]) for a failure.
fn status_message<T>(local: &Result<T>, out: &mut Vec<u8>) {
    match local {
        Ok(_) => out.push(0),
        Err(e) => {
            out.push(1);
            out.push(e.kind().code());
            let msg = e.to_string();
            let mut end = msg.len().min(MAX_CAUSE_BYTES);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&msg.as_bytes()[..end]);
        }
    }
}

/// The common verdict from every rank's status.
fn settle_statuses<T>(local: Result<T>, statuses: &[&[u8]], me: usize) -> Result<T> {
    let failed = statuses
        .iter()
        .enumerate()
        .find(|(_, s)| s.first() != Some(&0));
    match (local, failed) {
        (Err(e), _) => Err(e),
        (Ok(v), None) => Ok(v),
        (Ok(_), Some((rank, s))) => {
            debug_assert_ne!(rank, me);
            let kind = ErrorKind::from_code(s.get(1).copied().unwrap_or(0));
            let cause = String::from_utf8_lossy(s.get(2..).unwrap_or(&[])).into_owned();
            Err(Error::RankFailed { rank, kind, cause })
        }
    }
}

/// Splits an allgather result into one message per rank.
fn split<'a>(all: &'a [u8], sizes: &[usize], world: usize) -> Result<Vec<&'a [u8]>> {
    if sizes.len() != world || sizes.iter().sum::<usize>() != all.len() {
        return Err(Error::Distributed {
            reason: format!("malformed status round: sizes {sizes:?}"),
        });
    }
    let mut out = Vec::with_capacity(world);
    let mut off = 0;
    for &s in sizes {
        out.push(&all[off..off + s]);
        off += s;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_failing_rank_is_named_with_its_kind_and_cause() {
        let ok: Result<u8> = Ok(7);
        let mut a = Vec::new();
        status_message(&ok, &mut a);
        let bad: Result<u8> = Err(Error::LayersFrozen);
        let mut b = Vec::new();
        status_message(&bad, &mut b);
        let statuses: Vec<&[u8]> = vec![&a, &a, &b, &b];
        match settle_statuses(Ok(7u8), &statuses, 0) {
            Err(Error::RankFailed { rank, kind, cause }) => {
                assert_eq!(rank, 2);
                assert_eq!(kind, ErrorKind::State);
                assert_eq!(cause, Error::LayersFrozen.to_string());
            }
            other => panic!("{other:?}"),
        }
        // The failing rank keeps its own error; all-ok keeps the value.
        assert_eq!(
            settle_statuses(Err::<u8, _>(Error::LayersFrozen), &statuses, 2),
            Err(Error::LayersFrozen)
        );
        assert_eq!(settle_statuses(Ok(7u8), &[&a, &a], 1), Ok(7));
    }

    #[test]
    fn long_causes_are_cut_at_a_character_boundary() {
        let e: Result<()> = Err(Error::InvalidConfig {
            field: "damping",
            reason: "é".repeat(600),
        });
        let mut m = Vec::new();
        status_message(&e, &mut m);
        assert!(m.len() <= 2 + MAX_CAUSE_BYTES);
        assert!(std::str::from_utf8(&m[2..]).is_ok());
    }
}
