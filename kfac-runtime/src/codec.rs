//! The byte codec shared by checkpoints and the distributed configuration
//! digest: a little-endian writer [`W`] and a checked reader [`R`], and the
//! encodings of [`Config`] and [`LayerKind`]. Formats are documented in
//! [`checkpoint`](crate::checkpoint); nothing here does I/O.

use faer::Mat;
use kfac_kernels::conv::ImageLayout;

use crate::config::{Compat, Config, Method, Precision, Schedule, WirePrecision};
use crate::layer::{Conv2dSpec, LayerKind};
use crate::state::Factor;
use crate::{Error, Result};

/// Little-endian byte writer.
pub(crate) struct W<'a> {
    sink: Sink<'a>,
    len: usize,
}

/// Where a [`W`] puts its bytes.
enum Sink<'a> {
    /// Nowhere: only the length is counted.
    Count,
    /// A growing vector.
    Vec(Vec<u8>),
    /// A slice long enough for everything written (the caller measured it
    /// with [`W::counter`]).
    Slice(&'a mut [u8]),
}

impl<'a> W<'a> {
    /// Into a growing vector ([`W::into_vec`]).
    pub(crate) fn new() -> Self {
        Self {
            sink: Sink::Vec(Vec::new()),
            len: 0,
        }
    }

    /// Counts the bytes without storing them ([`W::len`]).
    pub(crate) fn counter() -> Self {
        Self {
            sink: Sink::Count,
            len: 0,
        }
    }

    /// Into `s`, which must hold everything written (measured first with
    /// [`W::counter`]; a short slice panics).
    pub(crate) fn slice(s: &'a mut [u8]) -> Self {
        Self {
            sink: Sink::Slice(s),
            len: 0,
        }
    }

    /// Bytes written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The vector of [`W::new`] (empty for the other sinks).
    pub(crate) fn into_vec(self) -> Vec<u8> {
        match self.sink {
            Sink::Vec(v) => v,
            _ => Vec::new(),
        }
    }

    fn put(&mut self, b: &[u8]) {
        match &mut self.sink {
            Sink::Count => {}
            Sink::Vec(v) => v.extend_from_slice(b),
            Sink::Slice(s) => s[self.len..self.len + b.len()].copy_from_slice(b),
        }
        self.len += b.len();
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    pub(crate) fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    pub(crate) fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.put(s.as_bytes());
    }
    pub(crate) fn f32s(&mut self, v: &[f32]) {
        self.usize(v.len());
        for x in v {
            self.put(&x.to_bits().to_le_bytes());
        }
    }
    pub(crate) fn mat(&mut self, m: &Mat<f32>) {
        self.usize(m.nrows());
        self.usize(m.ncols());
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                self.put(&m[(i, j)].to_bits().to_le_bytes());
            }
        }
    }
    pub(crate) fn factor(&mut self, f: &Factor) {
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
    pub(crate) fn schedule(&mut self, s: &Schedule) {
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

/// Checked little-endian byte reader: every read names what it reads, and
/// running past the end is an [`Error::Checkpoint`].
pub(crate) struct R<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> R<'a> {
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
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
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or([0; 4]),
        ))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or([0; 8]),
        ))
    }
    pub(crate) fn f64(&mut self, what: &str) -> Result<f64> {
        Ok(f64::from_bits(self.u64(what)?))
    }
    pub(crate) fn usize(&mut self, what: &str) -> Result<usize> {
        let v = self.u64(what)?;
        usize::try_from(v)
            .map_err(|_| Error::checkpoint(format!("{what} = {v} does not fit usize")))
    }
    /// A length that must fit in the remaining bytes at `elem` bytes each.
    pub(crate) fn len(&mut self, what: &str, elem: usize) -> Result<usize> {
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
    pub(crate) fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::checkpoint(format!("{what}: invalid flag {v}"))),
        }
    }
    pub(crate) fn str(&mut self, what: &str) -> Result<String> {
        let n = self.u32(what)? as usize;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::checkpoint(format!("{what} is not UTF-8")))
    }
    pub(crate) fn f32s(&mut self, what: &str) -> Result<Vec<f32>> {
        let n = self.len(what, 4)?;
        let s = self.take(n * 4, what)?;
        let mut out = crate::mem::with_capacity(n, what)?;
        out.extend(
            s.chunks_exact(4)
                .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        );
        Ok(out)
    }
    pub(crate) fn mat(&mut self, what: &str) -> Result<Mat<f32>> {
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
        crate::mem::from_fn(r, c, what, |i, j| {
            let k = 4 * (i + j * r);
            f32::from_bits(u32::from_le_bytes([s[k], s[k + 1], s[k + 2], s[k + 3]]))
        })
    }
    pub(crate) fn factor(&mut self, what: &str) -> Result<Factor> {
        match self.u8(what)? {
            0 => Ok(Factor::Dense(self.mat(what)?)),
            1 => Ok(Factor::Diag(self.f32s(what)?)),
            t => Err(Error::checkpoint(format!("{what}: unknown factor tag {t}"))),
        }
    }
    pub(crate) fn schedule(&mut self, what: &str) -> Result<Schedule> {
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
        Precision::Auto => 2,
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
    // Since checkpoint format version 2.
    w.bool(c.ignore_conv_dilation);
    // Since version 3.
    w.f64(c.refresh_tolerance);
}

/// Reads a configuration written by checkpoint format `version` (fields
/// added later take their defaults).
pub(crate) fn read_config(r: &mut R<'_>, version: u32) -> Result<Config> {
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
        2 => Precision::Auto,
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
    let ignore_conv_dilation = version >= 2 && r.bool("config.ignore_conv_dilation")?;
    let refresh_tolerance = if version >= 3 {
        r.f64("config.refresh_tolerance")?
    } else {
        0.0
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
        ignore_conv_dilation,
        refresh_tolerance,
        memory_budget: None,
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

pub(crate) fn read_kind(r: &mut R<'_>) -> Result<LayerKind> {
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
