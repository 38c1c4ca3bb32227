//! Memory: fallible allocation of everything whose size the caller
//! chooses, and the optional per-preconditioner budget
//! ([`Config::memory_budget`](crate::Config::memory_budget)).
//!
//! Every buffer whose size follows from a layer's dimensions or a batch
//! (factors, accumulators, decompositions, kernel scratch, step buffers)
//! is allocated here with `try_reserve`: failure is
//! [`Error::OutOfMemory`] with the bytes requested, never an abort, and
//! the caller's state is left as it was. What is left outside: the
//! matrix multiply of the `gemm` crate under faer allocates its packing
//! buffers per call (bounded by its cache blocking, about
//! `512 x (n + threads x 4 KiB)` elements for an `n`-wide product, ~12 MiB
//! at n = 6000) and keeps one L2-sized slab per thread; those abort on
//! failure, as does any allocation in the standard library, MPI, or a
//! caller's communicator callbacks.
//!
//! A distributed step allocates its exchange buffers before the status
//! round that ends the phase before them (see `exchange`), so running out
//! of memory on one rank fails the step on every rank and keeps the group
//! usable.

use std::sync::atomic::{AtomicUsize, Ordering};

use faer::Mat;

use crate::{Error, Result};

/// A zero matrix, or [`Error::OutOfMemory`] naming `what`.
pub(crate) fn zeros<T: Copy + Default>(r: usize, c: usize, what: &str) -> Result<Mat<T>> {
    let bytes = r
        .checked_mul(c)
        .and_then(|n| n.checked_mul(size_of::<T>()))
        .unwrap_or(usize::MAX);
    let mut m = Mat::<T>::new();
    m.try_reserve(r, c).map_err(|_| oom(what, bytes))?;
    // Within the capacity just reserved: no allocation.
    m.resize_with(r, c, |_, _| T::default());
    Ok(m)
}

/// `f(i, j)` for an `r x c` matrix, or [`Error::OutOfMemory`].
pub(crate) fn from_fn<T: Copy + Default>(
    r: usize,
    c: usize,
    what: &str,
    mut f: impl FnMut(usize, usize) -> T,
) -> Result<Mat<T>> {
    let mut m = zeros::<T>(r, c, what)?;
    for j in 0..c {
        for i in 0..r {
            m[(i, j)] = f(i, j);
        }
    }
    Ok(m)
}

/// The identity, or [`Error::OutOfMemory`].
pub(crate) fn identity(n: usize, what: &str) -> Result<Mat<f32>> {
    let mut m = zeros::<f32>(n, n, what)?;
    for i in 0..n {
        m[(i, i)] = 1.0;
    }
    Ok(m)
}

/// `n` copies of `v`, or [`Error::OutOfMemory`].
pub(crate) fn filled<T: Clone>(n: usize, v: T, what: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| oom(what, n.saturating_mul(size_of::<T>())))?;
    out.resize(n, v);
    Ok(out)
}

/// An empty vector with room for `n` elements, or [`Error::OutOfMemory`].
pub(crate) fn with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| oom(what, n.saturating_mul(size_of::<T>())))?;
    Ok(out)
}

/// Names layer `name` in an out-of-memory error that does not name one yet
/// (kernel scratch shared by the pool's threads).
pub(crate) fn in_layer(name: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::OutOfMemory { what, bytes } if !what.starts_with("layer '") => Error::OutOfMemory {
            what: format!("layer '{name}': {what}"),
            bytes,
        },
        e => e,
    }
}

pub(crate) fn oom(what: &str, bytes: usize) -> Error {
    Error::OutOfMemory {
        what: what.to_string(),
        bytes,
    }
}

/// The memory budget of one preconditioner: bytes charged against an
/// optional limit. Charges are planned sizes (a layer's factors,
/// accumulators and decompositions at registration, the inversion scratch
/// of every pool thread for the largest factor) and the actual growth of
/// kernel scratch (observations of larger batches).
#[derive(Debug)]
pub(crate) struct MemBudget {
    limit: Option<usize>,
    used: AtomicUsize,
}

impl MemBudget {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Charges `bytes` for `what`.
    ///
    /// # Errors
    /// [`Error::MemoryBudget`] if that would exceed the limit (nothing is
    /// charged then).
    pub(crate) fn charge(&self, bytes: usize, what: &str) -> Result<()> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let new = cur.saturating_add(bytes);
            if let Some(limit) = self.limit {
                if new > limit {
                    return Err(Error::MemoryBudget {
                        what: what.to_string(),
                        needed: bytes,
                        in_use: cur,
                        budget: limit,
                    });
                }
            }
            match self
                .used
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }

    /// Returns `bytes` charged earlier.
    pub(crate) fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            });
    }

    /// Bytes charged.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit, if any.
    pub(crate) fn limit(&self) -> Option<usize> {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_charges_up_to_the_limit_and_refuses_beyond() {
        let b = MemBudget::new(Some(100));
        b.charge(60, "a").unwrap();
        let e = b.charge(41, "b").unwrap_err();
        assert!(matches!(
            e,
            Error::MemoryBudget {
                needed: 41,
                in_use: 60,
                budget: 100,
                ..
            }
        ));
        assert_eq!(b.used(), 60);
        b.charge(40, "c").unwrap();
        b.release(50);
        assert_eq!(b.used(), 50);
        let unlimited = MemBudget::new(None);
        unlimited.charge(usize::MAX, "x").unwrap();
        unlimited.charge(1, "y").unwrap();
    }

    #[test]
    fn impossible_sizes_are_out_of_memory_not_aborts() {
        let e = zeros::<f32>(1 << 40, 1 << 20, "huge").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        let e = filled(usize::MAX / 2, 0u64, "huge").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        let m = zeros::<f32>(3, 2, "small").unwrap();
        assert_eq!((m.nrows(), m.ncols()), (3, 2));
        assert!(m.col_iter().all(|c| c.iter().all(|&v| v == 0.0)));
        let i = identity(3, "i").unwrap();
        assert_eq!(i[(1, 1)], 1.0);
        assert_eq!(i[(0, 1)], 0.0);
    }
}
