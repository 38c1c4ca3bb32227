//! Checkpoints: the full preconditioner state as bytes, and back.
//!
//! # Format (version 3)
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"KFACCKPT"` |
//! | 8 | 4 | format version (`u32`, currently 3; versions 1 and 2 are read too) |
//! | 12 | 8 | payload length in bytes (`u64`) |
//! | 20 | 4 | CRC-32 (IEEE) of the payload (`u32`) |
//! | 24 | .. | payload |
//!
//! The payload is, in order: the configuration (every field of
//! [`Config`](crate::Config)); `steps`, `factor_updates` (`u64`); the
//! current damping and learning rate (`f64`); the loss scale set by
//! `set_grad_scale` (`f64`, since version 2); the number of layers (`u32`);
//! then per layer: name (`u32` length + UTF-8), kind (`u8` tag + `u64`
//! sizes), excluded flag, the factors A and G, the micro-batch accumulators
//! and their weight/count, and the inverse cache (`u8` tag, then matrices).
//! A matrix is `u64 rows, u64 cols` then `rows*cols` `f32` bit patterns in
//! column-major order; a vector is `u64 len` then values. Floats are stored
//! bit-exactly, so a restored preconditioner continues bitwise identically.
//!
//! Version 2 added `Config::ignore_conv_dilation` (a `u8` flag after the
//! wire precision) and the loss scale; a version-1 checkpoint loads with
//! their defaults (false, 1). Version 3 added `Config::refresh_tolerance`
//! (an `f64` after that flag); older checkpoints load with 0.

use crate::codec::{read_config, read_kind, write_config, write_kind, R, W};
use crate::preconditioner::Preconditioner;
use crate::state::{Accumulator, Factor, InverseCache, LayerState};
use crate::{Error, Result};

/// Magic bytes at the start of every checkpoint.
pub const MAGIC: &[u8; 8] = b"KFACCKPT";
/// The format version this build writes (it also reads every version from
/// [`OLDEST_VERSION`] on).
pub const VERSION: u32 = 3;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
const HEADER: usize = 24;

impl Preconditioner {
    /// The full state (configuration, layers, factors, accumulators, inverse
    /// cache, counters) as bytes in the [documented format](self).
    ///
    /// # Panics
    /// If the bytes cannot be allocated; [`try_save`](Self::try_save)
    /// returns that as an error.
    pub fn save(&self) -> Vec<u8> {
        match self.try_save() {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`save`](Self::save), with an allocation failure as an error.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] with the checkpoint's size.
    ///
    /// # Example
    /// ```
    /// use kfac_runtime::{Config, Preconditioner};
    /// let p = Preconditioner::new(Config::default()).unwrap();
    /// let bytes = p.try_save().unwrap();
    /// assert_eq!(bytes.len(), p.checkpoint_len());
    /// let mut buf = vec![0u8; p.checkpoint_len()];
    /// assert_eq!(p.save_into(&mut buf), Some(bytes.len()));
    /// assert_eq!(buf, bytes);
    /// ```
    pub fn try_save(&self) -> Result<Vec<u8>> {
        let n = self.checkpoint_len();
        let mut out = crate::mem::filled(n, 0u8, "checkpoint")?;
        let written = self.save_into(&mut out);
        debug_assert_eq!(written, Some(n));
        Ok(out)
    }

    /// The size in bytes of [`save`](Self::save)'s result, computed without
    /// writing it.
    pub fn checkpoint_len(&self) -> usize {
        let mut w = W::counter();
        self.write_payload(&mut w);
        HEADER + w.len()
    }

    /// Writes [`save`](Self::save)'s bytes into `out` without allocating;
    /// returns their length, or `None` (and writes nothing) if `out` is
    /// shorter than [`checkpoint_len`](Self::checkpoint_len).
    pub fn save_into(&self, out: &mut [u8]) -> Option<usize> {
        let n = self.checkpoint_len();
        if out.len() < n {
            return None;
        }
        let (header, payload) = out[..n].split_at_mut(HEADER);
        let mut w = W::slice(payload);
        self.write_payload(&mut w);
        debug_assert_eq!(w.len(), n - HEADER);
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..20].copy_from_slice(&((n - HEADER) as u64).to_le_bytes());
        header[20..24].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        Some(n)
    }

    /// The checkpoint's payload (everything after the header).
    fn write_payload(&self, w: &mut W<'_>) {
        write_config(w, &self.config);
        w.u64(self.steps);
        w.u64(self.factor_updates);
        w.f64(self.damping_now);
        w.f64(self.lr_now);
        w.f64(self.grad_scale);
        w.u32(self.layers.len() as u32);
        for l in &self.layers {
            w.str(&l.name);
            write_kind(w, &l.kind);
            w.bool(l.excluded);
            w.factor(&l.a);
            w.factor(&l.g);
            w.factor(&l.acc.a);
            w.factor(&l.acc.g);
            w.f64(l.acc.weight);
            w.u64(l.acc.count);
            match &l.inv {
                None => w.u8(0),
                Some(InverseCache::Eigen {
                    qa,
                    la,
                    qg,
                    lg,
                    denom,
                }) => {
                    w.u8(1);
                    match qa {
                        Some(q) => {
                            w.u8(1);
                            w.mat(q);
                        }
                        None => w.u8(0),
                    }
                    w.f32s(la);
                    w.mat(qg);
                    w.f32s(lg);
                    match denom {
                        Some(d) => {
                            w.u8(1);
                            w.mat(d);
                        }
                        None => w.u8(0),
                    }
                }
                Some(InverseCache::Inverse { a_inv, g_inv }) => {
                    w.u8(2);
                    w.factor(a_inv);
                    w.mat(g_inv);
                }
            }
        }
    }

    /// Restores a preconditioner from [`save`](Self::save)'s bytes. It
    /// continues bitwise identically to the one that was saved.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming what is wrong: a short or foreign header,
    /// another format version, a length or checksum mismatch, or a payload
    /// that does not decode to a consistent state;
    /// [`Error::OutOfMemory`] if the state cannot be allocated.
    pub fn load(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER {
            return Err(Error::checkpoint(format!(
                "truncated: {} bytes, the header alone is {HEADER}",
                bytes.len()
            )));
        }
        if &bytes[0..8] != MAGIC {
            return Err(Error::checkpoint("bad magic: not a kfac checkpoint"));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(Error::checkpoint(format!(
                "format version {version} is not supported (this build reads versions {OLDEST_VERSION} to {VERSION})"
            )));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&bytes[12..20]);
        let len = u64::from_le_bytes(len8);
        let have = (bytes.len() - HEADER) as u64;
        if len != have {
            return Err(Error::checkpoint(format!(
                "payload length {len} in the header, {have} bytes present (truncated or padded)"
            )));
        }
        let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        let payload = &bytes[HEADER..];
        let actual = crc32fast::hash(payload);
        if crc != actual {
            return Err(Error::checkpoint(format!(
                "checksum mismatch: header says {crc:08x}, payload hashes to {actual:08x} (corrupted)"
            )));
        }
        let mut r = R { b: payload, pos: 0 };
        let config = read_config(&mut r, version)?;
        let steps = r.u64("steps")?;
        let factor_updates = r.u64("factor_updates")?;
        let damping_now = r.f64("current damping")?;
        let lr_now = r.f64("current lr")?;
        let grad_scale = if version >= 2 {
            r.f64("loss scale")?
        } else {
            1.0
        };
        let nl = r.u32("layer count")? as usize;
        let mut layers = Vec::new();
        // Checkpoints store no budget: the loaded state is only counted.
        let budget = std::sync::Arc::new(crate::mem::MemBudget::new(None));
        for li in 0..nl {
            let name = r.str("layer name")?;
            let kind = read_kind(&mut r)?;
            kind.validate(&name).map_err(|e| match e {
                // Memory, not the checkpoint, is at fault.
                Error::OutOfMemory { .. } => e,
                e => Error::checkpoint(format!("layer {li}: {e}")),
            })?;
            let excluded = r.bool("excluded flag")?;
            let mut l = LayerState::new(name, kind, excluded, config.compat, &budget)?;
            let a = r.factor("factor A")?;
            let g = r.factor("factor G")?;
            let acc_a = r.factor("accumulator A")?;
            let acc_g = r.factor("accumulator G")?;
            let weight = r.f64("accumulator weight")?;
            let count = r.u64("accumulator count")?;
            let same = |x: &Factor, y: &Factor| {
                matches!(
                    (x, y),
                    (Factor::Dense(_), Factor::Dense(_)) | (Factor::Diag(_), Factor::Diag(_))
                ) && x.dim() == y.dim()
            };
            if !(same(&a, &l.a)
                && same(&g, &l.g)
                && same(&acc_a, &l.acc.a)
                && same(&acc_g, &l.acc.g))
            {
                return Err(Error::checkpoint(format!(
                    "layer '{}': stored factor shapes do not match its kind",
                    l.name
                )));
            }
            l.a = a;
            l.g = g;
            l.acc = Accumulator {
                a: acc_a,
                g: acc_g,
                weight,
                count,
            };
            let (d_out, d) = l.kind.dims();
            l.inv = match r.u8("inverse cache tag")? {
                0 => None,
                1 => {
                    let qa = if r.bool("Q_A flag")? {
                        Some(r.mat("Q_A")?)
                    } else {
                        None
                    };
                    let la = r.f32s("l_A")?;
                    let qg = r.mat("Q_G")?;
                    let lg = r.f32s("l_G")?;
                    let denom = if r.bool("denominators flag")? {
                        Some(r.mat("denominators")?)
                    } else {
                        None
                    };
                    let ok = la.len() == d
                        && lg.len() == d_out
                        && qg.nrows() == d_out
                        && qg.ncols() == d_out
                        && qa
                            .as_ref()
                            .map_or(l.kind.diagonal_a(), |q| q.nrows() == d && q.ncols() == d)
                        && denom
                            .as_ref()
                            .is_none_or(|m| m.nrows() == d_out && m.ncols() == d);
                    if !ok {
                        return Err(Error::checkpoint(format!(
                            "layer '{}': stored eigendecomposition shapes do not match its kind",
                            l.name
                        )));
                    }
                    Some(InverseCache::Eigen {
                        qa,
                        la,
                        qg,
                        lg,
                        denom,
                    })
                }
                2 => {
                    let a_inv = r.factor("A inverse")?;
                    let g_inv = r.mat("G inverse")?;
                    if !(a_inv.dim() == d
                        && matches!(a_inv, Factor::Diag(_)) == l.kind.diagonal_a()
                        && g_inv.nrows() == d_out
                        && g_inv.ncols() == d_out)
                    {
                        return Err(Error::checkpoint(format!(
                            "layer '{}': stored inverse shapes do not match its kind",
                            l.name
                        )));
                    }
                    Some(InverseCache::Inverse { a_inv, g_inv })
                }
                t => return Err(Error::checkpoint(format!("unknown inverse cache tag {t}"))),
            };
            layers.push(l);
        }
        if r.pos != payload.len() {
            return Err(Error::checkpoint(format!(
                "{} trailing bytes after the last layer",
                payload.len() - r.pos
            )));
        }
        let mut names = std::collections::HashSet::new();
        if let Some(l) = layers.iter().find(|l| !names.insert(l.name.clone())) {
            return Err(Error::checkpoint(format!(
                "duplicate layer name '{}'",
                l.name
            )));
        }
        let mut p = Preconditioner::from_parts(
            config,
            budget,
            layers,
            steps,
            factor_updates,
            damping_now,
            lr_now,
            1.0,
        )?;
        p.set_grad_scale(grad_scale)
            .map_err(|e| Error::checkpoint(format!("stored loss scale: {e}")))?;
        Ok(p)
    }
}
