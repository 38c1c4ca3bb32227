//! The registry of live handles: their values, kinds, poisoning, and the
//! one-call-at-a-time rule.
//!
//! A handle given to C is not an address but a token, `TAG | id` with `id`
//! from a counter that only grows, so a freed handle's value is never
//! given out again: a stale, foreign or wrong-kind value is refused with
//! `KFAC_ERR_INVALID_HANDLE` and never dereferenced (on 64-bit targets
//! `TAG` makes every token a non-canonical address, so no real pointer is
//! ever mistaken for a handle).
//!
//! Each handle's object sits in a `Mutex` behind an `Arc` in the
//! registry. A call takes the mutex with `try_lock` while it holds the
//! registry lock, so a handle serves one call at a time: a call (read-only
//! or not, `*_free` included) on a handle another thread is using returns
//! `KFAC_ERR_BUSY` at once, without waiting. A panic while a call uses a
//! handle marks it poisoned (its state may be half updated); a poisoned
//! handle is refused by every call but its `*_free`.
//!
//! What lives here: the registry, [`publish`], [`with_ref`], [`with_mut`],
//! [`free`]. What does not: what a handle holds (`comm`, `precond`).

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};

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

/// A type whose values are handed to C as handles.
pub(crate) trait Handle: Send + Sized + 'static {
    /// Recorded with every handle of this type.
    const KIND: Kind;
}

/// High bits of every token: "KF" in bits 48..64 on 64-bit targets (a
/// non-canonical address on x86-64 and AArch64), nothing on 32-bit ones.
const TAG: usize = (0x4b46_u64 << 48) as usize;
/// Ids stay below this (so `TAG | id` keeps the tag intact).
const MAX_ID: u64 = if usize::BITS == 64 {
    1 << 48
} else {
    u32::MAX as u64
};

struct Entry {
    kind: Kind,
    poisoned: bool,
    /// An `Arc<Mutex<T>>` with `T: Handle` of kind `kind`.
    value: Arc<dyn Any + Send + Sync>,
}

struct Registry {
    live: HashMap<usize, Entry>,
    /// The id of the last handle published (0: none yet).
    last_id: u64,
}

fn registry() -> MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            live: HashMap::new(),
            last_id: 0,
        })
    })
    .lock()
    // The map is consistent after any panic (single inserts/removes).
    .unwrap_or_else(|e| e.into_inner())
}

/// Records `value` as a new live handle and writes its token to `*out`.
/// `KFAC_ERR_RESOURCE` once 2^48 (32-bit: 2^32) handles have been given
/// out in this process (tokens are never reused).
///
/// # Safety
/// `out` is non-NULL and writable.
pub(crate) unsafe fn publish<T: Handle>(value: T, out: *mut *mut T) -> R<()> {
    let token = {
        let mut r = registry();
        if r.last_id + 1 >= MAX_ID {
            return fail(
                KfacStatus::KFAC_ERR_RESOURCE,
                "every handle value of this process has been used",
            );
        }
        r.last_id += 1;
        let token = TAG | r.last_id as usize;
        r.live.insert(
            token,
            Entry {
                kind: T::KIND,
                poisoned: false,
                value: Arc::new(Mutex::new(value)),
            },
        );
        token
    };
    // SAFETY: the caller's contract. The token is an integer the C side
    // only stores and passes back; it is never dereferenced.
    unsafe { out.write(token as *mut T) };
    Ok(())
}

/// The object of the live, unpoisoned handle `token` of kind `T::KIND`.
fn lookup<T: Handle>(r: &Registry, token: usize) -> R<Arc<Mutex<T>>> {
    let name = T::KIND.name();
    if token == 0 {
        return fail(KfacStatus::KFAC_ERR_NULL, format!("{name} handle is NULL"));
    }
    match r.live.get(&token) {
        Some(e) if e.kind == T::KIND && e.poisoned => fail(
            KfacStatus::KFAC_ERR_INVALID_HANDLE,
            format!("{name} is poisoned by an earlier internal panic (free it)"),
        ),
        Some(e) if e.kind == T::KIND => Arc::clone(&e.value).downcast::<Mutex<T>>().map_err(|_| {
            crate::status::Fail(
                KfacStatus::KFAC_ERR_INVALID_HANDLE,
                format!("not a live {name} handle (wrong type)"),
            )
        }),
        _ => fail(
            KfacStatus::KFAC_ERR_INVALID_HANDLE,
            format!("not a live {name} handle (freed or foreign)"),
        ),
    }
}

fn busy<U>(kind: Kind) -> R<U> {
    fail(
        KfacStatus::KFAC_ERR_BUSY,
        format!(
            "the {} is in use by another call (a handle serves one call at a time)",
            kind.name()
        ),
    )
}

/// Runs `f` on the live handle `token`, exclusively, poisoning the handle
/// if `f` panics.
fn with_locked<T: Handle, U>(token: usize, f: impl FnOnce(&mut T) -> R<U>) -> R<U> {
    let r = registry();
    let cell = lookup::<T>(&r, token)?;
    let mut g = match cell.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return busy(T::KIND),
        // Only a panic poisons the mutex, and that marked the entry
        // poisoned, which `lookup` refused; unreachable, but refused too.
        Err(TryLockError::Poisoned(_)) => {
            return fail(
                KfacStatus::KFAC_ERR_INVALID_HANDLE,
                format!("{} is poisoned (free it)", T::KIND.name()),
            )
        }
    };
    // Locked while the registry was: `free` cannot have removed it since.
    drop(r);
    match catch_unwind(AssertUnwindSafe(|| f(&mut g))) {
        Ok(res) => res,
        Err(e) => {
            if let Some(entry) = registry().live.get_mut(&token) {
                entry.poisoned = true;
            }
            drop(g);
            resume_unwind(e)
        }
    }
}

/// Runs `f` on the live handle `h` (read-only). `KFAC_ERR_BUSY` when
/// another thread is using `h`.
///
/// # Safety
/// None beyond the signature's: `h` is never dereferenced (safe to call
/// with any value); `unsafe` marks the C entry points' contract.
pub(crate) unsafe fn with_ref<T: Handle, U>(h: *const T, f: impl FnOnce(&T) -> R<U>) -> R<U> {
    with_locked::<T, U>(h as usize, |v| f(v))
}

/// Runs `f` on the live handle `h`. `KFAC_ERR_BUSY` when another thread is
/// using `h`.
///
/// # Safety
/// As [`with_ref`].
pub(crate) unsafe fn with_mut<T: Handle, U>(h: *mut T, f: impl FnOnce(&mut T) -> R<U>) -> R<U> {
    with_locked::<T, U>(h as usize, f)
}

/// Frees a handle: NULL is a no-op; a value that is not a live handle of
/// this kind (freed, foreign) is refused without being dereferenced; a
/// handle another thread is using is refused with `KFAC_ERR_BUSY` (and
/// stays live); a poisoned handle is freed.
///
/// # Safety
/// As [`with_ref`].
pub(crate) unsafe fn free<T: Handle>(h: *mut T) -> KfacStatus {
    guard(|| {
        let token = h as usize;
        if token == 0 {
            return Ok(());
        }
        let value = {
            let mut r = registry();
            let in_use = match r.live.get(&token) {
                Some(e) if e.kind == T::KIND && e.value.is::<Mutex<T>>() => e
                    .value
                    .downcast_ref::<Mutex<T>>()
                    .is_some_and(|m| matches!(m.try_lock(), Err(TryLockError::WouldBlock))),
                _ => {
                    return fail(
                        KfacStatus::KFAC_ERR_INVALID_HANDLE,
                        format!("not a live {} handle (double free?)", T::KIND.name()),
                    )
                }
            };
            if in_use {
                return busy(T::KIND);
            }
            // Idle while the registry is locked: nobody can take it now.
            let value = r.live.remove(&token).map(|e| e.value);
            if r.live.is_empty() {
                // No handle left: give the table back, so a program that
                // freed every handle holds no memory of the library's.
                r.live.shrink_to_fit();
            }
            value
        };
        // Dropped outside the registry lock (a communicator's drop may
        // take time).
        drop(value);
        Ok(())
    })
}
