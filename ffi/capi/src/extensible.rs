//! Extensible structs: the `struct_size` rule of `KfacConfig` and
//! `KfacCollectives` (written once here; the header repeats it).
//!
//! The first field of such a struct is `size_t struct_size`: the size of
//! the struct as the caller's header declares it, `sizeof(T)`. New fields
//! are only ever appended, and every version's layout has no padding at the
//! end, so a version is identified by its size (the approach of Linux's
//! `openat2`/`clone3`/`sched_setattr` structs, and of Vulkan's and Win32's
//! size-tagged structs). Rules:
//!
//! * `struct_size` smaller than the oldest layout, larger than
//!   [`KFAC_MAX_STRUCT_SIZE`], or between two known layouts: refused with
//!   `KFAC_ERR_INVALID_ARGUMENT` (nothing beyond `struct_size` itself is
//!   read).
//! * Reading (`kfac_precond_create`, `kfac_comm_from_callbacks`): the
//!   fields that fit in `struct_size` are read; fields of newer layouts that
//!   an older caller does not have take their documented defaults. A
//!   caller's struct larger than this library's (a newer header) is accepted
//!   only when every byte past this library's layout is zero, i.e. the
//!   caller left every field this library does not know at its zero
//!   default; otherwise `KFAC_ERR_INVALID_ARGUMENT` (a setting would be
//!   silently ignored).
//! * Writing (`kfac_config_default`, `kfac_config_kfac_pytorch`,
//!   `kfac_collectives_init` take `struct_size` as an argument, since the
//!   library cannot know the size of the caller's memory otherwise): the
//!   fields that fit are written, bytes past this library's layout are set
//!   to zero, and `struct_size` is set to the argument. So whatever a writer
//!   produces, a reader accepts.
//!
//! Adding a field: append it (keeping the struct free of trailing
//! padding), keep the previous layout as a frozen private struct, and add
//! its size to [`Extensible::SIZES`].

use std::mem::size_of;

use crate::status::{fail, non_null, KfacStatus, R};

/// The largest `struct_size` accepted: a value above it is garbage (for
/// example an uninitialized field), not a future layout.
pub const KFAC_MAX_STRUCT_SIZE: usize = 4096;

/// A `#[repr(C)]` struct whose first field is `struct_size: usize`.
///
/// # Safety
/// Implementors are `#[repr(C)]`, start with `struct_size: usize` at
/// offset 0, and every bit pattern of every field is valid (integers,
/// floats, raw pointers, `Option` of function pointers), so that any
/// prefix of a caller's bytes copied over [`defaults`](Self::defaults) is a
/// valid value.
pub(crate) unsafe trait Extensible: Copy + 'static {
    /// The type's name in messages.
    const NAME: &'static str;
    /// Sizes of every released layout, ascending; the last is
    /// `size_of::<Self>()`.
    const SIZES: &'static [usize];
    /// The values of fields a caller's older layout does not have.
    fn defaults() -> Self;
}

fn check_size<T: Extensible>(size: usize) -> R<()> {
    let oldest = T::SIZES[0];
    let current = size_of::<T>();
    let why = if size < oldest {
        format!(
            "is smaller than the oldest layout ({oldest} bytes); set it to sizeof({})",
            T::NAME
        )
    } else if size > KFAC_MAX_STRUCT_SIZE {
        format!("exceeds {KFAC_MAX_STRUCT_SIZE} bytes (uninitialized?)")
    } else if size < current && !T::SIZES.contains(&size) {
        format!(
            "is not the size of a layout of {} ({:?})",
            T::NAME,
            T::SIZES
        )
    } else {
        return Ok(());
    };
    fail(
        KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
        format!("{}.struct_size {size} {why}", T::NAME),
    )
}

/// Reads the caller's struct at `p` by the rules of the module docs.
///
/// # Safety
/// `p` is NULL or points to `p->struct_size` readable bytes.
pub(crate) unsafe fn read<T: Extensible>(p: *const T, what: &str) -> R<T> {
    non_null(p, what)?;
    // SAFETY: non-NULL; every layout starts with a `usize` (the contract).
    let size = unsafe { p.cast::<usize>().read_unaligned() };
    check_size::<T>(size)?;
    let current = size_of::<T>();
    if size > current {
        // SAFETY: the caller's struct has `size` readable bytes.
        let tail =
            unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(current), size - current) };
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_ARGUMENT,
                format!(
                    "{what}: byte {} is not zero, but this library's {} ends at byte {current}: \
                     a field it does not know is set",
                    current + i,
                    T::NAME
                ),
            );
        }
    }
    let mut out = T::defaults();
    // SAFETY: `min(size, current)` bytes are readable at `p` and writable in
    // `out`; they end on a field boundary (a known layout) and any bytes
    // are valid for the fields (the trait's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut out as *mut T).cast::<u8>(),
            size.min(current),
        )
    };
    Ok(out)
}

/// The `struct_size` a caller set in its struct at `p` (an output struct
/// it initialized), checked by the rules of the module docs, so a call can
/// refuse a bad size before it changes anything.
///
/// # Safety
/// `p` is NULL or points to at least `size_of::<usize>()` readable bytes.
pub(crate) unsafe fn declared_size<T: Extensible>(p: *const T, what: &str) -> R<usize> {
    non_null(p, what)?;
    // SAFETY: non-NULL; the struct starts with its `usize` size (contract).
    let size = unsafe { p.cast::<usize>().read_unaligned() };
    check_size::<T>(size)?;
    Ok(size)
}

/// Writes `value` into the caller's struct of `size` bytes at `out` by the
/// rules of the module docs.
///
/// # Safety
/// `out` is NULL or points to `size` writable bytes.
pub(crate) unsafe fn write<T: Extensible>(out: *mut T, size: usize, value: T) -> R<()> {
    non_null(out, "out")?;
    check_size::<T>(size)?;
    let current = size_of::<T>();
    let bytes = out.cast::<u8>();
    // SAFETY: `size` writable bytes at `out` (contract); `value` has
    // `current` readable bytes; the tail `[current, size)` is in bounds
    // when `size > current`.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), bytes, size.min(current));
        if size > current {
            std::ptr::write_bytes(bytes.add(current), 0, size - current);
        }
        out.cast::<usize>().write_unaligned(size);
    }
    Ok(())
}
