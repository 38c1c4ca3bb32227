//! The preconditioner handle (`KfacPrecond`): create and free, layer
//! registration, observations, steps, gradient averaging, statistics.
//!
//! Each function checks its C arguments (pointers, flags, names), turns
//! caller memory into views (`views`) and calls the runtime; the runtime's
//! errors become statuses through `Fail: From<Error>`. Checkpoints are in
//! `checkpoint`.

use std::ffi::{c_char, CStr};

use kfac_runtime::{
    Conv2dSpec, ImageLayout, LayerId, LayerKind, Observation, Preconditioner, StepStats,
};

use crate::comm::{self, KfacComm};
use crate::config::{read_config, KfacConfig};
use crate::handle::{self, Handle, Kind};
use crate::status::{fail, guard, non_null, Fail, KfacStatus, R};
use crate::views;

/// A K-FAC preconditioner. Opaque.
pub struct KfacPrecond {
    pub(crate) inner: Preconditioner,
}

impl Handle for KfacPrecond {
    const KIND: Kind = Kind::Precond;
}

/// Memory layout of conv2d tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacLayout {
    /// (batch, channel, height, width).
    KFAC_LAYOUT_NCHW = 0,
    /// (batch, height, width, channel).
    KFAC_LAYOUT_NHWC = 1,
}

/// Statistics of a step (times in seconds).
///
/// Extensible like `KfacConfig`: set `struct_size = sizeof(KfacStepStats)`
/// before passing it to `kfac_step` or `kfac_last_stats`; the library
/// writes the fields that fit and zeroes the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KfacStepStats {
    /// `sizeof(KfacStepStats)` of the caller's header, set by the caller.
    pub struct_size: usize,
    /// Index of the step (0 for the first).
    pub step: u64,
    /// 1 when the factors were updated.
    pub factors_updated: u32,
    /// 1 when the inverses were recomputed.
    pub inverses_updated: u32,
    /// KL-clipping factor applied.
    pub kl_scale: f64,
    /// Factor statistics (observe calls) and running averages.
    pub factor_update_s: f64,
    /// Eigendecompositions or inversions.
    pub inversion_s: f64,
    /// Preconditioning and KL clipping.
    pub preconditioning_s: f64,
    /// Collectives.
    pub communication_s: f64,
    /// The whole step plus the observe calls before it.
    pub total_s: f64,
    /// Bytes of state held.
    pub state_bytes: u64,
    /// `Σ <V, grad>` over the layers, before clipping.
    pub vg_sum: f64,
    /// `lr² Σ <V, grad>`: kfac-pytorch's `vg_sum`.
    pub vg_sum_lr2: f64,
    /// Payload bytes this rank sent in the step's collectives.
    pub bytes_sent: u64,
    /// Payload bytes this rank received in the step's collectives.
    pub bytes_received: u64,
    /// Factors of this rank whose previous eigenbasis was kept at this
    /// step's inversion instead of being decomposed again
    /// (`KfacConfig.refresh_tolerance`). Appended after the first layout: a
    /// caller whose header predates it does not get it.
    pub decompositions_kept: u64,
    /// Factors of this rank whose previous eigenbasis was refined by one
    /// step at this step's inversion instead of being decomposed again
    /// (`KfacConfig.refresh_tolerance`). Appended after the second layout.
    pub decompositions_refined: u64,
}

/// The size of `KfacStepStats` before `decompositions_kept` (a released
/// `struct_size`).
const STEP_STATS_V1: usize = 8 + 8 + 2 * 4 + 6 * 8 + 8 + 4 * 8;
/// The size before `decompositions_refined` (a released `struct_size`).
const STEP_STATS_V2: usize = STEP_STATS_V1 + 8;

const _: () = assert!(std::mem::offset_of!(KfacStepStats, struct_size) == 0);
const _: () = assert!(std::mem::size_of::<KfacStepStats>() == STEP_STATS_V2 + 8);

// SAFETY: repr(C), `struct_size: usize` first, integers and floats only
// (any bits valid), no padding.
unsafe impl crate::extensible::Extensible for KfacStepStats {
    const NAME: &'static str = "KfacStepStats";
    const SIZES: &'static [usize] = &[
        STEP_STATS_V1,
        STEP_STATS_V2,
        std::mem::size_of::<KfacStepStats>(),
    ];
    fn defaults() -> Self {
        KfacStepStats::default()
    }
}

/// Writes `s` into the caller's `KfacStepStats` at `out`, of `size` bytes
/// (its `struct_size`, checked with `extensible::declared_size` before the
/// call changed anything).
///
/// # Safety
/// `out` non-NULL with `size` writable bytes.
unsafe fn write_stats(out: *mut KfacStepStats, size: usize, s: &StepStats) -> R<()> {
    // SAFETY: forwarded contract.
    unsafe { crate::extensible::write(out, size, to_stats(s)) }
}

/// A layer's gradient for `kfac_step`, preconditioned in place. `weight`
/// is `out x in` row-major with leading dimension `ldw` (PyTorch layout:
/// conv2d `C_out x (C_in kh kw)`, embedding `num x dim`); `bias` has `out`
/// values, or is NULL for layers without bias.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KfacGrad {
    /// Layer id from `kfac_register_*`.
    pub layer: u32,
    /// Weight gradient.
    pub weight: *mut f32,
    /// Leading dimension of `weight` (>= its number of columns).
    pub ldw: usize,
    /// Bias gradient or NULL.
    pub bias: *mut f32,
}

/// Runs `f` on the live preconditioner `p`.
///
/// # Safety
/// `p` not used by another thread during the call.
pub(crate) unsafe fn with_mut<U>(
    p: *mut KfacPrecond,
    f: impl FnOnce(&mut Preconditioner) -> R<U>,
) -> R<U> {
    // SAFETY: forwarded contract.
    unsafe { handle::with_mut(p, |h| f(&mut h.inner)) }
}

/// Runs `f` on the live preconditioner `p` (read-only).
///
/// # Safety
/// As [`with_mut`].
pub(crate) unsafe fn with_ref<U>(
    p: *const KfacPrecond,
    f: impl FnOnce(&Preconditioner) -> R<U>,
) -> R<U> {
    // SAFETY: forwarded contract.
    unsafe { handle::with_ref(p, |h| f(&h.inner)) }
}

/// Hands `p` to the caller as a new handle.
///
/// # Safety
/// `out` non-NULL and writable.
pub(crate) unsafe fn publish(p: Preconditioner, out: *mut *mut KfacPrecond) -> R<()> {
    // SAFETY: forwarded contract.
    unsafe { handle::publish(KfacPrecond { inner: p }, out) }
}

/// Publishes `p` with the connection of `comm` (NULL: single process) and
/// writes the handle to `*out`, or, on any failure, leaves `comm` with the
/// caller as it was and `*out` unwritten (`p` is dropped).
///
/// # Safety
/// `out` non-NULL and writable.
pub(crate) unsafe fn publish_with_comm(
    p: Preconditioner,
    comm: *mut KfacComm,
    out: *mut *mut KfacPrecond,
) -> R<()> {
    // The handle first (its only failure, running out of handle values,
    // comes before the communicator is touched), then the connection.
    let mut h: *mut KfacPrecond = std::ptr::null_mut();
    // SAFETY: `h` is a writable local.
    unsafe { publish(p, &mut h) }?;
    // SAFETY: forwarded contract.
    let taken = unsafe { comm::take(comm) };
    let moved = taken.and_then(|c| {
        // SAFETY: `h` was just published and is not known to the caller.
        unsafe {
            with_mut(h, |pc| {
                pc.set_communicator(c);
                Ok(())
            })
        }
    });
    if let Err(e) = moved {
        // SAFETY: `h` is ours; nobody else has seen it.
        let _ = unsafe { kfac_precond_free(h) };
        return Err(e);
    }
    // SAFETY: the caller's contract.
    unsafe { out.write(h) };
    Ok(())
}

/// Creates a preconditioner. `comm` may be NULL (single process); otherwise,
/// on success only, the preconditioner takes over the communicator's
/// connection (the `comm` handle must still be freed with `kfac_comm_free`,
/// and cannot be passed to another preconditioner). On any failure `comm`
/// is untouched: still usable, still the caller's to free. `config` is read
/// as described at `KfacConfig` (`struct_size`); an invalid field is
/// `KFAC_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `config` NULL or `config->struct_size` readable bytes; `comm` NULL or a
/// live handle; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_precond_create(
    config: *const KfacConfig,
    comm: *mut KfacComm,
    out: *mut *mut KfacPrecond,
) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: forwarded contract.
        let cfg = unsafe { read_config(config) }?;
        let p = Preconditioner::new(cfg)?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { publish_with_comm(p, comm, out) }
    })
}

/// Frees a preconditioner (also a poisoned one). NULL is a no-op; a freed
/// handle is refused (`KFAC_ERR_INVALID_HANDLE`), one in use by a call on
/// another thread too (`KFAC_ERR_BUSY`; it stays live).
///
/// # Safety
/// `p` NULL or a handle from `kfac_precond_create`/`kfac_load`.
#[no_mangle]
pub unsafe extern "C" fn kfac_precond_free(p: *mut KfacPrecond) -> KfacStatus {
    // SAFETY: forwarded contract.
    unsafe { handle::free(p) }
}

/// A layer name: non-NULL, UTF-8, not empty.
fn name_of<'a>(name: *const c_char) -> R<&'a str> {
    non_null(name, "layer name")?;
    // SAFETY: non-NULL, NUL-terminated by contract.
    let s = unsafe { CStr::from_ptr(name) }.to_str().map_err(|_| {
        Fail(
            KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
            "layer name is not UTF-8".into(),
        )
    })?;
    if s.is_empty() {
        return fail(KfacStatus::KFAC_ERR_INVALID_ARGUMENT, "layer name is empty");
    }
    Ok(s)
}

fn bias_flag(bias: u32) -> R<bool> {
    match bias {
        0 => Ok(false),
        1 => Ok(true),
        b => fail(
            KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
            format!("bias must be 0 or 1, got {b}"),
        ),
    }
}

/// # Safety
/// `p` live, `name` NULL or NUL-terminated, `out_id` NULL or writable.
unsafe fn register(
    p: *mut KfacPrecond,
    name: *const c_char,
    kind: impl FnOnce() -> R<LayerKind>,
    out_id: *mut u32,
) -> KfacStatus {
    guard(|| {
        non_null(out_id, "out_id")?;
        let name = name_of(name)?;
        let kind = kind()?;
        // SAFETY: forwarded contract.
        let id = unsafe { with_mut(p, |pc| Ok(pc.register(name, kind)?)) }?;
        let id = u32::try_from(id.0).map_err(|_| {
            Fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                "more than 2^32 layers".into(),
            )
        })?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { out_id.write(id) };
        Ok(())
    })
}

/// Registers a linear layer `y = W x + b` (`W: out x in`). `bias` is 0 or
/// 1; `name` non-empty UTF-8, unique. Layer ids count from 0 in
/// registration order.
///
/// # Safety
/// `p` a live handle; `name` a NUL-terminated string; `out_id` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_linear(
    p: *mut KfacPrecond,
    name: *const c_char,
    in_features: usize,
    out_features: usize,
    bias: u32,
    out_id: *mut u32,
) -> KfacStatus {
    let kind = || {
        Ok(LayerKind::Linear {
            in_features,
            out_features,
            bias: bias_flag(bias)?,
        })
    };
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// Registers a conv2d layer (groups = 1). `layout` is a `KfacLayout`
/// value (`KFAC_LAYOUT_NCHW` or `KFAC_LAYOUT_NHWC`); any other value is
/// refused with `KFAC_ERR_INVALID_ARGUMENT`, as is a `bias` other than 0/1.
///
/// # Safety
/// As `kfac_register_linear`.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_conv2d(
    p: *mut KfacPrecond,
    name: *const c_char,
    in_channels: usize,
    out_channels: usize,
    kernel_h: usize,
    kernel_w: usize,
    stride_h: usize,
    stride_w: usize,
    pad_h: usize,
    pad_w: usize,
    dilation_h: usize,
    dilation_w: usize,
    bias: u32,
    layout: u32,
    out_id: *mut u32,
) -> KfacStatus {
    let kind = || {
        let layout = match layout {
            0 => ImageLayout::Nchw,
            1 => ImageLayout::Nhwc,
            l => {
                return fail(
                    KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                    format!("layout {l} is not KFAC_LAYOUT_NCHW or KFAC_LAYOUT_NHWC"),
                )
            }
        };
        Ok(LayerKind::Conv2d(Conv2dSpec {
            in_channels,
            out_channels,
            kernel: (kernel_h, kernel_w),
            stride: (stride_h, stride_w),
            padding: (pad_h, pad_w),
            dilation: (dilation_h, dilation_w),
            bias: bias_flag(bias)?,
            layout,
        }))
    };
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// Registers an embedding (weight `num_embeddings x dim`).
///
/// # Safety
/// As `kfac_register_linear`.
#[no_mangle]
pub unsafe extern "C" fn kfac_register_embedding(
    p: *mut KfacPrecond,
    name: *const c_char,
    num_embeddings: usize,
    dim: usize,
    out_id: *mut u32,
) -> KfacStatus {
    let kind = || {
        Ok(LayerKind::Embedding {
            num_embeddings,
            dim,
        })
    };
    // SAFETY: forwarded contract.
    unsafe { register(p, name, kind, out_id) }
}

/// Observes a micro-batch of a linear layer: activations `n x in` (leading
/// dimension `lda`) and output gradients `n x out` (`ldg`). The arrays are
/// read during the call only.
///
/// # Safety
/// `p` a live handle; `a` at least `(n-1)*lda + in` floats, `g` at least
/// `(n-1)*ldg + out`.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_linear(
    p: *mut KfacPrecond,
    layer: u32,
    a: *const f32,
    n: usize,
    lda: usize,
    g: *const f32,
    ldg: usize,
) -> KfacStatus {
    let observe = |pc: &mut Preconditioner| -> R<()> {
        let LayerKind::Linear {
            in_features,
            out_features,
            ..
        } = views::layer_kind(pc, layer)?
        else {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("layer {layer} is not a linear layer"),
            );
        };
        // SAFETY: the caller's contract: `a` and `g` hold the documented
        // number of floats, read only during this call.
        let (a, g) = unsafe {
            (
                views::matrix(a, n, in_features, lda, "activations")?,
                views::matrix(g, n, out_features, ldg, "output gradients")?,
            )
        };
        let obs = Observation::Linear {
            activations: a,
            output_grads: g,
        };
        Ok(pc.observe(LayerId(layer as usize), obs)?)
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { with_mut(p, observe) })
}

/// Observes a micro-batch of a conv2d layer: `input` `(n, C_in, h, w)` and
/// `output_grads` `(n, C_out, H_out, W_out)`, dense in the layer's layout.
///
/// # Safety
/// `p` a live handle; the arrays hold the documented number of floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_conv2d(
    p: *mut KfacPrecond,
    layer: u32,
    input: *const f32,
    output_grads: *const f32,
    n: usize,
    h: usize,
    w: usize,
) -> KfacStatus {
    let observe = |pc: &mut Preconditioner| -> R<()> {
        let LayerKind::Conv2d(spec) = views::layer_kind(pc, layer)? else {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("layer {layer} is not a conv2d layer"),
            );
        };
        non_null(input, "input")?;
        non_null(output_grads, "output_grads")?;
        let (li, lo) = views::conv_lengths(&spec, n, h, w)?;
        // SAFETY: non-NULL; the caller guarantees these lengths
        // (documented), read only during this call.
        let (xi, xo) = unsafe {
            (
                std::slice::from_raw_parts(input, li),
                std::slice::from_raw_parts(output_grads, lo),
            )
        };
        let obs = Observation::Conv2d {
            input: xi,
            output_grads: xo,
            batch: n,
            height: h,
            width: w,
        };
        Ok(pc.observe(LayerId(layer as usize), obs)?)
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { with_mut(p, observe) })
}

/// Observes an embedding lookup: `n` token ids and output gradients
/// `n x dim` (`ldg`).
///
/// # Safety
/// `p` a live handle; `tokens` `n` values; `g` `(n-1)*ldg + dim` floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_observe_embedding(
    p: *mut KfacPrecond,
    layer: u32,
    tokens: *const u64,
    n: usize,
    g: *const f32,
    ldg: usize,
) -> KfacStatus {
    let observe = |pc: &mut Preconditioner| -> R<()> {
        let LayerKind::Embedding { dim, .. } = views::layer_kind(pc, layer)? else {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("layer {layer} is not an embedding"),
            );
        };
        non_null(tokens, "tokens")?;
        // SAFETY: the caller's contract: `g` holds the documented number of
        // floats and `tokens` (non-NULL) `n` values, read during this call.
        let (gv, t) = unsafe {
            (
                views::matrix(g, n, dim, ldg, "output gradients")?,
                std::slice::from_raw_parts(tokens, n),
            )
        };
        let t = t
            .iter()
            .map(|&v| usize::try_from(v))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| {
                Fail(
                    KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                    "a token id does not fit in size_t".into(),
                )
            })?;
        let obs = Observation::Embedding {
            tokens: &t,
            output_grads: gv,
        };
        Ok(pc.observe(LayerId(layer as usize), obs)?)
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { with_mut(p, observe) })
}

/// The `count` entries at `grads` (`&[]` for none).
///
/// # Safety
/// `grads` NULL or `count` readable entries.
unsafe fn entries<'a>(grads: *const KfacGrad, count: usize) -> R<&'a [KfacGrad]> {
    if count == 0 {
        return Ok(&[]);
    }
    non_null(grads, "grads")?;
    // SAFETY: non-NULL, `count` readable entries by contract.
    Ok(unsafe { std::slice::from_raw_parts(grads, count) })
}

/// One K-FAC step over `count` gradients (one per preconditioned layer),
/// preconditioned in place. `stats` may be NULL; otherwise its
/// `struct_size` must be set (see `KfacStepStats`). Weight and bias buffers
/// must not overlap each other.
///
/// # Safety
/// `p` a live handle; `grads` `count` readable entries whose buffers hold
/// the documented number of floats and stay valid during the call; `stats`
/// NULL or `stats->struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kfac_step(
    p: *mut KfacPrecond,
    grads: *const KfacGrad,
    count: usize,
    stats: *mut KfacStepStats,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let gs = unsafe { entries(grads, count) }?;
        // A bad `stats->struct_size` is refused before the step.
        let size = if stats.is_null() {
            None
        } else {
            // SAFETY: non-NULL, starts with its size by contract.
            Some(unsafe { crate::extensible::declared_size(stats, "stats") }?)
        };
        // SAFETY: forwarded contract.
        let s = unsafe {
            with_mut(p, |pc| {
                let mut lg = views::grads(pc, gs)?;
                Ok(pc.step(&mut lg)?)
            })
        }?;
        if let Some(size) = size {
            // SAFETY: non-NULL, `size` writable bytes by contract.
            unsafe { write_stats(stats, size, &s) }?;
        }
        Ok(())
    })
}

/// Averages gradients across the ranks of the preconditioner's
/// communicator (`sum / P`, in place), for stacks that do not average them
/// themselves. Same buffers and rules as `kfac_step`.
///
/// # Safety
/// As `kfac_step`.
#[no_mangle]
pub unsafe extern "C" fn kfac_allreduce_gradients(
    p: *mut KfacPrecond,
    grads: *const KfacGrad,
    count: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let gs = unsafe { entries(grads, count) }?;
        // SAFETY: forwarded contract.
        unsafe {
            with_mut(p, |pc| {
                let mut lg = views::grads(pc, gs)?;
                Ok(pc.allreduce_gradients(&mut lg)?)
            })
        }
    })
}

fn to_stats(s: &StepStats) -> KfacStepStats {
    KfacStepStats {
        struct_size: std::mem::size_of::<KfacStepStats>(),
        step: s.step,
        factors_updated: s.factors_updated as u32,
        inverses_updated: s.inverses_updated as u32,
        kl_scale: s.kl_scale,
        factor_update_s: s.times.factor_update.as_secs_f64(),
        inversion_s: s.times.inversion.as_secs_f64(),
        preconditioning_s: s.times.preconditioning.as_secs_f64(),
        communication_s: s.times.communication.as_secs_f64(),
        total_s: s.times.total.as_secs_f64(),
        state_bytes: s.state_bytes as u64,
        vg_sum: s.vg_sum,
        vg_sum_lr2: s.vg_sum_lr2,
        bytes_sent: s.bytes_sent,
        bytes_received: s.bytes_received,
        decompositions_kept: s.decompositions_kept as u64,
        decompositions_refined: s.decompositions_refined as u64,
    }
}

/// Statistics and stage timings of the last step; `KFAC_ERR_STATE` before
/// the first step. Set `out->struct_size = sizeof(KfacStepStats)` first.
///
/// # Safety
/// `p` a live handle; `out` NULL or `out->struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kfac_last_stats(
    p: *const KfacPrecond,
    out: *mut KfacStepStats,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let size = unsafe { crate::extensible::declared_size(out, "out") }?;
        // SAFETY: forwarded contract.
        let s = unsafe {
            with_ref(p, |pc| match pc.last_stats() {
                Some(s) => Ok(s.clone()),
                None => fail(KfacStatus::KFAC_ERR_STATE, "no step has completed yet"),
            })
        }?;
        // SAFETY: `size` writable bytes by contract.
        unsafe { write_stats(out, size, &s) }
    })
}

/// Number of completed steps.
///
/// # Safety
/// `p` a live handle; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_steps(p: *const KfacPrecond, out: *mut u64) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: forwarded contract.
        let n = unsafe { with_ref(p, |pc| Ok(pc.steps())) }?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Number of registered layers (ids are `0 .. *out - 1`).
///
/// # Safety
/// `p` a live handle; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_num_layers(p: *const KfacPrecond, out: *mut usize) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: forwarded contract.
        let n = unsafe { with_ref(p, |pc| Ok(pc.num_layers())) }?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { out.write(n) };
        Ok(())
    })
}
