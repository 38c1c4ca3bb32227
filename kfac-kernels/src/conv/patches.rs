//! Patch extraction (im2col of one tile of output positions) for the conv2d
//! A statistics of the parent module, serial or split over threads.

use crate::Real;
use faer::Par;

use super::{Conv2dGeometry, ImageRef};

/// What one patch-extraction call reads: the input, its geometry and output
/// size, and the tile's row block (positions `start .. start + m`, flattened
/// as `(i, oh, ow)`, stored with leading dimension `ld`).
#[derive(Clone, Copy)]
pub(super) struct PatchSource<'a, 'b, T> {
    pub(super) img: &'b ImageRef<'a, T>,
    pub(super) geom: &'b Conv2dGeometry,
    pub(super) out_hw: (usize, usize),
    pub(super) start: usize,
    pub(super) m: usize,
    pub(super) ld: usize,
}

/// Fewest tile columns worth handing to another thread in
/// [`extract_patches_par`].
const EXTRACT_MIN_COLS_PER_THREAD: usize = 32;

/// [`extract_patches`] of the tile columns `cols` (`tile` starts at column
/// `cols.start`), split over the threads of `par`: the columns are
/// independent, so each thread fills its own contiguous block of them.
/// Patch extraction is otherwise serial while the rank-k update after it is
/// parallel, which showed as a 2-thread slowdown against materialize-then-SYRK.
pub(super) fn extract_patches_par<T: Real>(
    tile: &mut [T],
    src: PatchSource<'_, '_, T>,
    cols: core::ops::Range<usize>,
    kp: usize,
    par: Par,
) {
    let n = cols.len();
    if par.degree() <= 1 || n < 2 * EXTRACT_MIN_COLS_PER_THREAD {
        extract_patches(tile, src, cols, kp);
        return;
    }
    let mid = cols.start + n / 2;
    let (lo, hi) = tile.split_at_mut((n / 2) * src.ld);
    faer::utils::thread::join_raw(
        |p| extract_patches_par(lo, src, cols.start..mid, kp, p),
        |p| extract_patches_par(hi, src, mid..cols.end, kp, p),
        par,
    );
}

/// im2col of the tile's positions into the tile columns `cols` (`tile`
/// starts at column `cols.start`; column `j < kp` is patch entry
/// `(c, u, v)` with `j = (c kh + u) kw + v`, column `kp` the bias ones).
/// Each column is filled in runs along `ow`: the output columns whose tap
/// falls in the padding are computed once per column, then each run is
/// zeros, a copy (contiguous for unit-stride rows, else strided), zeros.
fn extract_patches<T: Real>(
    tile: &mut [T],
    src: PatchSource<'_, '_, T>,
    cols: core::ops::Range<usize>,
    kp: usize,
) {
    let PatchSource {
        img,
        geom: g,
        out_hw: (oh, ow),
        start,
        m,
        ld,
    } = src;
    let [sn, sc, sh, sw] = img.strides;
    let data = img.data;
    let (kh, kw) = (g.kernel_h, g.kernel_w);
    let s = g.stride_w;
    let step = s * sw;
    for (slot, j) in cols.enumerate() {
        let dst = &mut tile[slot * ld..slot * ld + m];
        if j >= kp {
            dst.fill(T::ONE);
            continue;
        }
        let (c, u, v) = (j / (kh * kw), (j / kw) % kh, j % kw);
        // Output columns x whose tap ix = x*s + off lies in [0, W): [x_lo, x_hi).
        let off = (v * g.dilation_w) as isize - g.pad_w as isize;
        let x_lo = if off >= 0 {
            0
        } else {
            off.unsigned_abs().div_ceil(s)
        };
        let room = g.in_w as isize - off;
        let x_hi = if room <= 0 {
            0
        } else {
            room.unsigned_abs().div_ceil(s).min(ow)
        };
        // Walk positions in runs of constant (i, oh).
        let mut r = 0;
        let mut pos = start;
        while r < m {
            let i = pos / (oh * ow);
            let rem = pos % (oh * ow);
            let y = rem / ow;
            let x0 = rem % ow;
            let run = (ow - x0).min(m - r);
            let out = &mut dst[r..r + run];
            let iy = (y * g.stride_h + u * g.dilation_h) as isize - g.pad_h as isize;
            if iy < 0 || iy as usize >= g.in_h || x_lo >= x_hi {
                out.fill(T::ZERO);
            } else {
                let q_lo = x_lo.saturating_sub(x0).min(run);
                let q_hi = x_hi.saturating_sub(x0).min(run).max(q_lo);
                out[..q_lo].fill(T::ZERO);
                out[q_hi..].fill(T::ZERO);
                if q_hi > q_lo {
                    // (x0 + q_lo) >= x_lo, so the tap is >= 0.
                    let ix = ((x0 + q_lo) * s) as isize + off;
                    let first = i * sn + c * sc + iy as usize * sh + ix as usize * sw;
                    let mid = &mut out[q_lo..q_hi];
                    let len = mid.len();
                    match step {
                        0 => mid.fill(data[first]),
                        1 => mid.copy_from_slice(&data[first..first + len]),
                        _ => {
                            for (o, &x) in mid.iter_mut().zip(data[first..].iter().step_by(step)) {
                                *o = x;
                            }
                        }
                    }
                }
            }
            r += run;
            pos += run;
        }
    }
}
