//! Read access for users comparing against another implementation or
//! checking a restored checkpoint: layers by name, their kinds and sizes,
//! their factors and current decomposition, and the loss scale of
//! mixed-precision training (`kfac_set_grad_scale`). Matrices are written
//! row-major with a leading dimension, like every matrix in this ABI.

use std::ffi::{c_char, CStr};

use faer::Mat;
use kfac_runtime::{Decomposition, LayerId, LayerKind};

use crate::precond::{with_mut, with_ref, KfacPrecond};
use crate::status::{fail, guard, non_null, KfacStatus, R};

/// Kind of a registered layer, as `kfac_layer_info` reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacLayerKind {
    /// `kfac_register_linear`.
    KFAC_LAYER_LINEAR = 0,
    /// `kfac_register_conv2d`.
    KFAC_LAYER_CONV2D = 1,
    /// `kfac_register_embedding` (diagonal A).
    KFAC_LAYER_EMBEDDING = 2,
    /// A generic Kronecker block (Rust API only).
    KFAC_LAYER_KRONECKER = 3,
}

/// What `kfac_get_decomposition` wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum KfacDecompositionKind {
    /// Eigenvectors (`a`, `g`) and eigenvalues (`la`, `lg`).
    KFAC_DECOMPOSITION_EIGEN = 0,
    /// Damped inverses (`a`, `g`); `la`/`lg` untouched.
    KFAC_DECOMPOSITION_INVERSE = 1,
}

/// Sets the loss scale of mixed-precision training (kfac-pytorch's
/// `grad_scaler`): output gradients observed from now on are divided by
/// `scale` before their statistics are taken. The weight gradients passed
/// to `kfac_step` must already be unscaled. `KFAC_ERR_INVALID_ARGUMENT`
/// unless `scale` is finite, `> 0`, and `1/scale²` a normal float.
///
/// # Safety
/// `p` a live handle, not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn kfac_set_grad_scale(p: *mut KfacPrecond, scale: f64) -> KfacStatus {
    // SAFETY: forwarded contract.
    guard(|| unsafe { with_mut(p, |pc| Ok(pc.set_grad_scale(scale)?)) })
}

/// The id of the layer registered under `name` (also after `kfac_load`);
/// `KFAC_ERR_INVALID_ARGUMENT` when no layer has that name.
///
/// # Safety
/// `p` a live handle; `name` a NUL-terminated string; `out_id` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_layer_id(
    p: *const KfacPrecond,
    name: *const c_char,
    out_id: *mut u32,
) -> KfacStatus {
    guard(|| {
        non_null(name, "name")?;
        non_null(out_id, "out_id")?;
        // SAFETY: non-NULL, NUL-terminated by contract.
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: forwarded contract.
        let id = unsafe {
            with_ref(p, |pc| match pc.layer_id(&name) {
                Some(id) => Ok(id.0 as u32),
                None => fail(
                    KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                    format!("no layer is named '{name}'"),
                ),
            })
        }?;
        // SAFETY: non-NULL, writable by contract.
        unsafe { out_id.write(id) };
        Ok(())
    })
}

/// Copies layer `id`'s name, NUL-terminated, into `buf` (`len` bytes) and
/// its length without the NUL into `*written`; `KFAC_ERR_BUFFER_TOO_SMALL`
/// (with `*written` set to the length needed, NUL excluded) when it does
/// not fit. `buf` may be NULL when `len` is 0, to ask for the length.
///
/// # Safety
/// `p` a live handle; `buf` NULL (with `len == 0`) or `len` writable bytes;
/// `written` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_layer_name(
    p: *const KfacPrecond,
    id: u32,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> KfacStatus {
    guard(|| {
        non_null(written, "written")?;
        if len > 0 {
            non_null(buf, "buf")?;
        }
        // SAFETY: forwarded contract.
        let name =
            unsafe { with_ref(p, |pc| Ok(pc.layer_name(LayerId(id as usize))?.to_string())) }?;
        // SAFETY: non-NULL, writable by contract.
        unsafe { written.write(name.len()) };
        if name.len() >= len {
            return fail(
                KfacStatus::KFAC_ERR_BUFFER_TOO_SMALL,
                format!(
                    "the name needs {} bytes with its NUL, buffer has {len}",
                    name.len() + 1
                ),
            );
        }
        // SAFETY: `len > name.len()` writable bytes at `buf`, which cannot
        // overlap the fresh `name`.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr(), buf.cast::<u8>(), name.len());
            buf.add(name.len()).write(0);
        }
        Ok(())
    })
}

/// Layer `id`'s kind and the sizes of its factors: `*d_a` (A is
/// `d_a x d_a`, the bias included; diagonal for embeddings) and `*d_g`
/// (G is `d_g x d_g`). Any output pointer may be NULL.
///
/// # Safety
/// `p` a live handle; each output NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_layer_info(
    p: *const KfacPrecond,
    id: u32,
    kind: *mut u32,
    d_a: *mut usize,
    d_g: *mut usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let k = unsafe { with_ref(p, |pc| Ok(pc.layer_kind(LayerId(id as usize))?.clone())) }?;
        let (dg, da) = k.dims();
        let code = match k {
            LayerKind::Linear { .. } => KfacLayerKind::KFAC_LAYER_LINEAR,
            LayerKind::Conv2d(_) => KfacLayerKind::KFAC_LAYER_CONV2D,
            LayerKind::Embedding { .. } => KfacLayerKind::KFAC_LAYER_EMBEDDING,
            _ => KfacLayerKind::KFAC_LAYER_KRONECKER,
        };
        // SAFETY: each non-NULL pointer is writable by contract.
        unsafe {
            if !kind.is_null() {
                kind.write(code as u32);
            }
            if !d_a.is_null() {
                d_a.write(da);
            }
            if !d_g.is_null() {
                d_g.write(dg);
            }
        }
        Ok(())
    })
}

/// A caller's row-major output matrix: checked before anything is
/// written, so an error leaves every buffer as it was.
struct Out {
    ptr: *mut f32,
    ld: usize,
}

impl Out {
    /// Checks `ptr`/`ld` for an `r x c` matrix.
    fn matrix(ptr: *mut f32, ld: usize, r: usize, c: usize, what: &str) -> R<Out> {
        non_null(ptr, what)?;
        if ld < c {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("{what}: leading dimension {ld} < {c} columns"),
            );
        }
        if r.saturating_sub(1)
            .checked_mul(ld)
            .and_then(|x| x.checked_add(c))
            .is_none()
        {
            return fail(
                KfacStatus::KFAC_ERR_SHAPE,
                format!("{what}: size overflows"),
            );
        }
        Ok(Out { ptr, ld })
    }

    /// Writes `m` row-major.
    ///
    /// # Safety
    /// `(rows - 1) * ld + cols` writable floats at `ptr` (checked shape).
    unsafe fn write(&self, m: &Mat<f32>) {
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                // SAFETY: `i * ld + j < (rows - 1) * ld + cols`.
                unsafe { self.ptr.add(i * self.ld + j).write(m[(i, j)]) };
            }
        }
    }
}

/// Writes `v` at `out` (`v.len()` floats).
///
/// # Safety
/// `out` non-NULL with `v.len()` writable floats.
unsafe fn write_vector(v: &[f32], out: *mut f32) {
    // SAFETY: by contract; `v` is ours, so no overlap.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, v.len()) };
}

/// Copies layer `id`'s current factors as full symmetric matrices
/// (row-major, leading dimensions `lda`, `ldg`; a diagonal A expanded):
/// `a` is `d_a x d_a`, `g` is `d_g x d_g` (sizes from `kfac_layer_info`).
///
/// # Safety
/// `p` a live handle; `a` and `g` hold `(d - 1) * ld + d` writable floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_get_factors(
    p: *const KfacPrecond,
    id: u32,
    a: *mut f32,
    lda: usize,
    g: *mut f32,
    ldg: usize,
) -> KfacStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (fa, fg) = unsafe { with_ref(p, |pc| Ok(pc.factors(LayerId(id as usize))?)) }?;
        let oa = Out::matrix(a, lda, fa.nrows(), fa.ncols(), "a")?;
        let og = Out::matrix(g, ldg, fg.nrows(), fg.ncols(), "g")?;
        // SAFETY: shapes checked; buffer sizes by contract.
        unsafe {
            oa.write(&fa);
            og.write(&fg);
        }
        Ok(())
    })
}

/// Copies the decomposition layer `id` is preconditioned with and sets
/// `*kind` to a `KfacDecompositionKind`:
/// eigen method: `a` = `Q_A` (`d_a x d_a`, columns are eigenvectors; the
/// identity for an embedding's diagonal A), `la` = `l_A` (`d_a` values),
/// `g` = `Q_G`, `lg` = `l_G`; inverse method: `a` = `(A + s_A I)^-1`,
/// `g` = `(G + s_G I)^-1`, `la`/`lg` untouched (may be NULL).
/// `KFAC_ERR_STATE` before the layer's first inversion (or on a rank that
/// does not keep it, with a gradient-worker fraction below 1).
///
/// # Safety
/// `p` a live handle; `kind` writable; `a`, `g` as in `kfac_get_factors`;
/// `la`, `lg` NULL (inverse method) or `d_a` / `d_g` writable floats.
#[no_mangle]
pub unsafe extern "C" fn kfac_get_decomposition(
    p: *const KfacPrecond,
    id: u32,
    kind: *mut u32,
    a: *mut f32,
    lda: usize,
    la: *mut f32,
    g: *mut f32,
    ldg: usize,
    lg: *mut f32,
) -> KfacStatus {
    guard(|| {
        non_null(kind, "kind")?;
        // SAFETY: forwarded contract.
        let d = unsafe {
            with_ref(p, |pc| match pc.decomposition(LayerId(id as usize))? {
                Some(d) => Ok(d),
                None => fail(
                    KfacStatus::KFAC_ERR_STATE,
                    format!("layer {id} has no decomposition on this rank (yet)"),
                ),
            })
        }?;
        let (ma, mg, vals, code) = match d {
            Decomposition::Eigen {
                qa,
                la: lav,
                qg,
                lg: lgv,
                ..
            } => {
                let qa = qa.unwrap_or_else(|| Mat::identity(lav.len(), lav.len()));
                non_null(la, "la")?;
                non_null(lg, "lg")?;
                (
                    qa,
                    qg,
                    Some((lav, lgv)),
                    KfacDecompositionKind::KFAC_DECOMPOSITION_EIGEN,
                )
            }
            Decomposition::Inverse { a_inv, g_inv } => (
                a_inv,
                g_inv,
                None,
                KfacDecompositionKind::KFAC_DECOMPOSITION_INVERSE,
            ),
            _ => {
                return fail(
                    KfacStatus::KFAC_ERR_STATE,
                    "a decomposition this ABI does not describe",
                )
            }
        };
        let oa = Out::matrix(a, lda, ma.nrows(), ma.ncols(), "a")?;
        let og = Out::matrix(g, ldg, mg.nrows(), mg.ncols(), "g")?;
        // SAFETY: every pointer checked; buffer sizes by contract.
        unsafe {
            oa.write(&ma);
            og.write(&mg);
            if let Some((lav, lgv)) = vals {
                write_vector(&lav, la);
                write_vector(&lgv, lg);
            }
            kind.write(code as u32);
        }
        Ok(())
    })
}
