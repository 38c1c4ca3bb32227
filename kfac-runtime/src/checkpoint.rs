//! Checkpoints: the full preconditioner state as bytes, and back.
//!
//! # Format (version 1)
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"KFACCKPT"` |
//! | 8 | 4 | format version (`u32`, currently 1) |
//! | 12 | 8 | payload length in bytes (`u64`) |
//! | 20 | 4 | CRC-32 (IEEE) of the payload (`u32`) |
//! | 24 | .. | payload |
//!
//! The payload is, in order: the configuration (every field of
//! [`Config`]); `steps`, `factor_updates` (`u64`); the
//! current damping and learning rate (`f64`); the number of layers (`u32`);
//! then per layer: name (`u32` length + UTF-8), kind (`u8` tag + `u64`
//! sizes), excluded flag, the factors A and G, the micro-batch accumulators
//! and their weight/count, and the inverse cache (`u8` tag, then matrices).
//! A matrix is `u64 rows, u64 cols` then `rows*cols` `f32` bit patterns in
//! column-major order; a vector is `u64 len` then values. Floats are stored
//! bit-exactly, so a restored preconditioner continues bitwise identically.

use faer::Mat;
use kfac_kernels::conv::ImageLayout;

use crate::config::{Compat, Config, Method, Precision, Schedule, WirePrecision};
use crate::layer::{Conv2dSpec, LayerKind};
use crate::preconditioner::{LayerState, Preconditioner};
use crate::state::{Accumulator, Factor, InverseCache};
use crate::{Error, Result};

/// Magic bytes at the start of every checkpoint.
pub const MAGIC: &[u8; 8] = b"KFACCKPT";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 24;

pub(crate) struct W(pub(crate) Vec<u8>);

impl W {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.usize(v.len());
        for x in v {
            self.0.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
    fn mat(&mut self, m: &Mat<f32>) {
        self.usize(m.nrows());
        self.usize(m.ncols());
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                self.0.extend_from_slice(&m[(i, j)].to_bits().to_le_bytes());
            }
        }
    }
    fn factor(&mut self, f: &Factor) {
        match f {
            Factor::Dense(m) => {
                self.u8(0);
                self.mat(m);
            }
            Factor::Diag(v) => {
                self.u8(1);
                self.f32s(v);
            }
        }
    }
    fn schedule(&mut self, s: &Schedule) {
        match s {
            Schedule::Constant(v) => {
                self.u8(0);
                self.f64(*v);
            }
            Schedule::Piecewise { boundaries, values } => {
                self.u8(1);
                self.usize(boundaries.len());
                for b in boundaries {
                    self.u64(*b);
                }
                self.usize(values.len());
                for v in values {
                    self.f64(*v);
                }
            }
            Schedule::PerStep(v) => {
                self.u8(2);
                self.f64(*v);
            }
        }
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return Err(Error::checkpoint(format!(
                "payload ends inside {what} (offset {}, need {n} bytes, {} left)",
                self.pos,
                self.b.len() - self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn f64(&mut self, what: &str) -> Result<f64> {
        Ok(f64::from_bits(self.u64(what)?))
    }
    fn usize(&mut self, what: &str) -> Result<usize> {
        let v = self.u64(what)?;
        usize::try_from(v)
            .map_err(|_| Error::checkpoint(format!("{what} = {v} does not fit usize")))
    }
    /// A length that must fit in the remaining bytes at `elem` bytes each.
    fn len(&mut self, what: &str, elem: usize) -> Result<usize> {
        let n = self.usize(what)?;
        if n.checked_mul(elem)
            .is_none_or(|b| b > self.b.len() - self.pos)
        {
            return Err(Error::checkpoint(format!(
                "{what} = {n} exceeds the payload"
            )));
        }
        Ok(n)
    }
    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::checkpoint(format!("{what}: invalid flag {v}"))),
        }
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = self.u32(what)? as usize;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::checkpoint(format!("{what} is not UTF-8")))
    }
    fn f32s(&mut self, what: &str) -> Result<Vec<f32>> {
        let n = self.len(what, 4)?;
        let s = self.take(n * 4, what)?;
        Ok(s.chunks_exact(4)
            .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect())
    }
    fn mat(&mut self, what: &str) -> Result<Mat<f32>> {
        let r = self.usize(what)?;
        let c = self.usize(what)?;
        let n = r
            .checked_mul(c)
            .filter(|n| {
                n.checked_mul(4)
                    .is_some_and(|b| b <= self.b.len() - self.pos)
            })
            .ok_or_else(|| {
                Error::checkpoint(format!("{what}: {r}x{c} matrix exceeds the payload"))
            })?;
        let s = self.take(n * 4, what)?;
        Ok(Mat::from_fn(r, c, |i, j| {
            let k = 4 * (i + j * r);
            f32::from_bits(u32::from_le_bytes([s[k], s[k + 1], s[k + 2], s[k + 3]]))
        }))
    }
    fn factor(&mut self, what: &str) -> Result<Factor> {
        match self.u8(what)? {
            0 => Ok(Factor::Dense(self.mat(what)?)),
            1 => Ok(Factor::Diag(self.f32s(what)?)),
            t => Err(Error::checkpoint(format!("{what}: unknown factor tag {t}"))),
        }
    }
    fn schedule(&mut self, what: &str) -> Result<Schedule> {
        match self.u8(what)? {
            0 => Ok(Schedule::Constant(self.f64(what)?)),
            1 => {
                let nb = self.len(what, 8)?;
                let boundaries = (0..nb).map(|_| self.u64(what)).collect::<Result<_>>()?;
                let nv = self.len(what, 8)?;
                let values = (0..nv).map(|_| self.f64(what)).collect::<Result<_>>()?;
                Ok(Schedule::Piecewise { boundaries, values })
            }
            2 => Ok(Schedule::PerStep(self.f64(what)?)),
            t => Err(Error::checkpoint(format!(
                "{what}: unknown schedule tag {t}"
            ))),
        }
    }
}

pub(crate) fn write_config(w: &mut W, c: &Config) {
    w.schedule(&c.damping);
    w.f64(c.factor_decay);
    match c.kl_clip {
        Some(k) => {
            w.u8(1);
            w.f64(k);
        }
        None => w.u8(0),
    }
    w.schedule(&c.lr);
    w.u64(c.factor_update_steps);
    w.u64(c.inv_update_steps);
    w.u8(match c.method {
        Method::Eigen => 0,
        Method::Inverse => 1,
    });
    w.u8(match c.eigen_precision {
        Precision::F32 => 0,
        Precision::F64 => 1,
    });
    w.bool(c.precompute_denominators);
    w.usize(c.exclude.len());
    for e in &c.exclude {
        w.str(e);
    }
    w.u8(match c.compat {
        Compat::Native => 0,
        Compat::KfacPytorch => 1,
    });
    w.usize(c.threads);
    w.f64(c.grad_worker_fraction);
    w.u8(match c.wire {
        WirePrecision::F32 => 0,
        WirePrecision::Bf16 => 1,
        WirePrecision::F16 => 2,
    });
}

fn read_config(r: &mut R<'_>) -> Result<Config> {
    let damping = r.schedule("config.damping")?;
    let factor_decay = r.f64("config.factor_decay")?;
    let kl_clip = if r.bool("config.kl_clip flag")? {
        Some(r.f64("config.kl_clip")?)
    } else {
        None
    };
    let lr = r.schedule("config.lr")?;
    let factor_update_steps = r.u64("config.factor_update_steps")?;
    let inv_update_steps = r.u64("config.inv_update_steps")?;
    let method = match r.u8("config.method")? {
        0 => Method::Eigen,
        1 => Method::Inverse,
        t => return Err(Error::checkpoint(format!("config.method: unknown tag {t}"))),
    };
    let eigen_precision = match r.u8("config.eigen_precision")? {
        0 => Precision::F32,
        1 => Precision::F64,
        t => {
            return Err(Error::checkpoint(format!(
                "config.eigen_precision: unknown tag {t}"
            )))
        }
    };
    let precompute_denominators = r.bool("config.precompute_denominators")?;
    let ne = r.len("config.exclude", 4)?;
    let exclude = (0..ne)
        .map(|_| r.str("config.exclude"))
        .collect::<Result<_>>()?;
    let compat = match r.u8("config.compat")? {
        0 => Compat::Native,
        1 => Compat::KfacPytorch,
        t => return Err(Error::checkpoint(format!("config.compat: unknown tag {t}"))),
    };
    let threads = r.usize("config.threads")?;
    let grad_worker_fraction = r.f64("config.grad_worker_fraction")?;
    let wire = match r.u8("config.wire")? {
        0 => WirePrecision::F32,
        1 => WirePrecision::Bf16,
        2 => WirePrecision::F16,
        t => return Err(Error::checkpoint(format!("config.wire: unknown tag {t}"))),
    };
    let c = Config {
        damping,
        factor_decay,
        kl_clip,
        lr,
        factor_update_steps,
        inv_update_steps,
        method,
        eigen_precision,
        precompute_denominators,
        exclude,
        compat,
        threads,
        grad_worker_fraction,
        wire,
    };
    c.validate()
        .map_err(|e| Error::checkpoint(format!("stored configuration is invalid: {e}")))?;
    Ok(c)
}

pub(crate) fn write_kind(w: &mut W, k: &LayerKind) {
    match k {
        LayerKind::Linear {
            in_features,
            out_features,
            bias,
        } => {
            w.u8(0);
            w.usize(*in_features);
            w.usize(*out_features);
            w.bool(*bias);
        }
        LayerKind::Conv2d(c) => {
            w.u8(1);
            for v in [
                c.in_channels,
                c.out_channels,
                c.kernel.0,
                c.kernel.1,
                c.stride.0,
                c.stride.1,
                c.padding.0,
                c.padding.1,
                c.dilation.0,
                c.dilation.1,
            ] {
                w.usize(v);
            }
            w.bool(c.bias);
            w.u8(match c.layout {
                ImageLayout::Nchw => 0,
                ImageLayout::Nhwc => 1,
            });
        }
        LayerKind::Embedding {
            num_embeddings,
            dim,
        } => {
            w.u8(2);
            w.usize(*num_embeddings);
            w.usize(*dim);
        }
        LayerKind::Kronecker { a_dim, g_dim } => {
            w.u8(3);
            w.usize(*a_dim);
            w.usize(*g_dim);
        }
    }
}

fn read_kind(r: &mut R<'_>) -> Result<LayerKind> {
    let what = "layer kind";
    Ok(match r.u8(what)? {
        0 => LayerKind::Linear {
            in_features: r.usize(what)?,
            out_features: r.usize(what)?,
            bias: r.bool(what)?,
        },
        1 => {
            let mut v = [0usize; 10];
            for x in &mut v {
                *x = r.usize(what)?;
            }
            let bias = r.bool(what)?;
            let layout = match r.u8(what)? {
                0 => ImageLayout::Nchw,
                1 => ImageLayout::Nhwc,
                t => return Err(Error::checkpoint(format!("conv layout: unknown tag {t}"))),
            };
            LayerKind::Conv2d(Conv2dSpec {
                in_channels: v[0],
                out_channels: v[1],
                kernel: (v[2], v[3]),
                stride: (v[4], v[5]),
                padding: (v[6], v[7]),
                dilation: (v[8], v[9]),
                bias,
                layout,
            })
        }
        2 => LayerKind::Embedding {
            num_embeddings: r.usize(what)?,
            dim: r.usize(what)?,
        },
        3 => LayerKind::Kronecker {
            a_dim: r.usize(what)?,
            g_dim: r.usize(what)?,
        },
        t => return Err(Error::checkpoint(format!("unknown layer kind tag {t}"))),
    })
}

impl Preconditioner {
    /// The full state (configuration, layers, factors, accumulators, inverse
    /// cache, counters) as bytes in the [documented format](self).
    pub fn save(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(self.state_bytes() + 4096));
        write_config(&mut w, &self.config);
        w.u64(self.steps);
        w.u64(self.factor_updates);
        w.f64(self.damping_now);
        w.f64(self.lr_now);
        w.u32(self.layers.len() as u32);
        for l in &self.layers {
            w.str(&l.name);
            write_kind(&mut w, &l.kind);
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
        let payload = w.0;
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Restores a preconditioner from [`save`](Self::save)'s bytes. It
    /// continues bitwise identically to the one that was saved.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming what is wrong: a short or foreign header,
    /// another format version, a length or checksum mismatch, or a payload
    /// that does not decode to a consistent state.
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
        if version != VERSION {
            return Err(Error::checkpoint(format!(
                "format version {version} is not supported (this build reads version {VERSION})"
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
        let config = read_config(&mut r)?;
        let steps = r.u64("steps")?;
        let factor_updates = r.u64("factor_updates")?;
        let damping_now = r.f64("current damping")?;
        let lr_now = r.f64("current lr")?;
        let nl = r.u32("layer count")? as usize;
        let mut layers = Vec::new();
        for li in 0..nl {
            let name = r.str("layer name")?;
            let kind = read_kind(&mut r)?;
            kind.validate(&name)
                .map_err(|e| Error::checkpoint(format!("layer {li}: {e}")))?;
            let excluded = r.bool("excluded flag")?;
            let mut l = LayerState::new(name, kind, excluded, config.compat);
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
        Preconditioner::from_parts(config, layers, steps, factor_updates, damping_now, lr_now)
    }
}
