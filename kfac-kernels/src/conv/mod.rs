//! Conv2d factor statistics (KFC, Grosse & Martens 2016), with patches
//! streamed in tiles of output positions.
//!
//! For an input `x` of shape `(n, C, H, W)` and a kernel `kh x kw` with stride
//! `s`, padding `p` and dilation `δ`, output position `t = (oh, ow)` of sample
//! `i` sees the patch
//! `p_{i,t}[(c, u, v)] = x[i, c, oh*s_h - p_h + u*δ_h, ow*s_w - p_w + v*δ_w]`
//! (zero outside the image), its entries ordered `(c, u, v)` as a weight
//! `C_out x C x kh x kw` is flattened, with a trailing `1` when the layer has a
//! bias. With `S = H_out * W_out` positions per sample:
//!
//! | normalization | A statistic | G statistic |
//! |---|---|---|
//! | [`ConvNormalization::Kfc`] | `1/(n S) Σ_{i,t} p p^T` | `1/n Σ_{i,t} g g^T` |
//! | [`ConvNormalization::KfacPytorch`] | `1/(n S^3) Σ_{i,t} p p^T` | `1/(n S^3) Σ_{i,t} g g^T` |
//!
//! `Kfc` averages `A` over all `n S` patches and sums `G` over positions (mean
//! over samples), so `A ⊗ G` equals the KFC paper's `Ω ⊗ Γ` with
//! `Ω = E[Σ_t p p^T]`, `Γ = E[Σ_t g g^T] / S`. `KfacPytorch` reproduces
//! kfac-pytorch 0.4, which divides both the patch matrix and the gradient
//! matrix by `S` before taking a mean over `n S` rows (it ignores dilation;
//! we honour it in both modes).
//!
//! Memory: the patches are extracted into one tile of at most
//! [`PATCH_TILE_BYTES`] (a `rows x (C kh kw + bias)` panel), then folded in with
//! a symmetric rank-k update (the factor update's, see
//! [`factor::syrk_update`](crate::factor::syrk_update)), so the extra memory
//! (the tile plus the product's packing buffer of at most `256 x (C kh kw +
//! bias)` values) does not grow with the batch or the image size.
//!
//! ```
//! use faer::{Mat, Par};
//! use faer::dyn_stack::{MemBuffer, MemStack};
//! use kfac_kernels::conv::{Conv2dGeometry, ConvNormalization, ImageRef, conv2d_a_update, conv2d_a_update_scratch};
//! // one 1x3x3 image, 2x2 kernel, stride 1: four patches
//! let x: Vec<f64> = (1..=9).map(|v| v as f64).collect();
//! let geom = Conv2dGeometry::new(1, 1, 3, 3, 2, 2);
//! let img = ImageRef::nchw(&x, 1, 1, 3, 3).unwrap();
//! let mut a = Mat::<f64>::zeros(5, 5);
//! let mut buf = MemBuffer::new(conv2d_a_update_scratch::<f64>(&geom, true).unwrap());
//! conv2d_a_update(a.as_mut(), 0.0, 1.0, img, &geom, true, ConvNormalization::Kfc,
//!                 Par::Seq, MemStack::new(&mut buf)).unwrap();
//! // patch top-left entries are 1, 2, 4, 5: their mean square is 46/4
//! assert_eq!(a[(0, 0)], 46.0 / 4.0);
//! assert_eq!(a[(4, 4)], 1.0); // bias corner
//! ```

use crate::factor::scale_lower;
use crate::{check, Error, Real, Result};
use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::prelude::ReborrowMut;
use faer::{Accum, MatMut, MatRef, Par};

/// Alignment of the patch tile (one cache line).
const TILE_ALIGN: usize = 64;

/// Upper bound on the bytes of one patch tile.
pub const PATCH_TILE_BYTES: usize = 1 << 21;
/// Fewest output positions in a tile (keeps the rank-k updates efficient
/// even for very wide patches).
pub const PATCH_TILE_MIN_ROWS: usize = 64;
/// Most output positions in a tile.
pub const PATCH_TILE_MAX_ROWS: usize = 1024;

/// Memory layout of a 4-D activation tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageLayout {
    /// `(batch, channel, height, width)`, width fastest (PyTorch default).
    Nchw,
    /// `(batch, height, width, channel)`, channel fastest (channels-last).
    Nhwc,
}

/// Normalization of the conv2d factors; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConvNormalization {
    /// KFC paper: `A` averaged over all `n S` patches, `G` summed over
    /// positions and averaged over samples.
    #[default]
    Kfc,
    /// kfac-pytorch 0.4: both divided by `n S^3`.
    KfacPytorch,
}

/// A borrowed 4-D tensor `(n, c, h, w)` with explicit element strides.
#[derive(Clone, Copy, Debug)]
pub struct ImageRef<'a, T> {
    data: &'a [T],
    dims: [usize; 4],
    strides: [usize; 4],
}

impl<'a, T> ImageRef<'a, T> {
    /// A dense NCHW tensor.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `data.len() != n*c*h*w`,
    /// [`Error::SizeOverflow`] if that product overflows.
    pub fn nchw(data: &'a [T], n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let hw = mul(h, w)?;
        let chw = mul(c, hw)?;
        check::len("NCHW tensor", data.len(), mul(n, chw)?)?;
        Ok(Self {
            data,
            dims: [n, c, h, w],
            strides: [chw, hw, w, 1],
        })
    }

    /// A dense NHWC tensor, dimensions still given as `(n, c, h, w)`.
    ///
    /// # Errors
    /// As [`ImageRef::nchw`].
    pub fn nhwc(data: &'a [T], n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let wc = mul(w, c)?;
        let hwc = mul(h, wc)?;
        check::len("NHWC tensor", data.len(), mul(n, hwc)?)?;
        Ok(Self {
            data,
            dims: [n, c, h, w],
            strides: [hwc, 1, wc, c],
        })
    }

    /// A dense tensor in `layout`.
    ///
    /// # Errors
    /// As [`ImageRef::nchw`].
    pub fn new(
        data: &'a [T],
        layout: ImageLayout,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<Self> {
        match layout {
            ImageLayout::Nchw => Self::nchw(data, n, c, h, w),
            ImageLayout::Nhwc => Self::nhwc(data, n, c, h, w),
        }
    }

    /// A tensor with arbitrary element strides `(n, c, h, w)`.
    ///
    /// # Errors
    /// [`Error::InvalidGeometry`] if the largest offset falls outside `data`.
    pub fn with_strides(data: &'a [T], dims: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        if dims.contains(&0) {
            return Ok(Self {
                data,
                dims,
                strides,
            });
        }
        let mut last = 0usize;
        for k in 0..4 {
            last = (dims[k] - 1)
                .checked_mul(strides[k])
                .and_then(|o| o.checked_add(last))
                .ok_or(Error::SizeOverflow {
                    what: "tensor offset",
                })?;
        }
        if last >= data.len() {
            return Err(Error::InvalidGeometry {
                what: "tensor strides reach past the end of the data",
            });
        }
        Ok(Self {
            data,
            dims,
            strides,
        })
    }

    /// `(n, c, h, w)`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Element strides of `(n, c, h, w)`.
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }
}

fn mul(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::SizeOverflow {
        what: "tensor size",
    })
}

/// Shape and hyper-parameters of a conv2d layer (`groups = 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Batch size `n`.
    pub batch: usize,
    /// Input channels `C`.
    pub in_channels: usize,
    /// Input height `H`.
    pub in_h: usize,
    /// Input width `W`.
    pub in_w: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Zero padding on top and bottom.
    pub pad_h: usize,
    /// Zero padding left and right.
    pub pad_w: usize,
    /// Vertical dilation.
    pub dilation_h: usize,
    /// Horizontal dilation.
    pub dilation_w: usize,
}

impl Conv2dGeometry {
    /// Stride 1, no padding, no dilation.
    pub fn new(
        batch: usize,
        in_channels: usize,
        in_h: usize,
        in_w: usize,
        kernel_h: usize,
        kernel_w: usize,
    ) -> Self {
        Self {
            batch,
            in_channels,
            in_h,
            in_w,
            kernel_h,
            kernel_w,
            stride_h: 1,
            stride_w: 1,
            pad_h: 0,
            pad_w: 0,
            dilation_h: 1,
            dilation_w: 1,
        }
    }

    /// Sets the strides.
    pub fn stride(mut self, h: usize, w: usize) -> Self {
        self.stride_h = h;
        self.stride_w = w;
        self
    }

    /// Sets the padding.
    pub fn padding(mut self, h: usize, w: usize) -> Self {
        self.pad_h = h;
        self.pad_w = w;
        self
    }

    /// Sets the dilation.
    pub fn dilation(mut self, h: usize, w: usize) -> Self {
        self.dilation_h = h;
        self.dilation_w = w;
        self
    }

    /// Checks the hyper-parameters and returns `(H_out, W_out)`:
    /// `H_out = (H + 2 p_h - δ_h (kh - 1) - 1) / s_h + 1`.
    ///
    /// # Errors
    /// [`Error::InvalidGeometry`] for a zero kernel, stride or dilation, or a
    /// dilated kernel larger than the padded input.
    pub fn output_size(&self) -> Result<(usize, usize)> {
        if self.kernel_h == 0 || self.kernel_w == 0 {
            return Err(Error::InvalidGeometry {
                what: "kernel size must be >= 1",
            });
        }
        if self.stride_h == 0 || self.stride_w == 0 {
            return Err(Error::InvalidGeometry {
                what: "stride must be >= 1",
            });
        }
        if self.dilation_h == 0 || self.dilation_w == 0 {
            return Err(Error::InvalidGeometry {
                what: "dilation must be >= 1",
            });
        }
        let one = |inp: usize, pad: usize, k: usize, dil: usize, s: usize| -> Result<usize> {
            let padded =
                pad.checked_mul(2)
                    .and_then(|p| p.checked_add(inp))
                    .ok_or(Error::SizeOverflow {
                        what: "padded input",
                    })?;
            let span = (k - 1)
                .checked_mul(dil)
                .and_then(|v| v.checked_add(1))
                .ok_or(Error::SizeOverflow {
                    what: "dilated kernel",
                })?;
            if span > padded {
                return Err(Error::InvalidGeometry {
                    what: "dilated kernel is larger than the padded input",
                });
            }
            Ok((padded - span) / s + 1)
        };
        Ok((
            one(
                self.in_h,
                self.pad_h,
                self.kernel_h,
                self.dilation_h,
                self.stride_h,
            )?,
            one(
                self.in_w,
                self.pad_w,
                self.kernel_w,
                self.dilation_w,
                self.stride_w,
            )?,
        ))
    }

    /// Patch length `C * kh * kw` (without the bias entry).
    ///
    /// # Errors
    /// [`Error::SizeOverflow`].
    pub fn patch_len(&self) -> Result<usize> {
        mul(mul(self.in_channels, self.kernel_h)?, self.kernel_w)
    }
}

/// Rows of a patch tile for patches of `k` entries: as many as fit in
/// [`PATCH_TILE_BYTES`], clamped to [`PATCH_TILE_MIN_ROWS`,
/// `PATCH_TILE_MAX_ROWS`] and to the number of positions.
fn tile_rows<T>(k: usize, positions: usize) -> usize {
    let by_bytes = PATCH_TILE_BYTES / (k.max(1) * core::mem::size_of::<T>());
    by_bytes
        .clamp(PATCH_TILE_MIN_ROWS, PATCH_TILE_MAX_ROWS)
        .min(positions.max(1))
}

/// Scratch needed by [`conv2d_a_update`]: one patch tile.
///
/// # Errors
/// [`Error::InvalidGeometry`] / [`Error::SizeOverflow`] for a bad geometry.
pub fn conv2d_a_update_scratch<T: Real>(geom: &Conv2dGeometry, bias: bool) -> Result<StackReq> {
    let (oh, ow) = geom.output_size()?;
    let k = geom.patch_len()? + bias as usize;
    let positions = mul(mul(geom.batch, oh)?, ow)?;
    let rows = tile_rows::<T>(k, positions);
    Ok(StackReq::all_of(&[
        StackReq::new_aligned::<T>(mul(rows, k)?, TILE_ALIGN),
        // One packing buffer of the product (shared by the threads).
        crate::syrk::scratch::<T>(rows, k, Par::Seq),
    ]))
}

/// Adds the conv2d A-factor statistic of a batch to one triangle:
/// `A <- alpha * A + beta * A_batch`, with `A_batch` as in the
/// [module docs](self) for `norm`. Lower triangle only.
///
/// * `a`: `(C kh kw + bias)` square, any strides.
/// * `input`: `(n, C, H, W)` matching `geom`, any layout or strides.
///
/// # Errors
/// [`Error::InvalidGeometry`] for a bad geometry or an input whose dims do
/// not match it, [`Error::DimensionMismatch`] for `a`, [`Error::NonFinite`]
/// for a NaN/Inf input, [`Error::InvalidParameter`] for non-finite
/// `alpha`/`beta` or an empty batch, [`Error::ScratchTooSmall`]. `a` is
/// untouched on error.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_a_update<T: Real>(
    a: MatMut<'_, T>,
    alpha: T,
    beta: T,
    input: ImageRef<'_, T>,
    geom: &Conv2dGeometry,
    bias: bool,
    norm: ConvNormalization,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    conv2d_a_update_impl(a, alpha, beta, input, false, geom, bias, norm, par, stack)
}

/// [`conv2d_a_update`] on an input already proven finite by
/// [`check::finite_image`]: the same result, bit for bit, without the second
/// NaN/Inf scan of the input.
///
/// ```
/// use faer::{Mat, Par};
/// use faer::dyn_stack::{MemBuffer, MemStack};
/// use kfac_kernels::{check, conv::*};
/// let data = vec![1.0f32; 2 * 4 * 4];
/// let img = ImageRef::nchw(&data, 1, 2, 4, 4).unwrap();
/// let geom = Conv2dGeometry::new(1, 2, 4, 4, 3, 3);
/// let k = geom.patch_len().unwrap();
/// let mut a = Mat::<f32>::zeros(k, k);
/// let mut buf = MemBuffer::new(conv2d_a_update_scratch::<f32>(&geom, false).unwrap());
/// let img = check::finite_image(img).unwrap();
/// conv2d_a_update_prechecked(a.as_mut(), 0.0, 1.0, img, &geom, false,
///     ConvNormalization::Kfc, Par::Seq, MemStack::new(&mut buf)).unwrap();
/// assert_eq!(a[(4, 4)], 1.0); // the centre tap is never padding
/// ```
///
/// # Errors
/// As [`conv2d_a_update`], except [`Error::NonFinite`].
#[allow(clippy::too_many_arguments)]
pub fn conv2d_a_update_prechecked<T: Real>(
    a: MatMut<'_, T>,
    alpha: T,
    beta: T,
    input: check::FiniteImage<'_, T>,
    geom: &Conv2dGeometry,
    bias: bool,
    norm: ConvNormalization,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    conv2d_a_update_impl(
        a,
        alpha,
        beta,
        input.get(),
        true,
        geom,
        bias,
        norm,
        par,
        stack,
    )
}

/// [`conv2d_a_update`]; `prechecked` is true only when a
/// [`check::FiniteImage`] proves `input` finite.
#[allow(clippy::too_many_arguments)]
fn conv2d_a_update_impl<T: Real>(
    mut a: MatMut<'_, T>,
    alpha: T,
    beta: T,
    input: ImageRef<'_, T>,
    prechecked: bool,
    geom: &Conv2dGeometry,
    bias: bool,
    norm: ConvNormalization,
    par: Par,
    stack: &mut MemStack,
) -> Result<()> {
    let (oh, ow) = geom.output_size()?;
    if input.dims != [geom.batch, geom.in_channels, geom.in_h, geom.in_w] {
        return Err(Error::InvalidGeometry {
            what: "input tensor dims differ from the geometry's (n, C, H, W)",
        });
    }
    let kp = geom.patch_len()?;
    let k = kp + bias as usize;
    check::shape_mut("conv A factor", &a, k, k)?;
    check::finite_param("alpha", alpha)?;
    check::finite_param("beta", beta)?;
    let s = mul(oh, ow)?;
    let positions = mul(geom.batch, s)?;
    if positions == 0 {
        return Err(Error::InvalidParameter {
            what: "patch count n*H_out*W_out",
            value: 0.0,
            expected: "at least one patch",
        });
    }
    if !prechecked {
        check_image_finite(&input)?;
    }
    check::stack(stack, conv2d_a_update_scratch::<T>(geom, bias)?)?;

    let sf = T::from_usize(s);
    let nf = T::from_usize(geom.batch);
    let scale = match norm {
        ConvNormalization::Kfc => beta / (nf * sf),
        ConvNormalization::KfacPytorch => beta / (nf * sf * sf * sf),
    };
    let mut accum = if alpha == T::ZERO {
        Accum::Replace
    } else {
        if alpha != T::ONE {
            scale_lower(a.rb_mut(), alpha);
        }
        Accum::Add
    };
    if k == 0 {
        return Ok(());
    }
    let rows = tile_rows::<T>(k, positions);
    let (mut tile, stack) = stack.make_aligned_with(rows * k, TILE_ALIGN, |_| T::ZERO);
    let tile: &mut [T] = &mut tile;
    let mut start = 0;
    while start < positions {
        let m = rows.min(positions - start);
        let src = PatchSource {
            img: &input,
            geom,
            out_hw: (oh, ow),
            start,
            m,
            ld: rows,
        };
        extract_patches_par(tile, src, 0..k, kp, par);
        let t = MatRef::from_column_major_slice_with_stride(&tile[..], m, k, rows);
        crate::factor::syrk_lower(a.rb_mut(), accum, scale, t, par, stack);
        accum = Accum::Add;
        start += m;
    }
    Ok(())
}

pub(crate) fn check_image_finite<T: Real>(img: &ImageRef<'_, T>) -> Result<f64> {
    let [n, c, h, w] = img.dims;
    let overflow = Error::SizeOverflow {
        what: "tensor element count",
    };
    let hw = mul(h, w)?;
    let chw = mul(c, hw)?;
    let total = mul(n, chw).map_err(|_| overflow)?;
    let dense_strides = [[chw, hw, w, 1], [chw, 1, mul(w, c)?, c]];
    if total == img.data.len() && dense_strides.contains(&img.strides) {
        // Dense NCHW or NHWC: the view addresses every element of `data`
        // exactly once, so one linear scan checks exactly the input.
        let (ok, sum_sq) = crate::check::finite_and_sum_sq(img.data);
        if ok {
            return Ok(sum_sq);
        }
        let p = img
            .data
            .iter()
            .position(|v| !v.is_finite_val())
            .unwrap_or(0);
        return Err(Error::NonFinite {
            what: "input tensor (flat index)",
            row: p,
            col: 0,
        });
    }
    let [sn, sc, sh, sw] = img.strides;
    let mut sum_sq = 0.0f64;
    for i in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let v = img.data[i * sn + ch * sc + y * sh + x * sw];
                    if !v.is_finite_val() {
                        return Err(Error::NonFinite {
                            what: "input tensor (sample, channel)",
                            row: i,
                            col: ch,
                        });
                    }
                    let v = v.to_f64();
                    sum_sq += v * v;
                }
            }
        }
    }
    Ok(sum_sq)
}

mod patches;
use patches::{extract_patches_par, PatchSource};

/// Scratch needed by [`conv2d_g_update`] (none).
pub fn conv2d_g_update_scratch<T: Real>() -> StackReq {
    StackReq::EMPTY
}

/// Adds the conv2d G-factor statistic of a batch to one triangle:
/// `G <- alpha * G + beta * G_batch`, with `G_batch` as in the
/// [module docs](self) for `norm`. Lower triangle only.
///
/// `grad_out` holds the gradients of the loss with respect to the layer's
/// outputs, `(n, C_out, H_out, W_out)`, in any layout.
///
/// # Errors
/// [`Error::DimensionMismatch`] if `g` is not `C_out` square,
/// [`Error::NonFinite`], [`Error::InvalidParameter`] for non-finite
/// `alpha`/`beta` or an empty batch. `g` is untouched on error.
pub fn conv2d_g_update<T: Real>(
    g: MatMut<'_, T>,
    alpha: T,
    beta: T,
    grad_out: ImageRef<'_, T>,
    norm: ConvNormalization,
    par: Par,
) -> Result<()> {
    conv2d_g_update_impl(g, alpha, beta, grad_out, false, norm, par)
}

/// [`conv2d_g_update`] on output gradients already proven finite by
/// [`check::finite_image`]: the same result, bit for bit, without the second
/// NaN/Inf scan.
///
/// ```
/// use faer::{Mat, Par};
/// use kfac_kernels::{check, conv::*};
/// let data = vec![2.0f64; 3 * 2 * 2];
/// let gout = check::finite_image(ImageRef::nchw(&data, 1, 3, 2, 2).unwrap()).unwrap();
/// let mut g = Mat::<f64>::zeros(3, 3);
/// conv2d_g_update_prechecked(g.as_mut(), 0.0, 1.0, gout, ConvNormalization::Kfc, Par::Seq).unwrap();
/// assert_eq!(g[(2, 0)], 16.0); // sum over 4 positions of 2*2, over n = 1
/// ```
///
/// # Errors
/// As [`conv2d_g_update`], except [`Error::NonFinite`].
pub fn conv2d_g_update_prechecked<T: Real>(
    g: MatMut<'_, T>,
    alpha: T,
    beta: T,
    grad_out: check::FiniteImage<'_, T>,
    norm: ConvNormalization,
    par: Par,
) -> Result<()> {
    conv2d_g_update_impl(g, alpha, beta, grad_out.get(), true, norm, par)
}

fn conv2d_g_update_impl<T: Real>(
    mut g: MatMut<'_, T>,
    alpha: T,
    beta: T,
    grad_out: ImageRef<'_, T>,
    prechecked: bool,
    norm: ConvNormalization,
    par: Par,
) -> Result<()> {
    let [n, c_out, oh, ow] = grad_out.dims;
    check::shape_mut("conv G factor", &g, c_out, c_out)?;
    check::finite_param("alpha", alpha)?;
    check::finite_param("beta", beta)?;
    let s = mul(oh, ow)?;
    if n == 0 || s == 0 {
        return Err(Error::InvalidParameter {
            what: "output positions n*H_out*W_out",
            value: 0.0,
            expected: "at least one position",
        });
    }
    if !prechecked {
        check_image_finite(&grad_out)?;
    }
    let sf = T::from_usize(s);
    let nf = T::from_usize(n);
    let scale = match norm {
        ConvNormalization::Kfc => beta / nf,
        ConvNormalization::KfacPytorch => beta / (nf * sf * sf * sf),
    };
    let mut accum = if alpha == T::ZERO {
        Accum::Replace
    } else {
        if alpha != T::ONE {
            scale_lower(g.rb_mut(), alpha);
        }
        Accum::Add
    };
    if c_out == 0 {
        return Ok(());
    }
    let [sn, sc, sh, sw] = grad_out.strides;
    // Rows of positions: flatten (h, w) when the strides allow it, and the
    // whole batch too when they allow that (dense NHWC).
    // (Checked products: a strided view may have huge dims and zero
    // strides.)
    let flat_hw = oh == 1 || ow.checked_mul(sw) == Some(sh);
    let flat_nhw = flat_hw && (n == 1 || s.checked_mul(sw) == Some(sn));
    let (outer, cols, col_stride) = if flat_nhw {
        (1, mul(n, s)?, sw)
    } else if flat_hw {
        (n, s, sw)
    } else {
        (mul(n, oh)?, ow, sw)
    };
    for blk in 0..outer {
        let base = if flat_nhw {
            0
        } else if flat_hw {
            blk * sn
        } else {
            (blk / oh) * sn + (blk % oh) * sh
        };
        // SAFETY: `ImageRef` construction checked that every offset
        // `i*sn + c*sc + y*sh + x*sw` for in-range indices lies inside
        // `data`; this view addresses exactly the elements (c, position) of
        // one block of positions, all in range by the flattening conditions
        // above. The view is read-only and lives only within this call.
        let m: MatRef<'_, T> = unsafe {
            MatRef::from_raw_parts(
                grad_out.data.as_ptr().add(base),
                c_out,
                cols,
                sc as isize,
                col_stride as isize,
            )
        };
        triangular::matmul(
            g.rb_mut(),
            BlockStructure::TriangularLower,
            accum,
            m,
            BlockStructure::Rectangular,
            m.transpose(),
            BlockStructure::Rectangular,
            scale,
            par,
        );
        accum = Accum::Add;
    }
    Ok(())
}
