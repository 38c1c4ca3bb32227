//! The registry of live handles and their poisoning.
//!
//! Every handle the library gives out is a `Box::into_raw` address
//! recorded here with its kind. A call first looks the address up, so a
//! freed, foreign or wrong-kind handle is refused with
//! `KFAC_ERR_INVALID_HANDLE` without ever being dereferenced. A panic
//! while a call uses a handle marks it poisoned (its state may be half
//! updated); a poisoned handle is refused by every call but its `*_free`.
//!
//! What lives here: the registry, [`publish`], [`with_ref`], [`with_mut`],
//! [`free`]. What does not: what a handle holds (`comm`, `precond`).

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::status::{fail, guard, KfacStatus, R};

/// The kinds of handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Comm,
    Precond,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Comm => "communicator",
            Kind::Precond => "preconditioner",
        }
    }
}

/// A type whose boxed values are handed to C as handles.
pub(crate) trait Handle: Sized + 'static {
    /// Recorded with every handle of this type.
    const KIND: Kind;
}

struct Entry {
    kind: Kind,
    poisoned: bool,
}

fn registry() -> MutexGuard<'static, HashMap<usize, Entry>> {
    static R: OnceLock<Mutex<HashMap<usize, Entry>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // The map is consistent after any panic (single inserts/removes).
        .unwrap_or_else(|e| e.into_inner())
}

/// Boxes `value`, records it as live and writes the handle to `*out`.
///
/// # Safety
/// `out` is non-NULL and writable.
pub(crate) unsafe fn publish<T: Handle>(value: T, out: *mut *mut T) {
    let raw = Box::into_raw(Box::new(value));
    registry().insert(
        raw as usize,
        Entry {
            kind: T::KIND,
            poisoned: false,
        },
    );
    // SAFETY: the caller's contract.
    unsafe { out.write(raw) };
}

/// Checks that `addr` is a live, unpoisoned handle of kind `T::KIND`.
fn check_live<T: Handle>(addr: usize) -> R<()> {
    let name = T::KIND.name();
    if addr == 0 {
        return fail(KfacStatus::KFAC_ERR_NULL, format!("{name} handle is NULL"));
    }
    match registry().get(&addr) {
        Some(e) if e.kind == T::KIND && !e.poisoned => Ok(()),
        Some(e) if e.kind == T::KIND => fail(
            KfacStatus::KFAC_ERR_INVALID_HANDLE,
            format!("{name} is poisoned by an earlier internal panic (free it)"),
        ),
        _ => fail(
            KfacStatus::KFAC_ERR_INVALID_HANDLE,
            format!("not a live {name} handle (freed or foreign)"),
        ),
    }
}

/// Runs `f`, poisoning the handle at `addr` if it panics.
fn poison_on_panic<U>(addr: usize, f: impl FnOnce() -> R<U>) -> R<U> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            if let Some(entry) = registry().get_mut(&addr) {
                entry.poisoned = true;
            }
            resume_unwind(e)
        }
    }
}

/// Runs `f` on the live handle `h` (read-only).
///
/// # Safety
/// No other thread uses `h` during the call (the header's rule).
pub(crate) unsafe fn with_ref<T: Handle, U>(h: *const T, f: impl FnOnce(&T) -> R<U>) -> R<U> {
    check_live::<T>(h as usize)?;
    // SAFETY: `h` is registered live, so it came from `Box::into_raw` in
    // `publish` and has not been freed; nobody mutates it concurrently.
    let r = unsafe { &*h };
    poison_on_panic(h as usize, || f(r))
}

/// Runs `f` on the live handle `h`.
///
/// # Safety
/// As [`with_ref`].
pub(crate) unsafe fn with_mut<T: Handle, U>(h: *mut T, f: impl FnOnce(&mut T) -> R<U>) -> R<U> {
    check_live::<T>(h as usize)?;
    // SAFETY: as in `with_ref`; no other reference exists during the call.
    let r = unsafe { &mut *h };
    poison_on_panic(h as usize, || f(r))
}

/// Frees a handle: NULL is a no-op; an address that is not a live handle
/// of this kind (freed, foreign) is refused without being dereferenced; a
/// poisoned handle is freed.
///
/// # Safety
/// `h` is not used by another thread during the call.
pub(crate) unsafe fn free<T: Handle>(h: *mut T) -> KfacStatus {
    guard(|| {
        if h.is_null() {
            return Ok(());
        }
        let removed = {
            let mut r = registry();
            match r.get(&(h as usize)) {
                Some(e) if e.kind == T::KIND => r.remove(&(h as usize)).is_some(),
                _ => false,
            }
        };
        if !removed {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_HANDLE,
                format!("not a live {} handle (double free?)", T::KIND.name()),
            );
        }
        // SAFETY: it was registered live, created by `Box::into_raw`, and
        // is now unregistered, so this is the only release.
        drop(unsafe { Box::from_raw(h) });
        Ok(())
    })
}
