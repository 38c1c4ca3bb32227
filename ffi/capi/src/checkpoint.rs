//! Checkpoints through C: `kfac_save_size`, `kfac_save` (into a caller
//! buffer, all or nothing) and `kfac_load` (a new handle). The format is
//! the runtime's (versioned, CRC-32); nothing here parses it.

use kfac_runtime::Preconditioner;

use crate::comm::KfacComm;
use crate::precond::{self, KfacPrecond};
use crate::status::{fail, guard, non_null, KfacStatus};

/// Bytes `kfac_save` needs for the current state.
///
/// # Safety
/// `p` a live handle; `out_size` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_save_size(p: *const KfacPrecond, out_size: *mut usize) -> KfacStatus {
    guard(|| {
        non_null(out_size, "out_size")?;
        // SAFETY: forwarded contract.
        let n = unsafe { precond::with_ref(p, |pc| Ok(pc.checkpoint_len())) }?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { out_size.write(n) };
        Ok(())
    })
}

/// Writes the full state (the documented checkpoint format) into `buf` of
/// `len` bytes, allocating nothing; `written` receives the size.
/// `KFAC_ERR_BUFFER_TOO_SMALL` when `len` is short (nothing is written).
///
/// # Safety
/// `p` a live handle; `buf` `len` writable bytes; `written` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_save(
    p: *const KfacPrecond,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> KfacStatus {
    guard(|| {
        non_null(buf, "buf")?;
        non_null(written, "written")?;
        // SAFETY: forwarded contract; `buf` has `len` writable bytes that
        // alias nothing the handle owns.
        unsafe {
            precond::with_ref(p, |pc| {
                let out = std::slice::from_raw_parts_mut(buf, len);
                match pc.save_into(out) {
                    Some(n) => {
                        written.write(n);
                        Ok(())
                    }
                    None => fail(
                        KfacStatus::KFAC_ERR_BUFFER_TOO_SMALL,
                        format!(
                            "checkpoint needs {} bytes, buffer has {len}",
                            pc.checkpoint_len()
                        ),
                    ),
                }
            })
        }
    })
}

/// Restores a preconditioner from `kfac_save`'s bytes, with `comm` as for
/// `kfac_precond_create`. `KFAC_ERR_CHECKPOINT` for bytes that are
/// truncated, corrupted or of an unknown version (`*out` is not written).
///
/// # Safety
/// `buf` `len` readable bytes; `comm` NULL or live; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kfac_load(
    buf: *const u8,
    len: usize,
    comm: *mut KfacComm,
    out: *mut *mut KfacPrecond,
) -> KfacStatus {
    guard(|| {
        non_null(out, "out")?;
        non_null(buf, "buf")?;
        // SAFETY: `len` readable bytes by contract.
        let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
        let p = Preconditioner::load(bytes)?;
        // SAFETY: checked non-NULL; writable by contract.
        unsafe { precond::publish_with_comm(p, comm, out) }
    })
}
