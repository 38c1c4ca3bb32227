//! Blocked Householder reduction of a symmetric matrix to tridiagonal form,
//! the first stage of [`crate::eigen::sym_eigen`].
//!
//! LAPACK's `?sytrd` scheme on the lower triangle: a panel of [`PANEL`]
//! columns is reduced with the trailing matrix left as it was (each
//! column's symmetric matrix-vector product reads the original trailing
//! triangle and corrects for the panel's earlier reflectors with thin
//! products), then the trailing triangle takes the panel's rank-`2 PANEL`
//! update at matrix-multiply rate. So half the flops run as GEMM and the
//! other half read the trailing triangle once per column; faer's own
//! (unblocked) reduction reads *and writes* it once per column, which made
//! it the slowest stage of the eigensolver and the one that did not scale
//! to a second thread (BENCHMARKS.md, "Eigendecomposition").
//!
//! The symmetric product splits its columns into two fixed ranges of equal
//! work whose partial sums are added in a fixed order, so the result is
//! bitwise the same on one thread and on two.
//!
//! Output conventions are faer's (what its block Householder application
//! and tridiagonal eigensolver expect): on return `a[(j, j)]` is the
//! diagonal, `a[(j + 1, j)]` the subdiagonal, `a[(j + 2.., j)]` the essential
//! part of reflector `j` (whose first element, at row `j + 1`, is an implicit
//! one), and `tau[j]` its factor in faer's form `I - v v^T / tau`
//! (infinite for an identity reflector).

use crate::Real;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use core::sync::atomic::{AtomicBool, AtomicUsize};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::householder::make_householder_in_place;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, ColMut, MatMut, MatRef, Par};

/// Columns per panel.
pub(crate) const PANEL: usize = 32;
/// At most this many trailing columns are reduced one at a time (a panel
/// update would cost more than it saves).
const UNBLOCKED: usize = 128;
/// Below this many matrix elements the symmetric product runs on one
/// thread (the same arithmetic either way).
const PAR_ELEMS: usize = 256 * 256;

/// Scratch of [`tridiagonalize`] for an `n x n` matrix.
pub(crate) fn scratch<T: Real>(n: usize) -> StackReq {
    StackReq::all_of(&[
        StackReq::new_aligned::<T>(3 * n * PANEL, 64),
        StackReq::new_aligned::<T>(2 * n, 64),
        StackReq::new_aligned::<T>(3 * PANEL, 64),
    ])
}

fn view_mut<T: Real>(
    a: &mut [T],
    ld: usize,
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
) -> MatMut<'_, T> {
    if rows == 0 || cols == 0 {
        return MatMut::from_column_major_slice_mut(&mut [], rows, cols);
    }
    MatMut::from_column_major_slice_with_stride_mut(&mut a[row + col * ld..], rows, cols, ld)
}

/// Where the symmetric product splits its columns: `[0, c1)` and
/// `[c1, len)` hold about half of the triangle each.
fn split(len: usize) -> usize {
    len * 2929 / 10000
}

/// One half of `y = S v`: columns `c0..c_end` of the `len x len` symmetric
/// matrix whose lower triangle starts at `a[0]` (leading dimension `ld`),
/// accumulated into `out[r - ystart]` for the rows `r >= ystart` they touch.
#[allow(clippy::too_many_arguments)]
fn symv_part<T: Real>(
    a: &[T],
    ld: usize,
    len: usize,
    v: &[T],
    c0: usize,
    c_end: usize,
    ystart: usize,
    out: &mut [T],
) {
    T::simd_symv_cols(a, ld, len, v, c0, c_end, ystart, out);
}

/// `y = S v` on the calling thread: both halves, then their sum in the
/// order every thread count uses.
fn symv<T: Real>(a: &[T], ld: usize, len: usize, v: &[T], y: &mut [T], h: &mut [T]) {
    let c1 = split(len);
    symv_part(a, ld, len, v, 0, c1, 0, &mut y[..len]);
    symv_part(a, ld, len, v, c1, len, c1, &mut h[..len - c1]);
    for (y, h) in y[c1..len].iter_mut().zip(h.iter()) {
        *y += *h;
    }
}

/// A slice shared by the two threads of a panel as a raw pointer: each
/// side makes a reference only for a phase in which the protocol of
/// [`Team`] guarantees the other side does not write what it reads.
#[derive(Clone, Copy)]
struct Raw<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: a `Raw` is only dereferenced under the `Team` protocol (no
// reference from one thread coexists with a write from the other).
unsafe impl<T: Send> Send for Raw<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Raw<T> {}

impl<T> Raw<T> {
    fn new(s: &mut [T]) -> Self {
        Raw {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }
    /// # Safety
    /// No other thread writes the slice while the reference lives.
    unsafe fn get<'a>(self) -> &'a [T] {
        // SAFETY: ptr/len come from a live slice that outlives the team;
        // the caller guarantees no concurrent write.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// # Safety
    /// No other thread reads or writes the slice while the reference lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut<'a>(self) -> &'a mut [T] {
        // SAFETY: as `get`, and the caller guarantees exclusive access.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Two threads on one panel's symmetric products without a fork-join per
/// column (a fork-join costs more than a product at these sizes). The
/// panel's thread (the master) publishes job `k` (the product of column
/// `i + k`) and computes its first half; the second half goes to whichever
/// thread takes it first (`taken` counts the jobs whose second half is
/// taken, in order), so the master never waits for a helper that has not
/// started: a helper that runs before the master, after it or not at all
/// leaves it to do everything itself, with the same arithmetic. The
/// master writes the matrix only between jobs, when no product is in
/// flight, and calls no parallel code while the team lives.
struct Team {
    started: AtomicBool,
    stop: AtomicBool,
    published: AtomicUsize,
    taken: AtomicUsize,
    done: AtomicUsize,
}

/// The helper's side of a [`Team`]: second halves of the products of the
/// panel starting at column `i`.
fn helper<T: Real>(team: &Team, a: Raw<T>, ld: usize, n: usize, i: usize, h: Raw<T>) {
    if !team.started.load(Acquire) {
        return;
    }
    let mut job = 0;
    loop {
        if team.stop.load(Acquire) {
            return;
        }
        if team.published.load(Acquire) <= job {
            core::hint::spin_loop();
            continue;
        }
        if team
            .taken
            .compare_exchange(job, job + 1, AcqRel, Acquire)
            .is_ok()
        {
            let c = i + job;
            let len = n - c - 1;
            let c1 = split(len);
            {
                // SAFETY: job `job` is published (the master's writes to
                // the matrix happened before, Acquire above) and the master
                // writes neither the matrix nor `h` until `done` says the
                // job is complete; we took the job, so only we write `h`.
                let (a, h) = unsafe { (a.get(), h.get_mut()) };
                let base = (c + 1) * ld + c + 1;
                let v = &a[c * ld + c + 1..c * ld + n];
                symv_part(&a[base..], ld, len, v, c1, len, c1, &mut h[..len - c1]);
            }
            team.done.store(job + 1, Release);
        }
        job += 1;
    }
}

/// Makes the reflector of column `c` rows `c + 1..n` of `a`: returns
/// `(beta, t)` with the reflector `I - t v v^T` (`t = 0` for the identity),
/// leaves the essential part in rows `c + 2..`, a one in row `c + 1`, and
/// faer's `tau` in `tau[c]`.
fn reflector<T: Real>(a: &mut [T], ld: usize, n: usize, c: usize, tau: &mut [T]) -> (T, T) {
    let col = &mut a[c * ld + c + 1..c * ld + n];
    let (head, tail) = col.split_first_mut().expect("c + 1 < n");
    let info = make_householder_in_place(head, ColMut::from_slice_mut(tail));
    let beta = *head;
    *head = T::ONE;
    tau[c] = info.tau;
    let t = if info.tau.is_finite_val() {
        T::ONE / info.tau
    } else {
        T::ZERO
    };
    (beta, t)
}

/// `w = t w - (t^2 / 2) (w . v) v`: the reflector's symmetric update vector.
fn finish_w<T: Real>(w: &mut [T], v: &[T], t: T) {
    for x in w.iter_mut() {
        *x *= t;
    }
    let alpha = -(T::from_f64(0.5) * t) * T::simd_dot(w, v);
    T::simd_axpy(alpha, v, w);
}

/// Reduces the lower triangle of the column-major `n x n` matrix `a`
/// (leading dimension `ld`) to tridiagonal form in place; see the module
/// docs for the layout of the result. `tau` has at least `n - 1` elements.
/// The upper triangle is neither read nor written.
///
/// # Panics
/// If `a` holds fewer than `ld * n` elements, `ld < n` or `tau` is short.
pub(crate) fn tridiagonalize<T: Real>(
    a: &mut [T],
    n: usize,
    ld: usize,
    tau: &mut [T],
    par: Par,
    stack: &mut MemStack,
) {
    assert!(ld >= n && a.len() >= ld * n && tau.len() + 1 >= n);
    if n < 2 {
        return;
    }
    let (mut w, stack) = stack.make_aligned_with(3 * n * PANEL, 64, |_| T::ZERO);
    let (mut yh, stack) = stack.make_aligned_with(2 * n, 64, |_| T::ZERO);
    let (mut tmp, _) = stack.make_aligned_with(3 * PANEL, 64, |_| T::ZERO);
    let (y, h) = yh.split_at_mut(n);
    let mut i = 0;
    while n - i > UNBLOCKED.max(PANEL + 1) {
        let m = n - i;
        panel(
            a,
            ld,
            n,
            i,
            &mut w[..3 * m * PANEL],
            tau,
            y,
            h,
            &mut tmp,
            par,
        );
        i += PANEL;
    }
    // The rest, one column at a time.
    for c in i..n - 1 {
        let (beta, t) = reflector(a, ld, n, c, tau);
        if t != T::ZERO {
            let len = n - c - 1;
            let (left, right) = a.split_at_mut((c + 1) * ld);
            let v = &left[c * ld + c + 1..c * ld + n];
            symv(&right[c + 1..], ld, len, v, y, h);
            finish_w(&mut y[..len], v, t);
            // Lower triangle of the trailing matrix -= v y^T + y v^T.
            for k in 0..len {
                let col = &mut right[k * ld + c + 1 + k..k * ld + n];
                T::simd_axpy(-v[k], &y[k..len], col);
                T::simd_axpy(-y[k], &v[k..], col);
            }
        }
        a[c * ld + c + 1] = beta;
    }
}

/// The column loop of [`panel`] (on the master thread of a team, if any):
/// returns the subdiagonal values, leaving ones in their places.
#[allow(clippy::too_many_arguments)]
fn columns<T: Real>(
    ar: Raw<T>,
    ld: usize,
    n: usize,
    i: usize,
    w: &mut [T],
    tau: &mut [T],
    y: &mut [T],
    hr: Raw<T>,
    tmp: &mut [T],
    team: Option<&Team>,
) -> [T; PANEL] {
    let m = n - i;
    let mut beta = [T::ZERO; PANEL];
    // W is m x PANEL, column-major, leading dimension m; its row r is the
    // matrix's row i + r.
    w[..m * PANEL].fill(T::ZERO);
    for j in 0..PANEL {
        let c = i + j;
        // SAFETY: between jobs: no product is in flight, the helper holds
        // no reference (Team protocol).
        let a = unsafe { ar.get_mut() };
        if j > 0 {
            // Column c, rows c..n, minus the panel's earlier reflectors:
            // -= V[j.., ..j] W[j, ..j]^T + W[j.., ..j] V[j, ..j]^T.
            let (t1, rest) = tmp.split_at_mut(PANEL);
            for k in 0..j {
                t1[k] = w[j + k * m];
                rest[k] = a[c + (i + k) * ld];
            }
            let (left, right) = a.split_at_mut(c * ld);
            let col = &mut right[c..n];
            for k in 0..j {
                let vk = &left[c + (i + k) * ld..n + (i + k) * ld];
                let wk = &w[j + k * m..(k + 1) * m];
                T::simd_axpy(-t1[k], vk, col);
                T::simd_axpy(-rest[k], wk, col);
            }
        }
        let (b, t) = reflector(a, ld, n, c, tau);
        beta[j] = b;
        let len = m - j - 1;
        let (wl, wr) = w.split_at_mut(j * m);
        let wcol = &mut wr[j + 1..m];
        {
            // SAFETY: the helper only reads the matrix.
            let a = unsafe { ar.get() };
            let v = &a[c * ld + c + 1..c * ld + n];
            let base = &a[(c + 1) * ld + c + 1..];
            match team {
                None => {
                    // SAFETY: no team: this thread alone.
                    symv(base, ld, len, v, y, unsafe { hr.get_mut() });
                }
                Some(team) => {
                    let c1 = split(len);
                    team.published.store(j + 1, Release);
                    symv_part(base, ld, len, v, 0, c1, 0, &mut y[..len]);
                    if team
                        .taken
                        .compare_exchange(j, j + 1, AcqRel, Acquire)
                        .is_ok()
                    {
                        // SAFETY: we took the second half: the helper does
                        // not touch `h` for this job.
                        let h = unsafe { hr.get_mut() };
                        symv_part(base, ld, len, v, c1, len, c1, &mut h[..len - c1]);
                    } else {
                        while team.done.load(Acquire) != j + 1 {
                            core::hint::spin_loop();
                        }
                    }
                    // SAFETY: the job is complete (Acquire above, or ours).
                    let h = unsafe { hr.get() };
                    for (y, h) in y[c1..len].iter_mut().zip(h.iter()) {
                        *y += *h;
                    }
                }
            }
            wcol.copy_from_slice(&y[..len]);
            if j > 0 {
                // - W[j+1.., ..j] (V[j+1.., ..j]^T v) - V[j+1.., ..j] (W[j+1.., ..j]^T v)
                let (t1, rest) = tmp.split_at_mut(PANEL);
                let t2 = &mut rest[..PANEL];
                for k in 0..j {
                    let vk = &a[c + 1 + (i + k) * ld..n + (i + k) * ld];
                    let wk = &wl[j + 1 + k * m..(k + 1) * m];
                    t1[k] = T::simd_dot(wk, v);
                    t2[k] = T::simd_dot(vk, v);
                }
                for k in 0..j {
                    let vk = &a[c + 1 + (i + k) * ld..n + (i + k) * ld];
                    let wk = &wl[j + 1 + k * m..(k + 1) * m];
                    T::simd_axpy(-t1[k], vk, wcol);
                    T::simd_axpy(-t2[k], wk, wcol);
                }
            }
            finish_w(wcol, v, t);
        }
    }
    beta
}

/// Reduces columns `i..i + PANEL` (LAPACK's `?latrd`) and applies the
/// panel's rank-`2 PANEL` update to the trailing lower triangle.
#[allow(clippy::too_many_arguments)]
fn panel<T: Real>(
    a: &mut [T],
    ld: usize,
    n: usize,
    i: usize,
    w: &mut [T],
    tau: &mut [T],
    y: &mut [T],
    h: &mut [T],
    tmp: &mut [T],
    par: Par,
) {
    let m = n - i;
    let beta = {
        let (ar, hr) = (Raw::new(a), Raw::new(h));
        if par.degree() >= 2 && m * m >= PAR_ELEMS {
            let team = Team {
                started: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                published: AtomicUsize::new(0),
                taken: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
            };
            let mut out = None;
            faer::utils::thread::join_raw(
                |_| {
                    team.started.store(true, Release);
                    out = Some(columns(ar, ld, n, i, w, tau, y, hr, tmp, Some(&team)));
                    team.stop.store(true, Release);
                },
                |_| helper(&team, ar, ld, n, i, hr),
                par,
            );
            out.expect("the master ran")
        } else {
            columns(ar, ld, n, i, w, tau, y, hr, tmp, None)
        }
    };
    // Trailing lower triangle -= V2 W2^T + W2 V2^T (the ones stay in place
    // as the reflectors' first elements until here).
    let rows = m - PANEL;
    let (left, right) = a.split_at_mut((i + PANEL) * ld);
    // One rank-2 PANEL product: [W2 | V2] [V2 | W2]^T, from a buffer
    // holding W2, a copy of V2 and a second copy of W2 side by side.
    let (wp, rest) = w.split_at_mut(PANEL * m);
    let (vc, wc) = rest.split_at_mut(PANEL * m);
    for k in 0..PANEL {
        vc[k * m + PANEL..(k + 1) * m]
            .copy_from_slice(&left[(i + k) * ld + i + PANEL..(i + k) * ld + n]);
        wc[k * m + PANEL..(k + 1) * m].copy_from_slice(&wp[k * m + PANEL..(k + 1) * m]);
    }
    let lhs = MatRef::from_column_major_slice_with_stride(&w[PANEL..], rows, 2 * PANEL, m);
    let rhs =
        MatRef::from_column_major_slice_with_stride(&w[PANEL * m + PANEL..], rows, 2 * PANEL, m);
    let s22 = view_mut(right, ld, i + PANEL, 0, rows, rows);
    use BlockStructure::{Rectangular as R, TriangularLower as L};
    triangular::matmul(s22, L, Accum::Add, lhs, R, rhs.transpose(), R, -T::ONE, par);
    for (j, b) in beta.iter().enumerate() {
        a[(i + j) * ld + i + j + 1] = *b;
    }
}
