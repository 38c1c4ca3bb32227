//! `KfacConfig` and its conversion to and from `kfac_runtime::Config`, the
//! presets (`kfac_config_default`, `kfac_config_kfac_pytorch`).
//!
//! Every C value is checked here (flags are 0 or 1, enums are known values,
//! `kl_clip` is finite) before `Config::validate` checks the ranges.

use std::mem::size_of;

use kfac_runtime::{Compat, Config, Method, Precision, Schedule, WirePrecision};

use crate::extensible::{self, Extensible};
use crate::status::{fail, guard, Fail, KfacStatus, R};

/// Inversion method.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacMethod {
    /// Eigendecompositions.
    KFAC_METHOD_EIGEN = 0,
    /// Damped Cholesky inverses.
    KFAC_METHOD_INVERSE = 1,
}

/// Preconditioner settings. Fill with `kfac_config_default(&c, sizeof c)`
/// (or `kfac_config_kfac_pytorch`), then adjust fields.
///
/// Extensible: `struct_size` is set by those functions to `sizeof c` and
/// must stay so. Fields are only ever appended. The library reads the
/// fields that fit in `struct_size` (a caller built against an older header
/// gets the defaults of newer fields); a `struct_size` larger than the
/// library's `KfacConfig` (a newer header) is accepted only if every byte
/// the library does not know is zero; a `struct_size` smaller than the
/// first extensible layout, or above 4096, is refused with
/// `KFAC_ERR_INVALID_ARGUMENT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KfacConfig {
    /// `sizeof(KfacConfig)` of the caller's header (set by
    /// `kfac_config_default`).
    pub struct_size: usize,
    /// Tikhonov damping (> 0). Default 1e-3.
    pub damping: f64,
    /// Running-average decay of the factors, in [0, 1) ([0, 1] with
    /// `kfac_pytorch_compat`). Default 0.95.
    pub factor_decay: f64,
    /// KL clipping threshold: finite; <= 0 disables. Default 1e-3.
    pub kl_clip: f64,
    /// Learning rate used by KL clipping (>= 0). Default 0.1.
    pub lr: f64,
    /// Gradient-worker fraction in (0, 1]. Default 1.
    pub grad_worker_fraction: f64,
    /// Factors are updated every this many steps (>= 1). Default 1.
    pub factor_update_steps: u64,
    /// Inverses are recomputed every this many steps (>= 1). Default 10
    /// (1 in `kfac_config_kfac_pytorch`).
    pub inv_update_steps: u64,
    /// Eigen or inverse method, a `KfacMethod` value (a plain integer here,
    /// so any value C stores is well-defined and an unknown one is refused).
    /// Default `KFAC_METHOD_EIGEN`.
    pub method: u32,
    /// Precision of the eigendecompositions (`Precision` in Rust): 0 f32,
    /// 1 f64, 2 automatic per layer (the default: f32 where its predicted
    /// error of the preconditioned gradient is at most 1e-3, f64
    /// otherwise; see `Precision::Auto`). The name is historical: 1 was
    /// the default before 2 existed.
    pub eigen_f64: u32,
    /// 1: precompute 1/(l_G l_A^T + damping) at the inverse step. Default 0.
    pub precompute_denominators: u32,
    /// 1: reproduce kfac-pytorch 0.4's numbers. Default 0.
    pub kfac_pytorch_compat: u32,
    /// Worker threads (0: one per core). Default 0.
    pub threads: u32,
    /// Factor statistics on the wire: 0 f32 (default), 1 bf16, 2 f16.
    pub wire: u32,
    /// 1: conv2d A statistics as if undilated, as kfac-pytorch computes
    /// them (wrong for dilated convs; only for reproducing its numbers).
    /// Default 0.
    pub ignore_conv_dilation: u32,
    /// Must be 0 (keeps the struct free of padding; a later field).
    pub reserved: u32,
    /// Bytes the preconditioner may hold; 0 (default): no limit. Charged:
    /// each layer's factors, accumulators and decompositions at full size
    /// when it is registered, the inversion scratch of every worker thread
    /// for the largest factor, and kernel scratch as observations of larger
    /// batches grow it. A registration or observation beyond it returns
    /// `KFAC_ERR_NO_MEMORY` (the message gives the bytes needed) and changes
    /// nothing. Not stored in checkpoints. Appended after the first
    /// layout: a caller whose header predates it gets 0.
    pub memory_budget: u64,
    /// Refresh only what drifted (eigen method, native conventions;
    /// `Config::refresh_tolerance` in Rust): at an inverse update, a
    /// factor's previous eigenbasis `Q` is kept, with the eigenvalue
    /// estimates `diag(Q^T F Q)`, when `||offdiag(Q^T F Q)||_F` times the
    /// partner factor's largest eigenvalue over the damping is at most this
    /// tolerance; each factor's damped Kronecker inverse then changes by at
    /// most the tolerance (relative), the preconditioned gradient by about
    /// twice it. 0 (default): every factor is decomposed every time. Must be
    /// finite and >= 0 (else `KFAC_ERR_INVALID_ARGUMENT`); ignored with
    /// `kfac_pytorch_compat`. Appended after `memory_budget`: a caller
    /// whose header predates it gets 0.
    pub refresh_tolerance: f64,
}

/// The layout of `KfacConfig` before `memory_budget` (frozen; its size is
/// a released `struct_size`).
#[repr(C)]
#[allow(dead_code)]
struct KfacConfigV1 {
    struct_size: usize,
    floats: [f64; 5],
    steps: [u64; 2],
    flags: [u32; 8],
}

/// The layout of `KfacConfig` before `refresh_tolerance` (frozen; its size
/// is a released `struct_size`).
#[repr(C)]
#[allow(dead_code)]
struct KfacConfigV2 {
    v1: KfacConfigV1,
    memory_budget: u64,
}

// The rules of `extensible` need `struct_size` first and no padding at the
// end (where a later field could go); the fields above have none at all.
const _: () = assert!(std::mem::offset_of!(KfacConfig, struct_size) == 0);
const _: () = assert!(size_of::<KfacConfigV1>() == size_of::<usize>() + 5 * 8 + 2 * 8 + 8 * 4);
const _: () = assert!(size_of::<KfacConfigV2>() == size_of::<KfacConfigV1>() + 8);
const _: () = assert!(size_of::<KfacConfig>() == size_of::<KfacConfigV2>() + 8);

// SAFETY: repr(C), `struct_size: usize` first, every field an integer or a
// float (any bits valid).
unsafe impl Extensible for KfacConfig {
    const NAME: &'static str = "KfacConfig";
    const SIZES: &'static [usize] = &[
        size_of::<KfacConfigV1>(),
        size_of::<KfacConfigV2>(),
        size_of::<KfacConfig>(),
    ];
    fn defaults() -> Self {
        // Config::default() has constant schedules and no exclusions.
        KfacConfig::from_runtime(&Config::default()).unwrap_or_else(|| unreachable!())
    }
}

fn flag(v: u32, what: &str) -> R<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => fail(
            KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
            format!("{what} must be 0 or 1, got {v}"),
        ),
    }
}

impl KfacConfig {
    /// The C form of `cfg`, with `struct_size = sizeof(KfacConfig)`; `None`
    /// when it cannot be expressed in C (a schedule that is not constant,
    /// excluded layers, more than `u32::MAX` threads).
    pub fn from_runtime(cfg: &Config) -> Option<KfacConfig> {
        let constant = |s: &Schedule| match s {
            Schedule::Constant(v) => Some(*v),
            _ => None,
        };
        if !cfg.exclude.is_empty() {
            return None;
        }
        Some(KfacConfig {
            struct_size: size_of::<KfacConfig>(),
            damping: constant(&cfg.damping)?,
            factor_decay: cfg.factor_decay,
            kl_clip: cfg.kl_clip.unwrap_or(0.0),
            lr: constant(&cfg.lr)?,
            grad_worker_fraction: cfg.grad_worker_fraction,
            factor_update_steps: cfg.factor_update_steps,
            inv_update_steps: cfg.inv_update_steps,
            method: match cfg.method {
                Method::Eigen => KfacMethod::KFAC_METHOD_EIGEN as u32,
                Method::Inverse => KfacMethod::KFAC_METHOD_INVERSE as u32,
            },
            eigen_f64: match cfg.eigen_precision {
                Precision::F32 => 0,
                Precision::F64 => 1,
                Precision::Auto => 2,
            },
            precompute_denominators: cfg.precompute_denominators as u32,
            kfac_pytorch_compat: (cfg.compat == Compat::KfacPytorch) as u32,
            threads: u32::try_from(cfg.threads).ok()?,
            wire: match cfg.wire {
                WirePrecision::F32 => 0,
                WirePrecision::Bf16 => 1,
                WirePrecision::F16 => 2,
            },
            ignore_conv_dilation: cfg.ignore_conv_dilation as u32,
            reserved: 0,
            memory_budget: cfg
                .memory_budget
                .map_or(Some(0), |b| u64::try_from(b).ok())?,
            refresh_tolerance: cfg.refresh_tolerance,
        })
    }

    /// The runtime configuration these values describe, validated
    /// (`struct_size` is not looked at: the value is already read).
    ///
    /// # Errors
    /// The status (`KFAC_ERR_INVALID_ARGUMENT`) and message of the first
    /// bad field.
    pub fn to_runtime(&self) -> Result<Config, Fail> {
        let c = self;
        if !c.kl_clip.is_finite() {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!(
                    "kl_clip {} is not finite (<= 0 disables clipping)",
                    c.kl_clip
                ),
            );
        }
        let cfg = Config {
            damping: Schedule::Constant(c.damping),
            factor_decay: c.factor_decay,
            kl_clip: (c.kl_clip > 0.0).then_some(c.kl_clip),
            lr: Schedule::Constant(c.lr),
            factor_update_steps: c.factor_update_steps,
            inv_update_steps: c.inv_update_steps,
            method: match c.method {
                0 => Method::Eigen,
                1 => Method::Inverse,
                m => {
                    return fail(
                        KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                        format!("method {m} is not 0 (eigen) or 1 (inverse)"),
                    )
                }
            },
            eigen_precision: match c.eigen_f64 {
                0 => Precision::F32,
                1 => Precision::F64,
                2 => Precision::Auto,
                v => {
                    return fail(
                        KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                        format!("eigen_f64 {v} is not 0 (f32), 1 (f64) or 2 (automatic)"),
                    )
                }
            },
            precompute_denominators: flag(c.precompute_denominators, "precompute_denominators")?,
            exclude: Vec::new(),
            compat: if flag(c.kfac_pytorch_compat, "kfac_pytorch_compat")? {
                Compat::KfacPytorch
            } else {
                Compat::Native
            },
            threads: c.threads as usize,
            grad_worker_fraction: c.grad_worker_fraction,
            wire: match c.wire {
                0 => WirePrecision::F32,
                1 => WirePrecision::Bf16,
                2 => WirePrecision::F16,
                w => {
                    return fail(
                        KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                        format!("wire {w} is not 0, 1 or 2"),
                    )
                }
            },
            ignore_conv_dilation: flag(c.ignore_conv_dilation, "ignore_conv_dilation")?,
            refresh_tolerance: c.refresh_tolerance,
            memory_budget: match c.memory_budget {
                0 => None,
                b => Some(usize::try_from(b).unwrap_or(usize::MAX)),
            },
        };
        if c.reserved != 0 {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!("reserved must be 0, got {}", c.reserved),
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Reads and converts the caller's configuration at `p`.
///
/// # Safety
/// `p` NULL or `p->struct_size` readable bytes.
pub(crate) unsafe fn read_config(p: *const KfacConfig) -> R<Config> {
    // SAFETY: forwarded contract.
    unsafe { extensible::read(p, "config") }?.to_runtime()
}

/// Writes the preset `cfg` to the caller's struct.
///
/// # Safety
/// `out` NULL or `struct_size` writable bytes.
unsafe fn write_preset(out: *mut KfacConfig, struct_size: usize, cfg: &Config) -> KfacStatus {
    guard(|| {
        let c = KfacConfig::from_runtime(cfg).ok_or_else(|| {
            Fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                "preset not expressible in C".into(),
            )
        })?;
        // SAFETY: forwarded contract.
        unsafe { extensible::write(out, struct_size, c) }
    })
}

/// Fills `out` with the documented defaults (those of Rust's
/// `Config::default()`) and sets `out->struct_size = struct_size`. Pass
/// `sizeof *out` as `struct_size`.
///
/// `KFAC_ERR_NULL` for a NULL `out`, `KFAC_ERR_INVALID_ARGUMENT` for a
/// `struct_size` the library does not accept (see `KfacConfig`; nothing is
/// written then).
///
/// # Safety
/// `out` must be NULL or point to `struct_size` writable bytes. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn kfac_config_default(
    out: *mut KfacConfig,
    struct_size: usize,
) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { write_preset(out, struct_size, &Config::default()) }
}

/// Fills `out` with kfac-pytorch 0.4's defaults and conventions (Rust's
/// `Config::kfac_pytorch()`: `kfac_pytorch_compat = 1`, `eigen_f64 = 0`,
/// `precompute_denominators = 1`, the rest as `kfac_config_default`).
/// Statuses and `struct_size` as `kfac_config_default`.
///
/// # Safety
/// As `kfac_config_default`.
#[no_mangle]
pub unsafe extern "C" fn kfac_config_kfac_pytorch(
    out: *mut KfacConfig,
    struct_size: usize,
) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { write_preset(out, struct_size, &Config::kfac_pytorch()) }
}
