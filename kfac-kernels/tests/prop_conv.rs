//! Properties of `kernels::conv`: the conv2d A and G factor statistics
//! against an explicit im2col written with plain loops, for every layout,
//! geometry, bias and normalization.

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::MemStack;
use kfac_kernels::conv::{
    conv2d_a_update, conv2d_a_update_scratch, conv2d_g_update, Conv2dGeometry, ConvNormalization,
    ImageRef,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn fail(e: kfac_kernels::Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel returned an error: {e}"))
}

const SENTINEL: f64 = -77.625;

// ---------------------------------------------------------------------------
// 4-D tensors in any layout.
// ---------------------------------------------------------------------------

/// Memory layout of a 4-D tensor `(n, c, h, w)`.
#[derive(Clone, Copy, Debug)]
enum ImgLayout {
    /// Dense NCHW through `ImageRef::nchw`.
    Nchw,
    /// Dense NHWC through `ImageRef::nhwc`.
    Nhwc,
    /// Axes stored in the memory order `order` (outermost first), with
    /// `gap[k]` unused elements after each run of axis `order[k]` and a unit
    /// stride of `1 + gap[3]`; through `ImageRef::with_strides`.
    Strided { order: [usize; 4], gap: [usize; 4] },
    /// Dense NCHW order over the other axes, stride 0 along `axis` (every
    /// index of that axis sees the same data); through
    /// `ImageRef::with_strides`.
    Broadcast { axis: usize },
}

fn img_layout() -> impl Strategy<Value = ImgLayout> {
    let perm = Just([0usize, 1, 2, 3]).prop_shuffle().prop_map(|v| {
        let mut o = [0; 4];
        o.copy_from_slice(&v);
        o
    });
    prop_oneof![
        2 => Just(ImgLayout::Nchw),
        2 => Just(ImgLayout::Nhwc),
        3 => (perm, [0usize..3, 0usize..3, 0usize..3, 0usize..2])
            .prop_map(|(order, gap)| ImgLayout::Strided { order, gap }),
        1 => (0usize..4).prop_map(|axis| ImgLayout::Broadcast { axis }),
    ]
}

/// A tensor with its own stride computation (independent of `ImageRef`);
/// unused elements hold NaN.
struct Tensor<T> {
    data: Vec<T>,
    dims: [usize; 4],
    strides: [usize; 4],
    layout: ImgLayout,
}

impl<T: Flt> Tensor<T> {
    fn random(rg: &mut Gen, dims: [usize; 4], layout: ImgLayout, spread: bool) -> Self {
        let [n, c, h, w] = dims;
        let (strides, len) = match layout {
            ImgLayout::Nchw => ([c * h * w, h * w, w, 1], n * c * h * w),
            ImgLayout::Nhwc => ([h * w * c, 1, w * c, c], n * c * h * w),
            ImgLayout::Strided { order, gap } => {
                let mut strides = [0; 4];
                let mut s = 1 + gap[3];
                for k in (0..4).rev() {
                    strides[order[k]] = s;
                    s = s * dims[order[k]] + gap[k];
                }
                (strides, s)
            }
            ImgLayout::Broadcast { axis } => {
                let mut strides = [0; 4];
                let mut s = 1;
                for ax in (0..4).rev() {
                    if ax != axis {
                        strides[ax] = s;
                        s *= dims[ax];
                    }
                }
                (strides, s)
            }
        };
        let mut t = Tensor {
            data: vec![T::from_f64(f64::NAN); len],
            dims,
            strides,
            layout,
        };
        // Per-channel magnitudes over 4 decades when `spread`.
        let scales: Vec<f64> = (0..c)
            .map(|_| {
                if spread {
                    10f64.powf(-4.0 * rg.unit())
                } else {
                    1.0
                }
            })
            .collect();
        for i in 0..n {
            for (ch, scale) in scales.iter().enumerate() {
                for y in 0..h {
                    for x in 0..w {
                        let v = rg.uniform(-1.0, 1.0) * scale;
                        let off = t.offset(i, ch, y, x);
                        t.data[off] = T::from_f64(v);
                    }
                }
            }
        }
        t
    }

    fn offset(&self, i: usize, c: usize, y: usize, x: usize) -> usize {
        i * self.strides[0] + c * self.strides[1] + y * self.strides[2] + x * self.strides[3]
    }

    fn at(&self, i: usize, c: usize, y: usize, x: usize) -> f64 {
        self.data[self.offset(i, c, y, x)].to_f64()
    }

    fn image_ref(&self) -> ImageRef<'_, T> {
        let [n, c, h, w] = self.dims;
        match self.layout {
            ImgLayout::Nchw => ImageRef::nchw(&self.data, n, c, h, w).unwrap(),
            ImgLayout::Nhwc => ImageRef::nhwc(&self.data, n, c, h, w).unwrap(),
            ImgLayout::Strided { .. } | ImgLayout::Broadcast { .. } => {
                ImageRef::with_strides(&self.data, self.dims, self.strides).unwrap()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reference: explicit im2col.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
}

impl Geom {
    fn out(&self) -> (usize, usize) {
        let oh = (self.h + 2 * self.ph - (self.kh - 1) * self.dh - 1) / self.sh + 1;
        let ow = (self.w + 2 * self.pw - (self.kw - 1) * self.dw - 1) / self.sw + 1;
        (oh, ow)
    }
    fn kernel_geometry(&self) -> Conv2dGeometry {
        Conv2dGeometry::new(self.batch, self.c, self.h, self.w, self.kh, self.kw)
            .stride(self.sh, self.sw)
            .padding(self.ph, self.pw)
            .dilation(self.dh, self.dw)
    }
}

/// The im2col matrix: one row per output position `(i, oy, ox)`, columns
/// `(c, u, v)` then a ones column with a bias; zeros in the padding.
fn im2col(x: &Tensor<impl Flt>, g: &Geom, bias: bool) -> M {
    let (oh, ow) = g.out();
    let k = g.c * g.kh * g.kw + bias as usize;
    let mut p = M::zeros(g.batch * oh * ow, k);
    for i in 0..g.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (i * oh + oy) * ow + ox;
                let mut col = 0;
                for c in 0..g.c {
                    for u in 0..g.kh {
                        for v in 0..g.kw {
                            let iy = (oy * g.sh + u * g.dh) as isize - g.ph as isize;
                            let ix = (ox * g.sw + v * g.dw) as isize - g.pw as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                p[(row, col)] = x.at(i, c, iy as usize, ix as usize);
                            }
                            col += 1;
                        }
                    }
                }
                if bias {
                    p[(row, col)] = 1.0;
                }
            }
        }
    }
    p
}

/// The gradient rows `g_{i,t}`: one row per output position, `C_out`
/// columns.
fn grad_rows(gt: &Tensor<impl Flt>) -> M {
    let [n, c, h, w] = gt.dims;
    let mut m = M::zeros(n * h * w, c);
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    m[((i * h + y) * w + x, ch)] = gt.at(i, ch, y, x);
                }
            }
        }
    }
    m
}

fn norm() -> impl Strategy<Value = ConvNormalization> {
    prop_oneof![
        Just(ConvNormalization::Kfc),
        Just(ConvNormalization::KfacPytorch)
    ]
}

#[derive(Clone, Debug)]
struct ConvCase {
    geom: Geom,
    bias: bool,
    norm: ConvNormalization,
    input_layout: ImgLayout,
    spread: bool,
    alpha: f64,
    beta: f64,
    a_layout: Layout,
    c_out: usize,
    grad_layout: ImgLayout,
    g_layout: Layout,
    rayon: bool,
    seed: u64,
}

fn alpha() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), -2.0..2.0f64]
}

fn beta() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), -2.0..2.0f64]
}

/// Random geometries, always valid: the input is at least as large as the
/// dilated kernel minus the padding.
fn geom(max_batch: usize) -> impl Strategy<Value = Geom> {
    geom_with(max_batch, 0..=3, 1..=4)
}

/// Patches of at least 64 entries (`C kh kw >= 64`): wide enough for the
/// patch extraction to be split over two threads.
fn wide_geom() -> impl Strategy<Value = Geom> {
    geom_with(2, 4..=8, 3..=4).prop_map(|mut g| {
        g.c = g.c.max(64usize.div_ceil(g.kh * g.kw));
        g
    })
}

fn geom_with(
    max_batch: usize,
    channels: std::ops::RangeInclusive<usize>,
    kernel: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Geom> {
    (
        1usize..=max_batch,
        channels,
        (kernel.clone(), kernel),
        (1usize..=3, 1usize..=3),
        (0usize..=2, 0usize..=2),
        (1usize..=3, 1usize..=3),
        (0usize..=5, 0usize..=5),
    )
        .prop_map(
            |(batch, c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), (eh, ew))| {
                let span_h = (kh - 1) * dh + 1;
                let span_w = (kw - 1) * dw + 1;
                let h = span_h.saturating_sub(2 * ph).max(1) + eh;
                let w = span_w.saturating_sub(2 * pw).max(1) + ew;
                Geom {
                    batch,
                    c,
                    h,
                    w,
                    kh,
                    kw,
                    sh,
                    sw,
                    ph,
                    pw,
                    dh,
                    dw,
                }
            },
        )
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    conv_case_with(geom(3).boxed(), par().boxed())
}

/// Wide patches, always with two threads.
fn wide_conv_case() -> impl Strategy<Value = ConvCase> {
    conv_case_with(wide_geom().boxed(), Just(true).boxed())
}

fn conv_case_with(
    geom: BoxedStrategy<Geom>,
    rayon: BoxedStrategy<bool>,
) -> impl Strategy<Value = ConvCase> {
    (
        (geom, any::<bool>(), norm(), img_layout(), any::<bool>()),
        (alpha(), beta(), layout()),
        (1usize..=5, img_layout(), layout()),
        (rayon, any::<u64>()),
    )
        .prop_map(
            |(
                (geom, bias, norm, input_layout, spread),
                (alpha, beta, a_layout),
                (c_out, grad_layout, g_layout),
                (rayon, seed),
            )| ConvCase {
                geom,
                bias,
                norm,
                input_layout,
                spread,
                alpha,
                beta,
                a_layout,
                c_out,
                grad_layout,
                g_layout,
                rayon,
                seed,
            },
        )
}

/// A factor with a random lower triangle (NaN when `alpha == 0`, which must
/// not be read), random strict upper triangle and sentinel padding.
fn initial_factor<T: Flt>(rg: &mut Gen, k: usize, layout: Layout, alpha: f64) -> (M, Stored<T>) {
    let f0 = rg.matrix(k, k).round::<T>();
    let mut s = Stored::<T>::from_m(&f0, layout, T::from_f64(SENTINEL));
    if alpha == 0.0 {
        for j in 0..k {
            for i in j..k {
                s.set(i, j, T::from_f64(f64::NAN));
            }
        }
    }
    (f0, s)
}

/// `F <- alpha F + scale Σ_rows r r^T` checked on the lower triangle.
///
/// Tolerance: each entry is a sum of `P` products (`P` rows) plus the old
/// entry, scaled twice, and `scale` itself is computed with up to four
/// roundings (`beta / (n S^3)`), so
/// `|err| <= 2 (P + 8) eps (|alpha| |F0| + |scale| Σ |r_a| |r_b|)`.
#[allow(clippy::too_many_arguments)]
fn check_factor<T: Flt>(
    what: &str,
    got: &Stored<T>,
    before: &Stored<T>,
    f0: &M,
    alpha: f64,
    scale: f64,
    rows: &M,
) -> Result<(), TestCaseError> {
    let k = rows.c;
    let part = if alpha == 0.0 {
        M::zeros(k, k)
    } else {
        f0.scale(alpha)
    };
    let want = part.add(&gram(rows).scale(scale));
    let tol = part
        .abs()
        .add(&gram(&rows.abs()).scale(scale.abs()))
        .scale(2.0 * (rows.r + 8) as f64 * T::eps());
    check_entrywise(what, &got.to_m(), &want, &tol, lower)?;
    check_untouched(what, before, got, strict_upper)
}

/// The A normalization of the module docs: `1/(n S)` (KFC) or `1/(n S^3)`
/// (kfac-pytorch).
fn a_scale(norm: ConvNormalization, n: usize, s: usize) -> f64 {
    let (n, s) = (n as f64, s as f64);
    match norm {
        ConvNormalization::Kfc => 1.0 / (n * s),
        ConvNormalization::KfacPytorch => 1.0 / (n * s * s * s),
    }
}

/// The G normalization of the module docs: `1/n` (KFC) or `1/(n S^3)`.
fn g_scale(norm: ConvNormalization, n: usize, s: usize) -> f64 {
    let (n, s) = (n as f64, s as f64);
    match norm {
        ConvNormalization::Kfc => 1.0 / n,
        ConvNormalization::KfacPytorch => 1.0 / (n * s * s * s),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_a_update<T: Flt>(
    case_geom: &Geom,
    bias: bool,
    norm: ConvNormalization,
    input_layout: ImgLayout,
    spread: bool,
    (alpha, beta): (f64, f64),
    a_layout: Layout,
    rayon: bool,
    rg: &mut Gen,
) -> Result<(), TestCaseError> {
    let g = *case_geom;
    let par = par_of(rayon);
    let x = Tensor::<T>::random(rg, [g.batch, g.c, g.h, g.w], input_layout, spread);
    let k = g.c * g.kh * g.kw + bias as usize;
    let (alpha, beta) = (T::round(alpha), T::round(beta));
    let (a0, mut a) = initial_factor::<T>(rg, k, a_layout, alpha);
    let before = a.clone();
    let geometry = g.kernel_geometry();
    let (oh, ow) = g.out();
    prop_assert_eq!(geometry.output_size().map_err(fail)?, (oh, ow));
    let mut buf = buffer(conv2d_a_update_scratch::<T>(&geometry, bias).map_err(fail)?);
    conv2d_a_update(
        a.view_mut(),
        T::from_f64(alpha),
        T::from_f64(beta),
        x.image_ref(),
        &geometry,
        bias,
        norm,
        par,
        MemStack::new(&mut buf),
    )
    .map_err(fail)?;
    let patches = im2col(&x, &g, bias);
    let scale = beta * a_scale(norm, g.batch, oh * ow);
    check_factor("conv2d A factor", &a, &before, &a0, alpha, scale, &patches)
}

/// conv2d A: `A <- alpha A + beta * norm * Σ_{i,t} p p^T` over the im2col
/// patches.
fn check_conv_a<T: Flt>(case: &ConvCase) -> Result<(), TestCaseError> {
    let mut rg = Gen::new(case.seed);
    run_a_update::<T>(
        &case.geom,
        case.bias,
        case.norm,
        case.input_layout,
        case.spread,
        (case.alpha, case.beta),
        case.a_layout,
        case.rayon,
        &mut rg,
    )
}

both_types!(
    conv2d_a_update_matches_explicit_im2col,
    conv_case(),
    check_conv_a
);

both_types!(
    conv2d_a_update_with_wide_patches_on_two_threads_matches_im2col,
    wide_conv_case(),
    check_conv_a
);

/// conv2d G: `G <- alpha G + beta * norm * Σ_{i,t} g g^T` over the output
/// positions of `grad_out` `(n, C_out, H_out, W_out)`.
fn check_conv_g<T: Flt>(case: &ConvCase) -> Result<(), TestCaseError> {
    let g = case.geom;
    let par = par_of(case.rayon);
    let mut rg = Gen::new(case.seed);
    let (oh, ow) = g.out();
    let gt = Tensor::<T>::random(
        &mut rg,
        [g.batch, case.c_out, oh, ow],
        case.grad_layout,
        case.spread,
    );
    let (alpha, beta) = (T::round(case.alpha), T::round(case.beta));
    let (g0, mut gm) = initial_factor::<T>(&mut rg, case.c_out, case.g_layout, alpha);
    let before = gm.clone();
    conv2d_g_update(
        gm.view_mut(),
        T::from_f64(alpha),
        T::from_f64(beta),
        gt.image_ref(),
        case.norm,
        par,
    )
    .map_err(fail)?;
    let scale = beta * g_scale(case.norm, g.batch, oh * ow);
    check_factor(
        "conv2d G factor",
        &gm,
        &before,
        &g0,
        alpha,
        scale,
        &grad_rows(&gt),
    )
}

both_types!(
    conv2d_g_update_matches_explicit_position_sum,
    conv_case(),
    check_conv_g
);

// ---------------------------------------------------------------------------
// Many positions: several patch tiles.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct TileCase {
    geom: Geom,
    bias: bool,
    norm: ConvNormalization,
    input_layout: ImgLayout,
    alpha: f64,
    beta: f64,
    a_layout: Layout,
    rayon: bool,
    seed: u64,
}

/// More than `PATCH_TILE_MAX_ROWS = 1024` output positions (at least
/// 2 * 23 * 23 = 1058, at most 4 * 40 * 40 = 6400) with small patches (at
/// most 2 * 2 * 2 + 1 = 9 entries, so a tile is 1024 rows): one to seven
/// tiles, the last one partial.
fn tile_case() -> impl Strategy<Value = TileCase> {
    (
        (
            2usize..=4,
            1usize..=2,
            (1usize..=2, 1usize..=2),
            (24usize..=40, 24usize..=40),
            (0usize..=1, 0usize..=1),
        ),
        (any::<bool>(), norm(), img_layout()),
        (alpha(), beta(), layout(), par(), any::<u64>()),
    )
        .prop_map(
            |(
                (batch, c, (kh, kw), (h, w), (ph, pw)),
                (bias, norm, input_layout),
                (alpha, beta, a_layout, rayon, seed),
            )| TileCase {
                geom: Geom {
                    batch,
                    c,
                    h,
                    w,
                    kh,
                    kw,
                    sh: 1,
                    sw: 1,
                    ph,
                    pw,
                    dh: 1,
                    dw: 1,
                },
                bias,
                norm,
                input_layout,
                alpha,
                beta,
                a_layout,
                rayon,
                seed,
            },
        )
}

fn check_conv_a_tiles<T: Flt>(case: &TileCase) -> Result<(), TestCaseError> {
    let (oh, ow) = case.geom.out();
    prop_assert!(case.geom.batch * oh * ow > kfac_kernels::conv::PATCH_TILE_MAX_ROWS);
    let mut rg = Gen::new(case.seed);
    run_a_update::<T>(
        &case.geom,
        case.bias,
        case.norm,
        case.input_layout,
        false,
        (case.alpha, case.beta),
        case.a_layout,
        case.rayon,
        &mut rg,
    )
}

both_types!(
    conv2d_a_update_over_several_patch_tiles_matches_im2col,
    tile_case(),
    check_conv_a_tiles
);

// ---------------------------------------------------------------------------
// Broadcast (stride-0) tensors.
// ---------------------------------------------------------------------------

/// `ImageRef::with_strides` accepts arbitrary strides, zero included (here
/// a batch of two samples that are the same image, `stride_n = 0`). The
/// elements of `data` that the view does not address are not part of the
/// input: a NaN there must not be reported, and the statistics are those of
/// the viewed elements (checked against im2col).
fn check_broadcast_batch<T: Flt>() {
    let dims = [2usize, 1, 3, 3];
    let strides = [0usize, 9, 3, 1];
    // 18 = n*c*h*w elements; the view reads only the first 9.
    let mut data: Vec<T> = (0..18)
        .map(|v| T::from_f64((v as f64 - 4.0) / 4.0))
        .collect();
    for v in &mut data[9..] {
        *v = T::from_f64(f64::NAN);
    }
    let x = Tensor {
        data: data.clone(),
        dims,
        strides,
        layout: ImgLayout::Nchw, // only used by `image_ref`, not below
    };
    let img = ImageRef::with_strides(&data, dims, strides).unwrap();
    let g = Geom {
        batch: 2,
        c: 1,
        h: 3,
        w: 3,
        kh: 2,
        kw: 2,
        sh: 1,
        sw: 1,
        ph: 0,
        pw: 0,
        dh: 1,
        dw: 1,
    };
    let geometry = g.kernel_geometry();
    let mut a = Stored::<T>::filled(5, 5, Layout::ColMajor, T::from_f64(SENTINEL));
    let before = a.clone();
    let mut buf = buffer(conv2d_a_update_scratch::<T>(&geometry, true).unwrap());
    conv2d_a_update(
        a.view_mut(),
        T::ZERO,
        T::ONE,
        img,
        &geometry,
        true,
        ConvNormalization::Kfc,
        faer::Par::Seq,
        MemStack::new(&mut buf),
    )
    .expect("a valid stride-0 view with NaN only outside the view");
    let (oh, ow) = g.out();
    check_factor(
        "conv2d A factor (broadcast batch)",
        &a,
        &before,
        &M::zeros(5, 5),
        0.0,
        a_scale(ConvNormalization::Kfc, 2, oh * ow),
        &im2col(&x, &g, true),
    )
    .unwrap();

    let mut gm = Stored::<T>::filled(1, 1, Layout::ColMajor, T::from_f64(SENTINEL));
    let before = gm.clone();
    conv2d_g_update(
        gm.view_mut(),
        T::ZERO,
        T::ONE,
        img,
        ConvNormalization::Kfc,
        faer::Par::Seq,
    )
    .expect("a valid stride-0 view with NaN only outside the view");
    check_factor(
        "conv2d G factor (broadcast batch)",
        &gm,
        &before,
        &M::zeros(1, 1),
        0.0,
        g_scale(ConvNormalization::Kfc, 2, 9),
        &grad_rows(&x),
    )
    .unwrap();
}

#[test]
fn conv_updates_ignore_data_outside_a_broadcast_view() {
    check_broadcast_batch::<f32>();
    check_broadcast_batch::<f64>();
}
