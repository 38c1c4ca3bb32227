//! The factor update's product, `C += beta X^T X` on the lower triangle,
//! with our own AVX-512 register kernels (BLIS-style), where faer's
//! triangular matrix product left a third of the machine unused (0.54-0.85x
//! of OpenBLAS `ssyrk` at 2048 rows, issue #13).
//!
//! # Scheme
//!
//! `X` (`n x d`, any strides) is consumed [`KC`] rows at a time. Each block
//! of rows is packed once into column panels of one SIMD register's width
//! `W` (16 for f32, 8 for f64): panel `q` holds `X[p, qW .. qW + W]` for
//! the block's rows `p`, row after row, zero-padded past `d`. Both operands
//! of the product come from this one packed copy: a register tile of `C`
//! covers up to three panels of rows (48 x 8 in f32, 24 x 8 in f64, 24
//! accumulators) and eight columns inside one panel; per packed row it loads
//! the rows' vectors and broadcasts the eight column values. Row blocks of
//! `C` are sized so their panels stay in L2 while the column tiles, each in
//! L1, sweep over them. A tile is added to `C` as `C + beta * acc` (one
//! fused multiply-add per element) under a lane mask that keeps the
//! triangle and the matrix's edge, so no tile writes outside the lower
//! triangle.
//!
//! `C` must have a unit stride in one direction. Column-major `C` is updated
//! as described; row-major `C` by the mirrored scheme (tiles of `X^T X` on
//! and above the diagonal, whose vectors run along `C`'s rows).
//!
//! # Determinism
//!
//! Every element of `C` is the same sum in the same order (the blocks of
//! [`KC`] rows in turn, each a sequential sum over its rows) whatever the
//! thread count: threads split the rows of `C`, never a sum. So results
//! are bitwise the same for `Par::Seq` and `Par::rayon(k)`.
//!
//! On other CPUs (and without the `std` feature, which is what enables
//! runtime CPU detection) [`syrk_lower`] declines and the caller uses
//! faer's triangular product.

use crate::Real;
use core::any::TypeId;
use faer::dyn_stack::{MemStack, StackReq};
use faer::{MatMut, MatRef, Par};

/// Rows of `X` packed and multiplied per pass (the depth of each register
/// tile's sum before it is added to `C`).
pub(crate) const KC: usize = 256;

/// Bytes of packed rows of `C` kept in L2 while the column tiles sweep
/// over them (half of this machine class's 2 MiB L2).
const ROW_BLOCK_BYTES: usize = 1 << 20;

/// Columns of a register tile.
const NR: usize = 8;

/// Register panels (of `W` rows) per tile.
const MA: usize = 3;

/// Threads one product is split over at most.
const MAX_THREADS: usize = 8;

/// Below this many multiply-adds per pass a second thread costs more than
/// it saves.
const PAR_MIN_FMAS: usize = 1 << 21;

#[cfg_attr(not(all(target_arch = "x86_64", feature = "std")), allow(dead_code))]
fn is<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}

/// Whether this CPU and build have the register kernels for `T`.
pub(crate) fn available<T: Real>() -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        (is::<T, f32>() || is::<T, f64>()) && pulp::x86::V4::is_available()
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "std")))]
    {
        false
    }
}

/// One register's lanes of `T` (64 bytes).
fn lanes<T>() -> usize {
    64 / core::mem::size_of::<T>()
}

/// Scratch of [`syrk_lower`] for `n` rows of `d` columns on `par`'s
/// threads (each thread packs the rows it needs into its own buffer of
/// `min(n, KC) x d` values; empty where the kernels are not available).
pub(crate) fn scratch<T: Real>(n: usize, d: usize, par: Par) -> StackReq {
    if !available::<T>() || n == 0 || d == 0 {
        return StackReq::EMPTY;
    }
    let w = lanes::<T>();
    let threads = par.degree().clamp(1, MAX_THREADS);
    StackReq::new_aligned::<T>(threads * n.min(KC) * d.div_ceil(w) * w, 64)
}

/// Whether [`syrk_lower`] takes `c` (kernels available for `T`, and `c`
/// with a unit stride).
pub(crate) fn applicable<T: Real>(c: MatRef<'_, T>) -> bool {
    available::<T>() && (c.row_stride() == 1 || c.col_stride() == 1)
}

/// `C += beta X^T X` on the lower triangle of the `d x d` matrix `c`
/// (`X`: `n x d`), nothing else written. Returns `false`, with `c`
/// untouched, when the register kernels do not apply (CPU, type, or `c`
/// without a unit stride); the caller then computes the product itself.
///
/// The caller has checked shapes, finiteness and the scratch size
/// ([`scratch`]).
pub(crate) fn syrk_lower<T: Real>(
    c: MatMut<'_, T>,
    beta: T,
    x: MatRef<'_, T>,
    par: Par,
    stack: &mut MemStack,
) -> bool {
    let (n, d) = (x.nrows(), x.ncols());
    debug_assert!(c.nrows() == d && c.ncols() == d);
    if !available::<T>() {
        return false;
    }
    let (upper, ldc) = if c.row_stride() == 1 {
        (false, c.col_stride())
    } else if c.col_stride() == 1 {
        (true, c.row_stride())
    } else {
        return false;
    };
    if n == 0 || d == 0 {
        return true;
    }
    let w = lanes::<T>();
    let panels = d.div_ceil(w);
    let threads = par.degree().clamp(1, MAX_THREADS);
    let parts = if threads >= 2 && n.min(KC) * d * d / 2 >= PAR_MIN_FMAS {
        threads.min(panels.div_ceil(MA))
    } else {
        1
    };
    let out = Out {
        ptr: c.as_ptr_mut(),
        ldc,
        d,
        upper,
    };
    let (cuts, parts) = split(&out, w, panels, parts);
    let len = n.min(KC) * panels * w;
    // Room for one buffer per thread? (Callers whose scratch does not
    // depend on the thread count provide one: the threads then share it.)
    let own = stack.can_hold(StackReq::new_aligned::<T>(parts * len, 64));
    if !own && !stack.can_hold(StackReq::new_aligned::<T>(len, 64)) {
        return false;
    }
    let job = Job {
        x,
        beta,
        out: &out,
        len,
    };
    if own {
        let (mut bufs, _) = stack.make_aligned_with(parts * len, 64, |_| T::ZERO);
        run_parallel(&job, &cuts[..=parts], &mut bufs, par);
    } else {
        let (mut buf, _) = stack.make_aligned_with(len, 64, |_| T::ZERO);
        shared(&job, &cuts[..=parts], &mut buf, par);
    }
    true
}

/// [`run_parallel`] with one packing buffer: each block of rows of `X` is
/// packed once (one thread), then the threads compute their rows of `C`
/// from it.
fn shared<T: Real>(job: &Job<'_, T>, cuts: &[usize], buf: &mut [T], par: Par) {
    let (n, d) = (job.x.nrows(), job.x.ncols());
    let w = lanes::<T>();
    let mut p0 = 0;
    while p0 < n {
        let kc = KC.min(n - p0);
        pack(buf, job.x, p0, kc, w, 0, d.div_ceil(w));
        let packed = Packed { buf, kc, w };
        compute_parallel(&packed, job.beta, job.out, cuts, par);
        p0 += kc;
    }
}

/// [`compute`] over the row-panel ranges `cuts[i] .. cuts[i + 1]` on the
/// threads of `par`.
fn compute_parallel<T: Real>(
    packed: &Packed<'_, T>,
    beta: T,
    out: &Out<T>,
    cuts: &[usize],
    par: Par,
) {
    if cuts.len() <= 2 {
        compute(packed, beta, out, cuts[0], cuts[cuts.len() - 1]);
        return;
    }
    let mid = cuts.len() / 2;
    faer::utils::thread::join_raw(
        |p| compute_parallel(packed, beta, out, &cuts[..=mid], p),
        |p| compute_parallel(packed, beta, out, &cuts[mid..], p),
        par,
    );
}

/// What every thread of one product shares.
struct Job<'a, T> {
    x: MatRef<'a, T>,
    beta: T,
    out: &'a Out<T>,
    /// Values of one thread's packing buffer.
    len: usize,
}

/// Runs the row-panel ranges `cuts[i] .. cuts[i + 1]` on the threads of
/// `par`, each with its own `job.len` values of `bufs`.
fn run_parallel<T: Real>(job: &Job<'_, T>, cuts: &[usize], bufs: &mut [T], par: Par) {
    if cuts.len() <= 2 {
        worker(job, cuts[0], cuts[cuts.len() - 1], &mut bufs[..job.len]);
        return;
    }
    let mid = cuts.len() / 2;
    let (lo, hi) = bufs.split_at_mut(mid * job.len);
    faer::utils::thread::join_raw(
        |p| run_parallel(job, &cuts[..=mid], lo, p),
        |p| run_parallel(job, &cuts[mid..], hi, p),
        par,
    );
}

/// The rows of `C` in panels `q_lo .. q_hi`, over every block of rows of
/// `X`: packs what those rows need (their own panels and the columns they
/// meet in the triangle), then their tiles.
fn worker<T: Real>(job: &Job<'_, T>, q_lo: usize, q_hi: usize, buf: &mut [T]) {
    let (n, d) = (job.x.nrows(), job.x.ncols());
    let w = lanes::<T>();
    let panels = d.div_ceil(w);
    if q_lo >= q_hi {
        return;
    }
    // Lower: columns up to the last row; upper: from the first row on.
    let (pa, pb) = if job.out.upper {
        (q_lo, panels)
    } else {
        (0, q_hi)
    };
    let mut p0 = 0;
    while p0 < n {
        let kc = KC.min(n - p0);
        pack(buf, job.x, p0, kc, w, pa, pb);
        let packed = Packed { buf, kc, w };
        compute(&packed, job.beta, job.out, q_lo, q_hi);
        p0 += kc;
    }
}

/// Rows `p0 .. p0 + kc` of `x`, column panels `pa .. pb`, into `W`-wide
/// column panels (see the module docs), zero past column `d`. Reads `x`
/// along its unit stride where it has one.
fn pack<T: Real>(
    buf: &mut [T],
    x: MatRef<'_, T>,
    p0: usize,
    kc: usize,
    w: usize,
    pa: usize,
    pb: usize,
) {
    let d = x.ncols();
    if pa >= pb {
        return;
    }
    // Zero padding past column `d` (in the last panel).
    if pb * w > d {
        let q = pb - 1;
        for p in 0..kc {
            buf[(q * kc + p) * w + (d - q * w)..(q * kc + p + 1) * w].fill(T::ZERO);
        }
    }
    let cols = pa * w..(pb * w).min(d);
    if x.col_stride() == 1 {
        // Row-major: each row's slice into the panels.
        for p in 0..kc {
            let row = x.row(p0 + p);
            for q in pa..pb {
                let (j0, len) = (q * w, w.min(d - q * w));
                let dst = &mut buf[(q * kc + p) * w..][..len];
                match row.subcols(j0, len).try_as_row_major() {
                    Some(r) => dst.copy_from_slice(r.as_slice()),
                    None => {
                        for (jj, v) in dst.iter_mut().enumerate() {
                            *v = row[j0 + jj];
                        }
                    }
                }
            }
        }
    } else {
        // Column-major (or any strides): down each column.
        for j in cols {
            let (q, jj) = (j / w, j % w);
            let col = x.col(j).subrows(p0, kc);
            match col.try_as_col_major() {
                Some(c) => {
                    for (p, v) in c.as_slice().iter().enumerate() {
                        buf[(q * kc + p) * w + jj] = *v;
                    }
                }
                None => {
                    for p in 0..kc {
                        buf[(q * kc + p) * w + jj] = col[p];
                    }
                }
            }
        }
    }
}

/// One packed block of rows of `X`.
struct Packed<'a, T> {
    buf: &'a [T],
    kc: usize,
    w: usize,
}

/// Where tiles go: element `(r, c)` of `X^T X` (`r` along the unit stride)
/// lives at `ptr + r + c * ldc`; kept where `r >= c` (lower) or `r <= c`
/// (`upper`, a row-major `C`).
struct Out<T> {
    ptr: *mut T,
    ldc: isize,
    d: usize,
    upper: bool,
}

// SAFETY: `Out` is a view of the caller's `&mut` matrix for the duration
// of `syrk_lower`; threads given an `Out` write disjoint sets of its rows
// (`run_parallel`), so sharing the pointer is sound.
unsafe impl<T: Send> Send for Out<T> {}
// SAFETY: as for `Send`: concurrent users write disjoint rows.
unsafe impl<T: Send> Sync for Out<T> {}

/// Relative work of row panel `q` (the columns of its triangle).
fn panel_work(out_d: usize, upper: bool, q: usize, w: usize) -> usize {
    if upper {
        out_d - (q * w).min(out_d)
    } else {
        ((q + 1) * w).min(out_d)
    }
}

/// Cuts `0 = cuts[0] <= .. <= cuts[parts] = panels` (multiples of [`MA`]
/// but the last) of the row panels into `parts` ranges of about equal work.
fn split<T>(out: &Out<T>, w: usize, panels: usize, parts: usize) -> ([usize; 9], usize) {
    let parts = parts.clamp(1, 8);
    let work = |lo: usize, hi: usize| -> usize {
        (lo..hi).map(|q| panel_work(out.d, out.upper, q, w)).sum()
    };
    let total = work(0, panels);
    let mut cuts = [panels; 9];
    cuts[0] = 0;
    let (mut acc, mut next, mut q) = (0usize, 1usize, 0usize);
    while q < panels && next < parts {
        let end = (q + MA).min(panels);
        acc += work(q, end);
        q = end;
        while next < parts && acc * parts >= total * next {
            cuts[next] = q;
            next += 1;
        }
    }
    (cuts, parts)
}

/// All tiles whose rows are in panels `q_lo .. q_hi`.
fn compute<T: Real>(packed: &Packed<'_, T>, beta: T, out: &Out<T>, q_lo: usize, q_hi: usize) {
    let (kc, w) = (packed.kc, packed.w);
    let block = (ROW_BLOCK_BYTES / (kc * 64) / MA).max(1) * MA;
    let d = out.d;
    let mut qb = q_lo;
    while qb < q_hi {
        let qe = (qb + block).min(q_hi);
        // Columns meeting this block's rows in the kept triangle.
        let (c_lo, c_hi) = if out.upper {
            ((qb * w) / NR * NR, d)
        } else {
            (0, (qe * w).min(d))
        };
        let mut c0 = c_lo;
        while c0 < c_hi {
            let b = &packed.buf[(c0 / w) * kc * w + c0 % w..];
            // Row tiles start (lower) or end (upper) at the panel holding
            // the diagonal, so at most one panel of a tile lies across it.
            let q_diag = c0 / w;
            if out.upper {
                let mut q_end = qe.min(q_diag + 1);
                while q_end > qb {
                    let q = q_end.saturating_sub(MA).max(qb);
                    tile(packed, q, q_end - q, b, c0, beta, out);
                    q_end = q;
                }
            } else {
                let mut q = qb.max(q_diag);
                while q < qe {
                    let ma = MA.min(qe - q);
                    tile(packed, q, ma, b, c0, beta, out);
                    q += ma;
                }
            }
            c0 += NR;
        }
        qb = qe;
    }
}

/// Lane masks of a tile at rows `r0..`, columns `c0..`: bit `l` of
/// `m[j][i]` keeps row `r0 + i W + l` of column `c0 + j`.
fn masks(d: usize, upper: bool, r0: usize, c0: usize, w: usize) -> [[u16; MA]; NR] {
    let mut m = [[0u16; MA]; NR];
    let full: u32 = (1u32 << w) - 1;
    for (j, mj) in m.iter_mut().enumerate() {
        let c = c0 + j;
        if c >= d {
            break;
        }
        for (i, mi) in mj.iter_mut().enumerate() {
            let rb = r0 + i * w;
            // Rows below the matrix's edge.
            let valid = d.saturating_sub(rb).min(w);
            let mut bits = if valid == w {
                full
            } else {
                (1u32 << valid) - 1
            };
            if upper {
                // Keep r <= c.
                let keep = (c + 1).saturating_sub(rb).min(w);
                bits &= if keep == w { full } else { (1u32 << keep) - 1 };
            } else {
                // Keep r >= c.
                let skip = c.saturating_sub(rb).min(w);
                bits &= (full << skip) & full;
            }
            *mi = bits as u16;
        }
    }
    m
}

/// One register tile: rows of panels `q .. q + ma`, columns `c0 .. c0 + 8`
/// (packed column values start at `b[0]`, one packed row every `W`).
fn tile<T: Real>(
    packed: &Packed<'_, T>,
    q: usize,
    ma: usize,
    b: &[T],
    c0: usize,
    beta: T,
    out: &Out<T>,
) {
    let (kc, w) = (packed.kc, packed.w);
    let m = masks(out.d, out.upper, q * w, c0, w);
    let a = &packed.buf[q * kc * w..(q + ma) * kc * w];
    // The tile's first element of C (may lie outside C when the whole
    // first vector is masked off, hence wrapping arithmetic).
    let dst = out
        .ptr
        .wrapping_add(q * w)
        .wrapping_offset(c0 as isize * out.ldc);
    debug_assert!(b.len() >= (kc - 1) * w + NR);
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        let stride = kc * w;
        if is::<T, f32>() {
            let (a, b) = (cast::<T, f32>(a), cast::<T, f32>(b));
            let beta = beta.to_f64() as f32;
            let dst = dst as *mut f32;
            // SAFETY: `available` checked AVX-512 (`V4`) on this CPU; `a`
            // holds `ma` panels of `kc * 16` and `b` at least
            // `(kc - 1) * 16 + 8` values (debug-asserted); every lane the
            // masks keep is an element of the caller's `C` in the kept
            // triangle (rows and columns below `d`), which only this
            // thread writes (threads own disjoint rows).
            unsafe {
                match ma {
                    1 => avx512::tile_f32::<1>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m,
                    ),
                    2 => avx512::tile_f32::<2>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m,
                    ),
                    _ => avx512::tile_f32::<3>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m,
                    ),
                }
            }
        } else {
            let (a, b) = (cast::<T, f64>(a), cast::<T, f64>(b));
            let beta = beta.to_f64();
            let dst = dst as *mut f64;
            let m8 = m.map(|r| r.map(|v| v as u8));
            // SAFETY: as for f32, with panels of `kc * 8`.
            unsafe {
                match ma {
                    1 => avx512::tile_f64::<1>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m8,
                    ),
                    2 => avx512::tile_f64::<2>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m8,
                    ),
                    _ => avx512::tile_f64::<3>(
                        kc,
                        a.as_ptr(),
                        stride,
                        b.as_ptr(),
                        beta,
                        dst,
                        out.ldc,
                        &m8,
                    ),
                }
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "std")))]
    {
        let _ = (a, b, dst, m, beta);
        unreachable!("syrk register kernels used without being available");
    }
}

/// `&[T]` as `&[U]` for `T == U` (checked by the caller through `TypeId`).
#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn cast<T: 'static, U: 'static>(s: &[T]) -> &[U] {
    assert!(is::<T, U>());
    // SAFETY: `T` and `U` are the same type (asserted), so the layout,
    // length and lifetime carry over unchanged.
    unsafe { core::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) }
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod avx512 {
    use core::arch::x86_64::*;

    /// How many packed rows ahead the tile prefetches its row panels.
    const PREFETCH_ROWS: usize = 16;

    macro_rules! tile_kernel {
        ($name:ident, $t:ty, $v:ty, $mask:ty, $w:expr, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $maskz_loadu:ident, $mask_storeu:ident) => {
            /// One register tile: `acc[j][i] = sum_p a_i[p] * b[p][j]` over
            /// the `kc` packed rows, then `C[.., j] += beta acc[j]` under
            /// the lane masks.
            ///
            /// # Safety
            /// AVX-512F available; `a` valid for reads of `MA` panels of
            /// `stride` values (64-byte aligned); `b` for reads of
            /// `(kc - 1) * W + 8` values; every element a mask keeps valid
            /// for reads and writes and not accessed concurrently.
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name<const MA: usize>(
                kc: usize,
                a: *const $t,
                stride: usize,
                b: *const $t,
                beta: $t,
                c: *mut $t,
                ldc: isize,
                masks: &[[$mask; super::MA]; super::NR],
            ) {
                let mut acc = [[$zero(); MA]; super::NR];
                // One packed row: `MA` aligned vector loads, eight
                // broadcasts, `8 MA` multiply-adds. (A macro, not a
                // closure: closures do not inherit `target_feature`.)
                macro_rules! step {
                    ($p:expr) => {{
                        let p = $p;
                        let mut av = [$zero(); MA];
                        for (i, v) in av.iter_mut().enumerate() {
                            // SAFETY: panel `i`, packed row `p`: inside
                            // `a`'s `MA * stride` values, 64-byte aligned
                            // (panels and rows are multiples of 64 bytes
                            // from an aligned buffer).
                            *v = unsafe { $load(a.add(i * stride + p * $w)) };
                        }
                        for (j, accj) in acc.iter_mut().enumerate() {
                            // SAFETY: `p * W + j < (kc - 1) * W + 8`.
                            let bj = $set1(unsafe { *b.add(p * $w + j) });
                            #[allow(clippy::needless_range_loop)]
                            for i in 0..MA {
                                accj[i] = $fmadd(av[i], bj, accj[i]);
                            }
                        }
                    }};
                }
                let mut p = 0;
                while p + 4 <= kc {
                    step!(p);
                    step!(p + 1);
                    step!(p + 2);
                    step!(p + 3);
                    for i in 0..MA {
                        // A hint only (never faults), hence wrapping
                        // arithmetic past the panel's end.
                        let ahead = a.wrapping_add(i * stride + (p + PREFETCH_ROWS) * $w);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    p += 4;
                }
                while p < kc {
                    step!(p);
                    p += 1;
                }
                let bv = $set1(beta);
                for (j, accj) in acc.iter().enumerate() {
                    for i in 0..MA {
                        let m = masks[j][i];
                        if m == 0 {
                            continue;
                        }
                        let p = c.wrapping_offset(j as isize * ldc + (i * $w) as isize);
                        // SAFETY: masked-off lanes are neither read nor
                        // written (and cannot fault); the kept ones are
                        // elements of C this thread owns.
                        unsafe {
                            let old = $maskz_loadu(m, p);
                            $mask_storeu(p, m, $fmadd(accj[i], bv, old));
                        }
                    }
                }
            }
        };
    }

    tile_kernel!(
        tile_f32,
        f32,
        __m512,
        u16,
        16,
        _mm512_setzero_ps,
        _mm512_load_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_maskz_loadu_ps,
        _mm512_mask_storeu_ps
    );
    tile_kernel!(
        tile_f64,
        f64,
        __m512d,
        u8,
        8,
        _mm512_setzero_pd,
        _mm512_load_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_maskz_loadu_pd,
        _mm512_mask_storeu_pd
    );
}
